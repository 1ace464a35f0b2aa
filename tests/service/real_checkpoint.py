"""A tiny random DeepSeek-V3.2 (or GLM-5) checkpoint in the official layout, for the end-to-end
service tests (tests/service/test_real_checkpoint.py, test_real_checkpoint_glm5.py): what a GPU
user downloads, at a size a CPU runs.

    from tests.service.real_checkpoint import write_checkpoint
    d = write_checkpoint(tmp_path / "ckpt")     # -> the directory; `dsa-rag serve --model d`
    d = write_checkpoint(tmp_path / "glm", family="glm_moe_dsa")   # GLM-5.2-style: shared-index layers

GLM-5 (`glm_moe_dsa`, official_glm5_config): the same tensor names, one expert group, plain RoPE
(`rope_parameters`), an `eos_token_id` list, and `indexer_types` with a "shared" layer that ships
no indexer tensors (as GLM-5.2's release).

What is in the directory, as in the official HF repo (docs: ../shared/reference/dsa-spec.md §1-2):
  - config.json: `architectures` DeepseekV32ForCausalLM, `model_type` deepseek_v32, `torch_dtype`
    bfloat16, the index_* keys, `quantization_config` {fp8, e4m3, dynamic, [128, 128], ue8m0}, an
    MTP layer (`num_nextn_predict_layers` 1). Only keys the official config has; none of ours.
  - model-0000N-of-0000M.safetensors + model.safetensors.index.json (one shard per layer group).
    HF tensor names; the linears of attention, indexer (wq_b, wk) and MLP/experts as e4m3 with a
    float32 `weight_scale_inv` per 128x128 block (power-of-two scales, ue8m0; ragged edge blocks
    where a dim is no multiple of 128, as kv_a_proj_with_mqa's 576 rows are in the real one);
    embed_tokens, lm_head, mlp.gate and indexer.weights_proj in bf16; norms and the router bias
    in float32; the MTP layer `model.layers.{num_hidden_layers}` (eh_proj, enorm, hnorm,
    shared_head, a full decoder layer) which the loader must skip.
  - tokenizer.json: a byte-level BPE trained here with HF `tokenizers` on a few sentences, with
    DeepSeek's special tokens at ids 0 (bos) and 1 (eos); its vocabulary size is the config's
    `vocab_size`. tokenizer_config.json as HF writes it (LlamaTokenizerFast, bos/eos, template).

Weights are random (seeded): the model answers garbage; the test checks the serving path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
BLOCK = 128  # quantization_config.weight_block_size, as released
FP8_MAX = 448.0

# A few sentences to train the tokenizer on (the PDF the test uploads uses the same words, so
# BPE merges make multi-byte tokens out of them).
CORPUS = [
    "The access code of the Porto warehouse is 7351902.",
    "The Lisbon office opens at nine and closes at five.",
    "Revenue in 2023 was 41 million euros, up from 37 million in 2022.",
    "The report lists every warehouse, its manager and its access code.",
    "Question: What is the access code of the Porto warehouse?\nAnswer: 7351902",
    '<document name="report.pdf">\nThe manager of the Porto warehouse is Ana Silva.\n</document>\n',
    "Deliveries arrive on Tuesdays; returns are handled on Fridays by the logistics team.",
]

# Linears stored as e4m3 + weight_scale_inv in the official checkpoint (HF name suffixes).
_FP8_LINEARS = (
    "self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight", "self_attn.kv_a_proj_with_mqa.weight",
    "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight", "self_attn.indexer.wq_b.weight",
    "self_attn.indexer.wk.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight", "eh_proj.weight",
)
_BF16 = ("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight", "indexer.weights_proj.weight",
         "shared_head.head.weight")


def official_config(vocab_size: int) -> dict:
    """A tiny config.json with the keys (and only the keys) of DeepSeek-V3.2's. Shapes: two layers
    (one dense, one MoE with grouped routing and a shared expert), 8 heads, index_topk 64 (below
    the test's prompt lengths, so the FP8 indexer picks keys), head dims that make several weights
    span more than one 128x128 block with ragged edges (q_b_proj 192 rows, dense MLP 160 wide)."""
    return {
        "architectures": ["DeepseekV32ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 64,
        "index_head_dim": 32,
        "index_n_heads": 4,
        "index_topk": 64,
        "initializer_range": 0.02,
        "intermediate_size": 160,
        "kv_lora_rank": 32,
        "max_position_embeddings": 4096,
        "model_type": "deepseek_v32",
        "moe_intermediate_size": 32,
        "moe_layer_freq": 1,
        "n_group": 4,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 8,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 8,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 48,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [BLOCK, BLOCK]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 1024, "type": "yarn"},
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.44.2",
        "use_cache": True,
        "v_head_dim": 16,
        "vocab_size": vocab_size,
    }


# ------------------------------------------------------------------ tokenizer
def build_tokenizer(target_vocab: int = 512):
    """Byte-level BPE (HF `tokenizers`) trained on CORPUS; specials bos/eos/pad at ids 0/1/2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=target_vocab, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1, "specials must come first"
    return tok


def tokenizer_config() -> dict:
    """tokenizer_config.json as the official repo has it (abridged chat template)."""
    special = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True,  # noqa: E731
                         "rstrip": False, "single_word": False}
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": special(BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": special(EOS),
        "legacy": True,
        "model_max_length": 131072,
        "pad_token": special(PAD),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": (
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
            "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"),
    }


