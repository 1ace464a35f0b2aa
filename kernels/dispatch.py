"""Backend choice for the public kernel ops (`dsa_rag.kernels.indexer.indexer_*`, `dsa_rag.kernels.sparse_mla`).

    DSA_KERNEL_BACKEND = naive | torch | triton     (unset: CUDA tensors -> triton, CPU -> torch)

* naive  : `kernels/<op>/naive.py`, fp32 reference, materializes everything (tests, debugging).
* torch  : `kernels/<op>/torch_impl.py`, blocked/streaming PyTorch, the fast CPU path.
* triton : `kernels/<op>/triton.py`. On CPU tensors it only works under the Triton interpreter,
           i.e. TRITON_INTERPRET=1 must be set before `triton` is first imported (the tests do).
  If Triton is the default (CUDA) but cannot be imported, we fall back to torch with a warning;
  if it was forced by the env var, the import error is raised.

The env var is read on every call, so tests can switch backends with monkeypatch.setenv.
Test: .venv/bin/python -m pytest -q tests/kernels/test_dispatch.py
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("naive", "torch", "triton")
ENV_VAR = "DSA_KERNEL_BACKEND"
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
