"""Sharding without processes: the plan's pieces on the meta device (V3.2-shaped and GLM-5-shaped
tiny configs), FP8 piece dequantization at ragged block offsets, the sharded fingerprint against
`model_fingerprint`, and the errors for sizes that do not divide.

    .venv/bin/python -m pytest -q tests/model/parallel/test_shard.py -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

from dsa_rag.model import fp8
from dsa_rag.model.config import indexer_plan
from dsa_rag.model.engine.engine import model_fingerprint
from dsa_rag.model.load import build_model
from dsa_rag.model.parallel.dist import ParallelContext, split_range
from dsa_rag.model.parallel.fingerprint import sharded_fingerprint
from dsa_rag.model.parallel.layers import Absent, ParallelHead, ParallelMLA, RowParallelLinear, VocabParallelEmbedding
from dsa_rag.model.parallel.load import dequant_piece
from dsa_rag.model.parallel.shard import Piece, shard_model
from tests.model.helpers import random_model, tiny_config


def test_pieces_on_meta_tp2_ep2():
    cfg = tiny_config(vocab_size=97)  # ragged vocabulary: 49 + 48 rows
    m = build_model(cfg, meta=True)
    plan = shard_model(m, ParallelContext(1, 2, 2, 2))
    a = m.layers[1].attn
    assert isinstance(a, ParallelMLA) and a.n_heads == 2 and a.indexer.n_heads == 8 and a.indexer.n_heads_global == 16
    dqk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    assert plan.pieces["layers.1.attn.wq_b.weight"] == Piece(0, 2 * dqk, 4 * dqk, False)
    assert plan.pieces["layers.1.attn.wo.weight"] == Piece(1, 2 * cfg.v_head_dim, 4 * cfg.v_head_dim, False)
    assert plan.pieces["layers.1.attn.wq_a.weight"] == Piece()  # replicated
    assert isinstance(a.wo, RowParallelLinear) and a.wo.weight.shape == (cfg.hidden_size, 2 * cfg.v_head_dim)
    assert plan.pieces["embed.weight"] == Piece(0, 49, 97, False) and m.embed.weight.shape[0] == 48
    assert isinstance(m.embed, VocabParallelEmbedding) and isinstance(m.head, ParallelHead) and m.head.piece == 49
    # dense MLP: column / row pair; MoE: experts 4..7 whole on rank 1, 0..3 absent, shared replicated
    assert plan.pieces["layers.0.ffn.w2.weight"] == Piece(1, 48, 96, False)
    ffn = m.layers[1].ffn
    assert [isinstance(e, Absent) for e in ffn.experts] == [True] * 4 + [False] * 4
    assert "layers.1.ffn.experts.0.w1.weight" not in plan.pieces
    assert plan.pieces["layers.1.ffn.experts.5.w1.weight"] == Piece(None, 0, 0, False)
    assert plan.pieces["layers.1.ffn.shared_experts.w1.weight"] == Piece()
    assert all(p.device.type == "meta" for p in m.parameters())


def test_tp_without_ep_slices_every_expert():
    cfg = tiny_config()
    m = build_model(cfg, meta=True)
    plan = shard_model(m, ParallelContext(0, 2, 2, 1))
    assert plan.pieces["layers.1.ffn.experts.3.w1.weight"] == Piece(0, 0, 16, False)
    assert plan.pieces["layers.1.ffn.shared_experts.w2.weight"] == Piece(1, 0, 16, False)
    assert m.layers[1].ffn.shared_sliced


def test_shared_index_layers_shard():
    """GLM-5's plan: shared layers have no indexer (nothing of theirs to split)."""
    cfg = tiny_config(indexer_types=indexer_plan(3, every=2))
    m = build_model(cfg, meta=True)
    plan = shard_model(m, ParallelContext(0, 2, 2, 2))
    assert m.layers[1].attn.indexer is None and m.layers[2].attn.indexer.n_heads == 8
    assert not any(n.startswith("layers.1.attn.indexer") for n in plan.pieces)


@pytest.mark.parametrize("rows,cols", [(slice(96, 250), slice(None)), (slice(None), slice(70, 190)), (slice(0, 128), slice(None))],
                         ids=["rows-ragged", "cols-ragged", "rows-aligned"])
def test_dequant_piece_matches_full(rows, cols):
    w = torch.randn(300, 200)
    q, s = fp8.weight_quant(w)
    full = fp8.weight_dequant(q, s)
    piece = q[rows, cols]
    r0, c0 = rows.start or 0, cols.start or 0
    m, n = piece.shape
    sc = s[r0 // 128: (r0 + m - 1) // 128 + 1, c0 // 128: (c0 + n - 1) // 128 + 1]
    assert torch.equal(dequant_piece(piece, sc, 128, r0, c0), full[rows, cols])


def test_fingerprint_equals_unsharded():
    m = random_model(tiny_config())
    want = model_fingerprint(m)
    plan = shard_model(m, ParallelContext.single())
    assert sharded_fingerprint(m, plan) == want


def test_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="must be 1 or the replica's world size 4"):
        ParallelContext(0, 4, 2, 4)
    with pytest.raises(ValueError, match="num_attention_heads = 4 does not split over 3 ranks"):
        shard_model(build_model(tiny_config(), meta=True), ParallelContext(0, 3, 3, 1))
    assert [split_range(10, 3, i) for i in range(3)] == [(0, 4), (4, 8), (8, 10)]
