"""Kernel libraries from PyPI behind the public ops' signatures: FlashMLA sparse MLA, DeepGEMM /
FlashInfer FP8 MQA logits (the lightning indexer's scores).

    DSA_KERNEL_BACKEND=library   the library for every call it supports (else the Triton backend);
                                 RuntimeError when no library is importable at all
    unset                        CUDA sm_90 / sm_100 with a library present: the same, by default
    .venv/bin/pip install -e '.[kernels-sm90]'    (GPU machines only; kernels/README.md, "Libraries")

Detection (`status()`) runs once, lazily, on the first CUDA call (never on CPU: nothing is
imported there); a package that is absent, or present but fails to import (no CUDA toolkit for
DeepGEMM's JIT, a torch ABI it was not built for), reports why and is skipped. What each package
exports, with which layout, was read from the wheels themselves (kernels/README.md, "Libraries"):

* `flash_mla` (sgl-flash-mla 1.0.0; upstream flash-mla builds the same module from source)
  `flash_mla_sparse_fwd(q [T,H,Dqk] bf16, kv [S,1,Dqk] bf16, indices [T,1,K] int32, sm_scale,
  d_v=512, ..., use_legacy=False) -> (out [T,H,512], max_logits [T,H], lse [T,H] natural log)`;
  H in {64, 128}. Dqk = 576 (V3.2's [c_kv | k_pe]) lives on the "legacy" extension (sm_90a,
  sm_100f); the current one takes Dqk = 512 (V4.1) on sm_100.
* `sgl_kernel.flash_mla` (sgl-kernel 0.3.21, built for torch 2.9.1): the same sparse prefill op,
  `flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512)`, lse in base 2.
* `deep_gemm` (sgl-deep-gemm 0.2.5: `fp8_fp4_mqa_logits(q, kv=(k_fp8 [S,D], k_scale [S] fp32),
  weights [T,H] fp32, ks [T], ke [T] int32, max_seqlen_k, schedule_meta=None)`; the deep_gemm of
  sgl-kernel / upstream: `fp8_mqa_logits(q, kv, weights, ks, ke, clean_logits=True, max_seqlen_k=0)`)
  -> fp32 [T, S] = sum_h w[t,h] ReLU(q[t,h] . k[s] * k_scale[s]) for ks[t] <= s < ke[t] (other
  cells: unspecified without clean_logits). H in {32, 64}, D = 128, FP8 E4M3.
* `flashinfer.dense_mqa.fp8_mqa_logits` (flashinfer-python 0.7.4, experimental, sm_100/sm_103):
  DeepGEMM's signature and semantics.

The adapters convert layouts (kv [S, D] -> [S, 1, D], indices [T, K] -> [T, 1, K] int32 padded
with -1 to a multiple of 64, the causal start_pos -> per-query key ranges [0, start_pos + t + 1)),
fix the outputs to this repository's contract (natural-log lse; rows without a valid index:
out = 0, lse = -inf; scores outside the causal range: -inf), and leave everything else (fp16,
dsa-tiny's head shapes, indexer_head_lse, score="mixture", bf16 indexer inputs) to Triton.
Backward: the same analytic torch backward as the Triton forward (torch_impl.differentiable).

Test: .venv/bin/python -m pytest -q tests/kernels/test_libraries.py   (CPU: detection, dispatch,
the layout conversions against naive.py through fakes with the libraries' contracts; CUDA: every
present library against naive.py)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math

import torch

from dsa_rag.kernels.checks import is_fp8

LN2 = math.log(2.0)
FLASHMLA_TOPK_ALIGN = 64  # FlashMLA's sparse kernels walk the indices in blocks of 64
LOGITS_BUDGET = 512 << 20  # bytes of one [Tc, S] fp32 logits chunk in the library indexer_topk
EXTRA = "kernels-sm90"  # pyproject.toml [project.optional-dependencies]


@dataclasses.dataclass
class Lib:
    """One detected library: the package, its version, and the callables it provides (None: absent)."""

    name: str
    package: str
    version: str | None = None
    present: bool = False
    reason: str = ""
    sparse_mla: object = None  # callable with FlashMLA's flash_mla_sparse_fwd contract
    sparse_mla_lse_base2: bool = False
    sparse_mla_legacy: bool = False  # has the Dqk = 576 (V3.2) kernels
    sparse_mla_use_legacy_kw: bool = False  # reach them with use_legacy=True (sgl-flash-mla)
    mqa_logits: object = None  # callable (q, (k, k_scale), w, ks, ke) -> [T, S] fp32, DeepGEMM contract
    mqa_logits_archs: tuple = (9, 10)  # major compute capabilities it runs on

    @property
    def provides(self) -> list:
        return [n for n, f in (("sparse_mla", self.sparse_mla), ("indexer_logits", self.mqa_logits)) if f]


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def _probe(name: str, package: str, module: str, bind) -> Lib:
    """Import `module` if it is installed (find_spec first: nothing is imported for an absent one)
    and let `bind(mod, lib)` fill in the callables; any import error is the reason it is absent."""
    lib = Lib(name, package, _version(package))
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            lib.reason = f"not installed (pip install {package})"
            return lib
        bind(importlib.import_module(module), lib)
    except Exception as exc:  # noqa: BLE001 - a library that will not import is reported, not fatal
        lib.reason = f"import failed: {type(exc).__name__}: {str(exc).strip()[:200]}"
        return lib
    lib.present = bool(lib.provides)
    lib.reason = lib.reason or ("" if lib.present else "imports, but exports none of the ops used here")
    return lib


def _bind_flash_mla(mod, lib):
    lib.sparse_mla = getattr(mod, "flash_mla_sparse_fwd", None)
    # sgl-flash-mla: has_legacy() says whether the legacy extension (Dqk = 576, sm_90) loaded; upstream
    # flash-mla builds have no such split (their one extension has the V3.2 kernels): treat as legacy
    # without passing use_legacy (sparse_mla_forward passes it only where has_legacy exists)
    has_legacy = getattr(mod, "has_legacy", None)
    lib.sparse_mla_legacy = bool(has_legacy()) if callable(has_legacy) else True
    lib.sparse_mla_use_legacy_kw = callable(has_legacy)


def _bind_sgl_kernel(mod, lib):
    lib.sparse_mla, lib.sparse_mla_lse_base2 = getattr(mod, "flash_mla_sparse_fwd", None), True


def _bind_deep_gemm(mod, lib):
    if hasattr(mod, "fp8_fp4_mqa_logits"):  # sgl-deep-gemm: (..., max_seqlen_k, schedule_meta); no clean_logits
        f = mod.fp8_fp4_mqa_logits
        lib.mqa_logits = lambda q, kv, w, ks, ke: f(q, kv, w, ks, ke, 0)
    elif hasattr(mod, "fp8_mqa_logits"):  # upstream DeepGEMM, sgl-kernel's bundled copy
        f = mod.fp8_mqa_logits
        lib.mqa_logits = lambda q, kv, w, ks, ke: f(q, kv, w, ks, ke, True)


def _bind_flashinfer(mod, lib):
    f = getattr(mod, "fp8_mqa_logits", None)
    if f is not None:
        lib.mqa_logits, lib.mqa_logits_archs = (lambda q, kv, w, ks, ke: f(q, kv, w, ks, ke, True)), (10,)


# In preference order: the first present library providing an op serves it.
CANDIDATES = (
    ("flash_mla", "sgl-flash-mla", "flash_mla", _bind_flash_mla),
    ("sgl_kernel", "sgl-kernel", "sgl_kernel.flash_mla", _bind_sgl_kernel),
    ("deep_gemm", "sgl-deep-gemm", "deep_gemm", _bind_deep_gemm),
    ("flashinfer", "flashinfer-python", "flashinfer.dense_mqa", _bind_flashinfer),
)


@functools.lru_cache(maxsize=1)
def status() -> dict:
    """{name: Lib} for every candidate (present or not, with the reason). Cached: run once."""
    return {name: _probe(name, pkg, module, bind) for name, pkg, module, bind in CANDIDATES}


def present() -> list:
    return [lib for lib in status().values() if lib.present]


def report() -> dict:
    """JSON-able summary (benchmarks, logs): name -> present, version, provides, reason."""
    return {n: dict(present=l.present, package=l.package, version=l.version, provides=l.provides, reason=l.reason)
            for n, l in status().items()}


def preferred(t: torch.Tensor) -> bool:
    """The default backend choice: a CUDA (not ROCm) tensor on sm_90 / sm_100 and a library present."""
    if not t.is_cuda or getattr(torch.version, "hip", None) or not present():
        return False
    return torch.cuda.get_device_capability(t.device)[0] in (9, 10)


# --- sparse_mla ------------------------------------------------------------------------------

def _sparse_mla_lib(q, kv, v_dim):
    """The library serving sparse_mla for these inputs, or None (then Triton does)."""
    if not (q.is_cuda and q.dtype == torch.bfloat16 and kv.dtype == torch.bfloat16 and v_dim == 512):
        return None
    T, H, D = q.shape
    major = torch.cuda.get_device_capability(q.device)[0]
    if H not in (64, 128) or major not in (9, 10):
        return None
    for lib in present():
        if lib.sparse_mla is None:
            continue
        if lib.name == "flash_mla" and D == 576 and not lib.sparse_mla_legacy:
            continue  # this build has only the V4.1 (Dqk = 512, sm_100) kernels
        if D == 576 or (D == 512 and major == 10):
            return lib
    return None


def flashmla_inputs(q, kv, indices, align: int = FLASHMLA_TOPK_ALIGN):
    """FlashMLA's layouts: q [T, H, D] contiguous, kv [S, 1, D], indices [T, 1, Kp] int32 with
    Kp = K rounded up to `align`, the new slots -1 (invalid, skipped)."""
    T, K = indices.shape
    Kp = max(align, -(-K // align) * align)
    idx = indices.to(torch.int32)
    if Kp != K:
        idx = torch.cat([idx, idx.new_full((T, Kp - K), -1)], 1)
    return q.contiguous(), kv.contiguous().unsqueeze(1), idx.contiguous().unsqueeze(1)


def flashmla_outputs(out, lse, indices, lse_base2: bool):
    """FlashMLA's (out, lse) -> this repository's: natural-log lse, and rows with no valid index
    out = 0, lse = -inf (whatever the library wrote there)."""
    lse = lse.float() * LN2 if lse_base2 else lse.float()
    empty = (indices < 0).all(dim=1)
    if bool(empty.any()):
        lse = lse.masked_fill(empty[:, None], float("-inf"))
        out = out.masked_fill(empty[:, None, None], 0)
    return out, lse


def sparse_mla_forward(lib: Lib, q, kv, indices, v_dim, scale):
    """Forward through `lib`'s flash_mla_sparse_fwd with the layout conversions both ways."""
    qc, kv3, idx3 = flashmla_inputs(q, kv, indices)
    legacy = q.shape[2] == 576 or (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9)
    kw = dict(use_legacy=True) if lib.sparse_mla_use_legacy_kw and legacy else {}  # sgl-flash-mla: sm_90 / V3.2
    res = lib.sparse_mla(qc, kv3, idx3, float(scale), v_dim, **kw)
    out, lse = res[0], res[2]
    return flashmla_outputs(out, lse, indices, lib.sparse_mla_lse_base2)