# ------------------------------------------------------------------ weights
def quantize_block_fp8(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [M, N] -> (e4m3 [M, N], float32 weight_scale_inv [ceil(M/b), ceil(N/b)]), one
    power-of-two (ue8m0) scale per block, so that W ~= W_fp8[i, j] * scale_inv[i // b, j // b]."""
    m, n = w.shape
    bm, bn = math.ceil(m / block), math.ceil(n / block)
    pad = torch.zeros(bm * block, bn * block)
    pad[:m, :n] = w.float()
    blocks = pad.view(bm, block, bn, block)
    amax = blocks.abs().amax((1, 3)).clamp_min(1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(bm * block, bn * block)[:m, :n]
    return q.contiguous().to(torch.float8_e4m3fn), scale.float().contiguous()


def _hf_tensors(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of the model (built from the config by the project's model code, named by
    the project's official<->HF map) plus the MTP layer the official checkpoint carries."""
    from dsa_rag.model.config import ModelConfig
    from dsa_rag.model.load import build_model, official_to_hf

    mc = ModelConfig.from_hf_dict(cfg)
    model = build_model(mc).init_weights(seed=seed, std=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        hf = official_to_hf(name)
        t = t.detach().float()
        if t.dim() == 1:  # non-trivial norms, LayerNorm bias and router bias
            noise = 0.1 * torch.randn(t.shape, generator=g)
            t = noise if hf.endswith("bias") else 1 + noise
        out[hf] = t
    # MTP layer model.layers.{n} (DeepSeek's next-token-prediction module): a decoder layer copy
    # plus its own projections; never used for generation.
    n, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    last = f"model.layers.{n - 1}."
    for k, v in list(out.items()):
        if k.startswith(last):
            out[f"model.layers.{n}." + k[len(last):]] = v.clone()
    out[f"model.layers.{n}.eh_proj.weight"] = torch.randn(h, 2 * h, generator=g) * 0.05
    out[f"model.layers.{n}.enorm.weight"] = torch.ones(h)
    out[f"model.layers.{n}.hnorm.weight"] = torch.ones(h)
    out[f"model.layers.{n}.shared_head.norm.weight"] = torch.ones(h)
    out[f"model.layers.{n}.shared_head.head.weight"] = out["lm_head.weight"].clone()
    return out


def _official_dtypes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cast as the release stores them: FP8 linears + scale_inv, bf16 embed/head/gate/weights_proj,
    float32 norms and biases."""
    out = {}
    for k, t in tensors.items():
        if k.endswith(_FP8_LINEARS):
            q, s = quantize_block_fp8(t)
            out[k], out[k[: -len("weight")] + "weight_scale_inv"] = q, s
        elif k.endswith(_BF16):
            out[k] = t.to(torch.bfloat16).contiguous()
        else:
            out[k] = t.float().contiguous()
    return out


def _shard_of(name: str, n_layers: int) -> int:
    """Shard 1: embed + dense layers; 2: the MoE layers + final norm + head; 3: the MTP layer."""
    if name.startswith(f"model.layers.{n_layers}."):
        return 3
    if name.startswith("model.layers.0.") or name.startswith("model.embed_tokens."):
        return 1
    return 2


def official_glm5_config(vocab_size: int) -> dict:
    """A tiny GLM-5.2-style config.json (glm_moe_dsa): three layers (one dense, two MoE), the middle
    one a "shared" indexer layer, 16 indexer heads, one expert group, plain RoPE."""
    cfg = official_config(vocab_size)
    for k in ("auto_map", "rope_scaling", "rope_theta", "ep_size", "transformers_version"):
        cfg.pop(k)
    cfg.update({
        "architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa", "num_hidden_layers": 3,
        "indexer_types": ["full", "shared", "full"], "index_n_heads": 16, "n_group": 1, "topk_group": 1,
        "eos_token_id": [1, 2], "rms_norm_eps": 1e-05, "head_dim": 8,
        "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"},
        "mlp_layer_types": ["dense", "sparse", "sparse"], "transformers_version": "5.25.0", "dtype": "bfloat16",
    })
    cfg.pop("torch_dtype")
    cfg["quantization_config"].pop("scale_fmt")
    return dict(sorted(cfg.items()))


CONFIGS = {"deepseek_v32": official_config, "glm_moe_dsa": official_glm5_config}


def write_checkpoint(path: str | Path, seed: int = 0, family: str = "deepseek_v32") -> Path:
    """Write the checkpoint directory (config.json, 3 safetensors shards + index, tokenizer.json,
    tokenizer_config.json, generation_config.json) -> its path. family: a key of CONFIGS."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False))
    cfg = CONFIGS[family](tok.get_vocab_size())
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
         "temperature": 0.6, "top_p": 0.95, "transformers_version": "4.44.2"}, indent=2))

    tensors = _official_dtypes(_hf_tensors(cfg, seed))
    n = cfg["num_hidden_layers"]
    shards: dict[int, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        shards.setdefault(_shard_of(k, n), {})[k] = t
    total = len(shards)
    weight_map, size = {}, 0
    for i in sorted(shards):
        fname = f"model-{i:05d}-of-{total:05d}.safetensors"
        save_file(shards[i], str(d / fname), metadata={"format": "pt"})
        for k, t in shards[i].items():
            weight_map[k] = fname
            size += t.numel() * t.element_size()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return d


if __name__ == "__main__":
    import sys

    print(write_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dsa-v32-tiny"))
