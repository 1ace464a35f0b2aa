"""The request guard: authentication, per-key rate limits, body size and content-type checks,
done before routing or body parsing (a pure ASGI middleware, so SSE streams pass through).

    app.add_middleware(Guard, settings=s, metrics=metrics)        # rag_service/serve/app.py
    tenant = request.state.tenant; key = request.state.principal  # what routes see

Order of checks, each answered with the service's error body {"error": {...}} (an error of the
one hierarchy in rag_service/errors.py, rendered by serve/errors.py's `error_response`):

1. Auth. With `api_keys` set, every route but the open ones (health, metrics, docs) needs
   `Authorization: Bearer <key>`: missing -> 401 `missing_api_key`, unknown -> 401
   `invalid_api_key`, both with `WWW-Authenticate: Bearer`. The key's tenant is the tenant;
   `X-Tenant` is ignored (a key cannot reach another tenant). Without keys (dev mode) the tenant
   is `X-Tenant` (validated: 400) or `default_tenant`, and the principal is the tenant.
2. Rate limit: a token bucket per principal (`rate_limit_rps`, `rate_limit_burst`) -> 429
   with Retry-After. Per ingress process (in Ray, per Ingress replica).
3. Bodies (POST/PUT/PATCH): content type must be JSON, or multipart/form (uploads) -> 415;
   `Content-Length` over `max_json_bytes` (`max_request_bytes` for uploads) -> 413 before a byte
   is read, and a body that streams past the limit (chunked) is cut off with 413 too.

Concurrent SSE streams per key (`max_streams_per_key`) are counted by `StreamSlots`, which the
streaming routes take before they answer 200.

Tests: `.venv/bin/python -m pytest -q tests/service/test_hardening.py`.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import threading
import time

from starlette.exceptions import HTTPException

from dsa_rag.rag_service.errors import (BadRequest, InvalidApiKey, MissingApiKey, RagError, RequestTooLarge,
                                        TooManyRequests, UnsupportedMediaType)
from dsa_rag.rag_service.serve.errors import error_response
from dsa_rag.rag_service.serve.settings import TENANT_PATTERN, ServeSettings

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc"})
OPEN_PREFIXES = ("/ui/",)  # the web UI's page and static files (no data; its API calls carry the key)
UPLOAD_PATHS = frozenset({"/v1/documents"})
UPLOAD_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_TENANT = re.compile(TENANT_PATTERN)


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body streams past the limit. An HTTPException, so FastAPI's
    body parsing re-raises it (instead of turning it into a generic 400); the app's handler
    answers it as a `RequestTooLarge` (413)."""

    def __init__(self, limit: int, setting: str):
        super().__init__(413, f"request body is over the limit of {limit} bytes ({setting})")


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up. Thread-safe."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = float(rate), float(burst)
        self.tokens, self.t = float(burst), time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> float:
        """0.0 when a token was taken; else the seconds until one is available."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return 0.0
            return (1.0 - self.tokens) / self.rate


class StreamSlots:
    """Concurrent streams per principal. `acquire` raises 429 over the limit; the slot it returns
    is released by `release()` (idempotent), or when it is garbage-collected (a stream body that
    never started)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: dict[str, int] = {}
        self.lock = threading.Lock()

    def acquire(self, principal: str) -> StreamSlot:
        with self.lock:
            n = self.open.get(principal, 0)
            if n >= self.limit:
                raise TooManyRequests(
                    f"{n} answer streams are already open for this API key; the limit is {self.limit} "
                    "(DSA_RAG_MAX_STREAMS_PER_KEY): wait for one to finish", headers={"Retry-After": "1"})
            self.open[principal] = n + 1
        return StreamSlot(self, principal)

    def _release(self, principal: str) -> None:
        with self.lock:
            n = self.open.get(principal, 0) - 1
            if n > 0:
                self.open[principal] = n
            else:
                self.open.pop(principal, None)


class StreamSlot:
    """One open stream of a principal, taken by `StreamSlots.acquire`."""

    def __init__(self, owner: StreamSlots, principal: str):
        self.owner, self.principal, self.done = owner, principal, False

    def release(self) -> None:
        if not self.done:
            self.done = True
            self.owner._release(self.principal)  # noqa: SLF001

    __del__ = release


