"""Start a replica's ranks: `start_rank` is what each rank runs (a Ray actor in a placement-group
bundle, or a local process), `spawn` starts N local processes for tests and CPU runs.

    # every rank of one replica (rank 0 gets the engine, the others serve until it shuts down):
    eng = start_rank(rank, world, "/ckpt/dir", tp=2, ep=2, init_method="tcp://10.0.0.5:29500")

    # N local processes, gloo (what the tests do):
    spawn(my_fn, 2, extra_arg)          # my_fn(rank, world, init_method, extra_arg) in each process

    .venv/bin/python -m pytest -q tests/model/parallel/test_parity.py -p no:cacheprovider
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from dsa_rag.model.config import PRESETS
from dsa_rag.model.engine.engine import Engine
from dsa_rag.model.load import WEIGHTS_DIR
from dsa_rag.model.parallel.dist import ParallelContext
from dsa_rag.model.parallel.engine import LeaderEngine, ReplicaEngine, follow
from dsa_rag.model.parallel.load import load_sharded
from dsa_rag.model.plan import GB, PACK_TOKENS, check_fits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(rank: int, device: str | None = None) -> str:
    """None: this rank's GPU (cuda:<rank % devices>) when CUDA is there, else cpu."""
    if device:
        return device
    if torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"
    return "cpu"


def checkpoint_dir(model: str | Path) -> Path:
    """A checkpoint dir, or a preset with shipped weights (model/weights/<name>/): rank-sliced
    loading reads files, so a preset without weights (a random init) cannot be served this way."""
    p = str(model)
    if p in PRESETS:
        if (WEIGHTS_DIR / p / "config.json").exists():
            return WEIGHTS_DIR / p
        raise ValueError(f"preset {p!r} has no shipped weights to load rank by rank; give a checkpoint directory")
    if not (Path(p) / "config.json").exists():
        raise FileNotFoundError(f"{p} is neither a preset with weights ({', '.join(PRESETS)}) nor a checkpoint directory")
    return Path(p)


def start_rank(rank: int, world: int, model: str, *, tp: int, ep: int = 1, init_method: str,
               device: str | None = None, dtype=torch.float32, tokenizer=None, timeout_s: float = 120.0,
               engine_kw: dict | None = None, gpu_mem_gb: float | None = None, pack_tokens: int = PACK_TOKENS,
               **overrides) -> Engine | None:
    """Join the replica, load this rank's pieces of `model` (a checkpoint dir), build its engine.
    Rank 0: returns the LeaderEngine (the caller drives it, e.g. through AsyncEngine, and calls
    shutdown_followers() at the end). Other ranks: follow the leader and return None when it stops.
    gpu_mem_gb: the device memory the start-up check plans with (None: the GPU's own on CUDA, no
    check on CPU); PlanError (naming the shortfall) if the weights and one `pack_tokens` pack do
    not fit."""
    model = checkpoint_dir(model)
    dev = rank_device(rank, device)
    if dev.startswith("cuda"):
        torch.cuda.set_device(dev)
        if gpu_mem_gb is None:
            gpu_mem_gb = torch.cuda.get_device_properties(dev).total_memory / GB
    if gpu_mem_gb is not None:
        # The planner's check before anything is loaded or joined: a replica that cannot hold its
        # weights and one pack fails here, naming the shortfall, not in an out-of-memory later.
        check_fits(str(model), world, gpu_mem_gb, tp=tp, ep=ep, dtype=dtype, pack_tokens=pack_tokens, **overrides)
    ctx = ParallelContext.init(rank, world, tp, ep, init_method=init_method, timeout_s=timeout_s)
    m = load_sharded(model, ctx, device=dev, dtype=dtype, **overrides)
    if ctx.is_leader:
        return LeaderEngine(m, ctx, tokenizer, **(engine_kw or {}))
    follow(ReplicaEngine(m, ctx, tokenizer, **(engine_kw or {})))
    return None


def _entry(rank, fn, world, init_method, threads, args):
    torch.set_num_threads(threads)
    fn(rank, world, init_method, *args)


def spawn(fn, world: int, *args, threads: int = 1) -> None:
    """Run fn(rank, world, init_method, *args) in `world` fresh processes; raises if one fails.
    fn must be importable (a module-level function)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    init = f"tcp://127.0.0.1:{free_port()}"
    torch.multiprocessing.spawn(_entry, args=(fn, world, init, threads, args), nprocs=world, join=True)
