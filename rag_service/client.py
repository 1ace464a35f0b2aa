"""The HTTP + SSE client of the service: used by the CLI (`dsa-rag ingest / ask / status`), the
LangChain classes and the tests. Needs httpx only (no torch, FastAPI, Ray or LangChain).

    from dsa_rag.rag_service.client import DSARagClient, DSARagAPIError
    with DSARagClient("http://127.0.0.1:8000", api_key="sk-...") as c:
        ids = c.upload([("report.pdf", open("report.pdf", "rb").read())])["ids"]
        c.list_documents(); c.get_document(ids[0]); c.delete_document(ids[0])
        answer = c.ask("Who signed?", document_ids=ids, max_tokens=64)     # the JSON body
        for ev in c.ask_stream("Who signed?"):              # {"type": "progress" | "token" | "citations"}
            ...
        c.chat_completions({"model": "dsa-tiny", "messages": [...]})      # also chat_completions_stream,
        c.health(); c.ready(); c.models(); c.metrics()                    #   completions(_stream)

Every method has an async twin named with an `a` in front (`aask`, `aask_stream`, ...).

Options: `base_url` (default env DSA_RAG_BASE_URL, else http://127.0.0.1:8000), `api_key`
(default env DSA_RAG_API_KEY; sent as `Authorization: Bearer <key>`; "" sends none), `tenant`
(`X-Tenant`), `timeout` (seconds per read / write; connect at most 10), `max_retries`,
`retry_backoff_s`, `headers`.

Errors: an HTTP status >= 400 raises `DSARagAPIError` (`status_code`, `code` = the service's
machine code such as `no_documents`, `message`, `body`); an error event inside a stream raises it
with `status_code=None`; a stream that breaks or ends without `data: [DONE]` raises `StreamBroken`
(a `DSARagAPIError`). Transport errors (`httpx.ConnectError`, ...) that outlive the retries are
raised as they are.

Retries (exponential backoff, or the server's `Retry-After`) happen on connection errors, 429 and
5xx, and only before a response body has been read: a stream that already delivered events is
never replayed. Other 4xx are raised at once. The probes (`health`, `ready`) are not retried, and
`ready()` returns the body of a 503 (not ready) instead of raising.

SSE: `SSEDecoder` (bytes in, `data:` payloads out; lines end at CRLF, CR or LF only, so a token
holding U+2028 or U+0085 stays inside its event) and `parse_sse(body)` for a whole body.

Tests: `.venv/bin/python -m pytest -q tests/langchain/test_client.py tests/service/test_cli.py`.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any, AsyncIterable, AsyncIterator, Iterable, Iterator

import httpx

ENV_BASE_URL = "DSA_RAG_BASE_URL"
ENV_API_KEY = "DSA_RAG_API_KEY"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
USER_AGENT = "dsa-rag-client/0.1"

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# Errors where the request never reached the server or the connection broke before a response:
# safe to send again. A read timeout is not retried (the model may simply be slow; retrying would
# multiply the wait and the cost).
RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.RemoteProtocolError,
                httpx.ReadError, httpx.WriteError)
MAX_RETRY_AFTER_S = 30.0
DONE = "[DONE]"


def _sleep(seconds: float) -> None:  # the retry waits (tests swap these two)
    time.sleep(seconds)


async def _asleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


# ---------------------------------------------------------------------------------------- errors
class DSARagAPIError(Exception):
    """The service answered with an error (HTTP status >= 400, or an error event inside a stream).

    `status_code` is the HTTP status (None for an in-stream error), `code` the service's stable
    machine code (e.g. `no_documents`, `model_not_found`, `validation_error`), `body` the decoded
    error body or event."""

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None,
                 body: Any = None):
        self.message, self.status_code, self.code, self.body = message, status_code, code, body
        where = f"HTTP {status_code}" if status_code else "dsa-rag"
        super().__init__(f"{where}{f' {code}' if code else ''}: {message}")


class StreamBroken(DSARagAPIError):
    """The connection broke, or the stream ended without `data: [DONE]`, after the response began."""


def error_from_response(resp: httpx.Response) -> DSARagAPIError:
    """An error response -> `DSARagAPIError`: the service's `{"error": {"message", "code"}}` body,
    else the first 500 characters of the body."""
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return DSARagAPIError(err.get("message") or resp.reason_phrase, status_code=resp.status_code,
                              code=err.get("code"), body=body)
    return DSARagAPIError(resp.text[:500] or resp.reason_phrase, status_code=resp.status_code, body=body)


def _error_in_event(event: Any) -> DSARagAPIError | None:
    """/v1/ask streams `{"type": "error", "error": {...}}`, the OpenAI routes `{"error": {...}}`."""
    if isinstance(event, dict) and isinstance(event.get("error"), dict):
        err = event["error"]
        return DSARagAPIError(err.get("message", "error in the answer stream"), code=err.get("code"), body=event)
    return None


# ---------------------------------------------------------------------------------------- SSE
_EOL = re.compile(r"\r\n|\r|\n")


class SSEDecoder:
    """Incremental SSE parser (the WHATWG event-stream format): feed bytes (UTF-8) or text as it
    arrives, get back the data payloads of the events it completes. `data:` lines up to a blank
    line make one payload (joined by newlines); comments (`:`) and the other fields (event, id,
    retry) are skipped. Lines end at CRLF, CR or LF only. `close()` returns a last event that was
    not followed by its blank line."""

    def __init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._data: list[str] = []
        self._started = False

    def feed(self, chunk: bytes | str) -> list[str]:
        text = self._utf8.decode(chunk) if isinstance(chunk, bytes) else chunk
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        buf, out, start = self._buf + text, [], 0
        while (m := _EOL.search(buf, start)) is not None:
            if m.group() == "\r" and m.end() == len(buf):
                break  # maybe the first half of a CRLF: wait for the next chunk
            self._line(buf[start:m.start()], out)
            start = m.end()
        self._buf = buf[start:]
        return out

    def close(self) -> list[str]:
        out = self.feed(self._utf8.decode(b"", final=True))
        if self._buf:
            self._line(self._buf.removesuffix("\r"), out)
            self._buf = ""
        self._line("", out)
        return out

    def _line(self, line: str, out: list[str]) -> None:
        if not line:
            if self._data:
                out.append("\n".join(self._data))
                self._data = []
            return
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)


def parse_sse(body: str | bytes) -> list:
    """A whole SSE body -> its data payloads, JSON-decoded where they are JSON (so the end marker
    stays the string "[DONE]")."""
    dec = SSEDecoder()
    out = []
    for payload in dec.feed(body) + dec.close():
        try:
            out.append(json.loads(payload))
        except ValueError:
            out.append(payload)
    return out


def _decode_event(payload: str) -> dict:
    try:
        ev = json.loads(payload)
    except ValueError as e:
        raise DSARagAPIError(f"the answer stream sent a payload that is not JSON: {payload[:200]!r}") from e
    if (err := _error_in_event(ev)) is not None:
        raise err
    return ev


class _EventReader:
    """SSE bytes -> JSON events, up to `data: [DONE]`; shared by the sync and async iterators."""

    def __init__(self):
        self.dec, self.done = SSEDecoder(), False

    def events(self, payloads: list[str]) -> Iterator[dict]:
        """Lazily, so the events before an error event reach the caller before it raises."""
        for payload in payloads:
            if payload == DONE:
                self.done = True
                return
            yield _decode_event(payload)

    def feed(self, chunk: bytes) -> Iterator[dict]:
        return self.events(self.dec.feed(chunk))

    def close(self) -> Iterator[dict]:
        yield from self.events(self.dec.close())
        if not self.done:
            raise StreamBroken("the answer stream ended without `data: [DONE]`")


def _broken(e: BaseException) -> StreamBroken:
    return StreamBroken(f"the answer stream broke: {type(e).__name__}: {e}")


def iter_events(chunks: Iterable[bytes]) -> Iterator[dict]:
    """An SSE byte stream -> each JSON event until `data: [DONE]`; an error event raises
    `DSARagAPIError`, a broken or unfinished stream `StreamBroken`."""
    reader = _EventReader()
    try:
        for chunk in chunks:
            yield from reader.feed(chunk)
            if reader.done:
                return
    except RETRY_ERRORS as e:
        raise _broken(e) from e
    yield from reader.close()


async def aiter_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[dict]:
    """`iter_events` over an async byte stream."""
    reader = _EventReader()
    try:
        async for chunk in chunks:
            for ev in reader.feed(chunk):
                yield ev
            if reader.done:
                return
    except RETRY_ERRORS as e:
        raise _broken(e) from e
    for ev in reader.close():
        yield ev


# ---------------------------------------------------------------------------------------- client
FileArg = str | os.PathLike | tuple  # a path, or (name, bytes) / (name, bytes, content_type)


def _files(files: Iterable[FileArg]) -> list[tuple[str, tuple]]:
    out = []
    for f in files:
        if isinstance(f, tuple):
            out.append(("files", f))
        else:
            p = Path(f)
            out.append(("files", (p.name, p.read_bytes())))
    return out


def _ask_body(question: str, stream: bool, options: dict) -> dict:
    return {"question": question, **{k: v for k, v in options.items() if v is not None}, "stream": stream}


class DSARagClient:
    """Sync and async requests against one service, with retries (see the module docstring).

    The sync `httpx.Client` is kept (connection reuse; `close()` or `with` ends it); an
    `httpx.AsyncClient` is opened per async call because it is bound to the event loop that
    created it, and callers (LangChain) run on many. `transport` / `async_transport` (class
    attributes, or constructor arguments) swap the network for tests (`httpx.MockTransport`)."""

    transport: httpx.BaseTransport | None = None
    async_transport: httpx.AsyncBaseTransport | None = None

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, tenant: str | None = None,
                 timeout: float | None = 60.0, max_retries: int = 2, retry_backoff_s: float = 0.5,
                 headers: dict[str, str] | None = None, user_agent: str = USER_AGENT,
                 transport: httpx.BaseTransport | None = None,
                 async_transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = (base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/")
        key = os.environ.get(ENV_API_KEY) if api_key is None else api_key
        self.headers = {"Accept": "application/json, text/event-stream", "User-Agent": user_agent}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        if tenant:
            self.headers["X-Tenant"] = tenant
        self.headers.update(headers or {})
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0) if timeout else 10.0)
        self.max_retries, self.retry_backoff_s = max_retries, retry_backoff_s
        if transport is not None:
            self.transport = transport
        if async_transport is not None:
            self.async_transport = async_transport
        self._sync: httpx.Client | None = None

    # ------------------------------------------------------------------ plumbing
    def _client(self) -> httpx.Client:
        if self._sync is None:
            self._sync = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout,
                                      transport=self.transport)
        return self._sync

    def _aclient(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout,
                                 transport=self.async_transport)

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    def __enter__(self) -> DSARagClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _delay(self, attempt: int, resp: httpx.Response | None) -> float:
        if resp is not None and (ra := resp.headers.get("retry-after")):
            try:
                return min(max(float(ra), 0.0), MAX_RETRY_AFTER_S)
            except ValueError:
                pass  # an HTTP date: fall back to the backoff
        return self.retry_backoff_s * (2 ** attempt) * (0.5 + random.random())

    def _should_retry(self, attempt: int, resp: httpx.Response | None, retry: bool = True) -> bool:
        return retry and attempt < self.max_retries and (resp is None or resp.status_code in RETRY_STATUS)

    def request(self, method: str, path: str, *, retry: bool = True, accept: tuple[int, ...] = (),
                **kwargs: Any) -> httpx.Response:
        """One request with retries; a status >= 400 not in `accept` raises `DSARagAPIError`.
        kwargs go to httpx (json=, files=, params=)."""
        attempt = 0
        while True:
            try:
                resp = self._client().request(method, path, **kwargs)
            except RETRY_ERRORS:
                if not self._should_retry(attempt, None, retry):
                    raise
                _sleep(self._delay(attempt, None))
                attempt += 1
                continue
            if resp.status_code < 400 or resp.status_code in accept:
                return resp
            if not self._should_retry(attempt, resp, retry):
                raise error_from_response(resp)
            _sleep(self._delay(attempt, resp))
            attempt += 1

    async def arequest(self, method: str, path: str, *, retry: bool = True, accept: tuple[int, ...] = (),
                       **kwargs: Any) -> httpx.Response:
        attempt = 0
        async with self._aclient() as client:
            while True:
                try:
                    resp = await client.request(method, path, **kwargs)
                except RETRY_ERRORS:
                    if not self._should_retry(attempt, None, retry):
                        raise
                    await _asleep(self._delay(attempt, None))
                    attempt += 1
                    continue
                if resp.status_code < 400 or resp.status_code in accept:
                    return resp
                if not self._should_retry(attempt, resp, retry):
                    raise error_from_response(resp)
                await _asleep(self._delay(attempt, resp))
                attempt += 1

    def stream_events(self, path: str, body: dict) -> Iterator[dict]:
        """POST `body`, then each JSON event of the SSE answer until `data: [DONE]`."""
        attempt = 0
        while True:
            try:
                with self._client().stream("POST", path, json=body) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        if not self._should_retry(attempt, resp):
                            raise error_from_response(resp)
                        delay = self._delay(attempt, resp)
                    else:
                        yield from iter_events(resp.iter_bytes())
                        return
            except RETRY_ERRORS:
                # only reached before the response began: iter_events wraps later transport errors
                if not self._should_retry(attempt, None):
                    raise
                delay = self._delay(attempt, None)
            _sleep(delay)
            attempt += 1

    async def astream_events(self, path: str, body: dict) -> AsyncIterator[dict]:
        attempt = 0
        async with self._aclient() as client:
            while True:
                try:
                    async with client.stream("POST", path, json=body) as resp:
                        if resp.status_code >= 400:
                            await resp.aread()
                            if not self._should_retry(attempt, resp):
                                raise error_from_response(resp)
                            delay = self._delay(attempt, resp)
                        else:
                            async for ev in aiter_events(resp.aiter_bytes()):
                                yield ev
                            return
                except RETRY_ERRORS:
                    if not self._should_retry(attempt, None):
                        raise
                    delay = self._delay(attempt, None)
                await _asleep(delay)
                attempt += 1

    # ------------------------------------------------------------------ documents
    def upload(self, files: Iterable[FileArg], *, prefill: bool = False) -> dict:
        """POST /v1/documents: paths or (name, bytes[, content_type]) -> {"ids", "data": [per-file results]}."""
        return self.request("POST", "/v1/documents", files=_files(files), params={"prefill": prefill} if prefill
                            else None).json()

    async def aupload(self, files: Iterable[FileArg], *, prefill: bool = False) -> dict:
        return (await self.arequest("POST", "/v1/documents", files=_files(files),
                                    params={"prefill": prefill} if prefill else None)).json()

    def list_documents(self) -> list[dict]:
        return self.request("GET", "/v1/documents").json()["data"]

    async def alist_documents(self) -> list[dict]:
        return (await self.arequest("GET", "/v1/documents")).json()["data"]

    def get_document(self, document_id: str) -> dict:
        return self.request("GET", f"/v1/documents/{document_id}").json()

    async def aget_document(self, document_id: str) -> dict:
        return (await self.arequest("GET", f"/v1/documents/{document_id}")).json()

    def delete_document(self, document_id: str) -> dict:
        return self.request("DELETE", f"/v1/documents/{document_id}").json()

    async def adelete_document(self, document_id: str) -> dict:
        return (await self.arequest("DELETE", f"/v1/documents/{document_id}")).json()

    # ------------------------------------------------------------------ ask
    def ask(self, question: str, **options: Any) -> dict:
        """POST /v1/ask -> the answer JSON. options (None = left out): document_ids, max_tokens,
        temperature, seed."""
        return self.request("POST", "/v1/ask", json=_ask_body(question, False, options)).json()

    async def aask(self, question: str, **options: Any) -> dict:
        return (await self.arequest("POST", "/v1/ask", json=_ask_body(question, False, options))).json()

    def ask_stream(self, question: str, **options: Any) -> Iterator[dict]:
        """POST /v1/ask with stream=true -> {"type": "token", "text", ...} events, then one
        {"type": "citations", ...} (the whole answer body); an error event raises."""
        return self.stream_events("/v1/ask", _ask_body(question, True, options))

    def aask_stream(self, question: str, **options: Any) -> AsyncIterator[dict]:
        return self.astream_events("/v1/ask", _ask_body(question, True, options))

    # ------------------------------------------------------------------ OpenAI-compatible
    def chat_completions(self, body: dict) -> dict:
        return self.request("POST", "/v1/chat/completions", json={**body, "stream": False}).json()

    async def achat_completions(self, body: dict) -> dict:
        return (await self.arequest("POST", "/v1/chat/completions", json={**body, "stream": False})).json()

    def chat_completions_stream(self, body: dict) -> Iterator[dict]:
        return self.stream_events("/v1/chat/completions", {**body, "stream": True})

    def achat_completions_stream(self, body: dict) -> AsyncIterator[dict]:
        return self.astream_events("/v1/chat/completions", {**body, "stream": True})

    def completions(self, body: dict) -> dict:
        return self.request("POST", "/v1/completions", json={**body, "stream": False}).json()

    async def acompletions(self, body: dict) -> dict:
        return (await self.arequest("POST", "/v1/completions", json={**body, "stream": False})).json()

    def completions_stream(self, body: dict) -> Iterator[dict]:
        return self.stream_events("/v1/completions", {**body, "stream": True})

    def acompletions_stream(self, body: dict) -> AsyncIterator[dict]:
        return self.astream_events("/v1/completions", {**body, "stream": True})

    def models(self) -> list[dict]:
        return self.request("GET", "/v1/models").json()["data"]

    async def amodels(self) -> list[dict]:
        return (await self.arequest("GET", "/v1/models")).json()["data"]

    # ------------------------------------------------------------------ ops
    def health(self) -> dict:
        """GET /healthz -> {"status": "ok", "checks": {...}} (not retried)."""
        return self.request("GET", "/healthz", retry=False).json()

    async def ahealth(self) -> dict:
        return (await self.arequest("GET", "/healthz", retry=False)).json()

    def ready(self) -> dict:
        """GET /readyz -> {"status": "ok" | "unavailable", "checks": {...}}; a 503 (not ready) is
        returned, not raised (not retried)."""
        return _health_body(self.request("GET", "/readyz", retry=False, accept=(503,)))

    async def aready(self) -> dict:
        return _health_body(await self.arequest("GET", "/readyz", retry=False, accept=(503,)))

    def metrics(self) -> str:
        """GET /metrics -> the Prometheus text."""
        return self.request("GET", "/metrics").text

    async def ametrics(self) -> str:
        return (await self.arequest("GET", "/metrics")).text


def _health_body(resp: httpx.Response) -> dict:
    try:
        return resp.json()
    except ValueError:
        raise error_from_response(resp) from None
