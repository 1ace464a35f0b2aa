"""Progress of one pack's prefix prefill: tokens cached so far, the total, and an ETA.

A cold pack of 100k tokens takes minutes to prefill on a CPU; this is what the answer stream
(`{"event": "progress"}`), `GET /v1/packs` and the CLI's progress bar report meanwhile.

    prog = PrefillProgress("pack_1", total=30_000)
    await engine.prefill_prefix(ids, progress=prog.update)   # the engine calls update(done, total)
    prog.event("local")  # {"event": "progress", "pack_id": "pack_1", "done_tokens": ..., "eta_s": ...}

The ETA is the tokens left over the rate measured since this prefill began (chunks of one pack
cost about the same, so a straight line is a fair guess); None until the first chunk landed.
Imports neither FastAPI nor Ray. Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_progress.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class PrefillProgress:
    pack_id: str
    total: int  # tokens of the whole prefix
    done: int = 0  # tokens cached (an extended older prefix counts as done from the start)
    started: float = field(default_factory=time.monotonic)
    start_done: int = -1  # `done` at the first update: the rate excludes what was cached before

    def __post_init__(self):
        if self.start_done < 0:
            self.start_done = self.done

    def update(self, done: int, total: int) -> None:
        """The engine's progress callback (called on the event loop as chunks land)."""
        self.done, self.total = int(done), max(int(total), 1)

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta(self) -> float | None:
        """Seconds left at the rate seen so far; None before any chunk landed."""
        gained = self.done - self.start_done
        if gained <= 0:
            return None
        return (self.total - self.done) / (gained / max(self.elapsed(), 1e-6))

    def numbers(self, replica: str) -> dict:
        eta = self.eta()
        return {"done_tokens": self.done, "total_tokens": self.total, "percent": round(100 * self.fraction, 1),
                "elapsed_s": round(self.elapsed(), 2), "eta_s": None if eta is None else round(eta, 1),
                "replica": replica}

    def event(self, replica: str) -> dict:
        """The progress event of the answer stream."""
        return {"event": "progress", "phase": "prefill", "pack_id": self.pack_id, **self.numbers(replica)}

    def state(self, replica: str) -> dict:
        """The pack's cache state while it prefills (GET /v1/packs, ask/cachestate.py)."""
        return {"state": "prefilling", **self.numbers(replica)}
