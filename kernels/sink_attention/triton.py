"""Sparse sink attention, Triton path: ONE kernel over both sources and the sink (DeepSeek-V4).

Kernel `_sink_kernel`: one program per (query row t, BLOCK_H heads[, value half]). It streams the
row's selected rows of source 1 (kv, indices: V4's sliding-window rows), then of source 2
(extra_kv, extra_indices: the compressed entries), BLOCK_K indices at a time, with one online
softmax (base 2) across both: gather the rows with masked tl.loads (int64 row offsets; -1 or
out-of-range indices are masked and give -inf), s = q . row^T, acc += p @ row (K = V: the
gathered tile is both the key and the value, loaded once). The sink is folded in at the end as
one more logit per head without a value:

    m' = max(m, sink),  out = acc e^(m - m') / (l e^(m - m') + e^(sink - m'))

so a row that selects nothing (m = -inf, acc = 0) gives exactly 0 and never divides by zero.
Optionally writes lse [T, H] fp32 = logsumexp over the selected logits and the sink.

Dots: bf16 / fp16 tiles go to tl.dot in their dtype (fp32 accumulate; p is cast to the value
dtype for p @ row); fp32 inputs on a GPU use an IEEE fp32 dot; under TRITON_INTERPRET=1 every
tile is upcast to fp32 (F32_DOT; the interpreter's low-precision dots are slow and not what a
GPU rounds like anyway), as in kernels/sparse_mla/triton.py.

Launch configuration (`configs` / `launch_config` / `plan`, shared with the GPU compile check
tests/kernels/test_sink_attention_compile.py): V4-Flash is H = 64, D = 512 (no separate rope
part: q . row over all 512 dims). A [64, 512] fp32 accumulator is 128 regs/thread on 8 warps,
more on 4; the table keeps it within registers per target:
* sm_90 (wgmma, a warpgroup owns 64 rows of M): 64 heads on ONE warpgroup with the value dims
  split over two programs (DV_SPLIT=2: acc [64, 256]); each program still computes the full
  QK^T (the other half of q . row only enters the logits), the trade sparse_mla makes on sm_90.
* sm_80 / sm_100 and other wide heads: 64 heads, 8 warps, the full value width.
* D <= 256: all heads (<= 64) in one program, 4 or 8 warps.
No split-K for decode: a T = 1 call is grid (1, H / BLOCK_H, DV_SPLIT) programs (a leftover, noted
in kernels/sink_attention/__init__.py). Forward only: a call that needs gradients runs the torch
path (torch_impl.py, autograd) instead.

Test (CPU, interpreter): .venv/bin/python -m pytest -q tests/kernels/test_sink_attention.py -k triton
Compile (CPU, sm_90/sm_80): .venv/bin/python -m pytest -q -s tests/kernels/test_sink_attention_compile.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_rag.kernels import dispatch
from dsa_rag.kernels.dispatch import Target, target_of
from dsa_rag.kernels.sparse_mla.triton import _qk  # q . kv^T, one jit helper for both attention kernels

LOG2E = 1.4426950408889634


@triton.jit
def _stream(q0, q1, m, l, acc, kv_ptr, idx_row, K, S, stride_kv, offs_v, offs_v1, v_ok, v1_ok, sm_scale_log2,
            F32_DOT: tl.constexpr, IEEE: tl.constexpr, DV_SPLIT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Fold the K selected rows of one source (idx_row -> rows of kv_ptr) into the online-softmax
    state (m, l, acc). q0 / offs_v: this program's value dims; q1 / offs_v1: the other half
    (DV_SPLIT == 2 only; it enters the logits, not acc)."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_row + offs_k, mask=offs_k < K, other=-1).to(tl.int64)  # int64: idx * stride > 2^31
        ok = (idx >= 0) & (idx < S)
        rows = kv_ptr + idx[:, None] * stride_kv
        kv0 = tl.load(rows + offs_v[None, :], mask=ok[:, None] & v_ok[None, :], other=0.0)
        if F32_DOT:
            kv0 = kv0.to(tl.float32)
        s = _qk(q0, kv0, IEEE)  # [BLOCK_H, BLOCK_K] fp32
        if DV_SPLIT == 2:
            kv1 = tl.load(rows + offs_v1[None, :], mask=ok[:, None] & v1_ok[None, :], other=0.0)
            if F32_DOT:
                kv1 = kv1.to(tl.float32)
            s += _qk(q1, kv1, IEEE)
        s = tl.where(ok[None, :], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep p = 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, kv0, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(kv0.dtype), kv0)
        m = m_new
    return m, l, acc


@triton.jit
def _sink_kernel(
    q_ptr, kv_ptr, idx_ptr, kv2_ptr, idx2_ptr, sink_ptr, out_ptr, lse_ptr,
    H, D, K, S, K2, S2, sm_scale_log2,
    stride_qt, stride_qh, stride_kv, stride_it, stride_kv2, stride_it2, stride_ot, stride_oh, stride_lt,
    HAS_EXTRA: tl.constexpr, HAS_LSE: tl.constexpr, F32_DOT: tl.constexpr, IEEE: tl.constexpr,
    DV_SPLIT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)  # t * stride_qt passes 2^31 at T * H * D >= 2^31 (V4-Flash: T >= 65,536)
    dv_pid = tl.program_id(2)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_v = dv_pid * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_v1 = (1 - dv_pid) * BLOCK_DV + tl.arange(0, BLOCK_DV)  # DV_SPLIT == 2: the other half
    h_ok = offs_h < H
    v_ok = offs_v < D
    v1_ok = offs_v1 < D
    q_row = q_ptr + t * stride_qt + offs_h[:, None] * stride_qh
    q0 = tl.load(q_row + offs_v[None, :], mask=h_ok[:, None] & v_ok[None, :], other=0.0)
    if F32_DOT:
        q0 = q0.to(tl.float32)
    q1 = q0
    if DV_SPLIT == 2:
        q1 = tl.load(q_row + offs_v1[None, :], mask=h_ok[:, None] & v1_ok[None, :], other=0.0)
        if F32_DOT:
            q1 = q1.to(tl.float32)
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
    m, l, acc = _stream(q0, q1, m, l, acc, kv_ptr, idx_ptr + t * stride_it, K, S, stride_kv,
                        offs_v, offs_v1, v_ok, v1_ok, sm_scale_log2, F32_DOT, IEEE, DV_SPLIT, BLOCK_K)
    if HAS_EXTRA:
        m, l, acc = _stream(q0, q1, m, l, acc, kv2_ptr, idx2_ptr + t * stride_it2, K2, S2, stride_kv2,
                            offs_v, offs_v1, v_ok, v1_ok, sm_scale_log2, F32_DOT, IEEE, DV_SPLIT, BLOCK_K)
    # The sink: one more logit per head with no value, only in the normalizer.
    sink = tl.load(sink_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    m_fin = tl.maximum(m, sink)
    m_fin = tl.where(m_fin == float("-inf"), 0.0, m_fin)  # a -inf sink and nothing selected
    alpha = tl.exp2(m - m_fin)  # 0 when nothing was selected (m = -inf)
    l_fin = l * alpha + tl.exp2(sink - m_fin)
    has = l_fin > 0
    l_safe = tl.where(has, l_fin, 1.0)
    out = acc * (alpha / l_safe)[:, None]
    tl.store(out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_v[None, :],
             out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & v_ok[None, :])
    if HAS_LSE:
        lse = tl.where(has, (m_fin + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + t * stride_lt + offs_h, lse, mask=offs_h < H * (1 - dv_pid))  # value half 0 writes it


def configs(H: int, D: int, dtype: torch.dtype, target: Target) -> list[dict]:
    """The per-architecture config table of `_sink_kernel` for q [*, H, D] of `dtype`: the default
    first, then what DSA_KERNEL_AUTOTUNE=1 may time instead. The compile test checks every entry."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    base = dict(F32_DOT=target.kind == "interp", IEEE=dtype == torch.float32 and target.kind != "interp")

    def cfg(BLOCK_H, BLOCK_K, num_warps, num_stages, DV_SPLIT=1):
        return dict(base, DV_SPLIT=DV_SPLIT, BLOCK_DV=BLOCK_D // DV_SPLIT, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K,
                    num_warps=num_warps, num_stages=num_stages)

    if target.kind == "interp":
        return [cfg(16, 16, 4, 1)]
    # Heads in M: 16 is the mma minimum M; 64 = one wgmma M tile (and V4-Flash's head count).
    BLOCK_H = min(64, max(16, triton.next_power_of_2(H)))
    lowp = dtype.itemsize == 2
    if BLOCK_D >= 512 and lowp and target.kind == "cuda" and target.capability[0] == 9:
        # One warpgroup per 64 heads, value dims split over two programs (acc [64, 256]: 128
        # regs/thread); 8 warps on the full width as the alternative.
        return [cfg(BLOCK_H, 32, 4, 2, DV_SPLIT=2), cfg(BLOCK_H, 32, 8, 2)]
    if BLOCK_D >= 512:  # sm_80 (mma.sync), sm_100 and fp32: 8 warps over the full width
        return [cfg(BLOCK_H, 32, 8, 2), cfg(BLOCK_H, 32, 8, 1)]
    if BLOCK_D >= 256:
        return [cfg(BLOCK_H, 64, 8, 2)]
    return [cfg(BLOCK_H, 64, 4, 2), cfg(BLOCK_H, 32, 4, 3)]


