"""The ranks of one model replica larger than one device, on Ray.

A replica is one placement group of `replica_ranks` bundles (STRICT_PACK: one node; build_app
sets `placement_group_bundles`). Serve puts the ModelReplica actor in bundle 0: it is rank 0 and
runs the engine loop. `ReplicaRanks.start` starts one RankWorker actor per other bundle
(ranks 1..N-1), each loading its pieces of the checkpoint and following rank 0's commands
(dsa_rag.model.parallel, through the factory's `load_parallel_engine`). The ranks meet over
torch.distributed (NCCL on GPUs, gloo on CPU) at rank 0's node address.

Failure: a RankWorker that dies ends its `serve` call (its ObjectRef resolves with the error) and
stops answering `ping`; `check` then raises, ModelReplica.check_health fails, and Serve replaces
the replica (the followers die with it: they are owned by the replica's actor). Requests in flight
get an error event: the engine step that needed the dead peer raises in every surviving rank.

    .venv/bin/python -m pytest -q tests/service/test_ray_parallel.py -p no:cacheprovider
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

import ray
from ray.util import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dsa_rag.model.engine.factory import load_parallel_engine
from dsa_rag.model.tokenizer import load_tokenizer

log = logging.getLogger("ray.serve")
RANK_ACTOR_PREFIX = "dsa-rag-rank-"  # + <replica tag>-<rank>


def _engine_args(s) -> dict:
    """What every rank passes to load_parallel_engine (the same on all of them), from ServeSettings."""
    return dict(tensor_parallel_size=s.tensor_parallel_size, expert_parallel_size=s.expert_parallel_size,
                threads=s.torch_threads, dtype=s.dtype, fp8_numerics=s.fp8_numerics, index_every=s.index_every)


@ray.remote(max_concurrency=2)  # serve() blocks for the replica's life; ping() must still answer
class RankWorker:
    def serve(self, model: str, tokenizer_dir, rank: int, world: int, init_method: str, args: dict) -> str:
        # The follower decodes with the leader's tokenizer: stop strings and EOS end requests, and
        # every rank must end them at the same step.
        load_parallel_engine(model, rank=rank, world=world, init_method=init_method,
                             tokenizer=load_tokenizer(tokenizer_dir), **args)
        return f"rank {rank} stopped"

    def ping(self) -> str:
        return "ok"

    def pid(self) -> int:
        return os.getpid()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class ReplicaRanks:
    """Rank 0's view of its replica: the leader engine and the follower actors."""

    def __init__(self, engine, actors: list, refs: list):
        self.engine, self.actors, self.refs = engine, actors, refs

    @classmethod
    def start(cls, s, tokenizer) -> "ReplicaRanks":
        """Start ranks 1..N-1 in this replica's placement group, then load rank 0 (which waits for
        all of them to join). s: ServeSettings; tokenizer: the pipeline's."""
        world = s.replica_ranks
        pg = get_current_placement_group()
        if pg is None or len(pg.bundle_specs) < world:
            raise RuntimeError(f"a replica of {world} ranks needs a placement group of {world} bundles "
                               f"(build_app sets placement_group_bundles from tensor/expert_parallel_size)")
        init = f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"
        args = _engine_args(s)
        actors, refs = [], []
        tag = uuid.uuid4().hex[:8]  # named, so operators (and tests) can find a replica's ranks
        for r in range(1, world):
            spec = pg.bundle_specs[r]
            a = RankWorker.options(
                name=f"{RANK_ACTOR_PREFIX}{tag}-{r}", num_cpus=spec.get("CPU", 0), num_gpus=spec.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
            ).remote()
            actors.append(a)
            refs.append(a.serve.remote(s.model, s.tokenizer_dir and str(s.tokenizer_dir), r, world, init, args))
        engine = load_parallel_engine(s.model, rank=0, world=world, init_method=init, tokenizer=tokenizer, **args)
        log.info("model replica of %d ranks (TP=%d EP=%d) up at %s", world, s.tensor_parallel_size,
                 s.expert_parallel_size, init)
        return cls(engine, actors, refs)

    def check(self, timeout_s: float = 10.0) -> None:
        """Raise if a follower rank ended or does not answer (the replica is then unhealthy)."""
        done, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        for ref in done:
            r = self.refs.index(ref) + 1
            try:
                why = f"ended: {ray.get(ref)}"
            except Exception as e:  # noqa: BLE001 - the actor died or its loop raised
                why = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            # raised outside the except block: Ray would report the chained Ray error instead
            raise RuntimeError(f"model replica rank {r} {why}")
        pings = [a.ping.remote() for a in self.actors]
        for r, ref in enumerate(pings, 1):
            try:
                ray.get(ref, timeout=timeout_s)
                continue
            except Exception as e:  # noqa: BLE001 - dead, or not answering within timeout_s
                why = f"does not answer: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            raise RuntimeError(f"model replica rank {r} {why}")
