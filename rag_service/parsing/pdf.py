"""PDF uploads: the text of every page with pypdf, joined by a blank line, and each page's span in
that text (so citations can name a page), or a typed error naming the file.

pypdf's decompression-bomb limits are set from `settings.pdf_max_decompressed_bytes`, and the
parse time budget `settings.parse_timeout_s` is checked between pages. A page whose extraction
hangs never returns to that check: parsing in a sandbox process (sandbox.py, the service's
default) enforces the budget from outside.

    from dsa_rag.rag_service.parsing.pdf import parse_pdf
    text, pages = parse_pdf("report.pdf", data, settings)   # pages[0] == PageSpan(page=1, char_start=0, ...)

Pages without a text layer that draw images are read by OCR (ocr.py, setting `ocr_engine`) after
the text pass, with their own budget `ocr_timeout_s`; their PageSpan says `ocr=True`.

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_ingest.py tests/rag_service/test_hostile.py`.
"""

from __future__ import annotations

import io
import logging
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
from dsa_rag.rag_service.parsing.ocr import OcrUnavailable, ocr_image, page_images
from dsa_rag.rag_service.parsing.text import normalize_text
from dsa_rag.rag_service.schemas import PageSpan
from dsa_rag.rag_service.settings import RagSettings

PAGE_SEPARATOR = "\n\n"
log = logging.getLogger(__name__)


def parse_pdf(name: str, data: bytes, settings: RagSettings, on_ocr=None) -> tuple[str, list[PageSpan]]:
    """Text of every page (joined by a blank line) and each page's span in it. settings: a
    RagSettings, or anything with its parse_timeout_s, max_pages, pdf_max_decompressed_bytes and
    ocr_engine, ocr_timeout_s, ocr_max_pages (the sandbox worker passes only those). on_ocr: called
    once when the text pass is over and OCR starts (the sandbox then grants the OCR budget)."""
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
            ocr_pages, ocr_missing = _ocr_blank_pages(name, reader, texts, settings, on_ocr)
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
            why = ocr_missing or "OCR found no text in their images"
            raise NoTextLayer(
                f"none of the {n} pages has a text layer (a scanned or image-only PDF) and {why}",
                filename=name,
            )
        raise EmptyDocument(f"none of the {n} pages contains text", filename=name)
    pages, pos = [], 0
    for i, t in enumerate(texts):
        pages.append(PageSpan(page=i + 1, char_start=pos, char_end=pos + len(t), ocr=i + 1 in ocr_pages))
        pos += len(t) + len(PAGE_SEPARATOR)
    return PAGE_SEPARATOR.join(texts), pages


def _ocr_blank_pages(name: str, reader, texts: list[str], settings, on_ocr=None) -> tuple[set[int], str]:
    """OCR the images of every page whose text layer is empty, in place in `texts`, within the
    `ocr_timeout_s` budget. -> (1-based pages OCR'd, why pages were left unread: "" or a reason
    for the NoTextLayer message)."""
    engine = getattr(settings, "ocr_engine", "off")
    blank = [i for i, t in enumerate(texts) if not t.strip()]
    if not blank:
        return set(), ""
    if engine == "off":
        return set(), "OCR is off (set DSA_RAG_OCR_ENGINE=tesseract to read scanned pages)"
    if len(blank) > settings.ocr_max_pages:
        raise DocumentTooLarge(
            f"{len(blank)} pages need OCR, over the limit of {settings.ocr_max_pages} (DSA_RAG_OCR_MAX_PAGES); "
            "split the PDF", filename=name)
    if on_ocr is not None:
        on_ocr()
    deadline = time.monotonic() + settings.ocr_timeout_s
    done: set[int] = set()
    for i in blank:
        imgs = page_images(reader.pages[i])
        parts = []
        for img in imgs:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ParseTimeout(
                    f"OCR stopped at page {i + 1} of {len(texts)}: over its {settings.ocr_timeout_s:g} s budget "
                    "(DSA_RAG_OCR_TIMEOUT_S); split the PDF or raise the budget", filename=name)
            try:
                parts.append(ocr_image(img, engine, timeout_s=left))
            except OcrUnavailable as e:
                log.warning("%s: page %d has no text layer and OCR is unavailable: %s", name, i + 1, e)
                return done, f"OCR is unavailable ({e})"
            except TimeoutError:
                raise ParseTimeout(
                    f"OCR of page {i + 1} ran past its {settings.ocr_timeout_s:g} s budget (DSA_RAG_OCR_TIMEOUT_S); "
                    "split the PDF or raise the budget", filename=name) from None
            except Exception as e:  # noqa: BLE001 - one unreadable image leaves its page empty, not the file refused
                log.warning("%s: OCR failed on an image of page %d (%s: %s)", name, i + 1, type(e).__name__, e)
        texts[i] = normalize_text("\n".join(p for p in parts if p.strip()))
        if texts[i].strip():
            done.add(i + 1)
    return done, ""


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
