"""Backend choice for the public kernel ops (`dsa_rag.kernels.indexer.indexer_*`, `dsa_rag.kernels.sparse_mla`).

    DSA_KERNEL_BACKEND = naive | torch | triton | library
                         (unset: CUDA tensors -> library on sm_90 / sm_100 when one is installed and
                          serves the call, else triton; CPU -> torch)

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

* library: kernels/libraries.py, FlashMLA / DeepGEMM / FlashInfer from PyPI (optional extra) behind
           the same signatures, for the calls they support (V3.2 bf16 sparse_mla with 64 / 128 heads,
           FP8 relu indexer scores with 32 / 64 heads of 128); every other call goes to triton.
           Default on sm_90 / sm_100 when one is present; forced: RuntimeError if none is importable.
           A library call that raises falls back to triton (default) with one warning, like Triton's
           compile errors fall back to torch.

The env var is read on every call, so tests can switch backends with monkeypatch.setenv.

The torch backend's GEMM dtype for 16-bit / FP8 inputs (DSA_KERNEL_LOWP_MATH) is kernels/precision.py
(`lowp_math_dtype`, re-exported here): the backends import it from there, so no backend imports
this module back.
Test: .venv/bin/python -m pytest -q tests/kernels/test_dispatch.py
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import warnings

import torch

from dsa_rag.kernels.precision import LOWP_MATH_VAR, cpu_has_native_bf16, lowp_math_dtype  # noqa: F401 (re-exported)

BACKENDS = ("naive", "torch", "triton", "library")
ENV_VAR = "DSA_KERNEL_BACKEND"
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
    sm_count: int = 0  # SMs (multiprocessors); sizes the decode split (kernels/sparse_mla/decode.py); 0 = unknown


    @property
    def fp8_dot(self) -> bool:
        """FP8 x FP8 tl.dot compiles (NVIDIA sm_89+); elsewhere FP8 is converted to bf16 on the host."""
        return self.kind == "cuda" and tuple(self.capability) >= (8, 9)


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    kind = "hip" if getattr(torch.version, "hip", None) else "cuda"
    return Target(kind, (props.major, props.minor), props.multi_processor_count)


def target_of(device: torch.device) -> Target:
    if device.type != "cuda":
        return Target("interp")
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


def backend_for(*tensors: torch.Tensor) -> str:
    """Backend name for an op whose inputs are `tensors` (env var first, else by device)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {', '.join(BACKENDS)}")
        if forced in ("triton", "library") and not tensors[0].is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{ENV_VAR}={forced} on CPU tensors needs the Triton interpreter: "
                "set TRITON_INTERPRET=1 before importing triton (or use the torch backend)"
            )
        if forced == "library":
            from dsa_rag.kernels import libraries
            if not libraries.present():
                raise RuntimeError(
                    f"{ENV_VAR}=library: no kernel library is importable "
                    f"({'; '.join(f'{n}: {l.reason}' for n, l in libraries.status().items())}); install the "
                    f"'{libraries.EXTRA}' extra on a CUDA machine (kernels/README.md) or use triton")
        return forced
    if not tensors[0].is_cuda:
        return "torch"
    if tensors[0].dtype == torch.float32:
        return "torch"
    from dsa_rag.kernels import libraries
    return "library" if libraries.preferred(tensors[0]) else "triton"


def load(op_package: str, backend: str):
    """Import `dsa_rag.kernels.<op_package>.<module>` for `backend` (library: its Triton module, which
    serves what no library does; `call` routes the supported calls); CUDA default falls back to torch."""
    module = {"naive": "naive", "torch": "torch_impl", "triton": "triton", "library": "triton"}[backend]
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
    forced = bool(os.environ.get(ENV_VAR, "").strip())
    if backend == "library":
        from dsa_rag.kernels import libraries
        key = ("library", op_package, fn_name, x.dtype, tuple(x.shape[1:]), str(x.device))
        if key not in _failed and libraries.supports(op_package, fn_name, args, kwargs):
            try:
                return libraries.function(op_package, fn_name)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a library's own checks raise RuntimeError / AssertionError
                if forced:
                    raise
                _failed.add(key)
                _warn_once(op_package, fn_name, x, exc, "the Triton backend")
        backend = "triton"  # a call no library serves (or one that failed) goes to Triton
    impl = load(op_package, backend)
    if backend != "triton" or forced:
        return getattr(impl, fn_name)(*args, **kwargs)
    key = (op_package, fn_name, x.dtype, tuple(x.shape[1:]), str(x.device))
    if key in _failed:
        return getattr(load(op_package, "torch"), fn_name)(*args, **kwargs)
    try:
        return getattr(impl, fn_name)(*args, **kwargs)
    except triton_errors() as exc:
        _failed.add(key)
        _warn_once(op_package, fn_name, x, exc, "the torch backend")
        return getattr(load(op_package, "torch"), fn_name)(*args, **kwargs)


def _warn_once(op_package, fn_name, x, exc, instead):
    """One RuntimeWarning per (op, reason): which kernel failed, why, and what runs instead from now on."""
    what = "Triton kernel" if instead == "the torch backend" else "kernel library"
    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
    if (op_package, reason) not in _warned:
        _warned.add((op_package, reason))
        warnings.warn(f"kernels.{op_package}.{fn_name}: {what} failed for {x.dtype} {list(x.shape)} on "
                      f"{x.device} ({reason}); using {instead} for it from now on", RuntimeWarning, stacklevel=4)


# --- launch-config autotuning ---------------------------------------------------------------
AUTOTUNE_VAR = "DSA_KERNEL_AUTOTUNE"
_tuned: dict = {}  # key -> the config the timing picked


def autotune_enabled(t: torch.Tensor) -> bool:
    """DSA_KERNEL_AUTOTUNE=1 and a CUDA tensor: time the launchers' config tables once per key.
    Off by default: the tables' first entries are the defaults (kernels/<op>/triton.py `configs`),
    and every entry is in the GPU compile matrix (kernels/gpu_compile.py)."""
    return t.is_cuda and os.environ.get(AUTOTUNE_VAR, "").strip() == "1"


def autotune(key, candidates: list, run, reps: int = 3):
    """The fastest of `candidates` for `key` by `run(config)` (CUDA events, median of `reps` after a
    warm-up that also compiles), cached per key; a candidate that fails to compile or launch
    (triton_errors()) is skipped. With one candidate, or all failing but the first, the first."""
    if key in _tuned:
        return _tuned[key]
    best, best_t = candidates[0], float("inf")
    if len(candidates) > 1:
        for cand in candidates:
            try:
                run(cand)  # compile + warm-up
                times = []
                for _ in range(reps):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    run(cand)
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
            except triton_errors():
                continue
            t = sorted(times)[len(times) // 2]
            if t < best_t:
                best, best_t = cand, t
    _tuned[key] = best
    return best
