"""OCR of PDF pages that have no text layer (scans, image-only exports): the page's embedded
images -> text lines, with an offline engine.

    from dsa_rag.rag_service.parsing.ocr import ocr_image, page_images, engine_available
    engine_available("tesseract")                      # True when the binary is on PATH
    text = ocr_image(pil_image, "tesseract")           # lines top to bottom, blank lines dropped

Engines (the setting `ocr_engine`, env DSA_RAG_OCR_ENGINE):
- "tesseract" (default): the `tesseract` binary (Debian/Ubuntu `tesseract-ocr`, 15 MB with the
  English model), run as a subprocess per image.
- "off": pages without a text layer stay empty (a fully scanned PDF is refused with NoTextLayer).
Why not rapidocr-onnxruntime (models inside a pip wheel): benchmarks/ocr_bench.py measured it on
the same rendered pages at ~3x slower, and it drops most spaces between English words
("Note:Wenlihaslantern..."), which breaks both the model's reading and BM25; it also pulls
~390 MB (opencv + onnxruntime) into the environment. The bench keeps its adapter for re-checks.

We OCR the images a page draws, not a rasterized page: a scanned PDF is one image per page (or a
few strips), so this reads the scan at its own resolution and needs no PDF renderer. A page
whose content is vector outlines with no image stays unread (rare: outlined-text exports).

This runs inside the parsing sandbox (sandbox.py): the engine loads once per sandbox worker.
Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_ocr.py`.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess

from PIL import Image

log = logging.getLogger(__name__)
ENGINES = ("tesseract",)
MIN_SIDE = 32  # images smaller than this (icons, rules, the 4x4 grey test swatch) hold no text


class OcrUnavailable(RuntimeError):
    """The configured OCR engine is not installed here."""


def engine_available(engine: str) -> bool:
    if engine == "tesseract":
        return shutil.which("tesseract") is not None
    return False


def page_images(page) -> list[Image.Image]:
    """The images a pypdf page draws that may hold text (decoded by pypdf with Pillow), in
    drawing order; undecodable images are skipped (logged)."""
    out = []
    try:
        images = list(page.images)
    except Exception as e:  # noqa: BLE001 - a damaged image dictionary: nothing to read on this page
        log.warning("could not list the images of a page (%s: %s)", type(e).__name__, e)
        return out
    for im in images:
        try:
            img = im.image
        except Exception as e:  # noqa: BLE001 - e.g. JBIG2 without a decoder
            log.warning("could not decode image %s (%s: %s)", getattr(im, "name", "?"), type(e).__name__, e)
            continue
        if img is not None and min(img.size) >= MIN_SIDE:
            out.append(img)
    return out


def ocr_image(img: Image.Image, engine: str, timeout_s: float | None = None) -> str:
    """Text of one image: lines top to bottom joined by \\n. Raises OcrUnavailable when the
    engine is not installed, TimeoutError past `timeout_s`."""
    if engine == "tesseract":
        return _ocr_tesseract(img, timeout_s)
    raise ValueError(f"unknown OCR engine {engine!r}; known: {', '.join(ENGINES)}")


def _ocr_tesseract(img: Image.Image, timeout_s: float | None) -> str:
    exe = shutil.which("tesseract")
    if exe is None:
        raise OcrUnavailable("the tesseract binary is not installed (apt-get install tesseract-ocr), "
                             "or set DSA_RAG_OCR_ENGINE=off")
    buf = io.BytesIO()
    img.convert("L").save(buf, format="PNG")
    # OMP_THREAD_LIMIT=1: tesseract's OpenMP threads only slow it down on a shared 2-core box
    env = {"OMP_THREAD_LIMIT": "1", **{k: os.environ[k] for k in ("PATH", "TESSDATA_PREFIX") if k in os.environ}}
    try:
        proc = subprocess.run([exe, "stdin", "stdout", "--psm", "3"], input=buf.getvalue(), capture_output=True,
                              env=env, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired:  # run() has killed it
        raise TimeoutError(f"tesseract took over {timeout_s:g} s on one image") from None
    if proc.returncode != 0:
        raise RuntimeError(f"tesseract failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-300:]}")
    lines = [ln.strip() for ln in proc.stdout.decode("utf-8", errors="replace").splitlines()]
    return "\n".join(ln for ln in lines if ln)
