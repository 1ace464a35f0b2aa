"""Hostile input to the parsers: a page whose extraction never ends (the sandbox's hard time
budget), a decompression bomb past pypdf's caps (the sandbox's memory cap), and a short
property-based fuzz of `parse_document` and `clean_name` (hypothesis): every input either
parses or raises a DocumentError with a message naming the file; never anything else.
The long fuzz run is `benchmarks/fuzz_parsers.py`.

    .venv/bin/python -m pytest -q tests/rag_service/test_hostile.py
"""

from __future__ import annotations

import io
import time
import unicodedata
import zlib

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, NameObject, NumberObject, StreamObject

from dsa_rag.rag_service import errors
from dsa_rag.rag_service.parsing.ingest import clean_name, parse_document
from dsa_rag.rag_service.schemas import NAME_MAX
from dsa_rag.rag_service.settings import RagSettings
from tests.rag_service.pdfs import make_pdf

S = RagSettings(parse_timeout_s=10)
S_THREAD = RagSettings(parse_timeout_s=10, parse_isolation="thread")


def slow_page_pdf(ops: int) -> bytes:
    """One page with `ops` text-show operators: a few KB compressed, ~50 us per operator in
    pypdf's extract_text (400k operators: ~20 s on one core), all inside one call."""
    w = PdfWriter(clone_from=io.BytesIO(make_pdf(["x"])))
    s = DecodedStreamObject()
    s.set_data(b"BT /F1 12 Tf 72 720 Td " + b"(a) Tj 1 0 Td " * ops + b"ET")
    w.pages[0][NameObject("/Contents")] = w._add_object(s.flate_encode())  # noqa: SLF001
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


def big_bomb_pdf(inflated: int) -> bytes:
    """A content stream of `inflated` bytes compressed to ~1/1000 (built in 1 MiB pieces)."""
    w = PdfWriter(clone_from=io.BytesIO(make_pdf(["x"])))
    c, piece = zlib.compressobj(9), b" " * (1 << 20)
    comp = c.compress(b"BT /F1 12 Tf 72 720 Td (bomb) Tj ET") + b"".join(
        c.compress(piece) for _ in range(inflated >> 20)) + c.flush()
    s = StreamObject()
    s._data = comp  # noqa: SLF001 - already compressed
    s[NameObject("/Filter")] = NameObject("/FlateDecode")
    s[NameObject("/Length")] = NumberObject(len(comp))
    w.pages[0][NameObject("/Contents")] = w._add_object(s)  # noqa: SLF001
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


def test_a_page_whose_extraction_hangs_is_cut_off_by_the_budget():
    data = slow_page_pdf(400_000)
    assert len(data) < 50_000
    parse_document("warm.pdf", make_pdf(["warm up"]), RagSettings(parse_timeout_s=1.0))  # worker started
    t0 = time.monotonic()
    try:
        parse_document("slow.pdf", data, RagSettings(parse_timeout_s=1.0))
        raise AssertionError("the slow page should hit the budget")
    except errors.ParseTimeout as e:
        assert e.filename == "slow.pdf" and "DSA_RAG_PARSE_TIMEOUT_S" in str(e)
    assert time.monotonic() - t0 < 5.0  # ~1 s, not the ~20 s the page takes
    doc = parse_document("next.pdf", make_pdf(["after the timeout"]), RagSettings(parse_timeout_s=1.0))
    assert "after the timeout" in doc.text  # a fresh worker took over


def test_bomb_past_pypdf_caps_hits_the_memory_cap():
    data = big_bomb_pdf(600 << 20)
    assert len(data) < 1 << 20
    s = RagSettings(pdf_max_decompressed_bytes=2_000_000_000, parse_memory_bytes=512 << 20, parse_timeout_s=60)
    try:
        parse_document("bomb.pdf", data, s)
        raise AssertionError("the bomb should hit the memory cap")
    except errors.DocumentTooLarge as e:
        assert e.filename == "bomb.pdf" and "memory" in str(e)


def _pdf_mutations():
    base = make_pdf(["The treaty of Rome was signed in 1957.", "Second page."])
    return st.one_of(
        st.binary(max_size=2048).map(lambda b: b"%PDF-1.7\n" + b),  # garbage after a header
        st.integers(0, len(base)).map(lambda n: base[:n]),  # truncations
        st.tuples(st.integers(0, len(base) - 1), st.binary(min_size=1, max_size=16)).map(  # byte flips
            lambda t: base[:t[0]] + t[1] + base[t[0] + len(t[1]):]),
    )


TEXTISH = st.one_of(
    st.binary(max_size=4096),
    st.text(max_size=2000).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.text(max_size=500).map(lambda t: t.encode("utf-16")),
    st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\x00\x00\xfe\xff", b"PK\x03\x04", b"\x89PNG\r\n\x1a\n"]).flatmap(
        lambda bom: st.binary(max_size=256).map(lambda b: bom + b)),
)


def _check(name: str, data: bytes, s: RagSettings) -> None:
    try:
        doc = parse_document(name, data, s)
    except errors.DocumentError as e:
        assert e.filename == clean_name(name) and str(e).startswith(clean_name(name)) and 400 <= e.status_code < 500
        return
    doc.text.encode("utf-8")  # valid text (no lone surrogates), offsets inside it
    for p in doc.pages:
        assert 0 <= p.char_start <= p.char_end <= len(doc.text)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=TEXTISH, name=st.text(max_size=40))
def test_fuzz_text_parser(data, name):
    _check(name, data, S_THREAD)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_pdf_mutations())
def test_fuzz_pdf_parser_in_the_sandbox(data):
    _check("fuzz.pdf", data, S)


@hsettings(max_examples=300, deadline=None)
@given(st.text(max_size=2000))
def test_fuzz_clean_name(name):
    out = clean_name(name)
    assert out and len(out) <= NAME_MAX and out == out.strip()
    assert "/" not in out and "\\" not in out and out not in (".", "..")
    assert unicodedata.is_normalized("NFC", out) or out == unicodedata.normalize("NFC", out)
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co") for c in out)
    out.encode("utf-8")
