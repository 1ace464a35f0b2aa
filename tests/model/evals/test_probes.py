"""model/evals/position_probe.py and model/evals/needle_probe.py on a very small random model: the
position probe scores every shift over the same examples, the needle probe reports per-layer
shares of the answer rows.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/model/evals/test_probes.py
"""

import random

from dsa_rag.model.evals.needle_probe import probe_example
from dsa_rag.model.evals.position_probe import probe
from dsa_rag.model.load import build_model
from dsa_rag.model.tokenizer import ByteTokenizer
from dsa_rag.model.training import data, train


def test_position_probe_reports_each_shift_over_the_same_examples():
    m = build_model(train.tiny_cfg()).init_weights(seed=0).eval()
    res = probe(m, 300, 2, [0, 1000], stage=0)
    assert set(res) == {0, 1000} and all(v in (0.0, 0.5, 1.0) for v in res.values())


def test_needle_probe_reads_the_answer_rows_selection():
    """The probe's per-layer hit rate is a share of the answer rows; an answer whose value is not
    in the prompt exactly once is skipped (its source byte is ambiguous)."""
    m = build_model(train.tiny_cfg()).init_weights(seed=0).eval()
    tok = ByteTokenizer()
    ex = data.make_example(random.Random(0), "niah_single", 400, tok)
    ids, a0 = data.encode(ex, tok)
    r = probe_example(m, ids, a0)
    n_val = len(ids) - 1 - a0
    assert r is not None and len(r["hit"]) == len(r["mass"]) == m.cfg.num_hidden_layers
    assert all(round(h * n_val, 6) == round(h * n_val) for h in r["hit"]) and all(0 <= v <= 1 + 1e-5 for v in r["mass"])
    assert probe_example(m, ids[:a0] + ids[a0:a0 + 1] * 2 + ids[-1:], a0) is None  # a repeated byte: not one clear source
