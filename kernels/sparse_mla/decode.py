"""Sparse MLA decode: split-K (flash-decoding) for launches with few rows.

A decode step gives the op one query row per sequence (q [B, H, D], indices [B, K] physical rows
of one shared cache pool: rows of different sequences go in one call). `_fwd_kernel`
(kernels/sparse_mla/triton.py) already puts a row's heads in the M dimension of its dots (all of
them where the fp32 accumulator fits: dsa-tiny's 8 heads padded to 16, V3.2's 128 on sm_90 with
the value dims split in two programs) and every row of the call in one launch. What decode lacks
is parallelism: B rows x head blocks x value halves is 2 programs for V3.2 at B = 1, on a
132-SM H100. So when the grid is under ~2 waves (`split_plan`), each row's K indices are cut
into `splits` ranges of whole BLOCK_K blocks, one program per (row, head block, range, value
half); each writes its normalized partial output and lse (fp32) into `partials()`, and
`_combine_kernel` merges them:

    lse = log sum_s exp(lse_s),     out = sum_s exp(lse_s - lse) * out_s      (all -inf: 0, -inf)

Splits are a power of two (a handful of compiled combine variants) and at least MIN_SPLIT_KEYS
indices each (a split that runs one or two blocks is all prologue/epilogue). Prefill-sized calls
(>= 2 waves) never split: the launch is exactly the one without this file.

Test (CPU, interpreter): .venv/bin/python -m pytest -q tests/kernels/test_sparse_mla_decode.py
Compiled figures: benchmarks/results/kernels_compile.md (sparse_mla/*/decode-B1, decode-B64 cases)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_rag.kernels.dispatch import Target

WAVES = 2  # split while rows x head blocks x value halves < WAVES x SMs
MIN_SPLIT_KEYS = 128  # indices per split at least (4 blocks of 32 at V3.2)
MAX_SPLITS = 32
INTERP_SMS = 2  # the interpreter's stand-in SM count: small shapes still take the split path in tests


@triton.jit
def _combine_kernel(
    o_ptr, lse_ptr, out_ptr, lse_out_ptr,
    H, DV, NUM_SPLITS,
    stride_pt, stride_ps, stride_ph, stride_lt, stride_ls, stride_ot, stride_oh, stride_lot,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # one program per (row, head): weights of the splits from their lse, then the value dims in chunks
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(lse_ptr + t * stride_lt + offs_s * stride_ls + h, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, out 0
    w = tl.exp(lse - m_safe)
    total = tl.sum(w, axis=0)
    has = total > 0
    w = w / tl.where(has, total, 1.0)
    for d0 in range(0, DV, BLOCK_DV):
        offs_d = d0 + tl.arange(0, BLOCK_DV)
        d_ok = offs_d < DV
        o = tl.load(o_ptr + t * stride_pt + offs_s[:, None] * stride_ps + h * stride_ph + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.sum(o * w[:, None], axis=0)
        tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_out_ptr + t * stride_lot + h, tl.where(has, m_safe + tl.log(tl.where(has, total, 1.0)),
                                                      float("-inf")))


def sm_count(target: Target) -> int:
    """SMs of the target (Target.sm_count; the interpreter: INTERP_SMS; an unknown CUDA device: 132)."""
    if target.kind == "interp":
        return INTERP_SMS
    return target.sm_count or 132


def split_plan(programs: int, K: int, block_k: int, target: Target, num_splits: int | None = None):
    """(splits, k_split): how many index ranges of k_split (a multiple of block_k) each row is cut
    into, for a grid of `programs` programs without the split over K indices. `num_splits` forces a
    count (tests, benchmarks); otherwise split while programs < WAVES x SMs, into a power of two of at
    least MIN_SPLIT_KEYS indices each (2 blocks under the interpreter)."""
    if num_splits is None:
        sms = sm_count(target)
        if programs >= WAVES * sms:
            return 1, K
        want = triton.cdiv(WAVES * sms, max(programs, 1))
        min_keys = 2 * block_k if target.kind == "interp" else max(MIN_SPLIT_KEYS, block_k)
        n = min(want, K // min_keys, MAX_SPLITS)
        num_splits = 1 << (n.bit_length() - 1) if n >= 1 else 1
    num_splits = max(1, min(num_splits, triton.cdiv(K, block_k)))
    if num_splits == 1:
        return 1, K
    k_split = triton.cdiv(triton.cdiv(K, num_splits), block_k) * block_k
    return triton.cdiv(K, k_split), k_split  # every split non-empty


def partials(T: int, splits: int, H: int, v_dim: int, device):
    """fp32 partial outputs [T, splits, H, v_dim] and lse [T, splits, H] that the split launch writes."""
    return (torch.empty(T, splits, H, v_dim, dtype=torch.float32, device=device),
            torch.empty(T, splits, H, dtype=torch.float32, device=device))


def combine_plan(o_part, lse_part, out, lse):
    """(grid, args, kwargs) of the combine launch: partials [T, splits, H, v] -> out [T, H, v], lse [T, H]."""
    T, splits, H, v = o_part.shape
    args = (o_part, lse_part, out, lse, H, v, splits,
            o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
            out.stride(0), out.stride(1), lse.stride(0))
    return (T, H), args, dict(BLOCK_S=max(2, triton.next_power_of_2(splits)),
                              BLOCK_DV=min(128, max(16, triton.next_power_of_2(v))), num_warps=4)


def combine(o_part, lse_part, out, lse):
    """Merge the split partials into out (q's dtype) and lse, in one launch."""
    grid, args, kwargs = combine_plan(o_part, lse_part, out, lse)
    _combine_kernel[grid](*args, **kwargs)


def row_bucket(T: int) -> int:
    """Power-of-two bucket of the row count (the autotuner's key: decode batches vs prefill chunks)."""
    return 1 << max(0, min(T, 1 << 16) - 1).bit_length()
