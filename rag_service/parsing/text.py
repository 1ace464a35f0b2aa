"""Text uploads: bytes -> str (byte-order marks, UTF-8, then a Windows-1252/latin-1 fallback only
when the bytes look like text), Markdown vs plain text, and the newline normalization every
extracted text (PDF pages too) goes through, since character offsets are defined on it.

    from dsa_rag.rag_service.parsing.text import decode_text, normalize_text
    normalize_text(decode_text("notes.txt", b"caf\\xe9\\r\\n"))   # -> "caf\\u00e9\\n" (Windows-1252)

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_ingest.py`.
"""

from __future__ import annotations

import re

from dsa_rag.rag_service.errors import UndecodableText, UnsupportedDocument

BOMS: tuple[tuple[bytes, str], ...] = (  # longest first: UTF-32-LE's BOM starts with UTF-16-LE's
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)
MARKDOWN_EXTENSIONS = (".md", ".markdown", ".mdown", ".mkd")
_MD_MARKERS = (
    re.compile(r"^#{1,6} \S", re.M),  # headings
    re.compile(r"^```", re.M),  # fences
    re.compile(r"\[[^\]\n]+\]\([^)\s]+\)"),  # links
    re.compile(r"^\s{0,3}[-*+] \S", re.M),  # bullet lists
    re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__"),  # strong emphasis
    re.compile(r"^\s{0,3}>\s", re.M),  # block quotes
    re.compile(r"^\|.*\|\s*$\n^\|?\s*:?-{3,}", re.M),  # tables
)
# C0 control bytes that never occur in text files (tab, LF, CR, FF are fine; ESC is not).
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 12, 13)) + b"\x7f"


def is_markdown(name: str, text: str) -> bool:
    if name.lower().endswith(MARKDOWN_EXTENSIONS):
        return True
    sample = text[:20000]
    return sum(1 for rx in _MD_MARKERS if rx.search(sample)) >= 2


def decode_text(name: str, data: bytes) -> str:
    """Bytes -> str: BOM encodings, UTF-8, then a latin-1-family fallback for text-like bytes."""
    for bom, enc in BOMS:
        if data.startswith(bom):
            try:
                return data.decode(enc)
            except UnicodeDecodeError as e:
                raise UndecodableText(
                    f"starts with a {enc} byte-order mark but is not valid {enc} (bad bytes at offset "
                    f"{e.start}); re-save the file as UTF-8",
                    filename=name,
                ) from None
    sample = data[:65536]
    if b"\x00" in sample:
        raise UnsupportedDocument(
            "binary data (NUL bytes), not text; upload a PDF, a UTF-8 text or a Markdown file",
            filename=name,
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e.start
    if looks_like_text(sample):
        # Windows-1252 is latin-1 with printable characters where latin-1 has C1 controls;
        # the 5 bytes cp1252 leaves undefined fall back to latin-1.
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            return data.decode("latin-1")
    if _control_ratio(sample) > 0.0:
        raise UnsupportedDocument(
            "binary data (control bytes), not text; upload a PDF, a UTF-8 text or a Markdown file",
            filename=name,
        )
    raise UndecodableText(
        f"not valid UTF-8 (first bad byte at offset {bad}) and not recognisably latin-1 text; "
        "re-save the file as UTF-8",
        filename=name,
    )


def _control_ratio(sample: bytes) -> float:
    return sum(sample.count(c) for c in _CONTROL) / max(1, len(sample))


def looks_like_text(sample: bytes) -> bool:
    """No control bytes and at most 30% high bytes (accented Western text is far below)."""
    if not sample or _control_ratio(sample) > 0:
        return False
    high = sum(1 for b in sample if b >= 0x80)
    return high / len(sample) <= 0.30


def normalize_text(text: str) -> str:
    """Unify newlines and drop NULs; offsets are defined on the normalized text."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
