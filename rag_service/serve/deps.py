"""FastAPI dependencies of the routes: what a route may take as an argument instead of reaching
for globals or closures.

    async def list_documents(backend: BackendDep, tenant: TenantDep): ...   # routes/documents.py

- `BackendDep`, `SettingsDep`, `MetricsDep`, `StreamsDep`: the objects `create_app` put on
  `app.state` (the backend, its ServeSettings, the Prometheus metrics, the per-key stream slots).
- `TenantDep`: the tenant, which the guard middleware (guard.py) resolved before routing: the
  API key's tenant, or `X-Tenant` in open mode. Declaring the bearer scheme and the X-Tenant
  header here puts both into the OpenAPI schema. `PrincipalDep`: who counts against the per-key
  limits (`key:<key>` or `tenant:<name>`).
- `AskQuestion`, `ChatQuestion`, `CompletionQuestion`: a question route's body (`.req`) and
  the one `AskParams` made of it (`.params`). The limits that depend on runtime settings are
  checked here and nowhere else (`ask_params`): the question (or prompt, or last user message)
  under `max_question_chars`, max_tokens under `max_new_tokens` (422 `limit_exceeded`, naming
  the DSA_RAG_ setting). The static limits are `Field(...)`s of the request models
  (schemas_api.py); the per-key and body size limits are the guard's.
- `KnownModel`: a model id this service serves (404 `model_not_found` otherwise).
- `UploadsDep`: the files of a multipart upload (fields `files`, repeatable, and `file`), read
  within the upload limits of settings: none -> 400, more than `max_files_per_upload` -> 400, a
  file over `upload_max_bytes` -> that file's own `DocumentTooLarge` (413) result, read no
  further than the limit.

Tests: `.venv/bin/python -m pytest -q tests/service/test_api.py tests/service/test_hardening.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, File, Header, Request, UploadFile
from fastapi.security import HTTPBearer

from dsa_rag.model.engine.sampling import SamplingParams
from dsa_rag.rag_service.ask.backend import Backend
from dsa_rag.rag_service.ask.params import AskParams
from dsa_rag.rag_service.errors import BadRequest, DocumentTooLarge, LimitExceeded, ModelNotFound
from dsa_rag.rag_service.serve.guard import StreamSlots
from dsa_rag.rag_service.serve.metrics import Metrics
from dsa_rag.rag_service.serve.schemas_api import AskRequest, ChatCompletionRequest, CompletionRequest
from dsa_rag.rag_service.serve.settings import ServeSettings

_bearer = HTTPBearer(auto_error=False, description="API key (DSA_RAG_API_KEYS); not needed when none is configured")


# ------------------------------------------------------------------ what create_app put on app.state
def get_backend(request: Request) -> Backend:
    return request.app.state.backend


def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_streams(request: Request) -> StreamSlots:
    return request.app.state.streams


BackendDep = Annotated[Backend, Depends(get_backend)]  # LocalBackend (ask/local.py) or RayBackend
SettingsDep = Annotated[ServeSettings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
StreamsDep = Annotated[StreamSlots, Depends(get_streams)]


# ------------------------------------------------------------------ who is asking (resolved by the guard)
def get_tenant(request: Request, _key=Depends(_bearer),
               x_tenant: str | None = Header(None, description="the tenant in open mode (no API keys); "
                                                               "ignored when API keys are configured")) -> str:
    return request.state.tenant


def get_principal(request: Request) -> str:
    return request.state.principal


TenantDep = Annotated[str, Depends(get_tenant)]
PrincipalDep = Annotated[str, Depends(get_principal)]


# ------------------------------------------------------------------ models
def check_model(settings: ServeSettings, model: str) -> str:
    if model != settings.model_id:
        raise ModelNotFound(f"model {model!r} does not exist; this service serves {settings.model_id!r} "
                            "(GET /v1/models)")
    return model


def known_model(model_id: str, settings: SettingsDep) -> str:
    """The path parameter `model_id`, when this service serves it."""
    return check_model(settings, model_id)


KnownModel = Annotated[str, Depends(known_model)]


# ------------------------------------------------------------------ one question's parameters
def ask_params(settings: ServeSettings, tenant: str, question: str, *, document_ids: list[str] | None,
               max_tokens: int | None, temperature: float | None, top_p: float | None = None,
               seed: int | None = None, stop: tuple[str, ...] = (), abstain: bool = True) -> AskParams:
    """One question as `AskParams`, within the limits of `settings` (the one place they are checked)."""
    if len(question) > settings.max_question_chars:
        raise LimitExceeded(f"the question has {len(question)} characters; the limit is "
                            f"{settings.max_question_chars} (DSA_RAG_MAX_QUESTION_CHARS)")
    if max_tokens is None:
        max_tokens = min(settings.default_max_tokens, settings.max_new_tokens)
    elif max_tokens > settings.max_new_tokens:
        raise LimitExceeded(f"max_tokens {max_tokens} is over the limit of {settings.max_new_tokens} "
                            "(DSA_RAG_MAX_NEW_TOKENS); ask for fewer tokens")
    try:
        sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature or 0.0, top_p=top_p or 1.0,
                                  seed=seed, stop=stop)
        return AskParams(question, document_ids=document_ids, tenant=tenant, sampling=sampling, abstain=abstain)
    except ValueError as e:  # what the request models let through and the parameters refuse: still a 4xx
        raise BadRequest(str(e)) from e


# ------------------------------------------------------------------ the question routes
@dataclass(frozen=True)
class Question:
    """A question route's request body (validated) and its `AskParams` (within the limits)."""

    req: AskRequest | ChatCompletionRequest | CompletionRequest
    params: AskParams


