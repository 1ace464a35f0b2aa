"""The decode indexer's skinny GEMM on x86 CPUs: out[s, r] = k[s] . q[r] for every cached key s and
the few query-head rows r of a decode step (dsa-tiny: 8 heads x 64 dims per decoding row).

Why not torch.mm: with 8-64 query rows the product is a stream over the key cache with a tiny
right-hand side, and MKL's sgemm runs it at ~20 GFLOP/s on this machine (a quarter of its square
GEMM rate; it repacks the large operand on every call). This AVX2/FMA loop keeps 8 query rows
(one 8-lane vector per key dimension) in registers, broadcasts each key element once and keeps 8
keys in flight: 128k keys x 8 heads x 64 dims in ~4.4 ms against MKL's ~7.9 ms, same fp32 products
(summed in the same order per key up to FMA rounding).

Compiled on first use with torch.utils.cpp_extension.load_inline (gcc or clang, and ninja; ~30 s
once, then cached under ~/.cache/torch_extensions). Where that is not possible (no compiler, a CPU
without AVX2/FMA, DSA_KERNEL_CPU_EXT=0) `dots_into` returns None and the caller runs torch.mm;
the reason is warned about once.

    .venv/bin/python -m pytest -q tests/kernels/test_indexer_decode.py -k cpu_dots
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

ENV_VAR = "DSA_KERNEL_CPU_EXT"
MIN_KEYS = 4096  # below this the extension's call overhead is not worth it

_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>

// out[s, r] = sum_d k[s, d] * q[r, d], r in groups of 8 (one AVX2 vector); q arrives transposed
// per group: qT[g][d][8]. 8 keys at a time, 8 accumulators, each key element broadcast once.
// mx[r] <- max(mx[r], max_s out[s, r]): each column's max on the way (the mixtures' reference).
void dots8(torch::Tensor k, torch::Tensor qT, torch::Tensor out, torch::Tensor mx) {
  const int64_t S = k.size(0), D = k.size(1), G = qT.size(0), R = out.size(1);
  const float* kp = k.data_ptr<float>();
  const float* qp = qT.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* mp = mx.data_ptr<float>();
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    const float* r = kp + s * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* q = qp + g * D * 8;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      for (int64_t d = 0; d < D; ++d) {
        __m256 qd = _mm256_loadu_ps(q + d * 8);
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(r + d), qd, a0);
        a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(r + D + d), qd, a1);
        a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(r + 2 * D + d), qd, a2);
        a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(r + 3 * D + d), qd, a3);
        a4 = _mm256_fmadd_ps(_mm256_broadcast_ss(r + 4 * D + d), qd, a4);
        a5 = _mm256_fmadd_ps(_mm256_broadcast_ss(r + 5 * D + d), qd, a5);
        a6 = _mm256_fmadd_ps(_mm256_broadcast_ss(r + 6 * D + d), qd, a6);
        a7 = _mm256_fmadd_ps(_mm256_broadcast_ss(r + 7 * D + d), qd, a7);
      }
      float* o = op + s * R + g * 8;
      _mm256_storeu_ps(o, a0); _mm256_storeu_ps(o + R, a1); _mm256_storeu_ps(o + 2 * R, a2);
      _mm256_storeu_ps(o + 3 * R, a3); _mm256_storeu_ps(o + 4 * R, a4); _mm256_storeu_ps(o + 5 * R, a5);
      _mm256_storeu_ps(o + 6 * R, a6); _mm256_storeu_ps(o + 7 * R, a7);
      __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3)),
                               _mm256_max_ps(_mm256_max_ps(a4, a5), _mm256_max_ps(a6, a7)));
      _mm256_storeu_ps(mp + g * 8, _mm256_max_ps(m, _mm256_loadu_ps(mp + g * 8)));
    }
  }
  for (; s < S; ++s) {
    for (int64_t g = 0; g < G; ++g) {
      const float* q = qp + g * D * 8;
      __m256 a = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; ++d)
        a = _mm256_fmadd_ps(_mm256_broadcast_ss(kp + s * D + d), _mm256_loadu_ps(q + d * 8), a);
      _mm256_storeu_ps(op + s * R + g * 8, a);
      _mm256_storeu_ps(mp + g * 8, _mm256_max_ps(a, _mm256_loadu_ps(mp + g * 8)));
    }
  }
}
"""


def _warn_once(reason: str) -> None:
    warnings.warn(f"kernels.indexer.cpu_dots: {reason}; the decode indexer uses torch.mm", RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=1)
def _module():
    """The compiled extension, or None (with one warning saying why)."""
    if os.environ.get(ENV_VAR, "").strip() == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        _warn_once(f"this CPU has no AVX2/FMA ({torch.backends.cpu.get_cpu_capability()})")
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline("dsa_rag_indexer_dots8_max", cpp_sources=_SOURCE, functions=["dots8"],
                           extra_cflags=["-O3", "-mavx2", "-mfma"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a build error: fall back
        _warn_once(f"could not build the AVX2 extension ({type(exc).__name__}: {str(exc).strip()[:200]})")
        return None


def warm_in_background() -> None:
    """Build (or load) the extension on a daemon thread, so the first long decode of a fresh
    process does not wait for the compiler (engines on CPU call this at construction)."""
    import threading

    if _module.cache_info().currsize == 0:
        threading.Thread(target=_module, name="dsa-cpu-dots-build", daemon=True).start()


def dots_into(out: torch.Tensor, k: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
    """out [P, R] fp32 <- k [P, D] . q [R, D]^T with the extension, returning each column's max
    [R] (computed on the way); None (out untouched) when it does not apply: not fp32 CPU tensors,
    R not a multiple of 8, fewer than MIN_KEYS keys, or no extension."""
    P, R = out.shape
    if (k.device.type != "cpu" or k.dtype != torch.float32 or q.dtype != torch.float32 or R % 8 or P < MIN_KEYS
            or not out.is_contiguous()):
        return None
    mod = _module()
    if mod is None:
        return None
    qT = q.reshape(R // 8, 8, -1).transpose(1, 2).contiguous()  # [G, D, 8]
    mx = torch.full((R,), float("-inf"))
    mod.dots8(k.contiguous(), qT, out, mx)
    return mx
