"""Small numeric building blocks of DeepSeek-V4: RMS norms and the interleaved partial RoPE.

V4 rotates only the *trailing* `qk_rope_head_dim` channels of a head (layout `[nope | rope]`),
pairing channels (2i, 2i+1); sliding layers use `rope_theta` (the "main" rope), CSA/HCA layers and
their compressors / indexer use `compress_rope_theta`, with YaRN frequencies when configured but
cos/sin left unscaled (transformers forces attention_factor 1.0 for V4).

    .venv/bin/python -m pytest -q tests/model/test_deepseek_v4.py -p no:cacheprovider
"""

from __future__ import annotations

import torch
from torch import nn

from dsa_rag.model.model import rope_inv_freq
from dsa_rag.model.v4.config import SLIDING, V4Config


class RMSNorm(nn.Module):
    """Weighted RMSNorm, computed in fp32; the weight multiplies before the cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight (the per-head query norm and the hyper-connection input norm)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class Rotary(nn.Module):
    """cos / sin [B, T, rope_dim / 2] for positions [B, T], one set per rope kind."""

    def __init__(self, cfg: V4Config):
        super().__init__()
        d = cfg.qk_rope_head_dim
        self.register_buffer("main_inv_freq", rope_inv_freq(d, cfg.rope_theta), persistent=False)
        self.register_buffer("compress_inv_freq", rope_inv_freq(d, cfg.compress_rope_theta, cfg.rope_scaling),
                             persistent=False)

    def forward(self, positions: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.main_inv_freq if kind == "main" else self.compress_inv_freq
        f = positions.float()[..., None] * inv.to(positions.device)
        return f.cos(), f.sin()


def rope_kind(layer_type: str) -> str:
    return "main" if layer_type == SLIDING else "compress"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing 2 * cos.shape[-1] channels of x in interleaved pairs, in fp32.
    x [B, T, D] or [B, T, H, D]; cos / sin [B, T, r / 2] (pass -sin to undo a rotation)."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    r = 2 * cos.shape[-1]
    nope, rope = x[..., :-r], x[..., -r:].float()
    a, b = rope[..., 0::2], rope[..., 1::2]
    rot = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
    return torch.cat([nope, rot.to(x.dtype)], -1)
