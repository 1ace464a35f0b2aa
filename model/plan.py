"""Memory planner for one replica: does a model fit N GPUs of M GB with tensor / expert
parallelism, and how many 128k-token packs' caches fit beside the weights?

The model is built on the meta device (no memory, any size: the real 671B V3.2, 744B GLM-5 or
284B DeepSeek-V4-Flash on this CPU) and sharded for rank 0 exactly as `dsa_rag.model.parallel.shard`
shards a serving rank (rank 0 holds the largest vocabulary piece), so "weights per rank" counts the
tensors a rank really holds: sliced heads, vocabulary and experts, plus everything replicated.
DeepSeek-V4 (model/v4/, presets deepseek-v4-flash / -pro or a `deepseek_v4` config.json) has no
parallel engine yet: its rank 0 is counted under the same TP / EP rules (`_v4_local_shape`).

    .venv/bin/python -m dsa_rag.model.plan --model deepseek-v3.2 --gpus 8 --gpu-mem 141
    .venv/bin/python -m dsa_rag.model.plan --model deepseek-v4-flash --gpus 8 --gpu-mem 80
    dsa-rag plan --model /ckpt/DeepSeek-V3.2 --gpus 8 --gpu-mem 80          # the same, from the CLI
    .venv/bin/python -m pytest -q tests/model/test_plan.py -p no:cacheprovider

What it counts (GB = 1e9 bytes):
  weights per rank  as this engine holds them: FP8 checkpoints are dequantized at load to the
                    serving dtype (bf16), norms / router / head in fp32. Also shown: the FP8 bytes
                    (e4m3 + a 4-byte scale per 128x128 block), what an engine with FP8 GEMMs
                    would hold (`weights="fp8"` plans with that; this engine has no FP8 GEMM yet).
  cache per token   every layer's latent (kv_lora_rank + rope dims, serving dtype) and every
                    full-index layer's indexer key (index_head_dim; e4m3 + fp32 scale under
                    fp8_numerics). Whole on every rank (MLA's latent is shared by all heads).
                    V4 (model/v4/cache.py): the compressed pools (head_dim per `ratio` tokens on
                    CSA / HCA layers) and the CSA indexer pools (index_head_dim per `ratio`), plus
                    a fixed part per sequence: sliding windows and compressor rolling state. Whole
                    on every rank too (V4's K=V is one head shared by all query heads).
  reserve           `reserve_frac` of each GPU for activations, workspace and the CUDA context.
  packs             floor((GPU - weights - reserve) / (cache per token * pack tokens + fixed)).
Not counted: the block pool's growth by doubling (a transient copy: size it up front with
n_blocks), and pipeline / multi-node layouts (a replica is one node).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dsa_rag.model.config import PRESETS, ModelConfig, preset
from dsa_rag.model.load import _fp8_quantized, as_dtype, build_model, checkpoint_dtype
from dsa_rag.model.parallel.dist import ParallelContext, even_range, split_range
from dsa_rag.model.parallel.shard import shard_model
from dsa_rag.model.v4 import cache as v4_cache
from dsa_rag.model.v4.config import PRESETS as V4_PRESETS
from dsa_rag.model.v4.config import V4Config
from dsa_rag.model.v4.config import preset as v4_preset
from dsa_rag.model.v4.load import cast_v4
from dsa_rag.model.v4.model import Transformer as V4Transformer

GB = 1e9
PACK_TOKENS = 131072


class PlanError(ValueError):
    """The model does not fit (or cannot be planned): the message names the shortfall."""


@dataclass
class Plan:
    model: str
    gpus: int
    gpu_mem_gb: float
    tensor_parallel_size: int
    expert_parallel_size: int
    dtype: str
    weights_mode: str  # "bf16": as this engine loads them; "fp8": FP8-resident (not implemented)
    weights_gb: float  # per rank, in weights_mode
    weights_dequant_gb: float  # per rank, as this engine holds them
    weights_fp8_gb: float  # per rank, FP8 e4m3 + scales
    kv_bytes_per_token: float  # latent cache, all layers (V4: compressed pools; a fraction when a ratio says so)
    index_bytes_per_token: float  # indexer keys (+ scales), full-index layers (V4: CSA indexer pools)
    fixed_bytes_per_pack: int  # what does not grow with the pack (V4: windows, compressor state; V3.2: 0)
    pack_tokens: int
    pack_gb: float  # cache of one pack, per rank
    reserve_gb: float
    free_gb: float  # per rank after weights and reserve
    packs_per_replica: int
    fits: bool
    shortfall: str | None

    def text(self) -> str:
        tok = self.kv_bytes_per_token + self.index_bytes_per_token
        kv, ix = ("compressed pools", "indexer pools") if self.fixed_bytes_per_pack else ("latent", "indexer keys")
        lines = [
            f"model            {self.model}  ({self.dtype}; TP={self.tensor_parallel_size} EP={self.expert_parallel_size} "
            f"on {self.gpus} x {self.gpu_mem_gb:g} GB)",
            f"weights per rank {self.weights_gb:.1f} GB ({self.weights_mode}); dequantized {self.weights_dequant_gb:.1f} GB, "
            f"FP8-resident {self.weights_fp8_gb:.1f} GB",
            f"cache per token  {tok:,.0f} B = {kv} {self.kv_bytes_per_token:,.0f} B + {ix} "
            f"{self.index_bytes_per_token:,.0f} B (every rank holds the whole cache)",
        ]
        if self.fixed_bytes_per_pack:
            lines.append(f"cache per pack   + {self.fixed_bytes_per_pack:,} B fixed "
                         f"(sliding windows, compressor state)")
        lines += [
            f"one pack         {self.pack_tokens:,} tokens = {self.pack_gb:.2f} GB per rank",
            f"reserve          {self.reserve_gb:.1f} GB per rank (activations, workspace)",
            f"free for caches  {self.free_gb:.1f} GB per rank",
            f"packs/replica    {self.packs_per_replica}",
        ]
        lines.append("verdict          " + ("fits" if self.fits else f"DOES NOT FIT: {self.shortfall}"))
        return "\n".join(lines)


def _is_v4(d: dict) -> bool:
    arch = " ".join(d.get("architectures") or [])
    return str(d.get("model_type", "")).startswith("deepseek_v4") or "DeepseekV4" in arch


def _refuse_v4_overrides(overrides: dict) -> None:
    if overrides.get("fp8_numerics"):
        raise PlanError("--fp8-numerics sizes V3.2's FP8 indexer-key cache; DeepSeek-V4's caches (model/v4/cache.py) "
                        "have no FP8 layout here: drop the flag")
    overrides.pop("fp8_numerics", None)


def resolve_config(model: str, **overrides) -> tuple[ModelConfig | V4Config, torch.dtype]:
    """A preset name or a checkpoint dir (its config.json) -> (config, serving dtype). V4 presets and
    `deepseek_v4` configs give a V4Config (served in bf16 when the checkpoint says FP8 or nothing)."""
    try:
        if model in PRESETS:
            return preset(model, **overrides), checkpoint_dtype(model)
        if model in V4_PRESETS:
            _refuse_v4_overrides(overrides)
            return v4_preset(model, **overrides), torch.bfloat16
    except (TypeError, ValueError) as e:  # an override the config does not have
        raise PlanError(f"{model}: {e}") from None
    f = Path(model) / "config.json"
    if not f.exists():
        raise PlanError(f"{model} is neither a preset ({', '.join([*PRESETS, *V4_PRESETS])}) nor a directory "
                        f"with config.json")
    d = json.loads(f.read_text())
    overrides.setdefault("name", Path(model).resolve().name)
    try:
        if _is_v4(d):
            _refuse_v4_overrides(overrides)
            cfg = V4Config.from_hf_dict(d, **overrides)
        else:
            cfg = ModelConfig.from_hf_dict(d, **overrides)
    except (TypeError, ValueError) as e:
        raise PlanError(f"{f}: {e}") from None
    return cfg, checkpoint_dtype(model)


def cache_bytes_per_token(cfg: ModelConfig | V4Config, dtype: torch.dtype) -> tuple[float, float, int]:
    """(latent bytes, indexer-key bytes) per token over all layers, as the engine's BlockPool stores
    them, and the bytes per sequence that do not grow (0 for V3.2). V4: (compressed pools, indexer
    pools, windows + compressor state) from model/v4/cache.py."""
    act = torch.empty(0, dtype=dtype).element_size()
    if isinstance(cfg, V4Config):
        kv, ix = v4_cache.pool_bytes_per_token(cfg, act)
        return kv, ix, v4_cache.fixed_bytes(cfg, act)
    kv = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * act
    per_index = cfg.index_head_dim * 1 + 4 if cfg.fp8_numerics else cfg.index_head_dim * act
    return kv, len(cfg.full_index_layers) * per_index, 0


def _v4_fp8_quantized(name: str) -> bool:
    """Which V4 weights an FP8 release stores as e4m3 + block scales, in our (release) names: the
    2D projections except embedding, head, router and the compressor / indexer branch (BF16 in the
    release; v4/load.py `_release_fp8` says the same in transformers' names)."""
    if not name.endswith(".weight") or "norm" in name:
        return False
    return not (name.startswith(("embed.", "head.")) or ".ffn.gate." in name
                or ".compressor." in name or ".indexer." in name)


def _v4_local_shape(name: str, shape: tuple[int, ...], cfg: V4Config, ctx: ParallelContext) -> tuple[int, ...] | None:
    """Rank 0's piece of V4 parameter `name` (None: not on this rank), split as shard.py splits V3.2:
      attention heads (tp)  wq_b rows (head_dim per head), attn_sink, wo_a rows (whole output groups:
                            o_groups must divide), wo_b columns; indexer.wq_b rows, indexer.weights_proj rows
      vocabulary (tp)       embed and head rows, ceil(V / tp) on rank 0
      routed experts        ep > 1: whole experts [0, E / ep) on rank 0; ep = 1 < tp: every expert and
                            the shared one sliced on moe_intermediate_size (w1, w3 rows; w2 columns)
      replicated            wq_a, q_norm, wkv / kv_norm (the one K=V head), every compressor (CSA / HCA
                            and the indexer's), the hyper-connection mixers (hc_*), all norms, the router
                            (gate weight / bias / tid2eid), the shared expert under EP."""
    tp, r = ctx.tp, ctx.tp_rank
    parts = name.split(".")
    if tp > 1 and name in ("embed.weight", "head.weight"):
        v0, v1 = split_range(cfg.vocab_size, tp, r)
        return (v1 - v0, *shape[1:])
    if "experts" in parts or "shared_experts" in parts:
        if "experts" in parts and ctx.ep > 1:
            e0, e1 = even_range(cfg.n_routed_experts, ctx.ep, ctx.ep_rank, "n_routed_experts")
            return shape if e0 <= int(parts[parts.index("experts") + 1]) < e1 else None
        if tp == 1 or ctx.ep > 1:  # the shared expert under EP: replicated
            return shape
        a, b = even_range(cfg.moe_intermediate_size, tp, r, "moe_intermediate_size")
        return (b - a, shape[1]) if parts[-2] in ("w1", "w3") else (shape[0], b - a)
    if tp == 1 or "attn" not in parts or "compressor" in parts:
        return shape
    leaf = ".".join(parts[parts.index("attn") + 1:])
    if leaf in ("wq_b.weight", "attn_sink"):
        h0, h1 = even_range(cfg.num_attention_heads, tp, r, "num_attention_heads")
        return ((h1 - h0) * (shape[0] // cfg.num_attention_heads), *shape[1:])
    if leaf in ("wo_a.weight", "wo_b.weight"):
        g0, g1 = even_range(cfg.o_groups, tp, r, "o_groups")
        return (shape[0] // cfg.o_groups * (g1 - g0), shape[1]) if leaf == "wo_a.weight" else \
            (shape[0], shape[1] // cfg.o_groups * (g1 - g0))
    if leaf in ("indexer.wq_b.weight", "indexer.weights_proj.weight"):
        g0, g1 = even_range(cfg.index_n_heads, tp, r, "index_n_heads")
        return (shape[0] // cfg.index_n_heads * (g1 - g0), shape[1])
    return shape


def _rank_tensors(cfg: ModelConfig | V4Config, dtype: torch.dtype, ctx: ParallelContext):
    """(name, local shape, element bytes) of every tensor rank 0 holds, from a meta-device model,
    and the rule that says which of them an FP8 checkpoint quantizes."""
    if isinstance(cfg, V4Config):
        with torch.device("meta"):
            model = cast_v4(V4Transformer(cfg), dtype)
        out = []
        for name, p in model.state_dict().items():
            shape = _v4_local_shape(name, tuple(p.shape), cfg, ctx)
            if shape is not None:
                out.append((name, shape, p.element_size()))
        return out, _v4_fp8_quantized
    model = build_model(cfg, dtype=dtype, meta=True)
    shard_model(model, ctx)
    return [(n, tuple(p.shape), p.element_size()) for n, p in model.state_dict().items()], _fp8_quantized


def weights_per_rank(cfg: ModelConfig | V4Config, dtype: torch.dtype, world: int, tp: int, ep: int) -> tuple[int, int]:
    """(bytes as this engine holds them, bytes FP8-resident) of rank 0, from a meta-device model."""
    try:
        tensors, quantized = _rank_tensors(cfg, dtype, ParallelContext(0, world, tp, ep))
    except ValueError as e:
        raise PlanError(f"cannot shard {cfg.name} over TP={tp} EP={ep}: {e}") from None
    held = fp8 = 0
    for name, shape, elem in tensors:
        numel = math.prod(shape)
        held += numel * elem
        if quantized(name) and len(shape) == 2:
            m, n = shape
            fp8 += numel + (-(-m // 128)) * (-(-n // 128)) * 4
        else:
            fp8 += numel * elem
    return held, fp8


def plan_replica(model: str | ModelConfig, gpus: int, gpu_mem_gb: float, *, tp: int | None = None,
                 ep: int | None = None, weights: str = "bf16", dtype=None, reserve_frac: float = 0.1,
                 pack_tokens: int = PACK_TOKENS, _weights: tuple[int, int] | None = None, **overrides) -> Plan:
    """Plan one replica of `gpus` GPUs with `gpu_mem_gb` GB each. tp / ep: None = gpus (ep = 1 for
    a dense model). weights: "bf16" (what this engine loads) or "fp8" (FP8-resident weights).
    dtype: the serving dtype (None = the checkpoint's). Never raises for not fitting: see
    `Plan.fits` / `Plan.shortfall`, or `check_fits`."""
    if gpus < 1 or gpu_mem_gb <= 0:
        raise PlanError(f"need gpus >= 1 and gpu_mem > 0, got {gpus} and {gpu_mem_gb}")
    if weights not in ("bf16", "fp8"):
        raise PlanError(f"weights: 'bf16' (as this engine loads them) or 'fp8', got {weights!r}")
    if isinstance(model, (ModelConfig, V4Config)):
        cfg, ck_dtype = model, torch.bfloat16
    else:
        cfg, ck_dtype = resolve_config(model, **overrides)
    dt = as_dtype(dtype) if dtype is not None else ck_dtype
    tp = gpus if tp is None else tp
    moe = isinstance(cfg, V4Config) or cfg.first_k_dense_replace < cfg.num_hidden_layers  # V4: MoE on every layer
    ep = (gpus if moe else 1) if ep is None else ep
    try:
        ParallelContext(0, gpus, tp, ep)
    except ValueError as e:
        raise PlanError(str(e)) from None
    held, fp8 = _weights or weights_per_rank(cfg, dt, gpus, tp, ep)
    w = held if weights == "bf16" else fp8
    kv, ix, fixed = cache_bytes_per_token(cfg, dt)
    pack = (kv + ix) * pack_tokens + fixed
    mem = gpu_mem_gb * GB
    reserve = reserve_frac * mem
    free = mem - w - reserve
    packs = max(0, int(free // pack))
    shortfall = None
    if free < 0:
        shortfall = (f"weights need {w / GB:.1f} GB per rank ({weights}) + {reserve / GB:.1f} GB reserve = "
                     f"{(w + reserve) / GB:.1f} GB, {-free / GB:.1f} GB more than a {gpu_mem_gb:g} GB GPU holds")
        if weights == "bf16" and fp8 + reserve <= mem:
            shortfall += f"; FP8-resident weights ({fp8 / GB:.1f} GB/rank) would fit, but this engine has no FP8 GEMM yet"
        else:
            need = (w + pack) / (1 - reserve_frac)  # w + reserve_frac * M + one pack <= M
            shortfall += f"; one pack needs GPUs of >= {need / GB:.0f} GB at this TP/EP"
    elif packs == 0:
        shortfall = (f"one {pack_tokens:,}-token pack needs {pack / GB:.2f} GB of cache per rank, only "
                     f"{free / GB:.2f} GB is left after weights and reserve ({(pack - free) / GB:.2f} GB short)")
    return Plan(cfg.name, gpus, gpu_mem_gb, tp, ep, str(dt).removeprefix("torch."), weights, w / GB, held / GB,
                fp8 / GB, kv, ix, fixed, pack_tokens, pack / GB, reserve / GB, free / GB, packs, shortfall is None,
                shortfall)


def check_fits(model, gpus: int, gpu_mem_gb: float, **kw) -> Plan:
    """plan_replica, raising PlanError (naming the shortfall) when not even one pack fits: the
    start-up check of a parallel replica."""
    p = plan_replica(model, gpus, gpu_mem_gb, **kw)
    if not p.fits:
        raise PlanError(f"{p.model} on {gpus} x {gpu_mem_gb:g} GB (TP={p.tensor_parallel_size} "
                        f"EP={p.expert_parallel_size}): {p.shortfall}")
    return p


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True,
                    help="a preset (deepseek-v3.2, glm-5, deepseek-v4-flash, ...) or a checkpoint dir")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-mem", type=float, default=141.0, help="GB per GPU (H200 141, H100 80)")
    ap.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: --gpus)")
    ap.add_argument("--ep", type=int, default=None, help="expert parallel size (default: --gpus for MoE)")
    ap.add_argument("--weights", choices=("bf16", "fp8"), default="bf16",
                    help="bf16: as this engine loads them (FP8 dequantized); fp8: FP8-resident")
    ap.add_argument("--dtype", default=None, help="serving dtype (default: the checkpoint's)")
    ap.add_argument("--fp8-numerics", action="store_true", help="FP8 indexer-key cache (V3.2's kernels)")
    ap.add_argument("--reserve-frac", type=float, default=0.1)
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args) -> int:
    """Print the plan; exit status 1 (and the shortfall on stderr) when it does not fit."""
    over = {"fp8_numerics": True} if args.fp8_numerics else {}
    try:
        p = plan_replica(args.model, args.gpus, args.gpu_mem, tp=args.tp, ep=args.ep, weights=args.weights,
                         dtype=args.dtype, reserve_frac=args.reserve_frac, **over)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(p)) if args.json else p.text())
    if not p.fits:
        print(f"error: {p.model} does not fit: {p.shortfall}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
