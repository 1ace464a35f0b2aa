"""One engine per rank, driven by rank 0: the leader runs the engine loop (requests, scheduling,
sampling, snapshots) and broadcasts each command before running it; followers run the same
command on their own Engine. Every rank therefore holds the same paged block tables and the same
whole latent KV / indexer-key caches, and each model forward meets in the same collectives.

Why replicate the engine state instead of shipping block tables each step: the Engine is
deterministic given its commands (the all-reduced activations and all-gathered logits are
bitwise the same on every rank, so greedy tokens and top-k choices agree), so one small pickled
command per call keeps followers in step with no second scheduler, and copy-on-write forks,
pool growth and restores happen the same way everywhere. The leader pins a seed on sampled
(non-greedy) requests so every rank draws the same token.

Commands: add_request, abort, step, add_prefix, take_prefix, release, restore, score (COMMANDS).
Read-only calls (snapshot, stats, prefix_progress) run on the leader only: a snapshot is written
once, by rank 0. A new Engine method that changes state must be added here too, or the ranks'
block tables drift apart.
PrefixHandles travel as ids (each rank numbers the handles it creates in the same order).

    # every rank:
    ctx = ParallelContext.init(rank, world, tp, ep, init_method=...)
    model = load_sharded(ckpt, ctx, device=...)
    if ctx.is_leader:
        eng = LeaderEngine(model, ctx, tokenizer)      # an Engine; AsyncLeaderEngine(eng) to serve
        ...; eng.shutdown_followers()                   # (AsyncLeaderEngine.close() does it)
    else:
        follow(ReplicaEngine(model, ctx))               # returns when the leader shuts down

A command a follower fails on fails the same way on the leader (same state, same code), which
reports it; a failure only one rank sees (a dead peer, a device fault) breaks the next collective
on the others, within the process group's timeout, and the replica reports unhealthy. A failure
that leaves the ranks' states apart (e.g. an out-of-memory on one GPU only, which fails a request
there and nowhere else) is caught before the next step: every step starts with an all-gather of
each rank's state digest (request ids, cached lengths, blocks in use), and a mismatch raises
ReplicaDiverged on every rank: the leader's streams get an error, the followers stop, and the
replica's health check fails so Serve replaces it.

    .venv/bin/python -m pytest -q tests/model/parallel/test_parity.py -p no:cacheprovider
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging

import torch

from dsa_rag.model.engine.engine import AsyncEngine, Engine, PrefixHandle, Snapshot
from dsa_rag.model.engine.sampling import SamplingParams
from dsa_rag.model.parallel.dist import ParallelContext
from dsa_rag.model.parallel.fingerprint import sharded_fingerprint

log = logging.getLogger("dsa_rag.model.parallel.engine")
STOP = "stop"


@dataclasses.dataclass(frozen=True)
class _HandleRef:
    pid: int


@dataclasses.dataclass(frozen=True)
class _Fp8Tensor:
    """A float8 tensor as its bytes: torch's pickle cannot carry float8 storages."""

    data: torch.Tensor  # uint8
    dtype: str


_FP8 = {str(d): d for d in (torch.float8_e4m3fn, torch.float8_e5m2)}


class ReplicaDiverged(RuntimeError):
    """The ranks of a replica no longer hold the same engine state; the replica must be replaced."""


class ReplicaEngine(Engine):
    """An Engine one rank of a replica runs (the followers use it as is). Construction is a
    collective (the fingerprint samples every rank's weights)."""

    def __init__(self, model, ctx: ParallelContext, tokenizer=None, **kw):
        super().__init__(model, tokenizer, **kw)
        self.ctx = ctx
        plan = getattr(model, "shard_plan", None)
        if plan is not None:
            self._fingerprint = sharded_fingerprint(model, plan)
        self._handles: dict[int, PrefixHandle] = {}
        self._pids = itertools.count()

    def _register(self, h: PrefixHandle) -> PrefixHandle:
        h.replica_pid = next(self._pids)
        self._handles[h.replica_pid] = h
        return h

    def _resolve(self, x):
        if isinstance(x, _HandleRef):
            return self._handles[x.pid]
        if isinstance(x, _Fp8Tensor):
            return x.data.view(_FP8[x.dtype])
        if isinstance(x, tuple):
            return tuple(self._resolve(v) for v in x)
        if isinstance(x, dict):
            return {k: self._resolve(v) for k, v in x.items()}
        return x

    def state_digest(self) -> int:
        """What every rank's engine must agree on before a step: running requests (id, cached
        length, tokens), blocks in use, live prefix handles."""
        h = hashlib.blake2b(digest_size=8)
        for rid in sorted(self.running):
            r = self.running[rid]
            h.update(f"{rid}:{r.seq.length}:{len(r.tokens)};".encode())
        h.update(f"|{self.pool.used_blocks()}|{sorted(self._handles)}|{sorted(self._prefixes)}".encode())
        return int.from_bytes(h.digest(), "little", signed=True)

    def check_in_step(self) -> None:
        """A collective: raise ReplicaDiverged on every rank if their states differ."""
        if self.ctx.world == 1:
            return
        got = self.ctx.all_gather_cpu(torch.tensor([self.state_digest()], dtype=torch.int64)).flatten()
        if not bool((got == got[0]).all()):
            raise ReplicaDiverged(f"replica ranks' engine states differ before a step (digests {got.tolist()}); "
                                  f"this replica must be restarted")

    # handles are created / dropped in these, on every rank in the same order
    def take_prefix(self, rid: int):
        h = super().take_prefix(rid)
        return None if h is None else self._register(h)

    def restore(self, snapshot, metadata=None) -> PrefixHandle:
        return self._register(super().restore(snapshot, metadata))

    def release(self, handle: PrefixHandle) -> None:
        super().release(handle)
        self._handles.pop(getattr(handle, "replica_pid", None), None)


