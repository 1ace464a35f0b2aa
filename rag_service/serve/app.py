"""FastAPI routes (thin): documents, /v1/ask, the OpenAI-compatible API, health and metrics.

    from dsa_rag.rag_service.serve.app import create_app
    from dsa_rag.rag_service.serve.backend import InProcessBackend
    app = create_app(InProcessBackend(ServeSettings(data_dir="/tmp/rag")))   # no Ray
    # uvicorn: `python -m dsa_rag.rag_service.cli serve --no-ray`; Ray Serve: rag_service/serve/deployments.py

Routes call the backend (pipeline + engine in-process, or Ray Serve handles) and shape the
response; no logic lives here. Errors of the core (`RagError`) map to their HTTP status with an
OpenAI-style body {"error": {"message", "type", "code", ...}}, so the openai client raises a
typed error that carries our message.

Auth and limits (guard.py, before routing): with `api_keys` set, `Authorization: Bearer <key>`
selects the tenant (401 without, 403 for another tenant's document id); without keys the
service runs open and the tenant is `X-Tenant` (default "default"). Per key: a rate limit (429
with Retry-After) and at most `max_streams_per_key` open SSE streams (429). Body size (413) and
content type (415) are checked before parsing; validation errors are 422 with the field named.

    POST   /v1/documents            multipart, field `files` (repeatable) or `file` -> ids + per-file results
    GET    /v1/documents            GET/DELETE /v1/documents/{id}
    POST   /v1/ask                  {question, document_ids?, max_tokens, temperature, stream}
    POST   /v1/chat/completions     POST /v1/completions     GET /v1/models[/{id}]
    GET    /healthz  /readyz  /metrics

Tests: `.venv/bin/python -m pytest -q tests/service/test_api.py`.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager

import asyncio

import redis
from fastapi import Depends, FastAPI, File, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsa_rag.rag_service.errors import (BadRequest, DocumentTooLarge, LimitExceeded, ModelNotFound, NotFound, OtherTenant,
                                       RagError)
from dsa_rag.rag_service.schemas import DocumentInfo, IngestResult
from dsa_rag.rag_service.serve import sse as S
from dsa_rag.rag_service.ask.fanout import ask, ask_events
from dsa_rag.rag_service.serve.guard import Guard, StreamSlots
from dsa_rag.rag_service.serve.metrics import Metrics
from dsa_rag.rag_service.serve.schemas_api import (
    AskRequest, AskResponse, ChatChoice, ChatChoiceMessage, ChatCompletionRequest, ChatCompletionResponse,
    CompletionChoice, CompletionRequest, CompletionResponse, DeleteResponse, DocumentList, ErrorResponse, Health,
    ModelCard, ModelList, OpenAIUsage, PromptTokensDetails, UploadResponse,
)

log = logging.getLogger(__name__)

_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 413, 415, 422, 429, 503)}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable", 507: "insufficient_storage"}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 400: "bad_request"}
_bearer = HTTPBearer(auto_error=False, description="API key (DSA_RAG_API_KEYS); not needed when none is configured")


def _error(status: int, code: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    detail = {"message": message, "type": _TYPES.get(status, "server_error"), "code": code}
    detail.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


def _rag_error(e: RagError) -> JSONResponse:
    return _error(e.status_code, e.code, str(e), headers=e.headers, filename=e.filename)




def create_app(backend, metrics: Metrics | None = None) -> FastAPI:
    """The FastAPI app over `backend` (see backend.py). `backend.start()` runs at startup."""
    s = backend.settings
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        try:
            yield
        finally:
            await backend.close()

    app = FastAPI(
        title="DSA long-document RAG", version="0.1.0", lifespan=lifespan,
        description="Upload documents, ask questions answered by a DeepSeek Sparse Attention model from "
                    "whole-document packs whose prefix KV caches are reused; OpenAI-compatible endpoints.",
    )
    app.state.backend, app.state.metrics = backend, metrics
    app.add_middleware(Guard, settings=s, metrics=metrics)
    streams = app.state.streams = StreamSlots(s.max_streams_per_key)
    background: set[asyncio.Task] = set()  # strong refs to prefill tasks until they finish

    def _prefetch_done(task: asyncio.Task) -> None:
        background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background prefill failed: %s", task.exception())

    # --- errors --------------------------------------------------------------------------------
    @app.exception_handler(RagError)
    async def _on_rag_error(request: Request, e: RagError):
        if isinstance(e, OtherTenant) and not s.auth_enabled:  # open mode: tenants are namespaces, no leak
            e = NotFound(e.not_found)
        return _rag_error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, _HTTP_CODES.get(e.status_code, "http_error"), str(e.detail),
                      headers=getattr(e, "headers", None))

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _on_redis_down(request: Request, e: Exception):
        log.warning("Redis unavailable on %s %s: %s", request.method, request.url.path, e)
        return _error(503, "storage_error", "the metadata store (Redis) is unavailable; retry in a few seconds",
                      headers={"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def _on_bug(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return _error(500, "internal_error", f"internal error ({type(e).__name__}); see the server log")

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        body = {"error": {"message": f"{where}: {first.get('msg', 'invalid request')}" if where else
                          first.get("msg", "invalid request"), "type": "invalid_request_error",
                          "code": "validation_error", "param": where or None},
                "detail": [{k: v for k, v in x.items() if k in ("loc", "msg", "type")} for x in errs]}
        return JSONResponse(body, status_code=422)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        resp = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "other"), str(resp.status_code)).inc()
        return resp

    def tenant_of(request: Request, _key=Depends(_bearer),
                  x_tenant: str | None = Header(None, description="the tenant in open mode (no API keys); "
                                                                  "ignored when API keys are configured")) -> str:
        return request.state.tenant  # resolved by the Guard (the API key's tenant, or X-Tenant when open)

    def principal_of(request: Request) -> str:
        return request.state.principal

    def _question(text: str) -> str:
        if len(text) > s.max_question_chars:
            raise LimitExceeded(f"the question has {len(text)} characters; the limit is {s.max_question_chars} "
                                "(DSA_RAG_MAX_QUESTION_CHARS)")
        return text

    # --- documents ------------------------------------------------------------------------------
    @app.post("/v1/documents", response_model=UploadResponse, responses=_ERRORS, tags=["documents"],
              summary="Upload one or many documents (PDF, text, Markdown)")
    async def upload(files: list[UploadFile] | None = File(None, description="repeat the field for several files"),
                     file: UploadFile | None = File(None, description="a single file (alternative field name)"),
                     prefill: bool = Query(False, description="prefill the new documents' packs in the background "
                                                              "(on the replicas questions will be routed to)"),
                     tenant: str = Depends(tenant_of)):
        ups = list(files or []) + ([file] if file is not None else [])
        if not ups:
            raise BadRequest("no file in the upload; send multipart/form-data with one or more `files` fields")
        if len(ups) > s.max_files_per_upload:
            raise BadRequest(f"{len(ups)} files in one upload; the limit is {s.max_files_per_upload} "
                             "(DSA_RAG_MAX_FILES_PER_UPLOAD)")
        batch, too_big = [], {}
        for i, up in enumerate(ups):
            name = up.filename or f"upload-{i}"
            data = await up.read(s.upload_max_bytes + 1)
            if len(data) > s.upload_max_bytes:
                too_big[i] = DocumentTooLarge(f"upload is over the limit of {s.upload_max_bytes} bytes "
                                              "(DSA_RAG_UPLOAD_MAX_BYTES)", filename=name)
            batch.append((name, data))
        ok_batch = [(i, b) for i, b in enumerate(batch) if i not in too_big]
        results = await backend.ingest([b for _, b in ok_batch], tenant) if ok_batch else []
        by_index = dict(zip([i for i, _ in ok_batch], results))
        out: list[IngestResult] = []
        for i, (name, _) in enumerate(batch):
            if i in too_big:
                e = too_big[i]
                out.append(IngestResult(name=name, ok=False, error=e.code, message=str(e), status_code=e.status_code))
            else:
                out.append(by_index[i])
        body = UploadResponse(ids=[r.document.id for r in out if r.ok], data=out)
        if prefill and body.ids:
            packs = list(dict.fromkeys(p for r in out if r.ok for p in r.document.packs))
            task = asyncio.get_running_loop().create_task(backend.prefetch(packs))
            background.add(task)
            task.add_done_callback(_prefetch_done)
        if not body.ids:  # every file failed: the first failure's status, with the per-file results
            first = out[0]
            return JSONResponse({"error": {"message": first.message, "type": _TYPES.get(first.status_code or 500,
                                 "server_error"), "code": first.error, "filename": first.name},
                                 **body.model_dump()}, status_code=first.status_code or 500)
        return body

    @app.get("/v1/documents", response_model=DocumentList, tags=["documents"])
    async def list_documents(tenant: str = Depends(tenant_of)):
        return DocumentList(data=await backend.list_documents(tenant))

    @app.get("/v1/documents/{document_id}", response_model=DocumentInfo, responses=_ERRORS, tags=["documents"])
    async def get_document(document_id: str, tenant: str = Depends(tenant_of)):
        return await backend.get_document(document_id, tenant)

    @app.delete("/v1/documents/{document_id}", response_model=DeleteResponse, responses=_ERRORS, tags=["documents"])
    async def delete_document(document_id: str, tenant: str = Depends(tenant_of)):
        r = await backend.delete_document(document_id, tenant)
        return DeleteResponse(id=document_id, **r)

    # --- ask -------------------------------------------------------------------------------------
    def _max_tokens(*vals) -> int:
        for v in vals:
            if v is not None:
                if int(v) > s.max_new_tokens:
                    raise LimitExceeded(f"max_tokens {int(v)} is over the limit of {s.max_new_tokens} "
                                        "(DSA_RAG_MAX_NEW_TOKENS); ask for fewer tokens")
                return int(v)
        return min(s.default_max_tokens, s.max_new_tokens)

    @app.post("/v1/ask", response_model=AskResponse, responses={**_ERRORS, 200: {
        "content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}}, tags=["ask"])
    async def ask_route(req: AskRequest, tenant: str = Depends(tenant_of), principal: str = Depends(principal_of)):
        args = (_question(req.question), req.document_ids, _max_tokens(req.max_tokens), req.temperature,
                tenant, req.seed)
        if not req.stream:
            return AskResponse(**await ask(backend, metrics, *args, retries=s.stream_retries))
        slot = streams.acquire(principal)
        events = ask_events(backend, metrics, *args, retries=s.stream_retries)
        try:
            await events.__anext__()  # pack selection: its errors become a proper HTTP status
        except BaseException:
            slot.release()
            raise

        async def body():
            try:
                async for ev in events:
                    if ev["event"] == "token":
                        if ev["text"]:
                            yield S.sse({"type": "token", "text": ev["text"], "pack_id": ev["pack_id"],
                                         "logprob": ev["logprob"]})
                    elif ev["event"] == "done":
                        done = AskResponse(**ev).model_dump(mode="json")
                        yield S.sse({"type": "citations", **done})
            except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
                yield S.sse({"type": "error", "error": _error_dict(e)})
            finally:
                slot.release()
            yield S.DONE

        return StreamingResponse(body(), media_type="text/event-stream", headers=S.SSE_HEADERS)

    # --- OpenAI-compatible ----------------------------------------------------------------------
    def _check_model(model: str) -> None:
        if model != s.model_id:
            raise ModelNotFound(f"model {model!r} does not exist; this service serves {s.model_id!r} (GET /v1/models)")

    def _usage(u: dict) -> OpenAIUsage:
        return OpenAIUsage(prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                           total_tokens=u["prompt_tokens"] + u["completion_tokens"],
                           prompt_tokens_details=PromptTokensDetails(cached_tokens=u["cached_tokens"]))

    async def _openai(req, question: str, tenant: str, chat: bool, principal: str):
        _check_model(req.model)
        if req.n != 1:
            raise BadRequest("only n=1 is supported")
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or None)
        args = (_question(question), req.document_ids, _max_tokens(req.max_completion_tokens, req.max_tokens),
                req.temperature or 0.0, tenant, req.seed, stop, req.top_p or 1.0)
        if not req.stream:
            r = await ask(backend, metrics, *args, retries=s.stream_retries)
            if chat:
                return ChatCompletionResponse(model=req.model, usage=_usage(r["usage"]), citations=r["citations"],
                                              choices=[ChatChoice(message=ChatChoiceMessage(content=r["answer"]),
                                                                  finish_reason=r["finish_reason"])])
            return CompletionResponse(model=req.model, usage=_usage(r["usage"]), citations=r["citations"],
                                      choices=[CompletionChoice(text=r["answer"], finish_reason=r["finish_reason"])])
        slot = streams.acquire(principal)
        events = ask_events(backend, metrics, *args, retries=s.stream_retries)
        try:
            await events.__anext__()
        except BaseException:
            slot.release()
            raise
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(text: str | None, finish=None, first=False, **extra) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return S.sse({"id": cid, "object": obj, "created": created, "model": req.model,
                          "choices": [choice], **extra})

        async def body():
            if chat:
                yield chunk(None, first=True)
            try:
                async for ev in events:
                    if ev["event"] == "token" and ev["text"]:
                        yield chunk(ev["text"])
                    elif ev["event"] == "done":
                        cites = [c.model_dump(mode="json") for c in ev["citations"]]
                        yield chunk(None, finish=ev["finish_reason"], citations=cites)
                        if include_usage:
                            yield S.sse({"id": cid, "object": obj, "created": created, "model": req.model,
                                         "choices": [], "usage": _usage(ev["usage"]).model_dump()})
            except Exception as e:  # noqa: BLE001
                yield S.sse({"error": _error_dict(e)})
            finally:
                slot.release()
            yield S.DONE

        return StreamingResponse(body(), media_type="text/event-stream", headers=S.SSE_HEADERS)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS, tags=["openai"],
              summary="OpenAI chat completions; the stored corpus is the context, the last user message the question")
    async def chat_completions(req: ChatCompletionRequest, tenant: str = Depends(tenant_of),
                               principal: str = Depends(principal_of)):
        question = _last_user_text(req.messages)
        return await _openai(req, question, tenant, chat=True, principal=principal)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS, tags=["openai"],
              summary="OpenAI completions; the prompt is the question over the stored corpus")
    async def completions(req: CompletionRequest, tenant: str = Depends(tenant_of),
                          principal: str = Depends(principal_of)):
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise BadRequest("prompt must be a string or a list of exactly one string")
            prompt = prompt[0]
        if not prompt.strip():
            raise BadRequest("prompt is empty")
        return await _openai(req, prompt, tenant, chat=False, principal=principal)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def models():
        return ModelList(data=[ModelCard(id=s.model_id)])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=_ERRORS, tags=["openai"])
    async def model(model_id: str):
        _check_model(model_id)
        return ModelCard(id=model_id)

    # --- health / metrics -----------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["ops"], summary="Liveness: the process serves HTTP")
    async def healthz():
        return Health(status="ok", checks=await backend.health())

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}}, tags=["ops"],
             summary="Readiness: Redis reachable and model replicas loaded")
    async def readyz():
        try:
            checks = await backend.ready()
        except Exception as e:  # noqa: BLE001
            checks = {"backend": f"error: {e}"}
        ok = all(v == "ok" for v in checks.values())
        h = Health(status="ok" if ok else "unavailable", checks=checks)
        return JSONResponse(h.model_dump(), status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    async def prom():
        try:
            metrics.replicas.set(await backend.replicas())
        except Exception:  # noqa: BLE001 - a scrape must not fail because the controller is busy
            log.debug("replica count unavailable", exc_info=True)
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    return app


def _last_user_text(messages) -> str:
    for m in reversed(messages):
        if m.role == "user":
            c = m.content
            text = c if isinstance(c, str) else " ".join(
                p.get("text", "") for p in (c or []) if isinstance(p, dict) and p.get("type") == "text")
            if text and text.strip():
                return text
    raise BadRequest("messages hold no user message with text; the last user message is the question")


def _error_dict(e: Exception) -> dict:
    if isinstance(e, RagError):
        return {"message": str(e), "type": _TYPES.get(e.status_code, "server_error"), "code": e.code}
    log.exception("error while streaming an answer", exc_info=e)
    return {"message": f"internal error ({type(e).__name__}: {e})", "type": "server_error", "code": "internal_error"}

