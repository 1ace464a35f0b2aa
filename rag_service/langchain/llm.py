"""`DSARagLLM`: a LangChain text-completion LLM over the service's `/v1/completions` (the prompt
is the question over the stored documents).

    from dsa_rag.rag_service.langchain import DSARagLLM
    llm = DSARagLLM(base_url="http://127.0.0.1:8000", max_tokens=64)
    llm.invoke("When was the treaty signed?")                  # -> str
    res = llm.generate(["When was the treaty signed?"])
    res.generations[0][0].generation_info                      # {"finish_reason", "citations", "usage_metadata", "model_name",
                                                               #  "abstained", "support"}
    res.llm_output                                             # {"model_name", "token_usage"} (summed over prompts)
    for piece in llm.stream("..."): ...                        # text pieces as they decode

Sync, async, streaming, stop sequences and retries as in `DSARagChatModel` (rag_service/client.py). In a
stream, the last `GenerationChunk` carries the finish reason, citations and usage in its
`generation_info` (see `astream_events` / callbacks to read them). Tests:
`.venv/bin/python -m pytest -q tests/langchain/test_llm.py`.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import Field

from dsa_rag.rag_service.langchain.params import DSARagGenerationParams, usage_metadata



class DSARagLLM(LLM, DSARagGenerationParams):
    """Completion LLM on the DSA long-document RAG service (`/v1/completions`), with citations.

    Options besides the connection ones of `DSARagParams`: `model`, `temperature`, `max_tokens`,
    `top_p`, `seed`, `stop`, `streaming` (generate() streams from the service and aggregates)."""

    @property
    def _llm_type(self) -> str:
        return "dsa-rag"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._generation_identity()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(**self._ls_params("llm", stop, **kwargs))

    def _body(self, prompt: str, stop: list[str] | None, stream: bool, **kwargs: Any) -> dict:
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "stream": stream}
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

    @staticmethod
    def _info(model: str, finish: str | None, citations: list, usage: dict | None, abstained: bool = False,
              support: float | None = None) -> dict:
        return {"finish_reason": finish, "citations": citations, "usage_metadata": usage_metadata(usage),
                "token_usage": usage, "model_name": model, "abstained": abstained, "support": support}

    @staticmethod
    def _llm_output(model: str, usages: list[dict | None]) -> dict:
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cached_tokens": 0}
        for u in usages:
            if u:
                for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
                    total[k] += int(u.get(k, 0))
                total["cached_tokens"] += int((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
        return {"model_name": model, "token_usage": total}

    def _generation(self, body: dict, data: dict) -> Generation:
        choice = data["choices"][0]
        return Generation(text=choice.get("text") or "", generation_info=self._info(
            data.get("model") or body["model"], choice.get("finish_reason"), data.get("citations", []),
            data.get("usage"), bool(data.get("abstained", False)), data.get("support")))

    # ---------------------------------------------------------------- whole answers
    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        return self._generate([prompt], stop, run_manager, **kwargs).generations[0][0].text

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        gens = []
        for prompt in prompts:
            if self.streaming:
                full: GenerationChunk | None = None
                for chunk in self._stream(prompt, stop, run_manager, **kwargs):
                    full = chunk if full is None else full + chunk
                gens.append(Generation(text=full.text, generation_info=full.generation_info) if full else
                            Generation(text=""))
            else:
                body = self._body(prompt, stop, False, **kwargs)
                gens.append(self._generation(body, self.client().completions(body)))
        model = kwargs.get("model") or self.model
        return LLMResult(generations=[[g] for g in gens], llm_output=self._llm_output(
            model, [(g.generation_info or {}).get("token_usage") for g in gens]))

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        gens = []
        for prompt in prompts:
            if self.streaming:
                full: GenerationChunk | None = None
                async for chunk in self._astream(prompt, stop, run_manager, **kwargs):
                    full = chunk if full is None else full + chunk
                gens.append(Generation(text=full.text, generation_info=full.generation_info) if full else
                            Generation(text=""))
            else:
                body = self._body(prompt, stop, False, **kwargs)
                gens.append(self._generation(body, await self.client().acompletions(body)))
        model = kwargs.get("model") or self.model
        return LLMResult(generations=[[g] for g in gens], llm_output=self._llm_output(
            model, [(g.generation_info or {}).get("token_usage") for g in gens]))

    # ---------------------------------------------------------------- streaming
    @staticmethod
    def _fold(ev: dict, state: dict) -> str | None:
        state["model"] = ev.get("model") or state.get("model")
        if ev.get("usage"):
            state["usage"] = ev["usage"]
        if "citations" in ev:
            state["citations"] = ev["citations"]
        if "abstained" in ev:
            state["abstained"], state["support"] = bool(ev["abstained"]), ev.get("support")
        for choice in ev.get("choices") or []:
            if choice.get("finish_reason"):
                state["finish"] = choice["finish_reason"]
            if choice.get("text"):
                return choice["text"]
        return None

    def _last(self, body: dict, state: dict) -> GenerationChunk:
        return GenerationChunk(text="", generation_info=self._info(
            state.get("model") or body["model"], state.get("finish"), state.get("citations", []), state.get("usage"),
            state.get("abstained", False), state.get("support")))

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        body, state = self._body(prompt, stop, True, **kwargs), {}
        for ev in self.client().completions_stream(body):
            if (text := self._fold(ev, state)) is not None:
                chunk = GenerationChunk(text=text)
                if run_manager:
                    run_manager.on_llm_new_token(text, chunk=chunk)
                yield chunk
        yield self._last(body, state)

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        body, state = self._body(prompt, stop, True, **kwargs), {}
        async for ev in self.client().acompletions_stream(body):
            if (text := self._fold(ev, state)) is not None:
                chunk = GenerationChunk(text=text)
                if run_manager:
                    await run_manager.on_llm_new_token(text, chunk=chunk)
                yield chunk
        yield self._last(body, state)
