"""Writes examples/report.pdf, the two-page made-up annual report of the README walk-through
(page 2 holds the fact the walk-through asks for), with the tests' hand-made-PDF helper. The
fact is written in a form the default model dsa-tiny was trained to read ("The X of Y is Z.",
model/training/data.py); dsa-tiny is reliable on one such fact per pack, not yet on several similar ones.

    .venv/bin/python examples/make_report_pdf.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.rag_service.pdfs import make_pdf  # noqa: E402

PAGES = [
    "Northwind Traders - Annual Report\n"
    "The board noted that the shipping schedule improved during the winter.\n"
    "According to the survey, customer feedback grew while supply costs fell.\n"
    "The engineers found a map near the train station and reported it to the board.\n"
    "Meanwhile, the finance group argued at length about the new warehouse.",
    "Financial summary\n"
    "The engineers observed that energy prices rose sharply this year.\n"
    "The access code of the Porto warehouse is 7351902.\n"
    "In short, the auditors agreed clearly about the annual audit.",
]

if __name__ == "__main__":
    out = Path(__file__).with_name("report.pdf")
    out.write_bytes(make_pdf(PAGES))
    print(f"wrote {out} ({out.stat().st_size} bytes)")
