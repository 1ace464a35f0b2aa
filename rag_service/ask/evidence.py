"""Evidence from an answer's attention: the trace's per-position attention mass (summed over the
answer's tokens) -> whole sentences / lines of the documents, ranked by the mass they drew.

    from dsa_rag.rag_service.ask.evidence import rank_evidence
    spans = rank_evidence(layout, mass, max_citations=5)   # mass: {prompt position: attention mass}
    spans[0].citation          # Citation(..., char_start, char_end, snippet, share=0.71), the best first
    spans[0].share             # its share of the answer's attention mass on document text

Why not the most-attended positions as they are (`PackLayout.cite`, kept as the "raw" ranking):
1. Attention sinks. Some positions draw mass whatever the question: <bos>, the <doc> markers and
   document names (never cited: they are not document text), the first text tokens of the pack
   and a document's header line. The first `PACK_SINK_TOKENS` text tokens of a pack get weight 0
   and a short unpunctuated first line of a document (a title) `HEADER_WEIGHT`: discounted, not
   dropped, so a fact that really is on the first line still wins with its own mass.
2. Spans of whole units. Positions are snapped to the sentence (or list row / table row / short
   line) that holds them, so a citation never starts in the middle of a word ("orthwind") or is
   a lone space; units never cross a page, so a citation names one page.
3. Ranking by mass. A unit's score is the mass of its positions; units below `MIN_SHARE` of the
   total are dropped (a stray position is not evidence); adjacent units of one page that both
   drew `MERGE_SHARE` merge into one citation (evidence that runs over two sentences); the
   result is sorted by share.

Pure functions over a `PackLayout` (packing/layout.py); no model, no I/O.
Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_evidence.py`.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from dsa_rag.rag_service.packing.layout import SNIPPET_CHARS, LayoutEntry, PackLayout
from dsa_rag.rag_service.parsing.ingest import page_at
from dsa_rag.rag_service.schemas import Citation

PACK_SINK_TOKENS = 8  # the first text tokens of a pack: an attention sink whatever the question
HEADER_WEIGHT = 0.25  # a document's title line: discounted (sink-like), not dropped
HEADER_MAX_CHARS = 80
MIN_SHARE = 0.05  # units with less of the answer's (discounted) text mass are not evidence
# Adjacent units merge only when both drew this much: the answer's last tokens glance at what
# follows the value (where it ends), and that glance must not glue the next sentence on.
MERGE_SHARE = 0.15
MAX_UNIT_CHARS = 400  # a text with no sentence ends is cut at line breaks past this
HEADING_MAX_CHARS = 40  # an unpunctuated line this short before a capital: a heading, its own unit

# A unit ends at sentence punctuation followed by whitespace, at a blank line, and at a line
# break that closes a line ending in punctuation or a colon, a list / table row, or a short
# unpunctuated line (a heading). A line break inside a hard-wrapped sentence is not an end.
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]’”]*\s+")
_LIST_START = re.compile(r"^\s*(?:[-*•|]|\d+[.)])\s*")


@dataclass
class Evidence:
    citation: Citation
    share: float  # of the answer's discounted attention mass on document text, 0..1
    unit_texts: list[str]  # the sentences the citation holds


def text_units(text: str, lo: int = 0, hi: int | None = None, pages=None) -> list[tuple[int, int]]:
    """Sentence / row / heading spans (char_start, char_end) of text[lo:hi], whitespace trimmed,
    none empty, none crossing a page boundary of `pages` (PageSpan list)."""
    hi = len(text) if hi is None else hi
    cuts = {lo, hi}
    for p in pages or ():
        for c in (p.char_start, p.char_end):
            if lo < c < hi:
                cuts.add(c)
    pos = lo
    lines = text[lo:hi].split("\n")
    for i, line in enumerate(lines):
        end = pos + len(line)
        stripped = line.strip()
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        heading = len(stripped) < HEADING_MAX_CHARS and (not nxt.strip() or nxt.lstrip()[:1].isupper())
        if (not stripped or stripped[-1] in ".!?:;’”\"'" or _LIST_START.match(line) or _LIST_START.match(nxt)
                or heading):
            cuts.add(min(end + 1, hi))
        for m in _SENT_END.finditer(line):
            cuts.add(pos + m.end())
        pos = end + 1
    spans = []
    edges = sorted(cuts)
    for a, b in zip(edges, edges[1:]):
        for a2, b2 in _split_long(text, a, b):
            s = text[a2:b2]
            a3 = a2 + (len(s) - len(s.lstrip()))
            b3 = b2 - (len(s) - len(s.rstrip()))
            if b3 > a3:
                spans.append((a3, b3))
    return spans


def _split_long(text: str, a: int, b: int) -> list[tuple[int, int]]:
    """A unit longer than MAX_UNIT_CHARS is cut at its line breaks (else left whole)."""
    if b - a <= MAX_UNIT_CHARS:
        return [(a, b)]
    out, start = [], a
    while b - start > MAX_UNIT_CHARS:
        nl = text.rfind("\n", start + 1, start + MAX_UNIT_CHARS)
        if nl < 0:
            break
        out.append((start, nl))
        start = nl + 1
    out.append((start, b))
    return out


def _weight(layout: PackLayout, e: LayoutEntry, pos: int, char: int, header_end: int | None) -> float:
    first = layout.entries[0]
    if e is first and pos - first.text_token_start < PACK_SINK_TOKENS:
        return 0.0
    if header_end is not None and char < header_end:
        return HEADER_WEIGHT
    return 1.0


def _header_end(e: LayoutEntry) -> int | None:
    """End of the member's first line when it looks like a title (short, no sentence end)."""
    if e.char_start != 0:  # a later window of a long document starts mid-text: no title there
        return None
    text = e.tt.text[: HEADER_MAX_CHARS + 1]
    line = text.split("\n", 1)[0]
    if "\n" not in text or not line.strip() or line.rstrip()[-1:] in ".!?":
        return None
    return len(line)


