"""One pack's answer (`PackResult`, from a pack stream's "end" event) and the merge of a
question's pack answers into the one answer the routes return.

    results = [PackResult.from_end_event(ev) for ev in end_events]
    out = merge(results)   # {"answer", "pack_id", "score", "finish_reason", "citations", "packs", "usage",
                           #  "abstained", "support"}

`merge` picks the best *supported* pack answer by model score (a pack answer is "abstained" when
the question asked for abstention and its support score is under the threshold: ask/grounding.py),
keeps the citations of every supported pack (best pack's first, each pack's in descending share,
duplicates dropped) and sums usage {prompt_tokens, cached_tokens, completion_tokens}. When no
pack's answer is supported, the answer is "Not in the documents.", `abstained` is true and no
citation is returned: no value the documents do not back reaches the caller, not even in
`packs` (whose answers say the same).
Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_ask_path.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsa_rag.rag_service.ask.support import ABSTAIN_TEXT
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
    support: float | None = None  # ask/support.py; None from a worker that does not score
    abstained: bool = False

    @classmethod
    def from_end_event(cls, ev: dict) -> "PackResult":
        return cls(
            pack_id=ev["pack_id"], text=ev["text"], score=ev["score"], cache=ev["cache"],
            replica=ev.get("replica", ""), node=ev.get("node", ""), finish_reason=ev["finish_reason"],
            citations=[Citation(**c) for c in ev["citations"]], prompt_tokens=ev["usage"]["prompt_tokens"],
            cached_tokens=ev["usage"]["cached_tokens"], completion_tokens=ev["usage"]["completion_tokens"],
            timings=ev.get("timings", {}), support=ev.get("support"), abstained=bool(ev.get("abstained", False)),
        )


def merge(results: list[PackResult]) -> dict:
    """Best supported answer by score (else "Not in the documents."); the supported packs'
    citations (best pack's first, duplicates dropped); usage summed over packs."""
    if not results:
        return {"answer": "", "pack_id": None, "score": None, "finish_reason": "stop", "citations": [],
                "packs": [], "usage": {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0},
                "abstained": False, "support": None}
    supported = [r for r in results if not r.abstained]
    abstained = not supported
    best = max(supported or results, key=lambda r: r.score)
    ordered = [best] + [r for r in supported if r is not best] if not abstained else []
    seen, cites = set(), []
    for r in ordered:
        for c in r.citations:
            k = (c.document_id, c.char_start, c.char_end)
            if k not in seen:
                seen.add(k)
                cites.append(c)
    return {
        "answer": ABSTAIN_TEXT if abstained else best.text, "abstained": abstained, "support": best.support,
        "pack_id": best.pack_id, "score": best.score if best.score > float("-inf") else None,
        "finish_reason": best.finish_reason, "citations": cites,
        "packs": [{"pack_id": r.pack_id, "answer": ABSTAIN_TEXT if r.abstained else r.text,
                   "score": r.score if r.score > float("-inf") else -1e9,
                   "cache": r.cache, "replica": r.replica, "node": r.node, "finish_reason": r.finish_reason,
                   "citations": [] if r.abstained else r.citations, "support": r.support, "abstained": r.abstained}
                  for r in results],
        "usage": {
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "cached_tokens": sum(r.cached_tokens for r in results),
            "completion_tokens": sum(r.completion_tokens for r in results),
        },
    }
