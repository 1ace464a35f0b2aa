"""The REST API through the real FastAPI app, in-process backend (pipeline + dsa-tiny engine),
real Redis: documents, /v1/ask (JSON and SSE), the OpenAI routes via the `openai` client,
health, metrics, limits and error bodies. Answers of the untrained tiny model are not checked;
shapes, usage counters, cache hits and citations are.

    .venv/bin/python -m pytest -q tests/service/test_api.py
"""

from __future__ import annotations

import time

import pytest

from dsa_rag.rag_service.client import parse_sse
from tests.rag_service.pdfs import make_pdf

ROME = ("The treaty was signed in Rome in 1957. " * 12).encode()
PARIS = "# Paris\n\nThe capital of France is Paris. The Seine crosses it.\n" * 6


def upload(client, *files, field="files", tenant=None):
    headers = {"X-Tenant": tenant} if tenant else {}
    return client.post("/v1/documents", files=[(field, f) for f in files], headers=headers)


@pytest.fixture
def docs(client):
    pdf = make_pdf(["The treaty of Rome was signed in 1957.", "Page two talks about Paris."])
    r = upload(client, ("report.pdf", pdf, "application/pdf"), ("notes.md", PARIS.encode(), "text/markdown"))
    assert r.status_code == 200, r.text
    return r.json()["ids"]


