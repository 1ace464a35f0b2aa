"""Does the evidence the answer read support it? A support score in [0, 1] and the abstention
("not in the documents") it drives.

    from dsa_rag.rag_service.ask.support import support_score, ABSTAIN_TEXT
    s = support_score("What is the access code of Project Lomiren?", "7351902",
                      ["The access code of Project Lomiren is 7351902."])      # -> 1.0
    s = support_score("Who signed the lease of Project Lomiren?", "7351902", [...])  # -> 0.5: abstain

support = coverage(question, u*), where u* is the evidence unit the answer came from: among the
sentences of the top citations (which the answer's attention chose: evidence.py), the one that
best holds the answer's value (grounding, below; the most attended one on a tie).
- coverage: the share of the question's content terms (names, attributes: stop words and
  question scaffolding removed, plurals stemmed) that u* contains. A question about something
  the documents do not hold names an entity or an attribute that the sentence the model copied
  its answer from does not contain; that is how "Who signed the Porto warehouse lease?" is
  caught when the model answers with the warehouse's access code.
- grounding (to find u*): how well the unit holds the answer's *value* terms: the terms with a
  digit or a capital letter inside the sentence (numbers, codes, names), or all its terms when
  it has none ("violet-quartz"); each scored by its closest term of the unit (difflib ratio),
  so a slightly mis-copied value ("840346" for "8400346") still finds its sentence, and the words
  a fluent model wraps around a value ("The warehouse uses code 7351902") do not count.
An answer is abstained when support < the calibrated threshold (setting `abstain_threshold`,
fitted by benchmarks/grounding_bench.py on held-out questions, separate from those it reports).

Why the value does not gate the decision: "not in the documents" is a claim about the documents
(nothing there is about what was asked), not about the model's copying. A question the documents
do answer, where the model mis-copies the value, is a wrong answer (counted by exact match), not
an abstention: gating on exact grounding abstained on every dsa-tiny mis-copy (~10% of the
answerable questions), far over the 5% false-abstention budget.

Why this and not the model's confidence: dsa-tiny copies the only value in a document with the
same log-prob whether or not the question asks for it (measured: -0.0023 vs -0.0024 on the
README example), and its attention reads the same bytes either way, so neither separates
answerable from unanswerable. A real checkpoint is better calibrated, but the check is the same
one a reader does (is what was asked, and what was answered, in the cited sentence?), needs no
training, works on any model whose attention we can trace, and its one threshold is re-fitted
per model and corpus. Its limit: a question paraphrased away from the document's words
("Who founded X?" vs "X was started by ...") scores lower; the threshold absorbs part of that.

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_support.py`.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

ABSTAIN_TEXT = "Not in the documents."
# Question scaffolding and function words: they say how something is asked, not what.
STOPWORDS = frozenset("""
a an the of to in on at for from by with about as and or but not no is are was were be been being am do does did
have has had having it its it's this that these those there here what which who whom whose when where why how
tell me give show please find list name say says said according document documents text report file
value values all any some each one much many more most value the their them they we us our you your i my
can could would should will shall may might must just also only other another same such than then so very
""".split())
_WORD = re.compile(r"[\w][\w\-]*", re.UNICODE)


def _stem(w: str) -> str:
    """Plurals off, so 'codes' meets 'code' and 'entries' 'entry' (short words and -ss/-us/-is kept)."""
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith("s") and len(w) > 3 and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def terms(text: str) -> set[str]:
    """Content terms: lowercased words (hyphenated codes kept whole), possessives and plurals
    stemmed, stop words dropped."""
    text = text.replace("’", "'").lower()
    text = re.sub(r"'s\b", "", text)
    return {_stem(w.strip("-")) for w in _WORD.findall(text) if w.strip("-") and w.strip("-") not in STOPWORDS}


def coverage(question: str, unit: str) -> float:
    q = terms(question)
    if not q:
        return 1.0  # nothing to check ("What is it?"): grounding decides
    return len(q & terms(unit)) / len(q)


def value_terms(answer: str) -> set[str]:
    """The answer's terms that carry a value: with a digit, or capitalized after the first word
    (names); all its terms when none does."""
    words = _WORD.findall(answer.replace("’", "'"))
    marked = " ".join(w for i, w in enumerate(words) if any(c.isdigit() for c in w) or (i > 0 and w[:1].isupper()))
    return terms(marked) or terms(answer)


def grounding(answer: str, unit: str) -> float:
    """How well the unit holds the answer's value terms: each term's closest unit term (difflib
    ratio, 1 = present), averaged; an answer of only stop words checks its text."""
    a, u = value_terms(answer), terms(unit)
    if not a:
        return 1.0 if answer.strip() and answer.strip().lower() in unit.lower() else 0.0
    return sum(max((1.0 if t in u else SequenceMatcher(None, t, w).ratio() for w in u), default=0.0)
               for t in a) / len(a)


def source_unit(answer: str, units: list[str]) -> str | None:
    """The evidence unit the answer came from: the best grounding, the earliest (most attended) on a tie."""
    best, best_g = None, -1.0
    for u in units:
        g = grounding(answer, u)
        if g > best_g + 1e-9:
            best, best_g = u, g
    return best


def support_score(question: str, answer: str, units: list[str]) -> float:
    """coverage(question, the unit the answer came from); 0 without evidence or answer."""
    u = source_unit(answer, units) if answer.strip() else None
    return 0.0 if u is None else coverage(question, u)
