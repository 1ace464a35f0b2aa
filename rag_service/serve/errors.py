"""HTTP error responses: every error the service answers with is a `RagError` (the one hierarchy
in rag_service/errors.py), rendered here, and only here, as the OpenAI-style body

    {"error": {"message": ..., "type": "invalid_request_error", "code": "limit_exceeded",
               "filename"?: ..., "param"?: ...}, ...e.extra}

so the openai client raises a typed error that carries our message. The exception handlers
turn what else reaches the app into that hierarchy first: FastAPI's validation errors ->
InvalidRequest (422), Starlette's HTTP exceptions (unknown route, wrong method, a body cut off
by the guard) -> NotFound / MethodNotAllowed / RequestTooLarge / ..., Redis unreachable ->
StorageError (503 with Retry-After), any other exception -> InternalError (500, logged).
The guard middleware (guard.py) answers with `error_response` too.

    install_handlers(app)                     # rag_service/serve/app.py
    return error_response(NotFound("..."))    # a JSONResponse (also an ASGI app)

Tests: `.venv/bin/python -m pytest -q tests/service/test_hardening.py tests/service/test_faults.py`.
"""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsa_rag.rag_service.errors import (BadRequest, HTTPError, InternalError, InvalidRequest, MethodNotAllowed,
                                        NotFound, OtherTenant, RagError, RequestTooLarge, StorageError,
                                        UnsupportedMediaType)
from dsa_rag.rag_service.serve.schemas_api import ErrorResponse

log = logging.getLogger(__name__)

# OpenAI's error "type" by HTTP status.
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
         415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable", 507: "insufficient_storage"}
# The error statuses a route documents in the OpenAPI schema (`responses=ERROR_RESPONSES`).
ERROR_RESPONSES = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 413, 415, 422, 429, 503)}
# Starlette HTTPExceptions (raised by the framework: routing, body parsing, the guard) by status.
_FROM_HTTP = {400: BadRequest, 404: NotFound, 405: MethodNotAllowed, 413: RequestTooLarge,
              415: UnsupportedMediaType}


def error_detail(e: RagError) -> dict:
    """The "error" object of the body (also the in-band error of an SSE stream, without filename)."""
    detail = {"message": str(e), "type": TYPES.get(e.status_code, "server_error"), "code": e.code}
    if e.filename is not None:
        detail["filename"] = e.filename
    if isinstance(e, InvalidRequest):
        detail["param"] = e.param
    return detail


def error_response(e: RagError) -> JSONResponse:
    return JSONResponse({"error": error_detail(e), **(e.extra or {})}, status_code=e.status_code, headers=e.headers)


def stream_error(e: BaseException) -> dict:
    """The error of an SSE stream that already answered 200 (sent in-band, then [DONE])."""
    if isinstance(e, RagError):
        return {k: v for k, v in error_detail(e).items() if k in ("message", "type", "code")}
    log.exception("error while streaming an answer", exc_info=e)
    return {"message": f"internal error ({type(e).__name__}: {e})", "type": "server_error", "code": "internal_error"}


# ------------------------------------------------------------------ handlers
async def on_rag_error(request: Request, e: RagError) -> JSONResponse:
    if isinstance(e, OtherTenant) and not request.app.state.settings.auth_enabled:
        e = NotFound(e.not_found)  # open mode: tenants are namespaces, an id of another is no leak
    return error_response(e)


async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    headers = getattr(e, "headers", None)
    cls = _FROM_HTTP.get(e.status_code)
    err = cls(str(e.detail), headers=headers) if cls else HTTPError(str(e.detail), status_code=e.status_code,
                                                                     headers=headers)
    return error_response(err)


async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    errs = e.errors()
    first = errs[0] if errs else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    msg = first.get("msg", "invalid request")
    return error_response(InvalidRequest(f"{where}: {msg}" if where else msg, param=where or None,
                                         errors=[{k: v for k, v in x.items() if k in ("loc", "msg", "type")}
                                                 for x in errs]))


async def on_redis_down(request: Request, e: Exception) -> JSONResponse:
    log.warning("Redis unavailable on %s %s: %s", request.method, request.url.path, e)
    return error_response(StorageError("the metadata store (Redis) is unavailable; retry in a few seconds",
                                       headers={"Retry-After": "2"}))


async def on_bug(request: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
    return error_response(InternalError(f"internal error ({type(e).__name__}); see the server log"))


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RagError, on_rag_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(redis.ConnectionError, on_redis_down)
    app.add_exception_handler(redis.TimeoutError, on_redis_down)
    app.add_exception_handler(Exception, on_bug)
