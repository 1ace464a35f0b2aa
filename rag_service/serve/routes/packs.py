"""Packs and their prefix-cache state, for people waiting on a cold pack and for dashboards.

    GET /v1/packs    -> {"object": "list", "data": [PackStatus, ...]}   (the tenant's packs)

Each pack is `cold` (the next question prefills it), `prefilling` (now: done_tokens, percent,
eta_s), `memory` (warm in a model replica) or `store` (a KV-store entry a replica restores in
seconds). Without Ray the one in-process replica reports memory and prefilling; with Ray the
ingress reads what the model replicas publish to Redis (their prefills' progress, the packs each
holds warm, with the replica id; ask/cachestate.py), and a replica that died stops showing once
its entries expire (30 s). Only the tenant's own packs are listed (`backend.pack_states(tenant)`).

Tests: `.venv/bin/python -m pytest -q tests/service/test_progress.py tests/service/test_ui_api.py
tests/service/test_ray.py`.
"""

from __future__ import annotations

from fastapi import APIRouter

from dsa_rag.rag_service.serve.deps import BackendDep, TenantDep
from dsa_rag.rag_service.serve.schemas_api import PackList, PackStatus

router = APIRouter(tags=["packs"])


@router.get("/v1/packs", response_model=PackList, summary="The tenant's packs and where their prefix KV caches are")
async def list_packs(backend: BackendDep, tenant: TenantDep):
    return PackList(data=[PackStatus(**p) for p in await backend.pack_states(tenant)])
