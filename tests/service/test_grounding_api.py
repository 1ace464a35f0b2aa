"""Grounding through the HTTP API, the real app over the shipped dsa-tiny: `/v1/ask` and the OpenAI
routes return citations ranked by share and, for a question the documents do not answer,
"Not in the documents." with `abstained: true` (JSON and SSE, no value streamed); the LangChain
chat model and LLM put `abstained` / `support` in their metadata when fed those real responses.

    .venv/bin/python -m pytest -q tests/service/test_grounding_api.py
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from dsa_rag.rag_service import client as C
from dsa_rag.rag_service.ask.local import LocalBackend
from dsa_rag.rag_service.ask.support import ABSTAIN_TEXT
from dsa_rag.rag_service.ask.worker import PackWorker
from dsa_rag.rag_service.client import parse_sse
from dsa_rag.rag_service.langchain import DSARagChatModel, DSARagLLM
from dsa_rag.rag_service.pipeline import RagPipeline
from dsa_rag.rag_service.serve.app import create_app
from dsa_rag.rag_service.settings import RagSettings

REPORT = Path(__file__).resolve().parents[2] / "examples" / "report.pdf"
ANSWERABLE = "What is the access code of the Porto warehouse?"
UNANSWERABLE = "Who signed the Porto warehouse lease?"


@pytest.fixture
def client(make_settings, engine):
    """The app with abstention at its shipped threshold (the shared fixtures turn it off)."""
    s = make_settings(abstain_threshold=RagSettings().abstain_threshold)
    rag = RagPipeline(s)
    worker = PackWorker(rag, engine, citations=s.citations_per_pack, max_new_tokens=s.max_new_tokens)
    with TestClient(create_app(LocalBackend(s, rag=rag, worker=worker))) as c:
        r = c.post("/v1/documents", files=[("files", ("report.pdf", REPORT.read_bytes(), "application/pdf"))])
        assert r.status_code == 200, r.text
        yield c
    worker.close()
    rag.close()


def test_ask_cites_by_share_and_abstains(client):
    a = client.post("/v1/ask", json={"question": ANSWERABLE, "max_tokens": 16}).json()
    assert a["answer"] == "7351902" and a["abstained"] is False and a["support"] == 1.0
    assert a["citations"][0]["snippet"] == "The access code of the Porto warehouse is 7351902."
    assert a["citations"][0]["page"] == 2 and a["citations"][0]["share"] > 0.5
    assert a["packs"][0]["support"] == 1.0 and a["packs"][0]["abstained"] is False

    u = client.post("/v1/ask", json={"question": UNANSWERABLE, "max_tokens": 16}).json()
    assert u["answer"] == ABSTAIN_TEXT and u["abstained"] is True and u["citations"] == []
    assert "7351902" not in str(u)
    events = parse_sse(client.post("/v1/ask", json={"question": UNANSWERABLE, "max_tokens": 16,
                                                    "stream": True}).text)
    tokens = "".join(e["text"] for e in events[:-1] if e["type"] == "token")
    final = next(e for e in events[:-1] if e["type"] == "citations")
    assert tokens == ABSTAIN_TEXT and final["abstained"] is True and "7351902" not in str(events)
    # opting out gives the model's raw answer with its low support
    raw = client.post("/v1/ask", json={"question": UNANSWERABLE, "max_tokens": 16, "abstain": False}).json()
    assert raw["abstained"] is False and raw["answer"] != ABSTAIN_TEXT and raw["support"] < 0.75


def _install(monkeypatch, reply: httpx.Response):
    """Serve the LangChain client a response the real app produced."""
    t = httpx.MockTransport(lambda request: reply)
    monkeypatch.setattr(C.DSARagClient, "transport", t)
    monkeypatch.setattr(C.DSARagClient, "async_transport", t)


def test_openai_routes_and_langchain_metadata(client, monkeypatch):
    chat = {"model": "dsa-tiny", "max_tokens": 16, "messages": [{"role": "user", "content": UNANSWERABLE}]}
    r = client.post("/v1/chat/completions", json=chat)
    body = r.json()
    assert body["choices"][0]["message"]["content"] == ABSTAIN_TEXT and body["abstained"] is True
    _install(monkeypatch, httpx.Response(200, json=body))
    msg = DSARagChatModel(base_url="http://svc").invoke(UNANSWERABLE)
    assert msg.content == ABSTAIN_TEXT and msg.response_metadata["abstained"] is True
    assert msg.response_metadata["support"] == body["support"] < 0.75

    s = client.post("/v1/chat/completions", json={**chat, "stream": True})
    frames = [e for e in parse_sse(s.text) if e != "[DONE]"]
    assert frames[-1]["abstained"] is True and "7351902" not in s.text
    _install(monkeypatch, httpx.Response(200, content=s.content, headers={"content-type": "text/event-stream"}))
    chunks = list(DSARagChatModel(base_url="http://svc").stream(UNANSWERABLE))
    assert "".join(c.content for c in chunks) == ABSTAIN_TEXT and chunks[-1].response_metadata["abstained"] is True

    ok = client.post("/v1/completions", json={"model": "dsa-tiny", "max_tokens": 16, "prompt": ANSWERABLE}).json()
    assert ok["choices"][0]["text"] == "7351902" and ok["abstained"] is False and ok["support"] == 1.0
    _install(monkeypatch, httpx.Response(200, json=ok))
    info = DSARagLLM(base_url="http://svc").generate([ANSWERABLE]).generations[0][0].generation_info
    assert info["abstained"] is False and info["support"] == 1.0 and info["citations"][0]["share"] > 0.5
