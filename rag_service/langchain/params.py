"""Options shared by the LangChain classes (pydantic fields, LangChain env defaults) and the
glue from them to the service client (rag_service/client.py, which does all HTTP and SSE).

    from dsa_rag.rag_service.langchain.params import DSARagParams
    p = DSARagParams(base_url="http://127.0.0.1:8000", api_key="sk-...", max_retries=3)
    p.client().ask("Who signed?")          # a DSARagClient built from these options (cached)

Tests: `.venv/bin/python -m pytest -q tests/langchain`.
"""

from __future__ import annotations

from typing import Any

from langchain_core.utils import from_env, secret_from_env
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr

from dsa_rag.rag_service.client import DEFAULT_BASE_URL, ENV_API_KEY, ENV_BASE_URL, DSARagClient

PROVIDER = "dsa_rag"  # ls_provider / model_provider of both LangChain models
USER_AGENT = "dsa-rag-langchain/0.1"


class DSARagParams(BaseModel):
    """Connection options shared by `DSARagChatModel`, `DSARagLLM` and `DSARagRetriever`."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    base_url: str = Field(
        default_factory=from_env(ENV_BASE_URL, default=DEFAULT_BASE_URL),
        description=f"the service root (no /v1); env {ENV_BASE_URL}",
    )
    api_key: SecretStr | None = Field(
        default_factory=secret_from_env(ENV_API_KEY, default=None),
        description=f"sent as `Authorization: Bearer <key>`; env {ENV_API_KEY}",
    )
    tenant: str | None = Field(None, description="`X-Tenant` header; None = the service's default tenant")
    document_ids: list[str] | None = Field(
        None, description="answer only from these documents (the service's `document_ids` filter)"
    )
    timeout: float | None = Field(60.0, ge=0, description="seconds per request (read / write); None = wait forever")
    max_retries: int = Field(2, ge=0, description="extra attempts on connection errors, 429 and 5xx")
    retry_backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles per attempt (jittered)")
    default_headers: dict[str, str] | None = Field(None, description="extra HTTP headers on every request")

    # a private attribute: not part of the model's fields, dump, equality or serialization
    _client_cache: tuple | None = PrivateAttr(default=None)

    def client(self) -> DSARagClient:
        """The service client for the current options (rebuilt when an option changed)."""
        key = self.api_key.get_secret_value() if self.api_key is not None else ""
        opts = dict(base_url=self.base_url, api_key=key, tenant=self.tenant, timeout=self.timeout,
                    max_retries=self.max_retries, retry_backoff_s=self.retry_backoff_s,
                    headers=dict(self.default_headers or {}), user_agent=USER_AGENT)
        ident = tuple((k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in opts.items())
        cached = self._client_cache
        if cached is None or cached[0] != ident:
            cached = (ident, DSARagClient(**opts))
            self._client_cache = cached
        return cached[1]


def usage_metadata(usage: dict | None) -> dict | None:
    """OpenAI usage (with `prompt_tokens_details.cached_tokens`) or /v1/ask usage (`cached_tokens`)
    -> LangChain `UsageMetadata`. The prompt counts the whole pack prefix (documents + question);
    `cache_read` is the part served from the prefix KV cache."""
    if not usage:
        return None
    inp, out = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    cached = usage.get("cached_tokens")
    if cached is None:
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
            "input_token_details": {"cache_read": int(cached or 0)}}


class DSARagGenerationParams(DSARagParams):
    """Generation options shared by `DSARagChatModel` and `DSARagLLM` (the retriever only
    generates the few tokens it needs to find citations)."""

    model: str = Field("dsa-tiny", alias="model_name", description="the id GET /v1/models reports")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="None = the service default (greedy)")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate; None = the service default")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0)
    stop: list[str] | None = Field(None, description="up to 4 stop strings (trimmed from the output)")
    streaming: bool = Field(False, description="invoke() streams from the service and aggregates")

    def _ls_params(self, model_type: str, stop: list[str] | None, **kwargs: Any) -> dict[str, Any]:
        """LangSmith tracing params: per-call kwargs override the instance's options."""
        params: dict[str, Any] = {"ls_provider": PROVIDER, "ls_model_name": kwargs.get("model") or self.model,
                                  "ls_model_type": model_type}
        if (t := kwargs.get("temperature", self.temperature)) is not None:
            params["ls_temperature"] = t
        if (m := kwargs.get("max_tokens", self.max_tokens)) is not None:
            params["ls_max_tokens"] = m
        if stop := (stop or self.stop):
            params["ls_stop"] = stop
        return params

    def _generation_identity(self) -> dict[str, Any]:
        return {"model": self.model, "base_url": self.base_url, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "top_p": self.top_p, "seed": self.seed,
                "document_ids": self.document_ids, "tenant": self.tenant}
