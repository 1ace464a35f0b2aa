"""FP8 numerics of the official DeepSeek-V3.2 kernels, in plain PyTorch (runs on CPU).

- `act_quant`: per-block absmax e4m3 quantization with optional ue8m0 (power-of-two) scales,
  exactly as `inference/kernel.py::act_quant` (amax clamped at 1e-4, scale = amax / 448).
- `hadamard`: the Sylvester Hadamard matrix; `rotate` = x @ H / sqrt(d), what
  `fast_hadamard_transform(x, scale=d**-0.5)` computes.
- `weight_dequant`: W = W_fp8 * weight_scale_inv[i // 128, j // 128] (checkpoint blocks).

    .venv/bin/python -m dsa_rag.model.fp8     # quantize a random tensor and print the round-trip error
"""

from __future__ import annotations

import functools

import torch

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def act_quant(x: torch.Tensor, block: int, scale_fmt: str | None = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., N] -> (x_fp8 [..., N] e4m3, scale [..., N // block] fp32) with x ~= x_fp8 * scale."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"act_quant: last dim {n} is not a multiple of the block size {block}")
    xb = x.float().unflatten(-1, (n // block, block))
    amax = xb.abs().amax(-1).clamp_min(1e-4)
    scale = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    y = (xb / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return y.flatten(-2), scale


def act_dequant(x_fp8: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    n = x_fp8.shape[-1]
    block = n // scale.shape[-1]
    y = x_fp8.float().unflatten(-1, (scale.shape[-1], block)) * scale.unsqueeze(-1)
    return y.flatten(-2).to(dtype)


def fp8_roundtrip(x: torch.Tensor, block: int, scale_fmt: str | None = "ue8m0") -> torch.Tensor:
    """What V3.2 does to c_kv before caching it: quantize to e4m3 and back (simulated FP8 cache)."""
    q, s = act_quant(x, block, scale_fmt)
    return act_dequant(q, s, x.dtype)


@functools.lru_cache(maxsize=8)
def hadamard(d: int) -> torch.Tensor:
    """Sylvester-ordered Hadamard matrix of order d (a power of two), entries +-1, fp32."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"hadamard: order {d} is not a power of two")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotate(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Hadamard rotation of the last dim: x @ H / sqrt(d). Dot products are kept."""
    d = x.shape[-1]
    h = hadamard(d).to(device=x.device, dtype=torch.float32)
    return (x.float() @ h * d**-0.5).to(x.dtype)


def weight_dequant(w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, dtype=torch.float32) -> torch.Tensor:
    """Checkpoint FP8 weight [M, N] + weight_scale_inv [ceil(M/128), ceil(N/128)] -> dense weight."""
    m, n = w.shape
    bm, bn = -(-m // block), -(-n // block)
    if tuple(scale_inv.shape) != (bm, bn):
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected ({bm}, {bn}) for a weight of {(m, n)}")
    s = scale_inv.float().repeat_interleave(block, 0)[:m].repeat_interleave(block, 1)[:, :n]
    return (w.float() * s).to(dtype)


def weight_quant(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense weight -> (e4m3 weight, weight_scale_inv), 128x128 blocks (writes official-layout checkpoints)."""
    m, n = w.shape
    bm, bn = -(-m // block), -(-n // block)
    pad = torch.zeros(bm * block, bn * block, dtype=torch.float32)
    pad[:m, :n] = w.float()
    blocks = pad.view(bm, block, bn, block)
    scale = blocks.abs().amax((1, 3)).clamp_min(1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(bm * block, bn * block)[:m, :n]
    return q.to(FP8_DTYPE).contiguous(), scale


if __name__ == "__main__":
    x = torch.randn(4, 256)
    y = fp8_roundtrip(x, 128)
    print("fp8 round-trip rel. error:", ((x - y).norm() / x.norm()).item())
