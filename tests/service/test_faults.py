"""Faults through the real app (in-process backend, real Redis, dsa-tiny engine): a model
replica failing mid-stream, a prefix-KV file that vanished, the disk full. Each test also
checks that the acknowledged documents are all still there afterwards (counts printed with -s).
Redis killed mid-ingest: tests/rag_service/test_faults.py.

    .venv/bin/python -m pytest -q -s tests/service/test_faults.py
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from dsa_rag.rag_service.client import parse_sse

ROME = ("The treaty was signed in Rome in 1957. " * 12).encode()
PARIS = ("The capital of France is Paris. The Seine crosses it. " * 8).encode()


def _docs(client) -> set[str]:
    return {d["id"] for d in client.get("/v1/documents").json()["data"]}


def _fail_step(monkeypatch, engine, fail_on: set[int]):
    """Make the engine's step (the decode loop) raise on the given call numbers (1-based), as a
    replica process dying under its requests would; other calls run normally. `engine` is the
    test's AsyncEngine; `engine.engine` the concrete Engine that steps."""
    engine = engine.engine
    real = engine.step
    calls = {"n": 0}

    def step():
        calls["n"] += 1
        if calls["n"] in fail_on:
            raise RuntimeError("model replica died (injected)")
        return real()

    monkeypatch.setattr(engine, "step", step)
    return calls


def test_replica_dies_mid_stream_error_event_then_recovers(client, engine, monkeypatch):
    ids = client.post("/v1/documents", files=[("files", ("rome.txt", ROME, "text/plain"))]).json()["ids"]
    q = {"question": "Where was it signed?", "max_tokens": 8}
    assert client.post("/v1/ask", json=q).status_code == 200  # pack warm in memory: no prefill steps below
    before = _docs(client)
    _fail_step(monkeypatch, engine, {3})
    r = client.post("/v1/ask", json={**q, "stream": True})
    assert r.status_code == 200
    events = parse_sse(r.text)
    kinds = [e["type"] for e in events[:-1]]
    assert events[-1] == "[DONE]" and kinds[-1] == "error" and "token" in kinds, kinds
    assert "replica died" in events[-2]["error"]["message"]
    # the service recovers: the next questions (JSON and stream) succeed on the same engine
    ok = client.post("/v1/ask", json=q)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    again = parse_sse(client.post("/v1/ask", json={**q, "stream": True}).text)
    assert again[-1] == "[DONE]" and again[-2]["type"] == "citations"
    after = _docs(client)
    print(f"\nreplica dies mid-stream: acknowledged documents before={len(before)} after={len(after)}")
    assert after == before == set(ids)


def test_replica_dies_before_first_token_is_retried_transparently(client, engine, monkeypatch):
    client.post("/v1/documents", files=[("files", ("rome.txt", ROME, "text/plain"))])
    q = {"question": "Where was it signed?", "max_tokens": 4}
    base = client.post("/v1/ask", json=q).json()
    calls = _fail_step(monkeypatch, engine, {1})
    r = client.post("/v1/ask", json={**q, "stream": True})
    events = parse_sse(r.text)
    assert calls["n"] > 1 and events[-1] == "[DONE]" and events[-2]["type"] == "citations", events
    assert events[-2]["answer"] == base["answer"]  # greedy: the retry gives the same answer
    calls["n"] = 0
    assert client.post("/v1/ask", json=q).json()["answer"] == base["answer"]  # JSON route retries too


def test_vanished_kv_blob_re_prefills_without_error(backend, client, engine):
    from dsa_rag.rag_service.ask.worker import PackWorker

    client.post("/v1/documents", files=[("files", ("rome.txt", ROME, "text/plain"))])
    q = {"question": "Where was it signed?", "max_tokens": 3}
    first = client.post("/v1/ask", json=q).json()
    kv = backend.rag.kv
    assert kv.stats()["stores"] == 1
    files = list(Path(backend.settings.kv_dir).rglob("*.safetensors"))
    assert len(files) == 1
    files[0].unlink()  # the blob vanished; its Redis metadata is still there
    before = kv.stats()
    backend.worker = PackWorker(backend.rag, engine, replica_id="cold")  # a replica without it in memory
    try:
        r = client.post("/v1/ask", json=q)
        assert r.status_code == 200, r.text
        a = r.json()
        assert a["packs"][0]["cache"] == "prefill" and a["answer"] == first["answer"]
        after = kv.stats()
        assert after["misses"] == before["misses"] + 1 and after["stale"] == before["stale"] + 1
        assert after["stores"] == before["stores"] + 1  # the re-prefilled cache is stored again
    finally:
        backend.worker.close()


