"""The HTTP routes, one `APIRouter` per resource, included by `create_app` (../app.py) in this order:

    documents.py   POST/GET /v1/documents, GET/DELETE /v1/documents/{id}
    ask.py         POST /v1/ask (JSON, or SSE with stream=true)
    openai.py      POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}]
    ops.py         GET /healthz, /readyz, /metrics
    packs.py       GET /v1/packs (cache state: cold, prefilling N%, memory, store)
    ui.py          GET / and /ui/<file>: the web interface (rag_service/web/)

Routes are module-level functions that take what they need as dependencies (../deps.py) and
raise errors of the one hierarchy (rag_service/errors.py); no logic of the core lives here.

Tests: `.venv/bin/python -m pytest -q tests/service/test_api.py tests/service/test_hardening.py`.
"""

from dsa_rag.rag_service.serve.routes import ask, documents, openai, ops, packs, ui

ROUTERS = (documents.router, packs.router, ask.router, openai.router, ops.router, ui.router)
