"""Shard a built Transformer in place for one rank: slice its weights (real or meta tensors) and
swap in the parallel modules of layers.py. Returns the ShardPlan, which says for every local
parameter which piece of the full tensor it is: what the rank-sliced loader reads from the
checkpoint, what the fingerprint samples, what the memory planner counts.

    model = build_model(cfg, meta=True)               # or a loaded model (tests)
    plan = shard_model(model, ParallelContext(rank=1, world=2, tp=2, ep=2))
    plan.pieces["layers.0.attn.wq_b.weight"]          # Piece(dim=0, start=96, stop=192, replicated=False)

What splits (DeepSeek-V3.2 names; tp / ep = the context's sizes):
  attention heads (tp)  wq_b, wkv_b rows (per head: dn+dr, dn+dv rows); wo columns (dv per head)
  indexer heads (tp)    indexer.wq_b rows (index_head_dim per head), indexer.weights_proj rows
  dense MLP (tp)        w1, w3 rows; w2 columns
  vocabulary (tp)       embed rows, head rows (ceil(V / tp) per rank, the last one shorter)
  routed experts        ep > 1: whole experts [E*r/ep, E*(r+1)/ep) on rank r; ep = 1 < tp: every
                        expert (and the shared one) sliced like the dense MLP
  replicated            wq_a, wkv_a, all norms, indexer.wk / k_norm, the router, the shared expert
                        under EP. The latent KV and indexer-key caches are whole on every rank.

    .venv/bin/python -m pytest -q tests/model/parallel/test_shard.py -p no:cacheprovider
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsa_rag.model.model import MLP, MoE, Transformer
from dsa_rag.model.parallel.dist import ParallelContext, even_range, split_range
from dsa_rag.model.parallel.layers import (Absent, ColumnParallelLinear, ParallelHead, ParallelIndexer, ParallelMLA,
                                           ParallelMoE, RowParallelLinear, VocabParallelEmbedding)


@dataclass(frozen=True)
class Piece:
    """Which part of the full tensor a rank holds: rows / columns [start, stop) of `dim`, or the
    whole tensor (dim None). replicated: every rank holds the same (False: this rank alone)."""

    dim: int | None = None
    start: int = 0
    stop: int = 0
    replicated: bool = True


@dataclass
class ShardPlan:
    ctx: ParallelContext
    full: dict[str, tuple[tuple[int, ...], torch.dtype]]  # every parameter of the unsharded model, in order
    pieces: dict[str, Piece] = field(default_factory=dict)  # this rank's parameters

    def local_bytes(self, model: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def _narrow(plan: ShardPlan, name: str, lin: nn.Linear, dim: int, a: int, b: int, cls=None, ctx=None) -> None:
    """Keep rows (dim 0) or columns (dim 1) [a, b) of a linear's weight; record the piece."""
    w = lin.weight
    lin.weight = nn.Parameter(w.detach().narrow(dim, a, b - a).clone(), requires_grad=w.requires_grad)
    if dim == 0:
        lin.out_features = b - a
    else:
        lin.in_features = b - a
    if cls is not None:
        lin.__class__ = cls
    if ctx is not None:
        lin.ctx = ctx
    plan.pieces[name + ".weight"] = Piece(dim, a, b, False)


def _shard_mlp(plan, prefix, mlp: MLP, inter: int, what: str, ctx, row_parallel: bool) -> None:
    a, b = even_range(inter, ctx.tp, ctx.tp_rank, what)
    _narrow(plan, prefix + "w1", mlp.w1, 0, a, b, ColumnParallelLinear)
    _narrow(plan, prefix + "w3", mlp.w3, 0, a, b, ColumnParallelLinear)
    # A dense MLP all-reduces its own output; an expert's partial joins its MoE's single all-reduce.
    _narrow(plan, prefix + "w2", mlp.w2, 1, a, b, RowParallelLinear if row_parallel else None,
            ctx if row_parallel else None)


