"""Lightning indexer ops (DSA): index scores and streaming top-k selection.

    indexer_logits(q, k, w, *, k_scale=None, start_pos=0, score="relu") -> fp32 [T, S]
    indexer_topk(q, k, w, topk, *, k_scale=None, start_pos=0, score="relu") -> int32 [T, topk]
        (score also "softmax_mixture": the mixture of w - indexer_head_lse, in one call)
    indexer_head_lse(q, k, *, k_scale=None, start_pos=0) -> fp32 [T, H]   (softmax_mixture's normalizers)
    indexer_decode_topk(q, k, w, topk, *, k_scale=None, tails=None, tail_scales=None, score="relu")
        -> int32 [B, topk]   (B decoding queries over one shared key prefix plus their own tails)

Backends: naive.py (fp32 reference), torch_impl.py (fast CPU), triton.py (GPU / interpreter);
chosen by kernels/dispatch.py. Equations and layouts: kernels/README.md.
Test: .venv/bin/python -m pytest -q tests/kernels/test_indexer.py
"""

from __future__ import annotations

import torch

from dsa_rag.kernels import dispatch
from dsa_rag.kernels.checks import FLOAT_DTYPES, FP8_DTYPES, check_tensor, is_fp8

__all__ = ["indexer_decode_topk", "indexer_head_lse", "indexer_logits", "indexer_topk"]


SCORES = ("relu", "mixture")
TOPK_SCORES = SCORES + ("softmax_mixture",)


def _validate(q, k, w, k_scale, start_pos, score, scores=SCORES):
    if score not in scores:
        raise ValueError(f"score: expected one of {scores}, got {score!r}")
    if score != "relu" and is_fp8(q):
        raise ValueError(f"score={score!r} (a mixture) needs bf16/fp16/fp32 q and k: FP8 q's per-head scale would have to "
                         "multiply each head's dot product, which w (added in log space) cannot carry")
    check_tensor("q", q, ("T", "H", "D"), FLOAT_DTYPES + FP8_DTYPES)
    T, H, D = q.shape
    k_dtypes = FP8_DTYPES if is_fp8(q) else FLOAT_DTYPES
    check_tensor("k", k, ("S", D), k_dtypes, q.device)
    check_tensor("w", w, (T, H), FLOAT_DTYPES, q.device)
    if k_scale is not None:
        check_tensor("k_scale", k_scale, (k.shape[0],), (torch.float32,), q.device)
    if not isinstance(start_pos, int) or start_pos < 0:
        raise ValueError(f"start_pos: expected an int >= 0, got {start_pos!r}")


def indexer_logits(q, k, w, *, k_scale=None, start_pos=0, score="relu"):
    """Index scores of every (query, key) pair, causal.

    Args:
        q: [T, H, D] bf16/fp16/fp32, or float8_e4m3fn (then k must be FP8 too). Query t sits at
           absolute position start_pos + t.
        k: [S, D] indexer keys (one head shared by all query heads), same dtype family as q.
        w: [T, H] fp32 head weights; holds every scale except k's (q's FP8 scale, 1/sqrt(H*D)...).
        k_scale: [S] fp32 per-key dequant scale (>= 0), or None (= 1).
        start_pos: absolute position of query 0.
        score: how heads combine. "relu" (V3.2): w holds the head weights. "mixture": w holds
           log-weights and q any 1/sqrt(D) (float q/k only).
    Returns:
        fp32 [T, S], -inf where s > start_pos + t, else with d = q[t, h] . k[s] * k_scale[s]:
        "relu": out[t, s] = sum_h w[t, h] * ReLU(d);  "mixture": out[t, s] = log sum_h exp(w[t, h] + d).
    """
    _validate(q, k, w, k_scale, start_pos, score)
    return dispatch.call("indexer", "indexer_logits", q, k, w, k_scale=k_scale, start_pos=start_pos, score=score)


def indexer_topk(q, k, w, topk, *, k_scale=None, start_pos=0, score="relu"):
    """Top-`topk` keys per query by the index score of `indexer_logits` (same arguments).

    Streams over S in blocks (the torch and triton backends never hold [T, S]).
    Returns int32 [T, topk]: key indices sorted by DESCENDING score (ties either way);
    a row with fewer than `topk` causal keys (or S < topk) is padded at the end with -1.

    score="softmax_mixture" (w: the heads' raw log-weights b) ranks as score="mixture" with
    w - indexer_head_lse(q, k, ...): each head's softmax over the causal keys, mixed with weights
    softmax(b). The torch backend fuses the two passes per chunk of queries and ranks in
    probability space (no max and no log per key; keys whose every head's probability underflows
    fp32 tie at 0); the others compose the two ops.
    """
    _validate(q, k, w, k_scale, start_pos, score, TOPK_SCORES)
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected an int >= 1, got {topk!r}")
    return dispatch.call("indexer", "indexer_topk", q, k, w, topk, k_scale=k_scale, start_pos=start_pos, score=score)