def launch_config(H: int, D: int, dtype: torch.dtype, target: Target) -> dict:
    """The default (first) entry of `configs`."""
    return configs(H, D, dtype, target)[0]


def plan(q, kv, indices, sink, out, lse=None, scale=1.0, extra_kv=None, extra_indices=None,
         target: Target | None = None, cfg: dict | None = None):
    """(grid, args, kwargs) of the launch for q [T, H, D] (last dim contiguous), kv / extra_kv
    rows with a contiguous last dim in q's dtype, indices, sink [H] fp32, out [T, H, D] and
    optionally lse [T, H] fp32. Works on meta tensors (the compile check)."""
    T, H, D = q.shape
    target = target or target_of(q.device)
    cfg = dict(cfg or launch_config(H, D, q.dtype, target))
    has_extra = extra_kv is not None
    kv2, idx2 = (extra_kv, extra_indices) if has_extra else (kv, indices)  # placeholders, never read
    grid = (T, triton.cdiv(H, cfg["BLOCK_H"]), cfg["DV_SPLIT"])
    args = (q, kv, indices, kv2, idx2, sink, out, lse if lse is not None else out,
            H, D, indices.shape[1], kv.shape[0], idx2.shape[1] if has_extra else 0, kv2.shape[0], scale * LOG2E,
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), kv2.stride(0), idx2.stride(0),
            out.stride(0), out.stride(1), lse.stride(0) if lse is not None else 0)
    return grid, args, dict(cfg, HAS_EXTRA=has_extra, HAS_LSE=lse is not None)


