"""Prefill progress through the real app: the SSE stream of /v1/ask (and the OpenAI stream, as
SSE comments) reports a cold pack's prefill chunk by chunk before the first token; a warm pack
reports none; GET /v1/packs shows each pack's cache state. Real dsa-tiny engine, real Redis;
the engine's prefill chunk is made small so a ~900-token pack prefills in many steps.

    .venv/bin/python -m pytest -q tests/service/test_progress.py
"""

from __future__ import annotations

import asyncio
import time

import pytest

from fastapi.testclient import TestClient

from dsa_rag.model.engine.protocol import accepts_progress
from dsa_rag.rag_service.ask import worker as worker_mod
from dsa_rag.rag_service.ask.cachestate import clear_progress, pack_states, publish_progress
from dsa_rag.rag_service.ask.local import LocalBackend
from dsa_rag.rag_service.ask.progress import PrefillProgress
from dsa_rag.rag_service.ask.worker import PackWorker
from dsa_rag.rag_service.pipeline import RagPipeline
from dsa_rag.rag_service.serve.app import create_app
from dsa_rag.rag_service.client import parse_sse

TEXT = ("The harbour of Valdor ships grain and copper every spring. " * 14).encode()


@pytest.fixture
def chunked(engine, monkeypatch):
    """Prefill in 64-token chunks and look at progress often, so a small pack shows many steps."""
    monkeypatch.setattr(engine.engine, "prefill_chunk", 64)
    monkeypatch.setattr(worker_mod, "PROGRESS_POLL_S", 0.001)
    return engine


def _upload(client) -> dict:
    r = client.post("/v1/documents", files=[("files", ("valdor.txt", TEXT, "text/plain"))])
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["document"]


def test_progress_arithmetic():
    p = PrefillProgress("pack_1", total=1000, done=200)  # 200 tokens were cached already
    assert p.eta() is None and p.fraction == 0.2
    p.started -= 2.0  # two seconds in
    p.update(600, 1000)
    assert p.fraction == 0.6 and p.eta() == pytest.approx(2.0, rel=0.05)  # 400 left at 200 tokens/s
    ev = p.event("r0")
    assert ev["event"] == "progress" and ev["done_tokens"] == 600 and ev["percent"] == 60.0


def test_engine_reports_each_chunk_and_the_hook_stays_optional(chunked):
    seen = []
    handle = asyncio.run(chunked.prefill_prefix([i % 200 + 1 for i in range(300)], progress=lambda d, t: seen.append((d, t))))
    assert seen == [(n, 300) for n in range(0, 300, 64)] and len(handle.tokens) == 300
    asyncio.run(chunked.release(handle))

    class OldEngine:  # an engine written before the hook: still an EngineProtocol, called without it
        async def prefill_prefix(self, ids, prefix=None): ...

    assert accepts_progress(chunked) and not accepts_progress(OldEngine())


def test_cold_pack_streams_progress_then_tokens(client, chunked):
    doc = _upload(client)
    packs = client.get("/v1/packs").json()["data"]
    assert [(p["id"], p["state"]) for p in packs] == [(doc["packs"][0], "cold")]
    total = packs[0]["tokens"]

    r = client.post("/v1/ask", json={"question": "What does Valdor ship?", "max_tokens": 3, "stream": True})
    events = parse_sse(r.text)
    kinds = [e["type"] for e in events[:-1]]
    prog = [e for e in events[:-1] if e["type"] == "progress"]
    assert len(prog) >= 3, kinds  # ~900 tokens in 64-token chunks
    assert kinds.index("token") > kinds.index("progress")  # progress comes before the answer
    done = [e["done_tokens"] for e in prog]
    assert done == sorted(done) and done[-1] <= total and all(e["total_tokens"] == total for e in prog)
    assert prog[-1]["done_tokens"] > prog[0]["done_tokens"] and prog[-1]["eta_s"] is not None
    assert {e["pack_id"] for e in prog} == set(doc["packs"])

    # the pack is now warm in memory (and stored): no more progress
    state = client.get("/v1/packs").json()["data"][0]
    assert state["state"] == "memory" and state["stored"] is True
    again = parse_sse(client.post("/v1/ask", json={"question": "What does Valdor ship?", "max_tokens": 2,
                                                    "stream": True}).text)
    assert not [e for e in again[:-1] if e["type"] == "progress"]


def test_openai_stream_sends_progress_as_comments(client, chunked):
    _upload(client)
    r = client.post("/v1/chat/completions", json={"model": "dsa-tiny", "stream": True, "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "What does Valdor ship?"}]})
    assert r.status_code == 200
    comments = [line for line in r.text.splitlines() if line.startswith(": progress ")]
    assert len(comments) >= 3 and '"done_tokens"' in comments[0]
    # a standard parser sees only chunks: every data payload is a chat.completion.chunk or [DONE]
    payloads = parse_sse(r.text)
    assert payloads[-1] == "[DONE]" and all(p["object"] == "chat.completion.chunk" for p in payloads[:-1])


def test_warm_on_upload_setting_prefills_in_the_background(make_settings, engine):
    s = make_settings(warm_on_upload=True)
    rag = RagPipeline(s)
    backend = LocalBackend(s, rag=rag, worker=PackWorker(rag, engine))
    try:
        with TestClient(create_app(backend)) as c:
            _upload(c)
            states = []
            for _ in range(600):  # the background prefill runs on the app's loop: poll until it is warm
                states.append(c.get("/v1/packs").json()["data"][0]["state"])
                time.sleep(0.05)
                if states[-1] == "memory":
                    break
            assert states[-1] == "memory", states[-5:]
    finally:
        backend.worker.close()
        rag.close()


def test_progress_is_published_for_processes_without_the_worker(client, backend, chunked):
    """The Ray ingress has no worker: it reads the progress a replica wrote to Redis."""
    rag = backend.rag
    doc = _upload(client)
    pack = doc["packs"][0]
    prog = PrefillProgress(pack, total=900, done=300)
    publish_progress(rag, prog, "replica-7")
    (state,) = pack_states(rag, "default", {})  # no worker states: what the ingress sees
    assert state["state"] == "prefilling" and state["done_tokens"] == 300 and state["replica"] == "replica-7"
    assert 0 < rag.r.ttl(rag.keys.prefill(pack)) <= 30  # a dead replica's entry expires
    clear_progress(rag, pack)
    assert pack_states(rag, "default", {})[0]["state"] == "cold"
    # a real prefill removes its entry once the cache is stored: the ingress then sees "store"
    client.post("/v1/ask", json={"question": "What does Valdor ship?", "max_tokens": 2})
    assert not rag.r.exists(rag.keys.prefill(pack))
    assert pack_states(rag, "default", {})[0]["state"] == "store"
