"""The GEMM dtype of the torch backend for bf16 / fp16 / FP8 inputs (`lowp_math_dtype`):

    DSA_KERNEL_LOWP_MATH = bf16 | fp32       (unset: fp16 inputs fp32; bf16 / FP8 inputs bf16 where
                                              the device has native bf16 GEMMs, CUDA or a CPU with
                                              AVX512-BF16 or AMX, else fp32)

On a CPU without them (e.g. AVX2 only) a bf16 GEMM is a slow fallback, 10-80x an fp32 one, so the
torch backend upcasts block by block (never a whole cache) and runs fp32 GEMMs there. fp16 inputs
never go through bf16 (it would drop 3 mantissa bits); fp16 -> fp32 is exact.
Its own module (not kernels/dispatch.py) so the backends that use it never import the dispatch.

Test: .venv/bin/python -m pytest -q tests/kernels/test_dispatch.py
"""

from __future__ import annotations

import functools
import os

import torch

LOWP_MATH_VAR = "DSA_KERNEL_LOWP_MATH"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 GEMMs at (or above) fp32 speed."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(f()) for f in checks if f is not None)


def lowp_math_dtype(t: torch.Tensor) -> torch.dtype:
    """GEMM dtype of the torch backend for a bf16 / fp16 / FP8 input `t` (see the module docstring):
    fp32 for fp16; bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere; DSA_KERNEL_LOWP_MATH
    forces it."""
    forced = os.environ.get(LOWP_MATH_VAR, "").strip().lower()
    if forced:
        if forced not in ("bf16", "fp32"):
            raise ValueError(f"{LOWP_MATH_VAR}={forced!r}: expected bf16 or fp32")
        return torch.bfloat16 if forced == "bf16" else torch.float32
    if t.dtype == torch.float16:
        return torch.float32
    return torch.bfloat16 if t.is_cuda or cpu_has_native_bf16() else torch.float32
