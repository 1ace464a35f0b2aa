"""Parallel modules, after DeepSeek's reference inference/model.py (ColumnParallelLinear,
RowParallelLinear, ParallelEmbedding, experts split by rank), written for this model's classes.

Each parallel class either replaces a module (the linears, embedding, head) or subclasses one of
model.py's and is swapped in by `shard.py` by setting `__class__` on the built module, so the
module keeps every attribute and weight model.py gave it and only the methods below change:

  ColumnParallelLinear   out features sliced; no communication (its consumer is per-head)
  RowParallelLinear      in features sliced; all-reduce of the partial outputs
  VocabParallelEmbedding rows [v0, v1) of the vocabulary; others' tokens give 0; all-reduce
  ParallelHead           logits of rows [v0, v1); all-gather -> the full vocabulary on every rank
  ParallelIndexer        this rank's indexer query heads (scale kept for the GLOBAL head count)
  ParallelMLA            this rank's attention heads; the index score combined over ranks before top-k
  ParallelMoE            this rank's experts (EP) or expert slices (TP); one all-reduce per layer

Why an all-reduce and not an all-to-all for the experts: with tensor-parallel attention every rank
already holds every token's hidden state (replicated activations), so each rank routes all tokens
itself, runs them through its own experts and the partial sums meet in one all-reduce of [N, dim]
per MoE layer (what DeepSeek's reference does). An all-to-all dispatch pays off when ranks hold
*different* tokens (data-parallel attention), which this replica layout does not have.

Index scores over ranks (the indexer's heads are split like the attention's): the score combines
heads by a sum ("relu", V3.2) or a logsumexp ("mixture", "softmax_mixture"), so top-k needs every
head's contribution first. Two ways, both here:
  * gather queries (the default): all-gather the [T, H/tp, D] queries and [T, H/tp] weights, then
    every rank runs the same streaming indexer_topk over all heads: the same kernel on the same
    queries as one rank (equal up to matmul rounding), so even exact ties at the top-k boundary
    (zeros are common under ReLU) break the same way, for every score type and backend. Costs T*H*D bytes of traffic and
    repeats the O(T*S) scoring on every rank (DeepSeek's reference replicates the indexer too).
  * reduce scores (`reduce_index_scores`, used when T*S*4 <= INDEX_REDUCE_MAX_BYTES, 0 by
    default): each rank scores its own heads over all keys, [T, S] fp32; relu partials are
    summed (all-reduce), mixture partials (each rank's logsumexp over its heads; softmax_mixture
    first subtracts each head's own normalizer, which is per head and so local) are gathered and
    logsumexp'd; then top-k of the full row. Splits the indexer's work over ranks and suits decode
    (T = 1: 4*S bytes), but torch.topk breaks boundary ties its own way, so a selection can differ
    from one rank's where scores tie exactly (tests/model/parallel: scores equal to 1e-5; the
    default path is the one held to token-identical generation).

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/model/parallel -p no:cacheprovider
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsa_rag.kernels.indexer import indexer_head_lse, indexer_logits, indexer_topk
from dsa_rag.model.model import MLA, Indexer, MoE
from dsa_rag.model.parallel.dist import ParallelContext


class ColumnParallelLinear(nn.Linear):
    """Out features [o0, o1) of the full linear; the output stays sliced (no communication)."""


class RowParallelLinear(nn.Linear):
    """In features [i0, i1) of the full linear: the output is this rank's partial sum, all-reduced."""

    ctx: ParallelContext

    def forward(self, x):
        return self.ctx.all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(nn.Embedding):
    """Embedding rows [v0, v1) of the vocabulary (`weight` holds only those)."""

    ctx: ParallelContext
    v0: int = 0

    def forward(self, ids):
        local = ids - self.v0
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        h = h.masked_fill(outside[..., None], 0)  # exactly one rank owns each token: the sum is exact
        return self.ctx.all_reduce(h)


class ParallelHead(nn.Linear):
    """LM head rows [v0, v1); every rank gets the full-vocabulary logits (all-gather), so sampling
    runs identically everywhere. Pieces are padded to ceil(V / world) rows for the gather."""

    ctx: ParallelContext
    vocab: int = 0
    piece: int = 0

    def forward(self, x):
        y = F.linear(x, self.weight)
        if y.shape[-1] < self.piece:
            y = F.pad(y, (0, self.piece - y.shape[-1]))
        return self.ctx.all_gather(y, -1)[..., : self.vocab]


class ParallelIndexer(Indexer):
    """This rank's `n_heads` of `n_heads_global` indexer query heads (wq_b rows, weights_proj rows)."""

    n_heads_global: int

    def queries(self, x, qr, cos, sin):
        q, w = super().queries(x, qr, cos, sin)
        if self.cfg.index_score == "relu" and self.n_heads != self.n_heads_global:
            # Indexer.queries scales the ReLU weights by n_heads^-0.5 of the heads it holds;
            # the score sums over all heads, so the factor is the global count's.
            w = w * math.sqrt(self.n_heads / self.n_heads_global)
        return q, w


# Index scores up to this many bytes per call are reduced across ranks, larger ones gather the
# queries instead (see the module docstring). 0: always gather (exact ties); tests also run inf.
INDEX_REDUCE_MAX_BYTES = 0


