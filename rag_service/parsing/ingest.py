"""Parsing: uploaded bytes -> extracted text with page spans, or a typed error naming the file.

    from dsa_rag.rag_service.parsing.ingest import parse_document
    from dsa_rag.rag_service.settings import RagSettings
    doc = parse_document("report.pdf", open("report.pdf", "rb").read(), RagSettings())
    doc.text, doc.pages[0]        # PageSpan(page=1, char_start=0, char_end=...)

The type comes from the content, not the extension: `%PDF-` magic -> PDF; other known binary
magics (PNG, ZIP/DOCX, gzip, ...) -> 415; otherwise the bytes must decode as text: UTF-8,
UTF-8 with BOM, UTF-16/32 with BOM, then a Windows-1252/latin-1 fallback only when the bytes
look like text (no control bytes, few high bytes). Markdown vs plain text: the extension, or
Markdown markers in the text (headings, fences, links, emphasis, lists).

PDF pages are joined with a blank line; `pages[i]` says where page i+1 lies in the text, so
citations can name a page. pypdf's decompression-bomb limits are set from
`settings.pdf_max_decompressed_bytes`; the parse time budget is checked between pages, and
(with `parse_isolation="process"`, the default) enforced from outside by killing the sandbox
process that parses the PDF (sandbox.py), so one page whose extraction hangs cannot stall us.

This module detects the type and dispatches; the decoding lives in text.py, the PDF extraction in
pdf.py, its sandbox in sandbox.py.

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_ingest.py tests/rag_service/test_hostile.py`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from dsa_rag.rag_service.errors import CorruptDocument, DocumentTooLarge, EmptyDocument, UnsupportedDocument
from dsa_rag.rag_service.parsing.pdf import parse_pdf
from dsa_rag.rag_service.parsing.sandbox import parse_pdf_isolated
from dsa_rag.rag_service.parsing.text import decode_text, is_markdown, normalize_text
from dsa_rag.rag_service.schemas import NAME_MAX, PageSpan
from dsa_rag.rag_service.settings import RagSettings

# (magic prefix, what it is) for binaries people upload by mistake.
BINARY_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"PK\x03\x04", "a ZIP archive (DOCX/XLSX/PPTX are ZIP files)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"Rar!", "a RAR archive"),
    (b"\x7fELF", "an ELF executable"),
    (b"MZ", "a Windows executable"),
    (b"\xd0\xcf\x11\xe0", "a legacy Office (OLE) file"),
    (b"SQLite format 3\x00", "an SQLite database"),
)
# Unicode categories a display name never keeps: controls, format (bidi, zero-width), surrogates,
# private use, line/paragraph separators.
_BAD_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})


@dataclass
class ParsedDocument:
    name: str
    media_type: str  # "pdf" | "text" | "markdown"
    text: str
    size_bytes: int
    pages: list[PageSpan] = field(default_factory=list)  # empty for unpaginated text

    def page_at(self, char: int) -> int | None:
        return page_at(self.pages, char)


def page_at(pages: list[PageSpan], char: int) -> int | None:
    """1-based page holding text[char] (a separator belongs to the page before it)."""
    if not pages:
        return None
    lo, hi = 0, len(pages) - 1
    while lo < hi:  # last page whose char_start <= char
        mid = (lo + hi + 1) // 2
        if pages[mid].char_start <= char:
            lo = mid
        else:
            hi = mid - 1
    return pages[lo].page


def clean_name(name: str) -> str:
    """A display name safe for the prompt line `<doc>name\\n`, JSON and Redis: NFC-normalized,
    basename only (never used as a path), control / format / surrogate / private-use characters
    (incl. bidi overrides, zero-width) -> space, whitespace collapsed, `.`/`..` refused, at most
    NAME_MAX characters."""
    base = unicodedata.normalize("NFC", str(name or ""))
    base = re.split(r"[\\/]", base)[-1]
    base = "".join(" " if unicodedata.category(c) in _BAD_NAME_CATEGORIES else c for c in base)
    base = re.sub(r"\s+", " ", base).strip()
    if base.strip(".") == "":
        base = ""
    return base[:NAME_MAX].strip() or "document"


def detect_type(name: str, data: bytes) -> str:
    """'pdf' | 'text' | 'markdown' from the content (and the extension for Markdown only).
    Raises UnsupportedDocument for known binary formats."""
    head = data[:1024]
    if b"%PDF-" in head:
        return "pdf"
    for magic, what in BINARY_MAGICS:
        if data.startswith(magic):
            raise UnsupportedDocument(
                f"the content is {what}, not PDF, text or Markdown; convert it to PDF or UTF-8 text",
                filename=name,
            )
    if name.lower().endswith(".pdf"):
        raise CorruptDocument(
            "named .pdf but has no %PDF- header (truncated, or not a PDF); upload the original file",
            filename=name,
        )
    text = decode_text(name, data)
    return "markdown" if is_markdown(name, text) else "text"


def parse_document(name: str, data: bytes, settings: RagSettings) -> ParsedDocument:
    """Detect the type and extract text. Raises a DocumentError subclass naming the file."""
    name = clean_name(name)
    if len(data) > settings.upload_max_bytes:
        raise DocumentTooLarge(
            f"{len(data)} bytes is over the upload limit of {settings.upload_max_bytes} bytes "
            "(DSA_RAG_UPLOAD_MAX_BYTES); split the document",
            filename=name,
        )
    if not data.strip():
        raise EmptyDocument("the file is empty; nothing to index", filename=name)
    kind = detect_type(name, data)
    if kind == "pdf":
        if settings.parse_isolation == "process":  # hard time budget + memory cap (sandbox.py)
            text, pages = parse_pdf_isolated(name, data, settings)
        else:
            text, pages = parse_pdf(name, data, settings)
    else:
        text, pages = normalize_text(decode_text(name, data)), []
        if not text.strip():
            raise EmptyDocument("the text is empty or only whitespace; nothing to index", filename=name)
    return ParsedDocument(name=name, media_type=kind, text=text, size_bytes=len(data), pages=pages)
