"""Pack layouts: where each document sits in a pack's prompt, and prompt position -> citation.

    ids, layout = pipeline.pack_prompt(pack_id)
    layout.locate(1234)              # (LayoutEntry, char offset in the document text) or None
    layout.citation(1200, 1300)      # Citation(document_id, name, page, char_start, char_end, snippet)
    layout.cite([1201, 1202, 5000])  # attended positions -> merged citations, most-attended first

A pack prompt is `<bos> (doc_head(name) text doc_tail)*` (model/tokenizer.py `prompt_ids`: for
the byte tokenizer `<doc> name\\n text </doc>`, for a checkpoint's tokenizer.json the same
markers as text; a long document contributes one window of its text). Every piece is encoded on
its own, so a member's text tokens are exactly encode(text window). For each member the layout
records the token range of its segment and of its text, and keeps the member's `TextTokens`,
which maps a token offset inside the text to a character offset (exactly for the byte
tokenizer, where a token is a UTF-8 byte; by re-encoding prefixes for other tokenizers).
Building a layout checks that the per-member token counts add up to the prompt the tokenizer
produced, so a tokenizer that breaks that contract fails loudly here instead of citing wrong
text.

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_chunk_pack.py`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from dsa_rag.rag_service.parsing.chunk import TextTokens
from dsa_rag.rag_service.errors import RagError
from dsa_rag.rag_service.parsing.ingest import page_at
from dsa_rag.rag_service.schemas import Citation, PageSpan

SNIPPET_CHARS = 300


@dataclass
class LayoutEntry:
    document_id: str
    name: str
    token_start: int  # position of the document's first marker token (<doc>)
    text_token_start: int  # position of the first token of the window's text
    text_token_end: int  # one past the window's last text token
    token_end: int  # one past the document's last marker token (</doc>)
    char_start: int  # the window in the document text
    char_end: int
    pages: list[PageSpan]
    tt: TextTokens = field(repr=False)  # over the whole document text

    def char_at(self, pos: int) -> int | None:
        """Prompt position -> char offset in the document text; None for marker/name tokens."""
        if not (self.text_token_start <= pos < self.text_token_end):
            return None
        t = self.tt.token_offset(self.char_start) + (pos - self.text_token_start)
        return min(max(self.tt.char_at_token(t), self.char_start), max(self.char_end - 1, self.char_start))


@dataclass
class PackLayout:
    pack_id: str
    version: int
    total_tokens: int
    entries: list[LayoutEntry]

    def __post_init__(self) -> None:
        self._starts = [e.token_start for e in self.entries]

    def entry_at(self, pos: int) -> LayoutEntry | None:
        i = bisect.bisect_right(self._starts, pos) - 1
        if i < 0 or pos >= self.entries[i].token_end:
            return None
        return self.entries[i]

    def locate(self, pos: int) -> tuple[LayoutEntry, int] | None:
        """Prompt position -> (member, char offset in its document text), or None."""
        e = self.entry_at(pos)
        if e is None:
            return None
        c = e.char_at(pos)
        return None if c is None else (e, c)

    def citation(self, token_lo: int, token_hi: int) -> Citation | None:
        """Citation for prompt positions [token_lo, token_hi) (clipped to the member that holds
        token_lo's text). The page is the page of the span's first character."""
        e = self.entry_at(token_lo)
        if e is None:
            return None
        lo = max(token_lo, e.text_token_start)
        hi = min(token_hi, e.text_token_end)
        if lo >= hi:
            return None
        c0 = e.char_at(lo)
        c1 = e.char_at(hi - 1)
        c1 = e.char_end if c1 is None else min(c1 + 1, e.char_end)
        return Citation(
            document_id=e.document_id,
            name=e.name,
            page=page_at(e.pages, c0),
            char_start=c0,
            char_end=c1,
            snippet=e.tt.text[c0:c1][:SNIPPET_CHARS],
        )

    def cite(self, positions, gap: int = 32, max_citations: int = 5) -> list[Citation]:
        """Group attended prompt positions into spans (positions closer than `gap` tokens, in the
        same member and on the same page merge: a citation names one page) and return citations
        for the most-attended spans first."""
        where = {}
        for p in {int(p) for p in positions}:
            loc = self.locate(p)
            if loc is not None:
                where[p] = (id(loc[0]), page_at(loc[0].pages, loc[1]))
        groups: list[list[int]] = []
        for p in sorted(where):
            if groups and p - groups[-1][-1] <= gap and where[p] == where[groups[-1][0]]:
                groups[-1].append(p)
            else:
                groups.append([p])
        groups.sort(key=len, reverse=True)
        out = []
        for g in groups[:max_citations]:
            c = self.citation(g[0], g[-1] + 1)
            if c is not None:
                out.append(c)
        return out


def build_layout(
    tokenizer,
    pack_id: str,
    version: int,
    members: list[tuple[str, str, int, int, str, list[PageSpan]]],
    prompt_len: int,
) -> PackLayout:
    """members: (document_id, name, char_start, char_end, full document text, pages) in prompt
    order. `prompt_len` is len(tokenizer.prompt_ids(...)) of the same members, for the check."""
    pos = 1  # <bos>
    entries = []
    for doc_id, name, cs, ce, text, pages in members:
        tt = TextTokens(tokenizer, text)
        head, tail = len(tokenizer.doc_head(name)), len(tokenizer.doc_tail())
        body = tt.tokens(cs, ce)
        start = pos
        pos += head + body + tail
        entries.append(LayoutEntry(doc_id, name, start, start + head, pos - tail, pos, cs, ce, pages, tt))
    if pos != prompt_len:
        raise RagError(
            f"pack {pack_id}: the layout counts {pos} tokens but the tokenizer's prompt has {prompt_len}; "
            f"{type(tokenizer).__name__}.prompt_ids is not `[bos] + (doc_head + encode(text) + doc_tail)*` "
            "as pack layouts assume (model/tokenizer.py _prompt_ids)"
        )
    return PackLayout(pack_id=pack_id, version=version, total_tokens=pos, entries=entries)
