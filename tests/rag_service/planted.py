"""Multi-page PDFs with planted facts, for the grounding tests and benchmarks: citation precision,
abstention ("not in the documents") and OCR of image-only pages.

    from tests.rag_service.planted import make_planted, render_page, page_pdf
    doc = make_planted(random.Random(1), n_pages=3, image_pages=(1,))
    doc.pdf, doc.question, doc.answer, doc.answer_page, doc.fact   # one fact, on page doc.answer_page
    doc.unanswerable        # a question about a fact the document does not hold
    img = render_page("some text\\nmore text")                      # a PIL page image (what a scan looks like)

Each document opens with a title line (as real reports do, and as `examples/report.pdf` does: the
first text of a pack is where attention sinks sit), then pages of filler written by dsa-tiny's
own data grammar (model/training/data.py), one sentence per line as pypdf extracts a typeset page.
One fact sentence ("The access code of Project Lomiren is 7351902.", in one of the generator's
templates) is planted at a random line of a random page. Text pages are real PDF text (a Type1
Helvetica content stream); pages in `image_pages` carry no text layer at all, only the page
rendered to a grayscale bitmap (DejaVu Sans, 150 dpi), as a scanner would produce.

Unanswerable questions ask either about an entity the document never mentions (with the planted
attribute) or about another attribute of the planted entity: the two ways a user asks for
something that is not there (the issue's "Who signed the Porto warehouse lease?" is the second).
"""

from __future__ import annotations

import io
import random
import textwrap
import zlib
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject, NumberObject, StreamObject

from dsa_rag.model.training import data

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
PAGE_W, PAGE_H = 612, 792  # PDF points (US letter)
TITLES = ("Northwind Traders - Annual Report", "Harbor Logistics - Quarterly Review", "Field Office Notes",
          "Board Minutes - Spring Session", "Operations Summary", "Project Ledger - Internal Memo")


@dataclass
class PlantedDoc:
    name: str
    pdf: bytes
    pages: list[str]  # the text drawn on each page (image pages: the rendered text)
    fact: str  # the planted sentence
    question: str
    answer: str
    answer_page: int  # 1-based
    unanswerable: str  # a question about a fact the document does not hold
    unanswerable_kind: str  # "entity" (never mentioned) | "attribute" (the entity, another attribute)
    image_pages: tuple[int, ...] = field(default_factory=tuple)  # 1-based


def make_planted(rng: random.Random, n_pages: int, *, image_pages: tuple[int, ...] = (), lines_per_page: int = 14,
                 answer_page: int | None = None, value_kind: str | None = None) -> PlantedDoc:
    """One document of `n_pages` pages with one planted fact. image_pages: 1-based pages drawn as
    images only. answer_page: where the fact goes (None: a random page)."""
    ent, attr, val = data._entity(rng), rng.choice(data._ATTRS), data._value(rng, value_kind)
    fact = data.render_fact(rng, ent, attr, val)
    others = tuple(data._entity(rng) for _ in range(rng.randint(1, 2)))
    # the planted entity comes back in the filler now and then, as names do in real documents
    names = others + ((ent,) if rng.random() < 0.5 else ())
    pages = [[data.filler_sentence(rng, names) for _ in range(lines_per_page)] for _ in range(n_pages)]
    pages[0].insert(0, rng.choice(TITLES))
    page = answer_page if answer_page is not None else rng.randint(1, n_pages)
    lines = pages[page - 1]
    lines.insert(rng.randint(1 if page == 1 else 0, len(lines)), fact)
    texts = ["\n".join(p) for p in pages]
    if rng.random() < 0.5:  # ask about an entity the document never names
        while True:
            absent = data._entity(rng)
            if all(absent not in t for t in texts):
                break
        unanswerable, kind = data.render_question(rng, absent, attr), "entity"
    else:  # the planted entity, an attribute the document does not give
        other = rng.choice([a for a in data._ATTRS if a != attr])
        unanswerable, kind = data.render_question(rng, ent, other), "attribute"
    name = f"{rng.choice(data._DOCNAMES)}_{rng.randrange(10**6):06d}.pdf"
    return PlantedDoc(name=name, pdf=page_pdf(texts, image_pages=image_pages), pages=texts, fact=fact,
                      question=data.render_question(rng, ent, attr), answer=val, answer_page=page,
                      unanswerable=unanswerable, unanswerable_kind=kind, image_pages=tuple(image_pages))


# ------------------------------------------------------------------ rendering
def render_page(text: str, dpi: int = 150, font_pt: float = 11.0, width_chars: int = 80) -> Image.Image:
    """The page as a scan would show it: black text on white, lines wrapped at `width_chars`,
    grayscale ("L") at `dpi`, US-letter size."""
    w, h = int(PAGE_W / 72 * dpi), int(PAGE_H / 72 * dpi)
    img = Image.new("L", (w, h), 255)
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(FONT, int(font_pt / 72 * dpi))
    y, step, x = int(dpi), int(font_pt * 1.5 / 72 * dpi), int(dpi)
    for line in text.split("\n"):
        for part in textwrap.wrap(line, width_chars) or [""]:
            draw.text((x, y), part, fill=0, font=font)
            y += step
    return img


def _add(writer: PdfWriter, st: StreamObject):
    return writer._add_object(st)  # noqa: SLF001 - pypdf has no public add_object


def page_pdf(texts: list[str], *, image_pages: tuple[int, ...] = (), dpi: int = 150) -> bytes:
    """A PDF with one page per text: a text layer (lines split on \\n), or, for the 1-based pages
    in `image_pages`, only the rendered bitmap of the text (a full-page image XObject)."""
    w = PdfWriter()
    font = _add(w, DictionaryObject({NameObject("/Type"): NameObject("/Font"),
                                     NameObject("/Subtype"): NameObject("/Type1"),
                                     NameObject("/BaseFont"): NameObject("/Helvetica")}))
    for i, text in enumerate(texts, start=1):
        page = w.add_blank_page(PAGE_W, PAGE_H)
        res = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        if i in image_pages:
            img = render_page(text, dpi=dpi)
            st = StreamObject()
            st._data = zlib.compress(img.tobytes())  # noqa: SLF001 - raw Flate bytes, as scanners write them
            for k, v in {"/Type": NameObject("/XObject"), "/Subtype": NameObject("/Image"),
                         "/Width": NumberObject(img.width), "/Height": NumberObject(img.height),
                         "/ColorSpace": NameObject("/DeviceGray"), "/BitsPerComponent": NumberObject(8),
                         "/Filter": NameObject("/FlateDecode")}.items():
                st[NameObject(k)] = v
            res[NameObject("/XObject")] = DictionaryObject({NameObject("/Im0"): _add(w, st)})
            ops = f"q {PAGE_W} 0 0 {PAGE_H} 0 0 cm /Im0 Do Q\n".encode()
        else:
            esc = [ln.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for ln in text.split("\n")]
            body = " T* ".join(f"({ln}) Tj" for ln in esc)
            ops = f"BT /F1 10 Tf 13 TL 40 750 Td {body} ET\n".encode("latin-1")
        page[NameObject("/Resources")] = res
        cs = DecodedStreamObject()
        cs.set_data(ops)
        page[NameObject("/Contents")] = _add(w, cs)
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()
