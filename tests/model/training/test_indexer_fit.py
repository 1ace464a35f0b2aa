"""Stage 1 on cached activations (model/training/indexer_fit.py): its loss is model/training/train.py's stage-1 KL on
the same rows, fitting lowers it, and only the indexer moves; collect/fit run end to end.

    .venv/bin/python -m pytest -q tests/model/training/test_indexer_fit.py
"""

import math
import random

import pytest
import torch

from dsa_rag.model.load import build_model, load_model
from dsa_rag.model.tokenizer import ByteTokenizer
from dsa_rag.model.training import attention, data, indexer_fit, train


def _tiny():
    return build_model(train.tiny_cfg()).init_weights(seed=0)


def _example(T=200):
    tok = ByteTokenizer()
    x, y, w = data.batch(random.Random(3), T, 1, ("niah_single",), None, tok)
    rows = train.index_rows(random.Random(4), x, tok.special("<question>"), 96)
    return x, y, w, rows, tok


def test_cached_kl_is_the_stage1_kl_on_those_rows():
    m = _tiny().eval()
    x, y, w, rows, tok = _example()
    rec = indexer_fit.capture(m, x, rows, keep=0)
    rec.update(rows=rows, q0=train.question_start(x[0], tok.special("<question>")), T=x.shape[1])
    cos, sin = m.rotary(torch.arange(x.shape[1])[None], torch.float32)
    with torch.no_grad():
        cached = sum(float(indexer_fit.indexer_loss(b.attn.indexer, rec, i, cos, sin, 1.0, m.cfg.index_topk)["kl"])
                     for i, b in enumerate(m.layers)) / len(m.layers)
        direct = float(train.losses(m, x, y, w, 1, 0.2, rows=rows)["kl"])
    assert abs(cached - direct) < 1e-4 * max(1.0, direct), (cached, direct)


def test_fit_lowers_the_kl_and_moves_only_the_indexer(tmp_path):
    train.export(_tiny(), tmp_path / "w")  # the CLI loads a weights dir
    indexer_fit.main(["collect", "--model", str(tmp_path / "w"), "--out", str(tmp_path / "d"), "--n", "3",
                      "--len", "300:400", "--rows", "128", "--keep", "64", "--threads", "1"])
    assert len(list((tmp_path / "d").glob("*.pt"))) == 3
    indexer_fit.main(["fit", "--model", str(tmp_path / "w"), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"),
                      "--steps", "30", "--lr", "3e-3", "--held-out", "0", "--eval-every", "30", "--threads", "1",
                      "--export", str(tmp_path / "w2")])
    log = (tmp_path / "r" / "log.csv").read_text().splitlines()
    assert len(log) == 3  # header, step 0, step 30
    before, after = load_model(tmp_path / "w").state_dict(), load_model(tmp_path / "w2").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".indexer." in k for k in changed)
    # the KL on the (training) examples fell
    recs = indexer_fit.load_dir(tmp_path / "d")
    m2 = load_model(tmp_path / "w2")

    def mean_kl(model):
        tot = 0.0
        with torch.no_grad():
            for rec in recs:
                cos, sin = model.rotary(torch.arange(rec["T"])[None], torch.float32)
                tot += sum(float(indexer_fit.indexer_loss(b.attn.indexer, rec, i, cos, sin, 4.0, 32)["kl"])
                           for i, b in enumerate(model.layers))
        return tot

    assert mean_kl(m2) < 0.9 * mean_kl(load_model(tmp_path / "w"))


def _layer0_scores(model, x, rows):
    """Layer 0's index scores [1, R, T] of the query rows."""
    cos, sin = model.rotary(torch.arange(x.shape[1])[None], torch.float32)
    with torch.no_grad():
        blk = model.layers[0]
        xn = blk.attn_norm(model.embed(x))
        qr = blk.attn.q_norm(blk.attn.wq_a(xn))
        return attention.index_scores(blk.attn.indexer, xn, qr, cos, sin, rows)


def test_grown_heads_keep_the_scores_until_fitted(tmp_path):
    """--index-heads adds silent heads: the same scores (so the same top-k) right after growing;
    the export loads with the new head count."""
    m = _tiny().eval()
    x, y, w, rows, tok = _example()
    old = m.cfg.index_n_heads
    before = _layer0_scores(m, x, rows)
    indexer_fit.grow_index_heads(m, 2 * old)
    after = _layer0_scores(m, x, rows)
    assert m.layers[0].attn.indexer.wq_b.weight.shape[0] == 2 * old * m.cfg.index_head_dim
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-5 * float(before.abs().max()))
    train.export(m, tmp_path / "g")
    assert load_model(tmp_path / "g").cfg.index_n_heads == 2 * old
    try:
        indexer_fit.grow_index_heads(m, old)
    except ValueError as e:
        assert "only be added" in str(e)
    else:
        raise AssertionError("shrinking the indexer must be refused")


@pytest.mark.parametrize("score", ["relu", "mixture", "softmax_mixture"])
def test_doubled_head_dim_keeps_the_scores_until_fitted(score):
    """--index-dim 2d: the same scores right after growing, for both ways of combining heads."""
    m = _tiny().eval()
    m.cfg.index_score = score
    x, y, w, rows, tok = _example()
    before = _layer0_scores(m, x, rows)
    indexer_fit.grow_index_dim(m, 2 * m.cfg.index_head_dim)
    after = _layer0_scores(m, x, rows)
    assert m.layers[0].attn.indexer.wk.weight.shape[0] == m.cfg.index_head_dim
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4 * float(before.abs().max()))


@pytest.mark.parametrize("score", ["mixture", "softmax_mixture"])
def test_mixture_heads_grow_by_copying_without_moving_the_ranking(score):
    """A mixture indexer doubled by copying its heads: every score moves by log 2 and nothing else
    (the same top-k and softmax); with the split noise on, the copies differ from their originals."""
    m = _tiny().eval()
    m.cfg.index_score = score
    x, y, w, rows, tok = _example()
    old, d = m.cfg.index_n_heads, m.cfg.index_head_dim
    before = _layer0_scores(m, x, rows)
    indexer_fit.grow_index_heads(m, 2 * old, split_noise=0.0)
    after = _layer0_scores(m, x, rows)
    seen = torch.isfinite(before)
    assert torch.equal(seen, torch.isfinite(after))
    assert torch.allclose(after[seen] - before[seen], torch.full_like(before[seen], math.log(2)), atol=1e-4)
    wq = m.layers[0].attn.indexer.wq_b.weight
    assert wq.shape[0] == 2 * old * d and torch.equal(wq[: old * d], wq[old * d:])

    m2 = _tiny().eval()
    m2.cfg.index_score = score
    indexer_fit.grow_index_heads(m2, 2 * old)  # the default split noise
    wq2 = m2.layers[0].attn.indexer.wq_b.weight.detach()
    assert not torch.equal(wq2[: old * d], wq2[old * d:])
    assert torch.allclose(wq2[: old * d], wq2[old * d:], atol=0.5 * float(wq2.std()))


def test_mixture_indexer_grows_by_whole_copies_only():
    m = _tiny().eval()
    m.cfg.index_score = "mixture"
    with pytest.raises(ValueError, match="multiple"):
        indexer_fit.grow_index_heads(m, m.cfg.index_n_heads + 1)
