"""The HTTP side of the web interface, without a browser: the page and its files are open routes
(no key needed, no data in them) while the data routes stay behind the key; /ui/config.json;
the text window around a citation (`GET /v1/documents/{id}/text`: clipped, with its pages,
tenant-checked); GET /v1/packs needs the key and sees only the key's tenant; the warm set a
replica publishes (what the Ray ingress reads): memory with the replica id, gone on eviction and
close, per tenant.

    .venv/bin/python -m pytest -q tests/service/test_ui_api.py
"""

from __future__ import annotations

import re
import time

import pytest
from fastapi.testclient import TestClient

from dsa_rag.rag_service.ask.cachestate import PUBLISH_TTL_S, pack_states
from dsa_rag.rag_service.ask.local import LocalBackend
from dsa_rag.rag_service.ask.worker import PackWorker
from dsa_rag.rag_service.docview import WINDOW_MAX
from dsa_rag.rag_service.pipeline import RagPipeline
from dsa_rag.rag_service.serve.app import create_app
from tests.rag_service.pdfs import make_pdf

KEYS = {"key-a-0001": "tenantA", "key-b-0001": "tenantB"}
A, B = ({"Authorization": f"Bearer {k}"} for k in KEYS)


@pytest.fixture
def app_client(make_settings, engine):
    s = make_settings(api_keys=KEYS)
    rag = RagPipeline(s)
    worker = PackWorker(rag, engine)
    with TestClient(create_app(LocalBackend(s, rag=rag, worker=worker))) as c:
        yield c
    worker.close()
    rag.close()


def test_page_and_files_are_open_data_is_not(app_client):
    c = app_client
    page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/ui/app.js"' in page.text
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = c.get(f"/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
    for body in (page.text, c.get("/ui/app.js").text, c.get("/ui/style.css").text):  # no CDN, nothing remote
        assert not re.search(r"""(src|href|url\()\s*=?\s*["']?(https?:)?//""", body)
    assert c.get("/ui/config.json").json() == {"auth": True, "model": "dsa-tiny", "max_upload_bytes": 64 << 20,
                                               "max_files": 64, "warm_on_upload": False}
    assert c.get("/ui/..%2Fsettings.py").status_code == 404 and c.get("/ui/nope.js").status_code == 404
    assert c.get("/v1/packs").status_code == 401 and c.get("/v1/documents").status_code == 401


def test_text_window_and_packs_per_tenant(app_client):
    c = app_client
    pages = ["First page text. " * 20, "Second page: the fact is here. " * 10]
    r = c.post("/v1/documents", files=[("files", ("r.pdf", make_pdf(pages), "application/pdf"))], headers=A)
    doc = r.json()["data"][0]["document"]
    whole = c.get(f"/v1/documents/{doc['id']}/text", headers=A).json()
    assert whole["chars"] == doc["chars"] and whole["start"] == 0 and [p["page"] for p in whole["pages"]] == [1, 2]
    p2 = whole["pages"][1]
    w = c.get(f"/v1/documents/{doc['id']}/text", params={"start": p2["char_start"] + 5, "end": 10**9}, headers=A).json()
    assert w["end"] == whole["chars"] and [p["page"] for p in w["pages"]] == [2]
    assert w["text"] == whole["text"][p2["char_start"] + 5:]
    assert c.get(f"/v1/documents/{doc['id']}/text", params={"start": -1}, headers=A).status_code == 422
    assert c.get(f"/v1/documents/{doc['id']}/text", headers=B).status_code in (403, 404)  # another tenant
    packs = c.get("/v1/packs", headers=A).json()["data"]
    assert [(p["state"], p["documents"]) for p in packs] == [("cold", [doc["id"]])]
    assert c.get("/v1/packs", headers=B).json()["data"] == []
    assert WINDOW_MAX >= 10_000  # a page or two around a span, never the whole of a big report


def _ingress_view(rag, tenant: str, want: str, timeout_s: float = 20.0) -> list[dict]:
    """pack_states as the Ray ingress computes it (no worker here: only what replicas published),
    polled until the tenant's (only) pack reaches `want` (the worker publishes from a task)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = pack_states(rag, tenant, {})
        if states[0]["state"] == want or time.monotonic() > deadline:
            return states
        time.sleep(0.05)


def test_published_warm_packs_per_tenant_eviction_and_close(make_settings, engine):
    s = make_settings(api_keys=KEYS)
    rag = RagPipeline(s)
    worker = PackWorker(rag, engine, replica_id="rep-1", warm_packs=1, publish_warm=True)
    key = rag.keys.warm("rep-1")
    try:
        with TestClient(create_app(LocalBackend(s, rag=rag, worker=worker))) as c:
            for h, name in ((A, "a.txt"), (B, "b.txt")):
                r = c.post("/v1/documents", files=[("files", (name, f"Notes of {name}. ".encode() * 30, "text/plain"))],
                           headers=h)
                assert r.status_code == 200, r.text
            (pa,), (pb,) = ([p["id"] for p in c.get("/v1/packs", headers=h).json()["data"]] for h in (A, B))
            assert not rag.r.exists(key)  # nothing warm yet: nothing published

            assert c.post("/v1/ask", json={"question": "Notes?", "max_tokens": 1}, headers=A).status_code == 200
            (a,) = _ingress_view(rag, "tenantA", "memory")
            assert (a["id"], a["state"], a["replica"], a["stored"]) == (pa, "memory", "rep-1", True)
            assert 0 < rag.r.ttl(key) <= PUBLISH_TTL_S  # a replica that dies stops showing when it expires
            (b,) = pack_states(rag, "tenantB", {})  # B sees its own pack only, cold
            assert (b["id"], b["state"], b.get("replica")) == (pb, "cold", None)
            assert [(p["id"], p["state"], p["replica"]) for p in c.get("/v1/packs", headers=A).json()["data"]] == [
                (pa, "memory", "rep-1")]  # the in-process view agrees

            # warm_packs=1: B's pack evicts A's from the replica; A's is left in the store
            assert c.post("/v1/ask", json={"question": "Notes?", "max_tokens": 1}, headers=B).status_code == 200
            (b,) = _ingress_view(rag, "tenantB", "memory")
            assert (b["id"], b["state"], b["replica"]) == (pb, "memory", "rep-1")
            (a,) = _ingress_view(rag, "tenantA", "store")
            assert (a["id"], a["state"], a.get("replica")) == (pa, "store", None)
    finally:
        worker.close()  # a closing replica removes its entry at once
    assert not rag.r.exists(key) and not rag.r.zscore(rag.keys.warm_replicas(), "rep-1")
    assert [(p["id"], p["state"]) for p in pack_states(rag, "tenantB", {})] == [(pb, "store")]
    rag.close()
