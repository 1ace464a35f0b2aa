"""`DSARagChatModel`: a LangChain chat model over the service's OpenAI-compatible
`/v1/chat/completions` (the route that carries citations, both whole and streamed).

    from dsa_rag.rag_service.langchain import DSARagChatModel
    llm = DSARagChatModel(base_url="http://127.0.0.1:8000", document_ids=["doc_..."], max_tokens=128)
    msg = llm.invoke("When was the treaty signed?")
    msg.content                              # the answer
    msg.usage_metadata                       # {"input_tokens", "output_tokens", "total_tokens",
                                             #  "input_token_details": {"cache_read": ...}}
    msg.response_metadata["model_name"]      # "dsa-tiny"
    msg.response_metadata["citations"]       # [{"document_id", "name", "page", "char_start", "char_end", "snippet", "share"}]
    msg.response_metadata["abstained"]       # True: the documents do not hold the answer ("Not in the documents.")
    for chunk in llm.stream("..."): ...      # tokens as they decode; the last chunk carries usage + citations

The stored corpus is the context and the **last user message is the question**: the service reads
no other turn today (earlier turns and system messages are still sent, so a service that uses them
gets them). Text content only; no tools, no structured output, no images.

Sync, async, streaming (SSE events up to `data: [DONE]`), stop sequences; the HTTP, SSE and
retries are the service client's (rag_service/client.py). Tests:
`.venv/bin/python -m pytest -q tests/langchain`.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import (
    AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field

from dsa_rag.rag_service.langchain.params import PROVIDER, DSARagGenerationParams, usage_metadata

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "developer": "developer"}
_CHAT_ROLES = {"user", "assistant", "system", "tool", "developer"}


def _text(message: BaseMessage) -> str:
    """The text of a message; non-text blocks (images, files, audio) are refused, not dropped."""
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict):
            kind = block.get("type")
            if kind == "text":
                parts.append(block.get("text", ""))
            elif kind in ("reasoning", "thinking") and isinstance(message, AIMessage):
                continue  # a model's own reasoning is not part of the conversation text
            else:
                raise ValueError(f"DSARagChatModel takes text only; a {message.type} message holds a "
                                 f"{kind!r} content block")
    return "".join(parts)


def to_openai_messages(messages: list[BaseMessage]) -> list[dict]:
    out = []
    for m in messages:
        if isinstance(m, ChatMessage):
            role = m.role if m.role in _CHAT_ROLES else "user"
        else:
            role = _ROLES.get(m.type)
            if role is None:
                raise ValueError(f"DSARagChatModel cannot send a {type(m).__name__}")
        msg: dict[str, Any] = {"role": role, "content": _text(m)}
        if m.name and isinstance(m, (HumanMessage, AIMessage, SystemMessage, ChatMessage)):
            msg["name"] = m.name
        if isinstance(m, ToolMessage):
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


class StreamState:
    """What the stream's non-token events carry, folded into the final chunk."""

    def __init__(self):
        self.finish = self.model = self.id = None
        self.citations: list = []
        self.usage: dict | None = None
        self.abstained, self.support = False, None

    def token(self, ev: dict) -> str | None:
        self.model = ev.get("model") or self.model
        self.id = ev.get("id") or self.id
        if ev.get("usage"):
            self.usage = ev["usage"]
        if "citations" in ev:
            self.citations = ev["citations"]
        if "abstained" in ev:  # the final chunk: is the answer "Not in the documents."?
            self.abstained, self.support = bool(ev["abstained"]), ev.get("support")
        for choice in ev.get("choices") or []:
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
            text = (choice.get("delta") or {}).get("content")
            if text:
                return text
        return None


class DSARagChatModel(BaseChatModel, DSARagGenerationParams):
    """Chat model on the DSA long-document RAG service: answers over the uploaded documents,
    with citations to the passages the sparse attention read.

    Options (besides the connection ones in `DSARagParams`: `base_url`, `api_key`, `tenant`,
    `document_ids`, `timeout`, `max_retries`, `retry_backoff_s`, `default_headers`):
    `model`, `temperature`, `max_tokens`, `top_p`, `seed`, `stop`, `streaming`."""

    @property
    def _llm_type(self) -> str:
        return "dsa-rag-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._generation_identity()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(**self._ls_params("chat", stop, **kwargs))

    # ---------------------------------------------------------------- request / response
    def _body(self, messages: list[BaseMessage], stop: list[str] | None, stream: bool, **kwargs: Any) -> dict:
        body: dict[str, Any] = {"model": self.model, "messages": to_openai_messages(messages), "stream": stream}
        for key in ("temperature", "max_tokens", "top_p", "seed", "document_ids"):
            if (v := getattr(self, key)) is not None:
                body[key] = v
        if stop := (stop if stop is not None else self.stop):
            body["stop"] = list(stop)
        for key in ("model", "temperature", "max_tokens", "top_p", "seed", "document_ids"):
            if kwargs.get(key) is not None:
                body[key] = kwargs[key]
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _metadata(self, body: dict, resp_model: str | None, finish: str | None, citations: list,
                  response_id: str | None, abstained: bool = False, support: float | None = None) -> dict:
        return {"model_name": resp_model or body["model"], "model_provider": PROVIDER, "finish_reason": finish,
                "citations": citations, "id": response_id, "abstained": abstained, "support": support}

    def _result(self, body: dict, data: dict) -> ChatResult:
        choice = data["choices"][0]
        usage = usage_metadata(data.get("usage"))
        meta = self._metadata(body, data.get("model"), choice.get("finish_reason"), data.get("citations", []),
                              data.get("id"), bool(data.get("abstained", False)), data.get("support"))
        msg = AIMessage(content=choice["message"].get("content") or "", usage_metadata=usage,
                        response_metadata=meta, id=data.get("id"))
        gen = ChatGeneration(message=msg, generation_info={"finish_reason": choice.get("finish_reason")})
        return ChatResult(generations=[gen], llm_output={"model_name": meta["model_name"],
                                                         "token_usage": data.get("usage"),
                                                         "citations": meta["citations"]})

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        body = self._body(messages, stop, False, **kwargs)
        return self._result(body, self.client().chat_completions(body))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        body = self._body(messages, stop, False, **kwargs)
        return self._result(body, await self.client().achat_completions(body))

    # ---------------------------------------------------------------- streaming
    def _last_chunk(self, body: dict, acc: StreamState) -> ChatGenerationChunk:
        meta = self._metadata(body, acc.model, acc.finish, acc.citations, acc.id, acc.abstained, acc.support)
        msg = AIMessageChunk(content="", usage_metadata=usage_metadata(acc.usage), response_metadata=meta,
                             chunk_position="last")
        return ChatGenerationChunk(message=msg, generation_info={"finish_reason": acc.finish})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        body = self._body(messages, stop, True, **kwargs)
        acc = StreamState()
        for ev in self.client().chat_completions_stream(body):
            if (text := acc.token(ev)) is not None:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
                if run_manager:
                    run_manager.on_llm_new_token(text, chunk=chunk)
                yield chunk
        yield self._last_chunk(body, acc)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        body = self._body(messages, stop, True, **kwargs)
        acc = StreamState()
        async for ev in self.client().achat_completions_stream(body):
            if (text := acc.token(ev)) is not None:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
                if run_manager:
                    await run_manager.on_llm_new_token(text, chunk=chunk)
                yield chunk
        yield self._last_chunk(body, acc)
