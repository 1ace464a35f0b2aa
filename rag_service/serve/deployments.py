"""Ray Serve deployments: thin shells around the pipeline and the pack worker.

    Ingress       FastAPI app (app.py) via serve.ingress; fans questions out to packs
    Ingestion     CPU: parse / chunk / pack uploads, documents CRUD, pack selection (RagPipeline)
    ModelReplica  the engine + warm prefix caches (ask.worker.PackWorker); num_gpus 1 where GPUs
                  exist; routed by pack cache affinity (router.PackAffinityRouter)

    python -m dsa_rag.rag_service.cli serve    # builds this graph on a local Ray
    serve run deploy/serve.yaml                # or from the Serve config (import_path
                                               #   dsa_rag.rag_service.serve.deployments:build_app)

A question's `AskParams` travels whole: the ingress (fan-out, `ask.fanout.ask_events` over a
`RayBackend`) calls `ModelReplica.stream(pack_id=..., params=...)` per selected pack.

`build_app(args)` takes the ServeSettings fields as args (plus `model_autoscaling_config`), so a
Serve config's `applications[].args` sets them; per-deployment overrides (num_replicas,
autoscaling_config, ray_actor_options, request_router_config) go in `applications[].deployments`
by name. All replicas share Redis (`redis_url`: the embedded server's unix socket on one machine,
an external Redis on a cluster) and the data directory (blobs + KV cache files: a shared
filesystem on a cluster), so a pack prefilled on one node is restored on another.

Tests: `.venv/bin/python -m pytest -q tests/service/test_ray.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from dsa_rag.rag_service.ask.cachestate import pack_states
from dsa_rag.rag_service.ask.params import AskParams
from dsa_rag.rag_service.ask.worker import PackWorker
from dsa_rag.rag_service.docview import text_window
from dsa_rag.rag_service.errors import RagError
from dsa_rag.rag_service.pipeline import RagPipeline
from dsa_rag.rag_service.serve.app import create_app
from dsa_rag.rag_service.serve.ranks import ReplicaRanks
from dsa_rag.rag_service.serve.settings import ServeSettings

log = logging.getLogger("ray.serve")

ROUTER_CLASS = "dsa_rag.rag_service.serve.router:PackAffinityRouter"


def _unwrap(e: BaseException) -> BaseException:
    """A RagError raised in a replica comes back wrapped (RayTaskError); give the route the
    original, so it maps to its HTTP status."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, RagError) else e


# ------------------------------------------------------------------ deployments
@serve.deployment(name="Ingestion", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8)
class Ingestion:
    def __init__(self, settings: dict):
        self.rag = RagPipeline(ServeSettings(**settings))

    async def ingest_many(self, files: list[tuple[str, bytes]], tenant: str):
        return await asyncio.to_thread(self.rag.ingest_many, files, tenant)

    async def list_documents(self, tenant: str):
        return await asyncio.to_thread(self.rag.list_documents, tenant)

    async def get_document(self, doc_id: str, tenant: str):
        return await asyncio.to_thread(self.rag.get_document, doc_id, tenant)

    async def delete_document(self, doc_id: str, tenant: str):
        return await asyncio.to_thread(self.rag.delete_document, doc_id, tenant)

    async def pack_states(self, tenant: str):
        # memory / prefilling live in the model replicas: this process reads what they publish to Redis
        return await asyncio.to_thread(pack_states, self.rag, tenant, {})

    async def document_text(self, doc_id: str, tenant: str, start: int, end: int | None):
        return await asyncio.to_thread(text_window, self.rag, doc_id, tenant, start, end)

    async def select_packs(self, question: str, document_ids, tenant: str):
        return await asyncio.to_thread(self.rag.select_packs, question, document_ids, tenant)

    async def ping(self) -> str:
        await asyncio.to_thread(self.rag.r.ping)
        return "ok"


@serve.deployment(
    name="ModelReplica",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=4,
    request_router_config=RequestRouterConfig(
        request_router_class=ROUTER_CLASS, request_router_kwargs={"max_queue": 2},
        request_routing_stats_period_s=1, request_routing_stats_timeout_s=5,
    ),
    health_check_period_s=10,
)
class ModelReplica:
    def __init__(self, settings: dict):
        s = ServeSettings(**settings)
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.node_id = ray.get_runtime_context().get_node_id()
        self.rag = RagPipeline(s)
        # A replica of several devices: this actor is rank 0 of its placement group (serve/ranks.py).
        self.ranks = ReplicaRanks.start(s, self.rag.tok) if s.replica_ranks > 1 else None
        # publish_warm: the ingress reports the packs warm here ("memory") from Redis (ask/cachestate.py)
        self.worker = PackWorker.from_settings(self.rag, s, replica_id=self.replica_id, publish_warm=True,
                                               engine=self.ranks.engine if self.ranks else None)

    def __del__(self):
        """Serve's graceful shutdown: this replica's packs stop showing as warm at once (a replica
        that dies without it stops showing when its entry expires)."""
        worker = getattr(self, "worker", None)  # absent when __init__ failed
        if worker is not None:
            worker.unpublish_warm()

    async def stream(self, pack_id: str, params: AskParams):
        """Streamed per-pack answer events (see ask.worker.PackWorker.stream). Call it with
        keywords, `stream.remote(pack_id=..., params=...)`: the router reads `pack_id` from them."""
        async for ev in self.worker.stream(pack_id, params):
            ev["node"] = self.node_id
            yield ev

    async def warm(self, pack_id: str) -> str:
        return await self.worker.warm(pack_id)

    async def check_health(self) -> None:
        """Ray Serve's replica health check: Redis reachable (the engine lives in this process),
        and every follower rank alive when the replica spans several devices."""
        await asyncio.wait_for(asyncio.to_thread(self.rag.r.ping), 10)
        if self.ranks is not None:
            await asyncio.to_thread(self.ranks.check)

    def record_routing_stats(self) -> dict:
        """Polled by the controller; the router reads it as `replica.routing_stats`."""
        return {"warm_packs": self.worker.warm_pack_ids()}

    def stats(self) -> dict:
        return {**self.worker.stats(), "node": self.node_id, "warm_pack_ids": self.worker.warm_pack_ids()}


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress()
class Ingress:
    """The FastAPI app (app.py) over a RayBackend; built in the replica after __init__."""

    def __init__(self, settings: dict, app_name: str, ingestion: DeploymentHandle, model: DeploymentHandle):
        self.backend = RayBackend(ServeSettings(**settings), app_name)
        self.backend.attach(ingestion, model)

    def __serve_build_asgi_app__(self):
        return create_app(self.backend)


