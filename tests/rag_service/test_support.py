"""Abstention: the support score (ask/support.py) and what the merge returns when no pack's answer
is supported (ask/merge.py): "Not in the documents.", `abstained`, no citation, no value.

    .venv/bin/python -m pytest -q tests/rag_service/test_support.py
"""

from __future__ import annotations

import pytest

from dsa_rag.rag_service.ask.merge import PackResult, merge
from dsa_rag.rag_service.ask.support import ABSTAIN_TEXT, coverage, grounding, source_unit, support_score, terms
from dsa_rag.rag_service.schemas import Citation

FACT = "The access code of the Porto warehouse is 7351902."


def test_terms_drop_scaffolding_and_stem():
    assert terms("What is the access code of the Porto warehouse?") == {"access", "code", "porto", "warehouse"}
    assert terms("Tell me Lake Ren’s codes.") == {"lake", "ren", "code"}
    assert terms("VAR ABC = 92A-B5A.") == {"var", "abc", "92a-b5a"}


@pytest.mark.parametrize("question,answer,expect", [
    ("What is the access code of the Porto warehouse?", "7351902", 1.0),
    ("What is the Porto warehouse's access code?", "7351902", 1.0),
    ("Who signed the Porto warehouse lease?", "7351902", 0.5),           # the example
    ("What is the access code of the Lisbon depot?", "7351902", 0.5),    # an entity never mentioned
    ("What is the access code of the Porto warehouse?", "7351903", 1.0),  # mis-copied: wrong, not absent
], ids=["answerable", "paraphrase", "other-attribute", "other-entity", "miscopied-value"])
def test_support_score(question, answer, expect):
    assert support_score(question, answer, ["Financial summary", FACT]) == pytest.approx(expect)


def test_the_answer_is_checked_against_the_sentence_it_came_from():
    budget = "The board noted that the Porto warehouse budget grew."
    # the value comes from the access-code sentence, even when the budget one drew more attention
    assert source_unit("7351902", [budget, FACT]) == FACT
    assert support_score("What is the budget of the Porto warehouse?", "7351902", [budget, FACT]) == pytest.approx(2 / 3)
    # a real checkpoint wraps the value in words: the value (and names) find the sentence
    assert source_unit("The warehouse in Porto uses the code 7351902.", [budget, FACT]) == FACT
    # a slightly mis-copied value still finds its sentence (a wrong answer, not a missing fact)
    order = "Pesa's order id: 8400346."
    assert source_unit("840346", ["The new warehouse was delayed.", order]) == order
    assert support_score("What is the order id of Pesa?", "840346", ["The new warehouse was delayed.", order]) == 1.0
    assert grounding("violet-quartz", "Its favorite color is violet.") < 1.0


def test_support_reads_each_sentence_alone():
    # "budget" in the neighbouring sentence must not make the fact's sentence cover the question
    units = [FACT, "The board noted that the school budget grew."]
    assert support_score("What is the budget of the Porto warehouse?", "7351902", units) < 1.0
    assert support_score("What is it?", "7351902", units) == 1.0  # nothing to check but the answer
    assert support_score("What is the access code of the Porto warehouse?", "7351902", []) == 0.0
    assert coverage("access code", "") == 0.0 and grounding("", FACT) == 0.0


def cite(doc, a, b):
    return Citation(document_id=doc, name=f"{doc}.pdf", page=1, char_start=a, char_end=b, snippet="x", share=0.5)


def result(pack, text, score, abstained, support, cites):
    return PackResult(pack_id=pack, text=text, score=score, abstained=abstained, support=support, citations=cites)


def test_merge_abstains_when_no_pack_is_supported_and_leaks_no_value():
    out = merge([result("p1", "7351902", -0.002, True, 0.5, [cite("d1", 0, 10)]),
                 result("p2", "4410", -0.5, True, 0.25, [cite("d2", 5, 9)])])
    assert out["answer"] == ABSTAIN_TEXT and out["abstained"] is True and out["citations"] == []
    assert out["support"] == 0.5 and out["pack_id"] == "p1"
    assert all(p["answer"] == ABSTAIN_TEXT and p["citations"] == [] for p in out["packs"])
    assert "7351902" not in repr(out) and "4410" not in repr(out)


def test_merge_prefers_a_supported_answer_over_a_likelier_unsupported_one():
    out = merge([result("p1", "7351902", -0.001, True, 0.5, [cite("d1", 0, 10)]),
                 result("p2", "4410", -0.3, False, 1.0, [cite("d2", 5, 9), cite("d2", 20, 30)])])
    assert out["answer"] == "4410" and out["abstained"] is False and out["pack_id"] == "p2"
    assert [(c.document_id, c.char_start) for c in out["citations"]] == [("d2", 5), ("d2", 20)]


def test_merge_without_abstention_keeps_every_answer():
    out = merge([result("p1", "7351902", -0.002, False, 0.5, [cite("d1", 0, 10)])])
    assert out["answer"] == "7351902" and out["abstained"] is False and out["support"] == 0.5
    assert out["packs"][0]["support"] == 0.5 and len(out["citations"]) == 1
