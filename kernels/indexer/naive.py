"""Lightning-indexer reference: pure PyTorch, fp32 math, readable, materializes [T, S].

This is the oracle every other indexer backend is tested against (tests/kernels/test_indexer.py).
Same signatures as the public ops in `dsa_rag.kernels.indexer`; no validation here (the public op does it).

    out[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s] * k_scale[s])      (s <= start_pos + t, else -inf)
    score="mixture":  out[t, s] = log sum_h exp(w[t, h] + q[t, h] . k[s] * k_scale[s])
    indexer_head_lse:  out[t, h] = log sum_{s <= start_pos + t} exp(q[t, h] . k[s] * k_scale[s])
    indexer_topk score="softmax_mixture": the "mixture" top-k of w - indexer_head_lse
    indexer_decode_topk: row b = indexer_topk of query b over cat(k, tails[b]) at its last position

Run the tests:  .venv/bin/python -m pytest -q tests/kernels -k indexer
"""

from __future__ import annotations

import torch


def indexer_logits(q, k, w, *, k_scale=None, start_pos=0, score="relu"):
    """q [T, H, D], k [S, D], w [T, H] fp32, k_scale [S] or None -> fp32 [T, S] (causal -inf)."""
    T, S = q.shape[0], k.shape[0]
    qf, kf, wf = q.float(), k.float(), w.float()
    dots = torch.einsum("thd,sd->ths", qf, kf)  # [T, H, S]
    if k_scale is not None:
        dots = dots * k_scale.float()[None, None, :]
    if score == "mixture":
        out = (dots + wf[:, :, None]).logsumexp(1)  # [T, S]
    else:
        out = torch.einsum("th,ths->ts", wf, torch.relu(dots))  # [T, S]
    q_pos = start_pos + torch.arange(T, device=q.device)[:, None]  # absolute position of each query
    k_pos = torch.arange(S, device=q.device)[None, :]
    return out.masked_fill(k_pos > q_pos, float("-inf"))


def indexer_topk(q, k, w, topk, *, k_scale=None, start_pos=0, score="relu"):
    """Top-`topk` key indices per query -> int32 [T, topk], descending score, -1 padded.
    score="softmax_mixture": the "mixture" ranking of w minus each head's log-normalizer."""
    if score == "softmax_mixture":
        w, score = w.float() - indexer_head_lse(q, k, k_scale=k_scale, start_pos=start_pos), "mixture"
    scores = indexer_logits(q, k, w, k_scale=k_scale, start_pos=start_pos, score=score)  # [T, S]
    T, S = scores.shape
    if topk > S:  # pad with -inf columns so torch.topk has enough candidates
        scores = torch.cat([scores, scores.new_full((T, topk - S), float("-inf"))], dim=1)
    vals, idx = scores.topk(topk, dim=-1, sorted=True)
    idx = idx.masked_fill(vals == float("-inf"), -1)
    return idx.to(torch.int32)


def indexer_head_lse(q, k, *, k_scale=None, start_pos=0):
    """Each head's log-normalizer over the causal keys -> fp32 [T, H]."""
    T, S = q.shape[0], k.shape[0]
    dots = torch.einsum("thd,sd->ths", q.float(), k.float())  # [T, H, S]
    if k_scale is not None:
        dots = dots * k_scale.float()[None, None, :]
    q_pos = start_pos + torch.arange(T, device=q.device)[:, None, None]
    k_pos = torch.arange(S, device=q.device)[None, None, :]
    return dots.masked_fill(k_pos > q_pos, float("-inf")).logsumexp(-1)


def indexer_decode_topk(q, k, w, topk, *, k_scale=None, tails=None, tail_scales=None, score="relu"):
    """B decoding queries [B, H, D], each over cat(k, tails[b]) (all causal) -> int32 [B, topk]."""
    rows = []
    for b in range(q.shape[0]):
        kb = k if tails is None else torch.cat([k, tails[b]])
        ksb = k_scale if tails is None or k_scale is None else torch.cat([k_scale, tail_scales[b]])
        rows.append(indexer_topk(q[b: b + 1], kb, w[b: b + 1], topk, k_scale=ksb, start_pos=max(kb.shape[0] - 1, 0),
                                 score=score))
    return torch.cat(rows) if rows else torch.empty(0, topk, dtype=torch.int32, device=q.device)
