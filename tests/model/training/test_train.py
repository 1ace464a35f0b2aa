"""Training recipe (3 stages) and eval on a very small config: the loss falls, stage 1 moves only
the indexer, checkpoints resume, eval writes its JSON.

    .venv/bin/python -m pytest -q tests/model/training/test_train.py
"""

import dataclasses
import json
import random

import pytest
import torch

from dsa_rag.model.evals import eval as evaluate
from dsa_rag.model.load import build_model
from dsa_rag.model.tokenizer import ByteTokenizer
from dsa_rag.model.training import data, train

ARGS = ["--tiny", "--tokens", "384", "--len", "96:128", "--log-every", "1", "--ckpt-every", "1", "--threads", "2"]


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    m = build_model(train.tiny_cfg()).init_weights(seed=0).train()
    x, y, w = data.batch(random.Random(0), 96, 384, tasks=("niah_single",))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(4):
        L = train.losses(m, x, y, w, stage=0, doc_coef=0.2)
        opt.zero_grad()
        L["lm"].backward()
        opt.step()
        first = first if first is not None else float(L["lm"].detach())
    assert float(train.losses(m, x, y, w, 0, 0.2)["lm"]) < first


def test_sparse_stage_matches_dense_below_topk():
    """Below index_topk every causal key is selected: stage 2 attention == stage 0 attention."""
    m = build_model(train.tiny_cfg()).init_weights(seed=0).eval()
    x = torch.randint(8, 200, (2, 40))
    with torch.no_grad():
        a = train.forward_train(m, x, 0, {})
        b = train.forward_train(m, x, 2, {})
        c = m(x)  # the inference path
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a, c, atol=1e-4)


def test_stages_resume_and_eval(tmp_path):
    s0, s1, s2 = tmp_path / "s0", tmp_path / "s1", tmp_path / "s2"
    train.main(["--stage", "0", "--steps", "2", "--out", str(s0)] + ARGS)
    assert json.loads((s0 / "state.json").read_text())["step"] == 2
    train.main(["--stage", "0", "--steps", "3", "--out", str(s0)] + ARGS)  # resumes at step 2
    steps = [json.loads(l)["step"] for l in (s0 / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    before = torch.load(s0 / "ckpt.pt", weights_only=False)["model"]
    m1 = train.main(["--stage", "1", "--steps", "2", "--init", str(s0), "--out", str(s1)] + ARGS)
    after = m1.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".indexer." in k for k in changed)
    assert "kl" in json.loads((s1 / "log.jsonl").read_text().splitlines()[-1])
    train.main(["--stage", "2", "--steps", "1", "--init", str(s1), "--out", str(s2), "--export", str(tmp_path / "w")] + ARGS)
    assert (tmp_path / "w" / "model.safetensors").exists() and (tmp_path / "w" / "tokenizer_config.json").exists()
    out = tmp_path / "eval.json"
    res = evaluate.main(["--model", str(tmp_path / "w"), "--lengths", "160", "--samples", "1", "--tasks", "niah_single",
                         "--recall-lengths", "120", "--recall-samples", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["accuracy"]) == {"dsa", "dense"} and saved["recall"][0]["topk"] == 64
    assert 0.0 <= res["recall"][0]["recall"] <= 1.0


@pytest.mark.parametrize("score", ["relu", "mixture", "softmax_mixture"])
def test_sparse_training_attention_is_the_inference_dsa(score):
    """Above index_topk the training attention (top-k mask over explicit scores) computes what the
    inference path (indexer_topk + sparse_mla) computes, for both ways of combining indexer heads.
    16 indexer heads: no exact-zero score ties."""
    cfg = dataclasses.replace(train.tiny_cfg(), index_n_heads=16, index_score=score).validate()
    m = build_model(cfg).init_weights(seed=0, std=0.08).eval()
    x = torch.randint(8, 200, (1, 150))
    with torch.no_grad():
        assert torch.allclose(train.forward_train(m, x, 2, {}), m(x), atol=1e-3)


def test_skip_positions_keep_order_and_the_question_contiguous():
    tok = ByteTokenizer()
    rng = random.Random(1)
    x, _, _ = data.batch(rng, 200, 1200, tasks=("niah_single",), tok=tok)
    q_id = tok.special("<question>")
    pos = train.skip_positions(rng, x, q_id, max_pos=4096, p_skip=1.0)
    assert pos.shape == x.shape and int(pos.max()) < 4096
    for b in range(x.shape[0]):
        d = pos[b].diff()
        q0 = int((x[b] == q_id).nonzero()[-1])
        assert (d >= 1).all() and (d[q0:] == 1).all()  # increasing; question and answer contiguous
        assert int(pos[b, 0]) == 0  # <bos> stays at 0
    jumped = sum(int((pos[b].diff() > 1).any()) for b in range(x.shape[0]))
    assert jumped >= 1
    plain = train.skip_positions(rng, x, q_id, max_pos=4096, p_skip=0.0)
    assert torch.equal(plain, torch.arange(x.shape[1])[None].expand_as(x))


def test_training_attention_sees_only_relative_positions():
    """RoPE: shifting every position by a constant leaves the logits (and the indexer's top-k) as
    they are; a gap inside the row changes the logits after it and nothing before it."""
    m = build_model(train.tiny_cfg()).init_weights(seed=0).eval()
    x = torch.randint(8, 200, (1, 160))  # > index_topk (64): stage 2 selects
    base = torch.arange(160)[None]
    gap = base.clone()
    gap[:, 100:] += 3000
    with torch.no_grad():
        for stage in (0, 2):
            a = train.forward_train(m, x, stage, {}, base)
            b = train.forward_train(m, x, stage, {}, base + 5000)
            c = train.forward_train(m, x, stage, {}, gap)
            assert torch.allclose(a, b, atol=2e-3), (stage, (a - b).abs().max())
            assert torch.allclose(a[:, :100], c[:, :100], atol=1e-5) and not torch.allclose(a[:, 100:], c[:, 100:], atol=1e-3)


def test_stage1_on_a_subset_of_rows_is_the_full_stage1_on_those_rows():
    """--index-rows: the KL of the chosen query rows equals the full stage 1's KL on those rows,
    and the logits are the same (the output still goes over every row)."""
    tok = ByteTokenizer()
    m = build_model(train.tiny_cfg()).init_weights(seed=0).eval()
    x, _, _ = data.batch(random.Random(3), 200, 200, tasks=("niah_single",), tok=tok)
    rows = train.index_rows(random.Random(0), x, tok.special("<question>"), 90)
    q0 = int((x[0] == tok.special("<question>")).nonzero()[-1])
    assert len(rows) == 90 and torch.equal(rows[-(x.shape[1] - q0):], torch.arange(q0, x.shape[1]))
    full, sub = {"want_recall": True}, {"want_recall": True}
    with torch.no_grad():
        a = train.forward_train(m, x, 1, full)
        b = train.forward_train(m, x, 1, sub, rows=rows)
    assert torch.allclose(a, b, atol=1e-4)
    for kf, ks in zip(full["kl"], sub["kl"]):
        assert torch.allclose(kf[:, rows], ks, atol=1e-5)