def test_disk_full_is_507_and_leaves_nothing_behind(client, backend, monkeypatch):
    from dsa_rag.rag_service.stores import blobstore

    ok = client.post("/v1/documents", files=[("files", ("rome.txt", ROME, "text/plain"))])
    before = _docs(client)
    blob_dir = Path(backend.settings.blob_dir)
    files_before = sorted(p.relative_to(blob_dir) for p in blob_dir.rglob("*") if p.is_file())
    keys_before = set(backend.rag.r.keys(backend.settings.redis_prefix + ":*"))
    real = blobstore.write_file
    writes = {"n": 0}

    def full_after_first(tmp, data):  # the first blob fits, then the disk is full mid-write
        writes["n"] += 1
        if writes["n"] == 1:
            return real(tmp, data)
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blobstore, "write_file", full_after_first)
    crlf = PARIS.replace(b". ", b".\r\n")  # text != raw bytes: two blobs, the 2nd write fails
    r = client.post("/v1/documents", files=[("files", ("paris.txt", crlf, "text/plain")),
                                            ("files", ("more.txt", PARIS + b" More.", "text/plain"))])
    assert r.status_code == 507, r.text
    body = r.json()
    assert body["error"]["code"] == "insufficient_storage" and "free disk space" in body["error"]["message"]
    assert [x["status_code"] for x in body["data"]] == [507, 507]
    files_after = sorted(p.relative_to(blob_dir) for p in blob_dir.rglob("*") if p.is_file())
    assert writes["n"] == 3 and files_after == files_before  # no temp file, no half blob, no orphan
    assert set(backend.rag.r.keys(backend.settings.redis_prefix + ":*")) == keys_before  # no metadata
    after = _docs(client)
    print(f"\ndisk full: acknowledged documents before={len(before)} after={len(after)}")
    assert after == before and len(before) == 1 and ok.status_code == 200
    monkeypatch.undo()  # space freed: the same upload now succeeds
    assert client.post("/v1/documents", files=[("files", ("paris.txt", PARIS, "text/plain"))]).status_code == 200


def test_disk_full_for_the_kv_cache_still_answers(client, backend, monkeypatch):
    from dsa_rag.rag_service.stores import blobstore, kvstore

    def no_space(path, write):
        def fail(tmp):
            raise OSError(errno.ENOSPC, "No space left on device")
        return blobstore.atomic_write(path, fail)

    monkeypatch.setattr(kvstore, "atomic_write", no_space)
    client.post("/v1/documents", files=[("files", ("rome.txt", ROME, "text/plain"))])
    r = client.post("/v1/ask", json={"question": "Where?", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["packs"][0]["cache"] == "prefill"
    assert backend.rag.kv.stats()["stores"] == 0
    assert not [p for p in Path(backend.settings.kv_dir).rglob("*") if p.is_file()]


@pytest.mark.parametrize("down", ["list", "ask"])
def test_redis_down_is_503_not_500(client, backend, monkeypatch, down):
    import redis

    client.post("/v1/documents", files=[("files", ("rome.txt", ROME, "text/plain"))])

    def broken(*a, **k):
        raise redis.ConnectionError("Connection refused (injected)")

    monkeypatch.setattr(backend.rag.r, "zrange", broken)
    monkeypatch.setattr(backend.rag.r, "get", broken)
    r = client.get("/v1/documents") if down == "list" else client.post("/v1/ask", json={"question": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "storage_error" and r.headers["retry-after"]
