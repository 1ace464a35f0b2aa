"""Backend choice for the public kernel ops (`dsa_rag.kernels.indexer.indexer_*`, `dsa_rag.kernels.sparse_mla`).

    DSA_KERNEL_BACKEND = naive | torch | triton     (unset: CUDA tensors -> triton, CPU -> torch)

* naive  : `kernels/<op>/naive.py`, fp32 reference, materializes everything (tests, debugging).
* torch  : `kernels/<op>/torch_impl.py`, blocked/streaming PyTorch, the fast CPU path.
* triton : `kernels/<op>/triton.py`. On CPU tensors it only works under the Triton interpreter,
           i.e. TRITON_INTERPRET=1 must be set before `triton` is first imported (the tests do).
  If Triton is the default (CUDA) but cannot be imported, we fall back to torch with a warning;
  if it was forced by the env var, the import error is raised.

The env var is read on every call, so tests can switch backends with monkeypatch.setenv.

GEMM dtype of the torch backend for bf16 / fp16 / FP8 inputs (`lowp_math_dtype`):

    DSA_KERNEL_LOWP_MATH = bf16 | fp32       (unset: fp16 inputs fp32; bf16 / FP8 inputs bf16 where
                                              the device has native bf16 GEMMs, CUDA or a CPU with
                                              AVX512-BF16 or AMX, else fp32)

On a CPU without them (e.g. AVX2 only) a bf16 GEMM is a slow fallback, 10-80x an fp32 one, so the
torch backend upcasts block by block (never a whole cache) and runs fp32 GEMMs there. fp16 inputs
never go through bf16 (it would drop 3 mantissa bits); fp16 -> fp32 is exact.
Test: .venv/bin/python -m pytest -q tests/kernels/test_dispatch.py
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("naive", "torch", "triton")
ENV_VAR = "DSA_KERNEL_BACKEND"
LOWP_MATH_VAR = "DSA_KERNEL_LOWP_MATH"
_warned = set()


def backend_for(*tensors: torch.Tensor) -> str:
    """Backend name for an op whose inputs are `tensors` (env var first, else by device)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {', '.join(BACKENDS)}")
        if forced == "triton" and not tensors[0].is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{ENV_VAR}=triton on CPU tensors needs the Triton interpreter: "
                "set TRITON_INTERPRET=1 before importing triton (or use the torch backend)"
            )
        return forced
    return "triton" if tensors[0].is_cuda else "torch"


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


def load(op_package: str, backend: str):
    """Import `dsa_rag.kernels.<op_package>.<module>` for `backend`; CUDA default falls back to torch."""
    module = {"naive": "naive", "torch": "torch_impl", "triton": "triton"}[backend]
    try:
        return importlib.import_module(f"dsa_rag.kernels.{op_package}.{module}")
    except ImportError as exc:
        if backend != "triton" or os.environ.get(ENV_VAR):
            raise
        if op_package not in _warned:
            _warned.add(op_package)
            warnings.warn(f"kernels.{op_package}: Triton unavailable ({exc}); using the torch backend")
        return importlib.import_module(f"dsa_rag.kernels.{op_package}.torch_impl")
