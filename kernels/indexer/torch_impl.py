"""Lightning indexer, fast CPU PyTorch path: blocked over T and S.

Never a [T, H, S] tensor; `indexer_topk` holds the scores of one chunk of queries against every
key ([T_chunk, S] fp32, T_chunk * S <= ROW_BUDGET), never [T, S]. Per (T chunk, S block):

    x      = relu(q_chunk.view(Tc*H, D) @ k_blk^T)          one GEMM for all heads
    scores = bmm(w[Tc, 1, H], x.view(Tc, H, Sb)) * k_scale   weighted head sum, then key scale
    causal -inf mask only on diagonal blocks; blocks entirely in the future are skipped;
then one top-k per chunk over its whole row (_row_topk: group maxima first), where a running
merge per 4096-key block costs ~2x more at 32k keys and ~6x at 128k (`--topk-only` of
benchmarks/indexer_score_cost.py).

Math dtype: fp32 GEMMs for fp32 and fp16 inputs. bf16/FP8 inputs: bf16 GEMMs (fp32 accumulate;
~2.5x fp32 speed on a CPU with native bf16) where the CPU has native bf16, else fp32 GEMMs on blocks
upcast one at a time (`dispatch.lowp_math_dtype`; FP8 -> bf16 / fp32 is exact). The ReLU score's
head sum is fp32 either way (as V3.2's fp8_index): bf16 scores would tie often enough to make the
top-k depend on how the queries were chunked.
k_scale is applied after the ReLU (ReLU(x*c) = c*ReLU(x) for c >= 0, and dequant scales are > 0).
score="mixture" (log sum_h exp(w + dot)): the same GEMM, then a fp32 logsumexp over the heads.
indexer_head_lse: the same blocks, a GEMM and a logsumexp over each block's keys per head, merged
with logaddexp (inference only, no autograd). indexer_topk(score="softmax_mixture") fuses it in one
pass over the keys per chunk (_softmax_mixture_rows): the per-head exps are kept, so ranking is a
weighted head sum like the ReLU path's, with no second GEMM or exp.
Differentiable for float inputs (plain torch ops), though the model should not rely on speed there.

Test: .venv/bin/python -m pytest -q tests/kernels/test_indexer.py
Bench: .venv/bin/python benchmarks/kernels_cpu.py
"""

from __future__ import annotations

import torch

from dsa_rag.kernels.checks import is_fp8
from dsa_rag.kernels.precision import lowp_math_dtype
from dsa_rag.kernels.indexer.row_topk import row_topk as _row_topk
from dsa_rag.kernels.indexer.row_topk import sorted_topk
from dsa_rag.kernels.indexer.torch_decode import decode_topk as indexer_decode_topk  # noqa: F401 (the op)

S_BLOCK = 4096  # keys per block
PAIR_BUDGET = 1 << 21  # Tc * H * S_BLOCK elements per block intermediate (4 MiB in bf16)
ROW_BUDGET = 1 << 23  # Tc * S fp32 scores of one chunk of queries for indexer_topk (32 MiB)
# softmax_mixture's keys-with-ones copy (k1) only when T * H >= 2 * (D + 1) query-head rows share it
K1_MIN_ROWS_PER_DIM = 2
# indexer_topk calls with one query (decode) take torch_decode (one GEMM over all keys, no per-block
# references); False sends them through the blocked path (the A/B of benchmarks/decode_selection_ab.py)
FUSED_DECODE = True


def _math_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float32 if q.dtype == torch.float32 else lowp_math_dtype(q)