def _ask(req: AskRequest, tenant: TenantDep, settings: SettingsDep) -> Question:
    return Question(req, ask_params(settings, tenant, req.question, document_ids=req.document_ids,
                                    max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed,
                                    abstain=req.abstain))


def _openai(req: ChatCompletionRequest | CompletionRequest, tenant: str, settings: ServeSettings) -> Question:
    question = req.question_text()  # a request without a question is a 400 before the model is checked
    check_model(settings, req.model)
    return Question(req, ask_params(settings, tenant, question, document_ids=req.document_ids,
                                    max_tokens=req.requested_max_tokens(), temperature=req.temperature,
                                    top_p=req.top_p, seed=req.seed, stop=req.stop_strings(), abstain=req.abstain))


def _chat(req: ChatCompletionRequest, tenant: TenantDep, settings: SettingsDep) -> Question:
    return _openai(req, tenant, settings)


def _completion(req: CompletionRequest, tenant: TenantDep, settings: SettingsDep) -> Question:
    return _openai(req, tenant, settings)


# The body is declared by these dependencies only (not by the route too: FastAPI would validate
# it twice and, when it is bad, report every error twice).
AskQuestion = Annotated[Question, Depends(_ask)]
ChatQuestion = Annotated[Question, Depends(_chat)]
CompletionQuestion = Annotated[Question, Depends(_completion)]


# ------------------------------------------------------------------ uploads
@dataclass
class Upload:
    """One uploaded file: its bytes, or (over the size limit) the error that is its result."""

    name: str
    data: bytes
    error: DocumentTooLarge | None = None


async def read_uploads(
    settings: SettingsDep,
    files: list[UploadFile] | None = File(None, description="repeat the field for several files"),
    file: UploadFile | None = File(None, description="a single file (alternative field name)"),
) -> list[Upload]:
    ups = list(files or []) + ([file] if file is not None else [])
    if not ups:
        raise BadRequest("no file in the upload; send multipart/form-data with one or more `files` fields")
    if len(ups) > settings.max_files_per_upload:
        raise BadRequest(f"{len(ups)} files in one upload; the limit is {settings.max_files_per_upload} "
                         "(DSA_RAG_MAX_FILES_PER_UPLOAD)")
    out = []
    for i, up in enumerate(ups):
        name = up.filename or f"upload-{i}"
        data = await up.read(settings.upload_max_bytes + 1)
        too_big = None
        if len(data) > settings.upload_max_bytes:
            too_big = DocumentTooLarge(f"upload is over the limit of {settings.upload_max_bytes} bytes "
                                       "(DSA_RAG_UPLOAD_MAX_BYTES)", filename=name)
        out.append(Upload(name, data, too_big))
    return out


UploadsDep = Annotated[list[Upload], Depends(read_uploads)]
