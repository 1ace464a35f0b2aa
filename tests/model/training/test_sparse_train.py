"""Stage 2's gathered O(T k) training attention (model/training/sparse_train.py) equals the dense-masked
stage 2 of model/training/train.py: the same LM loss, indexer KL and gradients for every parameter.

    .venv/bin/python -m pytest -q tests/model/training/test_sparse_train.py
"""

import random

import pytest
import torch

from dsa_rag.model.config import preset
from dsa_rag.model.load import build_model
from dsa_rag.model.tokenizer import ByteTokenizer
from dsa_rag.model.training import data, train
from dsa_rag.model.training.sparse_train import select_topk


def _model(**overrides):
    # 16 indexer heads: a random indexer with few heads has exact score ties (every head ReLU'd to 0),
    # and tied keys may be chosen either way by two top-k calls over differently shaped scores
    cfg = preset("dsa-tiny", hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, index_topk=64, index_n_heads=16, **overrides)
    return build_model(cfg).init_weights(seed=0).train()


def _batch(T=300, rows=2):
    tok = ByteTokenizer()
    return data.batch(random.Random(5), T, rows * T, ("niah_single",), None, tok)


def _loss_and_grads(m, x, y, w, pos, sparse_chunk):
    m.zero_grad(set_to_none=True)
    L = train.losses(m, x, y, w, 2, 0.5, positions=pos, sparse_chunk=sparse_chunk)
    (L["lm"] + L["kl"]).backward()
    return L, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("score", ["relu", "mixture", "softmax_mixture"])
def test_sparse_stage2_matches_the_dense_masked_one(score):
    m = _model(index_score=score)
    x, y, w = _batch()
    assert x.shape[0] == 2 and x.shape[1] > 2 * m.cfg.index_topk
    pos = train.skip_positions(random.Random(1), x, ByteTokenizer().special("<question>"), 4096)  # PoSE rows too
    dense, gd = _loss_and_grads(m, x, y, w, pos, 0)
    sparse, gs = _loss_and_grads(m, x, y, w, pos, 96)  # chunks that do not divide T
    for k in ("lm", "kl"):
        d, s_ = float(dense[k].detach()), float(sparse[k].detach())
        assert abs(d - s_) < 1e-5 * max(1.0, d), (k, d, s_)
    assert gd.keys() == gs.keys() and any(".indexer." in n for n in gs)
    for n in gd:
        scale = float(gd[n].abs().max()) + 1e-12
        assert float((gd[n] - gs[n]).abs().max()) < 1e-4 * scale, n


def test_short_rows_keep_all_their_causal_keys():
    """Rows with fewer causal keys than top-k attend to all of them, none past their position."""
    m = _model()
    x, _, _ = _batch(T=100, rows=1)
    T = x.shape[1]
    blk = m.layers[0]
    h = blk.attn_norm(m.embed(x))
    cos, sin = m.rotary(torch.arange(T)[None], torch.float32)
    qr = blk.attn.q_norm(blk.attn.wq_a(h))
    keys, _ = blk.attn.indexer.keys(h, cos, sin)
    idx, valid = select_topk(blk.attn.indexer, keys, h, qr, cos, sin, 64, 32)
    assert T > 64 and idx.shape == (1, T, 64)
    for t in (0, 10, 63, 64, T - 1):
        chosen = set(idx[0, t][valid[0, t]].tolist())
        assert all(s <= t for s in chosen)
        assert len(chosen) == min(t + 1, 64)
