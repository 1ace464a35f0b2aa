"""Citations without attention traces (ask/lexical_citations.py), what `engine: openai` answers get:
the sentence that holds the answer's value and the question's terms comes first, rare terms beat
common ones, the API marks the method, support is scored as for attention citations, and an
answer with no content terms gets no citation. Layouts are real (`build_layout`, byte tokenizer).

    .venv/bin/python -m pytest -q tests/rag_service/test_lexical_citations.py
"""

from __future__ import annotations

from dsa_rag.rag_service.ask.lexical_citations import lexical_ground, rank_lexical
from dsa_rag.rag_service.schemas import Citation
from tests.rag_service.test_evidence import FACT, PAGES, TEXT, layout_of

OTHER = ("Lisbon office\nThe access code of the Lisbon office is 1188. The Lisbon office opens at nine.\n"
         "The code 7351902 also appears in an old memo about parking.")


def test_the_sentence_with_the_value_and_the_question_terms_is_cited_first():
    lay = layout_of([("report.pdf", TEXT, PAGES), ("lisbon.txt", OTHER, [])])
    g = lexical_ground(lay, "What is the access code of the Porto warehouse?", "7351902", max_citations=3,
                       threshold=0.75)
    top = g.citations[0]
    assert TEXT[top.char_start:top.char_end] == FACT and top.snippet == FACT
    assert top.name == "report.pdf" and top.page == 2 and top.citation_method == "lexical"
    # the memo holds the value too, without the question's "Porto warehouse": cited, but second
    assert [c.name for c in g.citations] == ["report.pdf", "lisbon.txt"]
    assert g.citations[1].snippet.startswith("The code 7351902")
    assert abs(sum(c.share for c in g.citations) - 1) < 1e-3 and top.share > g.citations[1].share
    assert g.support == 1.0 and g.supported


def test_no_content_terms_no_citations_and_an_unsupported_answer_abstains():
    lay = layout_of([("report.pdf", TEXT, PAGES)])
    assert rank_lexical(lay, "Is it open?", "the", max_citations=5) == []  # only stop words
    g = lexical_ground(lay, "Who signed the Porto warehouse lease?", "7351902", threshold=0.75)
    assert g.citations and g.support < 0.75 and not g.supported  # "signed", "lease" are not in the sentence


def test_attention_is_the_default_method_of_a_citation():
    c = Citation(document_id="d", name="a.txt", char_start=0, char_end=1)
    assert c.citation_method == "attention" and c.model_dump()["citation_method"] == "attention"
