"""The training-time attention pieces, written from the model's own modules (MLA.wq_a/q_norm/
wq_b/wkv_a/kv_norm/wkv_b, Indexer.queries/keys, the RoPE functions) with explicit scores, so
model/model.py stays inference-only: MLA's query/key/value (`mla_latent`, `mla_qkv`), the
lightning indexer's scores (`index_scores`, `query_scores`), the indexer's KL target and loss
(`attention_target`, `indexer_kl`, `topk_recall`) and the attention itself (`sdpa`).

The dense-masked stages (`dsa_rag.model.training.train`), the gathered sparse stage 2
(`dsa_rag.model.training.sparse_train`) and the cached indexer fit
(`dsa_rag.model.training.indexer_fit`) all build on these, so they compute the same scores.

    .venv/bin/python -m pytest -q tests/model/training
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsa_rag.model.model import combine_heads, head_lse, rope_interleaved


def index_scores(idx_mod, x, qr, cos, sin, rows=None):
    """Lightning-indexer scores I [B, T, S] (no mask) from the Indexer module's own pieces; with
    rows (query indices [R]) only those queries' scores [B, R, S]."""
    k, _ = idx_mod.keys(x, cos, sin)  # [B, S, D]
    q_pos = torch.arange(x.shape[1], device=x.device) if rows is None else rows
    if rows is not None:
        x, qr, cos, sin = x[:, rows], qr[:, rows], cos[:, rows], sin[:, rows]
    return query_scores(idx_mod, k, x, qr, cos, sin, q_pos)


def query_scores(idx_mod, k, x, qr, cos, sin, q_pos):
    """Indexer scores [B, T, S] of the queries at x/qr/cos/sin [B, T, ...] against keys k [B, S, D];
    q_pos [T]: each query's index in the key sequence (it sees keys 0..q_pos; the softmax_mixture
    score normalizes each head over those). Keys past q_pos get scores too: callers mask them."""
    q, w = idx_mod.queries(x, qr, cos, sin)  # [B, T, HI, D], [B, T, HI]
    dots = torch.einsum("bthd,bsd->bths", q.float(), k.float())
    score, lse = idx_mod.cfg.index_score, None
    if score == "softmax_mixture":
        lse = head_lse(dots, q_pos)
    return combine_heads(dots, w.float(), score, lse)


def mla_latent(attn, x, cos, sin):
    """MLA's query and compressed key/value from the module's own weights: x [B, T, dim] ->
    (qr [B, T, q_lora]: the query latent the indexer reads too, q [B, T, H, dn + dr] with RoPE on
    its last dr dims, c_kv [B, T, r]: the normalized latent, k_pe [B, T, dr]: the shared RoPE key)."""
    B, T, _ = x.shape
    H, dn, dr, r = attn.n_heads, attn.dn, attn.dr, attn.r
    qr = attn.q_norm(attn.wq_a(x))
    q = attn.wq_b(qr).view(B, T, H, dn + dr)
    q = torch.cat([q[..., :dn], rope_interleaved(q[..., dn:], cos, sin)], -1)
    kv = attn.wkv_a(x)
    return qr, q, attn.kv_norm(kv[..., :r]), rope_interleaved(kv[..., r:], cos, sin)


def mla_qkv(attn, x, cos, sin):
    """MLA in its MHA form: x [B, T, dim] -> (qr [B, T, q_lora], q [B, H, T, dqk], k [B, H, T, dqk],
    v [B, H, T, dv])."""
    B, T, _ = x.shape
    H, dn, dr, dv = attn.n_heads, attn.dn, attn.dr, attn.dv
    qr, q, c_kv, k_pe = mla_latent(attn, x, cos, sin)
    kvb = attn.wkv_b(c_kv).view(B, T, H, dn + dv)
    k = torch.cat([kvb[..., :dn], k_pe[:, :, None].expand(B, T, H, dr)], -1).transpose(1, 2)
    return qr, q.transpose(1, 2), k, kvb[..., dn:].transpose(1, 2)



@torch.no_grad()
def attention_target(q, k, allowed, scale):
    """The indexer's target p_t: the attention over the allowed keys, summed over heads and
    L1-normalized. q [B, H, T, D], k [B, H, S, D], allowed broadcastable to [B, H, T, S]. It is
    detached, so it is computed without a graph."""
    logits = torch.einsum("bhtd,bhsd->bhts", q, k).float() * scale
    p = logits.masked_fill(~allowed, float("-inf")).softmax(-1).sum(1)
    del logits
    return p / p.sum(-1, keepdim=True).clamp_min(1e-20)


def indexer_kl(p, I, sel, causal, topk, stats):
    """KL(p || softmax(I)) over the set sel, per query, into stats['kl']; recall bookkeeping."""
    logq = I.masked_fill(~sel, float("-inf")).log_softmax(-1)
    kl = torch.where(sel & (p > 0), p * (p.clamp_min(1e-20).log() - logq), torch.zeros_like(p)).sum(-1)  # [B, T]
    stats.setdefault("kl", []).append(kl)
    if stats.get("want_recall"):
        rec, mass = topk_recall(p, I.detach(), causal, topk)
        stats.setdefault("recall", []).append(rec)
        stats.setdefault("mass", []).append(mass)


def sdpa(q, k, v, mask, scale):
    """Causal (mask None) or masked attention. v is zero-padded to q's head dim so the CPU flash
    kernel applies (it needs equal head dims; ~3-8x faster than the math path with backward)."""
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return o[..., :dv]


@torch.no_grad()
def topk_recall(p, I, causal, topk):
    """Over queries with more than topk causal keys: (mean |topk(I) & topk(p)| / topk, mean
    attention mass p that topk(I) covers). p, I [B, T, S]; nan when no query has > topk keys."""
    B, T, S = p.shape
    rows = causal.sum(-1) > topk
    if not rows.any():
        return float("nan"), float("nan")
    pr = p[:, rows]
    pi = pr.masked_fill(~causal[rows], -1.0).topk(topk, -1)[1]
    ii = I[:, rows].topk(topk, -1)[1]
    a = torch.zeros_like(pr, dtype=torch.bool).scatter_(-1, pi, True)
    b = torch.zeros_like(a).scatter_(-1, ii, True)
    return float((a & b).sum(-1).float().mean() / topk), float(pr.gather(-1, ii).sum(-1).mean())


