"""Checkpoint loading and saving.

`load_model(path_or_preset, device="cpu", dtype=torch.float32, **overrides)` reads
  - a preset name (`dsa-tiny`: the weights shipped in model/weights/dsa-tiny/ when present,
    otherwise a seeded random init, said in a log line), or
  - a HF directory: config.json + model.safetensors or model.safetensors.index.json (shards),
    with FP8 e4m3 weights + 128x128 `weight_scale_inv` (dequantized to `dtype`), HF names
    (`model.layers.3.self_attn.q_a_proj.weight`) or the official converted names
    (`layers.3.attn.wq_a.weight` + `.scale`). The MTP layer `model.layers.{n_layers}` is skipped.
A DeepSeek-V4 directory (`model_type: deepseek_v4`) is refused with a ValueError naming what loads
it (`dsa_rag.model.v4.load.load_v4_model`; `load_engine` routes it to `V4Engine` itself).
The model is built on the meta device, so the 671B config costs no memory until tensors arrive.
`dtype` (torch.float32 / bfloat16 / float16, or its name) is the serving dtype of every weight
except those V3.2 keeps in fp32 (`_keeps_fp32`: norms, the router, the indexer's weights_proj,
the lm head); activations and caches follow the weights. `checkpoint_dtype(path_or_preset)` is
the dtype a checkpoint was saved for (its config's `torch_dtype`, or transformers' `dtype`).
`cast_model(model, dtype)` converts a built model the same way (tests, benchmarks).

`load_any(path, device="cpu")` also reads a training run dir (`<dir>/ckpt.pt`, written by
`dsa_rag.model.training.train`), else what `load_model` reads: what the eval, the probes and the
indexer fit take as `--model`.

`save_checkpoint(model, path, fp8_weights=False, shard_bytes=None)` writes the official HF layout
(what the tests use to make tiny random DeepSeek-V3.2 checkpoints), `torch_dtype` included.

    .venv/bin/python -m dsa_rag.model.load dsa-tiny        # load and print the parameter count
    .venv/bin/python -m pytest -q tests/model/test_load.py
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsa_rag.model import fp8
from dsa_rag.model.config import ModelConfig, preset, PRESETS
from dsa_rag.model.model import Transformer

log = logging.getLogger("dsa_rag.model.load")
WEIGHTS_DIR = Path(__file__).parent / "weights"

# HF name piece -> official module name piece (applied in order, on "."-separated names)
_HF_TO_OFFICIAL = [
    (r"^model\.embed_tokens\.", "embed."),
    (r"^model\.norm\.", "norm."),
    (r"^lm_head\.", "head."),
    (r"^model\.layers\.", "layers."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.self_attn\.", ".attn."),
    (r"\.attn\.q_a_proj\.", ".attn.wq_a."),
    (r"\.attn\.q_a_layernorm\.", ".attn.q_norm."),
    (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
    (r"\.attn\.kv_a_proj_with_mqa\.", ".attn.wkv_a."),
    (r"\.attn\.kv_a_layernorm\.", ".attn.kv_norm."),
    (r"\.attn\.kv_b_proj\.", ".attn.wkv_b."),
    (r"\.attn\.o_proj\.", ".attn.wo."),
    (r"\.mlp\.", ".ffn."),
    (r"\.gate_proj\.", ".w1."),
    (r"\.up_proj\.", ".w3."),
    (r"\.down_proj\.", ".w2."),
    (r"\.e_score_correction_bias$", ".bias"),
    (r"\.weight_scale_inv$", ".scale"),
]
_OFFICIAL_TO_HF = [
    ("embed.", "model.embed_tokens."), ("norm.", "model.norm."), ("head.", "lm_head."),
]


def hf_to_official(name: str) -> str:
    for pat, rep in _HF_TO_OFFICIAL:
        name = re.sub(pat, rep, name)
    return name


def official_to_hf(name: str) -> str:
    """layers.3.attn.wq_a.weight -> model.layers.3.self_attn.q_a_proj.weight (inverse map)."""
    for a, b in _OFFICIAL_TO_HF:
        if name.startswith(a):
            return b + name[len(a):]
    pieces = {".attn_norm.": ".input_layernorm.", ".ffn_norm.": ".post_attention_layernorm.",
              ".attn.wq_a.": ".self_attn.q_a_proj.", ".attn.q_norm.": ".self_attn.q_a_layernorm.",
              ".attn.wq_b.": ".self_attn.q_b_proj.", ".attn.wkv_a.": ".self_attn.kv_a_proj_with_mqa.",
              ".attn.kv_norm.": ".self_attn.kv_a_layernorm.", ".attn.wkv_b.": ".self_attn.kv_b_proj.",
              ".attn.wo.": ".self_attn.o_proj.", ".attn.indexer.": ".self_attn.indexer.", ".ffn.": ".mlp.",
              ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}
    name = "model." + name
    for a, b in pieces.items():
        name = name.replace(a, b)
    if name.endswith(".gate.bias"):
        name = name[: -len("bias")] + "e_score_correction_bias"
    return name


# Kept in fp32 whatever the model dtype (as V3.2 does): router, indexer weights_proj, lm head, norms.
def _keeps_fp32(name: str) -> bool:
    return name.endswith(("gate.weight", "gate.bias", "weights_proj.weight", "head.weight")) or "norm" in name


def _fp8_quantized(name: str) -> bool:
    """Which weights the official checkpoint stores as FP8 + weight_scale_inv."""
    if not name.endswith(".weight") or "norm" in name:
        return False
    return not (name.startswith(("embed.", "head.")) or name.endswith(("gate.weight", "weights_proj.weight")))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# Checkpoints whose weights are FP8 serve in bf16 (DeepSeek's own choice for V3.2).
_FP8_NAMES = ("fp8", "float8", "float8_e4m3fn", "f8_e4m3")


def as_dtype(dtype) -> torch.dtype:
    """torch.float32 / bfloat16 / float16, or one of their names ("bfloat16", "torch.bfloat16",
    "bf16", ...) -> the torch dtype. Anything else is a ValueError naming the choices."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (what config.json's torch_dtype holds)."""
    return str(as_dtype(dtype)).removeprefix("torch.")


