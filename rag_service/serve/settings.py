"""Settings of the serving layer: the core `RagSettings` plus host/port, model, replicas,
request limits and the Ray knobs. One pydantic-settings object, env prefix `DSA_RAG_`.

    DSA_RAG_PORT=9000 DSA_RAG_MODEL_REPLICAS=2 python -m dsa_rag.rag_service.cli serve
    python -c "from dsa_rag.rag_service.serve.settings import ServeSettings; print(ServeSettings())"

Limits the API enforces are declared here and in `schemas_api.py` (`Field(...)` bounds), never
as ad-hoc ifs in the routes. Static bounds are checked by FastAPI/pydantic (422 before any
work); the ones set here at runtime are checked once each: `max_question_chars` and
`max_new_tokens` by `deps.ask_params` (422 limit_exceeded), `max_files_per_upload` and
`upload_max_bytes` by `deps.read_uploads`, `api_keys`, `rate_limit_*`, `max_json_bytes` and
`max_request_bytes` by the guard middleware (guard.py), `max_streams_per_key` by `StreamSlots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from dsa_rag.rag_service.settings import MiB, RagSettings

TENANT_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"


class ServeSettings(RagSettings):
    # --- HTTP ----------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="listen address; 0.0.0.0 to expose the service")
    port: int = Field(8000, ge=0, le=65535, description="0 = pick a free port")
    default_tenant: str = Field("default", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    max_files_per_upload: int = Field(64, ge=1, le=10_000)

    # --- auth and per-key limits ---------------------------------------------------------------
    api_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="API key -> tenant; env `DSA_RAG_API_KEYS=key1:tenantA,key2:tenantB` (or JSON). "
        "Empty = open dev mode: no auth, tenant from X-Tenant (default `default_tenant`)",
    )
    rate_limit_rps: float = Field(0.0, ge=0, description="requests/s per API key (token bucket); 0 = no limit")
    rate_limit_burst: int = Field(20, ge=1, description="token bucket size per API key")
    max_streams_per_key: int = Field(4, ge=1, le=10_000, description="concurrent SSE streams per API key (429 above)")
    max_json_bytes: int = Field(1 * MiB, ge=1024, description="JSON request bodies above this are refused (413)")
    max_request_bytes: int = Field(
        256 * MiB, ge=1024, description="a whole multipart upload above this is refused (413) before parsing"
    )
    max_question_chars: int = Field(8192, ge=1, le=8192, description="question / prompt / last user message (422)")
    stream_retries: int = Field(
        1, ge=0, le=5, description="a pack answer whose replica fails before its first token is retried this often"
    )

    # --- model ---------------------------------------------------------------------------------
    model: str = Field("dsa-tiny", description="preset name or checkpoint directory")
    model_id: str = Field("dsa-tiny", min_length=1, max_length=128, description="the id /v1/models reports")
    max_new_tokens: int = Field(512, ge=1, le=32768, description="upper bound of max_tokens per request")
    default_max_tokens: int = Field(64, ge=1, le=32768)
    warm_packs_per_replica: int = Field(8, ge=0, description="prefix caches kept in a replica's memory (LRU)")
    warm_on_upload: bool = Field(
        False, description="prefill the packs of every upload in the background (as `?prefill=true` does), so the "
        "first question finds them warm; progress shows in GET /v1/packs")
    citations_per_pack: int = Field(5, ge=0, le=50)
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads per replica; 0 = torch default")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="serving dtype of the model, its caches and snapshots (env DSA_RAG_DTYPE); auto = the "
        "checkpoint config's torch_dtype on CUDA (bfloat16 for DeepSeek-V3.2, float32 when it names none), "
        "float32 on CPU",
    )
    fp8_numerics: bool | None = Field(
        None,
        description="V3.2's simulated FP8 indexer keys and latent cache (env DSA_RAG_FP8_NUMERICS=true/false); "
        "unset = the model config's own default",
    )
    index_every: int | None = Field(
        None, ge=1, le=1024,
        description="cross-layer index reuse (env DSA_RAG_INDEX_EVERY): run the lightning indexer on layers 0, N, "
        "2N, ... and let the layers between reuse its top-k (fewer indexer keys cached, cheaper selection); unset = "
        "the checkpoint's own plan (GLM-5.2's indexer_types, else every layer)",
    )

    # --- engine backend (model/engine/factory.py): this engine in process, or an OpenAI-compatible
    # upstream (vLLM / SGLang / `dsa-rag engine-server`) that holds the model and its prefix KV cache.
    engine: Literal["dsa", "openai"] = Field(
        "dsa", description="dsa: run the model in each replica; openai: send each pack's prompt to "
        "`upstream_urls` (/v1/completions); `model` then only names the checkpoint whose tokenizer.json "
        "tokenizes packs locally (env DSA_RAG_ENGINE)")
    upstream_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="engine openai: base URLs of the upstream endpoints, comma-separated in "
        "env DSA_RAG_UPSTREAM_URLS=http://vllm-0:8000,http://vllm-1:8000; a pack always goes to the same one "
        "(rendezvous hash) unless it is down")
    upstream_model: str | None = Field(
        None, description="the upstream's served model name; unset = the first id of its /v1/models")
    upstream_api_key: str | None = Field(None, description="sent to the upstream as Authorization: Bearer")
    upstream_timeout_s: float = Field(
        600.0, gt=0, description="longest wait for the upstream's next byte (a cold pack's prefill included); "
        "beyond it the answer fails with 504 upstream_timeout")
    upstream_connect_timeout_s: float = Field(5.0, gt=0)
    upstream_down_s: float = Field(
        30.0, ge=0, description="an endpoint that refused connections is skipped this long (its packs move to "
        "their next endpoint)")
    upstream_warm_prefill: bool = Field(
        True, description="a pack's prefill (first question, ?prefill=true) sends its prompt upstream with "
        "max_tokens 1, so its questions find it in the upstream's prefix cache")

    def upstream_options(self) -> dict | None:
        """Keyword arguments of the `openai` backend (model/engine/upstream.py), None for `dsa`."""
        if self.engine != "openai":
            return None
        return {"urls": list(self.upstream_urls), "model": self.upstream_model, "api_key": self.upstream_api_key,
                "timeout_s": self.upstream_timeout_s, "connect_timeout_s": self.upstream_connect_timeout_s,
                "down_s": self.upstream_down_s, "warm_prefill": self.upstream_warm_prefill}

    @field_validator("upstream_urls", mode="before")
    @classmethod
    def _split_urls(cls, v):
        """`http://a:8000,http://b:8000` (env form) or a JSON list / list."""
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                import json

                return json.loads(v)
            return [u.strip() for u in v.split(",") if u.strip()]
        return v

    @model_validator(mode="after")
    def _upstream_needs_urls(self):
        if self.engine == "openai" and not self.upstream_urls:
            raise ValueError("engine openai needs upstream_urls (env DSA_RAG_UPSTREAM_URLS=http://host:8000[,...])")
        if self.engine == "openai" and self.replica_ranks > 1:
            raise ValueError("tensor_parallel_size / expert_parallel_size > 1 with engine openai: the upstream "
                             "(vLLM / SGLang) does its own parallelism; set them there, and 1 here")
        return self

    # --- Ray -----------------------------------------------------------------------------------
    model_replicas: int = Field(1, ge=1, le=1024, description="model replicas when not autoscaling")
    model_max_ongoing_requests: int = Field(4, ge=1, le=4096)
    router_max_queue: int = Field(
        2, ge=1, le=4096,
        description="load guard: a replica that holds a pack warm is preferred while its queue is "
        "below this; beyond it the pack's questions spill to the least loaded replica",
    )
    ray_address: str | None = Field(None, description="join this Ray cluster; None = start a local one")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance")
    # A replica larger than one device (serve/ranks.py): one Ray placement group of
    # max(tp, ep) bundles (STRICT_PACK: one node), rank 0 runs the engine, the others follow.
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="ranks one replica's attention heads, dense MLP and vocabulary split over")
    expert_parallel_size: int = Field(
        1, ge=1, le=64, description="ranks one replica's routed experts split over (1 or the replica's rank count)")

    @property
    def replica_ranks(self) -> int:
        """Processes (devices) per model replica."""
        return max(self.tensor_parallel_size, self.expert_parallel_size)

    @model_validator(mode="after")
    def _parallel_sizes(self):
        n = self.replica_ranks
        for name in ("tensor_parallel_size", "expert_parallel_size"):
            if getattr(self, name) not in (1, n):
                raise ValueError(f"{name} = {getattr(self, name)}: must be 1 or the replica's rank count {n} "
                                 f"(tensor and expert parallelism share one node's ranks)")
        return self

    @field_validator("fp8_numerics", mode="before")
    @classmethod
    def _fp8_unset(cls, v):
        """An empty DSA_RAG_FP8_NUMERICS (or "none") means unset: the model's own default."""
        if isinstance(v, str) and v.strip().lower() in ("", "none", "null"):
            return None
        return v

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, v):
        """`key1:tenantA,key2:tenantB` (env form) or a JSON object / dict."""
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("{"):
                import json

                return json.loads(v)
            out = {}
            for part in filter(None, (p.strip() for p in v.split(","))):
                key, sep, tenant = part.rpartition(":")
                if not sep or not key or not tenant:
                    raise ValueError(f"api_keys entry {part[:6]!r}... must be key:tenant")
                out[key] = tenant
            return out
        return v

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, v: dict[str, str]):
        import re

        for key, tenant in v.items():
            if len(key) < 8 or any(c.isspace() for c in key):
                raise ValueError("an API key must be at least 8 characters without spaces")
            if not re.match(TENANT_PATTERN, tenant):
                raise ValueError(f"tenant {tenant!r} of an API key: use 1-128 letters, digits, '_', '.', '-'")
        return v

    @model_validator(mode="after")
    def _tokenizer_from_checkpoint(self):
        """A checkpoint directory as `model` brings its tokenizer (tokenizer.json or
        tokenizer_config.json) unless DSA_RAG_TOKENIZER_DIR says otherwise: packs, layouts and
        questions must be tokenized exactly as the model was trained."""
        d = Path(self.model)
        if self.tokenizer_dir is None and d.is_dir() and any(
                (d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            self.tokenizer_dir = d
        if d.is_dir() and "model_id" not in self.model_fields_set:
            self.model_id = d.name  # what /v1/models reports and OpenAI clients send back
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)
