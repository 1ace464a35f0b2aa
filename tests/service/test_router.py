"""The pack cache-affinity router: the ranking policy (pure function) and the RequestRouter
subclass driven with stand-in replicas (no cluster): holders first, the load guard spills a hot
pack, cold packs spread by rendezvous hashing and stick to their first replica.

    .venv/bin/python -m pytest -q tests/service/test_router.py
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from dsa_rag.rag_service.serve.router import PackAffinityRouter, rank_replicas

Q = {"a": 0, "b": 0, "c": 0}


def ranks(pack, holders, q, guard=2):
    return rank_replicas(pack, sorted(q), set(holders), q.get, guard)


def test_holder_first_while_under_the_guard():
    assert ranks("p", {"b"}, {"a": 0, "b": 1, "c": 0})[0] == ["b"]
    # several holders: least loaded holder first, all holders in the first rank
    assert ranks("p", {"b", "c"}, {"a": 0, "b": 1, "c": 0})[0] == ["c", "b"]


def test_load_guard_spills_a_hot_pack_to_the_least_loaded():
    r = ranks("p", {"b"}, {"a": 1, "b": 2, "c": 0}, guard=2)
    assert r[0] == ["c"] and r[-1] == ["b"], r  # holder over the guard comes last
    assert ranks("p", {"b"}, {"a": 1, "b": 5, "c": 3}, guard=8)[0] == ["b"]  # higher guard: stays


def test_cold_pack_least_loaded_then_stable_hash():
    assert ranks("p", set(), {"a": 3, "b": 0, "c": 1})[0] == ["b"]
    firsts = {p: ranks(p, set(), Q)[0][0] for p in (f"pk_{i}" for i in range(60))}
    assert set(firsts.values()) == {"a", "b", "c"}  # spread over replicas
    assert all(ranks(p, set(), dict(Q))[0][0] == r for p, r in firsts.items())  # and stable
    assert sorted(x for rank in ranks("p", set(), Q) for x in rank) == ["a", "b", "c"]  # nobody dropped


def test_no_pack_is_least_loaded_order():
    assert ranks(None, set(), {"a": 2, "b": 0, "c": 1}) == [["b", "c", "a"]]


# ------------------------------------------------------------------ the Ray router class
@dataclass
class FakeReplica:
    replica_id: object
    routing_stats: dict = field(default_factory=dict)
    max_ongoing_requests: int = 4


@dataclass
class FakeContext:
    should_backoff: bool = False


@dataclass
class FakePending:
    kwargs: dict
    args: list = field(default_factory=list)
    routing_context: FakeContext = field(default_factory=FakeContext)


@pytest.fixture
def router():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

    dep = DeploymentID(name="ModelReplica", app_name="t")
    r = PackAffinityRouter(deployment_id=dep, handle_source=DeploymentHandleSource.UNKNOWN,
                           use_replica_queue_len_cache=True)
    r.initialize_state(max_queue=2)
    reps = [FakeReplica(ReplicaID(unique_id=u, deployment_id=dep)) for u in ("r1", "r2", "r3")]
    return r, reps


def choose(r, reps, pack):
    pending = FakePending(kwargs={"pack_id": pack})
    out = asyncio.run(r.choose_replicas(reps, pending))
    assert pending.routing_context.should_backoff  # every replica was ranked
    return [[x.replica_id.unique_id for x in rank] for rank in out]


def test_router_follows_reported_warm_packs_and_guards_load(router):
    r, reps = router
    reps[2].routing_stats = {"warm_packs": ["pk_hot"]}
    assert choose(r, reps, "pk_hot")[0] == ["r3"]
    r.replica_queue_len_cache.update(reps[2].replica_id, 2)  # r3 at the guard
    r.replica_queue_len_cache.update(reps[0].replica_id, 1)
    first = choose(r, reps, "pk_hot")
    assert first[0] == ["r2"] and first[-1] == ["r3"]
    # the spill target is remembered as a second holder: once r3 drains, both are preferred
    r.replica_queue_len_cache.update(reps[2].replica_id, 0)
    r.replica_queue_len_cache.update(reps[1].replica_id, 1)
    assert choose(r, reps, "pk_hot")[0] == ["r3", "r2"]


def test_router_remembers_cold_pack_choice_and_forgets_dead_replicas(router):
    r, reps = router
    first = choose(r, reps, "pk_cold")[0][0]
    # a replica with a lower queue appears: the pack still goes where its cache is being built
    other = next(x for x in reps if x.replica_id.unique_id != first)
    for x in reps:
        r.replica_queue_len_cache.update(x.replica_id, 0 if x is other else 1)
    assert choose(r, reps, "pk_cold")[0] == [first]
    dead = next(x for x in reps if x.replica_id.unique_id == first)
    r.on_replica_actor_died(dead.replica_id)
    live = [x for x in reps if x is not dead]
    assert choose(r, live, "pk_cold")[0] == [other.replica_id.unique_id]
