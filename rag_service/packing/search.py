"""Lexical pack selection: BM25 over chunks (pure Python), then chunk scores -> ranked packs.

    idx = Bm25Index()
    idx.add("doc_a", ["the key of rome is 42", "..."])      # one string per chunk
    idx.search("what is the key of rome?", top_k=10)       # [(score, doc_id, chunk_no), ...]

Terms are lowercase word characters (`\\w+`, so accented and non-Latin words count) minus a
short English stop-word list. The index is incremental: documents are immutable, so adding
and removing whole documents keeps document frequencies and lengths exact without rebuilds.
`rank_packs` turns chunk hits into packs: a pack's score is its best chunk's score (ties
broken by the sum of its hits); a chunk of a windowed document counts for every window that
contains it (or, straddling a cut, the window holding most of it).

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_search.py`.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

_WORD = re.compile(r"\w+", re.UNICODE)
STOPWORDS = frozenset(
    "a an and are as at be by do does did for from has have how in is it its of on or that the "
    "this to was were what when where which who whom why will with".split()
)


def terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


class Bm25Index:
    """Okapi BM25 over chunks; a chunk is addressed as (doc_id, chunk_no)."""

    def __init__(self, k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.df: Counter[str] = Counter()  # chunks containing the term
        self.docs_with: dict[str, set[str]] = defaultdict(set)  # term -> doc ids
        self.postings: dict[str, dict[str, list[tuple[int, int]]]] = {}  # doc -> term -> [(chunk, tf)]
        self.lengths: dict[str, list[int]] = {}  # doc -> chunk lengths in terms
        self.n_chunks = 0
        self.total_len = 0

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.postings

    @property
    def doc_ids(self) -> set[str]:
        return set(self.postings)

    def add(self, doc_id: str, chunk_texts: list[str]) -> None:
        if doc_id in self.postings:
            return
        post: dict[str, list[tuple[int, int]]] = defaultdict(list)
        lengths = []
        for i, text in enumerate(chunk_texts):
            ts = terms(text)
            lengths.append(len(ts))
            for t, tf in Counter(ts).items():
                post[t].append((i, tf))
        for t, lst in post.items():
            self.df[t] += len(lst)
            self.docs_with[t].add(doc_id)
        self.postings[doc_id] = dict(post)
        self.lengths[doc_id] = lengths
        self.n_chunks += len(lengths)
        self.total_len += sum(lengths)

    def remove(self, doc_id: str) -> None:
        post = self.postings.pop(doc_id, None)
        if post is None:
            return
        for t, lst in post.items():
            self.df[t] -= len(lst)
            if self.df[t] <= 0:
                del self.df[t]
            self.docs_with[t].discard(doc_id)
            if not self.docs_with[t]:
                del self.docs_with[t]
        lengths = self.lengths.pop(doc_id)
        self.n_chunks -= len(lengths)
        self.total_len -= sum(lengths)

    def idf(self, term: str) -> float:
        df = self.df.get(term, 0)
        return math.log(1.0 + (self.n_chunks - df + 0.5) / (df + 0.5))

    def search(
        self, query: str, doc_ids: set[str] | None = None, top_k: int | None = None
    ) -> list[tuple[float, str, int]]:
        """(score, doc_id, chunk_no) best first; only chunks with a positive score."""
        if not self.n_chunks:
            return []
        avg = max(self.total_len / self.n_chunks, 1e-9)
        scores: dict[tuple[str, int], float] = defaultdict(float)
        for t in set(terms(query)):
            if t not in self.df:
                continue
            idf = self.idf(t)
            for d in self.docs_with[t]:
                if doc_ids is not None and d not in doc_ids:
                    continue
                lens = self.lengths[d]
                for c, tf in self.postings[d][t]:
                    norm = self.k1 * (1 - self.b + self.b * lens[c] / avg)
                    scores[(d, c)] += idf * tf * (self.k1 + 1) / (tf + norm)
        ranked = sorted(((s, d, c) for (d, c), s in scores.items() if s > 0), key=lambda x: (-x[0], x[1], x[2]))
        return ranked[:top_k] if top_k else ranked


def windows_for_chunk(members: list[tuple[str, int, int]], cs: int, ce: int) -> list[str]:
    """members: (pack_id, char_start, char_end) of one document's windows. Packs whose window
    contains [cs, ce); if none does (the chunk straddles a cut), the one overlapping most."""
    inside = [pid for pid, a, b in members if a <= cs and ce <= b]
    if inside:
        return inside
    best = max(members, key=lambda m: min(ce, m[2]) - max(cs, m[1]), default=None)
    return [best[0]] if best is not None and min(ce, best[2]) > max(cs, best[1]) else []


def rank_packs(
    hits: list[tuple[float, str, int]],
    chunk_spans: dict[str, list[tuple[int, int]]],
    doc_windows: dict[str, list[tuple[str, int, int]]],
    candidates: list[str],
    fanout: int,
    per_pack: int,
) -> list[tuple[str, float, list[tuple[float, str, int]]]]:
    """hits: (score, doc_id, chunk_no) from `Bm25Index.search`; chunk_spans: doc -> [(cs, ce)];
    doc_windows: doc -> [(pack_id, cs, ce)]; candidates: eligible pack ids in creation order.
    Returns [(pack_id, score, best hits)] best first: every candidate when there are at most
    `fanout` of them (zero-score ones last), else the `fanout` best."""
    eligible = set(candidates)
    per: dict[str, list[tuple[float, str, int]]] = defaultdict(list)
    for score, d, c in hits:
        cs, ce = chunk_spans[d][c]
        for pid in windows_for_chunk(doc_windows.get(d, []), cs, ce):
            if pid in eligible:
                per[pid].append((score, d, c))
    order = {pid: i for i, pid in enumerate(candidates)}

    def key(pid: str):
        lst = per.get(pid, [])
        return (-(lst[0][0] if lst else 0.0), -sum(h[0] for h in lst), order[pid])

    ranked = sorted(candidates, key=key)
    if len(ranked) > fanout:
        ranked = ranked[:fanout]
    return [(pid, per[pid][0][0] if per.get(pid) else 0.0, per.get(pid, [])[:per_pack]) for pid in ranked]
