"""Load and save DeepSeek-V4 checkpoints.

Three spellings are read:
  - transformers' (`model.layers.3.self_attn.compressor.indexer.q_b_proj.weight`, experts fused as
    `mlp.experts.gate_up_proj` [E, 2I, D] / `down_proj` [E, D, I]), what `save_pretrained` writes;
  - DeepSeek's release names (`layers.3.attn.indexer.wq_b.weight`, per-expert `ffn.experts.7.w1`),
    which are this package's own parameter names, so they need no mapping;
  - what transformers' `save_pretrained` writes: release names under `model.` (its conversion
    mapping reversed), with the attention's kv norm as `attn.norm`.
FP8 e4m3 weights are dequantized with their block scales, named `weight_scale_inv` (HF) or `scale`
(release), block size from `quantization_config.weight_block_size` (default 128); a float8_e8m0
(power-of-two) scale tensor works the same way. FP4 routed experts (`expert_dtype: fp4`, the
official release) are int8 tensors of two e2m1 values per byte (low nibble first) with one E8M0
scale per row and 32 columns, the format of transformers' FP8Experts(expert_dtype="fp4") and its
Fp8Dequantize; `fp4_dequant` unpacks them (fp32), `save_v4_checkpoint(fp4_experts=True)` writes them.
The MTP layer(s) (`mtp.*`, `model.layers.{n}`+) are skipped.

    from dsa_rag.model.v4.load import load_v4_model, save_v4_checkpoint
    model = load_v4_model("/ckpt/tiny-v4")                  # eval mode, fp32
    .venv/bin/python -m dsa_rag.model.v4.load DIR            # load and print the parameter count
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
from dsa_rag.model.load import _shard_files, as_dtype
from dsa_rag.model.v4.config import V4Config
from dsa_rag.model.v4.model import Transformer

log = logging.getLogger("dsa_rag.model.v4.load")

# transformers name piece -> release name piece, applied in order.
_HF_TO_OURS = [
    (r"^model\.embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^model\.norm\.", "norm."),
    (r"^model\.hc_head\.hc_", "hc_head_"),
    (r"^model\.layers\.", "layers."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.compressor\.kv_proj\.", ".compressor.wkv."),
    (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.compressor\.position_bias$", ".compressor.ape"),
    (r"\.attn\.q_a_proj\.", ".attn.wq_a."),
    (r"\.attn\.q_a_norm\.", ".attn.q_norm."),
    (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
    (r"\.attn\.kv_proj\.", ".attn.wkv."),
    (r"\.attn\.o_a_proj\.", ".attn.wo_a."),
    (r"\.attn\.o_b_proj\.", ".attn.wo_b."),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.weight_scale_inv$", ".scale"),
    # save_pretrained writes release names by reversing its renames, which turns the attention's
    # `kv_norm` into `attn.norm` (the compressors' `norm` is spelled the same way).
    (r"\.attn\.norm\.", ".attn.kv_norm."),
]


def hf_to_ours(name: str) -> str:
    for pat, rep in _HF_TO_OURS:
        name = re.sub(pat, rep, name)
    return name


def ours_to_hf_names(model: Transformer) -> dict[str, str]:
    """Our parameter name -> transformers' name, found by mapping every HF name of this config
    forward (so the two maps cannot drift apart). Fused expert tensors are handled by the callers."""
    out = {}
    for name in hf_names(model.cfg):
        out[hf_to_ours(name)] = name
    return out


def hf_names(cfg: V4Config) -> list[str]:
    """The non-expert tensor names transformers' DeepseekV4ForCausalLM has for `cfg`."""
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
             "model.hc_head.hc_fn", "model.hc_head.hc_base", "model.hc_head.hc_scale"]
    for i, t in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [f"{p}{s}_hc.{k}" for s in ("attn", "ffn") for k in ("fn", "base", "scale")]
        a = p + "self_attn."
        names += [a + f"{k}.weight" for k in ("q_a_proj", "q_a_norm", "q_b_proj", "kv_proj", "kv_norm", "o_a_proj",
                                             "o_b_proj")] + [a + "sinks"]
        if cfg.ratio(i):
            c = a + "compressor."
            names += [c + "kv_proj.weight", c + "gate_proj.weight", c + "kv_norm.weight", c + "position_bias"]
        if t == "compressed_sparse_attention":
            x = a + "compressor.indexer."
            names += [x + "kv_proj.weight", x + "gate_proj.weight", x + "kv_norm.weight", x + "position_bias",
                      x + "q_b_proj.weight", x + "scorer.weights_proj.weight"]
        m = p + "mlp."
        names += [m + "gate.weight", m + ("gate.tid2eid" if cfg.mlp_layer_types[i] == "hash_moe"
                                         else "gate.e_score_correction_bias")]
        names += [m + f"shared_experts.{k}.weight" for k in ("gate_proj", "up_proj", "down_proj")]
    return names


# Kept in fp32 whatever the serving dtype (transformers' _keep_in_fp32_modules_strict).
def keeps_fp32(name: str) -> bool:
    return ("norm" in name or "hc_" in name or name.endswith(("attn_sink", "ape", "gate.bias")))


