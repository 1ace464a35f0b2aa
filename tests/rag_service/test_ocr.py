"""OCR of pages without a text layer (parsing/ocr.py, pdf.py, sandbox.py): a rendered page is read
back, an image-only page of a PDF gets its text and is reported as OCR'd, OCR has its own time
budget inside the sandbox, and OCR off refuses a scanned PDF with a message naming the setting.
Pages are rendered here (tests/rag_service/planted.py), never downloaded.

    .venv/bin/python -m pytest -q tests/rag_service/test_ocr.py
"""

from __future__ import annotations

import random
import re
import shutil

import pytest

from dsa_rag.rag_service import errors
from dsa_rag.rag_service.parsing.ingest import parse_document
from dsa_rag.rag_service.parsing.ocr import ocr_image
from dsa_rag.rag_service.settings import RagSettings
from tests.rag_service.pdfs import make_pdf
from tests.rag_service.planted import make_planted, render_page

pytestmark = pytest.mark.skipif(shutil.which("tesseract") is None,
                                reason="needs the tesseract binary (apt-get install tesseract-ocr; .ci/run installs it)")


def norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.replace("’", "'")).strip()


def test_a_rendered_page_reads_back():
    text = ("The access code of Project Lomiren is 7351902.\n"
            "Meanwhile, the finance group argued at length about the new warehouse.\n- Ren Kal / tax id: K7Q-ZP3")
    assert norm(ocr_image(render_page(text), "tesseract")) == norm(text)


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_image_only_page_is_ocrd_and_reported(isolation):
    doc = make_planted(random.Random(5), 3, image_pages=(2,), answer_page=2, value_kind="num")
    parsed = parse_document(doc.name, doc.pdf, RagSettings(parse_isolation=isolation, parse_timeout_s=30))
    assert [p.ocr for p in parsed.pages] == [False, True, False]
    p2 = parsed.pages[1]
    assert norm(doc.fact) in norm(parsed.text[p2.char_start:p2.char_end])
    assert norm(parsed.text[parsed.pages[0].char_start:parsed.pages[0].char_end]) == norm(doc.pages[0])


def test_ocr_off_refuses_a_scanned_pdf_and_names_the_setting():
    doc = make_planted(random.Random(6), 1, image_pages=(1,))
    with pytest.raises(errors.NoTextLayer, match="DSA_RAG_OCR_ENGINE"):
        parse_document(doc.name, doc.pdf, RagSettings(ocr_engine="off"))
    # a page with only a tiny swatch (no text to find) is still "no text layer", OCR on or off
    with pytest.raises(errors.NoTextLayer, match="OCR found no text"):
        parse_document("swatch.pdf", make_pdf([None], image_pages=(0,)), RagSettings())


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_ocr_has_its_own_budget(isolation):
    doc = make_planted(random.Random(7), 2, image_pages=(1, 2))
    with pytest.raises(errors.ParseTimeout, match="DSA_RAG_OCR_TIMEOUT_S"):
        parse_document(doc.name, doc.pdf, RagSettings(parse_isolation=isolation, ocr_timeout_s=0.05))
    # the text pass's budget is not spent by OCR: a small parse budget still reads scanned pages
    parsed = parse_document(doc.name, doc.pdf, RagSettings(parse_isolation=isolation, parse_timeout_s=1.0))
    assert all(p.ocr for p in parsed.pages)


def test_too_many_pages_to_ocr_is_refused():
    doc = make_planted(random.Random(8), 2, image_pages=(1, 2))
    with pytest.raises(errors.DocumentTooLarge, match="DSA_RAG_OCR_MAX_PAGES"):
        parse_document(doc.name, doc.pdf, RagSettings(ocr_max_pages=1))