def _rows(x, dtype):
    """A K = V source as the kernel reads it: q's dtype, unit stride along D. A pool already in
    that form (the usual case: the cache stores the activation dtype) is read in place."""
    if x.dtype != dtype:
        x = x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def forward(q, kv, indices, sink, scale, extra_kv=None, extra_indices=None, *, want_lse=False, cfg=None):
    """(out [T, H, D] q.dtype, lse [T, H] fp32 or None) in one launch; `cfg` overrides the config."""
    T, H, D = q.shape
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device) if want_lse else None
    if T == 0 or H == 0:
        return out, lse
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv, indices, sink = _rows(kv, q.dtype), indices.contiguous(), sink.float().contiguous()
    if extra_kv is not None:
        extra_kv, extra_indices = _rows(extra_kv, q.dtype), extra_indices.contiguous()
    target = target_of(q.device)

    def launch(c):
        grid, args, kwargs = plan(q, kv, indices, sink, out, lse, scale, extra_kv, extra_indices, target, c)
        _sink_kernel[grid](*args, **kwargs)

    cands = configs(H, D, q.dtype, target)
    if cfg is None and len(cands) > 1 and dispatch.autotune_enabled(q):
        n_rows = indices.shape[1] + (0 if extra_indices is None else extra_indices.shape[1])
        key = ("sink_attention", H, D, q.dtype, n_rows, T == 1, target)
        cfg = dispatch.autotune(key, cands, launch)
    launch(cfg or cands[0])
    return out, lse


def sparse_sink_attention(q, kv, indices, sink, *, scale, extra_kv=None, extra_indices=None):
    """The public op's Triton backend (same signature as naive.py): out [T, H, D] in q.dtype."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, kv, sink, extra_kv)):
        # the kernel has no backward: silently detaching would train nothing, so take the torch path
        from dsa_rag.kernels.sink_attention import torch_impl
        return torch_impl.sparse_sink_attention(q, kv, indices, sink, scale=scale, extra_kv=extra_kv,
                                                extra_indices=extra_indices)
    return forward(q, kv, indices, sink, scale, extra_kv, extra_indices)[0]
