"""Rank-sliced loading: each rank reads only its pieces of the checkpoint, straight from the
memory-mapped safetensors shards (`safe_open(...).get_slice(name)[a:b]` reads just those bytes),
dequantizing FP8 e4m3 weights with the matching rows / columns of their 128x128
`weight_scale_inv` blocks. The model is built on the meta device and sharded there first, so no
rank ever holds more than its own pieces (plus one tensor's dequantization scratch).

    ctx = ParallelContext.init(rank, world, tp=8, ep=8, init_method=...)
    model = load_sharded("/ckpt/DeepSeek-V3.2", ctx, device=f"cuda:{rank}", dtype="bfloat16")
    model.load_stats      # {"bytes_read": ..., "tensors": ...}: what this rank read from disk

Reads HF names (`model.layers.3.self_attn.q_b_proj.weight`) and the official converted ones
(`layers.3.attn.wq_b.weight` + `.scale`), as `dsa_rag.model.load.load_model` does; skips the MTP
layer (never asked for).

    .venv/bin/python -m pytest -q tests/model/parallel -p no:cacheprovider   (test_shard: pieces; test_parity: loading)
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from dsa_rag.model.config import ModelConfig
from dsa_rag.model.load import _keeps_fp32, _shard_files, as_dtype, build_model, hf_to_official, official_to_hf
from dsa_rag.model.model import Rotary
from dsa_rag.model.parallel.dist import ParallelContext
from dsa_rag.model.parallel.shard import Piece, shard_model

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequant_piece(w: torch.Tensor, scale: torch.Tensor, block: int, row0: int, col0: int) -> torch.Tensor:
    """FP8 piece w [m, n] whose element (0, 0) is (row0, col0) of the full weight, and the scale
    blocks covering it (scale[0, 0] = block (row0 // block, col0 // block)) -> fp32 [m, n]."""
    m, n = w.shape
    r, c = row0 % block, col0 % block
    s = scale.float().repeat_interleave(block, 0)[r: r + m].repeat_interleave(block, 1)[:, c: c + n]
    if s.shape != (m, n):
        raise ValueError(f"weight_scale_inv blocks {tuple(scale.shape)} do not cover a [{m}, {n}] piece at "
                         f"({row0}, {col0}) with {block}-wide blocks")
    return w.float() * s


def _index(d: Path, stack: ExitStack, n_layers: int) -> dict[str, tuple]:
    """our name -> (open shard, checkpoint key), headers only (nothing is read yet)."""
    out = {}
    for f in _shard_files(d):
        sf = stack.enter_context(safe_open(str(f), framework="pt"))
        for key in sf.keys():
            m = re.match(r"^(?:model\.)?layers\.(\d+)\.", key)
            if m and int(m.group(1)) >= n_layers:
                continue  # the MTP layer
            out[hf_to_official(key)] = (sf, key)
    return out


def _read(sf, key: str, piece: Piece) -> torch.Tensor:
    sl = sf.get_slice(key)
    if piece.dim is None:
        return sl[:]
    if piece.dim == 0:
        return sl[piece.start: piece.stop]
    return sl[:, piece.start: piece.stop]


def read_piece(index: dict, name: str, piece: Piece, block: int, shape) -> tuple[torch.Tensor, int]:
    """This rank's piece of tensor `name` (our name), FP8 dequantized -> (fp32/bf16 tensor, bytes read)."""
    if name not in index:
        raise KeyError(name)
    sf, key = index[name]
    t = _read(sf, key, piece)
    nbytes = t.numel() * t.element_size()
    if t.dtype in _FP8:
        sname = name[: -len("weight")] + "scale"
        if sname not in index:
            raise ValueError(f"tensor {official_to_hf(name)!r} is FP8 but has no weight_scale_inv beside it")
        ssf, skey = index[sname]
        row0 = piece.start if piece.dim == 0 else 0
        col0 = piece.start if piece.dim == 1 else 0
        m, n = t.shape
        rs = slice(row0 // block, (row0 + m - 1) // block + 1)
        cs = slice(col0 // block, (col0 + n - 1) // block + 1)
        s = ssf.get_slice(skey)[rs, cs]
        nbytes += s.numel() * s.element_size()
        try:
            t = dequant_piece(t, s, block, row0, col0)
        except ValueError as e:
            raise ValueError(f"tensor {official_to_hf(name)!r}: {e}") from None
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"tensor {official_to_hf(name)!r}: this rank's piece has shape {tuple(t.shape)}, "
                         f"the sharded model expects {tuple(shape)} (is the config the checkpoint's?)")
    return t, nbytes


def load_sharded(path: str | Path, ctx: ParallelContext, device="cpu", dtype=torch.float32, **overrides):
    """-> this rank's sharded Transformer (eval mode) with weights in `dtype` (fp32 where V3.2
    keeps fp32), read piece by piece; `model.shard_plan` and `model.load_stats` set."""
    dtype = as_dtype(dtype)
    d = Path(path)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d} is not a checkpoint directory (no config.json)")
    cfg = ModelConfig.from_json(d / "config.json", **overrides)
    model = build_model(cfg, dtype=dtype, meta=True)
    plan = shard_model(model, ctx)
    block = (cfg.quantization_config or {}).get("weight_block_size", [128, 128])[0]
    sd, read = {}, 0
    with ExitStack() as stack:
        index = _index(d, stack, cfg.num_hidden_layers)
        for name, meta in model.state_dict().items():
            piece = plan.pieces[name]
            src = name
            if name not in index and name == "head.weight" and cfg.tie_word_embeddings:
                src = "embed.weight"
            try:
                t, nb = read_piece(index, src, piece, block, meta.shape)
            except KeyError:
                raise ValueError(f"checkpoint {d} lacks tensor {official_to_hf(name)!r} "
                                 f"(full shape {plan.full[name][0]})") from None
            read += nb
            sd[name] = t.to(device=device, dtype=torch.float32 if _keeps_fp32(name) else dtype)
    model.load_state_dict(sd, assign=True)
    model.rotary = Rotary(cfg).to(device)  # non-persistent buffer: rebuild off meta
    model.load_stats = {"bytes_read": read, "tensors": len(sd),
                        "checkpoint_bytes": _checkpoint_bytes(d)}
    return model.eval()


def _checkpoint_bytes(d: Path) -> int | None:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        return json.loads(idx.read_text()).get("metadata", {}).get("total_size")
    return sum(f.stat().st_size for f in _shard_files(d))