def topk_from_scores(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """fp32 [T, S] causal scores (-inf masked) -> int32 [T, topk], descending, -1 padded
    (indexer_topk's contract)."""
    T, S = scores.shape
    if topk > S:
        scores = torch.cat([scores, scores.new_full((T, topk - S), float("-inf"))], 1)
    vals, idx = scores.topk(topk, -1)
    return idx.masked_fill(vals == float("-inf"), -1).to(torch.int32)


def _gather_heads(ctx: ParallelContext, t: torch.Tensor) -> torch.Tensor:
    """All-gather along the head dim (1); FP8 travels as bytes (gloo has no float8 type)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return ctx.all_gather(t.view(torch.uint8), 1).view(t.dtype)
    return ctx.all_gather(t, 1)


def reduce_index_scores(ctx: ParallelContext, iq, k, iw, k_scale, start_pos: int, score: str) -> torch.Tensor:
    """The full index score [T, S] fp32 (causal -inf) from this rank's heads iq [T, H/tp, D],
    iw [T, H/tp]: a sum of the ranks' partial sums ("relu") or a logsumexp of their partial
    logsumexps ("mixture", "softmax_mixture"). A collective."""
    if score == "relu":
        return ctx.all_reduce(indexer_logits(iq, k, iw, k_scale=k_scale, start_pos=start_pos, score="relu"))
    w = iw.float()
    if score == "softmax_mixture":  # each head's normalizer is its own: local
        w = w - indexer_head_lse(iq, k, k_scale=k_scale, start_pos=start_pos)
    part = indexer_logits(iq, k, w, k_scale=k_scale, start_pos=start_pos, score="mixture")
    return ctx.all_gather(part[None], 0).logsumexp(0)


class ParallelMLA(MLA):
    """MLA over this rank's `n_heads` heads: wq_b and wkv_b rows of those heads (column parallel),
    wo their columns (row parallel). wq_a, wkv_a, the norms, the latent KV cache and the indexer
    keys are whole on every rank (shared by all heads, as MLA needs)."""

    ctx: ParallelContext

    def _select(self, iq, iw, c, end: int, sp: int):
        ctx, cfg = self.ctx, self.cfg
        if ctx.tp == 1:
            return super()._select(iq, iw, c, end, sp)
        k, ks = c.index_k(end), c.index_scale(end)
        if iq.shape[0] * end * 4 > INDEX_REDUCE_MAX_BYTES:  # gather queries, stream as one rank would
            return indexer_topk(_gather_heads(ctx, iq), k, ctx.all_gather(iw.contiguous(), 1), cfg.index_topk,
                                k_scale=ks, start_pos=sp, score=cfg.index_score)
        s = reduce_index_scores(ctx, iq, k, iw, ks, sp, cfg.index_score)
        return topk_from_scores(s, cfg.index_topk)

    def _select_decode(self, iq, iw, rows, start_pos, needs) -> dict:
        """The grouped decode selection over all heads: every rank gathers the indexer heads (as
        _select's streaming branch does) and selects what one rank would."""
        if self.ctx.tp == 1:
            return super()._select_decode(iq, iw, rows, start_pos, needs)
        B, T, Hl, D = iq.shape
        iq_all = _gather_heads(self.ctx, iq.reshape(B * T, Hl, D)).view(B, T, -1, D)
        iw_all = self.ctx.all_gather(iw.reshape(B * T, Hl).contiguous(), 1).view(B, T, -1)
        return super()._select_decode(iq_all, iw_all, rows, start_pos, needs)

    def _attend_absorbed(self, q_nope, q_pe, cache, end, idx, sp, trace=None, row=0):
        if trace is not None and self.ctx.tp > 1:
            # attention_mass sums this rank's heads; citations need every head's mass.
            inner = trace

            def trace(layer, r, i, mass):
                inner(layer, r, i, self.ctx.all_reduce(mass.float().contiguous()))
        return super()._attend_absorbed(q_nope, q_pe, cache, end, idx, sp, trace, row)


class Absent(nn.Module):
    """Placeholder for an expert another rank holds (keeps ModuleList indices = expert ids)."""

    def forward(self, x):  # pragma: no cover - never routed to
        raise RuntimeError("this expert lives on another rank")


class ParallelMoE(MoE):
    """Router and (under EP) the shared expert whole on every rank; routed experts `local` (EP:
    whole experts [e0, e1); TP: every expert, each a slice of its inter dim). Partial fp32 sums
    of all tokens meet in one all-reduce (see the module docstring)."""

    ctx: ParallelContext
    local: range
    shared_sliced: bool  # TP-sliced shared expert: its partial joins the all-reduce

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.gate(x)  # replicated router: identical choices on every rank
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        counts = torch.bincount(idx.flatten(), minlength=len(self.experts)).tolist()
        for e in self.local:
            if counts[e] == 0:
                continue
            tok, slot = torch.where(idx == e)
            y.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        if self.shared_sliced:
            y = y + self.shared_experts(x)
        self.ctx.all_reduce(y)
        if not self.shared_sliced:
            y = y + self.shared_experts(x)
        return y.to(x.dtype).view(shape)
