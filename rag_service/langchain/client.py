"""HTTP client of the service for the LangChain classes: options shared by the chat model, the
LLM and the retriever (base URL, API key, tenant, document filter, timeout, retries), JSON and
SSE requests with retries, and the service's error bodies turned into `DSARagAPIError`.

    from dsa_rag.rag_service.langchain.client import DSARagParams
    p = DSARagParams(base_url="http://127.0.0.1:8000", api_key="sk-...", max_retries=3)
    p.http().post("/v1/ask", {"question": "Who signed?"})           # -> the JSON body
    for event in p.http().stream("/v1/chat/completions", {...}):    # -> each `data:` JSON payload
        ...

Retries (with exponential backoff, or the server's `Retry-After`) happen on connection errors,
429 and 5xx, and only before a response body has been read: a stream that already delivered
tokens is never replayed. 4xx errors are raised at once. The API key goes out as
`Authorization: Bearer <key>`; the tenant as `X-Tenant`.

Imports httpx, pydantic and langchain-core only (no torch, FastAPI or Ray), so a client machine
needs none of the serving stack. Tests: `.venv/bin/python -m pytest -q tests/langchain`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any, AsyncIterator, Iterator

import httpx
from langchain_core.utils import from_env, secret_from_env
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# Errors where the request never reached the server or the connection broke before a response:
# safe to send again. A read timeout is not retried (the model may simply be slow; retrying would
# multiply the wait and the cost).
RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.RemoteProtocolError,
                httpx.ReadError, httpx.WriteError)
MAX_RETRY_AFTER_S = 30.0


def _sleep(seconds: float) -> None:  # the retry waits (tests swap these two)
    time.sleep(seconds)


async def _asleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


class DSARagAPIError(Exception):
    """The service answered with an error (HTTP status >= 400, or an error event inside a stream).

    `status_code` is the HTTP status (None for a transport failure or an in-stream error), `code`
    the service's stable machine code (e.g. `no_documents`, `model_not_found`, `validation_error`)."""

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None,
                 body: Any = None):
        self.message, self.status_code, self.code, self.body = message, status_code, code, body
        where = f"HTTP {status_code}" if status_code else "dsa-rag"
        super().__init__(f"{where}{f' {code}' if code else ''}: {message}")


def _error_from_response(resp: httpx.Response) -> DSARagAPIError:
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return DSARagAPIError(err.get("message") or resp.reason_phrase, status_code=resp.status_code,
                              code=err.get("code"), body=body)
    text = body if isinstance(body, str) else json.dumps(body)
    return DSARagAPIError(text[:500] or resp.reason_phrase, status_code=resp.status_code, body=body)


def _error_in_event(event: Any) -> DSARagAPIError | None:
    """/v1/ask streams `{"type": "error", "error": {...}}`, the OpenAI routes `{"error": {...}}`."""
    if isinstance(event, dict) and isinstance(event.get("error"), dict):
        err = event["error"]
        return DSARagAPIError(err.get("message", "error in the answer stream"), code=err.get("code"), body=event)
    return None


class _SSE:
    """Assembles SSE events from lines: `data:` lines up to a blank line make one payload (joined
    by newlines, as the SSE spec says); comments and other fields (event:, id:, retry:) are skipped."""

    def __init__(self):
        self.data: list[str] = []

    def feed(self, line: str) -> str | None:
        if line.startswith("data:"):
            value = line[5:]
            self.data.append(value[1:] if value.startswith(" ") else value)
            return None
        return self.flush() if line == "" else None

    def flush(self) -> str | None:
        payload, self.data = ("\n".join(self.data) if self.data else None), []
        return payload


