"""A model replica larger than one device on Ray Serve: one ModelReplica of 2 ranks (TP=2, EP=2)
in one placement group of 2 CPU bundles (STRICT_PACK), serving a tiny official-layout
DeepSeek-V3.2 checkpoint (FP8 + weight_scale_inv, its own BPE tokenizer) through /v1/ask on a
local Ray; then a follower rank is killed and the replica's health check fails.

    .venv/bin/python -m pytest -q tests/service/test_ray_parallel.py -p no:cacheprovider
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.net import free_port
from tests.service.real_checkpoint import write_checkpoint

pytestmark = pytest.mark.slow

DOC = ("The access code of the Porto warehouse is 7351902. " * 6).encode()


@pytest.fixture(scope="module")
def service(tmp_path_factory, redis_url):
    import ray
    from ray import serve

    from dsa_rag.rag_service.cli import relax_ray_health_checks
    from dsa_rag.rag_service.serve.deployments import build_app
    from tests.service.conftest import SMALL

    relax_ray_health_checks()
    ckpt = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "v32-tiny")
    # 2 bundles of 1 CPU for the replica's ranks + the ingestion's 0.5 (logical CPUs)
    ray.init(num_cpus=3, logging_level="WARNING", log_to_driver=False, include_dashboard=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = dict(SMALL, model=str(ckpt), data_dir=str(tmp_path_factory.mktemp("ray-par")), redis_url=redis_url,
                    redis_prefix="p" + uuid.uuid4().hex[:8], model_replicas=1, tensor_parallel_size=2,
                    expert_parallel_size=2, default_max_tokens=8, max_new_tokens=16)
        serve.run(build_app(args), name="dsa-rag", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _followers() -> list:
    import ray

    from dsa_rag.rag_service.serve.ranks import RANK_ACTOR_PREFIX

    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(RANK_ACTOR_PREFIX)]


def test_replica_of_two_ranks_serves_ask(service):
    from ray.util.placement_group import placement_group_table

    url = service
    r = httpx.post(f"{url}/v1/documents", files=[("files", ("porto.txt", DOC, "text/plain"))], timeout=60)
    assert r.status_code == 200, r.text
    doc_id = r.json()["ids"][0]
    a = httpx.post(f"{url}/v1/ask", json={"question": "What is the access code?", "max_tokens": 6}, timeout=300)
    assert a.status_code == 200, a.text
    body = a.json()
    assert body["packs"][0]["cache"] == "prefill" and body["usage"]["completion_tokens"] >= 1
    assert all(c["document_id"] == doc_id for c in body["citations"])
    again = httpx.post(f"{url}/v1/ask", json={"question": "Who?", "max_tokens": 4}, timeout=300).json()
    assert again["packs"][0]["cache"] == "memory"  # the warm prefix on the same 2-rank replica

    # one placement group, 2 CPU bundles, STRICT_PACK; the follower actor is alive in it
    pgs = [p for p in placement_group_table().values() if p["state"] == "CREATED" and len(p["bundles"]) == 2]
    assert pgs and pgs[0]["strategy"] == "STRICT_PACK" and all(b == {"CPU": 1.0} for b in pgs[0]["bundles"].values())
    assert len(_followers()) == 1


def test_dead_rank_makes_replica_unhealthy(service):
    """Kill the follower's process: a question gets an error event (not a hang), and the replica's
    check_health (what Serve polls to replace a replica) fails naming the rank."""
    import os
    import signal
    import time

    import ray
    from ray import serve

    from dsa_rag.rag_service.client import parse_sse

    (follower,) = _followers()
    os.kill(ray.get(follower.pid.remote()), signal.SIGKILL)  # a crash, not a polite ray.kill
    time.sleep(1)
    # a question now: the leader's next collective fails on the dead peer -> an error event, no hang
    with httpx.stream("POST", f"{service}/v1/ask", json={"question": "Again?", "max_tokens": 4, "stream": True},
                      timeout=120) as r:
        events = parse_sse(r.read().decode())
    assert any(isinstance(e, dict) and e.get("type") == "error" for e in events), events
    h = serve.get_deployment_handle("ModelReplica", app_name="dsa-rag")
    deadline, err = time.monotonic() + 60, None
    while time.monotonic() < deadline and err is None:
        try:
            h.check_health.remote().result(timeout_s=30)
            time.sleep(1)  # the actor's death takes a moment to reach its owner
        except Exception as e:  # noqa: BLE001 - what Serve's health check sees
            err = e
    assert err is not None and "model replica rank 1" in str(err)
