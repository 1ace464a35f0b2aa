"""Hand-made PDFs for the rag_service tests: text pages written as raw content streams
(`BT /F1 12 Tf ... Tj ET` with a Type1 Helvetica font), image-only pages, blank pages,
encrypted files. pypdf writes the file structure; we write what is on the pages.

    from tests.rag_service.pdfs import make_pdf
    data = make_pdf(["page one text", "page two text"])   # bytes of a 2-page PDF
"""

from __future__ import annotations

import io

from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject, NumberObject


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _stream(writer: PdfWriter, data: bytes, extra: dict | None = None):
    st = DecodedStreamObject()
    st.set_data(data)
    for k, v in (extra or {}).items():
        st[NameObject(k)] = v
    return writer._add_object(st)  # noqa: SLF001 - pypdf has no public add_object


def make_pdf(pages: list[str | None], *, image_pages: tuple[int, ...] = (), password: str | None = None) -> bytes:
    """One page per entry: a string is drawn as text lines (split on \\n); None is a blank
    page. Pages whose index is in `image_pages` get a small grey image (and no text)."""
    w = PdfWriter()
    font = w._add_object(DictionaryObject({  # noqa: SLF001
        NameObject("/Type"): NameObject("/Font"),
        NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica"),
    }))
    for i, text in enumerate(pages):
        page = w.add_blank_page(612, 792)
        resources = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        ops = b""
        if text is not None:
            lines = text.split("\n")
            body = " T* ".join(f"({_escape(line)}) Tj" for line in lines)
            ops += f"BT /F1 12 Tf 14 TL 72 720 Td {body} ET\n".encode("latin-1")
        if i in image_pages:
            img = _stream(w, bytes(range(0, 256, 16)), {
                "/Type": NameObject("/XObject"), "/Subtype": NameObject("/Image"),
                "/Width": NumberObject(4), "/Height": NumberObject(4),
                "/ColorSpace": NameObject("/DeviceGray"), "/BitsPerComponent": NumberObject(8),
            })
            resources[NameObject("/XObject")] = DictionaryObject({NameObject("/Im0"): img})
            ops += b"q 200 0 0 200 72 400 cm /Im0 Do Q\n"
        page[NameObject("/Resources")] = resources
        page[NameObject("/Contents")] = _stream(w, ops)
    if password is not None:
        w.encrypt(user_password=password, owner_password=password + "-owner", algorithm="AES-128")
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


def make_bomb_pdf(inflated_bytes: int = 3_000_000) -> bytes:
    """A one-page PDF whose content stream is tiny compressed and `inflated_bytes` inflated."""
    w = PdfWriter(clone_from=io.BytesIO(make_pdf(["bomb"])))
    st = DecodedStreamObject()
    st.set_data(b"BT /F1 12 Tf 72 720 Td (bomb) Tj ET" + b" " * inflated_bytes)
    w.pages[0][NameObject("/Contents")] = w._add_object(st.flate_encode())  # noqa: SLF001
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()