def test_openapi_lists_every_route_with_limits(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/documents", "/v1/documents/{document_id}", "/v1/ask", "/v1/chat/completions",
                 "/v1/completions", "/v1/models", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    ask = spec["components"]["schemas"]["AskRequest"]["properties"]
    assert ask["question"]["maxLength"] == 8192 and ask["temperature"]["maximum"] == 2.0


def test_documents_crud(client, docs):
    assert len(docs) == 2
    listed = client.get("/v1/documents").json()
    assert listed["object"] == "list" and {d["id"] for d in listed["data"]} == set(docs)
    pdf = client.get(f"/v1/documents/{docs[0]}").json()
    assert pdf["name"] == "report.pdf" and pdf["pages"] == 2 and pdf["packs"]
    # tenants are isolated
    assert client.get("/v1/documents", headers={"X-Tenant": "other"}).json()["data"] == []
    assert client.get(f"/v1/documents/{docs[0]}", headers={"X-Tenant": "other"}).status_code == 404
    r = client.delete(f"/v1/documents/{docs[0]}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    r = client.get(f"/v1/documents/{docs[0]}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.delete(f"/v1/documents/{docs[0]}").status_code == 404


def test_upload_errors_name_the_file(client, make_settings):
    r = client.post("/v1/documents", data={"x": "1"})
    assert r.status_code == 400 and "no file" in r.json()["error"]["message"]
    enc = make_pdf(["secret"], password="pw")
    r = upload(client, ("locked.pdf", enc, "application/pdf"))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"]["code"] == "encrypted_document" and body["error"]["filename"] == "locked.pdf"
    # one bad file does not sink the batch; `file` works as the field name too
    r = upload(client, ("ok.txt", ROME, "text/plain"), ("bad.bin", b"\x00\x01\x02" * 50, "application/octet-stream"))
    assert r.status_code == 200
    res = r.json()["data"]
    assert [x["ok"] for x in res] == [True, False] and res[1]["error"] == "unsupported_document"
    assert upload(client, ("one.txt", b"single file field", "text/plain"), field="file").status_code == 200


def test_upload_size_limit(make_settings, engine):
    from fastapi.testclient import TestClient

    from dsa_rag.rag_service.serve.app import create_app
    from dsa_rag.rag_service.ask.local import LocalBackend

    s = make_settings(upload_max_bytes=100)
    with TestClient(create_app(LocalBackend(s, worker=object()))) as c:  # no model needed here
        r = upload(c, ("big.txt", b"x" * 101, "text/plain"))
        assert r.status_code == 413 and r.json()["data"][0]["error"] == "document_too_large"


def test_ask_reuses_the_prefix_cache_and_cites(client, docs):
    q = {"question": "When was the treaty of Rome signed?", "max_tokens": 3}
    first = client.post("/v1/ask", json=q)
    assert first.status_code == 200, first.text
    a = first.json()
    assert set(a) >= {"answer", "citations", "usage", "timings", "packs"}
    u = a["usage"]
    assert u["cached_tokens"] == 0 and u["prompt_tokens"] > 0 and 1 <= u["completion_tokens"] <= 3
    assert all(p["cache"] == "prefill" for p in a["packs"])
    second = client.post("/v1/ask", json=q).json()
    u2 = second["usage"]
    assert all(p["cache"] == "memory" for p in second["packs"])
    pack_prefix = u2["prompt_tokens"] - len("When was the treaty of Rome signed?") - 2  # <question> ... <answer>
    assert u2["cached_tokens"] == pack_prefix > 0
    assert a["citations"], "attention trace gave no citation"
    for c in a["citations"]:
        assert c["document_id"] in docs and 0 <= c["char_start"] < c["char_end"] and c["snippet"]
        if c["name"] == "report.pdf":
            assert c["page"] in (1, 2)
    assert a["timings"]["total_s"] >= a["timings"]["first_token_s"] >= 0
    m = client.get("/metrics").text
    hits = _metric(m, "vllm:prefix_cache_hits_total")
    assert hits == u2["cached_tokens"] and _metric(m, "vllm:prefix_cache_queries_total") == u["prompt_tokens"] * 2
    assert "vllm:time_to_first_token_seconds_count" in m and 'dsa_rag_pack_prefix_lookups_total{source="memory"}' in m


def test_ask_stream_tokens_then_citations_then_done(client, docs):
    r = client.post("/v1/ask", json={"question": "What crosses Paris?", "max_tokens": 4, "stream": True,
                                     "document_ids": [docs[1]]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    kinds = [e["type"] for e in events[:-1]]
    # progress: the cold pack's prefill, when it outlasts a poll (tests/service/test_progress.py)
    assert kinds[-1] == "citations" and set(kinds[:-1]) <= {"token", "progress"} and kinds.count("citations") == 1
    final = events[-2]
    assert final["usage"]["completion_tokens"] >= 1 and all(c["document_id"] == docs[1] for c in final["citations"])
    assert "".join(e["text"] for e in events[:-1] if e["type"] == "token") == final["packs"][0]["answer"]


def test_ask_validation_and_not_found(client):
    assert client.post("/v1/ask", json={"question": "x"}).json()["error"]["code"] == "no_documents"
    for bad in ({"question": ""}, {"question": "x", "max_tokens": 0}, {"question": "x", "temperature": 3},
                {"question": "x" * 9000}, {"question": "x", "bogus": 1}):
        r = client.post("/v1/ask", json=bad)
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", bad
    upload(client, ("a.txt", ROME, "text/plain"))
    r = client.post("/v1/ask", json={"question": "x", "document_ids": ["doc_missing"], "stream": True})
    assert r.status_code == 404


def test_fanout_over_several_packs(make_settings, engine):
    """Two documents too big to share a pack: the question fans out, usage is summed."""
    from fastapi.testclient import TestClient

    from dsa_rag.rag_service.ask.worker import PackWorker
    from dsa_rag.rag_service.pipeline import RagPipeline
    from dsa_rag.rag_service.serve.app import create_app
    from dsa_rag.rag_service.ask.local import LocalBackend

    s = make_settings(max_context=512, pack_overlap=32)
    with RagPipeline(s) as rag:
        b = LocalBackend(s, rag=rag, worker=PackWorker(rag, engine))
        with TestClient(create_app(b)) as c:
            ids = upload(c, ("rome.txt", ROME[:380], "text/plain"), ("paris.md", PARIS[:380].encode(), "text/markdown")).json()["ids"]
            a = c.post("/v1/ask", json={"question": "Rome or Paris?", "max_tokens": 2}).json()
            assert len(a["packs"]) == 2 and a["pack_id"] in {p["pack_id"] for p in a["packs"]}
            assert a["usage"]["prompt_tokens"] == sum(rag.get_pack(p["pack_id"]).tokens for p in a["packs"]) + 2 * (len("Rome or Paris?") + 2)
            assert {c["document_id"] for c in a["citations"]} <= set(ids)
            best = max(a["packs"], key=lambda p: p["score"])
            assert a["answer"] == best["answer"]


def test_openai_client_works_unchanged(client, docs):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    assert [m.id for m in oc.models.list().data] == ["dsa-tiny"]
    r = oc.chat.completions.create(model="dsa-tiny", messages=[{"role": "system", "content": "be brief"},
                                                               {"role": "user", "content": "Where was the treaty signed?"}],
                                   max_tokens=3)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.usage.completion_tokens >= 1
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # first question: prefill
    chunks = list(oc.chat.completions.create(model="dsa-tiny", messages=[{"role": "user", "content": "Where?"}],
                                             max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # second question over the same packs
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    c = oc.completions.create(model="dsa-tiny", prompt="Where was the treaty signed?", max_tokens=2)
    assert c.object == "text_completion" and c.usage.prompt_tokens_details.cached_tokens > 0
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oc.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_health_ready_metrics(client):
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"redis": "ok", "model": "ok"}
    m = client.get("/metrics")
    assert m.headers["content-type"].startswith("text/plain")
    for name in ("vllm:time_to_first_token_seconds", "dsa_rag_generation_tokens_per_second",
                 "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "dsa_rag_queue_depth",
                 "dsa_rag_model_replicas 1.0"):
        assert name in m.text, name


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


def test_answer_in_python_and_restore_on_another_replica(backend, engine):
    """The pipeline path without HTTP; a second worker (another replica) restores the pack from
    the KV store instead of prefilling it."""
    from dsa_rag.rag_service.ask.fanout import ask_sync
    from dsa_rag.rag_service.ask.local import LocalBackend
    from dsa_rag.rag_service.ask.params import AskParams
    from dsa_rag.rag_service.ask.worker import PackWorker

    rag = backend.rag
    rag.ingest("rome.txt", ROME)
    q = AskParams.of("Where was it signed?", max_tokens=2)
    a = ask_sync(backend, q)
    assert [p["cache"] for p in a["packs"]] == ["prefill"] and a["usage"]["cached_tokens"] == 0
    other = PackWorker(rag, engine, replica_id="other")
    try:
        b = ask_sync(LocalBackend(backend.settings, rag=rag, worker=other), q)
    finally:
        other.close()
    assert [p["cache"] for p in b["packs"]] == ["store"] and b["usage"]["cached_tokens"] > 0
    assert b["answer"] == a["answer"]  # greedy: the restored prefix gives the same tokens
    assert rag.kv.stats()["hits"] == 1


def test_a_growing_open_pack_extends_its_warm_prefix(client):
    """Documents are appended to an open pack under the same id: the next question must see the
    new document, and only the appended tokens are prefilled."""
    upload(client, ("rome.txt", ROME[:200], "text/plain"))
    a = client.post("/v1/ask", json={"question": "Where?", "max_tokens": 1}).json()
    (pa,) = a["packs"]
    ids = upload(client, ("paris.md", PARIS[:200].encode(), "text/markdown")).json()["ids"]
    b = client.post("/v1/ask", json={"question": "Where?", "max_tokens": 1}).json()
    (pb,) = b["packs"]
    assert pb["pack_id"] == pa["pack_id"], "the second document should join the open pack"
    assert b["usage"]["prompt_tokens"] > a["usage"]["prompt_tokens"]  # the new document is in the prompt
    assert pb["cache"] == "prefill" and b["usage"]["cached_tokens"] == a["usage"]["prompt_tokens"] - len("Where?") - 2
    c = client.post("/v1/ask", json={"question": "Where?", "max_tokens": 1, "document_ids": ids}).json()
    assert c["packs"][0]["cache"] == "memory"


def test_upload_with_background_prefill(client):
    r = client.post("/v1/documents?prefill=true", files=[("files", ("rome.txt", ROME, "text/plain"))])
    assert r.status_code == 200
    pack = r.json()["data"][0]["document"]["packs"][0]
    backend = client.app.state.backend
    for _ in range(200):  # the prefill runs after the response
        if pack in backend.worker.warm_pack_ids():
            break
        time.sleep(0.05)
    a = client.post("/v1/ask", json={"question": "Where?", "max_tokens": 1}).json()
    assert a["packs"][0]["cache"] == "memory" and a["usage"]["cached_tokens"] > 0


@pytest.mark.gpu
def test_ask_on_gpu(make_settings):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from fastapi.testclient import TestClient

    from dsa_rag.model.engine.factory import load_engine
    from dsa_rag.rag_service.ask.worker import PackWorker
    from dsa_rag.rag_service.pipeline import RagPipeline
    from dsa_rag.rag_service.serve.app import create_app
    from dsa_rag.rag_service.ask.local import LocalBackend

    s = make_settings()
    with RagPipeline(s) as rag:
        worker = PackWorker(rag, load_engine("dsa-tiny", device="cuda", tokenizer=rag.tok))
        with TestClient(create_app(LocalBackend(s, rag=rag, worker=worker))) as c:
            upload(c, ("rome.txt", ROME, "text/plain"))
            a = c.post("/v1/ask", json={"question": "Where?", "max_tokens": 4}).json()
            b = c.post("/v1/ask", json={"question": "Where?", "max_tokens": 4}).json()
            assert a["packs"][0]["cache"] == "prefill" and b["packs"][0]["cache"] == "memory"
            assert a["answer"] == b["answer"] and a["citations"]
        worker.close()


def test_an_evicted_warm_prefix_lives_until_its_question_forked_it(backend, engine):
    """Regression (load test): with the warm LRU full, a concurrent question's eviction released
    a prefix handle between another question's lookup and its fork ("the prefix handle was
    released"). Handles handed out are pinned; eviction only retires them."""
    import asyncio

    from dsa_rag.rag_service.ask.worker import PackWorker

    rag = backend.rag
    pa = rag.ingest("rome.txt", ROME, tenant="t1").packs[0]  # packs never mix tenants: two packs
    pb = rag.ingest("paris.md", PARIS.encode(), tenant="t2").packs[0]
    worker = PackWorker(rag, engine, replica_id="pins", warm_packs=1)

    async def run():
        ha, *_ = await worker.prefix(pa)  # handed to a question, not forked yet
        hb, *_ = await worker.prefix(pb)  # evicts pack a from the one-slot warm LRU
        assert not ha.seq.freed  # retired, not released: the question can still fork it
        await worker.unpin(ha)
        assert ha.seq.freed  # the last unpin releases it
        await worker.unpin(hb)
        assert not hb.seq.freed  # still warm

    try:
        asyncio.run(run())
    finally:
        worker.close()
