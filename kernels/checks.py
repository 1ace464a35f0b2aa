"""Input validation shared by the public kernel ops: ValueErrors that name the argument,
the expected shape/dtype and the actual one. Pure Python; no test of its own beyond
tests/kernels/test_dispatch.py (which feeds every op bad inputs).
"""

from __future__ import annotations

import torch

FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)
)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def check_tensor(name: str, t, shape: tuple, dtypes: tuple, device=None) -> None:
    """`shape` entries: int (exact), str (named, any size), None (any). Raises ValueError."""
    want = "[" + ", ".join(str(s) if s is not None else "*" for s in shape) + "]"
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {want}, got {type(t).__name__}")
    if t.dim() != len(shape) or any(isinstance(s, int) and s != d for s, d in zip(shape, t.shape)):
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device} (same as q), got {t.device}")
