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

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_ingest.py`.
"""

from __future__ import annotations

import io
import re
import time
import unicodedata
from dataclasses import dataclass, field

from dsa_rag.rag_service.errors import (
    CorruptDocument,
    DocumentTooLarge,
    EmptyDocument,
    EncryptedDocument,
    NoTextLayer,
    ParseTimeout,
    UndecodableText,
    UnsupportedDocument,
)
from dsa_rag.rag_service.schemas import NAME_MAX, PageSpan
from dsa_rag.rag_service.settings import RagSettings

PAGE_SEPARATOR = "\n\n"

# (magic prefix, what it is, what to do) for binaries people upload by mistake.
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
_BAD_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 12, 13)) + b"\x7f"


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
            from dsa_rag.rag_service.parsing.sandbox import parse_pdf_isolated

            text, pages = parse_pdf_isolated(name, data, settings)
        else:
            text, pages = parse_pdf(name, data, settings)
    else:
        text, pages = normalize_text(decode_text(name, data)), []
        if not text.strip():
            raise EmptyDocument("the text is empty or only whitespace; nothing to index", filename=name)
    return ParsedDocument(name=name, media_type=kind, text=text, size_bytes=len(data), pages=pages)


def _pdf_limits(settings: RagSettings) -> dict:
    lim = settings.pdf_max_decompressed_bytes
    return {
        "zlib_maximum_output_length": lim,
        "lzw_maximum_output_length": lim,
        "run_length_maximum_output_length": lim,
        "jbig2_maximum_output_length": lim,
        "brotli_maximum_output_length": lim,
        "array_based_stream_maximum_output_length": lim,
        "maximum_declared_stream_length": lim,
        "image_maximum_buffer_size": lim,
        "stream_decoding_work_maximum_length": 4 * lim,
    }


def parse_pdf(name: str, data: bytes, settings: RagSettings) -> tuple[str, list[PageSpan]]:
    """Text of every page (joined by a blank line) and each page's span in it."""
    import pypdf
    from pypdf.errors import FileNotDecryptedError, LimitReachedError, PdfReadError

    deadline = time.monotonic() + settings.parse_timeout_s
    cfg = getattr(pypdf, "apply_configuration", None)
    limits = cfg(**_pdf_limits(settings)) if cfg is not None else _NullContext()
    try:
        with limits:
            reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
            if reader.is_encrypted and not _try_empty_password(reader):
                raise EncryptedDocument(
                    "the PDF is password-protected; remove the password (print to PDF) and upload again",
                    filename=name,
                )
            n = len(reader.pages)
            if n == 0:
                raise EmptyDocument("the PDF has no pages", filename=name)
            if n > settings.max_pages:
                raise DocumentTooLarge(
                    f"{n} pages is over the limit of {settings.max_pages} (DSA_RAG_MAX_PAGES); split the PDF",
                    filename=name,
                )
            texts, has_images = [], False
            for i, page in enumerate(reader.pages):
                if time.monotonic() > deadline:
                    raise ParseTimeout(
                        f"parsing stopped at page {i + 1} of {n}: over the {settings.parse_timeout_s:g} s "
                        "budget (DSA_RAG_PARSE_TIMEOUT_S); split the PDF or raise the budget",
                        filename=name,
                    )
                texts.append(normalize_text(page.extract_text() or ""))
                if not texts[-1].strip():
                    has_images = has_images or _page_has_images(page)
            if time.monotonic() > deadline:
                raise ParseTimeout(
                    f"parsing took over the {settings.parse_timeout_s:g} s budget (DSA_RAG_PARSE_TIMEOUT_S)",
                    filename=name,
                )
    except (EncryptedDocument, EmptyDocument, DocumentTooLarge, ParseTimeout):
        raise
    except FileNotDecryptedError:
        raise EncryptedDocument(
            "the PDF is encrypted and cannot be read without its password; upload a decrypted copy",
            filename=name,
        ) from None
    except MemoryError:
        raise DocumentTooLarge(
            "parsing the PDF needs more memory than allowed (DSA_RAG_PARSE_MEMORY_BYTES); the file may be "
            "a decompression bomb", filename=name,
        ) from None
    except LimitReachedError as e:
        raise DocumentTooLarge(
            f"a PDF stream exceeds a safety limit ({e}); the file may be a decompression bomb",
            filename=name,
        ) from None
    except (PdfReadError, Exception) as e:  # pypdf raises many types on malformed input
        raise CorruptDocument(
            f"the PDF is damaged or truncated ({type(e).__name__}: {e}); re-export or repair it",
            filename=name,
        ) from None

    if not any(t.strip() for t in texts):
        if has_images:
            raise NoTextLayer(
                f"none of the {n} pages has a text layer (a scanned or image-only PDF); run OCR first",
                filename=name,
            )
        raise EmptyDocument(f"none of the {n} pages contains text", filename=name)
    pages, pos = [], 0
    for i, t in enumerate(texts):
        pages.append(PageSpan(page=i + 1, char_start=pos, char_end=pos + len(t)))
        pos += len(t) + len(PAGE_SEPARATOR)
    return PAGE_SEPARATOR.join(texts), pages


def _try_empty_password(reader) -> bool:
    """PDFs with only an owner password (print/copy restrictions) open with the empty password."""
    try:
        return bool(reader.decrypt(""))
    except Exception:
        return False


def _page_has_images(page) -> bool:
    try:
        res = page.get("/Resources")
        res = res.get_object() if res is not None else None
        xobjs = res.get("/XObject") if res is not None else None
        if xobjs is None:
            return False
        xobjs = xobjs.get_object()
        return any(xobjs[k].get_object().get("/Subtype") == "/Image" for k in xobjs)
    except Exception:
        return False


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
