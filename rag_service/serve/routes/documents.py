"""Documents: upload (one or many files, multipart), list, get, delete; all within the tenant.

    POST   /v1/documents[?prefill=true]   fields `files` (repeatable) or `file` -> ids + per-file results
    GET    /v1/documents                  GET/DELETE /v1/documents/{document_id}
    GET    /v1/documents/{document_id}/text?start=&end=   a window of the extracted text + its pages

An upload answers 200 when at least one file was stored, each file with its own result (a bad
file never sinks the batch); when every file failed, the first failure's status and error, with
the per-file results (`UploadFailed`). The upload limits are the `UploadsDep` dependency's.

Tests: `.venv/bin/python -m pytest -q tests/service/test_api.py -k "document or upload"`.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from fastapi import APIRouter, Query, Request

from dsa_rag.rag_service.errors import UploadFailed
from dsa_rag.rag_service.schemas import DocumentInfo, IngestResult
from dsa_rag.rag_service.serve.deps import BackendDep, SettingsDep, TenantDep, UploadsDep
from dsa_rag.rag_service.serve.errors import ERROR_RESPONSES
from dsa_rag.rag_service.serve.schemas_api import DeleteResponse, DocumentList, DocumentText, UploadResponse

log = logging.getLogger(__name__)
router = APIRouter(tags=["documents"])


@router.post("/v1/documents", response_model=UploadResponse, responses=ERROR_RESPONSES,
             summary="Upload one or many documents (PDF, text, Markdown)")
async def upload(request: Request, uploads: UploadsDep, backend: BackendDep, tenant: TenantDep,
                 settings: SettingsDep,
                 prefill: bool = Query(False, description="prefill the new documents' packs in the background "
                                                          "(on the replicas questions will be routed to); "
                                                          "always on with the `warm_on_upload` setting")):
    ok = [u for u in uploads if u.error is None]
    stored = iter(await backend.ingest([(u.name, u.data) for u in ok], tenant) if ok else [])
    out: list[IngestResult] = [
        next(stored) if u.error is None else
        IngestResult(name=u.name, ok=False, error=u.error.code, message=str(u.error), status_code=u.error.status_code)
        for u in uploads
    ]
    body = UploadResponse(ids=[r.document.id for r in out if r.ok], data=out)
    if not body.ids:  # every file failed: the first failure's status, with the per-file results
        first = out[0]
        raise UploadFailed(first.message, status_code=first.status_code or 500, code=first.error,
                           filename=first.name, response=body.model_dump())
    if prefill or settings.warm_on_upload:
        packs = list(dict.fromkeys(p for r in out if r.ok for p in r.document.packs))
        _in_background(request.app.state.background, backend.prefetch(packs))
    return body


@router.get("/v1/documents", response_model=DocumentList)
async def list_documents(backend: BackendDep, tenant: TenantDep):
    return DocumentList(data=await backend.list_documents(tenant))


@router.get("/v1/documents/{document_id}", response_model=DocumentInfo, responses=ERROR_RESPONSES)
async def get_document(document_id: str, backend: BackendDep, tenant: TenantDep):
    return await backend.get_document(document_id, tenant)


@router.get("/v1/documents/{document_id}/text", response_model=DocumentText, responses=ERROR_RESPONSES,
            summary="A window of the document's extracted text (what citation offsets index), with its pages")
async def document_text(document_id: str, backend: BackendDep, tenant: TenantDep,
                        start: int = Query(0, ge=0), end: int | None = Query(None, ge=0)):
    return DocumentText(**await backend.document_text(document_id, tenant, start, end))


@router.delete("/v1/documents/{document_id}", response_model=DeleteResponse, responses=ERROR_RESPONSES)
async def delete_document(document_id: str, backend: BackendDep, tenant: TenantDep):
    r = await backend.delete_document(document_id, tenant)
    return DeleteResponse(id=document_id, **r)


def _in_background(tasks: set[asyncio.Task], coro) -> None:
    """Run `coro` after the response; `tasks` holds it (a strong reference) until it is done."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(partial(_done, tasks))


def _done(tasks: set[asyncio.Task], task: asyncio.Task) -> None:
    tasks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("background prefill failed: %s", task.exception())
