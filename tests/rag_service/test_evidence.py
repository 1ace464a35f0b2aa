"""Citations from attention mass (ask/evidence.py, ask/grounding.py): sinks discounted, whole
sentences, adjacent spans merged, small and empty spans dropped, ranked by share; and the
"raw" ranking kept for comparison. Layouts are real (`build_layout` over the byte tokenizer);
the mass is written by hand, so every case says exactly what the attention read.

    .venv/bin/python -m pytest -q tests/rag_service/test_evidence.py
"""

from __future__ import annotations

import pytest

from dsa_rag.model.tokenizer import ByteTokenizer
from dsa_rag.rag_service.ask.evidence import PACK_SINK_TOKENS, rank_evidence, text_units
from dsa_rag.rag_service.ask.grounding import ground
from dsa_rag.rag_service.packing.layout import build_layout
from dsa_rag.rag_service.schemas import PageSpan

TOK = ByteTokenizer()
TITLE = "Northwind Traders - Annual Report"
PAGE1 = (f"{TITLE}\nThe board noted that the shipping schedule improved during the winter.\n"
         "According to the survey, customer feedback grew while supply costs fell.")
PAGE2 = ("Financial summary\nThe engineers observed that energy prices rose sharply this year.\n"
         "The access code of the Porto warehouse is 7351902.\nIn short, the auditors agreed clearly about the audit.")
TEXT = PAGE1 + "\n\n" + PAGE2
PAGES = [PageSpan(page=1, char_start=0, char_end=len(PAGE1)),
         PageSpan(page=2, char_start=len(PAGE1) + 2, char_end=len(TEXT))]
FACT = "The access code of the Porto warehouse is 7351902."


def layout_of(docs):
    """docs: [(name, text, pages)] -> PackLayout of one pack holding them."""
    members = [(f"d{i}", name, 0, len(text), text, pages) for i, (name, text, pages) in enumerate(docs)]
    return build_layout(TOK, "p1", 1, members, len(TOK.prompt_ids([(n, t) for n, t, _ in docs])))


def pos_of(layout, doc: int, char: int) -> int:
    """Prompt position of document `doc`'s character `char` (byte tokenizer, ASCII text)."""
    return layout.entries[doc].text_token_start + char


def spread(layout, doc, a, b, total):
    return {pos_of(layout, doc, c): total / (b - a) for c in range(a, b)}


def test_the_answer_sentence_beats_the_title_sink_and_is_cut_at_sentence_ends():
    lay = layout_of([("report.pdf", TEXT, PAGES)])
    v = TEXT.index("7351902")
    mass = {**spread(lay, 0, 0, len(TITLE), 3.0),                 # the sink: heavy on the title line
            **spread(lay, 0, v, v + 7, 2.0),                       # the value the answer copied
            pos_of(lay, 0, TEXT.index("energy")): 0.01}            # a stray position: below MIN_SHARE
    ev = rank_evidence(lay, mass)
    top = ev[0].citation
    assert TEXT[top.char_start:top.char_end] == FACT and top.page == 2
    assert ev[0].share == pytest.approx(top.share, abs=1e-4) and top.share > 0.5
    assert [e.share for e in ev] == sorted((e.share for e in ev), reverse=True)
    assert all(TEXT[e.citation.char_start:e.citation.char_end].strip() == TEXT[e.citation.char_start:e.citation.char_end]
               and e.citation.char_end > e.citation.char_start for e in ev)
    assert "energy" not in " ".join(e.citation.snippet for e in ev)  # dropped: too little mass
    # the first tokens of the pack draw nothing at all; the rest of the title line is discounted
    sink_only = rank_evidence(lay, spread(lay, 0, 0, PACK_SINK_TOKENS, 5.0))
    assert sink_only == []


def test_raw_ranking_is_the_old_behaviour_for_comparison():
    lay = layout_of([("report.pdf", TEXT, PAGES)])
    v = TEXT.index("7351902")
    mass = {**spread(lay, 0, 0, len(TITLE), 3.0), **spread(lay, 0, v, v + 7, 2.0)}
    raw = ground(lay, mass, "What is the access code of the Porto warehouse?", "7351902", ranking="raw").citations
    assert raw[0].char_start == 0 and raw[0].share is None  # the title group first: the symptom
    ev = ground(lay, mass, "What is the access code of the Porto warehouse?", "7351902").citations
    assert TEXT[ev[0].char_start:ev[0].char_end] == FACT


def test_a_fact_on_the_first_line_still_wins_with_its_own_mass():
    text = "Budget memo: the budget of Unit Kaloren is 4410.\nThe board noted that rainfall fell this year."
    lay = layout_of([("memo.txt", text, [])])
    v = text.index("4410")
    ev = rank_evidence(lay, spread(lay, 0, v, v + 4, 1.0))
    assert text[ev[0].citation.char_start:ev[0].citation.char_end] == text.split("\n")[0]


def test_adjacent_sentences_merge_and_pages_do_not():
    lay = layout_of([("report.pdf", TEXT, PAGES)])
    a = TEXT.index("The engineers observed")
    b = TEXT.index("The access code")
    mass = {**spread(lay, 0, a + 4, a + 20, 1.0), **spread(lay, 0, b + 4, b + 20, 1.0),
            **spread(lay, 0, len(PAGE1) - 10, len(PAGE1), 1.0)}          # the end of page 1
    ev = rank_evidence(lay, mass)
    spans = sorted((e.citation.char_start, e.citation.char_end, e.citation.page) for e in ev)
    assert (a, b + len(FACT), 2) in spans  # two adjacent sentences, one citation
    assert any(p == 1 for *_, p in spans) and len(spans) == 2  # page 1's sentence stays its own
    merged = next(e for e in ev if e.citation.char_start == a)
    assert len(merged.unit_texts) == 2 and merged.unit_texts[1] == FACT


def test_citations_of_two_documents_in_one_pack():
    other = "Second file.\nThe budget of Lake Ren is 88 units."
    lay = layout_of([("report.pdf", TEXT, PAGES), ("b.txt", other, [])])
    v = other.index("88")
    ev = rank_evidence(lay, {**spread(lay, 1, v, v + 2, 1.0), pos_of(lay, 0, 200): 0.3})
    assert ev[0].citation.document_id == "d1" and ev[0].citation.page is None
    assert ev[0].citation.snippet == "The budget of Lake Ren is 88 units."


@pytest.mark.parametrize("text,units", [
    ("One. Two!\nThree?", ["One.", "Two!", "Three?"]),
    # a hard-wrapped sentence is one unit; a short title line is its own
    ("Title Line\nAccording to the survey, customer feedback grew while\nsupply costs fell.",
     ["Title Line", "According to the survey, customer feedback grew while\nsupply costs fell."]),
    ("| name | value |\n| Kal | 12 |\n* Ren, code = X", ["| name | value |", "| Kal | 12 |", "* Ren, code = X"]),
    ("   \n\n  Only this.  ", ["Only this."]),
], ids=["punctuation", "hard-wrap-and-title", "table-and-list", "whitespace"])
def test_text_units(text, units):
    assert [text[a:b] for a, b in text_units(text)] == units


def test_units_never_cross_a_page():
    text = "first page ends without a stop\n\nsecond page starts here."
    pages = [PageSpan(page=1, char_start=0, char_end=30), PageSpan(page=2, char_start=32, char_end=len(text))]
    assert [text[a:b] for a, b in text_units(text, pages=pages)] == ["first page ends without a stop",
                                                                    "second page starts here."]
