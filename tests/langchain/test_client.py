"""The service client (rag_service/client.py) under the LangChain classes, without a server
(`httpx.MockTransport`): headers (API key, tenant), request bodies (document filter, stop, stream
options), retries with backoff on connection errors / 429 / 5xx and never on 4xx, `Retry-After`,
SSE parsing (framing, chunk boundaries, Unicode line separators inside a payload), in-stream
errors and streams cut before `data: [DONE]`.

    .venv/bin/python -m pytest -q tests/langchain/test_client.py
"""

from __future__ import annotations

import json

import httpx
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from dsa_rag.rag_service import client as C
from dsa_rag.rag_service.langchain import DSARagAPIError, DSARagChatModel, DSARagLLM, DSARagRetriever

CHAT_OK = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "dsa-tiny",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "Rome"}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42,
                     "prompt_tokens_details": {"cached_tokens": 30}},
           "citations": [{"document_id": "doc_1", "name": "a.pdf", "page": 2, "char_start": 5, "char_end": 20,
                          "snippet": "signed in Rome"}]}


def sse(*events) -> bytes:
    out = b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)
    return out


def chunk(content=None, finish=None, **extra) -> dict:
    delta = {} if content is None else {"content": content}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "dsa-tiny",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


class Server:
    """A scripted server: each request pops the next (status, body, headers) reply."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        status, body, headers = (reply + ({},))[:3] if isinstance(reply, tuple) else (200, reply, {})
        if isinstance(body, (dict, list)):
            return httpx.Response(status, json=body, headers=headers)
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream", **headers})

    def json(self, i: int = -1) -> dict:
        return json.loads(self.requests[i].content)


@pytest.fixture
def server(monkeypatch):
    def install(*replies) -> Server:
        srv = Server(*replies)
        monkeypatch.setattr(C.DSARagClient, "transport", httpx.MockTransport(srv))
        monkeypatch.setattr(C.DSARagClient, "async_transport", httpx.MockTransport(srv))
        return srv

    sleeps: list[float] = []
    monkeypatch.setattr(C, "_sleep", sleeps.append)

    async def no_wait(s):
        sleeps.append(s)

    monkeypatch.setattr(C, "_asleep", no_wait)
    install.sleeps = sleeps
    return install


def model(**kw) -> DSARagChatModel:
    return DSARagChatModel(base_url="http://rag.test", **kw)


def test_request_headers_and_body(server):
    srv = server(CHAT_OK)
    m = model(api_key="sk-test", tenant="acme", document_ids=["doc_1"], stop=["\n\n"], max_tokens=7,
              temperature=0.0, default_headers={"X-Trace": "t1"})
    msg = m.invoke([SystemMessage("be brief"), HumanMessage("hi", name="ann"), AIMessage("hello"),
                    HumanMessage([{"type": "text", "text": "Where was it "}, {"type": "text", "text": "signed?"}])])
    req = srv.requests[0]
    assert req.url == "http://rag.test/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-test" and req.headers["x-tenant"] == "acme"
    assert req.headers["x-trace"] == "t1"
    body = srv.json()
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "name": "ann"},
                                {"role": "assistant", "content": "hello"},
                                {"role": "user", "content": "Where was it signed?"}]
    assert body["document_ids"] == ["doc_1"] and body["stop"] == ["\n\n"] and body["max_tokens"] == 7
    assert body["stream"] is False and body["model"] == "dsa-tiny" and body["temperature"] == 0.0
    assert msg.content == "Rome" and msg.response_metadata["model_name"] == "dsa-tiny"
    assert msg.response_metadata["citations"][0]["page"] == 2
    assert msg.usage_metadata == {"input_tokens": 40, "output_tokens": 2, "total_tokens": 42,
                                  "input_token_details": {"cache_read": 30}}


def test_call_kwargs_override_options(server):
    srv = server(CHAT_OK)
    model(document_ids=["doc_1"], stop=["x"]).invoke("q", stop=["y"], document_ids=["doc_2"], max_tokens=3)
    body = srv.json()
    assert body["document_ids"] == ["doc_2"] and body["stop"] == ["y"] and body["max_tokens"] == 3


def test_no_key_no_authorization_header(server, monkeypatch):
    monkeypatch.delenv("DSA_RAG_API_KEY", raising=False)
    srv = server(CHAT_OK)
    model().invoke("q")
    assert "authorization" not in srv.requests[0].headers


def test_non_text_content_is_refused():
    with pytest.raises(ValueError, match="text only"):
        model()._body([HumanMessage([{"type": "image", "url": "http://x/y.png"}])], None, False)


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_retries_5xx_and_429_then_succeeds(server, status):
    srv = server((status, {"error": {"message": "busy", "code": "busy"}}), (status, "oops"), CHAT_OK)
    assert model(max_retries=2, retry_backoff_s=0.25).invoke("q").content == "Rome"
    assert len(srv.requests) == 3
    assert len(server.sleeps) == 2 and 0.125 <= server.sleeps[0] <= 0.375 and server.sleeps[1] > server.sleeps[0] / 3


def test_retry_after_is_honoured(server):
    server((429, {"error": {"message": "slow down", "code": "rate_limited"}}, {"Retry-After": "3"}), CHAT_OK)
    model().invoke("q")
    assert server.sleeps == [3.0]


def test_retries_give_up_with_the_last_error(server):
    srv = server(*[(503, {"error": {"message": "no replica", "code": "service_unavailable"}})] * 3)
    with pytest.raises(DSARagAPIError) as e:
        model(max_retries=2).invoke("q")
    assert e.value.status_code == 503 and e.value.code == "service_unavailable" and "no replica" in str(e.value)
    assert len(srv.requests) == 3


@pytest.mark.parametrize("status,code", [(400, "bad_request"), (404, "model_not_found"), (422, "validation_error")])
def test_4xx_is_never_retried(server, status, code):
    srv = server((status, {"error": {"message": "nope", "type": "invalid_request_error", "code": code}}), CHAT_OK)
    with pytest.raises(DSARagAPIError) as e:
        model(max_retries=5).invoke("q")
    assert e.value.status_code == status and e.value.code == code and len(srv.requests) == 1
    assert server.sleeps == []


def test_connect_errors_are_retried(server):
    srv = server(httpx.ConnectError("refused"), httpx.ConnectError("refused"), CHAT_OK)
    assert model(max_retries=2).invoke("q").content == "Rome" and len(srv.requests) == 3
    srv = server(*[httpx.ConnectError("refused")] * 2)
    with pytest.raises(httpx.ConnectError):
        model(max_retries=1).invoke("q")
    assert len(srv.requests) == 2


def test_read_timeout_is_not_retried(server):
    srv = server(httpx.ReadTimeout("slow"), CHAT_OK)
    with pytest.raises(httpx.ReadTimeout):
        model(max_retries=3).invoke("q")
    assert len(srv.requests) == 1


def test_stream_parses_sse_and_puts_metadata_on_the_last_chunk(server):
    cites = CHAT_OK["citations"]
    body = sse({**chunk(), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
               chunk("Ro"), chunk("me"), chunk(None, "stop", citations=cites),
               {"id": "chatcmpl-1", "model": "dsa-tiny", "choices": [], "usage": CHAT_OK["usage"]}, b"[DONE]")
    srv = server((503, "busy"), body)  # a 5xx before the stream starts is retried
    chunks = list(model().stream("q"))
    assert [c.content for c in chunks] == ["Ro", "me", ""]
    assert srv.json()["stream"] is True and srv.json()["stream_options"] == {"include_usage": True}
    last = chunks[-1]
    assert last.chunk_position == "last" and last.response_metadata["citations"] == cites
    assert last.response_metadata["finish_reason"] == "stop" and last.usage_metadata["input_tokens"] == 40
    assert all(not c.response_metadata for c in chunks[:-1])


def test_stream_error_event_raises(server):
    server(sse(chunk("a"), {"error": {"message": "engine died", "type": "server_error", "code": "internal_error"}},
               b"[DONE]"))
    with pytest.raises(DSARagAPIError, match="engine died"):
        list(model().stream("q"))


def test_stream_without_done_raises(server):
    server(sse(chunk("a"), chunk(None, "stop")))
    with pytest.raises(C.StreamBroken, match="DONE"):
        list(model().stream("q"))


def test_stream_4xx_raises_the_service_message(server):
    server((404, {"error": {"message": "no documents to answer from", "code": "no_documents"}}))
    with pytest.raises(DSARagAPIError) as e:
        list(model().stream("q"))
    assert e.value.code == "no_documents" and e.value.status_code == 404


@pytest.mark.asyncio
async def test_async_retries_and_stream(server):
    srv = server((502, "bad gateway"), CHAT_OK, httpx.ConnectError("refused"),
                 sse(chunk("x"), chunk(None, "length", citations=[]), b"[DONE]"))
    m = model(max_retries=1)
    assert (await m.ainvoke("q")).content == "Rome"
    chunks = [c async for c in m.astream("q")]
    assert [c.content for c in chunks] == ["x", ""] and chunks[-1].response_metadata["finish_reason"] == "length"
    assert len(srv.requests) == 4
    server((400, {"error": {"message": "bad", "code": "bad_request"}}))
    with pytest.raises(DSARagAPIError):
        await m.ainvoke("q")


def test_llm_and_retriever_bodies(server):
    srv = server({"id": "cmpl-1", "model": "dsa-tiny", "choices": [{"index": 0, "text": "1957", "finish_reason": "stop"}],
                  "usage": CHAT_OK["usage"], "citations": CHAT_OK["citations"]},
                 {"answer": "x", "pack_id": "pk_1", "citations": CHAT_OK["citations"] * 2,
                  "packs": [{"pack_id": "pk_1", "citations": CHAT_OK["citations"]}], "usage": {}})
    res = DSARagLLM(base_url="http://rag.test", document_ids=["doc_1"]).generate(["When?"])
    assert srv.json()["prompt"] == "When?" and srv.json()["document_ids"] == ["doc_1"]
    info = res.generations[0][0].generation_info
    assert res.generations[0][0].text == "1957" and info["citations"] == CHAT_OK["citations"]
    assert res.llm_output["token_usage"]["cached_tokens"] == 30
    docs = DSARagRetriever(base_url="http://rag.test", k=5, max_tokens=4).invoke("When?", document_ids=["doc_9"])
    assert srv.requests[-1].url.path == "/v1/ask"
    assert srv.json() == {"question": "When?", "max_tokens": 4, "temperature": 0.0, "stream": False,
                          "document_ids": ["doc_9"]}
    assert len(docs) == 1  # the repeated span comes back once
    assert docs[0].metadata["span"] == [5, 20] and docs[0].metadata["pack_id"] == "pk_1"


def test_sse_framing_multiline_data_comments_and_crlf(server):
    body = (b": keep-alive comment\r\n\r\nevent: message\r\nid: 1\r\ndata: {\"choices\": [{\"index\": 0,\r\n"
            b"data:  \"delta\": {\"content\": \"hi\"}}]}\r\n\r\n" + sse(chunk(None, "stop")) + b"data: [DONE]")
    server(body)
    assert [c.content for c in model().stream("q")] == ["hi", ""]


def test_langchain_error_is_the_client_error():
    assert DSARagAPIError is C.DSARagAPIError and issubclass(C.StreamBroken, DSARagAPIError)


def test_sse_payload_with_unicode_line_separators(server):
    # the server writes JSON with ensure_ascii=False: U+2028, U+2029 and U+0085 arrive raw inside a
    # data line, and only CR / LF end an SSE line
    text = "a\u2028b\u2029c\x85d"
    server(sse(chunk(text), chunk(None, "stop"), b"[DONE]").replace(b"\\u2028", "\u2028".encode())
           .replace(b"\\u2029", "\u2029".encode()).replace(b"\\u0085", "\x85".encode()))
    assert [c.content for c in model().stream("q")] == [text, ""]
    assert C.parse_sse(f'data: {{"t": "{text}"}}\n\ndata: [DONE]\n\n') == [{"t": text}, "[DONE]"]


def test_sse_decoder_across_chunk_boundaries():
    body = ": c\r\n\r\ndata: {\"a\": \"\u00e9\u2028\"}\r\n\r\nevent: x\rdata:[1,\rdata: 2]\r\rdata: [DONE]\r\n\r\n".encode()
    whole = C.SSEDecoder()
    expected = whole.feed(body) + whole.close()
    assert expected == ['{"a": "\u00e9\u2028"}', "[1,\n2]", "[DONE]"]
    for step in (1, 2, 3, 7):  # splits inside CRLF pairs and inside multi-byte UTF-8 characters
        dec = C.SSEDecoder()
        got = [p for i in range(0, len(body), step) for p in dec.feed(body[i:i + step])] + dec.close()
        assert got == expected, step
    assert list(C.iter_events([body[:5], body[5:]])) == [{"a": "\u00e9\u2028"}, [1, 2]]


def test_client_api_paths_and_bodies(monkeypatch):
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        if req.url.path == "/readyz":
            return httpx.Response(503, json={"status": "unavailable", "checks": {"redis": "down"}})
        if req.url.path == "/v1/ask" and json.loads(req.content)["stream"]:
            return httpx.Response(200, content=sse({"type": "token", "text": "x"}, {"type": "citations"}, b"[DONE]"),
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"data": [{"id": "m"}], "ok": req.url.path})

    monkeypatch.delenv("DSA_RAG_API_KEY", raising=False)
    monkeypatch.setenv("DSA_RAG_BASE_URL", "http://env.test/")
    with C.DSARagClient(tenant="t1", transport=httpx.MockTransport(handler)) as c:
        assert c.base_url == "http://env.test" and "Authorization" not in c.headers
        c.upload([("a.md", b"# A")], prefill=True)
        assert c.list_documents() == [{"id": "m"}] and c.models() == [{"id": "m"}]
        c.get_document("doc_1"), c.delete_document("doc_1")
        c.ask("q?", max_tokens=3, document_ids=None)
        assert [e["type"] for e in c.ask_stream("q?")] == ["token", "citations"]
        assert c.ready() == {"status": "unavailable", "checks": {"redis": "down"}}
    got = [(r.method, r.url.path, r.headers.get("x-tenant")) for r in seen]
    assert got == [("POST", "/v1/documents", "t1"), ("GET", "/v1/documents", "t1"), ("GET", "/v1/models", "t1"),
                   ("GET", "/v1/documents/doc_1", "t1"), ("DELETE", "/v1/documents/doc_1", "t1"),
                   ("POST", "/v1/ask", "t1"), ("POST", "/v1/ask", "t1"), ("GET", "/readyz", "t1")]
    assert seen[0].url.params["prefill"] == "true" and b'filename="a.md"' in seen[0].content
    assert json.loads(seen[5].content) == {"question": "q?", "max_tokens": 3, "stream": False}
    monkeypatch.setenv("DSA_RAG_API_KEY", "sk-env")
    assert C.DSARagClient().headers["Authorization"] == "Bearer sk-env"
    assert "Authorization" not in C.DSARagClient(api_key="").headers
