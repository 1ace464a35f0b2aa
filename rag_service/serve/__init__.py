"""The serving layer: FastAPI app and routers (app.py, routes/), dependencies (deps.py), API
schemas (schemas_api.py), the Ray Serve deployments and their backend (deployments.py), the
cache-affinity request router (router.py), Prometheus metrics (metrics.py) and SSE framing
(sse.py). Thin shells around `dsa_rag.rag_service.pipeline` and `dsa_rag.rag_service.ask`; the
in-process backend is `dsa_rag.rag_service.ask.local.LocalBackend`.

    python -m dsa_rag.rag_service.cli serve            # Ray Serve on 127.0.0.1:8000
    python -m dsa_rag.rag_service.cli serve --no-ray   # the same API in one process (uvicorn)
"""