def _ref(x):
    if isinstance(x, PrefixHandle):
        if not hasattr(x, "replica_pid"):
            raise ValueError("this PrefixHandle was not made by this replica's engine")
        return _HandleRef(x.replica_pid)
    return x


def _ids(x):
    return [int(t) for t in (x.tolist() if torch.is_tensor(x) else x)]


class LeaderEngine(ReplicaEngine):
    """Rank 0's engine: every state-changing call is broadcast to the followers, then run here."""

    def _send(self, name: str, *args, **kw) -> None:
        self.ctx.broadcast_object((name, tuple(_ref(a) for a in args), {k: _ref(v) for k, v in kw.items()}))

    def add_request(self, prompt_ids, params: SamplingParams | None = None, prefix=None, request_id=None) -> int:
        params = params or SamplingParams()
        if not params.greedy and params.seed is None:  # every rank must draw the same tokens
            params = dataclasses.replace(params, seed=int(torch.randint(0, 2**62, (1,)).item()))
        rid = self.new_request_id() if request_id is None else request_id
        ids = _ids(prompt_ids)
        self._send("add_request", ids, params, prefix, rid)
        return super().add_request(ids, params, prefix, rid)

    def abort(self, rid: int) -> None:
        self._send("abort", rid)
        super().abort(rid)

    def step(self):
        self._send("step")
        self.check_in_step()
        return super().step()

    def add_prefix(self, ids, prefix=None, request_id=None) -> int:
        rid = self.new_request_id() if request_id is None else request_id
        ids = _ids(ids)
        self._send("add_prefix", ids, prefix, rid)
        return super().add_prefix(ids, prefix, rid)

    def take_prefix(self, rid: int):
        self._send("take_prefix", rid)
        return super().take_prefix(rid)

    def release(self, handle: PrefixHandle) -> None:
        self._send("release", handle)
        super().release(handle)

    def restore(self, snapshot, metadata=None) -> PrefixHandle:
        # The snapshot's tensors travel pickled over the gloo group. A cluster with a shared blob
        # store could send the key instead and let each rank read the file itself.
        if isinstance(snapshot, Snapshot):
            tensors, metadata = snapshot.tensors, snapshot.metadata
        else:
            tensors = snapshot
        wire = {k: _Fp8Tensor(t.view(torch.uint8), str(t.dtype)) if str(t.dtype) in _FP8 else t
                for k, t in tensors.items()}
        self._send("restore", wire, None if metadata is None else dict(metadata))
        return super().restore(dict(tensors), metadata)

    def score(self, prompt_ids, continuation_ids, prefix=None) -> list[float]:
        prompt_ids, continuation_ids = _ids(prompt_ids), _ids(continuation_ids)
        self._send("score", prompt_ids, continuation_ids, prefix)
        return super().score(prompt_ids, continuation_ids, prefix)

    def shutdown_followers(self) -> None:
        """Release the followers from `follow` (they return); the leader's engine stays usable on
        its own only if world == 1."""
        if self.ctx.world > 1:
            self.ctx.broadcast_object((STOP, (), {}))


class AsyncLeaderEngine(AsyncEngine):
    """The leader's engine for the service (an EngineProtocol); close() also releases the followers."""

    def __init__(self, engine: LeaderEngine):
        super().__init__(engine)

    def close(self):
        try:
            self._exec.submit(self.engine.shutdown_followers).result(timeout=60)
        except Exception as e:  # noqa: BLE001 - a dead follower must not block shutdown
            log.warning("could not stop the followers: %s", e)
        super().close()


COMMANDS = ("add_request", "abort", "step", "add_prefix", "take_prefix", "release", "restore", "score")


def follow(engine: ReplicaEngine) -> int:
    """A follower's loop: run the leader's commands until it says stop -> commands run."""
    n = 0
    while True:
        name, args, kw = engine.ctx.broadcast_object()
        if name == STOP:
            return n
        if name not in COMMANDS:
            raise RuntimeError(f"follower got unknown command {name!r}")
        n += 1
        if name == "step":
            engine.check_in_step()  # ReplicaDiverged ends this loop: the follower's actor fails
        try:
            getattr(engine, name)(*engine._resolve(args), **engine._resolve(kw))
        except Exception as e:  # the leader, in the same state, fails the same way and reports it
            log.debug("rank %d: %s failed as on the leader: %s", engine.ctx.rank, name, e)
