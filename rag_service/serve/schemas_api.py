"""Request and response models of the REST API (our /v1/ask and documents routes, and the
OpenAI-compatible /v1/chat/completions, /v1/completions, /v1/models). Limits live in `Field(...)`
so they show up in the OpenAPI schema and FastAPI rejects bad input with 422 before any work.
The limits that depend on runtime settings (question length under `max_question_chars`,
max_tokens under `max_new_tokens`) are checked once, in the `ask_params` dependencies of
rag_service/serve/deps.py (for the OpenAI requests, against what `question_text()` and
`requested_max_tokens()` return here).

The core's own models (DocumentInfo, Citation, IngestResult) are reused from `dsa_rag.rag_service.schemas`.

    .venv/bin/python -c "from dsa_rag.rag_service.serve.schemas_api import AskRequest; print(AskRequest(question='hi'))"
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dsa_rag.rag_service.errors import BadRequest
from dsa_rag.rag_service.schemas import Citation, DocumentInfo, IngestResult, PageSpan

QUESTION_MAX_CHARS = 8192
MAX_DOCUMENT_IDS = 256
MAX_TOKENS_LIMIT = 32768  # the settings' max_new_tokens is the effective (lower) bound
MAX_STOP = 4


# ------------------------------------------------------------------ errors
class ErrorDetail(BaseModel):
    message: str
    type: str = Field(..., description="error class, e.g. invalid_request_error, not_found")
    code: str = Field(..., description="stable machine code, e.g. encrypted_document")
    param: str | None = None
    filename: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI-style error body, so the openai client raises a typed error with our message."""

    error: ErrorDetail


# ------------------------------------------------------------------ documents
class DocumentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DocumentInfo]


class UploadResponse(BaseModel):
    """One entry per uploaded file, in order; `ids` holds the ids of the files that succeeded."""

    ids: list[str]
    data: list[IngestResult]


class DeleteResponse(BaseModel):
    id: str
    object: Literal["document"] = "document"
    deleted: bool = True
    removed_packs: list[str] = Field(default_factory=list)
    rebuilt_packs: list[str] = Field(default_factory=list)


class DocumentText(BaseModel):
    """A window of a document's extracted text (what citations' character offsets index)."""

    id: str
    start: int = Field(..., ge=0)
    end: int = Field(..., ge=0)
    chars: int = Field(..., ge=0, description="length of the whole extracted text")
    text: str
    pages: list[PageSpan] = Field(default_factory=list, description="pages that overlap the window")


# ------------------------------------------------------------------ packs
class PackStatus(BaseModel):
    """A pack and where its prefix KV cache is: `cold` (nowhere: the next question prefills it),
    `prefilling` (now, with progress), `memory` (warm in a model replica), `store` (in the KV
    store: a replica restores it in seconds)."""

    id: str
    state: Literal["cold", "prefilling", "memory", "store"]
    tokens: int = Field(..., ge=0, description="prompt prefix length")
    capacity: int = Field(..., ge=1)
    stored: bool = Field(False, description="a KV-store entry exists for the pack")
    documents: list[str] = Field(default_factory=list, description="document ids in the pack")
    done_tokens: int | None = Field(None, ge=0, description="prefilling: tokens cached so far")
    percent: float | None = Field(None, ge=0, le=100, description="prefilling: done_tokens / tokens")
    eta_s: float | None = Field(None, description="prefilling: seconds left at the rate so far")
    replica: str | None = None


class PackList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PackStatus]


# ------------------------------------------------------------------ ask
class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(..., min_length=1, max_length=QUESTION_MAX_CHARS)
    document_ids: list[str] | None = Field(
        None, max_length=MAX_DOCUMENT_IDS, description="restrict the answer to these documents"
    )
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, description="tokens to generate per pack")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    stream: bool = False
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    abstain: bool = Field(True, description="say 'Not in the documents.' when the cited evidence does not "
                          "support the answer (a stream then holds the tokens until the answer is scored)")

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the question is blank")
        return v