# ------------------------------------------------------------------ the backend the ingress uses
class RayBackend:
    """`ask.backend.Backend` over deployment handles (attached in the Ingress replica's __init__)."""

    def __init__(self, settings: ServeSettings, app_name: str = "dsa-rag"):
        self.settings = settings
        self.app_name = app_name
        self.ingestion: DeploymentHandle | None = None
        self.model: DeploymentHandle | None = None
        self._replicas = (0.0, 0)

    def attach(self, ingestion: DeploymentHandle, model: DeploymentHandle) -> None:
        self.ingestion, self.model = ingestion, model

    async def start(self):
        return None

    async def close(self):
        return None

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.ingestion, method).remote(*args)
        except Exception as e:  # noqa: BLE001
            raise _unwrap(e) from None

    async def ingest(self, files, tenant):
        return await self._call("ingest_many", files, tenant)

    async def list_documents(self, tenant):
        return await self._call("list_documents", tenant)

    async def get_document(self, doc_id, tenant):
        return await self._call("get_document", doc_id, tenant)

    async def delete_document(self, doc_id, tenant):
        return await self._call("delete_document", doc_id, tenant)

    async def pack_states(self, tenant):
        return await self._call("pack_states", tenant)

    async def document_text(self, doc_id, tenant, start, end):
        return await self._call("document_text", doc_id, tenant, start, end)

    async def select(self, params: AskParams):
        return await self._call("select_packs", params.question, params.document_ids, params.tenant)

    async def stream_pack(self, pack_id: str, params: AskParams):
        gen = self.model.options(stream=True).stream.remote(pack_id=pack_id, params=params)
        try:
            async for ev in gen:
                yield ev
        except Exception as e:  # noqa: BLE001
            raise _unwrap(e) from None

    async def prefetch(self, pack_ids):
        # routed like questions (pack_id keyword): the chosen replica becomes the pack's holder
        await asyncio.gather(*(self.model.warm.remote(pack_id=p) for p in pack_ids))

    async def health(self):
        return {"process": "ok"}

    async def ready(self):
        checks = {}
        try:
            checks["redis"] = await asyncio.wait_for(self.ingestion.ping.remote(), 10)
        except Exception as e:  # noqa: BLE001
            checks["redis"] = f"error: {e}"
        n = await self.replicas()
        checks["model"] = "ok" if n > 0 else "no running model replica"
        return checks

    async def replicas(self) -> int:
        """RUNNING ModelReplica replicas (from the controller; cached 5 s)."""
        t, n = self._replicas
        if time.monotonic() - t < 5:
            return n

        def count() -> int:
            st = serve.status().applications.get(self.app_name)
            if st is None:
                return 0
            dep = st.deployments.get("ModelReplica")
            return int(dep.replica_states.get("RUNNING", 0)) if dep else 0

        n = await asyncio.wait_for(asyncio.to_thread(count), 10)
        self._replicas = (time.monotonic(), n)
        return n


# ------------------------------------------------------------------ the application
def build_app(args: dict | None = None):
    """Serve application builder (import path `dsa_rag.rag_service.serve.deployments:build_app`).
    args: ServeSettings fields, plus optional `model_autoscaling_config` (a dict) and
    `app_name` (the Serve application name, for the replica count)."""
    args = dict(args or {})
    autoscaling = args.pop("model_autoscaling_config", None)
    app_name = args.pop("app_name", "dsa-rag")
    settings = ServeSettings(**args)
    sdict = settings.model_dump(mode="json")
    model_opts = {
        "request_router_config": RequestRouterConfig(
            request_router_class=ROUTER_CLASS, request_router_kwargs={"max_queue": settings.router_max_queue},
            request_routing_stats_period_s=1, request_routing_stats_timeout_s=5),
        "max_ongoing_requests": settings.model_max_ongoing_requests,
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if _cluster_has_gpus() else 0},
    }
    if settings.replica_ranks > 1:  # one placement group per replica, all its ranks on one node
        model_opts["placement_group_bundles"] = [
            {"CPU": 1, **({"GPU": 1} if _cluster_has_gpus() else {})} for _ in range(settings.replica_ranks)]
        model_opts["placement_group_strategy"] = "STRICT_PACK"
    if autoscaling:
        model_opts["autoscaling_config"] = autoscaling
    else:
        model_opts["num_replicas"] = settings.model_replicas
    model = ModelReplica.options(**model_opts).bind(sdict)
    return Ingress.bind(sdict, app_name, Ingestion.bind(sdict), model)


def _cluster_has_gpus() -> bool:
    try:
        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    except Exception:  # noqa: BLE001 - builders also run where the cluster is not reachable
        return False
