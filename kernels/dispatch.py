"""Backend choice for the public kernel ops (`dsa_rag.kernels.indexer.indexer_*`, `dsa_rag.kernels.sparse_mla`).

    DSA_KERNEL_BACKEND = naive | torch | triton     (unset: CUDA tensors -> triton, CPU -> torch)

* naive  : `kernels/<op>/naive.py`, fp32 reference, materializes everything (tests, debugging).
* torch  : `kernels/<op>/torch_impl.py`, blocked/streaming PyTorch, the fast CPU path.
* triton : `kernels/<op>/triton.py`. On CPU tensors it only works under the Triton interpreter,
           i.e. TRITON_INTERPRET=1 must be set before `triton` is first imported (the tests do).
  If Triton is the default (CUDA) but cannot be imported, we fall back to torch with a warning;
  if it was forced by the env var, the import error is raised.
  Default (unforced) choice only:
  * fp32 CUDA inputs go to torch (cuBLAS fp32/TF32): the Triton kernels would run an FMA
    (no tensor core) dot in fp32 whose tiles need 200+ KB of shared memory.
  * a Triton compile error (CompilationError, ptxas failure) or OutOfResources (shared memory,
    registers) at a call falls back to the torch backend for that call and for later calls with
    the same (op, dtype, per-row shape, device), with ONE warning per (op, reason); forced
    (DSA_KERNEL_BACKEND=triton) calls raise instead, so benchmarks never time torch by mistake.

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

import dataclasses
import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("naive", "torch", "triton")
ENV_VAR = "DSA_KERNEL_BACKEND"
LOWP_MATH_VAR = "DSA_KERNEL_LOWP_MATH"
_warned = set()
_failed = set()  # (op_package, fn_name, dtype, per-row shape, device) whose Triton compile/launch failed


@dataclasses.dataclass(frozen=True)
class Target:
    """What a Triton launcher compiles for: "cuda" (NVIDIA, `capability` = (major, minor)),
    "hip" (ROCm) or "interp" (Triton's CPU interpreter). The launchers pick their block sizes and
    FP8 handling from it (`launch_config` in kernels/<op>/triton.py), and the compile check
    (kernels/gpu_compile.py) passes a target without a GPU."""

    kind: str
    capability: tuple = (0, 0)

    @property
    def fp8_dot(self) -> bool:
        """FP8 x FP8 tl.dot compiles (NVIDIA sm_89+); elsewhere FP8 is converted to bf16 on the host."""
        return self.kind == "cuda" and tuple(self.capability) >= (8, 9)


def target_of(device: torch.device) -> Target:
    if device.type != "cuda":
        return Target("interp")
    if getattr(torch.version, "hip", None):
        return Target("hip", tuple(torch.cuda.get_device_capability(device)))
    return Target("cuda", tuple(torch.cuda.get_device_capability(device)))


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
    if not tensors[0].is_cuda:
        return "torch"
    return "torch" if tensors[0].dtype == torch.float32 else "triton"


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


def triton_errors() -> tuple:
    """Triton's compile / resource exception types (empty when triton is not importable)."""
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources, PTXASError
    except ImportError:
        return ()
    return (CompilationError, OutOfResources, PTXASError)


def call(op_package: str, fn_name: str, *args, **kwargs):
    """`<backend module>.<fn_name>(*args, **kwargs)` for the backend of args[0] (see the module
    docstring): a default-chosen Triton call that fails to compile or launch (triton_errors()) is
    redone on the torch backend, that (op, dtype, shape, device) stays on torch, and each
    (op, reason) is warned about once."""
    x = args[0]
    backend = backend_for(x)
    impl = load(op_package, backend)
    if backend != "triton" or os.environ.get(ENV_VAR, "").strip():
        return getattr(impl, fn_name)(*args, **kwargs)
    key = (op_package, fn_name, x.dtype, tuple(x.shape[1:]), str(x.device))
    if key in _failed:
        return getattr(load(op_package, "torch"), fn_name)(*args, **kwargs)
    try:
        return getattr(impl, fn_name)(*args, **kwargs)
    except triton_errors() as exc:
        _failed.add(key)
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
        if (op_package, reason) not in _warned:
            _warned.add((op_package, reason))
            warnings.warn(f"kernels.{op_package}.{fn_name}: Triton kernel failed for {x.dtype} {list(x.shape)} on "
                          f"{x.device} ({reason}); using the torch backend for it from now on", RuntimeWarning,
                          stacklevel=3)
        return getattr(load(op_package, "torch"), fn_name)(*args, **kwargs)