def sparse_mla(q, kv, indices, *, v_dim, scale):
    """kernels.sparse_mla on a library (same signature and contract); callers check supports() first."""
    from dsa_rag.kernels.sparse_mla.torch_impl import differentiable

    lib = _sparse_mla_lib(q, kv, v_dim)
    return differentiable(lambda q_, kv_, i_, v_, s_: sparse_mla_forward(lib, q_, kv_, i_, v_, s_))(
        q, kv, indices, v_dim=v_dim, scale=scale)


# --- indexer ---------------------------------------------------------------------------------

def _mqa_lib(q, k, score):
    if not (q.is_cuda and score == "relu" and is_fp8(q) and is_fp8(k)):
        return None
    T, H, D = q.shape
    major = torch.cuda.get_device_capability(q.device)[0]
    if H not in (32, 64) or D != 128:
        return None
    return next((l for l in present() if l.mqa_logits is not None and major in l.mqa_logits_archs), None)


def causal_ranges(T: int, S: int, start_pos: int, device):
    """DeepGEMM's per-query key ranges for the causal mask: ks = 0, ke = min(start_pos + t + 1, S) (int32)."""
    ke = torch.arange(start_pos + 1, start_pos + T + 1, device=device).clamp_(max=S).to(torch.int32)
    return torch.zeros(T, dtype=torch.int32, device=device), ke