def checkpoint_dtype(path_or_preset: str | Path = "dsa-tiny") -> torch.dtype:
    """The dtype a checkpoint is meant to run in: config.json's `torch_dtype` (or `dtype`, as
    transformers 5 writes it; FP8 weights -> bfloat16), float32 when it says none. Presets: the
    shipped weights' config.json, bfloat16 for the deepseek-v3.2 shape."""
    p = str(path_or_preset)
    if p in PRESETS:
        shipped = WEIGHTS_DIR / p
        if (shipped / "config.json").exists():
            return checkpoint_dtype(shipped)
        return torch.bfloat16 if preset(p).quantization_config else torch.float32
    f = Path(p) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{p} is neither a preset ({', '.join(PRESETS)}) nor a directory with config.json")
    d = json.loads(f.read_text())
    for key in ("torch_dtype", "dtype"):
        v = d.get(key)
        if isinstance(v, str) and v.strip():
            name = v.strip().lower().removeprefix("torch.")
            if name in _FP8_NAMES:
                return torch.bfloat16
            try:
                return as_dtype(name)
            except ValueError:
                raise ValueError(f"{f}: {key} {v!r} is not a dtype this engine runs in "
                                 f"(one of {', '.join(DTYPES)}, or fp8 weights)") from None
    return torch.float32


