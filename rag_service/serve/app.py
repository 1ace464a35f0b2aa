"""The FastAPI app: `create_app(backend, metrics=None)` wires the routers, dependencies, error
handlers and middleware around a backend; it holds no route and no logic of its own.

    from dsa_rag.rag_service.ask.local import LocalBackend
    from dsa_rag.rag_service.serve.app import create_app
    app = create_app(LocalBackend(ServeSettings(data_dir="/tmp/rag")))   # no Ray
    # uvicorn: `python -m dsa_rag.rag_service.cli serve --no-ray`; Ray Serve: rag_service/serve/deployments.py

    routes/documents.py   POST /v1/documents (multipart, `files` repeatable or `file`), GET /v1/documents,
                          GET/DELETE /v1/documents/{document_id}
    routes/ask.py         POST /v1/ask {question, document_ids?, max_tokens, temperature, seed, stream}
    routes/openai.py      POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model_id}]
    routes/ops.py         GET /healthz /readyz /metrics
    routes/packs.py       GET /v1/packs: each pack's prefix-cache state (cold, prefilling N%, memory, store)
    routes/ui.py          GET / and /ui/<file>: the web interface (rag_service/web/, open routes)
    deps.py               dependencies: backend, settings, metrics, tenant (API key), one AskParams per
                          question within the settings' limits, the uploaded files within theirs
    errors.py             every error is a RagError (rag_service/errors.py), answered with the OpenAI-style
                          body {"error": {"message", "type", "code", ...}}
    guard.py              before routing: API keys -> tenant (401), rate limit (429), body type (415) and
                          size (413); per-key open SSE streams (429) are counted by StreamSlots

Auth: with `api_keys` set, `Authorization: Bearer <key>` selects the tenant (401 without, 403
for another tenant's document id); without keys the service runs open and the tenant is
`X-Tenant` (default "default"; another tenant's id is then a 404).

`app.state` holds what the dependencies hand out: backend, settings, metrics, streams (the
per-key stream slots) and background (prefill tasks started by uploads, until they finish).

Tests: `.venv/bin/python -m pytest -q tests/service/test_api.py tests/service/test_hardening.py`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from dsa_rag.rag_service.ask.backend import Backend
from dsa_rag.rag_service.serve.errors import install_handlers
from dsa_rag.rag_service.serve.guard import Guard, StreamSlots
from dsa_rag.rag_service.serve.metrics import Metrics
from dsa_rag.rag_service.serve.routes import ROUTERS


@asynccontextmanager
async def lifespan(app: FastAPI):
    """`backend.start()` at startup (loads the pipeline and the model), `close()` at shutdown."""
    backend = app.state.backend
    await backend.start()
    try:
        yield
    finally:
        await backend.close()


async def count_requests(request: Request, call_next):
    """Every response by route template and status (`dsa_rag_http_requests_total`)."""
    resp = await call_next(request)
    route = request.scope.get("route")
    request.app.state.metrics.requests.labels(getattr(route, "path", "other"), str(resp.status_code)).inc()
    return resp


def create_app(backend: Backend, metrics: Metrics | None = None) -> FastAPI:
    """The FastAPI app over `backend` (ask/backend.py), whose `settings` are a ServeSettings.
    `backend.start()` runs at startup."""
    s = backend.settings
    app = FastAPI(
        title="DSA long-document RAG", version="0.1.0", lifespan=lifespan,
        description="Upload documents, ask questions answered by a DeepSeek Sparse Attention model from "
                    "whole-document packs whose prefix KV caches are reused; OpenAI-compatible endpoints.",
    )
    app.state.backend, app.state.settings, app.state.metrics = backend, s, metrics or Metrics()
    app.state.streams = StreamSlots(s.max_streams_per_key)
    app.state.background = set()  # strong references to prefill tasks until they finish
    app.add_middleware(Guard, settings=s, metrics=app.state.metrics)
    app.middleware("http")(count_requests)  # outside the guard: counts what it refuses too
    install_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
