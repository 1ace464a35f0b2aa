"""Writes examples/report.pdf, the two-page made-up annual report of the README walk-through
(page 2 holds the financial facts), with the tests' hand-made-PDF helper.

    .venv/bin/python examples/make_report_pdf.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.rag_service.pdfs import make_pdf  # noqa: E402

PAGES = [
    "Northwind Traders - Annual Report 2023\n"
    "Northwind Traders sells kitchen equipment in twelve countries.\n"
    "The company was founded in Lisbon in 1998 by Ana Ferreira.\n"
    "Its head office moved to Porto in 2015.\n"
    "The board met eleven times during the year.",
    "Financial summary\n"
    "The revenue of Northwind Traders in 2023 was 41.2 million euros.\n"
    "Operating costs fell by 6 percent compared with 2022.\n"
    "The access code of the Porto warehouse is 7351.\n"
    "The chief financial officer is Marta Silva.",
]

if __name__ == "__main__":
    out = Path(__file__).with_name("report.pdf")
    out.write_bytes(make_pdf(PAGES))
    print(f"wrote {out} ({out.stat().st_size} bytes)")
