"""Token-aware chunking with page and character offsets, and token<->char arithmetic on a text.

    from dsa_rag.model.tokenizer import ByteTokenizer
    from dsa_rag.rag_service.parsing.chunk import TextTokens, chunk_text
    tt = TextTokens(ByteTokenizer(), "héllo world ...")
    tt.tokens(0, 5), tt.fit(0, budget=64), tt.char_at_token(3)
    chunks = chunk_text(tt, pages=[], chunk_tokens=256, overlap=32)

`TextTokens` answers "how many tokens is text[a:b]", "how far can a span starting at a go within
a token budget" and "which character holds token t". For the byte tokenizer (a token is one
UTF-8 byte) the answers are exact and O(log n) through a char->byte prefix array (skipped for
ASCII text, where token offset == char offset). For any other tokenizer it falls back to
encoding spans (exact counts of spans, approximate offsets at BPE merge boundaries), so the
service stays tokenizer-agnostic.

Chunks never cross a page boundary (a citation names one page), end at whitespace where
possible, and overlap by about `overlap` tokens. They carry token offsets relative to the start
of the document text, so a pack layout can map attended prompt positions back to chunks.

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_chunk_pack.py`.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import numpy as np

from dsa_rag.rag_service.schemas import PageSpan


class TextTokens:
    """Token arithmetic over one text for one tokenizer (see module docstring)."""

    def __init__(self, tokenizer, text: str):
        self.tok = tokenizer
        self.text = text
        self.n = len(text)
        self.exact = hasattr(tokenizer, "token_bytes")  # ByteTokenizer: token == UTF-8 byte
        self._ascii = self.exact and text.isascii()
        self._c2b: np.ndarray | None = None
        if self.exact and not self._ascii:
            raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
            starts = np.flatnonzero((raw & 0xC0) != 0x80)  # byte index where each char starts
            dtype = np.int32 if raw.size < 2**31 else np.int64
            self._c2b = np.empty(self.n + 1, dtype=dtype)
            self._c2b[:-1] = starts
            self._c2b[-1] = raw.size

    @property
    def total(self) -> int:
        return self.token_offset(self.n)

    def token_offset(self, c: int) -> int:
        """Tokens before text[c] (tokens of text[:c])."""
        c = min(max(c, 0), self.n)
        if self._ascii:
            return c
        if self._c2b is not None:
            return int(self._c2b[c])
        return len(self.tok.encode(self.text[:c]))

    def tokens(self, a: int, b: int) -> int:
        """Tokens of text[a:b]."""
        if self.exact:
            return self.token_offset(b) - self.token_offset(a)
        return len(self.tok.encode(self.text[a:b]))

    def char_at_token(self, t: int) -> int:
        """Index of the character that token offset t (relative to the text start) falls in;
        n when t is at or past the end."""
        if t <= 0:
            return 0
        if self._ascii:
            return min(t, self.n)
        if self._c2b is not None:
            return min(int(np.searchsorted(self._c2b, t, side="right")) - 1, self.n)
        lo, hi = 0, self.n  # generic: smallest c with tokens(text[:c+1]) > t
        while lo < hi:
            mid = (lo + hi) // 2
            if self.token_offset(mid + 1) <= t:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def fit(self, a: int, budget: int) -> int:
        """Largest b >= a with tokens(a, b) <= budget."""
        if budget <= 0:
            return a
        if self._ascii:
            return min(a + budget, self.n)
        if self._c2b is not None:
            target = int(self._c2b[a]) + budget
            return min(int(np.searchsorted(self._c2b, target, side="right")) - 1, self.n)
        lo, hi = a, self.n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.tokens(a, mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


def snap_end(text: str, a: int, b: int, limit: int) -> int:
    """Move a cut at b (< limit) back to just after whitespace, if that keeps >= half the span."""
    if b >= limit:
        return limit
    floor = a + (b - a) // 2
    for i in range(b - 1, floor - 1, -1):
        if text[i].isspace():
            return i + 1
    return b


def snap_start(text: str, a: int, limit: int) -> int:
    """Move a start forward to the next word start (at most 64 chars), for readable overlaps."""
    if a <= 0 or text[a - 1].isspace():
        return a
    for i in range(a, min(limit, a + 64)):
        if text[i].isspace():
            return i + 1
    return a


@dataclass(frozen=True)
class Chunk:
    """text[char_start:char_end] on page `page`, tokens [token_start, token_end) of the text."""

    page: int | None
    char_start: int
    char_end: int
    token_start: int
    token_end: int

    def to_list(self) -> list:
        return list(astuple(self))

    @classmethod
    def from_list(cls, row) -> "Chunk":
        return cls(*row)


def spans(tt: TextTokens, a: int, b: int, budget: int, overlap: int) -> list[tuple[int, int]]:
    """Cut text[a:b] into consecutive spans of <= budget tokens overlapping by ~overlap tokens."""
    out: list[tuple[int, int]] = []
    text = tt.text
    while a < b:
        end = snap_end(text, a, max(tt.fit(a, budget), a + 1), b)
        out.append((a, end))
        if end >= b:
            break
        nxt = tt.char_at_token(tt.token_offset(end) - overlap) if overlap else end
        nxt = snap_start(text, nxt, end)
        a = nxt if a < nxt <= end else end
    return out


def chunk_text(tt: TextTokens, pages: list[PageSpan], chunk_tokens: int, overlap: int) -> list[Chunk]:
    """Chunks of every page (or of the whole text when unpaginated); whitespace-only spans dropped."""
    regions = [(p.page, p.char_start, p.char_end) for p in pages] or [(None, 0, tt.n)]
    chunks: list[Chunk] = []
    for page, a, b in regions:
        for s, e in spans(tt, a, b, chunk_tokens, overlap):
            if tt.text[s:e].strip():
                chunks.append(Chunk(page, s, e, tt.token_offset(s), tt.token_offset(e)))
    return chunks
