"""Parsing tests: real PDFs built by hand (tests/rag_service/pdfs.py), bad inputs -> typed errors.

    .venv/bin/python -m pytest -q tests/rag_service/test_ingest.py
"""

from __future__ import annotations

import os

import pytest

from dsa_rag.rag_service import errors
from dsa_rag.rag_service.parsing.ingest import clean_name, detect_type, parse_document
from dsa_rag.rag_service.settings import RagSettings
from tests.rag_service.pdfs import make_bomb_pdf, make_pdf

S = RagSettings(parse_timeout_s=10)


def test_multipage_pdf_text_pages_and_offsets():
    pages = ["Alpha page one (first)\nsecond line", "Beta page two", "Gamma page three"]
    doc = parse_document("report.pdf", make_pdf(pages), S)
    assert doc.media_type == "pdf" and len(doc.pages) == 3
    for want, span in zip(pages, doc.pages):
        assert doc.text[span.char_start:span.char_end].strip() == want
    assert [p.page for p in doc.pages] == [1, 2, 3]
    beta = doc.text.index("Beta")
    assert doc.page_at(beta) == 2 and doc.page_at(0) == 1 and doc.page_at(len(doc.text) - 1) == 3


def test_type_comes_from_content_not_extension():
    assert detect_type("disguised.txt", make_pdf(["x"])) == "pdf"
    md = b"# Heading\n\nSome **bold** text and a [link](http://x.y).\n\n- item\n"
    assert detect_type("notes.txt", md) == "markdown"
    assert detect_type("notes.md", b"just words") == "markdown"
    assert detect_type("plain", b"Just a sentence. Another one.") == "text"
    doc = parse_document("disguised.txt", make_pdf(["hidden pdf text"]), S)
    assert doc.media_type == "pdf" and "hidden pdf text" in doc.text


def test_encrypted_pdf_is_422_naming_the_file():
    with pytest.raises(errors.EncryptedDocument) as ei:
        parse_document("secret.pdf", make_pdf(["classified"], password="pw"), S)
    e = ei.value
    assert e.status_code == 422 and e.filename == "secret.pdf"
    assert "secret.pdf" in str(e) and "password" in str(e)
    assert e.to_dict()["error"] == "encrypted_document"


@pytest.mark.parametrize("cut", [0.5, 0.2], ids=["half", "fifth"])
def test_truncated_pdf_is_corrupt(cut):
    data = make_pdf(["some text here", "more text"])
    with pytest.raises(errors.CorruptDocument) as ei:
        parse_document("broken.pdf", data[: int(len(data) * cut)], S)
    assert ei.value.status_code == 422 and "broken.pdf" in str(ei.value)


def test_garbage_after_pdf_header_and_pdf_without_header():
    with pytest.raises(errors.CorruptDocument):
        parse_document("junk.pdf", b"%PDF-1.7\n" + os.urandom(2000), S)
    with pytest.raises(errors.CorruptDocument, match="no %PDF- header"):
        parse_document("fake.pdf", b"hello, I am not a pdf", S)


def test_empty_inputs():
    with pytest.raises(errors.EmptyDocument):
        parse_document("zero.txt", b"", S)
    with pytest.raises(errors.EmptyDocument):
        parse_document("spaces.txt", b"  \n\t \n", S)
    with pytest.raises(errors.EmptyDocument, match="none of the 2 pages"):
        parse_document("blank.pdf", make_pdf([None, None]), S)


def test_image_only_pdf_needs_ocr():
    with pytest.raises(errors.NoTextLayer, match="OCR") as ei:
        parse_document("scan.pdf", make_pdf([None, None], image_pages=(0, 1)), S)
    assert ei.value.status_code == 422
    # one text page among image pages is fine: the text is kept with its page number
    doc = parse_document("mixed.pdf", make_pdf([None, "real text"], image_pages=(0,)), S)
    assert doc.page_at(doc.text.index("real")) == 2


def test_text_encodings():
    assert parse_document("l1.txt", "café résumé naïve".encode("latin-1"), S).text == "café résumé naïve"
    assert parse_document("cp.txt", "“quoted” — dash".encode("cp1252"), S).text == "“quoted” — dash"
    assert parse_document("bom8.txt", "\ufeffhello".encode("utf-8"), S).text == "hello"
    assert parse_document("u16.txt", "hällo wörld".encode("utf-16"), S).text == "hällo wörld"
    assert parse_document("crlf.txt", b"a\r\nb\rc", S).text == "a\nb\nc"


def test_non_utf8_that_does_not_look_like_text_is_415():
    data = "日本語のテキストです。".encode("shift_jis") * 20  # almost all high bytes
    with pytest.raises(errors.UndecodableText, match="UTF-8") as ei:
        parse_document("sjis.txt", data, S)
    assert ei.value.status_code == 415 and "sjis.txt" in str(ei.value)


def test_binary_disguised_as_text():
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(200)
    with pytest.raises(errors.UnsupportedDocument, match="PNG image") as ei:
        parse_document("photo.txt", png, S)
    assert ei.value.status_code == 415
    with pytest.raises(errors.UnsupportedDocument, match="ZIP"):
        parse_document("contract.docx", b"PK\x03\x04" + b"\x00" * 100, S)
    rnd = bytes(range(256)) * 8
    with pytest.raises(errors.UnsupportedDocument, match="binary"):
        parse_document("data.txt", rnd, S)
    with pytest.raises(errors.DocumentError):  # control bytes without NULs
        parse_document("ctl.txt", b"\x01\x02\x03\x1b[0m\xff\xfe\x90" * 50, S)


def test_limits_are_settings():
    with pytest.raises(errors.DocumentTooLarge) as ei:
        parse_document("big.txt", b"x" * 2000, RagSettings(upload_max_bytes=1000))
    assert ei.value.status_code == 413 and "UPLOAD_MAX_BYTES" in str(ei.value)
    with pytest.raises(errors.DocumentTooLarge, match="3 pages"):
        parse_document("long.pdf", make_pdf(["a", "b", "c"]), RagSettings(max_pages=2))


def test_parse_time_budget_stops_between_pages():
    with pytest.raises(errors.ParseTimeout, match="page") as ei:
        parse_document("slow.pdf", make_pdf(["a", "b", "c"]), RagSettings(parse_timeout_s=1e-9))
    assert ei.value.filename == "slow.pdf"


def test_decompression_bomb_hits_pypdf_limit():
    data = make_bomb_pdf(3_000_000)
    assert len(data) < 20_000
    with pytest.raises(errors.DocumentTooLarge, match="safety limit"):
        parse_document("bomb.pdf", data, RagSettings(pdf_max_decompressed_bytes=1 << 20))


def test_clean_name():
    assert clean_name("../../etc/passwd") == "passwd"
    assert clean_name("C:\\docs\\a\nb.pdf") == "a b.pdf"
    assert clean_name("") == "document"
