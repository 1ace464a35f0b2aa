"""Citations without attention traces: the fallback for engines that return none (an OpenAI-compatible
vLLM / SGLang upstream, `engine: openai`). The API marks them `citation_method: "lexical"`
(attention-traced ones say "attention").

    from dsa_rag.rag_service.ask.lexical_citations import lexical_ground
    g = lexical_ground(layout, question, answer, max_citations=5, threshold=0.75)
    g.citations[0].snippet, g.citations[0].citation_method   # "The access code ... is 7351902.", "lexical"

The method (documented in the README, "In front of vLLM or SGLang"):
1. Units: the pack's documents cut into sentences / rows / headings exactly as the attention
   citations are (`evidence.text_units`: never mid-word, never across a page).
2. Terms: content words of the answer and the question (`support.terms`: stop words out,
   plurals stemmed), each weighted by its rarity in the pack, idf = log(1 + units / units holding it),
   so a value ("7351902", a name) counts far more than a word every sentence has.
3. Score of a unit = the idf-weighted share of the answer's terms it holds, plus
   `QUESTION_WEIGHT` times that share for the question's terms (the sentence that holds the value
   *and* names what was asked beats another sentence with the same value). A unit must hold at
   least one answer term: a citation always shares something with what was answered.
4. The best `max_citations` units, best first; `share` = its score over the kept units' total.
Support (for abstention) is scored as for attention citations (`support.support_score` over the
top units), so `abstain_threshold` means the same with either method.

Its limits, compared with attention: it finds where the answer's *words* are, not what the model
read. An answer that paraphrases ("forty-one million") or a value repeated in several documents
gets weaker or ambiguous citations; an empty or generic answer ("yes") gets none.
Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_lexical_citations.py`.
"""

from __future__ import annotations

import math

from dsa_rag.rag_service.ask.evidence import text_units
from dsa_rag.rag_service.ask.grounding import SUPPORT_CITATIONS, Grounding
from dsa_rag.rag_service.ask.support import support_score, terms
from dsa_rag.rag_service.packing.layout import SNIPPET_CHARS, PackLayout
from dsa_rag.rag_service.parsing.ingest import page_at
from dsa_rag.rag_service.schemas import Citation

QUESTION_WEIGHT = 0.25  # question terms break ties between units holding the answer's terms
METHOD = "lexical"


def lexical_units(layout: PackLayout) -> list[tuple]:
    """(entry, char_start, char_end, text, terms) for every sentence-like unit of the pack."""
    out = []
    for e in layout.entries:
        text = e.tt.text
        for a, b in text_units(text, e.char_start, e.char_end, e.pages):
            out.append((e, a, b, text[a:b], terms(text[a:b])))
    return out


def rank_lexical(layout: PackLayout, question: str, answer: str, max_citations: int = 5) -> list[tuple[Citation, str]]:
    """The pack's units that best hold the answer's terms -> [(citation, unit text)], best first."""
    a_terms = terms(answer)
    if not a_terms or max_citations <= 0:
        return []
    units = lexical_units(layout)
    if not units:
        return []
    q_terms = terms(question) - a_terms
    wanted = a_terms | q_terms
    df = {t: 0 for t in wanted}
    for *_, ts in units:
        for t in wanted & ts:
            df[t] += 1
    idf = {t: math.log(1 + len(units) / df[t]) if df[t] else 0.0 for t in wanted}
    a_total = sum(idf[t] for t in a_terms) or 1.0
    q_total = sum(idf[t] for t in q_terms) or 1.0
    scored = []
    for e, a, b, text, ts in units:
        hit = a_terms & ts
        if not hit:
            continue
        score = sum(idf[t] for t in hit) / a_total + QUESTION_WEIGHT * sum(idf[t] for t in q_terms & ts) / q_total
        scored.append((score, -a, e, a, b, text))  # ties: the earlier unit first
    scored.sort(key=lambda s: (s[0], s[1]), reverse=True)
    top = scored[:max_citations]
    total = sum(s[0] for s in top) or 1.0
    return [(Citation(document_id=e.document_id, name=e.name, page=page_at(e.pages, a), char_start=a, char_end=b,
                      snippet=text[:SNIPPET_CHARS], share=round(score / total, 4), citation_method=METHOD), text)
            for score, _, e, a, b, text in top]


def lexical_ground(layout: PackLayout, question: str, answer: str, *, max_citations: int = 5,
                   threshold: float = 0.0) -> Grounding:
    """`grounding.ground` for an answer without an attention trace: lexical citations and the
    support of the answer by the best of them."""
    ranked = rank_lexical(layout, question, answer, max_citations=max(max_citations, SUPPORT_CITATIONS))
    units = [text for _, text in ranked[:SUPPORT_CITATIONS]]
    support = round(support_score(question, answer, units), 4) if answer.strip() and units else 0.0
    return Grounding([c for c, _ in ranked[:max_citations]], support, support >= threshold)