def _t_chunk(H: int, s_block: int) -> int:
    return max(16, PAIR_BUDGET // (H * s_block))


def _block_scores(qm, k_blk, w, ks_blk, dt):
    """Differentiable version of _Scratch.scores (fresh tensors, no in-place on saved ones)."""
    Tc, H = w.shape
    x = torch.relu((qm @ k_blk.to(dt).t()).float())  # [Tc*H, Sb], fp32 for the head sum
    s = torch.bmm(w.float()[:, None, :], x.view(Tc, H, -1))[:, 0]  # [Tc, Sb]
    return s if ks_blk is None else s * ks_blk


def _mixture_scores(qm, k_blk, w, ks_blk, dt):
    """score="mixture": fp32 [Tc, Sb] = logsumexp_h(w[:, h] + dot_h * ks); differentiable."""
    Tc, H = w.shape
    x = (qm @ k_blk.to(dt).t()).float().view(Tc, H, -1)
    if ks_blk is not None:
        x = x * ks_blk
    return (x + w[:, :, None]).logsumexp(1)


class _Scratch:
    """Buffers reused across blocks: fresh multi-MB tensors page-fault on every block."""

    def __init__(self, tc, H, s_block, dt, device):
        self.x = torch.empty(tc * H * s_block, dtype=dt, device=device)
        self.f = torch.empty(tc * s_block, dtype=torch.float32, device=device)  # fp32 scores of one block
        self.xf = None

    def scores(self, qm, k_blk, w, ks_blk, dt):
        """qm [Tc*H, D] (dt), k_blk [Sb, D], w [Tc, H] fp32, ks_blk [Sb] or None -> fp32 [Tc, Sb] view.
        The head sum is an fp32 GEMM whatever dt (bf16 dots are upcast first)."""
        Tc, H = w.shape
        Sb = k_blk.shape[0]
        if dt == torch.float32:
            x = torch.mm(qm, k_blk.to(dt).t(), out=self.x[: Tc * H * Sb].view(Tc * H, Sb)).relu_()
        else:
            x = self.dots(qm, k_blk, None, dt, Tc, H).relu_()
        s = torch.bmm(w[:, None, :], x.view(Tc, H, Sb), out=self.f[: Tc * Sb].view(Tc, 1, Sb))
        f = s.view(Tc, Sb)
        return f if ks_blk is None else f.mul_(ks_blk)

    def dots(self, qm, k_blk, ks_blk, dt, Tc, H, out=None):
        """fp32 [Tc, H, Sb] = q.k * ks, into `out` (contiguous fp32 [Tc, H, Sb]) or a reused buffer
        (the mixtures' per-head work is fp32)."""
        Sb = k_blk.shape[0]
        if out is None:
            if self.xf is None:  # the fp32 per-head buffer only the mixtures need
                self.xf = torch.empty(self.x.numel(), dtype=torch.float32, device=self.x.device)
            out = self.xf[: Tc * H * Sb].view(Tc, H, Sb)
        if dt == torch.float32:
            f = torch.mm(qm, k_blk.to(dt).t(), out=out.view(Tc * H, Sb)).view(Tc, H, Sb)
        else:
            x = torch.mm(qm, k_blk.to(dt).t(), out=self.x[: Tc * H * Sb].view(Tc * H, Sb))
            f = out.copy_(x.view(Tc, H, Sb))
        return f if ks_blk is None else f.mul_(ks_blk)

    def mixture_scores(self, qm, k_blk, w, ks_blk, dt):
        """score="mixture" into reused buffers: fp32 [Tc, Sb] = logsumexp_h(w[:, h] + dot_h * ks), in
        place (max, subtract, exp, sum, log): ~1.15x the ReLU path here, where torch.logsumexp
        over the head dim of [Tc, H, Sb] with fresh tensors costs 2-3x."""
        f = self.dots(qm, k_blk, ks_blk, dt, *w.shape)
        f.add_(w[:, :, None])
        m = f.amax(1, keepdim=True)
        f.sub_(m).exp_()
        return f.sum(1).log_().add_(m[:, 0])


def _softmax_mixture_rows(row, e, scratch, qm, k, k1, w, k_scale, p_first, p_last, s_block, dt):
    """score="softmax_mixture" for one chunk of queries: row [Tc, s_end] <- exp(I - max_h w) with I
    the "mixture" score of w - head_lse, i.e. sum_h softmax(w)_h softmax_h(dot) up to a row factor.

    One pass over the keys. Each block's dots [Tc, H, Sb] land in that block's own slice of e (flat
    fp32, >= Tc * H * s_end) and become exps there, in place: no pass copies exps out of a scratch
    buffer. Block 0 (every query sees key 0) is taken relative to its own max r [Tc, H]; every
    later block relative to the same r, which the GEMM subtracts for free: q gets a column -r and
    the keys a column of ones (k1, [S, D + 1]), so dot - r comes out of the GEMM and the block
    needs no max pass and no subtraction, only exp and sum (half the elementwise passes). A block
    whose dots exceed r by more than fp32's exp range (~88) overflows its sum; it is redone
    against its own max. Each block b then holds exps relative to its reference ref_b, and an
    online sum gives each head's normalizer z relative to m = max_b ref_b. The ranking needs no
    second GEMM or exp: block b's keys score sum_h c_h exp(ref_bh - m_h) e_h with
    c = exp(w - max_h w) / z, a head-weighted sum like the ReLU path's (no max, no log per key).
    Keys whose every head sits more than ~87 nats below its reference come out as 0 (fp32
    underflow) and tie among themselves. k1 is None with k_scale (FP8 keys): every block then
    takes its own max."""
    Tc, H = w.shape
    blocks, off, q1 = [], 0, None
    for s0, s1, needs_mask in _blocks(p_first, p_last, k.shape[0], s_block):
        Sb = s1 - s0
        eb = e[off: off + Tc * H * Sb].view(Tc, H, Sb)
        off += eb.numel()
        f = None
        if q1 is not None:
            f = scratch.dots(q1, k1[s0:s1], None, dt, Tc, H, out=eb)  # dot - r
            if needs_mask:
                _causal_mask_(f, p_first, s0)
            zb = f.exp_().sum(-1)
            ref = r
            if not torch.isfinite(zb).all():
                f = None  # overflow: redo this block against its own max
        if f is None:
            f = scratch.dots(qm, k[s0:s1], None if k_scale is None else k_scale[s0:s1], dt, Tc, H, out=eb)
            if needs_mask:
                _causal_mask_(f, p_first, s0)
            ref = f.amax(-1)  # -inf where a query sees no key of this block: it then adds nothing
            zb = f.sub_(ref.nan_to_num(neginf=0.0)[:, :, None]).exp_().sum(-1)
            if q1 is None and k1 is not None:  # block 0 (finite: key 0 is causal for every query) is the reference of every later block
                q1 = torch.cat([qm, -ref.reshape(-1, 1).to(dt)], 1)
                r = -q1[:, -1].float().view(Tc, H)  # as the GEMM sees it (rounded to dt)
        blocks.append((s0, s1, needs_mask, ref, zb, f))
    m = torch.stack([b[3] for b in blocks]).amax(0)
    z = sum(zb * (ref - m).exp() for _, _, _, ref, zb, _ in blocks)
    c = (w - w.amax(-1, keepdim=True)).exp_().div_(z)
    for s0, s1, needs_mask, ref, _, f in blocks:
        s = torch.bmm((c * (ref - m).exp())[:, None, :], f)[:, 0]
        row[:, s0:s1] = _causal_mask_(s, p_first, s0) if needs_mask else s


def _causal_mask_(s, q_pos0, s0):
    """-inf where key s0 + j > query q_pos0 + i (in place on s [Tc, Sb] or [Tc, H, Sb])."""
    Tc, Sb = s.shape[0], s.shape[-1]
    qpos = (q_pos0 + torch.arange(Tc, device=s.device)).view(Tc, *[1] * (s.dim() - 1))
    kpos = s0 + torch.arange(Sb, device=s.device)
    return s.masked_fill_(kpos > qpos, float("-inf"))


def _blocks(p_first: int, p_last: int, S: int, s_block: int):
    """Key blocks (s0, s1, needs_mask) seen by queries at absolute positions p_first..p_last."""
    s_end = min(S, p_last + 1)
    for s0 in range(0, s_end, s_block):
        s1 = min(s0 + s_block, s_end)
        yield s0, s1, s1 - 1 > p_first


def indexer_logits(q, k, w, *, k_scale=None, start_pos=0, s_block=None, score="relu"):
    s_block = s_block or S_BLOCK
    T, H, D = q.shape
    S = k.shape[0]
    dt = _math_dtype(q)
    w = w.float()
    out = torch.empty(T, S, dtype=torch.float32, device=q.device)
    tc = _t_chunk(H, s_block)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, w, k_scale))
    if grad:
        block_scores = _mixture_scores if score == "mixture" else _block_scores
    else:
        scratch = _Scratch(min(tc, T), H, s_block, dt, q.device)
        block_scores = scratch.mixture_scores if score == "mixture" else scratch.scores
    for t0 in range(0, T, tc):
        t1 = min(t0 + tc, T)
        qm = q[t0:t1].reshape(-1, D).to(dt)
        p_first, p_last = start_pos + t0, start_pos + t1 - 1
        s_end = min(S, p_last + 1)
        for s0, s1, needs_mask in _blocks(p_first, p_last, S, s_block):
            ks = None if k_scale is None else k_scale[s0:s1]
            s = block_scores(qm, k[s0:s1], w[t0:t1], ks, dt)
            if needs_mask and grad and score == "mixture":
                s = s.clone()  # logsumexp's backward reads its output: mask a copy
            out[t0:t1, s0:s1] = _causal_mask_(s, p_first, s0) if needs_mask else s
        out[t0:t1, s_end:] = float("-inf")
    return out