def cast_v4(model: Transformer, dtype) -> Transformer:
    dtype = as_dtype(dtype)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
    return model


# FP4 (e2m1) value of each nibble: bit 3 the sign, then 0, 0.5, 1, 1.5, 2, 3, 4, 6 (OCP MX).
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_BLOCK = 32  # columns per scale: what the V4 release (and transformers' FP8Experts "fp4") use


def is_fp4(t: torch.Tensor) -> bool:
    """Packed FP4 as V4's release and transformers store it: int8 (or float4_e2m1fn_x2) bytes."""
    return t.dtype == torch.int8 or t.dtype == getattr(torch, "float4_e2m1fn_x2", None)


def _scale_fp32(scale: torch.Tensor) -> torch.Tensor:
    """Block scales as fp32: float8_e8m0fnu / float converts as is; uint8 bytes are E8M0
    exponents, 2 ** (byte - 127) (how some exports store e8m0, and how transformers reads them)."""
    return (scale.float() - 127.0).exp2() if scale.dtype == torch.uint8 else scale.float()


def fp4_dequant(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """packed [..., rows, cols / 2] (two e2m1 values per byte, the low nibble the even column),
    scale [..., rows / bm, cols / bn] (the block from the grid: 1 x 32 in V4's release) -> fp32
    [..., rows, cols] = value * its block's scale. transformers' Fp8Dequantize does the same."""
    u8 = packed.contiguous().view(torch.uint8)
    lut = torch.tensor(E2M1, dtype=torch.float32, device=packed.device)
    vals = lut[torch.stack([u8 & 0xF, u8 >> 4], -1).long()].flatten(-2)         # [..., rows, cols]
    s = _scale_fp32(scale)
    rows, cols = vals.shape[-2:]
    if s.dim() != vals.dim() or rows % s.shape[-2] or cols % s.shape[-1]:
        raise ValueError(f"FP4 weight of {rows} x {cols} values: its scale grid {tuple(scale.shape)} does not tile it")
    return vals * s.repeat_interleave(rows // s.shape[-2], -2).repeat_interleave(cols // s.shape[-1], -1)


def fp4_quant(w: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., rows, cols] -> (packed int8 [..., rows, cols / 2], scale float8_e8m0fnu
    [..., rows, cols / block]): per row and `block` columns a power-of-two scale with the block's
    largest |w| at most 6, values rounded to the nearest e2m1. What tests write FP4 experts with."""
    *lead, rows, cols = w.shape
    if cols % block or block % 2:
        raise ValueError(f"fp4_quant: {cols} columns do not split into blocks of {block}")
    wb = w.float().reshape(*lead, rows, cols // block, block)
    amax = wb.abs().amax(-1, keepdim=True).clamp_min(2.0 ** -126)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 6.0)))                        # [..., rows, nb, 1]
    mag = torch.tensor(E2M1[:8], dtype=torch.float32)
    x = (wb / scale).flatten(-2)                                                  # [..., rows, cols]
    code = (x.abs()[..., None] - mag).abs().argmin(-1) | ((x < 0).long() << 3)    # nearest magnitude, sign
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed.contiguous(), scale[..., 0].to(torch.float8_e8m0fnu).contiguous()


def _dequant(name: str, t: torch.Tensor, scale: torch.Tensor | None, block: int) -> torch.Tensor:
    if is_fp4(t) and "experts" in name:
        if scale is None:
            raise ValueError(f"tensor {name!r} is packed FP4 ({t.dtype}) but has no scale / weight_scale_inv beside it")
        return fp4_dequant(t, scale)
    if t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t
    if scale is None:
        raise ValueError(f"tensor {name!r} is FP8 but has no weight_scale_inv / scale beside it")
    scale = scale.float()
    if t.dim() == 3:  # fused experts [E, M, N] with scales [E, M / block, N / block]
        return torch.stack([fp8.weight_dequant(t[e], scale[e], block) for e in range(t.shape[0])])
    return fp8.weight_dequant(t, scale, block)


def read_state_dict(d: Path, cfg: V4Config) -> dict[str, torch.Tensor]:
    """Every shard of `d`, names mapped to ours, FP8 dequantized (fp32), fused experts split."""
    raw: dict[str, torch.Tensor] = {}
    n = cfg.num_hidden_layers
    for f in _shard_files(d):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                m = re.match(r"^(?:model\.)?layers\.(\d+)\.", key)
                if key.startswith("mtp.") or (m and int(m.group(1)) >= n):
                    continue
                raw[hf_to_ours(key)] = sf.get_tensor(key)
    block = int(((cfg.quantization_config or {}).get("weight_block_size") or [128])[0])
    out = {}
    for name, t in raw.items():
        if name.endswith(".scale"):  # a block scale, read beside its weight
            continue
        if t.dtype == torch.uint8 and "experts" in name:
            raise ValueError(f"tensor {name!r} is uint8: not a packed expert format this loader knows (FP4 experts "
                             f"ship as int8, two e2m1 values per byte, with E8M0 scales per {FP4_BLOCK} columns)")
        scale = raw.get(name[: -len("weight")] + "scale") if name.endswith(".weight") else None
        if name.endswith("_scale_inv"):  # fused expert scales: `experts.gate_up_proj_scale_inv`
            continue
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            t = _dequant(name, t, raw.get(name + "_scale_inv"), block).float()
            base = name.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    w1, w3 = t[e].chunk(2, dim=0)
                    out[f"{base}.{e}.w1.weight"], out[f"{base}.{e}.w3.weight"] = w1, w3
                else:
                    out[f"{base}.{e}.w2.weight"] = t[e]
            continue
        out[name] = _dequant(name, t, scale, block)
    return out


def is_v4_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a checkpoint dir whose config.json says model_type deepseek_v4."""
    f = Path(str(path)) / "config.json"
    try:
        return f.is_file() and json.loads(f.read_text()).get("model_type") == "deepseek_v4"
    except (OSError, ValueError):
        return False


def load_v4_model(path: str | Path, device="cpu", dtype=torch.float32, **overrides) -> Transformer:
    """A V4 checkpoint dir (config.json + safetensors) -> Transformer in eval mode."""
    d = Path(path)
    cfg = V4Config.from_json(d / "config.json", **overrides)
    cfg.name = d.name
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = read_state_dict(d, cfg)
    expected = dict(model.state_dict())
    if "head.weight" not in sd and cfg.tie_word_embeddings and "embed.weight" in sd:
        sd["head.weight"] = sd["embed.weight"]
    missing = [k for k in expected if k not in sd]
    if missing:
        shown = ", ".join(f"{k} {tuple(expected[k].shape)}" for k in missing[:8])
        raise ValueError(f"checkpoint {d} lacks {len(missing)} tensors, e.g. {shown}")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise ValueError(f"checkpoint {d} has tensors this config does not use: {', '.join(unexpected[:8])}")
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ValueError(f"tensor {k!r} has shape {tuple(t.shape)}, the config expects {tuple(expected[k].shape)}")
        if k.endswith("tid2eid"):
            sd[k] = t.long()
        else:
            sd[k] = t.to(torch.float32 if keeps_fp32(k) else as_dtype(dtype))
    model.load_state_dict({k: v.to(device) for k, v in sd.items()}, assign=True)
    model.rotary = model.rotary.__class__(cfg).to(device)  # non-persistent buffers: rebuild off meta
    return model.eval()


def save_v4_checkpoint(model: Transformer, path: str | Path, fp8_weights: bool = False, block: int = 128,
                       fp4_experts: bool = False) -> Path:
    """Write `model` in transformers' layout (config.json + model.safetensors). fp8_weights: 2D
    projection weights as e4m3 + `weight_scale_inv` (block x block), as FP8 releases ship them.
    fp4_experts: the routed experts as packed FP4 + E8M0 scales per 32 columns (`fp4_quant`),
    quantization_config expert_dtype "fp4", as the official V4 release ships them."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    names = ours_to_hf_names(model)
    out: dict[str, torch.Tensor] = {}
    for ours, hf in names.items():
        out[hf] = sd[ours].contiguous()
    for i in range(cfg.num_hidden_layers):
        e = f"layers.{i}.ffn.experts"
        E = cfg.n_routed_experts
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{e}.{j}.w1.weight"], sd[f"{e}.{j}.w3.weight"]], 0) for j in range(E)]).contiguous()
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [sd[f"{e}.{j}.w2.weight"] for j in range(E)]).contiguous()
    hf_cfg = cfg.to_hf_dict()
    if fp8_weights:
        for k in list(out):
            if _release_fp8(k):
                out[k], out[k[: -len("weight")] + "weight_scale_inv"] = fp8.weight_quant(out[k], block)
            elif not fp4_experts and k.endswith(("experts.gate_up_proj", "experts.down_proj")):  # per expert
                pairs = [fp8.weight_quant(w, block) for w in out[k]]
                out[k] = torch.stack([q for q, _ in pairs]).contiguous()
                out[k + "_scale_inv"] = torch.stack([s for _, s in pairs]).contiguous()
        hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [block, block]}
    if fp4_experts:
        for k in list(out):
            if k.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, M, N]: scales per row, 32 columns
                out[k], out[k + "_scale_inv"] = fp4_quant(out[k])
        hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [block, block], "expert_dtype": "fp4"}
    hf_cfg["torch_dtype"] = "float32"
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return d


def _release_fp8(hf_name: str) -> bool:
    """Which tensors an FP8 V4 release quantizes: the 2D projections, except the embedding, the
    head, the router and (transformers' notes) the compressor / indexer branch, shipped in BF16."""
    if not hf_name.endswith(".weight") or "norm" in hf_name:
        return False
    if hf_name.startswith(("model.embed_tokens", "lm_head")) or ".mlp.gate." in hf_name:
        return False
    return ".compressor." not in hf_name


if __name__ == "__main__":
    m = load_v4_model(sys.argv[1])
    print(json.dumps({"params": sum(p.numel() for p in m.parameters()), "layers": m.cfg.layer_types}))
