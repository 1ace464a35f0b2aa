"""The snapshot fingerprint of a sharded model, equal to `model_fingerprint` of the unsharded one.

Why: a prefix snapshot holds the latent KV and indexer-key caches, which are whole (not sharded)
on every rank and the same whatever the TP / EP sizes. So the prefix-KV store and the
cache-affinity router must see one fingerprint for the model at TP=1, 2 or 8: a pack prefilled by
an 8-GPU replica restores on a 1-GPU one and back. `model_fingerprint` hashes every parameter's
name, shape, dtype and 64 strided values; here the names, shapes and dtypes come from the plan's
full (unsharded) table and each sampled value from the one rank that holds it (a float32
all-reduce where the other ranks add exact zeros).

A collective: every rank of the replica calls it, in the same order.
tests/model/parallel/test_shard.py checks it equals `model_fingerprint` at world size 1.
"""

from __future__ import annotations

import hashlib
import json

import torch

from dsa_rag.model.engine.engine import cache_dtypes
from dsa_rag.model.parallel.shard import ShardPlan


def _sample_positions(shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return torch.arange(0, n, max(1, n // 64))[:64] if n else torch.zeros(0, dtype=torch.long)


def _local_sample(p: torch.Tensor, piece, shape, pos: torch.Tensor) -> torch.Tensor:
    """Values of the full tensor at flat positions `pos` that this rank holds; 0 elsewhere."""
    out = torch.zeros(pos.shape[0], dtype=torch.float32)
    flat = p.detach().reshape(-1)
    if piece.dim is None:
        return flat[pos.to(flat.device)].float().cpu()
    cols = shape[1] if len(shape) > 1 else 1
    rows, cs = pos // cols, pos % cols
    coord = rows if piece.dim == 0 else cs
    mine = (coord >= piece.start) & (coord < piece.stop)
    if piece.dim == 0:
        local = (rows - piece.start) * cols + cs
    else:
        local = rows * (piece.stop - piece.start) + (cs - piece.start)
    out[mine] = flat[local[mine].to(flat.device)].float().cpu()
    return out


def sharded_fingerprint(model, plan: ShardPlan) -> str:
    ctx = plan.ctx
    h = hashlib.sha256(json.dumps(model.cfg.fingerprint_fields(), sort_keys=True, default=str).encode())
    kv_dtype, ik_dtype = cache_dtypes(model)
    h.update(f"cache:kv={kv_dtype}:index_k={ik_dtype}:fp8_numerics={bool(model.cfg.fp8_numerics)}".encode())
    local = model.state_dict()
    samples = []
    for name, (shape, _) in plan.full.items():
        pos = _sample_positions(shape)
        piece = plan.pieces.get(name)
        p = local.get(name)
        if p is None or p.device.type == "meta" or (piece.replicated and ctx.rank != 0):
            samples.append(torch.zeros(pos.shape[0], dtype=torch.float32))
        else:
            samples.append(_local_sample(p, piece, shape, pos))
    values = ctx.all_reduce_cpu(torch.cat(samples)) if samples else torch.zeros(0)
    off = 0
    for name, (shape, dtype) in plan.full.items():
        # the dtype the rank holds (cast_model may have changed it after the plan was made)
        p = local.get(name)
        dtype = p.dtype if p is not None else dtype
        h.update(f"{name}:{shape}:{dtype}".encode())
        n = _sample_positions(shape).shape[0]
        if n:
            h.update(values[off: off + n].numpy().tobytes())
        off += n
    return h.hexdigest()[:32]
