"""One pack's answer (`PackResult`, from a pack stream's "end" event) and the merge of a
question's pack answers into the one answer the routes return.

    results = [PackResult.from_end_event(ev) for ev in end_events]
    out = merge(results)   # {"answer", "pack_id", "score", "finish_reason", "citations", "packs", "usage"}

`merge` picks the best pack answer by model score, keeps every pack's citations (best pack's
first, duplicates dropped) and sums usage {prompt_tokens, cached_tokens, completion_tokens}.
Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_ask_path.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsa_rag.rag_service.schemas import Citation


@dataclass
class PackResult:
    pack_id: str
    text: str = ""
    score: float = float("-inf")
    cache: str = "prefill"
    replica: str = ""
    node: str = ""
    finish_reason: str = "stop"
    citations: list[Citation] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_end_event(cls, ev: dict) -> "PackResult":
        return cls(
            pack_id=ev["pack_id"], text=ev["text"], score=ev["score"], cache=ev["cache"],
            replica=ev.get("replica", ""), node=ev.get("node", ""), finish_reason=ev["finish_reason"],
            citations=[Citation(**c) for c in ev["citations"]], prompt_tokens=ev["usage"]["prompt_tokens"],
            cached_tokens=ev["usage"]["cached_tokens"], completion_tokens=ev["usage"]["completion_tokens"],
            timings=ev.get("timings", {}),
        )


def merge(results: list[PackResult]) -> dict:
    """Best answer by score; every pack's citations kept (best pack's first, duplicates dropped);
    usage summed over packs."""
    if not results:
        return {"answer": "", "pack_id": None, "score": None, "finish_reason": "stop", "citations": [],
                "packs": [], "usage": {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0}}
    best = max(results, key=lambda r: r.score)
    ordered = [best] + [r for r in results if r is not best]
    seen, cites = set(), []
    for r in ordered:
        for c in r.citations:
            k = (c.document_id, c.char_start, c.char_end)
            if k not in seen:
                seen.add(k)
                cites.append(c)
    return {
        "answer": best.text, "pack_id": best.pack_id, "score": best.score if best.score > float("-inf") else None,
        "finish_reason": best.finish_reason, "citations": cites,
        "packs": [{"pack_id": r.pack_id, "answer": r.text, "score": r.score if r.score > float("-inf") else -1e9,
                   "cache": r.cache, "replica": r.replica, "node": r.node, "finish_reason": r.finish_reason,
                   "citations": r.citations} for r in results],
        "usage": {
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "cached_tokens": sum(r.cached_tokens for r in results),
            "completion_tokens": sum(r.completion_tokens for r in results),
        },
    }