def rank_evidence(layout: PackLayout, mass: dict[int, float], max_citations: int = 5) -> list[Evidence]:
    """Attention mass per prompt position -> the best-supported document units, best first."""
    by_entry: dict[int, list[tuple[int, float]]] = {}  # id(entry) -> [(char, weighted mass)]
    entries: dict[int, LayoutEntry] = {}
    headers: dict[int, int | None] = {}
    for pos, m in mass.items():
        loc = layout.locate(int(pos))
        if loc is None or m <= 0:
            continue  # <bos>, markers, names, the question: never cited
        e, c = loc
        if id(e) not in headers:
            headers[id(e)] = _header_end(e)
            entries[id(e)] = e
        w = _weight(layout, e, int(pos), c, headers[id(e)])
        if w > 0:
            by_entry.setdefault(id(e), []).append((c, m * w))
    total = sum(m for pts in by_entry.values() for _, m in pts)
    if total <= 0:
        return []
    scored = []  # (entry, unit index, (a, b), mass)
    for key, pts in by_entry.items():
        e = entries[key]
        units = text_units(e.tt.text, e.char_start, e.char_end, e.pages)
        starts = [a for a, _ in units]
        acc: dict[int, float] = {}
        for c, m in pts:
            i = bisect.bisect_right(starts, c) - 1
            if i >= 0 and c < units[i][1] + 1:  # a unit owns the whitespace right after it
                acc[i] = acc.get(i, 0.0) + m
        for i, m in acc.items():
            if m / total >= MIN_SHARE:
                scored.append((e, i, units[i], m))
    # adjacent kept units of one member and page merge into one citation
    scored.sort(key=lambda s: (id(s[0]), s[1]))
    groups: list[list] = []
    for s in scored:
        g = groups[-1] if groups else None
        if (g and g[-1][0] is s[0] and g[-1][1] + 1 == s[1] and min(g[-1][3], s[3]) / total >= MERGE_SHARE
                and page_at(s[0].pages, g[-1][2][0]) == page_at(s[0].pages, s[2][0])):
            g.append(s)
        else:
            groups.append([s])
    out = []
    for g in groups:
        e, a, b = g[0][0], g[0][2][0], g[-1][2][1]
        share = sum(s[3] for s in g) / total
        text = e.tt.text
        cite = Citation(document_id=e.document_id, name=e.name, page=page_at(e.pages, a), char_start=a, char_end=b,
                        snippet=text[a:b][:SNIPPET_CHARS], share=round(share, 4))
        out.append(Evidence(cite, share, [text[u[0]:u[1]] for _, _, u, _ in g]))
    out.sort(key=lambda ev: ev.share, reverse=True)
    return out[:max_citations]