class HttpClient:
    """Sync and async JSON / SSE requests against one service, with retries.

    The sync `httpx.Client` is kept (connection reuse); an `httpx.AsyncClient` is opened per call
    because it is bound to the event loop that created it, and LangChain callers run on many.
    `transport` / `async_transport` (class attributes) swap the network for tests
    (`httpx.MockTransport`)."""

    transport: httpx.BaseTransport | None = None
    async_transport: httpx.AsyncBaseTransport | None = None

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float | None, max_retries: int,
                 backoff_s: float):
        self.base_url = base_url.rstrip("/")
        self.headers = headers
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0) if timeout else 10.0)
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self._sync: httpx.Client | None = None

    # ---------------------------------------------------------------- helpers
    def _client(self) -> httpx.Client:
        if self._sync is None:
            self._sync = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout,
                                      transport=self.transport)
        return self._sync

    def _aclient(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout,
                                 transport=self.async_transport)

    def _delay(self, attempt: int, resp: httpx.Response | None) -> float:
        if resp is not None and (ra := resp.headers.get("retry-after")):
            try:
                return min(max(float(ra), 0.0), MAX_RETRY_AFTER_S)
            except ValueError:
                pass  # an HTTP date: fall back to the backoff
        return self.backoff_s * (2 ** attempt) * (0.5 + random.random())

    def _should_retry(self, attempt: int, resp: httpx.Response | None) -> bool:
        return attempt < self.max_retries and (resp is None or resp.status_code in RETRY_STATUS)

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    # ---------------------------------------------------------------- sync
    def post(self, path: str, body: dict) -> dict:
        attempt = 0
        while True:
            try:
                resp = self._client().post(path, json=body)
            except RETRY_ERRORS:
                if not self._should_retry(attempt, None):
                    raise
                _sleep(self._delay(attempt, None))
                attempt += 1
                continue
            if resp.status_code < 400:
                return resp.json()
            if not self._should_retry(attempt, resp):
                raise _error_from_response(resp)
            _sleep(self._delay(attempt, resp))
            attempt += 1

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """Each JSON `data:` payload until `data: [DONE]`; an error event raises."""
        attempt = 0
        while True:
            try:
                with self._client().stream("POST", path, json=body) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        if self._should_retry(attempt, resp):
                            delay = self._delay(attempt, resp)
                        else:
                            raise _error_from_response(resp)
                    else:
                        yield from _events(resp.iter_lines())
                        return
            except RETRY_ERRORS:
                # only reached before the first event: _events wraps later transport errors
                if not self._should_retry(attempt, None):
                    raise
                delay = self._delay(attempt, None)
            _sleep(delay)
            attempt += 1

    # ---------------------------------------------------------------- async
    async def apost(self, path: str, body: dict) -> dict:
        attempt = 0
        async with self._aclient() as client:
            while True:
                try:
                    resp = await client.post(path, json=body)
                except RETRY_ERRORS:
                    if not self._should_retry(attempt, None):
                        raise
                    await _asleep(self._delay(attempt, None))
                    attempt += 1
                    continue
                if resp.status_code < 400:
                    return resp.json()
                if not self._should_retry(attempt, resp):
                    raise _error_from_response(resp)
                await _asleep(self._delay(attempt, resp))
                attempt += 1

    async def astream(self, path: str, body: dict) -> AsyncIterator[dict]:
        attempt = 0
        async with self._aclient() as client:
            while True:
                try:
                    async with client.stream("POST", path, json=body) as resp:
                        if resp.status_code >= 400:
                            await resp.aread()
                            if self._should_retry(attempt, resp):
                                delay = self._delay(attempt, resp)
                            else:
                                raise _error_from_response(resp)
                        else:
                            async for ev in _aevents(resp.aiter_lines()):
                                yield ev
                            return
                except RETRY_ERRORS:
                    if not self._should_retry(attempt, None):
                        raise
                    delay = self._delay(attempt, None)
                await _asleep(delay)
                attempt += 1


class StreamBroken(DSARagAPIError):
    """The connection broke, or the stream ended without `data: [DONE]`, after events arrived."""


def _decode(payload: str) -> dict:
    ev = json.loads(payload)
    if (err := _error_in_event(ev)) is not None:
        raise err
    return ev


def _events(lines: Iterator[str]) -> Iterator[dict]:
    try:
        sse = _SSE()
        for line in lines:
            payload = sse.feed(line)
            if payload is None:
                continue
            if payload == "[DONE]":
                return
            yield _decode(payload)
        if (payload := sse.flush()) == "[DONE]":  # a last event without its blank line
            return
        if payload is not None:
            yield _decode(payload)
    except RETRY_ERRORS as e:
        raise StreamBroken(f"the answer stream broke: {type(e).__name__}: {e}") from e
    raise StreamBroken("the answer stream ended without `data: [DONE]`")


async def _aevents(lines: AsyncIterator[str]) -> AsyncIterator[dict]:
    try:
        sse = _SSE()
        async for line in lines:
            payload = sse.feed(line)
            if payload is None:
                continue
            if payload == "[DONE]":
                return
            yield _decode(payload)
        if (payload := sse.flush()) == "[DONE]":  # a last event without its blank line
            return
        if payload is not None:
            yield _decode(payload)
    except RETRY_ERRORS as e:
        raise StreamBroken(f"the answer stream broke: {type(e).__name__}: {e}") from e
    raise StreamBroken("the answer stream ended without `data: [DONE]`")


