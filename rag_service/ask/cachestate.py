"""Where each pack's prefix KV cache is, for `GET /v1/packs`, the web UI and `dsa-rag status`:
cold (nowhere), prefilling (now, with progress), memory (warm in a replica), store (in the KV
store, restorable in seconds).

    states = pack_states(rag, "default", worker.cache_states())   # LocalBackend
    states = pack_states(rag, "default", {})                       # Ray ingestion: cold / store only

`worker_states` is `PackWorker.cache_states()` of the replicas that can be asked (memory and
prefilling are per replica; the store is shared). A replica also publishes its prefills' progress
to Redis (`publish_progress`, every PUBLISH_EVERY_S, with a TTL so a dead replica's entry
expires), so a process without the replica (the Ray ingress) still reports "prefilling N%".
Imports neither FastAPI nor Ray.
Tests: `.venv/bin/python -m pytest -q tests/service/test_progress.py`.
"""

from __future__ import annotations

import json

from dsa_rag.rag_service.ask.progress import PrefillProgress
from dsa_rag.rag_service.pipeline import RagPipeline

PUBLISH_EVERY_S = 2.0  # how often a replica writes a running prefill's progress to Redis
PUBLISH_TTL_S = 30  # an entry not refreshed for this long is a dead replica's: it expires


def stored_packs(rag: RagPipeline, pack_ids: list[str]) -> set[str]:
    """The packs with a live KV-store entry (an entry whose metadata was evicted does not count)."""
    return {p for p in pack_ids if any(rag.kv.contains(k) for k in rag.kv.keys_for_pack(p))}


def publish_progress(rag: RagPipeline, prog: PrefillProgress, replica: str) -> None:
    """Write a running prefill's progress (blocking: call it from a thread)."""
    rag.r.set(rag.keys.prefill(prog.pack_id), json.dumps(prog.state(replica)), ex=PUBLISH_TTL_S)


def clear_progress(rag: RagPipeline, pack_id: str) -> None:
    rag.r.delete(rag.keys.prefill(pack_id))


def published_progress(rag: RagPipeline, pack_ids: list[str]) -> dict[str, dict]:
    """Pack id -> the progress a replica published, for the packs being prefilled somewhere."""
    if not pack_ids:
        return {}
    raw = rag.r.mget([rag.keys.prefill(p) for p in pack_ids])
    return {p: json.loads(v) for p, v in zip(pack_ids, raw) if v}


def pack_states(rag: RagPipeline, tenant: str, worker_states: dict[str, dict]) -> list[dict]:
    """The tenant's packs, oldest first, each a `serve.schemas_api.PackStatus` as a dict."""
    packs = rag.list_packs(tenant)
    stored = stored_packs(rag, [p.id for p in packs])
    published = published_progress(rag, [p.id for p in packs if p.id not in worker_states])
    out = []
    for p in packs:
        live = worker_states.get(p.id) or published.get(p.id, {})
        # a replica's own view wins (prefilling, memory); else the shared store; else nothing
        state = live.get("state") or ("store" if p.id in stored else "cold")
        out.append({**live, "id": p.id, "state": state, "tokens": p.tokens, "capacity": p.capacity,
                    "stored": p.id in stored, "documents": list(dict.fromkeys(m.document_id for m in p.documents))})
    return out
