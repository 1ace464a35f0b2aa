"""`dsa-rag ask` over a cold pack: the stream's progress events draw a progress bar on stderr,
the answer and citations on stdout stay as they were. A scripted service (httpx MockTransport,
see test_cli.py); the real stream's progress events are tested in test_progress.py.

    .venv/bin/python -m pytest -q tests/service/test_cli_progress.py
"""

from __future__ import annotations

import io

from dsa_rag.rag_service.cli_progress import PrefillBars
from tests.service.test_cli import CITATIONS, CITED, USAGE, run, serve, sse  # noqa: F401 - serve is a fixture


def _progress(done: int, total: int = 30_000, pack: str = "pk_0123456789abcdef") -> dict:
    return {"type": "progress", "pack_id": pack, "done_tokens": done, "total_tokens": total,
            "percent": round(100 * done / total, 1), "eta_s": 10.0}


def test_ask_shows_a_progress_bar_on_stderr(serve, capsys):
    serve(**{"POST /v1/ask": (200, sse(_progress(0), _progress(10_000), _progress(20_000),
                                       {"type": "token", "text": "Tu"}, {"type": "token", "text": "e"},
                                       CITATIONS, b"[DONE]"))})
    rc, out, err = run(capsys, "ask", "When?")
    assert rc == 0 and out == "Tue\n" + CITED  # stdout: the answer only
    assert "Reading pack pk_0123456" in err and "20000/30000" in err and err.rstrip().endswith(USAGE)


def test_bars_per_pack_close_at_the_first_token():
    buf = io.StringIO()
    bars = PrefillBars(file=buf)
    bars.update(_progress(0, pack="pk_a"))
    bars.update(_progress(512, 1024, pack="pk_b"))
    bars.update(_progress(15_000, pack="pk_a"))
    assert set(bars.bars) == {"pk_a", "pk_b"} and bars.bars["pk_a"].n == 15_000 and bars.bars["pk_b"].n == 512
    bars.update({"type": "citations"})  # other events pass by
    assert len(bars.bars) == 2
    bars.update({"type": "token", "text": "x"})
    assert bars.bars == {} and "15000/30000" in buf.getvalue()
