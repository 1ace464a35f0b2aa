"""model/evals/failure_kinds.py: each kind on a hand-made example, and the distractors that
model/training/data.py plants.

    .venv/bin/python -m pytest -q tests/model/evals/test_failure_kinds.py
"""

from __future__ import annotations

import random

import pytest

from dsa_rag.model.training import data
from dsa_rag.model.evals.failure_kinds import edit_distance, failure_kind


def ex(answer, distractors=(), task="niah_multikey"):
    return data.Example([], "q?", answer, task, tuple(distractors))


@pytest.mark.parametrize("output, kind", [
    ("4120000", "near copy"),        # a zero dropped from the run
    ("55512", "distractor"),         # another key's value
    ("5512", "near distractor"),     # another key's value, mis-copied
    ("90210111", "other"),
    ("hello", "other"),
])
def test_single_answer_kinds(output, kind):
    assert failure_kind(ex("41200000", ["55512", "90210"]), output) == kind


def test_multi_item_kinds():
    e = ex("7, 8, 9", task="niah_multiquery")
    assert failure_kind(e, "9, 8, 7") == "order"
    assert failure_kind(e, "7, 8") == "partial"  # three edits from the answer: past a near copy
    assert failure_kind(ex("1234, 5678, 9012", task="niah_multiquery"), "1234, 0000") == "partial"
    vt = ex("ABCDE, FGHJK", ["QRSTU, VWXYZ"], task="vt")
    assert failure_kind(vt, "QRSTU, VWXYZ") == "distractor"
    assert failure_kind(vt, "ABCDE, VWXYZ") == "distractor"  # a name from the other chain


def test_edit_distance():
    assert edit_distance("", "abc") == 3
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("41200000", "4120000") == 1


def test_generated_examples_plant_their_distractors():
    rng = random.Random(5)
    tok = data.ByteTokenizer()
    for task, n_min in (("niah_multikey", 3), ("fact", 2), ("vt", 1), ("niah_single", 0)):
        e = data.make_example(rng, task, 1500, tok)
        text = "\\n".join(t for _, t in e.documents)
        assert len(e.distractors) >= n_min and e.answer not in e.distractors
        for d in e.distractors:  # every distractor value (or vt name) is in the documents
            for item in d.split(", "):
                assert item in text
