"""Where each pack's prefix KV cache is, for `GET /v1/packs`, the web UI and `dsa-rag status`:
cold (nowhere), prefilling (now, with progress), memory (warm in a replica), store (in the KV
store, restorable in seconds).

    states = pack_states(rag, "default", worker.cache_states())   # LocalBackend
    states = pack_states(rag, "default", {})                       # Ray ingestion: what replicas published

`worker_states` is `PackWorker.cache_states()` of the replicas that can be asked (memory and
prefilling are per replica; the store is shared). So that a process without the replicas (the Ray
ingress) reports them too, a replica publishes to Redis, each entry with a TTL so that a dead
replica's expires:
  - its prefills' progress (`publish_progress`, every PUBLISH_EVERY_S): "prefilling N%";
  - the packs it holds warm (`publish_warm`: one key per replica, written when the set changes and
    every WARM_REFRESH_S, removed on close; `PackWorker(publish_warm=True)`): "memory" + replica.
Only the tenant's own pack ids are looked up in what was published, so a tenant sees its packs only.
Imports neither FastAPI nor Ray.
Tests: `.venv/bin/python -m pytest -q tests/service/test_progress.py tests/service/test_ui_api.py`.
"""

from __future__ import annotations

import json
import time

from dsa_rag.rag_service.ask.progress import PrefillProgress
from dsa_rag.rag_service.pipeline import RagPipeline

PUBLISH_EVERY_S = 2.0  # how often a replica writes a running prefill's progress to Redis
PUBLISH_TTL_S = 30  # an entry not refreshed for this long is a dead replica's: it expires
WARM_REFRESH_S = 10.0  # how often a replica rewrites its warm set (well within PUBLISH_TTL_S)


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


def publish_warm(rag: RagPipeline, replica: str, pack_ids: list[str]) -> None:
    """Write the pack ids `replica` holds warm (blocking: call it from a thread); an empty set
    removes the replica's entry. The registry (a zset: replica -> last write) lets a reader find
    the entries without scanning the keyspace; writers drop the replicas it has not heard from
    for PUBLISH_TTL_S."""
    now, reg = time.time(), rag.keys.warm_replicas()
    with rag.r.pipeline(transaction=False) as p:
        if pack_ids:
            p.set(rag.keys.warm(replica), json.dumps(list(pack_ids)), ex=PUBLISH_TTL_S)
            p.zadd(reg, {replica: now})
        else:
            p.delete(rag.keys.warm(replica))
            p.zrem(reg, replica)
        p.zremrangebyscore(reg, "-inf", now - PUBLISH_TTL_S)
        p.execute()


def clear_warm(rag: RagPipeline, replica: str) -> None:
    publish_warm(rag, replica, [])


def published_warm(rag: RagPipeline, pack_ids: list[str]) -> dict[str, dict]:
    """Pack id -> {"state": "memory", "replica": ...} for the given packs that a live replica
    published as warm (several holders: the first replica id in sorted order)."""
    want = set(pack_ids)
    if not want:
        return {}
    replicas = sorted(rag.r.zrangebyscore(rag.keys.warm_replicas(), time.time() - PUBLISH_TTL_S, "+inf"))
    if not replicas:
        return {}
    out: dict[str, dict] = {}
    for replica, raw in zip(replicas, rag.r.mget([rag.keys.warm(r) for r in replicas])):
        for p in json.loads(raw) if raw else ():  # None: expired (a dead replica) or just emptied
            if p in want:
                out.setdefault(p, {"state": "memory", "replica": replica})
    return out


def pack_states(rag: RagPipeline, tenant: str, worker_states: dict[str, dict]) -> list[dict]:
    """The tenant's packs, oldest first, each a `serve.schemas_api.PackStatus` as a dict."""
    packs = rag.list_packs(tenant)
    stored = stored_packs(rag, [p.id for p in packs])
    elsewhere = [p.id for p in packs if p.id not in worker_states]
    published = {**published_warm(rag, elsewhere), **published_progress(rag, elsewhere)}
    out = []
    for p in packs:
        live = worker_states.get(p.id) or published.get(p.id, {})
        # a replica's own view wins; else what replicas published (prefilling over memory, as in
        # `PackWorker.cache_states`); else the shared store; else nothing
        state = live.get("state") or ("store" if p.id in stored else "cold")
        out.append({**live, "id": p.id, "state": state, "tokens": p.tokens, "capacity": p.capacity,
                    "stored": p.id in stored, "documents": list(dict.fromkeys(m.document_id for m in p.documents))})
    return out