PROVIDER = "dsa_rag"  # ls_provider / model_provider of both LangChain models


class DSARagParams(BaseModel):
    """Connection options shared by `DSARagChatModel`, `DSARagLLM` and `DSARagRetriever`."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    base_url: str = Field(
        default_factory=from_env("DSA_RAG_BASE_URL", default="http://127.0.0.1:8000"),
        description="the service root (no /v1); env DSA_RAG_BASE_URL",
    )
    api_key: SecretStr | None = Field(
        default_factory=secret_from_env("DSA_RAG_API_KEY", default=None),
        description="sent as `Authorization: Bearer <key>`; env DSA_RAG_API_KEY",
    )
    tenant: str | None = Field(None, description="`X-Tenant` header; None = the service's default tenant")
    document_ids: list[str] | None = Field(
        None, description="answer only from these documents (the service's `document_ids` filter)"
    )
    timeout: float | None = Field(60.0, ge=0, description="seconds per request (read / write); None = wait forever")
    max_retries: int = Field(2, ge=0, description="extra attempts on connection errors, 429 and 5xx")
    retry_backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles per attempt (jittered)")
    default_headers: dict[str, str] | None = Field(None, description="extra HTTP headers on every request")

    # a private attribute: not part of the model's fields, dump, equality or serialization
    _http_cache: tuple | None = PrivateAttr(default=None)

    def _headers(self) -> dict[str, str]:
        h = {"Accept": "application/json, text/event-stream", "User-Agent": "dsa-rag-langchain/0.1"}
        if self.api_key is not None and self.api_key.get_secret_value():
            h["Authorization"] = f"Bearer {self.api_key.get_secret_value()}"
        if self.tenant:
            h["X-Tenant"] = self.tenant
        h.update(self.default_headers or {})
        return h

    def http(self) -> HttpClient:
        """The (cached) HTTP client for the current options."""
        key = (self.base_url, tuple(sorted(self._headers().items())), self.timeout, self.max_retries,
               self.retry_backoff_s)
        cached = self._http_cache
        if cached is None or cached[0] != key:
            cached = (key, HttpClient(self.base_url, self._headers(), self.timeout, self.max_retries,
                                      self.retry_backoff_s))
            self._http_cache = cached
        return cached[1]


def usage_metadata(usage: dict | None) -> dict | None:
    """OpenAI usage (with `prompt_tokens_details.cached_tokens`) or /v1/ask usage (`cached_tokens`)
    -> LangChain `UsageMetadata`. The prompt counts the whole pack prefix (documents + question);
    `cache_read` is the part served from the prefix KV cache."""
    if not usage:
        return None
    inp, out = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    cached = usage.get("cached_tokens")
    if cached is None:
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
            "input_token_details": {"cache_read": int(cached or 0)}}


class DSARagGenerationParams(DSARagParams):
    """Generation options shared by `DSARagChatModel` and `DSARagLLM` (the retriever only
    generates the few tokens it needs to find citations)."""

    model: str = Field("dsa-tiny", alias="model_name", description="the id GET /v1/models reports")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="None = the service default (greedy)")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate; None = the service default")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0)
    stop: list[str] | None = Field(None, description="up to 4 stop strings (trimmed from the output)")
    streaming: bool = Field(False, description="invoke() streams from the service and aggregates")

    def _ls_params(self, model_type: str, stop: list[str] | None, **kwargs: Any) -> dict[str, Any]:
        """LangSmith tracing params: per-call kwargs override the instance's options."""
        params: dict[str, Any] = {"ls_provider": PROVIDER, "ls_model_name": kwargs.get("model") or self.model,
                                  "ls_model_type": model_type}
        if (t := kwargs.get("temperature", self.temperature)) is not None:
            params["ls_temperature"] = t
        if (m := kwargs.get("max_tokens", self.max_tokens)) is not None:
            params["ls_max_tokens"] = m
        if stop := (stop or self.stop):
            params["ls_stop"] = stop
        return params

    def _generation_identity(self) -> dict[str, Any]:
        return {"model": self.model, "base_url": self.base_url, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "top_p": self.top_p, "seed": self.seed,
                "document_ids": self.document_ids, "tenant": self.tenant}