def indexer_topk(q, k, w, topk, *, k_scale=None, start_pos=0, s_block=None, score="relu"):
    s_block = s_block or S_BLOCK
    T, H, D = q.shape
    S = k.shape[0]
    if T == 1 and FUSED_DECODE:  # one decoding query: the fused decode path (torch_decode.py), the same top-k
        end = min(S, start_pos + 1)
        return indexer_decode_topk(q, k[:end], w, topk, k_scale=None if k_scale is None else k_scale[:end], score=score)
    dt = _math_dtype(q)
    w = w.float()
    out = torch.empty(T, topk, dtype=torch.int32, device=q.device)
    smix = score == "softmax_mixture"
    # one chunk's scores [tc, S] (and for softmax_mixture its per-head exps [tc, H, S]) within ROW_BUDGET
    tc = min(_t_chunk(H, s_block), max(1, ROW_BUDGET // max(S * (H if smix else 1), 1)))
    scratch = _Scratch(min(tc, T), H, s_block, dt, q.device)
    rows = torch.empty(min(tc, T) * S, dtype=torch.float32, device=q.device)
    exps = torch.empty(min(tc, T) * H * S if smix else 0, dtype=torch.float32, device=q.device)
    # softmax_mixture: the keys with a column of ones, so the GEMM also subtracts each query's reference.
    # The copy saves a max and a subtraction pass over T * H * S dots and costs a pass over S * (D + 1)
    # keys: worth it in prefill, not in decode (T = 1), where it was ~1/6 of a 128k decode step.
    k1 = None
    if smix and k_scale is None and T * H >= K1_MIN_ROWS_PER_DIM * (D + 1):
        k1 = torch.cat([k.to(dt), torch.ones(S, 1, dtype=dt, device=k.device)], 1)
    block_scores = scratch.mixture_scores if score == "mixture" else scratch.scores
    with torch.no_grad():
        for t0 in range(0, T, tc):
            t1 = min(t0 + tc, T)
            qm = q[t0:t1].reshape(-1, D).to(dt)
            p_first, p_last = start_pos + t0, start_pos + t1 - 1
            s_end = min(S, p_last + 1)
            row = rows[: (t1 - t0) * s_end].view(t1 - t0, s_end)
            if smix:
                _softmax_mixture_rows(row, exps, scratch, qm, k, k1, w[t0:t1], k_scale, p_first, p_last, s_block, dt)
            else:
                for s0, s1, needs_mask in _blocks(p_first, p_last, S, s_block):
                    ks = None if k_scale is None else k_scale[s0:s1]
                    s = block_scores(qm, k[s0:s1], w[t0:t1], ks, dt)
                    row[:, s0:s1] = _causal_mask_(s, p_first, s0) if needs_mask else s
            out[t0:t1] = sorted_topk(row, topk)
    return out


@torch.no_grad()
def indexer_head_lse(q, k, *, k_scale=None, start_pos=0, s_block=None):
    s_block = s_block or S_BLOCK
    T, H, D = q.shape
    S = k.shape[0]
    dt = _math_dtype(q)
    out = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q.device)
    tc = _t_chunk(H, s_block)
    for t0 in range(0, T, tc):
        t1 = min(t0 + tc, T)
        qm = q[t0:t1].reshape(-1, D).to(dt)
        p_first, p_last = start_pos + t0, start_pos + t1 - 1
        for s0, s1, needs_mask in _blocks(p_first, p_last, S, s_block):
            x = (qm @ k[s0:s1].to(dt).t()).float().view(t1 - t0, H, s1 - s0)
            if k_scale is not None:
                x.mul_(k_scale[s0:s1])
            if needs_mask:
                qpos = p_first + torch.arange(t1 - t0, device=q.device)[:, None, None]
                x.masked_fill_(s0 + torch.arange(s1 - s0, device=q.device)[None, None, :] > qpos, float("-inf"))
            torch.logaddexp(out[t0:t1], x.logsumexp(-1), out=out[t0:t1])
    return out


def _merge(vals, idx, s, s0, topk):
    """Running top-k (vals, idx [Tc, R]) merged with block scores s [Tc, Sb] of keys s0.. (the
    Triton backend's streaming merge)."""
    R = vals.shape[1]
    cat = torch.cat([vals, s], dim=1)
    kk = min(topk, cat.shape[1])
    if kk == cat.shape[1]:  # everything fits: no selection needed yet
        pos = torch.arange(kk, device=s.device).expand(s.shape[0], kk)
        new_vals = cat
    else:
        new_vals, pos = cat.topk(kk, dim=1, sorted=False)
    from_run = pos < R
    new_idx = torch.where(from_run, idx.gather(1, pos.clamp(max=max(R - 1, 0))) if R else pos, pos - R + s0)
    return new_vals, new_idx
