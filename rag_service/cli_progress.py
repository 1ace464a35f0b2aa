"""The CLI's progress bars for a cold pack's prefill: `dsa-rag ask` feeds every event of the
answer stream to `PrefillBars.update`; a `{"type": "progress"}` event (see serve/sse.py) draws or
advances one bar per pack on stderr, and the first answer token closes them.

    bars = PrefillBars()
    for ev in client.ask_stream(question):
        bars.update(ev)          # no-op for anything but progress events
        ...
    bars.close()

    Reading pack pk_1f2e: 41%|████      | 12288/30120 tokens [00:21<00:31]

On stderr, so `dsa-rag ask ... > answer.txt` keeps the answer clean; tqdm draws nothing fancy
when stderr is not a terminal (one line per update). Tests: `.venv/bin/python -m pytest -q
tests/service/test_cli_progress.py`.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


class PrefillBars:
    def __init__(self, file=None):
        self.file = file or sys.stderr
        self.bars: dict[str, tqdm] = {}

    def update(self, ev: dict) -> None:
        if ev.get("type") == "token":
            self.close()  # the answer starts: the reading is over
            return
        if ev.get("type") != "progress":
            return
        bar = self.bars.get(ev["pack_id"])
        if bar is None:
            bar = self.bars[ev["pack_id"]] = tqdm(
                total=ev["total_tokens"], initial=ev["done_tokens"], unit=" tokens", file=self.file,
                desc=f"Reading pack {ev['pack_id'][:10]} (first question; later ones reuse it)", leave=False,
                dynamic_ncols=True, mininterval=0, miniters=1)  # events come seconds apart: draw each
        bar.total = ev["total_tokens"]
        bar.update(ev["done_tokens"] - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