def indexer_head_lse(q, k, *, k_scale=None, start_pos=0):
    """Each head's log-normalizer over the query's causal keys (float q/k only):
    out[t, h] = log sum_{s <= start_pos + t} exp(q[t, h] . k[s] * k_scale[s]), fp32 [T, H].

    The "softmax_mixture" indexer subtracts it from the heads' log-weights and then ranks with
    score="mixture": a second pass over the keys, since a key's rank needs every head's final
    normalizer (indexer_topk(score="softmax_mixture") does both). Streams over S like indexer_topk
    (torch; the triton backend runs the same torch code, a GEMM and a logsumexp per key block).
    A query with no causal key gets -inf.
    """
    _validate(q, k, q.new_zeros(q.shape[:2], dtype=torch.float32), k_scale, start_pos, "mixture")
    return dispatch.call("indexer", "indexer_head_lse", q, k, k_scale=k_scale, start_pos=start_pos)


def indexer_decode_topk(q, k, w, topk, *, k_scale=None, tails=None, tail_scales=None, score="relu"):
    """Top-`topk` keys of B decoding queries (one query per row) in ONE call: row b sees every key
    of the shared prefix `k` and then its own `tails[b]`, so the B rows of a decode step over one
    pack read the pack's keys once (the torch backend does one GEMM for all rows' heads).

    Args:
        q: [B, H, D] (dtypes as indexer_topk); w: [B, H] fp32; k: [P, D] shared prefix keys
           (P may be 0), k_scale: [P] fp32 or None.
        tails: None (no own keys) or a sequence of B key tensors [n_b, D] (n_b may be 0), in k's
           dtype; tail_scales: None or B tensors [n_b] fp32 (required iff k_scale is given).
        score: "relu", "mixture" or "softmax_mixture", as indexer_topk.
    Returns:
        int32 [B, topk]: indices into row b's keys cat(k, tails[b]) (0..P-1 the prefix, P.. its
        tail), by DESCENDING score, padded with -1. Every key is causal for a decoding query, so
        row b equals indexer_topk(q[b:b+1], cat(k, tails[b]), w[b:b+1], topk,
        start_pos=P + n_b - 1) up to ties.
    """
    check_tensor("q", q, ("B", "H", "D"), FLOAT_DTYPES + FP8_DTYPES)
    B = q.shape[0]
    check_tensor("w", w, (B, q.shape[1]), FLOAT_DTYPES, q.device)
    _validate(q, k, w, k_scale, 0, score, TOPK_SCORES)  # rows as the queries of one call
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected an int >= 1, got {topk!r}")
    tails, tail_scales = _check_tails(q, k, B, k_scale, tails, tail_scales)
    return dispatch.call("indexer", "indexer_decode_topk", q, k, w, topk, k_scale=k_scale, tails=tails,
                         tail_scales=tail_scales, score=score)


def _check_tails(q, k, B, k_scale, tails, tail_scales):
    """The per-row tails as lists (validated), or None."""
    if tails is None:
        if tail_scales is not None:
            raise ValueError("tail_scales without tails")
        return None, None
    tails = list(tails)
    if len(tails) != B:
        raise ValueError(f"tails: expected {B} tensors (one per query row), got {len(tails)}")
    for b, t in enumerate(tails):
        check_tensor(f"tails[{b}]", t, ("n", k.shape[1]), (k.dtype,), q.device)
    if (k_scale is None) != (tail_scales is None):
        raise ValueError("tail_scales must be given exactly when k_scale is")
    if tail_scales is not None:
        tail_scales = list(tail_scales)
        if len(tail_scales) != B:
            raise ValueError(f"tail_scales: expected {B} tensors, got {len(tail_scales)}")
        for b, (t, s) in enumerate(zip(tails, tail_scales)):
            check_tensor(f"tail_scales[{b}]", s, (t.shape[0],), (torch.float32,), q.device)
    return tails, tail_scales
