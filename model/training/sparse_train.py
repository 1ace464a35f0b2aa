"""Stage 2's training attention in O(T * k) memory, for real long contexts on a CPU (or a GPU).

`dsa_rag.model.training.train`'s stage-2 attention masks a dense [B, H, T, T] score matrix to the indexer's top-k:
8 GiB per layer at 16k tokens, so it fits only short (PoSE-stretched) examples. Here
each query row gathers its k selected keys instead, in row chunks:

  1. selection (no grad): the indexer scores a chunk of rows against every causal key and keeps
     the top-k (the same scores `dsa_rag.model.training.attention.query_scores` gives, so the same keys);
  2. attention, MLA in its absorbed form (what FlashMLA's sparse prefill computes): the query's
     nope part is folded through wkv_b's key half, so the scores and the output read only the
     gathered 128-dim latent c_kv and the 16-dim rope key of the k selected keys;
  3. the indexer's KL over the selected set against the attention summed over heads, with the
     indexer's input detached (stage 2 of the V3.2 recipe, as `dsa_rag.model.training.attention.indexer_kl`).

Steps 2 and 3 run under activation checkpointing per chunk: a chunk's gathered keys live only
while it is computed (forward and again in backward), so memory grows with T * k, not T^2.
`tests/model/training/test_sparse_train.py` checks the loss and every gradient against the dense-masked
stage 2 of `dsa_rag.model.training.train` on short contexts.

    .venv/bin/python -m dsa_rag.model.training.train --stage 2 --sparse-chunk 1024 --len 8192:16384 --tokens 16384 \\
        --init tmp/run/s1 --out tmp/run/s2
    .venv/bin/python -m pytest -q tests/model/training/test_sparse_train.py
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dsa_rag.model.model import combine_heads, head_lse
from dsa_rag.model.training.attention import mla_latent, query_scores


@torch.no_grad()
def select_topk(idx_mod, keys, x, qr, cos, sin, topk: int, chunk: int):
    """-> (idx [B, T, k] long, valid [B, T, k] bool): each row's top-k causal keys by the indexer,
    keys [B, T, D] its key cache (k = min(topk, T)); a row with fewer causal keys than k has its
    extra slots marked invalid."""
    B, T, _ = x.shape
    k = min(topk, T)
    s_pos = torch.arange(T, device=x.device)
    out = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        I = query_scores(idx_mod, keys, x[:, t0:t1], qr[:, t0:t1], cos[:, t0:t1], sin[:, t0:t1], s_pos[t0:t1])  # [B, c, T]
        I = I.masked_fill(s_pos[None, None] > s_pos[t0:t1, None], float("-inf"))
        out.append(I.topk(k, -1)[1])
    idx = torch.cat(out, 1)
    return idx, idx <= s_pos[None, :, None]


def _gather(src, idx):
    """src [B, S, D], idx [B, c, k] -> [B, c, k, D]."""
    B, c, k = idx.shape
    return src.gather(1, idx.reshape(B, c * k, 1).expand(-1, -1, src.shape[-1])).view(B, c, k, -1)


def _attend(q_abs, q_pe, c_kv, k_pe, idx, valid, w_uv, scale):
    """Absorbed MLA over the gathered keys of one row chunk -> (o [B, c, H, dv], p [B, c, k]: the
    attention summed over heads and L1-normalized, detached: the indexer's target)."""
    ckv, kpe = _gather(c_kv, idx), _gather(k_pe, idx)  # [B, c, k, r], [B, c, k, dr]
    logits = (torch.einsum("bchr,bckr->bchk", q_abs, ckv) + torch.einsum("bchd,bckd->bchk", q_pe, kpe)) * scale
    probs = logits.masked_fill(~valid[:, :, None], float("-inf")).softmax(-1)
    o = torch.einsum("bchr,hvr->bchv", torch.einsum("bchk,bckr->bchr", probs, ckv), w_uv)
    p = probs.detach().sum(2)
    return o, p / p.sum(-1, keepdim=True).clamp_min(1e-20)


def _indexer_kl(idx_mod, keys, x, qr, cos, sin, idx, valid, p, q_pos):
    """KL(p || softmax(I)) over each row's selected keys -> [B, c]. keys: the indexer keys [B, S, D];
    q_pos [c]: the rows' indices (softmax_mixture normalizes each head over all their causal keys)."""
    q, w = idx_mod.queries(x, qr, cos, sin)  # [B, c, HI, D], [B, c, HI]
    dots = torch.einsum("bchd,bckd->bchk", q.float(), _gather(keys.float(), idx))
    lse = None
    if idx_mod.cfg.index_score == "softmax_mixture":
        every = torch.einsum("bchd,bsd->bchs", q.float(), keys.float())
        lse = head_lse(every, q_pos)
    I = combine_heads(dots, w.float(), idx_mod.cfg.index_score, lse)
    logq = I.masked_fill(~valid, float("-inf")).log_softmax(-1)
    return torch.where(valid & (p > 0), p * (p.clamp_min(1e-20).log() - logq), torch.zeros_like(p)).sum(-1)


def mla_sparse_train(attn, x, cos, sin, stats: dict, chunk: int):
    """Stage-2 MLA forward for training, x [B, T, dim] -> [B, T, dim]; appends the indexer's KL
    per row [B, T] to stats['kl'] (as `dsa_rag.model.training.train.mla_train` does)."""
    B, T, _ = x.shape
    H, dn, dv, r = attn.n_heads, attn.dn, attn.dv, attn.r
    qr, q, c_kv, k_pe = mla_latent(attn, x, cos, sin)
    w_b = attn.wkv_b.weight.view(H, dn + dv, r)
    q_abs = torch.einsum("bthd,hdr->bthr", q[..., :dn], w_b[:, :dn])  # the key half of wkv_b folded in
    q_pe = q[..., dn:]
    # The indexer sees detached inputs: it learns from its KL only, never moves the main model.
    xd, qrd = x.detach(), qr.detach()
    ikeys, _ = attn.indexer.keys(xd, cos, sin)
    idx, valid = select_topk(attn.indexer, ikeys.detach(), xd, qrd, cos, sin, attn.cfg.index_topk, chunk)
    outs, kls = [], []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        sl = slice(t0, t1)
        o, p = checkpoint(_attend, q_abs[:, sl], q_pe[:, sl], c_kv, k_pe, idx[:, sl], valid[:, sl], w_b[:, dn:],
                          attn.scale, use_reentrant=False)
        outs.append(o)
        kls.append(checkpoint(_indexer_kl, attn.indexer, ikeys, xd[:, sl], qrd[:, sl], cos[:, sl], sin[:, sl],
                              idx[:, sl], valid[:, sl], p, torch.arange(t0, t1, device=x.device), use_reentrant=False))
    stats.setdefault("kl", []).append(torch.cat(kls, 1))
    return attn.wo(torch.cat(outs, 1).reshape(B, T, H * dv))
