"""Lightning indexer, Triton path (CUDA; CPU only under TRITON_INTERPRET=1 with small shapes).

Kernel `_logits_kernel`: one program per (BLOCK_T queries, BLOCK_S keys) tile, computed as its
transpose [BLOCK_S, BLOCK_T]. It loads the key tile once (the A operand of every head's dot, so
on sm_90 it is stored to shared memory once per program, not once per head), then loops over the
H heads (q tile of head h, tl.dot(k, q_h^T) -> [BLOCK_S, BLOCK_T] fp32, ReLU, times w[:, h]: w is
passed transposed, [H, T] (_prep), so a head's BLOCK_T weights are one coalesced load; or, for score="mixture", an online logsumexp of w[:, h] + dot * k_scale over the
heads), multiplies by k_scale, writes -inf above the causal diagonal, and skips the dot
products of tiles that lie entirely in the future. FP8 inputs go straight into tl.dot on
sm_89+ GPUs (FP8 tensor cores, fp32 accumulate, BLOCK_D >= 32: an 8-bit dot needs K >= 32);
elsewhere (A100, ROCm) FP8 q and k are converted to bf16 on the host (exact) because FP8 dot
operands do not compile there. Query and key row offsets are int64 (t * stride wraps int32 from
2^31 elements: T >= 2^31 / (H * D)).

Launch configuration: `configs(D, dtype, target)`, a per-architecture table (block sizes, warps,
stages; the default first, alternatives timed once per shape key under DSA_KERNEL_AUTOTUNE=1),
`launch_config` = its default; the GPU compile check (kernels/gpu_compile.py,
tests/kernels/test_compile_gpu.py) compiles every entry. `plan(...)` builds the exact kernel
arguments of a launch without launching it.

`indexer_topk` with one query (a decode step) runs the decode kernel of triton_decode.py. Otherwise it streams over S: for each chunk of queries it launches the kernel on one key block
at a time into a [T_chunk, S_BLOCK] buffer and merges it into a running top-k with torch.topk
(the same merge as torch_impl), so [T, S] never exists. An in-kernel radix select (TileLang's
topk_selector) would save the buffer round trip; not done yet.

Test (CPU, interpreter): .venv/bin/python -m pytest -q tests/kernels/test_indexer.py -k triton
GPU bench: .venv/bin/python benchmarks/kernels_gpu.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_rag.kernels import dispatch
from dsa_rag.kernels.dispatch import Target, target_of
from dsa_rag.kernels.indexer.torch_impl import _blocks, _merge
# The softmax_mixture normalizers: a GEMM and a logsumexp per key block in torch (cuBLAS on a GPU);
# no fused Triton kernel for it yet.
from dsa_rag.kernels.indexer.torch_impl import indexer_head_lse
# the decode op (indexer_topk with one query runs it) and the q/k preparation both kernels share
from dsa_rag.kernels.indexer.triton_decode import indexer_decode_topk, prep_qk

# indexer_topk streaming: keys per merge step and queries per chunk (buffer = T_CHUNK x S_BLOCK fp32)
S_BLOCK_CUDA, T_CHUNK_CUDA = 16384, 2048
S_BLOCK_INTERP, T_CHUNK_INTERP = 64, 32


@triton.jit
def _logits_kernel(
    q_ptr, k_ptr, w_ptr, ks_ptr, out_ptr,
    T, H, D, start_pos, s_lo, s_hi,
    stride_qt, stride_qh, stride_ks, stride_wt, stride_ot,
    HAS_KS: tl.constexpr, DOT_CAST: tl.constexpr,  # 0: as loaded (GPU), 2: to fp32 (interpreter)
    IEEE: tl.constexpr, MIXTURE: tl.constexpr,  # MIXTURE: logsumexp_h(w + dot * ks), not sum_h w * ReLU(dot) * ks
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Transposed tile: acc[s, t] = score of key s for query t. The key tile is the A operand of
    # every head's dot (k [BLOCK_S, D] @ q_h^T [D, BLOCK_T]), loaded (and, on sm_90, staged to
    # shared memory) once per program, outside the head loop. w arrives transposed ([H, T], from
    # _prep), so each head's weights w[t-block, h] are one contiguous, coalesced BLOCK_T load.
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = s_lo + pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    rows_t = offs_t.to(tl.int64)  # row offsets in int64: T * stride_qt (and T * S) can pass 2^31
    rows_s = offs_s.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    s_ok = offs_s < s_hi
    d_ok = offs_d < D
    acc = tl.zeros((BLOCK_S, BLOCK_T), dtype=tl.float32)
    run_max = tl.full((BLOCK_S, BLOCK_T), float("-inf"), dtype=tl.float32)  # MIXTURE: online logsumexp
    last_pos = start_pos + tl.minimum(pid_t * BLOCK_T + BLOCK_T, T) - 1
    if s_lo + pid_s * BLOCK_S <= last_pos:  # tile not entirely in the future
        k = tl.load(k_ptr + rows_s[:, None] * stride_ks + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_CAST == 2:
            k = k.to(tl.float32)
        if HAS_KS:
            ks = tl.load(ks_ptr + offs_s, mask=s_ok, other=0.0)
        for h in range(H):
            qh = tl.load(q_ptr + rows_t[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                         mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_CAST == 2:
                qh = qh.to(tl.float32)
            wh = tl.load(w_ptr + h * stride_wt + offs_t, mask=t_ok, other=0.0)  # w^T[h, t-block]: contiguous
            if IEEE:  # fp32 inputs: exact fp32 products, not TF32
                x = tl.dot(k, tl.trans(qh), input_precision="ieee")  # [BLOCK_S, BLOCK_T] fp32
            else:
                x = tl.dot(k, tl.trans(qh))
            if MIXTURE:
                if HAS_KS:
                    x = x * ks[:, None]
                x = x + wh[None, :]
                new_max = tl.maximum(run_max, x)
                acc = acc * tl.exp(run_max - new_max) + tl.exp(x - new_max)  # acc: sum of exp(. - run_max)
                run_max = new_max
            else:
                acc += tl.maximum(x, 0.0) * wh[None, :]
        if MIXTURE:
            acc = run_max + tl.log(acc)
        elif HAS_KS:
            acc = acc * ks[:, None]
    future = offs_s[:, None] > (start_pos + offs_t)[None, :]
    acc = tl.where(future, float("-inf"), acc)
    out_offs = rows_t[None, :] * stride_ot + (offs_s - s_lo)[:, None]
    tl.store(out_ptr + out_offs, acc, mask=s_ok[:, None] & t_ok[None, :])


def _prep(q, k, w, target: Target | None = None):
    """Contiguous inputs (w as fp32 w^T, [H, T]: a head's weights contiguous) and the DOT_CAST mode for
    `target` (default: q's device); q and k as triton_decode.prep_qk prepares them (FP8 into tl.dot
    on sm_89+, bf16 on the host elsewhere, fp32 dots in the interpreter)."""
    q, k, cast = prep_qk(q, k, target or target_of(q.device))
    return q, k, w.float().t().contiguous(), cast  # w^T [H, T]


def configs(D: int, dtype: torch.dtype, target: Target) -> list[dict]:
    """The per-architecture config table of `_logits_kernel` for head dim D, q/k of `dtype` as they
    reach the kernel (after _prep): the default first, then the alternatives the autotuner
    (dispatch.autotune, DSA_KERNEL_AUTOTUNE=1) may time. The launch and the GPU compile check
    (kernels/gpu_compile.py, which compiles every entry) both call this."""
    eight_bit = dtype.itemsize == 1 and target.kind != "interp"
    BLOCK_D = max(32 if eight_bit else 16, triton.next_power_of_2(D))  # 8-bit tl.dot: K >= 32
    if BLOCK_D > 256:
        raise ValueError(f"q: head dim D <= 256 supported by the Triton indexer, got {D}")

    def cfg(BLOCK_T, BLOCK_S, num_warps, num_stages):
        return dict(BLOCK_T=BLOCK_T, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, num_warps=num_warps, num_stages=num_stages)

    if target.kind == "interp":
        return [cfg(16, 32, 4, 2)]
    if dtype == torch.float32:  # forced fp32 (FMA dots): the default tile only
        return [cfg(64, 64, 4, 2)]
    # Default: a 64-key x 64-query tile on one warpgroup (the key tile is the A operand: one m64 wgmma
    # M tile on sm_90, an M=64 tcgen05 MMA on sm_100). Alternative: 128 keys per program on two
    # warpgroups (sm_90: each owns 64 keys; sm_100: the native M=128 MMA), which halves the q_h
    # loads per key (each head's q tile is loaded once per program) at twice the accumulator.
    return [cfg(64, 64, 4, 2), cfg(64, 128, 8, 2)]


def launch_config(D: int, dtype: torch.dtype, target: Target) -> dict:
    """The default (first) entry of `configs`."""
    return configs(D, dtype, target)[0]


def plan(q, k, w, k_scale, out, start_pos, t0, t1, s_lo, s_hi, cast, score, target: Target | None = None,
         cfg: dict | None = None):
    """(grid, args, kwargs) of the launch that writes out[t0:t1, 0:s_hi-s_lo] <- scores of queries
    t0..t1-1 (absolute start_pos + t) vs keys s_lo..s_hi-1; inputs as returned by _prep. `cfg`: an
    entry of configs() (default: launch_config)."""
    T, H, D = q.shape
    target = target or target_of(q.device)
    cfg = cfg or launch_config(D, q.dtype, target)
    qs, ws = q[t0:t1], w[:, t0:t1]  # w: w^T [H, T] from _prep
    grid = (triton.cdiv(t1 - t0, cfg["BLOCK_T"]), triton.cdiv(s_hi - s_lo, cfg["BLOCK_S"]))
    ks = k_scale if k_scale is not None else w  # dummy pointer when HAS_KS is False
    args = (qs, k, ws, ks, out,
            t1 - t0, H, D, start_pos + t0, s_lo, s_hi,
            qs.stride(0), qs.stride(1), k.stride(0), ws.stride(0), out.stride(0))
    kwargs = dict(HAS_KS=k_scale is not None, DOT_CAST=cast, IEEE=q.dtype == torch.float32,
                  MIXTURE=score == "mixture", **cfg)
    return grid, args, kwargs


def _launch(q, k, w, k_scale, out, start_pos, t0, t1, s_lo, s_hi, cast, score):
    """out[t0:t1, 0:s_hi-s_lo] <- scores of queries t0..t1-1 (absolute start_pos + t) vs keys s_lo..s_hi-1."""
    cfg = None
    if dispatch.autotune_enabled(q):
        target = target_of(q.device)
        cands = configs(q.shape[2], q.dtype, target)
        if len(cands) > 1:
            key = ("indexer", q.shape[1], q.shape[2], q.dtype, k_scale is not None, score,
                   1 << max(0, t1 - t0 - 1).bit_length(), 1 << max(0, s_hi - s_lo - 1).bit_length(), target)

            def run(c):
                grid, args, kwargs = plan(q, k, w, k_scale, out, start_pos, t0, t1, s_lo, s_hi, cast, score, target, c)
                _logits_kernel[grid](*args, **kwargs)
            cfg = dispatch.autotune(key, cands, run)
    grid, args, kwargs = plan(q, k, w, k_scale, out, start_pos, t0, t1, s_lo, s_hi, cast, score, cfg=cfg)
    _logits_kernel[grid](*args, **kwargs)


def indexer_logits(q, k, w, *, k_scale=None, start_pos=0, score="relu"):
    T, S = q.shape[0], k.shape[0]
    q, k, w, cast = _prep(q, k, w)
    if k_scale is not None:
        k_scale = k_scale.float().contiguous()
    out = torch.empty(T, S, dtype=torch.float32, device=q.device)
    if T and S:
        _launch(q, k, w, k_scale, out, start_pos, 0, T, 0, S, cast, score)
    return out


def indexer_topk(q, k, w, topk, *, k_scale=None, start_pos=0, s_block=None, t_chunk=None, score="relu"):
    if q.shape[0] == 1:  # one decoding query: the decode kernel (triton_decode.py), one pass, no merges
        end = min(k.shape[0], start_pos + 1)
        return indexer_decode_topk(q, k[:end], w, topk, k_scale=None if k_scale is None else k_scale[:end],
                                   score=score)
    if score == "softmax_mixture":  # the normalizer pass (torch code), then the mixture kernel
        w, score = w.float() - indexer_head_lse(q, k, k_scale=k_scale, start_pos=start_pos), "mixture"
    T, H, _ = q.shape
    S = k.shape[0]
    q, k, w, cast = _prep(q, k, w)
    if k_scale is not None:
        k_scale = k_scale.float().contiguous()
    s_block = s_block or (S_BLOCK_CUDA if q.is_cuda else S_BLOCK_INTERP)
    t_chunk = t_chunk or (T_CHUNK_CUDA if q.is_cuda else T_CHUNK_INTERP)
    out = torch.empty(T, topk, dtype=torch.int32, device=q.device)
    buf = torch.empty(t_chunk, s_block, dtype=torch.float32, device=q.device)
    for t0 in range(0, T, t_chunk):
        t1 = min(t0 + t_chunk, T)
        vals = torch.empty(t1 - t0, 0, dtype=torch.float32, device=q.device)
        idx = torch.empty(t1 - t0, 0, dtype=torch.int64, device=q.device)
        for s0, s1, _ in _blocks(start_pos + t0, start_pos + t1 - 1, S, s_block):
            _launch(q, k, w, k_scale, buf, start_pos, t0, t1, s0, s1, cast, score)
            vals, idx = _merge(vals, idx, buf[: t1 - t0, : s1 - s0], s0, topk)
        vals, order = vals.sort(dim=1, descending=True)
        idx = idx.gather(1, order).masked_fill_(vals == float("-inf"), -1)
        out[t0:t1, : idx.shape[1]] = idx
        out[t0:t1, idx.shape[1]:] = -1
    return out