def mask_outside(logits, ks, ke, S: int):
    """-inf outside [ks, ke) (the cells DeepGEMM leaves unspecified), exactly [T, S]."""
    cols = torch.arange(S, device=logits.device)[None, :]
    keep = (cols >= ks[:, None]) & (cols < ke[:, None])
    return torch.where(keep, logits[:, :S].float(), torch.full_like(logits[:, :S], float("-inf"), dtype=torch.float32))


def mqa_logits_forward(lib: Lib, q, k, w, k_scale, start_pos):
    T, S = q.shape[0], k.shape[0]
    ks, ke = causal_ranges(T, S, start_pos, q.device)
    scale = k_scale.float().contiguous() if k_scale is not None else torch.ones(S, device=k.device)
    logits = lib.mqa_logits(q.contiguous(), (k.contiguous(), scale), w.float().contiguous(), ks, ke)
    return mask_outside(logits, ks, ke, S)


def indexer_logits(q, k, w, *, k_scale=None, start_pos=0, score="relu"):
    return mqa_logits_forward(_mqa_lib(q, k, score), q, k, w, k_scale, start_pos)


def topk_from_logits(logits_fn, T: int, S: int, topk: int, device, budget: int = LOGITS_BUDGET):
    """indexer_topk's contract from a logits function over query chunks (`logits_fn(t0, t1)` ->
    [t1 - t0, S] with -inf for non-causal keys): indices sorted by descending score, -1 padding
    at the end (fewer causal keys than topk, or S < topk)."""
    out = torch.full((T, topk), -1, dtype=torch.int32, device=device)
    step = max(1, budget // max(1, 4 * S))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        vals, idx = logits_fn(t0, t1).topk(min(topk, S), dim=1)  # sorted, descending
        out[t0:t1, : idx.shape[1]] = idx.masked_fill(vals == float("-inf"), -1).to(torch.int32)
    return out


def indexer_topk(q, k, w, topk, *, k_scale=None, start_pos=0, score="relu", **_):
    lib = _mqa_lib(q, k, score)
    return topk_from_logits(
        lambda t0, t1: mqa_logits_forward(lib, q[t0:t1], k, w[t0:t1], k_scale, start_pos + t0),
        q.shape[0], k.shape[0], topk, q.device)


# --- what the dispatch asks ------------------------------------------------------------------

def supports(op_package: str, fn_name: str, args, kwargs) -> bool:
    """Whether a present library serves this call (else the dispatch sends it to Triton)."""
    if op_package == "sparse_mla" and fn_name == "sparse_mla":
        q, kv = args[0], args[1]
        return _sparse_mla_lib(q, kv, kwargs.get("v_dim")) is not None
    if op_package == "indexer" and fn_name in ("indexer_logits", "indexer_topk"):
        return _mqa_lib(args[0], args[1], kwargs.get("score", "relu")) is not None
    return False


def function(op_package: str, fn_name: str):
    return {("sparse_mla", "sparse_mla"): sparse_mla, ("indexer", "indexer_logits"): indexer_logits,
            ("indexer", "indexer_topk"): indexer_topk}[(op_package, fn_name)]