def cast_model(model: Transformer, dtype) -> Transformer:
    """Convert every parameter to `dtype` except those kept in fp32 (`_keeps_fp32`), in place.
    What `build_model` / `load_model` do; use it instead of `model.to(dtype)`, which would also
    round the router, the norms, the indexer's weights_proj and the lm head."""
    dtype = as_dtype(dtype)
    for name, p in model.named_parameters():
        want = torch.float32 if _keeps_fp32(name) else dtype
        if p.dtype != want:
            p.data = p.data.to(want)
    return model


def _shard_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        return [d / f for f in sorted(set(wm.values()))]
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model.safetensors, model.safetensors.index.json or *.safetensors in {d}")
    return files


def build_model(cfg: ModelConfig, device="cpu", dtype=torch.float32, meta: bool = False) -> Transformer:
    with torch.device("meta" if meta else device):
        m = Transformer(cfg)
    return cast_model(m, dtype)


def load_state_dict_from_dir(d: Path, cfg: ModelConfig, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Read every shard, map names to ours, dequantize FP8 blocks (in fp32, then rounded once to
    `dtype`, as V3.2's weight_dequant), drop the MTP layer."""
    dtype = as_dtype(dtype)
    raw: dict[str, torch.Tensor] = {}
    skipped_mtp = 0
    n = cfg.num_hidden_layers
    for f in _shard_files(d):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                m = re.match(r"^(?:model\.)?layers\.(\d+)\.", key)
                if m and int(m.group(1)) >= n:
                    skipped_mtp += 1
                    continue
                raw[hf_to_official(key)] = sf.get_tensor(key)
    if skipped_mtp:
        log.info("skipped %d tensors of the MTP layer(s) model.layers.%d+ (not used for generation)", skipped_mtp, n)
    block = (cfg.quantization_config or {}).get("weight_block_size", [128, 128])[0]
    out = {}
    for name, t in raw.items():
        if name.endswith(".scale"):
            continue
        scale = raw.get(name[: -len("weight")] + "scale") if name.endswith(".weight") else None
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if scale is None:
                raise ValueError(f"tensor {name!r} is FP8 but has no weight_scale_inv beside it")
            try:
                t = fp8.weight_dequant(t, scale, block, torch.float32)
            except ValueError as e:
                raise ValueError(f"tensor {name!r}: {e}") from None
        out[name] = t.to(torch.float32 if _keeps_fp32(name) else dtype)
    return out


def load_model(path_or_preset: str | Path = "dsa-tiny", device="cpu", dtype=torch.float32, **overrides) -> Transformer:
    """-> Transformer in eval mode, its weights in `dtype` (a torch dtype or its name) except the
    fp32 ones (`_keeps_fp32`). overrides: ModelConfig fields (e.g. fp8_numerics=True,
    dense_attention=True). A DeepSeek-V4 checkpoint dir (config.json model_type deepseek_v4) is
    a ValueError naming `load_v4_model` / `load_engine`: its network is not this Transformer."""
    dtype = as_dtype(dtype)
    p = str(path_or_preset)
    if p in PRESETS:
        shipped = WEIGHTS_DIR / p
        if (shipped / "config.json").exists():
            return load_model(shipped, device, dtype, **overrides)
        cfg = preset(p, **overrides)
        log.warning("no trained weights shipped for %s (looked in %s): using a seeded random init", p, shipped)
        return build_model(cfg, device, dtype).init_weights(seed=0).eval()
    d = Path(p)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d} is neither a preset ({', '.join(PRESETS)}) nor a directory with config.json")
    _refuse_v4(d)
    cfg = ModelConfig.from_json(d / "config.json", **overrides)
    model = build_model(cfg, device, dtype, meta=True)
    sd = load_state_dict_from_dir(d, cfg, dtype)
    expected = dict(model.state_dict())
    missing = [k for k in expected if k not in sd]
    if "head.weight" in missing and cfg.tie_word_embeddings and "embed.weight" in sd:
        sd["head.weight"] = sd["embed.weight"].float()
        missing.remove("head.weight")
    if missing:
        shown = ", ".join(f"{official_to_hf(k)} {tuple(expected[k].shape)}" for k in missing[:8])
        raise ValueError(f"checkpoint {d} lacks {len(missing)} tensors, e.g. {shown}")
    unexpected = [k for k in sd if k not in expected]
    unused_index = [k for k in unexpected if re.match(r"^layers\.(\d+)\.attn\.indexer\.", k)
                    and not cfg.layer_has_indexer(int(k.split(".")[1]))]
    if unused_index:
        # A checkpoint with an indexer on every layer, run with an indexer plan (index_every):
        # the shared layers' indexers are not used.
        log.info("indexer plan: %d indexer tensors of shared layers are not used", len(unused_index))
        for k in unused_index:
            del sd[k]
        unexpected = [k for k in unexpected if k not in set(unused_index)]
    if unexpected:
        raise ValueError(f"checkpoint {d} has tensors this config does not use: {', '.join(unexpected[:8])}")
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ValueError(f"tensor {official_to_hf(k)!r} has shape {tuple(t.shape)}, the config expects {tuple(expected[k].shape)}")
    model.load_state_dict({k: v.to(device) for k, v in sd.items()}, assign=True)
    model.rotary = model.rotary.__class__(cfg).to(device)  # non-persistent buffer: rebuild off meta
    return model.eval()


def _refuse_v4(d: Path) -> None:
    """A DeepSeek-V4 dir (config.json model_type deepseek_v4) is V4's own network, with another
    forward and cache than this module's Transformer: say what loads it. (Not loaded from here:
    model/v4/load.py builds on this module, and the package keeps no import cycles.)"""
    try:
        model_type = json.loads((d / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # ModelConfig.from_json says what is wrong with the file
    if model_type == "deepseek_v4":
        raise ValueError(f"{d} is a DeepSeek-V4 checkpoint: load_model builds DeepSeek-V3.2 / GLM-5 networks. "
                         f"Load it with dsa_rag.model.v4.load.load_v4_model({str(d)!r}, device, dtype), or serve it "
                         f"with dsa_rag.model.engine.factory.load_engine (a V4Engine) / `dsa-rag serve --model`")


def load_any(path: str | Path, device="cpu") -> Transformer:
    """-> Transformer in eval mode from a training run dir (its ckpt.pt: the config and the weights
    as training left them) or from anything `load_model` reads (a preset or a weights dir)."""
    p = Path(path)
    if (p / "ckpt.pt").exists():
        ck = torch.load(p / "ckpt.pt", map_location="cpu", weights_only=False)
        m = build_model(ck["cfg"], device)
        m.load_state_dict(ck["model"])
        return m.eval()
    return load_model(path, device=device)


def save_checkpoint(model: Transformer, path: str | Path, fp8_weights: bool = False, shard_bytes: int | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json + safetensors in HF names; fp8_weights stores the official FP8 layout
    (e4m3 + weight_scale_inv per 128x128 block); shard_bytes splits into shards with an index."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg.to_hf_dict()
    cfg["torch_dtype"] = "bfloat16" if fp8_weights else dtype_name(model.embed.weight.dtype)
    if fp8_weights:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        hf = official_to_hf(name)
        t = t.detach().cpu().contiguous()
        if fp8_weights and _fp8_quantized(name):
            q, s = fp8.weight_quant(t)
            tensors[hf] = q
            tensors[hf[: -len("weight")] + "weight_scale_inv"] = s
        else:
            tensors[hf] = t if _keeps_fp32(name) or not fp8_weights else t.to(torch.bfloat16)
    tensors.update(extra_tensors or {})
    if not shard_bytes:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        nb = t.numel() * t.element_size()
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += nb
    shards.append(cur)
    weight_map = {}
    for i, sh in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(d / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in sh})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return d


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    m = load_model(sys.argv[1] if len(sys.argv) > 1 else "dsa-tiny")
    print(m.cfg.name, sum(p.numel() for p in m.parameters()) / 1e6, "M parameters")
