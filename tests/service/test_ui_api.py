"""The HTTP side of the web interface, without a browser: the page and its files are open routes
(no key needed, no data in them) while the data routes stay behind the key; /ui/config.json;
the text window around a citation (`GET /v1/documents/{id}/text`: clipped, with its pages,
tenant-checked); GET /v1/packs needs the key and sees only the key's tenant.

    .venv/bin/python -m pytest -q tests/service/test_ui_api.py
"""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

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
