"""Sparse MLA, Triton path: forward kernel (online softmax over gathered rows), torch backward.

Kernel `_fwd_kernel`: one program per (query row t, BLOCK_H heads). q is split into the latent
part [0, v_dim) (which is also the value) and the rope part [v_dim, D), each padded to a power of
two (V3.2: 512 + 64, dsa-tiny: 128 + 16), so no FLOPs are wasted on padding. The program loops
over the row's K indices BLOCK_K at a time: loads the indices, gathers kv rows with masked
tl.loads (idx == -1 -> masked, contributes -inf), s = q_lat.kv_lat^T + q_rope.kv_rope^T (bf16
tl.dot, fp32 accumulate), online softmax in base 2 (running max m, sum l), acc += p @ kv_lat.
Writes out = acc / l (0 when no valid index) and lse = (m + log2 l) * ln 2 (-inf when none).
All programs of a row that cover different head blocks re-gather the same kv rows (H=128 ->
2 programs with BLOCK_H=64); FlashMLA-style head-split sharing through SMEM is not done.
V3.2 on sm_90 (launch_config): BLOCK_H=128, 8 warps (a warpgroup per 64 heads: QK^T one wgmma
sequence, not repeated by a second warpgroup) and DV_SPLIT=2: program_id(2) accumulates one half
of the 512 value dims (acc [128, 256], no spills) and uses the other half only in the logits, so
the two programs of a row each compute the row's full QK^T once (the same total QK work as two
64-head programs; the old 64-head, 8-warp program computed it twice within itself).

Decode (few rows, a grid under ~2 waves of SMs): the same kernel with SPLIT, each program over
one range of a row's K indices, writing fp32 partials that kernels/sparse_mla/decode.py combines
(flash-decoding; `decode.split_plan` sizes it from Target.sm_count). Prefill grids never split.

The query row offset is int64 (t * stride_qt wraps int32 from t >= 2^31 / (H * D): 29,128 rows
at V3.2's 128 x 576). Launch configuration: `configs(H, v_dim, D, dtype, target)`, a table per
architecture (default first; DSA_KERNEL_AUTOTUNE=1 times the rest once per shape key),
`launch_config` = its default, shared with the GPU compile check (kernels/gpu_compile.py, which
compiles every entry); `plan(...)` builds a launch's exact arguments.

Backward: `torch_impl.differentiable` wraps this forward with the chunked analytic torch backward
(torch_impl.SparseMLA), which runs on CUDA tensors too.

Test (CPU, interpreter): .venv/bin/python -m pytest -q tests/kernels/test_sparse_mla.py -k triton
GPU bench: .venv/bin/python benchmarks/kernels_gpu.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_rag.kernels import dispatch
from dsa_rag.kernels.dispatch import Target, target_of
from dsa_rag.kernels.sparse_mla import decode
from dsa_rag.kernels.sparse_mla.torch_impl import differentiable

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _qk(q, kv, IEEE: tl.constexpr):
    """q [BLOCK_H, d] . kv [BLOCK_K, d]^T -> [BLOCK_H, BLOCK_K] fp32 (ieee: the exact-fp32 CPU path)."""
    if IEEE:
        return tl.dot(q, tl.trans(kv), input_precision="ieee")
    else:
        return tl.dot(q, tl.trans(kv))


@triton.jit
def _fwd_kernel(
    q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr,
    H, K, DV, DR, S, sm_scale_log2, K_SPLIT,
    stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_os, stride_oh, stride_lt, stride_ls,
    HAS_ROPE: tl.constexpr, F32_DOT: tl.constexpr, IEEE: tl.constexpr, DV_SPLIT: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
):
    # DV_SPLIT == 2: the program's value half (dv_pid) picks [dv0, dv0 + BLOCK_DV) of the value dims it
    # accumulates; the other half (dv1) only enters the logits (s = q0.kv0 + q1.kv1 + rope).
    # SPLIT (flash-decoding, kernels/sparse_mla/decode.py): program_id(2) = split * DV_SPLIT + dv_pid,
    # the program covers indices [split * K_SPLIT, split * K_SPLIT + K_SPLIT) of its row and writes
    # its normalized partial output and lse to out[t, split] / lse[t, split] (fp32), which
    # decode.combine merges. Without SPLIT: one program per row covers all K (split = 0).
    t = tl.program_id(0).to(tl.int64)  # t * stride_qt passes 2^31 at V3.2 shapes from t = 29,128
    if SPLIT:
        split = tl.program_id(2) // DV_SPLIT
        dv_pid = tl.program_id(2) % DV_SPLIT
        k_lo = split * K_SPLIT
        k_hi = tl.minimum(K, k_lo + K_SPLIT)
    else:
        split = 0
        dv_pid = tl.program_id(2)
        k_lo = 0
        k_hi = K
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dv0 = dv_pid * BLOCK_DV
    dv1 = (1 - dv_pid) * BLOCK_DV
    offs_v = dv0 + tl.arange(0, BLOCK_DV)
    offs_v1 = dv1 + tl.arange(0, BLOCK_DV)
    offs_r = tl.arange(0, BLOCK_DR)
    h_ok = offs_h < H
    v_ok = offs_v < DV
    v1_ok = offs_v1 < DV
    r_ok = offs_r < DR
    q_row = q_ptr + t * stride_qt + offs_h[:, None] * stride_qh
    q_lat = tl.load(q_row + offs_v[None, :], mask=h_ok[:, None] & v_ok[None, :], other=0.0)
    if F32_DOT:
        q_lat = q_lat.to(tl.float32)
    if DV_SPLIT == 2:
        q_lat1 = tl.load(q_row + offs_v1[None, :], mask=h_ok[:, None] & v1_ok[None, :], other=0.0)
        if F32_DOT:
            q_lat1 = q_lat1.to(tl.float32)
    if HAS_ROPE:
        q_rope = tl.load(q_row + DV + offs_r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)
        if F32_DOT:
            q_rope = q_rope.to(tl.float32)
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + t * stride_it + offs_k, mask=offs_k < k_hi, other=-1).to(tl.int64)
        ok = (idx >= 0) & (idx < S)
        rows = kv_ptr + idx[:, None] * stride_kv
        kv_lat = tl.load(rows + offs_v[None, :], mask=ok[:, None] & v_ok[None, :], other=0.0)
        if F32_DOT:
            kv_lat = kv_lat.to(tl.float32)
        s = _qk(q_lat, kv_lat, IEEE)  # [BLOCK_H, BLOCK_K] fp32
        if DV_SPLIT == 2:
            kv_lat1 = tl.load(rows + offs_v1[None, :], mask=ok[:, None] & v1_ok[None, :], other=0.0)
            if F32_DOT:
                kv_lat1 = kv_lat1.to(tl.float32)
            s += _qk(q_lat1, kv_lat1, IEEE)
        if HAS_ROPE:
            kv_rope = tl.load(rows + DV + offs_r[None, :], mask=ok[:, None] & r_ok[None, :], other=0.0)
            if F32_DOT:
                kv_rope = kv_rope.to(tl.float32)
            s += _qk(q_rope, kv_rope, IEEE)
        s = tl.where(ok[None, :], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep p = 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, kv_lat, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(kv_lat.dtype), kv_lat)
        m = m_new
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(out_ptr + t * stride_ot + split * stride_os + offs_h[:, None] * stride_oh + offs_v[None, :],
             out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & v_ok[None, :])
    tl.store(lse_ptr + t * stride_lt + split * stride_ls + offs_h, lse,
             mask=offs_h < H * (1 - dv_pid))  # the dv_pid = 0 program writes lse


def configs(H: int, v_dim: int, D: int, dtype: torch.dtype, target: Target) -> list[dict]:
    """The per-architecture config table of `_fwd_kernel` for q [*, H, D] of `dtype` with values
    kv[:, :v_dim]: block sizes, constexprs and launch options, the default first, then the
    alternatives the autotuner (dispatch.autotune, DSA_KERNEL_AUTOTUNE=1) may time. Every entry is
    compiled by the GPU compile check (kernels/gpu_compile.py) within its smem / spill bounds."""
    DR = D - v_dim
    BLOCK_DV = max(16, triton.next_power_of_2(v_dim))
    BLOCK_DR = max(16, triton.next_power_of_2(max(DR, 1)))
    base = dict(HAS_ROPE=DR > 0, F32_DOT=target.kind == "interp",
                IEEE=dtype == torch.float32 and target.kind != "interp", DV_SPLIT=1, BLOCK_DV=BLOCK_DV,
                BLOCK_DR=BLOCK_DR)

    def cfg(BLOCK_H, BLOCK_K, num_warps, num_stages, DV_SPLIT=1):
        return dict(base, DV_SPLIT=DV_SPLIT, BLOCK_DV=BLOCK_DV // DV_SPLIT, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K,
                    num_warps=num_warps, num_stages=num_stages)

    if target.kind == "interp":
        return [cfg(16, 16, 4, 1)]
    # Heads in M: all of a row's heads in one program where the fp32 accumulator fits (dsa-tiny:
    # 8 heads padded to 16, the mma.sync minimum M), else 64-head blocks (one wgmma M tile).
    BLOCK_H = min(64, max(16, triton.next_power_of_2(H)))
    v32 = BLOCK_DV >= 512 and H >= 128 and target.kind == "cuda" and dtype.itemsize == 2
    if v32 and target.capability[0] == 9:
        # V3.2 (H=128, DV=512) on sm_90 (wgmma): the [64, 512] fp32 accumulator of BLOCK_H=64 needs two
        # warpgroups, and Triton puts both on the same 64 rows of the chained QK^T dot (the QK
        # ran twice, as N=16 wgmmas; 255 regs, spills). Instead: all 128 heads in one program
        # (each warpgroup owns 64 heads: one QK^T wgmma sequence, N = BLOCK_K) and the value dims
        # split in two programs (acc [128, 256]: 128 regs/thread, no spills). Alternative: 64 heads
        # on one warpgroup with the same value split (acc [64, 256]; twice the CTAs, smaller smem).
        return [cfg(128, 32, 8, 2, DV_SPLIT=2), cfg(64, 32, 4, 2, DV_SPLIT=2)]
    if v32 and target.capability[0] == 10:
        # sm_100 (tcgen05, accumulators in tensor memory): 64-head blocks, full value width; the
        # sm_90 layout (128 heads, value split) as the alternative (compiles with a small spill).
        return [cfg(64, 32, 8, 2), cfg(128, 32, 8, 2, DV_SPLIT=2)]
    if BLOCK_DV >= 512:  # sm_80 (mma.sync) and other wide-value shapes: 64 heads, 8 warps
        return [cfg(BLOCK_H, 32, 8, 2), cfg(BLOCK_H, 32, 8, 1)]
    if BLOCK_DV >= 256:
        return [cfg(BLOCK_H, 64, 8, 2)]
    # dsa-tiny (DV=128) and smaller: 4 warps; a deeper pipeline over narrower index blocks as the alternative
    return [cfg(BLOCK_H, 64, 4, 2), cfg(BLOCK_H, 32, 4, 3)]


def launch_config(H: int, v_dim: int, D: int, dtype: torch.dtype, target: Target) -> dict:
    """The default (first) entry of `configs`: what a launch uses unless autotuning picked another."""
    return configs(H, v_dim, D, dtype, target)[0]


def plan(q, kv, indices, out, lse, v_dim, scale, target: Target | None = None, cfg: dict | None = None,
         num_splits: int | None = None):
    """(grid, args, kwargs) of the forward launch for contiguous q, kv (q's dtype), indices.

    `cfg`: a config of `configs()` (default: launch_config). Rows x head blocks x value halves
    fewer than ~2 waves of the GPU's SMs (decode) split the K indices of each row over programs
    (decode.split_plan; `num_splits` forces a count): then `out` / `lse` must be the fp32 partial
    buffers of decode.partials() and decode.combine() finishes the op."""
    T, H, D = q.shape
    K = indices.shape[1]
    target = target or target_of(q.device)
    cfg = dict(cfg or launch_config(H, v_dim, D, q.dtype, target))
    programs = T * triton.cdiv(H, cfg["BLOCK_H"]) * cfg["DV_SPLIT"]
    splits, k_split = decode.split_plan(programs, K, cfg["BLOCK_K"], target, num_splits)
    grid = (T, triton.cdiv(H, cfg["BLOCK_H"]), cfg["DV_SPLIT"] * splits)
    stride_os, stride_ls = (out.stride(1), lse.stride(1)) if splits > 1 else (0, 0)
    stride_oh = out.stride(2) if splits > 1 else out.stride(1)
    args = (q, kv, indices, out, lse,
            H, K, v_dim, D - v_dim, kv.shape[0], scale * LOG2E, k_split,
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), stride_os, stride_oh,
            lse.stride(0), stride_ls)
    return grid, args, dict(cfg, SPLIT=splits > 1)


def _launch(q, kv, indices, v_dim, scale, cfg, num_splits=None):
    """out [T, H, v_dim] q.dtype, lse [T, H] fp32 with config `cfg` (split-K when decode.split_plan says so)."""
    T, H, _ = q.shape
    target = target_of(q.device)
    out = torch.empty(T, H, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    programs = T * triton.cdiv(H, cfg["BLOCK_H"]) * cfg["DV_SPLIT"]
    splits, _ = decode.split_plan(programs, indices.shape[1], cfg["BLOCK_K"], target, num_splits)
    if splits == 1:
        grid, args, kwargs = plan(q, kv, indices, out, lse, v_dim, scale, target, cfg, 1)
        _fwd_kernel[grid](*args, **kwargs)
        return out, lse
    o_part, lse_part = decode.partials(T, splits, H, v_dim, q.device)
    grid, args, kwargs = plan(q, kv, indices, o_part, lse_part, v_dim, scale, target, cfg, splits)
    _fwd_kernel[grid](*args, **kwargs)
    decode.combine(o_part, lse_part, out, lse)
    return out, lse


def _forward(q, kv, indices, v_dim, scale, num_splits=None):
    T, H, D = q.shape
    if kv.dtype != q.dtype:
        kv = kv.to(q.dtype)
    q, kv, indices = q.contiguous(), kv.contiguous(), indices.contiguous()
    if T == 0 or H == 0:
        return (torch.empty(T, H, v_dim, dtype=q.dtype, device=q.device),
                torch.empty(T, H, dtype=torch.float32, device=q.device))
    target = target_of(q.device)
    cands = configs(H, v_dim, D, q.dtype, target)
    cfg = launch_config(H, v_dim, D, q.dtype, target)
    if len(cands) > 1 and dispatch.autotune_enabled(q):
        # keyed by the split count too: decode (few rows, split-K) and prefill can prefer different blocks
        key = ("sparse_mla", H, v_dim, D, q.dtype, indices.shape[1], decode.row_bucket(T), target)
        cfg = dispatch.autotune(key, cands, lambda c: _launch(q, kv, indices, v_dim, scale, c, num_splits))
    return _launch(q, kv, indices, v_dim, scale, cfg, num_splits)


sparse_mla = differentiable(_forward)  # Triton forward, the torch path's chunked backward
