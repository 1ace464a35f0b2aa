"""`dsa-rag serve --no-ray` as a user starts it: a subprocess that prints its URL and answers
on it; the parser knows every command; the client commands (ingest, ask, status) print what they
print and exit as they exit against a scripted server (`httpx.MockTransport` under the service
client, rag_service/client.py). (Ray-mode serve and the client commands against the two-node
service: test_ray.py.)

    .venv/bin/python -m pytest -q tests/service/test_cli.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from dsa_rag.rag_service import client as C
from dsa_rag.rag_service.cli import build_parser, main


def test_parser_has_every_command():
    p = build_parser()
    for argv in (["serve", "--config", "deploy/serve.yaml"], ["serve", "--no-ray", "--port", "0"],
                 ["ingest", "a.pdf", "docs/"], ["ask", "why?", "--max-tokens", "5"], ["status"]):
        assert p.parse_args(argv).command == argv[0]


def test_serve_no_ray_prints_its_url_and_serves(tmp_path, redis_url):
    env = dict(os.environ, DSA_RAG_REDIS_URL=redis_url, DSA_RAG_REDIS_PREFIX="cli" + str(os.getpid()),
               DSA_RAG_TORCH_THREADS="1", DSA_RAG_MAX_CONTEXT="2048", DSA_RAG_PACK_RESERVE_TOKENS="64",
               DSA_RAG_PACK_OVERLAP="64")
    proc = subprocess.Popen([sys.executable, "-m", "dsa_rag.rag_service.cli", "serve", "--no-ray", "--port", "0",
                             "--data-dir", str(tmp_path / "data")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline, seen = None, time.time() + 120, []
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"serve exited: {''.join(seen)}")
            seen.append(line)
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert url, "".join(seen)
        assert httpx.get(f"{url}/readyz", timeout=30).json()["status"] == "ok"
        r = httpx.post(f"{url}/v1/documents", files=[("files", ("a.md", b"# A\n\nalpha beta gamma " * 20))], timeout=60)
        assert r.status_code == 200
        a = httpx.post(f"{url}/v1/ask", json={"question": "alpha?", "max_tokens": 2}, timeout=60).json()
        assert a["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


CITATIONS = {"type": "citations", "answer": "Tue", "usage": {"prompt_tokens": 30, "cached_tokens": 20,
                                                             "completion_tokens": 2},
             "timings": {"total_s": 0.5},
             "citations": [{"name": "n.md", "page": 2, "char_start": 1, "char_end": 9, "snippet": "The meeting\nis on"},
                           {"name": "m.md", "page": None, "char_start": 0, "char_end": 3, "snippet": "x"}]}
CITED = "[1] n.md p.2 chars 1-9: The meeting is on\n[2] m.md chars 0-3: x\n"
USAGE = "(prompt 30 tokens, 20 cached, 2 generated, 0.50s)"


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


@pytest.fixture
def serve(monkeypatch):
    """Script the service: serve(path=(status, body), ...) -> the requests it got."""
    monkeypatch.setattr(C, "_sleep", lambda s: None)

    def install(**routes):
        seen: list[httpx.Request] = []

        def handler(req: httpx.Request) -> httpx.Response:
            seen.append(req)
            status, body = routes[f"{req.method} {req.url.path}"]
            if isinstance(body, Exception):
                raise body
            if isinstance(body, bytes):
                return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})
            return httpx.Response(status, json=body) if isinstance(body, (dict, list)) else httpx.Response(status, text=body)

        monkeypatch.setattr(C.DSARagClient, "transport", httpx.MockTransport(handler))
        return seen
    return install


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([*argv, "--url", "http://rag.test"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_ingest_prints_each_document_and_fails_on_any_error(serve, capsys, tmp_path):
    (tmp_path / "a.md").write_text("# A")
    ok = {"ids": ["doc_1"], "data": [{"ok": True, "document": {"id": "doc_1", "pages": 2, "tokens": 40}}]}
    seen = serve(**{"POST /v1/documents": (200, ok)})
    rc, out, err = run(capsys, "ingest", str(tmp_path / "a.md"), str(tmp_path / "none.md"), "--api-key", "sk-1",
                       "--tenant", "acme")
    assert rc == 0 and out == f"doc_1  {tmp_path / 'a.md'}  (2 pages, 40 tokens)\n"
    assert f"skipping {tmp_path / 'none.md'}: no such file" in err
    assert seen[0].headers["authorization"] == "Bearer sk-1" and seen[0].headers["x-tenant"] == "acme"
    assert b'filename="a.md"' in seen[0].content
    serve(**{"POST /v1/documents": (415, {"error": {"message": "unsupported type", "code": "unsupported"}})})
    assert run(capsys, "ingest", str(tmp_path / "a.md"))[:2] == (1, f"FAILED {tmp_path / 'a.md'}: unsupported type\n")
    serve(**{"POST /v1/documents": (200, {"ids": [], "data": [{"ok": False, "message": "too big"}]})})
    assert run(capsys, "ingest", str(tmp_path / "a.md"))[:2] == (1, f"FAILED {tmp_path / 'a.md'}: too big\n")
    assert run(capsys, "ingest", str(tmp_path / "none.md"))[0] == 1  # nothing to upload


def test_ask_streams_tokens_then_citations(serve, capsys):
    seen = serve(**{"POST /v1/ask": (200, sse({"type": "token", "text": "Tu"}, {"type": "token", "text": "e"},
                                              CITATIONS, b"[DONE]"))})
    assert run(capsys, "ask", "When?", "--document-id", "doc_1", "--max-tokens", "5") == (0, "Tue\n" + CITED, USAGE + "\n")
    assert json.loads(seen[0].content) == {"question": "When?", "temperature": 0.0, "max_tokens": 5,
                                           "document_ids": ["doc_1"], "stream": True}


def test_ask_no_stream(serve, capsys):
    seen = serve(**{"POST /v1/ask": (200, {k: v for k, v in CITATIONS.items() if k != "type"})})
    assert run(capsys, "ask", "When?", "--no-stream") == (0, "Tue\n" + CITED, USAGE + "\n")
    assert json.loads(seen[0].content) == {"question": "When?", "temperature": 0.0, "stream": False}


@pytest.mark.parametrize("stream", [True, False])
def test_ask_http_errors_are_one_line(serve, capsys, stream):
    extra = () if stream else ("--no-stream",)
    serve(**{"POST /v1/ask": (404, {"error": {"message": "no documents to answer from", "code": "no_documents"}})})
    assert run(capsys, "ask", "When?", *extra) == (1, "", "error 404: no documents to answer from\n")
    serve(**{"POST /v1/ask": (422, "bad thing")})
    assert run(capsys, "ask", "When?", *extra) == (1, "", "error 422: bad thing\n")


def test_ask_error_event_and_broken_stream_exit_1(serve, capsys):
    serve(**{"POST /v1/ask": (200, sse({"type": "token", "text": "Tu"},
                                       {"type": "error", "error": {"message": "replica died", "code": "internal_error"}},
                                       b"[DONE]"))})
    assert run(capsys, "ask", "When?") == (1, "Tu", "\nerror: replica died\n")
    serve(**{"POST /v1/ask": (200, sse({"type": "token", "text": "Tu"}))})  # cut before [DONE]
    rc, out, err = run(capsys, "ask", "When?")
    assert rc == 1 and out == "Tu" and "without `data: [DONE]`" in err


def test_status_ready_and_not_ready(serve, capsys):
    common = {"GET /v1/models": (200, {"data": [{"id": "dsa-tiny"}]}),
              "GET /v1/documents": (200, {"data": [{"tokens": 40}, {"tokens": 2}]}),
              "GET /metrics": (200, "# x\ndsa_rag_model_replicas 2.0\nother 1\nvllm:prefix_cache_hits_total 5.0\n")}
    body = "model: dsa-tiny   documents: 2   tokens: 42\n  dsa_rag_model_replicas 2.0\n  vllm:prefix_cache_hits_total 5.0\n"
    serve(**common, **{"GET /readyz": (200, {"status": "ok", "checks": {"redis": "ok", "model": "ok"}})})
    assert run(capsys, "status") == (0, "http://rag.test: ok  redis=ok, model=ok\n" + body, "")
    seen = serve(**common, **{"GET /readyz": (503, {"status": "unavailable", "checks": {"redis": "down"}})})
    assert run(capsys, "status") == (1, "http://rag.test: unavailable  redis=down\n" + body, "")
    assert [r.url.path for r in seen].count("/readyz") == 1  # a 503 probe is an answer, not retried


def test_unreachable_service(serve, capsys):
    serve(**{"GET /readyz": (0, httpx.ConnectError("refused")), "POST /v1/ask": (0, httpx.ConnectError("refused"))})
    assert run(capsys, "status") == (1, "", "http://rag.test: not reachable (refused)\n")
    rc, out, err = run(capsys, "ask", "When?")
    assert rc == 1 and err.startswith("cannot reach http://rag.test: refused")
