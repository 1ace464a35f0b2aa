"""Synthetic QA data: the service's prompt format, answers planted in the documents, lengths.

    .venv/bin/python -m pytest -q tests/model/training/test_data.py
"""

import random

import pytest

from dsa_rag.model.training import data
from dsa_rag.model.tokenizer import ByteTokenizer

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


@pytest.mark.parametrize("task", data.AUX_TASKS)
def test_aux_tasks_answer_is_a_copy_of_document_text(task):
    for seed in range(20):
        ex = data.make_example(random.Random(seed), task, 600, TOK)
        ids, a0 = data.encode(ex, TOK)
        assert ids[:a0] == TOK.prompt_ids(ex.documents, ex.question)
        # (a hard-wrapped document may break the quoted sentence over two lines)
        assert ex.answer and ex.answer in " ".join(t for _, t in ex.documents).replace("\n", " ")


def test_batch_question_tokens_get_their_own_weight():
    x, y, w = data.batch(random.Random(3), 200, 1024, tasks=("niah_single",), doc_weight=0.1, question_weight=0.7)
    q_id, a_id = TOK.special("<question>"), TOK.special("<answer>")
    for b in range(x.shape[0]):
        row = x[b].tolist()
        q0, a0 = row.index(q_id), row.index(a_id)
        assert (w[b, q0:a0] == 0.7).all()  # targets = the question's bytes and <answer>
        assert (w[b, 1:q0] == pytest.approx(0.1)) and (w[b, a0:] >= 1).any()
    with pytest.raises(ValueError, match="answer"):
        data.batch(random.Random(3), 200, 1024, question_weight=1.0)


def test_hard_wrap_keeps_length_and_words():
    text = " ".join(data.filler_sentence(random.Random(i)) for i in range(10))
    wrapped = data.hard_wrap(text, 60)
    assert len(wrapped) == len(text) and wrapped.replace("\n", " ") == text
    assert max(len(line) for line in wrapped.split("\n")) <= 60


def test_filler_mentions_the_names_it_is_given():
    rng = random.Random(0)
    sents = [data.filler_sentence(rng, ("Kalomi Ren",)) for _ in range(60)]
    assert 5 < sum("Kalomi Ren" in s for s in sents) < 40


def test_batch_first_answer_token_weight():
    x, y, w = data.batch(random.Random(4), 200, 1024, tasks=("niah_single",), first_answer_weight=3.0)
    a_id = TOK.special("<answer>")
    for b in range(x.shape[0]):
        a0 = x[b].tolist().index(a_id)
        assert w[b, a0] == 3.0 and (w[b, a0 + 1:][w[b, a0 + 1:] > 0] == 1.0).all()
