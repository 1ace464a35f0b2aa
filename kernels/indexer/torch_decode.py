"""Lightning-indexer top-k for decoding queries, fast CPU PyTorch path (one query per row).

    decode_topk(q [B, H, D], k [P, D], w [B, H], topk, *, k_scale, tails, tail_scales, score)
        -> int32 [B, topk]

Row b is one decoding query that sees every key of the shared prefix k (P keys) and then its
own `tails[b]` (the question and the tokens it generated so far). The B rows of a decode step
over one pack share the pack's keys, so their dots come out of ONE product [P, D] x [D, B*H]:
the keys are read once for all rows. That product is a stream over the keys with a skinny
right-hand side, which MKL's sgemm runs at ~1/4 of its peak here; fp32 on x86 takes the AVX2
loop of cpu_dots.py instead (~1.8x faster), torch.mm elsewhere.

Per row chunk (P * B_c * H fp32 logits within ROW_BUDGET), key-major (row s = key s's dots):
  1. L = dots [P, B_c * H] in one pass over the keys (key blocks only when keys need an upcast:
     bf16 on a CPU without native bf16, FP8); the tails' dots are small GEMMs per row;
  2. "relu": scores = ReLU(L) . w per row (a matrix-vector product over its H columns);
     mixtures: each head's max (from the AVX2 product, else a folded column max), then in place
     exp(L - max) (no shift when every max is in [0, EXP_SAFE]) and its sum, each head's
     normalizer z; scores = exp(L - max) . c per row with c_h = softmax(w)_h / z_h
     ("softmax_mixture") or exp(w_h + max_h - max_h'(w + max)) ("mixture"): probabilities, not
     logs, so no log per key. No per-block references: the row's max is known before the exp;
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
from dsa_rag.kernels.indexer import cpu_dots
from dsa_rag.kernels.indexer.row_topk import sorted_topk

ROW_BUDGET = 1 << 24  # fp32 logits of one row chunk, B_c * H * P elements (64 MiB)
UPCAST_BLOCK = 1 << 14  # keys per GEMM when keys are upcast to the math dtype
EXP_SAFE = 80.0  # exp(x) is finite in fp32 up to ~88.7: heads whose max dot is in [0, 80] need no shift


def _math_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float32 if q.dtype == torch.float32 else lowp_math_dtype(q)


def _dots_into(out: torch.Tensor, k: torch.Tensor, qm: torch.Tensor, dt: torch.dtype) -> torch.Tensor | None:
    """out [P, R] fp32 <- k [P, D] . qm [R, D]^T, key-major: the AVX2 extension for fp32 math on
    x86 (cpu_dots.py; it also returns each column's max [R]), else one GEMM when k is already in
    dt; keys in another dtype (bf16, FP8) are upcast one block at a time (never a whole-cache
    copy). Returns the column maxima when they came for free, else None."""
    P = k.shape[0]
    if P == 0:
        return None
    if k.dtype == dt == torch.float32:
        mx = cpu_dots.dots_into(out, k, qm)
        if mx is None:
            torch.mm(k, qm.t(), out=out)
        return mx
    maxima = []
    for s0 in range(0, P, UPCAST_BLOCK):
        s1 = min(P, s0 + UPCAST_BLOCK)
        kb = k[s0:s1].to(dt)
        m = cpu_dots.dots_into(out[s0:s1], kb, qm) if dt == torch.float32 else None
        if m is None:
            out[s0:s1] = (kb @ qm.t()).float()
        maxima.append(m)
    return None if any(m is None for m in maxima) else torch.stack(maxima).amax(0)


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
            L = logits[: P * (b1 - b0) * H].view(P, (b1 - b0) * H)  # key-major: row s = key s's dots
            mx = _dots_into(L, k, q[b0:b1].reshape(-1, D).to(dt), dt)
            if k_scale is not None:
                L.mul_(k_scale[:, None])
                mx = None  # the maxima of the unscaled dots
            tl = [_tail_dots(q[b], tails[b], tail_scales[b], dt) for b in range(b0, b1)]
            scores = _scores(L, tl, w[b0:b1].float(), score, mx)
            out[b0:b1] = sorted_topk(scores, topk)
    return out


def _tail_dots(qb, kt, ks, dt):
    """fp32 [n, H] dots of one row's own tail keys with its query heads (key-major)."""
    x = (kt.to(dt) @ qb.to(dt).t()).float()
    return x if ks is None else x * ks[:, None]


def _scores(L, tails, w, score, colmax=None):
    """fp32 [B_c, P + max n] ranking scores (-inf on padding), from the prefix dots L [P, B_c * H]
    (key-major, consumed in place; `colmax` its column maxima when known) and each row's tail dots
    [n_b, H]. Per row, the head combine is one matrix-vector product over its H columns of L.
    The mixtures exponentiate relative to a reference r per head: each head's max over all its keys,
    or 0 when every head's max lies in [0, EXP_SAFE] (then exp(dot) neither overflows nor underflows
    earlier than exp(dot - max) would, and the subtraction pass is skipped)."""
    P = L.shape[0]
    Bc, H = w.shape
    n_max = max((t.shape[0] for t in tails), default=0)
    scores = L.new_full((Bc, P + n_max), float("-inf"))
    cols = [slice(b * H, (b + 1) * H) for b in range(Bc)]
    if score == "relu":
        L.relu_()
        for b, t in enumerate(tails):
            scores[b, :P] = L[:, cols[b]] @ w[b]
            scores[b, P: P + t.shape[0]] = t.relu() @ w[b]
        return scores
    # mixtures: each head's max over ALL its keys (prefix and tail) first, then one exp pass
    if not P:
        m = L.new_full((Bc, H), float("-inf"))
    else:
        m = (colmax if colmax is not None else _colmax(L)).view(Bc, H).clone()
    for b, t in enumerate(tails):
        if t.shape[0]:
            m[b] = torch.maximum(m[b], t.amax(0))
    m = m.nan_to_num(neginf=0.0)  # a row without keys: nothing to rank, keep the math finite
    if bool(((m >= 0) & (m <= EXP_SAFE)).all()):
        m = torch.zeros_like(m)  # exp(dot) is safe as it is: no subtraction pass over L
        z = L.exp_().sum(0).view(Bc, H)
    else:
        z = L.sub_(m.view(1, -1)).exp_().sum(0).view(Bc, H)
    te = [(t - m[b]).exp() for b, t in enumerate(tails)]
    for b, e in enumerate(te):
        z[b] += e.sum(0)
    c = head_weights(w, m, z, score)
    for b, e in enumerate(te):
        scores[b, :P] = L[:, cols[b]] @ c[b]
        scores[b, P: P + e.shape[0]] = e @ c[b]
    return scores


def _colmax(L, fold: int = 64):
    """Each column's max of the key-major L [P, R]. L.amax(0) reduces over the long axis with only
    R (8..64) values per row, which torch does ~20x slower than a reduction over wide rows: fold
    `fold` keys into each row first ([P / fold, fold * R]), then reduce the fold."""
    P, R = L.shape
    n = P // fold * fold
    m = L[:n].view(P // fold, fold * R).amax(0).view(fold, R).amax(0) if n else L.new_full((R,), float("-inf"))
    return torch.maximum(m, L[n:].amax(0)) if n < P else m


def head_weights(w, m, z, score):
    """c [B, H]: a key's ranking score is sum_h c_h exp(dot_h - m_h), with m_h each head's max over
    the row's keys and z_h its sum of exp(dot_h - m_h). "softmax_mixture": softmax(w)_h / z_h (up
    to a row factor); "mixture" (log sum_h exp(w_h + dot_h)): exp(w_h + m_h - max_h'(w + m))."""
    if score == "softmax_mixture":
        return (w - w.amax(-1, keepdim=True)).exp().div_(z)
    a = w + m
    return (a - a.amax(-1, keepdim=True)).exp()
