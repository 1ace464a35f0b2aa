"""OCR engines compared on pages rendered here: character accuracy and pages/s on this CPU.

    .venv/bin/python benchmarks/ocr_bench.py                          # 12 pages x (clean, scanned), ~3 min
    .venv/bin/python benchmarks/ocr_bench.py --pages 2 --out /tmp/ocr.json   # smoke

Pages: text from dsa-tiny's data grammar with planted facts (numbers, codes like "K7Q-ZP3",
word pairs), rendered to 150-dpi grayscale bitmaps by tests/rag_service/planted.py (what an
image-only PDF page holds). Each page is read twice: "clean" (the render as is) and "scanned"
(rotated 0.6 degrees, Gaussian noise, JPEG quality 50: what a cheap office scanner gives).
Character accuracy = 1 - edit distance / length of the truth, both with whitespace collapsed to
single spaces (line breaks are layout, not content); planted values: the share read exactly.
Engines: "tesseract" through the service's own `rag_service/parsing/ocr.py` (the binary as a
subprocess), and "rapidocr" (`pip install rapidocr-onnxruntime`: PP-OCR models inside the wheel,
onnxruntime) through the small adapter below, kept so the choice can be re-checked; an engine that
is not installed is reported as such. The engine's load time is not
counted in pages/s (the sandbox worker loads it once).

Last stdout line: JSON; also writes benchmarks/results/ocr_bench.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dsa_rag.model.training import data  # noqa: E402
from dsa_rag.rag_service.parsing import ocr  # noqa: E402
from tests.rag_service.planted import render_page  # noqa: E402


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, one row of numpy at a time (pages are ~1k characters)."""
    if len(a) < len(b):
        a, b = b, a
    bv = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    prev = np.arange(len(b) + 1, dtype=np.int32)
    for i, ch in enumerate(a, start=1):
        sub = prev[:-1] + (bv != ord(ch))
        cur = np.empty_like(prev)
        cur[0] = i
        cur[1:] = np.minimum(prev[1:] + 1, sub)
        # insertions run left to right: a prefix-minimum of (cur[j] - j) + j
        idx = np.arange(len(cur), dtype=np.int32)
        cur = np.minimum.accumulate(cur - idx) + idx
        prev = cur
    return int(prev[-1])


def rapidocr_text(img: Image.Image) -> str:
    """rapidocr-onnxruntime's boxes -> lines (a box joins the line whose first box spans its
    vertical centre), words left to right."""
    global _RAPID
    if _RAPID is None:
        from rapidocr_onnxruntime import RapidOCR

        _RAPID = RapidOCR()
    result, _ = _RAPID(np.asarray(img.convert("RGB")))
    lines: list[list] = []
    for quad, text, _conf in sorted(result or [], key=lambda r: sum(p[1] for p in r[0]) / 4):
        top, bot, mid = min(p[1] for p in quad), max(p[1] for p in quad), sum(p[1] for p in quad) / 4
        if lines and lines[-1][0][0] <= mid <= lines[-1][0][1]:
            lines[-1].append((top, bot, min(p[0] for p in quad), text))
        else:
            lines.append([(top, bot, min(p[0] for p in quad), text)])
    return "\n".join(" ".join(b[3] for b in sorted(line, key=lambda b: b[2])) for line in lines)


_RAPID = None
ENGINES = {
    "tesseract": (lambda: ocr.engine_available("tesseract"), lambda img: ocr.ocr_image(img, "tesseract")),
    "rapidocr": (lambda: importlib.util.find_spec("rapidocr_onnxruntime") is not None, rapidocr_text),
}


def norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def make_pages(n: int, seed: int) -> list[tuple[str, list[str]]]:
    """-> [(page text, planted values)]."""
    rng = random.Random(seed)
    pages = []
    for _ in range(n):
        lines, values = [], []
        for _ in range(16):
            if rng.random() < 0.25:
                ent, attr, val = data._entity(rng), rng.choice(data._ATTRS), data._value(rng)
                lines.append(data.render_fact(rng, ent, attr, val))
                values.append(val)
            else:
                lines.append(data.filler_sentence(rng))
        pages.append(("\n".join(lines), values))
    return pages


def scanned(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = img.rotate(0.6, resample=Image.BILINEAR, fillcolor=255, expand=False)
    a = np.asarray(img, dtype=np.float32) + rng.normal(0, 18, (img.height, img.width))
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=50)
    return Image.open(io.BytesIO(buf.getvalue()))


def check_gate() -> None:
    """The accuracy metric itself must be right before it scores anything."""
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    assert edit_distance("flaw", "lawn") == 2 and edit_distance("same", "same") == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=12)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/ocr_bench.json"))
    args = ap.parse_args()
    check_gate()
    pages = make_pages(args.pages, args.seed)
    noise = np.random.default_rng(args.seed)
    variants = {"clean": [render_page(t) for t, _ in pages]}
    variants["scanned"] = [scanned(im, noise) for im in variants["clean"]]
    results = {}
    for engine, (available, read) in ENGINES.items():
        if not available():
            results[engine] = {"available": False}
            continue
        t0 = time.perf_counter()
        read(variants["clean"][0])  # load / warm up: not counted
        row = {"available": True, "warmup_s": round(time.perf_counter() - t0, 3)}
        for var, imgs in variants.items():
            t, errs, chars, hit, total = 0.0, 0, 0, 0, 0
            for img, (truth, values) in zip(imgs, pages):
                t0 = time.perf_counter()
                out = read(img)
                t += time.perf_counter() - t0
                a, b = norm(out), norm(truth)
                errs += edit_distance(a, b)
                chars += len(b)
                hit += sum(v in a for v in values)
                total += len(values)
            row[var] = {"char_accuracy": round(1 - errs / chars, 4), "values_exact": round(hit / max(total, 1), 4),
                        "values": total, "pages_per_s": round(len(imgs) / t, 3), "s_per_page": round(t / len(imgs), 3)}
        results[engine] = row
        print(engine, json.dumps(row), flush=True)
    out = {"bench": "ocr", "pages": args.pages, "dpi": 150, "image": "1275x1650 grayscale",
           "command": "benchmarks/ocr_bench.py " + " ".join(sys.argv[1:]), "engines": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    md = [f"# OCR engines on rendered pages (`{out['command'].strip()}`)", "",
          f"{args.pages} pages of 16 lines, 150 dpi; 'scanned' = rotated 0.6 deg + noise + JPEG q50. "
          "Shared 2-core CPU.", "",
          "| engine | variant | char accuracy | planted values exact | pages/s |", "|---|---|---:|---:|---:|"]
    for engine, row in results.items():
        for var in variants:
            if row.get("available"):
                r = row[var]
                md.append(f"| {engine} | {var} | {r['char_accuracy']:.4f} | {r['values_exact']:.3f} "
                          f"| {r['pages_per_s']:.2f} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
