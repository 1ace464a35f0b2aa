"""ParallelContext: where this process sits in a replica (rank, world, tp, ep) and the collectives
the parallel model needs, each a no-op on one rank so the same code serves TP=1.

One replica = `world` ranks. Attention, the dense MLP and the vocabulary split over `tp` ranks,
routed experts over `ep` ranks. Each is either 1 or `world` (a replica is one node's GPUs, so
there is no second axis to lay them on): TP=world EP=1 slices every expert like the dense MLP;
TP=world EP=world gives each rank whole experts; TP=1 EP=world keeps attention replicated.

Two process groups: `group` carries the tensors (NCCL on GPUs, gloo on CPU), `cpu_group`
(always gloo) carries the leader's pickled engine commands, which NCCL cannot.

    ctx = ParallelContext.init(rank, world, tp=2, ep=2, init_method="tcp://127.0.0.1:29500")
    ctx.all_reduce(partial)                  # in place, sum over the replica
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of piece `index` when n items split into `parts` pieces of ceil(n / parts)
    (the last one shorter when n is no multiple: vocabularies such as 129280 / 3 are ragged)."""
    size = -(-n // parts)
    return min(n, index * size), min(n, (index + 1) * size)


def even_range(n: int, parts: int, index: int, what: str) -> tuple[int, int]:
    """[start, stop) of an even split; ValueError naming `what` when n does not divide."""
    if n % parts:
        raise ValueError(f"{what} = {n} does not split over {parts} ranks; choose a parallel size that divides it")
    size = n // parts
    return index * size, (index + 1) * size


@dataclass
class ParallelContext:
    rank: int = 0
    world: int = 1
    tp: int = 1
    ep: int = 1
    group: Any = None  # tensor collectives (None: the default group)
    cpu_group: Any = None  # pickled commands (gloo)

    def __post_init__(self):
        for name, v in (("tensor_parallel_size", self.tp), ("expert_parallel_size", self.ep)):
            if v not in (1, self.world):
                raise ValueError(f"{name} = {v}: must be 1 or the replica's world size {self.world} "
                                 f"(one replica spans one node; tp and ep share its ranks)")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world size {self.world}")

    @classmethod
    def single(cls) -> "ParallelContext":
        return cls()

    @classmethod
    def init(cls, rank: int, world: int, tp: int, ep: int = 1, *, init_method: str,
             backend: str | None = None, timeout_s: float = 120.0) -> "ParallelContext":
        """Join (or create) the replica's process group. backend None = nccl when CUDA is there,
        else gloo. timeout_s bounds every collective: a dead peer fails the others' next step
        instead of hanging them (what lets a replica report unhealthy)."""
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        timeout = datetime.timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)
        cpu = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
        return cls(rank, world, tp, ep, None, cpu)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def tp_rank(self) -> int:
        return self.rank if self.tp > 1 else 0

    @property
    def ep_rank(self) -> int:
        return self.rank if self.ep > 1 else 0

    # --- collectives (no-ops on one rank) ----------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the replica, in place; returns t."""
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def all_reduce_cpu(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a CPU tensor over the replica, in place (the gloo group: NCCL takes only CUDA tensors)."""
        if self.world > 1:
            dist.all_reduce(t, group=self.cpu_group)
        return t

    def all_gather_cpu(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's CPU tensor t, stacked [world, ...] (over the gloo group)."""
        if self.world == 1:
            return t[None]
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.cpu_group)
        return torch.stack(parts)

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's t along dim (same shape on every rank)."""
        if self.world == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim)

    def broadcast_object(self, obj=None):
        """The leader's obj on every rank (pickled over the gloo group)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.cpu_group)