class Guard:
    """ASGI middleware; see the module docstring."""

    def __init__(self, app, settings: ServeSettings, metrics=None):
        self.app, self.s, self.metrics = app, settings, metrics
        self.keys = dict(settings.api_keys)
        if not self.keys:
            logging.getLogger(__name__).warning(
                "no API keys configured (DSA_RAG_API_KEYS): the service runs OPEN, tenant from X-Tenant; "
                "set keys before exposing it beyond localhost")
        self.buckets: dict[str, TokenBucket] = {}
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        denied = self._check(scope)
        if denied is not None:
            if self.metrics is not None:
                self.metrics.requests.labels("guard", str(denied.status_code)).inc()
            return await error_response(denied)(scope, receive, send)
        if scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        limit, setting = self._limit(scope["path"])
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit, setting)
            return msg

        await self.app(scope, limited_receive, send)

    def _limit(self, path: str) -> tuple[int, str]:
        if path in UPLOAD_PATHS:
            return self.s.max_request_bytes, "DSA_RAG_MAX_REQUEST_BYTES"
        return self.s.max_json_bytes, "DSA_RAG_MAX_JSON_BYTES"

    def _check(self, scope) -> RagError | None:
        """None when the request may go on, else the error to answer with."""
        headers = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        path = scope["path"]
        state = scope.setdefault("state", {})
        if path in OPEN_PATHS or path == "/" or path.startswith(OPEN_PREFIXES):
            state["tenant"], state["principal"] = self.s.default_tenant, "-"
            return None
        # 1. who is it
        if self.keys:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if not auth or scheme.lower() != "bearer" or not token.strip():
                return MissingApiKey("missing API key: send `Authorization: Bearer <key>` (keys are configured "
                                     "by DSA_RAG_API_KEYS)", headers={"WWW-Authenticate": 'Bearer realm="dsa-rag"'})
            tenant = self._tenant_of(token.strip())
            if tenant is None:
                return InvalidApiKey("invalid API key",
                                     headers={"WWW-Authenticate": 'Bearer realm="dsa-rag", error="invalid_token"'})
            state["tenant"], state["principal"] = tenant, "key:" + token.strip()
        else:
            tenant = headers.get("x-tenant") or self.s.default_tenant
            if not _TENANT.match(tenant):
                return BadRequest("X-Tenant is not valid: use 1-128 letters, digits, '_', '.', '-'")
            state["tenant"], state["principal"] = tenant, "tenant:" + tenant
        # 2. rate limit
        if self.s.rate_limit_rps > 0:
            wait = self._bucket(state["principal"]).take()
            if wait > 0:
                return TooManyRequests(f"rate limit of {self.s.rate_limit_rps:g} requests/s (burst "
                                       f"{self.s.rate_limit_burst}) for this API key exceeded; retry in {wait:.2f} s",
                                       headers={"Retry-After": str(max(1, math.ceil(wait)))})
        # 3. body type and declared size
        if scope["method"] in BODY_METHODS:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            length = headers.get("content-length")
            if path in UPLOAD_PATHS:
                if ctype not in UPLOAD_TYPES:
                    return UnsupportedMediaType(f"Content-Type {ctype or '(none)'!r} is not accepted here: "
                                                "upload files as multipart/form-data")
            elif not (ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))):
                if length not in (None, "0") or ctype:
                    return UnsupportedMediaType(f"Content-Type {ctype or '(none)'!r} is not accepted here: "
                                                "send a JSON body with Content-Type: application/json")
            limit, setting = self._limit(path)
            if length is not None:
                try:
                    n = int(length)
                except ValueError:
                    return BadRequest("Content-Length is not a number")
                if n > limit:
                    return RequestTooLarge(f"request body of {n} bytes is over the limit of {limit} bytes "
                                           f"({setting})")
        return None

    def _tenant_of(self, token: str) -> str | None:
        found = None
        for key, tenant in self.keys.items():  # constant time per key: no timing oracle on the key
            if hmac.compare_digest(key.encode(), token.encode()):
                found = tenant
        return found

    def _bucket(self, principal: str) -> TokenBucket:
        with self.lock:
            b = self.buckets.get(principal)
            if b is None:
                if len(self.buckets) > 100_000:  # bounded memory: forget idle buckets
                    self.buckets.clear()
                b = self.buckets[principal] = TokenBucket(self.s.rate_limit_rps, self.s.rate_limit_burst)
            return b
