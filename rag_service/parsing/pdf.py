"""PDF uploads: the text of every page with pypdf, joined by a blank line, and each page's span in
that text (so citations can name a page), or a typed error naming the file.

pypdf's decompression-bomb limits are set from `settings.pdf_max_decompressed_bytes`, and the
parse time budget `settings.parse_timeout_s` is checked between pages. A page whose extraction
hangs never returns to that check: parsing in a sandbox process (sandbox.py, the service's
default) enforces the budget from outside.

    from dsa_rag.rag_service.parsing.pdf import parse_pdf
    text, pages = parse_pdf("report.pdf", data, settings)   # pages[0] == PageSpan(page=1, char_start=0, ...)

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_ingest.py tests/rag_service/test_hostile.py`.
"""

from __future__ import annotations

import io
import time

import pypdf
from pypdf.errors import FileNotDecryptedError, LimitReachedError, PdfReadError

from dsa_rag.rag_service.errors import (
    CorruptDocument,
    DocumentTooLarge,
    EmptyDocument,
    EncryptedDocument,
    NoTextLayer,
    ParseTimeout,
)
from dsa_rag.rag_service.parsing.text import normalize_text
from dsa_rag.rag_service.schemas import PageSpan
from dsa_rag.rag_service.settings import RagSettings

PAGE_SEPARATOR = "\n\n"


def parse_pdf(name: str, data: bytes, settings: RagSettings) -> tuple[str, list[PageSpan]]:
    """Text of every page (joined by a blank line) and each page's span in it. settings: a
    RagSettings, or anything with its parse_timeout_s, max_pages and pdf_max_decompressed_bytes
    (the sandbox worker passes only those)."""
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