def _shard_attention(plan, prefix, attn, ctx) -> None:
    r, tp = ctx.tp_rank, ctx.tp
    h0, h1 = even_range(attn.n_heads, tp, r, "num_attention_heads")
    dqk, dkv = attn.dn + attn.dr, attn.dn + attn.dv
    _narrow(plan, prefix + "wq_b", attn.wq_b, 0, h0 * dqk, h1 * dqk, ColumnParallelLinear)
    _narrow(plan, prefix + "wkv_b", attn.wkv_b, 0, h0 * dkv, h1 * dkv, ColumnParallelLinear)
    _narrow(plan, prefix + "wo", attn.wo, 1, h0 * attn.dv, h1 * attn.dv, RowParallelLinear, ctx)
    attn.n_heads = h1 - h0
    ix = attn.indexer
    if ix is None:  # a "shared" layer of the indexer plan (GLM-5): reuses a full layer's top-k
        return
    g0, g1 = even_range(ix.n_heads, tp, r, "index_n_heads")
    _narrow(plan, prefix + "indexer.wq_b", ix.wq_b, 0, g0 * ix.head_dim, g1 * ix.head_dim, ColumnParallelLinear)
    _narrow(plan, prefix + "indexer.weights_proj", ix.weights_proj, 0, g0, g1, ColumnParallelLinear)
    ix.n_heads_global, ix.n_heads = ix.n_heads, g1 - g0
    ix.__class__ = ParallelIndexer


def _shard_moe(plan, prefix, moe: MoE, cfg, ctx) -> None:
    E = len(moe.experts)
    moe.__class__ = ParallelMoE
    moe.ctx = ctx
    if ctx.ep > 1:
        e0, e1 = even_range(E, ctx.ep, ctx.ep_rank, "n_routed_experts")
        for e in range(E):
            names = [f"{prefix}experts.{e}.{n}" for n, _ in moe.experts[e].named_parameters()]
            if not e0 <= e < e1:
                moe.experts[e] = Absent()
                for n in names:
                    del plan.pieces[n]
            else:
                for n in names:
                    plan.pieces[n] = Piece(None, 0, 0, False)
        moe.local, moe.shared_sliced = range(e0, e1), False
    elif ctx.tp > 1:
        for e in range(E):
            _shard_mlp(plan, f"{prefix}experts.{e}.", moe.experts[e], cfg.moe_intermediate_size,
                       "moe_intermediate_size", ctx, row_parallel=False)
        _shard_mlp(plan, prefix + "shared_experts.", moe.shared_experts,
                   cfg.moe_intermediate_size * cfg.n_shared_experts, "moe_intermediate_size * n_shared_experts",
                   ctx, row_parallel=False)
        moe.local, moe.shared_sliced = range(E), True
    else:
        moe.local, moe.shared_sliced = range(E), False


def shard_model(model: Transformer, ctx: ParallelContext) -> ShardPlan:
    """Slice `model` in place for ctx.rank; -> its ShardPlan (also set as model.shard_plan)."""
    plan = ShardPlan(ctx, {n: (tuple(p.shape), p.dtype) for n, p in model.state_dict().items()})
    plan.pieces = {n: Piece() for n in plan.full}
    cfg = model.cfg
    if ctx.tp > 1:
        V = cfg.vocab_size
        v0, v1 = split_range(V, ctx.tp, ctx.tp_rank)
        if v1 <= v0:
            raise ValueError(f"vocab_size {V} is too small for {ctx.tp} tensor-parallel ranks")
        emb = model.embed
        emb.weight = nn.Parameter(emb.weight.detach()[v0:v1].clone(), requires_grad=emb.weight.requires_grad)
        emb.__class__, emb.ctx, emb.v0, emb.num_embeddings = VocabParallelEmbedding, ctx, v0, v1 - v0
        plan.pieces["embed.weight"] = Piece(0, v0, v1, False)
        _narrow(plan, "head", model.head, 0, v0, v1, ParallelHead, ctx)
        model.head.vocab, model.head.piece = V, -(-V // ctx.tp)
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        layer.attn.__class__ = ParallelMLA
        layer.attn.ctx = ctx
        if ctx.tp > 1:
            _shard_attention(plan, p + "attn.", layer.attn, ctx)
        if isinstance(layer.ffn, MoE):
            _shard_moe(plan, p + "ffn.", layer.ffn, cfg, ctx)
        elif ctx.tp > 1:
            _shard_mlp(plan, p + "ffn.", layer.ffn, cfg.intermediate_size, "intermediate_size", ctx, row_parallel=True)
    model.shard_plan = plan
    return plan
