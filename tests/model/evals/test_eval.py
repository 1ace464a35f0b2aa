"""model/evals/eval.py, model/evals/eval_report.py and model/evals/resort_failures.py on the
shipped dsa-tiny, at short contexts.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/model/evals/test_eval.py

The accuracy metric is a teacher-forced shortcut for greedy decoding; these tests hold it to a real
token-by-token greedy decode, and check that the result file's cells, per-sample records and the
report's DSA/dense pairing agree with each other.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from dsa_rag.model.cache import new_sequence_cache
from dsa_rag.model.evals import eval_report, resort_failures
from dsa_rag.model.evals.eval import answer_correct, answer_decoded, main as eval_main
from dsa_rag.model.evals.example_sets import example_of
from dsa_rag.model.evals.failure_kinds import KINDS, failure_kind
from dsa_rag.model.load import load_model
from dsa_rag.model.tokenizer import ByteTokenizer
from dsa_rag.model.training import data


@pytest.fixture(scope="module")
def tiny():
    return load_model("dsa-tiny")


@torch.no_grad()
def greedy_decode(model, prompt: list[int], n_new: int) -> list[int]:
    """Prefill the prompt, then feed back the argmax one token at a time."""
    cache = [new_sequence_cache(model.cfg.num_hidden_layers, capacity=len(prompt) + n_new)]
    logits = model(torch.tensor([prompt]), 0, cache)
    out = [int(logits[0, -1].argmax())]
    while len(out) < n_new:
        logits = model(torch.tensor([[out[-1]]]), len(prompt) + len(out) - 1, cache)
        out.append(int(logits[0, -1].argmax()))
    return out


def test_answer_correct_is_greedy_exact_match(tiny):
    tok = ByteTokenizer()
    rng = random.Random("test-eval")
    verdicts = []
    for i in range(3):
        ids, a0 = data.encode(data.make_example(rng, "niah_single", 700, tok, depth=(i + 0.5) / 3), tok)
        decoded = greedy_decode(tiny, ids[:a0], len(ids) - a0)
        ok, secs, got = answer_correct(tiny, ids, a0, chunk=256, eos=tok.eos_id)  # several prefill chunks
        assert ok == (decoded == ids[a0:])
        assert secs > 0
        # --decode-answers: the same verdict by a real decode (T = 1 steps, the decode selection path)
        assert answer_decoded(tiny, ids, a0, chunk=256, eos=tok.eos_id)[0] == ok
        verdicts.append(ok)
        # The same prompt with one answer byte changed: the greedy decode no longer matches it, and
        # the output that answer_correct reports for it is the real greedy decode up to <eos>.
        wrong = list(ids)
        wrong[a0 + 1] = tok.encode("#")[0] if wrong[a0 + 1] != tok.encode("#")[0] else tok.encode("%")[0]
        bad, _, got = answer_correct(tiny, wrong, a0, chunk=256, eos=tok.eos_id)
        assert bad == (decoded == wrong[a0:])
        assert not (ok and bad)
        if not bad:
            full = greedy_decode(tiny, ids[:a0], len(ids) - a0 + 16)
            want = full[: full.index(tok.eos_id)] if tok.eos_id in full else full
            assert got == want
    # dsa-tiny answers short single-needle questions (100% at 1k in the model card): the metric
    # must be seen saying yes, not only no.
    assert any(verdicts)


def test_eval_file_cells_samples_and_report(tmp_path):
    out = tmp_path / "e.json"
    eval_main(["--model", "dsa-tiny", "--lengths", "600", "--tasks", "niah_single,niah_multikey", "--samples", "3",
               "--recall-lengths", "600", "--recall-samples", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert out.with_suffix(".png").exists()
    for mode in ("dsa", "dense"):
        for task in ("niah_single", "niah_multikey"):
            cell = res["accuracy"][mode][task]["600"]
            recs = res["samples"][mode][task]["600"]
            assert cell["n"] == len(recs) == 3
            assert cell["acc"] == pytest.approx(sum(r["correct"] for r in recs) / 3)
            assert [r["example"] for r in recs] == [f"1234-{task}-600-3-{i}" for i in range(3)]
            for r in recs:  # a wrong answer keeps the model's own output and its failure kind
                assert ("failure" in r) == (not r["correct"]) and r.get("failure", "other") in KINDS
                # the id names the example: failure_kinds draws it again, the same length in tokens
                ex = example_of(r["example"])
                assert ex.task == task and len(data.encode(ex, ByteTokenizer())[0]) == r["tokens"]
                if "output" in r:
                    assert failure_kind(ex, r["output"]) == r["failure"]
    wrong = sum(not r["correct"] for m in res["samples"].values() for t in m.values() for r in t["600"])
    assert sum(sum(c.values()) for c in eval_report.failures([str(out), str(out)]).values()) == wrong
    rec = res["recall"][0]
    assert rec["tokens"] == 600 and len(rec["recall_per_layer"]) == 4
    assert 0.0 < rec["recall"] <= 1.0 and 0.0 < rec["mass"] <= 1.0

    # The report pairs the two modes example by example, whether they ran in one file or in two.
    pc = eval_report.pairs([str(out)])
    for task in ("niah_single", "niah_multikey"):
        c = pc[(task, 600)]
        assert sum(c.values()) == 3
        assert c["both"] + c["dsa_only"] == round(3 * res["accuracy"]["dsa"][task]["600"]["acc"])
        assert c["both"] + c["dense_only"] == round(3 * res["accuracy"]["dense"][task]["600"]["acc"])
    dsa_only, dense_only = dict(res), dict(res)
    dsa_only["samples"] = {"dsa": res["samples"]["dsa"]}
    dense_only["samples"] = {"dense": res["samples"]["dense"]}
    (tmp_path / "a.json").write_text(json.dumps(dsa_only))
    (tmp_path / "b.json").write_text(json.dumps(dense_only))
    assert eval_report.pairs([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == pc
    assert eval_report.pairs([str(tmp_path / "a.json")]) == {}

    # Merging a file with itself adds its samples up.
    cells, recall = eval_report.merge([str(out), str(out)])
    assert cells[("niah_single", 600)]["dsa"]["n"] == 6 and len(recall) == 2

    # The re-sort gives a recorded output the kind failure_kind gives it now, in place, and
    # leaves the kinds it already has.
    stale = json.loads(out.read_text())
    rec = stale["samples"]["dsa"]["niah_single"]["600"][0]
    want = failure_kind(example_of(rec["example"]), "0")
    rec["output"], rec["failure"] = "0", next(k for k in KINDS if k != want)
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    resort_failures.main([str(tmp_path / "stale.json")])
    fixed = json.loads((tmp_path / "stale.json").read_text())
    assert fixed["samples"]["dsa"]["niah_single"]["600"][0]["failure"] == want
    assert resort_failures.resort(fixed) == 0


def test_report_refuses_files_of_different_models(tmp_path):
    recs = [{"example": "1-niah_single-600-1-0", "tokens": 600, "correct": True}]
    flipped = [dict(recs[0], correct=False)]
    for name, r in (("a", recs), ("b", flipped)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"samples": {"dsa": {"niah_single": {"600": r}}}}))
    with pytest.raises(ValueError, match="one model"):
        eval_report.pairs([str(tmp_path / "a.json"), str(tmp_path / "b.json")])


def test_sign_test():
    assert eval_report.sign_test(0, 0) == 1.0
    assert eval_report.sign_test(3, 3) == 1.0
    assert eval_report.sign_test(7, 0) == pytest.approx(2 / 2 ** 7)
    assert eval_report.sign_test(0, 7) == eval_report.sign_test(7, 0)
    # 8 discordant pairs split 7:1: P(X <= 1) = 9 / 256, doubled.
    assert eval_report.sign_test(7, 1) == pytest.approx(18 / 256)


def test_paired_difference_and_length_lines():
    # 100 pairs, 6 only DSA right, 2 only dense: +4 points, se = sqrt(8 - 100 * 0.04^2) / 100
    d, lo, hi = eval_report.paired_difference(6, 2, 100)
    se = (8 - 100 * 0.04 ** 2) ** 0.5 / 100
    assert d == pytest.approx(4.0) and lo == pytest.approx(100 * (0.04 - 1.96 * se)) and hi == pytest.approx(100 * (0.04 + 1.96 * se))
    assert eval_report.paired_difference(0, 0, 10) == (0.0, 0.0, 0.0)
    pc = {("a", 1024): {"both": 5, "dsa_only": 1, "dense_only": 0, "neither": 4},
          ("b", 1024): {"both": 0, "dsa_only": 0, "dense_only": 3, "neither": 7}}
    (line,) = eval_report.length_lines(pc)
    assert "20 paired examples of 2 tasks" in line and "DSA 30.0%" in line and "dense 40.0%" in line and "-10.0 points" in line


def test_subset_runs_part_of_a_cell_with_the_full_runs_ids(tmp_path):
    out = tmp_path / "s.json"
    eval_main(["--model", "dsa-tiny", "--lengths", "500", "--tasks", "niah_single", "--samples", "3",
               "--subset", "1:2", "--modes", "dsa", "--recall-lengths", "", "--out", str(out)])
    res = json.loads(out.read_text())
    (rec,) = res["samples"]["dsa"]["niah_single"]["500"]
    assert rec["example"] == "1234-niah_single-500-3-1" and res["accuracy"]["dsa"]["niah_single"]["500"]["n"] == 1
