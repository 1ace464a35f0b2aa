"""Lightning-indexer top-k for decoding queries, fast CPU PyTorch path (one query per row).

    decode_topk(q [B, H, D], k [P, D], w [B, H], topk, *, k_scale, tails, tail_scales, score)
        -> int32 [B, topk]

Row b is one decoding query that sees every key of the shared prefix k (P keys) and then its
own `tails[b]` (the question and the tokens it generated so far). The B rows of a decode step
over one pack share the pack's keys, so their dots come out of ONE GEMM [B*H, D] x [D, P]: the
keys are read once for all rows, and the GEMM's small-N inefficiency (8 heads = 8 columns runs
at ~1/4 of the CPU's GEMM peak here) is amortized over B*H columns.

Per row chunk (B_c * H * P fp32 logits within ROW_BUDGET):
  1. L = dots [B_c, H, P] in one GEMM (key blocks only when keys need an upcast: bf16 on a CPU
     without native bf16, FP8); the tails' dots are small GEMMs per row;
  2. "relu": scores = w . ReLU(L) (one bmm), times k_scale;
     mixtures: one fused in-place pass per head: max, exp(L - max), sum (each head's normalizer
     z), then scores = c . exp(L - max) with c_h = softmax(w)_h / z_h ("softmax_mixture") or
     exp(w_h + max_h - max_h'(w + max)) ("mixture"): probabilities, not logs, so no log per key.
     No per-block references or rescaling: the whole row's max is known before the exp;
  3. top-k over [B_c, P + max tail] by group maxima (row_topk.py, exact), sorted, -1 padded.

Against the prefill path (torch_impl.indexer_topk, which this replaces for T = 1): the same
ranking and the same top-k sets (ties either way; keys whose every head underflows fp32 tie at
0, as there), without the 4096-key blocks' per-block max, reference juggling and ~15 small ops
per block. Test: .venv/bin/python -m pytest -q tests/kernels/test_indexer_decode.py
Bench:  .venv/bin/python benchmarks/decode_selection_ab.py
"""

from __future__ import annotations

import torch

from dsa_rag.kernels.precision import lowp_math_dtype
from dsa_rag.kernels.indexer.row_topk import sorted_topk

ROW_BUDGET = 1 << 24  # fp32 logits of one row chunk, B_c * H * P elements (64 MiB)
UPCAST_BLOCK = 1 << 14  # keys per GEMM when keys are upcast to the math dtype


def _math_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float32 if q.dtype == torch.float32 else lowp_math_dtype(q)


def _dots_into(out: torch.Tensor, qm: torch.Tensor, k: torch.Tensor, dt: torch.dtype) -> None:
    """out [R, P] fp32 <- qm [R, D] . k[P, D]^T: one GEMM when k is already in dt (fp32), else
    key blocks upcast one at a time (never a whole-cache copy)."""
    P = k.shape[0]
    if P == 0:
        return
    if k.dtype == dt == torch.float32:
        torch.mm(qm, k.t(), out=out)
        return
    for s0 in range(0, P, UPCAST_BLOCK):
        s1 = min(P, s0 + UPCAST_BLOCK)
        out[:, s0:s1] = (qm @ k[s0:s1].to(dt).t()).float()


def decode_topk(q, k, w, topk, *, k_scale=None, tails=None, tail_scales=None, score="relu"):
    B, H, D = q.shape
    P = k.shape[0]
    tails = list(tails) if tails is not None else [k.new_zeros(0, D)] * B
    tail_scales = list(tail_scales) if tail_scales is not None else [None] * B
    dt = _math_dtype(q)
    out = torch.empty(B, topk, dtype=torch.int32, device=q.device)
    bc = max(1, ROW_BUDGET // max(1, H * P))
    logits = torch.empty(min(bc, B) * H * P, dtype=torch.float32, device=q.device)
    with torch.no_grad():
        for b0 in range(0, B, bc):
            b1 = min(B, b0 + bc)
            L = logits[: (b1 - b0) * H * P].view(b1 - b0, H, P)
            _dots_into(L.view((b1 - b0) * H, P), q[b0:b1].reshape(-1, D).to(dt), k, dt)
            if k_scale is not None:
                L.mul_(k_scale)
            tl = [_tail_dots(q[b], tails[b], tail_scales[b], dt) for b in range(b0, b1)]
            scores = _scores(L, tl, w[b0:b1].float(), score)
            out[b0:b1] = sorted_topk(scores, topk)
    return out


def _tail_dots(qb, kt, ks, dt):
    """fp32 [H, n] dots of one row's query heads with its own tail keys."""
    x = (qb.to(dt) @ kt.to(dt).t()).float()
    return x if ks is None else x * ks


def _scores(L, tails, w, score):
    """fp32 [B_c, P + max n] ranking scores (-inf on padding), from the prefix dots L [B_c, H, P]
    (consumed in place) and each row's tail dots [H, n_b]."""
    Bc, H, P = L.shape
    n_max = max((t.shape[1] for t in tails), default=0)
    scores = L.new_full((Bc, P + n_max), float("-inf"))
    if score == "relu":
        scores[:, :P] = torch.bmm(w[:, None, :], L.relu_())[:, 0]
        for b, t in enumerate(tails):
            scores[b, P: P + t.shape[1]] = w[b] @ t.relu()
        return scores
    # mixtures: each head's max over ALL its keys (prefix and tail) first, then one exp pass
    m = L.amax(-1) if P else L.new_full((Bc, H), float("-inf"))
    for b, t in enumerate(tails):
        if t.shape[1]:
            m[b] = torch.maximum(m[b], t.amax(-1))
    m = m.nan_to_num(neginf=0.0)  # a row without keys: nothing to rank, keep the math finite
    z = L.sub_(m[:, :, None]).exp_().sum(-1)
    te = [(t - m[b, :, None]).exp() for b, t in enumerate(tails)]
    for b, e in enumerate(te):
        z[b] += e.sum(-1)
    c = head_weights(w, m, z, score)
    scores[:, :P] = torch.bmm(c[:, None, :], L)[:, 0]
    for b, e in enumerate(te):
        scores[b, P: P + e.shape[1]] = c[b] @ e
    return scores


def head_weights(w, m, z, score):
    """c [B, H]: a key's ranking score is sum_h c_h exp(dot_h - m_h), with m_h each head's max over
    the row's keys and z_h its sum of exp(dot_h - m_h). "softmax_mixture": softmax(w)_h / z_h (up
    to a row factor); "mixture" (log sum_h exp(w_h + dot_h)): exp(w_h + m_h - max_h'(w + m))."""
    if score == "softmax_mixture":
        return (w - w.amax(-1, keepdim=True)).exp().div_(z)
    a = w + m
    return (a - a.amax(-1, keepdim=True)).exp()
