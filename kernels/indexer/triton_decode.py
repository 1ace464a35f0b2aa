"""Lightning-indexer top-k for decoding queries, Triton path (CUDA; CPU only under TRITON_INTERPRET=1).

    indexer_decode_topk(q [B, H, D], k [P, D], w [B, H], topk, *, k_scale, tails, tail_scales, score)
        -> int32 [B, topk]        (contract: kernels/indexer/__init__.py; oracle: naive.py)

Row b is one decoding query over the shared prefix k (P keys) and then its own tails[b]. The B
rows of a decode step read the prefix ONCE, in one launch of `_decode_kernel`:

* grid = one program per BLOCK_S-key tile of the prefix. A program loads its key tile once (the A
  operand of every dot, int64 row offsets; on sm_90 staged to shared memory once, before the row
  loop) and loops over the rows in blocks of BLOCK_R: the other operand is the [BLOCK_N, D] tile
  of those rows' query heads, column n = (row r, head h) = r * HP + h with HP = next_pow2(H), and
  BLOCK_N = BLOCK_R * HP >= 16 (the MMA minimum; padded rows / heads load zeros and are never
  stored). Pow-2 heads per row let the relu path sum a row's heads with a reshape.
* score="relu": the heads are reduced in the kernel, out[b, s] = sum_h w[b, h] * ReLU(dot) *
  k_scale[s] (fp32), so only the [B, P] scores are written.
* mixtures ("mixture", "softmax_mixture"): a key's rank needs each head's max / normalizer over
  ALL the row's keys, known only after the pass. The kernel writes, per (row, key block, head),
  E = exp(dot * k_scale - block max) and the block max and block sum of E; a small torch combine
  then takes each head's global max m_h and normalizer z_h from the block stats (merged with the
  tails'), c_h as torch_decode.py defines it (softmax_mixture: softmax(w)_h / z_h; mixture:
  exp(w_h + m_h - max_h'(w + m))), and scores[b, s] = sum_h c_h * exp(blockmax - m_h) * E as ONE
  batched GEMV (torch.bmm over (row, key block)): no second pass over the keys.
  E is fp32 (B * H * P * 4 bytes; launches chunk the rows to E_BUDGET elements): the combine's
  bmm reads it as is. bf16 E would halve the kernel's writes but torch.bmm then needs either an
  fp32 upcast copy (more traffic than fp32 E) or bf16 scores (ties at 2^-9 relative, top-k picks
  unlike the torch path's); a fused Triton combine could take bf16 E (not done).
* the tails (each row's few own keys) in torch: one padded bmm for all rows' tail dots, the same
  formulas, merged into the heads' maxima / normalizers before the combine;
* top-k: row_topk.sorted_topk over [B, P + max tail] (exact; descending; -1 padded), as torch_decode.

FP8 q/k (relu only) go into tl.dot on sm_89+ (Target.fp8_dot; BLOCK_D >= 32 for an 8-bit dot),
elsewhere they are converted to bf16 on the host (exact), as kernels/indexer/triton.py does. The
interpreter dots in fp32 (DOT_CAST=2: its bf16 tl.dot is wrong in Triton 3.9).

`launch_config` / `plan` build the exact launch (the GPU compile check calls them on meta tensors:
tests/kernels/test_indexer_decode_compile.py).
Test (CPU, interpreter): .venv/bin/python -m pytest -q tests/kernels/test_indexer_decode.py -k triton
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_rag.kernels.checks import is_fp8
from dsa_rag.kernels.dispatch import Target, target_of
from dsa_rag.kernels.indexer.row_topk import sorted_topk
from dsa_rag.kernels.indexer.torch_decode import head_weights

# Mixtures: E elements (rows * H * padded P, fp32) per launch; more rows are launched in chunks
# (each chunk re-reads the keys). 2^27 = 512 MiB: dsa-tiny (H = 8) at 128k keys, 128 rows per launch.
E_BUDGET = 1 << 27


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, w_ptr, ks_ptr, out_ptr, e_ptr, bmax_ptr, bsum_ptr,
    B, H, D, P, NB,
    stride_qb, stride_qh, stride_ks, stride_wb, stride_ob,
    HAS_KS: tl.constexpr, DOT_CAST: tl.constexpr,  # DOT_CAST 0: as loaded (GPU), 2: to fp32 (interpreter)
    IEEE: tl.constexpr, MIXTURE: tl.constexpr,  # MIXTURE: write E and block stats, not the relu scores
    HP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    BLOCK_N: tl.constexpr = BLOCK_R * HP
    pid = tl.program_id(0)
    offs_s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    rows_s = offs_s.to(tl.int64)  # P * stride_ks can pass 2^31 (16M keys of 128 dims)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < P
    d_ok = offs_d < D
    # the key tile: loaded once, the A operand of every row block's dot
    k = tl.load(k_ptr + rows_s[:, None] * stride_ks + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_CAST == 2:
        k = k.to(tl.float32)
    if HAS_KS:
        ks = tl.load(ks_ptr + offs_s, mask=s_ok, other=0.0)
    offs_n = tl.arange(0, BLOCK_N)
    head = offs_n % HP  # column n = (row n // HP, head n % HP)
    h_ok = head < H
    for r0 in range(0, B, BLOCK_R):
        row = r0 + offs_n // HP
        n_ok = (row < B) & h_ok
        row64 = row.to(tl.int64)
        qn = tl.load(q_ptr + (row64 * stride_qb + head * stride_qh)[:, None] + offs_d[None, :],
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if DOT_CAST == 2:
            qn = qn.to(tl.float32)
        if IEEE:  # fp32 inputs: exact fp32 products, not TF32
            x = tl.dot(k, tl.trans(qn), input_precision="ieee")  # [BLOCK_S, BLOCK_N] fp32
        else:
            x = tl.dot(k, tl.trans(qn))
        if MIXTURE:
            if HAS_KS:
                x = x * ks[:, None]
            x = tl.where(s_ok[:, None], x, float("-inf"))  # keys past P: E = 0, out of the block stats
            bmax = tl.max(x, axis=0)  # [BLOCK_N]; finite: a tile holds >= 1 key
            e = tl.exp(x - bmax[None, :])
            bsum = tl.sum(e, axis=0)
            # E [B, NB, H, BLOCK_S], stats [B, NB, H]: a column's BLOCK_S values are contiguous
            col = (row64 * NB + pid) * H + head
            tl.store(e_ptr + col[None, :] * BLOCK_S + tl.arange(0, BLOCK_S)[:, None], e, mask=n_ok[None, :])
            tl.store(bmax_ptr + col, bmax, mask=n_ok)
            tl.store(bsum_ptr + col, bsum, mask=n_ok)
        else:
            wn = tl.load(w_ptr + row64 * stride_wb + head, mask=n_ok, other=0.0)
            y = tl.maximum(x, 0.0) * wn[None, :]
            acc = tl.sum(tl.reshape(y, (BLOCK_S, BLOCK_R, HP)), axis=2)  # [BLOCK_S, BLOCK_R]: a row's heads
            if HAS_KS:
                acc = acc * ks[:, None]  # after the ReLU: k_scale >= 0
            rows_r = r0 + tl.arange(0, BLOCK_R)
            tl.store(out_ptr + rows_r.to(tl.int64)[None, :] * stride_ob + rows_s[:, None], acc,
                     mask=s_ok[:, None] & (rows_r < B)[None, :])


def prep_qk(q, k, target: Target):
    """q and k as they enter an indexer kernel, and the DOT_CAST mode, for `target` (the prefill
    path's triton._prep uses it too). CUDA sm_89+: FP8 goes into tl.dot as is (FP8 tensor cores).
    Other GPUs (sm_80/86, ROCm): FP8 q and k are converted to bf16 on the host (exact; FP8 dot
    operands do not compile there). Mixed float dtypes meet in fp32. Interpreter (CPU): tl.dot on
    bf16 returns garbage in Triton 3.9's interpreter, and it has no FP8 math, so FP8 is upcast on
    the host (exact) and every dot runs in fp32 (DOT_CAST 2)."""
    fp8 = is_fp8(q)
    if fp8 and not target.fp8_dot:
        q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    if not fp8 and q.dtype != k.dtype:
        q, k = q.float(), k.float()
    return q.contiguous(), k.contiguous(), 2 if target.kind == "interp" else 0


def launch_config(B: int, H: int, D: int, dtype: torch.dtype, target: Target) -> dict:
    """Block sizes and launch options of `_decode_kernel` for B rows of H heads of dim D, q/k of
    `dtype` as they reach the kernel (after prep_qk). The launch and the compile check call this."""
    eight_bit = dtype.itemsize == 1 and target.kind != "interp"
    BLOCK_D = max(32 if eight_bit else 16, triton.next_power_of_2(D))  # 8-bit tl.dot: K >= 32
    if BLOCK_D > 256:
        raise ValueError(f"q: head dim D <= 256 supported by the Triton indexer, got {D}")
    HP = triton.next_power_of_2(H)
    if HP > 128:
        raise ValueError(f"q: H <= 128 heads supported by the Triton decode indexer, got {H}")
    interp = target.kind == "interp"
    # N of the dot: up to N_MAX query columns (rows * heads), at least 16 (the MMA minimum)
    N_MAX = 16 if interp else 64
    BLOCK_R = max(triton.cdiv(16, HP), min(triton.next_power_of_2(max(B, 1)), max(1, N_MAX // HP)))
    # BLOCK_S = 128 (two warpgroups' M on sm_90): each query tile re-read from L2 serves 128 keys
    BLOCK_S = 32 if interp else 128
    return dict(HP=HP, BLOCK_R=BLOCK_R, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, num_warps=8, num_stages=2)


def plan(q, k, w, k_scale, out, e, bmax, bsum, score, cast, target: Target | None = None):
    """(grid, args, kwargs) of the launch over all rows of q (inputs as returned by _prep; w fp32
    [B, H]). relu: out [B, >= P] fp32 (row stride any) <- scores; e, bmax, bsum unused (None).
    Mixtures: e [B, NB, H, BLOCK_S], bmax / bsum [B, NB, H] fp32 <- E and block stats; out unused."""
    B, H, D = q.shape
    P = k.shape[0]
    target = target or target_of(q.device)
    cfg = launch_config(B, H, D, q.dtype, target)
    nb = triton.cdiv(P, cfg["BLOCK_S"])
    mixture = score != "relu"
    dummy = w  # pointer of the outputs (and k_scale) a launch does not use
    ks = k_scale if k_scale is not None else dummy
    args = (q, k, w, ks, dummy if mixture else out, e if mixture else dummy, bmax if mixture else dummy,
            bsum if mixture else dummy, B, H, D, P, nb,
            q.stride(0), q.stride(1), k.stride(0), w.stride(0), 0 if mixture else out.stride(0))
    kwargs = dict(HAS_KS=k_scale is not None, DOT_CAST=cast, IEEE=q.dtype == torch.float32, MIXTURE=mixture, **cfg)
    return (nb,), args, kwargs


def _tail_dots(q, tails, tail_scales, B, H, D):
    """fp32 [B, H, n_max] dots of each row's query heads with its own tail keys (times its scales),
    -inf on the padding, in one bmm; (dots, valid [B, n_max])."""
    n = [t.shape[0] for t in tails] if tails is not None else [0] * B
    n_max = max(n, default=0)
    kt = q.new_zeros(B, n_max, D, dtype=torch.float32)
    ts = q.new_ones(B, n_max, dtype=torch.float32)
    for b in range(B):
        if n[b]:
            kt[b, : n[b]] = tails[b].float()
            if tail_scales is not None:
                ts[b, : n[b]] = tail_scales[b]
    valid = torch.arange(n_max, device=q.device)[None, :] < torch.tensor(n, device=q.device)[:, None]
    dots = torch.bmm(q.float(), kt.transpose(1, 2)) * ts[:, None, :]  # fp32: the exact products of
    return dots.masked_fill(~valid[:, None, :], float("-inf")), valid  # bf16 / FP8 values, like the MMA's


def _combine(e, bmax, bsum, tail, valid, w, P, score):
    """Mixture scores fp32 [B, P + n_max] of a row chunk from the kernel's E [B, NB, H, BLOCK_S] and
    block stats [B, NB, H] (None when P = 0) and the tail dots [B, H, n_max] (-inf padding)."""
    B, H, n_max = tail.shape
    m = tail.amax(-1) if n_max else tail.new_full((B, H), float("-inf"))
    if bmax is not None:
        m = torch.maximum(m, bmax.amax(1))  # each head's max over ALL the row's keys
    m = m.nan_to_num(neginf=0.0)  # a row without keys: nothing to rank, keep the math finite
    te = (tail - m[:, :, None]).exp()  # [B, H, n_max], 0 on the padding
    z = te.sum(-1)
    if bmax is not None:
        scale = (bmax - m[:, None, :]).exp()  # [B, NB, H]: each block's max against its head's
        z = z + (bsum * scale).sum(1)
    c = head_weights(w, m, z, score)
    scores = torch.bmm(c[:, None, :], te)[:, 0].masked_fill(~valid, float("-inf"))
    if bmax is None:
        return scores
    NB, BS = e.shape[1], e.shape[3]
    coef = (c[:, None, :] * scale).view(B * NB, 1, H)  # c_h * exp(blockmax - m_h)
    pre = torch.bmm(coef, e.view(B * NB, H, BS)).view(B, NB * BS)[:, :P]  # one GEMV per (row, key block)
    return torch.cat([pre, scores], 1)


def indexer_decode_topk(q, k, w, topk, *, k_scale=None, tails=None, tail_scales=None, score="relu"):
    B, H, D = q.shape
    P = k.shape[0]
    target = target_of(q.device)
    wf = w.float().contiguous()
    tail, valid = _tail_dots(q, tails, tail_scales, B, H, D)  # [B, H, n_max]
    qk, kk, cast = prep_qk(q, k, target)
    ks = k_scale.float().contiguous() if k_scale is not None else None
    if score == "relu":
        scores = q.new_full((B, P + tail.shape[2]), float("-inf"), dtype=torch.float32)
        if P and B:
            grid, args, kwargs = plan(qk, kk, wf, ks, scores, None, None, None, score, cast, target)
            _decode_kernel[grid](*args, **kwargs)
        tail_scores = (wf[:, :, None] * tail.clamp_min(0.0)).sum(1)  # -inf padding -> 0 ...
        scores[:, P:] = tail_scores.masked_fill(~valid, float("-inf"))  # ... and back to -inf
        return sorted_topk(scores, topk)
    # mixtures: row chunks whose E fits E_BUDGET (one chunk, one launch, at the usual shapes)
    cfg = launch_config(B, H, D, qk.dtype, target)
    nb = triton.cdiv(P, cfg["BLOCK_S"])
    rows = max(1, E_BUDGET // max(1, H * nb * cfg["BLOCK_S"]))
    out = torch.empty(B, topk, dtype=torch.int32, device=q.device)
    e = bmax = bsum = None
    if P:
        e = torch.empty(min(rows, B), nb, H, cfg["BLOCK_S"], dtype=torch.float32, device=q.device)
        bmax = torch.empty(min(rows, B), nb, H, dtype=torch.float32, device=q.device)
        bsum = torch.empty_like(bmax)
    for b0 in range(0, B, rows):
        b1 = min(B, b0 + rows)
        ec, mc, sc = (None, None, None) if not P else (e[: b1 - b0], bmax[: b1 - b0], bsum[: b1 - b0])
        if P:
            grid, args, kwargs = plan(qk[b0:b1], kk, wf[b0:b1], ks, None, ec, mc, sc, score, cast, target)
            _decode_kernel[grid](*args, **kwargs)
        out[b0:b1] = sorted_topk(_combine(ec, mc, sc, tail[b0:b1], valid[b0:b1], wf[b0:b1], P, score), topk)
    return out
