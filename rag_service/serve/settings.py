"""Settings of the serving layer: the core `RagSettings` plus host/port, model, replicas,
request limits and the Ray knobs. One pydantic-settings object, env prefix `DSA_RAG_`.

    DSA_RAG_PORT=9000 DSA_RAG_MODEL_REPLICAS=2 python -m rag_service.cli serve
    python -c "from rag_service.serve.settings import ServeSettings; print(ServeSettings())"

Limits the API enforces (question length, max_tokens, files per upload) are declared here and
in `schemas_api.py`, never as ad-hoc ifs in the routes.
"""

from __future__ import annotations

from pydantic import Field

from rag_service.settings import RagSettings


class ServeSettings(RagSettings):
    # --- HTTP ----------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="listen address; 0.0.0.0 to expose the service")
    port: int = Field(8000, ge=0, le=65535, description="0 = pick a free port")
    default_tenant: str = Field("default", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    max_files_per_upload: int = Field(64, ge=1, le=10_000)

    # --- model ---------------------------------------------------------------------------------
    model: str = Field("dsa-tiny", description="preset name or checkpoint directory")
    model_id: str = Field("dsa-tiny", min_length=1, max_length=128, description="the id /v1/models reports")
    max_new_tokens: int = Field(512, ge=1, le=32768, description="upper bound of max_tokens per request")
    default_max_tokens: int = Field(64, ge=1, le=32768)
    warm_packs_per_replica: int = Field(8, ge=0, description="prefix caches kept in a replica's memory (LRU)")
    citations_per_pack: int = Field(5, ge=0, le=50)
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads per replica; 0 = torch default")

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
