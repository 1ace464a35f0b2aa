"""Synthetic QA data: the service's prompt format, answers planted in the documents, lengths.

    .venv/bin/python -m pytest -q tests/model/test_data.py
"""

import random

import pytest

from model import data
from model.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize("task", data.TASKS)
def test_example_is_the_service_prompt_format(task):
    ex = data.make_example(random.Random(1), task, 600, TOK)
    ids, a0 = data.encode(ex, TOK)
    # exactly tokenizer.prompt_ids(documents, question) + answer + <eos>
    assert ids[:a0] == TOK.prompt_ids(ex.documents, ex.question)
    assert ids[a0:] == TOK.encode(ex.answer) + [TOK.eos_id]
    assert ids[0] == TOK.bos_id and ids[a0 - 1] == TOK.special("<answer>")
    text = TOK.decode(ids, skip_special=False)
    assert text.startswith("<bos><doc>") and text.endswith(f"<answer>{ex.answer}<eos>")
    assert abs(len(ids) - 600) < 80  # about the requested length
    # the answer's pieces are in the documents (vt: the variable names)
    body = " ".join(t for _, t in ex.documents)
    for piece in ex.answer.split(", "):
        assert piece in body


def test_depth_and_determinism():
    a = data.make_example(random.Random(5), "niah_single", 2000, TOK, depth=0.0)
    b = data.make_example(random.Random(5), "niah_single", 2000, TOK, depth=0.0)
    assert a == b
    first = a.documents[0][1]
    assert a.answer in first[:300]


def test_batch_marks_answer_tokens():
    x, y, w = data.batch(random.Random(0), 200, 1024, tasks=("niah_single",), doc_weight=0.1)
    assert x.shape == y.shape == w.shape and x.shape[0] * x.shape[1] <= 1024
    for b in range(x.shape[0]):
        ans = (w[b] >= 1).nonzero().flatten()
        assert y[b, ans[-1]] == TOK.eos_id  # the last weighted target is <eos>
        assert x[b, ans[0]] == TOK.special("<answer>")  # the first answer token follows <answer>
