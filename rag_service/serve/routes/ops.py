"""Operations: liveness, readiness and Prometheus metrics (open routes: no API key needed).

    GET /healthz    200 while the process serves HTTP (with the backend's checks)
    GET /readyz     200 when Redis is reachable and the model replicas are loaded, else 503
    GET /metrics    Prometheus text format (metrics.py), with the current model replica count

Tests: `.venv/bin/python -m pytest -q tests/service/test_api.py -k "health or metrics"`.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from dsa_rag.rag_service.serve.deps import BackendDep, MetricsDep
from dsa_rag.rag_service.serve.schemas_api import Health

log = logging.getLogger(__name__)
router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process serves HTTP")
async def healthz(backend: BackendDep):
    return Health(status="ok", checks=await backend.health())


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}},
            summary="Readiness: Redis reachable and model replicas loaded")
async def readyz(backend: BackendDep):
    try:
        checks = await backend.ready()
    except Exception as e:  # noqa: BLE001 - not ready, and the check says why
        checks = {"backend": f"error: {e}"}
    ok = all(v == "ok" for v in checks.values())
    h = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(h.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prom(backend: BackendDep, metrics: MetricsDep):
    try:
        metrics.replicas.set(await backend.replicas())
    except Exception:  # noqa: BLE001 - a scrape must not fail because the controller is busy
        log.debug("replica count unavailable", exc_info=True)
    data, ctype = metrics.render()
    return Response(data, media_type=ctype)
