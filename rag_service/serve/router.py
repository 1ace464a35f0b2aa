"""Pack cache-affinity request router for the model replicas (Ray Serve's request-router
extension, `ray.serve.request_router.RequestRouter`, Ray >= 2.45).

A question over a pack goes to a replica that holds the pack's prefix KV cache in memory, so it
only pays for the question's tokens. The router reads the pack id from the call's `pack_id`
keyword argument (`handle.stream.remote(pack_id=..., params=...)`, also `warm.remote(pack_id=...)`)
and ranks replicas:

  1. holders of the pack whose queue is below `max_queue` (least loaded first);
  2. everyone else, least loaded first (a holder that is over the guard comes last).
A holder is a replica that (a) reported the pack warm in `record_routing_stats` (refreshed every
`request_routing_stats_period_s`), or (b) was chosen for the pack by this router before
(remembered at routing time, so a burst of questions over a cold pack does not prefill it on
every replica). A cold pack picks its replica by rendezvous hashing (highest hash of
(pack, replica) among the least loaded), which spreads packs over replicas and keeps the choice
stable across ingress replicas. The load guard: one hot pack can fill its holder's queue up to
`max_queue`; beyond that its questions spill to the least loaded replica, which restores the
prefix from the shared KV store (no re-prefill) and becomes a second holder.

Ray then probes queue lengths within the first rank and sends to the least loaded replica that
accepts (max_ongoing_requests), falling back to later ranks. Configure on the deployment:

    request_router_config:
      request_router_class: dsa_rag.rag_service.serve.router:PackAffinityRouter
      request_router_kwargs: {max_queue: 2}
      request_routing_stats_period_s: 1

Tests: `.venv/bin/python -m pytest -q tests/service/test_router.py`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import Iterable, Sequence

try:  # Ray is optional for `rank_replicas` (unit tests, docs)
    from ray.serve.request_router import PendingRequest, RequestRouter
except ImportError:  # pragma: no cover
    RequestRouter = object  # type: ignore[assignment,misc]
    PendingRequest = None  # type: ignore[assignment,misc]

log = logging.getLogger("ray.serve")

PACK_KWARG = "pack_id"
MAX_REMEMBERED_PACKS = 100_000


def _hrw(pack_id: str, replica_key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{pack_id}\0{replica_key}".encode(), digest_size=8).digest(), "big")


def rank_replicas(pack_id: str | None, replicas: Sequence, holders: set[str], queue_len, max_queue: int,
                  key=lambda r: r) -> list[list]:
    """The ranking policy as a pure function.
    replicas: candidates; key(r) -> the replica's id string; holders: ids holding the pack warm;
    queue_len(r) -> int | None (None = unknown, counted as 0); max_queue: the load guard.
    -> ranks, most preferred first (each a non-empty list)."""
    if not replicas:
        return []
    q = {key(r): (queue_len(r) or 0) for r in replicas}
    if pack_id is None:
        return [sorted(replicas, key=lambda r: q[key(r)])]
    warm = [r for r in replicas if key(r) in holders]
    ok = sorted((r for r in warm if q[key(r)] < max_queue), key=lambda r: q[key(r)])
    hot = [r for r in warm if q[key(r)] >= max_queue]
    rest = [r for r in replicas if key(r) not in holders]
    # least loaded first; equal load -> rendezvous hash, so a cold pack's choice is stable
    rest.sort(key=lambda r: (q[key(r)], -_hrw(pack_id, key(r))))
    hot.sort(key=lambda r: q[key(r)])
    ranks = [ok, rest[:1], rest[1:], hot] if ok else [rest[:1], rest[1:], hot]
    return [r for r in ranks if r]


class PackAffinityRouter(RequestRouter):
    """Prefers the replica holding the pack's prefix cache; least loaded otherwise; load-guarded.
    No FIFOMixin on purpose: a replica chosen for one pack's request must be given to that
    request (the base class matches by request id), not to the oldest pending request."""

    def initialize_state(self, max_queue: int = 2, **kwargs) -> None:
        self.max_queue = int(max_queue)
        self._affinity: OrderedDict[str, set[str]] = OrderedDict()  # pack id -> replica ids (this router's view)

    def _holders(self, pack_id: str, replicas: Iterable) -> set[str]:
        held = set(self._affinity.get(pack_id, ()))
        for r in replicas:
            stats = r.routing_stats or {}
            if pack_id in stats.get("warm_packs", ()):
                held.add(r.replica_id.unique_id)
        return held

    def _remember(self, pack_id: str, replica_id: str) -> None:
        s = self._affinity.setdefault(pack_id, set())
        s.add(replica_id)
        self._affinity.move_to_end(pack_id)
        while len(self._affinity) > MAX_REMEMBERED_PACKS:
            self._affinity.popitem(last=False)

    async def choose_replicas(self, candidate_replicas: list, pending_request: PendingRequest | None = None):
        if not hasattr(self, "max_queue"):  # initialize_state not called (no kwargs configured)
            self.initialize_state()
        pack_id = None
        if pending_request is not None:
            pack_id = (pending_request.kwargs or {}).get(PACK_KWARG)
            # every candidate is in our ranks: if none accepts, back off before trying again
            pending_request.routing_context.should_backoff = True
        live = {r.replica_id.unique_id for r in candidate_replicas}
        holders = self._holders(pack_id, candidate_replicas) & live if pack_id else set()
        cache = self.replica_queue_len_cache
        ranks = rank_replicas(pack_id, candidate_replicas, holders, lambda r: cache.get(r.replica_id),
                              self.max_queue, key=lambda r: r.replica_id.unique_id)
        if pack_id and ranks:
            # The first choice will hold the pack once it answers: remember it now, so the next
            # questions over this pack follow it even before the replica reports its stats.
            self._remember(pack_id, ranks[0][0].replica_id.unique_id)
        return ranks

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        dead = replica_id.unique_id
        for held in self._affinity.values():
            held.discard(dead)