class Usage(BaseModel):
    prompt_tokens: int = Field(0, ge=0, description="all packs' prompt prefixes + question tokens")
    cached_tokens: int = Field(0, ge=0, description="prompt tokens served from a prefix cache")
    completion_tokens: int = Field(0, ge=0)


class PackAnswer(BaseModel):
    """What one pack contributed: its answer, model score and citations."""

    pack_id: str
    answer: str
    score: float = Field(..., description="mean log-prob of the answer tokens (higher is better)")
    cache: Literal["memory", "store", "prefill"] = Field(..., description="where the prefix KV came from")
    replica: str = Field("", description="the model replica that answered")
    node: str = Field("", description="the Ray node it runs on (empty without Ray)")
    finish_reason: Literal["stop", "length"] = "stop"
    citations: list[Citation] = Field(default_factory=list)
    support: float | None = Field(None, ge=0, le=1, description="how well the cited evidence supports the answer")
    abstained: bool = False


class AskResponse(BaseModel):
    answer: str
    pack_id: str | None = Field(None, description="the pack the answer came from")
    score: float | None = None
    finish_reason: Literal["stop", "length"] = "stop"
    citations: list[Citation] = Field(default_factory=list, description="best pack's first, then the others'")
    abstained: bool = Field(False, description="the documents do not support an answer: `answer` is "
                            "'Not in the documents.' and no citation is given")
    support: float | None = Field(None, ge=0, le=1, description="support score of the chosen pack's answer "
                                  "(question and answer terms found in its cited sentences)")
    packs: list[PackAnswer] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    timings: dict[str, float] = Field(default_factory=dict, description="seconds: select, first_token, total")


# ------------------------------------------------------------------ OpenAI-compatible
class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = Field(None, description="text, or OpenAI content parts (text parts used)")
    name: str | None = Field(None, max_length=256)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIBase(BaseModel):
    # Unknown OpenAI fields (logit_bias, user, response_format, ...) are accepted and ignored so
    # the openai client and LangChain's ChatOpenAI work unchanged.
    model_config = ConfigDict(extra="allow")

    model: str = Field("dsa-tiny", max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP, description="up to 4 stop strings (trimmed from the output)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    document_ids: list[str] | None = Field(None, max_length=MAX_DOCUMENT_IDS, description="extension: restrict the context")
    abstain: bool = Field(True, description="extension: 'Not in the documents.' for an unsupported answer")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v):
        if v is not None and any(not s for s in ([v] if isinstance(v, str) else v)):
            raise ValueError("a stop string is empty")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)

    def question_text(self) -> str:
        """The last user message with text (its text parts joined); 400 when there is none."""
        for m in reversed(self.messages):
            if m.role == "user":
                c = m.content
                text = c if isinstance(c, str) else " ".join(
                    p.get("text", "") for p in (c or []) if isinstance(p, dict) and p.get("type") == "text")
                if text and text.strip():
                    return text
        raise BadRequest("messages hold no user message with text; the last user message is the question")


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str] = Field(..., description="the question (a list must hold exactly one string)")

    def question_text(self) -> str:
        """The prompt (a list must hold exactly one string); 400 when it is empty."""
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise BadRequest("prompt must be a string or a list of exactly one string")
            prompt = prompt[0]
        if not prompt.strip():
            raise BadRequest("prompt is empty")
        return prompt


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class OpenAIUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"] | None = "stop"
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage
    citations: list[Citation] = Field(default_factory=list, description="extension: where the answer came from")
    abstained: bool = Field(False, description="extension: the documents do not hold the answer")
    support: float | None = Field(None, ge=0, le=1, description="extension: the answer's support score")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = "stop"
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: "cmpl-" + uuid.uuid4().hex[:24])
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage
    citations: list[Citation] = Field(default_factory=list)
    abstained: bool = Field(False, description="extension: the documents do not hold the answer")
    support: float | None = Field(None, ge=0, le=1, description="extension: the answer's support score")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "dsa-rag"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------ health
class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
