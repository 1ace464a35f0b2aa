"""The OpenAI-compatible API: the stored corpus is the context, the question is the prompt
(/v1/completions) or the last user message (/v1/chat/completions); `document_ids` (extension)
restricts the context, `citations` (extension) says where the answer came from and `abstained` /
`support` (extensions) whether the documents hold the answer ("Not in the documents." when not). The openai
client and LangChain's ChatOpenAI work unchanged, streaming (SSE chunks, then [DONE];
`stream_options.include_usage` adds a last chunk with usage and no choices) included. While a
cold pack is prefilled the stream carries `: progress {...}` SSE comments (../sse.py), which
standard clients skip.

    POST /v1/chat/completions     POST /v1/completions     GET /v1/models     GET /v1/models/{model_id}

The body becomes one `AskParams` in the `ChatQuestion` / `CompletionQuestion` dependencies
(deps.py): 400 without a question, 404 `model_not_found` for another model, 422 over a limit.

Tests: `.venv/bin/python -m pytest -q tests/service/test_api.py -k openai`.
"""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from dsa_rag.rag_service.ask.fanout import ask, ask_events
from dsa_rag.rag_service.serve import sse as S
from dsa_rag.rag_service.serve.deps import (BackendDep, ChatQuestion, CompletionQuestion, KnownModel, MetricsDep,
                                            PrincipalDep, Question, SettingsDep, StreamsDep)
from dsa_rag.rag_service.serve.errors import ERROR_RESPONSES, stream_error
from dsa_rag.rag_service.serve.guard import StreamSlot, StreamSlots
from dsa_rag.rag_service.serve.metrics import Metrics
from dsa_rag.rag_service.serve.routes.ask import open_stream
from dsa_rag.rag_service.serve.schemas_api import (
    ChatChoice, ChatChoiceMessage, ChatCompletionResponse, CompletionChoice, CompletionResponse, ModelCard, ModelList,
    OpenAIUsage, PromptTokensDetails,
)
from dsa_rag.rag_service.serve.settings import ServeSettings

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES,
             summary="OpenAI chat completions; the stored corpus is the context, the last user message the question")
async def chat_completions(q: ChatQuestion, backend: BackendDep, metrics: MetricsDep, settings: SettingsDep,
                           streams: StreamsDep, principal: PrincipalDep):
    if q.req.stream:
        return await _stream(q, backend, metrics, settings, streams, principal, chat=True)
    r = await ask(backend, metrics, q.params, retries=settings.stream_retries)
    return ChatCompletionResponse(model=q.req.model, usage=_usage(r["usage"]), citations=r["citations"],
                                  abstained=r["abstained"], support=r["support"],
                                  choices=[ChatChoice(message=ChatChoiceMessage(content=r["answer"]),
                                                      finish_reason=r["finish_reason"])])


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES,
             summary="OpenAI completions; the prompt is the question over the stored corpus")
async def completions(q: CompletionQuestion, backend: BackendDep, metrics: MetricsDep, settings: SettingsDep,
                      streams: StreamsDep, principal: PrincipalDep):
    if q.req.stream:
        return await _stream(q, backend, metrics, settings, streams, principal, chat=False)
    r = await ask(backend, metrics, q.params, retries=settings.stream_retries)
    return CompletionResponse(model=q.req.model, usage=_usage(r["usage"]), citations=r["citations"],
                              abstained=r["abstained"], support=r["support"],
                              choices=[CompletionChoice(text=r["answer"], finish_reason=r["finish_reason"])])


@router.get("/v1/models", response_model=ModelList)
async def models(settings: SettingsDep):
    return ModelList(data=[ModelCard(id=settings.model_id)])


@router.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def model(model_id: KnownModel):
    return ModelCard(id=model_id)


# ------------------------------------------------------------------ helpers
def _usage(u: dict) -> OpenAIUsage:
    return OpenAIUsage(prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                       total_tokens=u["prompt_tokens"] + u["completion_tokens"],
                       prompt_tokens_details=PromptTokensDetails(cached_tokens=u["cached_tokens"]))


async def _stream(q: Question, backend, metrics: Metrics, settings: ServeSettings, streams: StreamSlots,
                  principal: str, *, chat: bool):
    events = ask_events(backend, metrics, q.params, retries=settings.stream_retries)
    slot = await open_stream(streams, principal, events)
    chunks = _Chunks(q.req.model, chat)
    include_usage = bool(q.req.stream_options and q.req.stream_options.include_usage)
    return StreamingResponse(_openai_sse(events, slot, chunks, include_usage), media_type="text/event-stream",
                             headers=S.SSE_HEADERS)


class _Chunks:
    """The SSE chunks of one streamed completion (one id, created time and model for all)."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def frame(self, choices: list[dict], **extra) -> bytes:
        return S.sse({"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                      "choices": choices, **extra})

    def text(self, text: str | None, finish=None, first=False, **extra) -> bytes:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return self.frame([choice], **extra)


async def _openai_sse(events: AsyncIterator[dict], slot: StreamSlot, chunks: _Chunks, include_usage: bool):
    if chunks.chat:
        yield chunks.text(None, first=True)
    try:
        async for ev in events:
            if ev["event"] == "token" and ev["text"]:
                yield chunks.text(ev["text"])
            elif ev["event"] == "progress":  # an SSE comment: standard clients skip it (see ../sse.py)
                yield S.comment("progress", {k: v for k, v in ev.items() if k != "event"})
            elif ev["event"] == "done":
                cites = [c.model_dump(mode="json") for c in ev["citations"]]
                yield chunks.text(None, finish=ev["finish_reason"], citations=cites, abstained=ev["abstained"],
                                  support=ev["support"])
                if include_usage:
                    yield chunks.frame([], usage=_usage(ev["usage"]).model_dump())
    except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
        yield S.sse({"error": stream_error(e)})
    finally:
        slot.release()
    yield S.DONE
