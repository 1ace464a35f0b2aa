"""Tiny DeepSeek-V3.2 configs and checkpoints for the model tests, plus the transformers oracle."""

from __future__ import annotations

import dataclasses

import torch

from dsa_rag.model.config import ModelConfig, RopeScaling
from dsa_rag.model.engine.engine import Engine
from dsa_rag.model.load import build_model, official_to_hf


def tiny_config(seed: int = 0, **overrides) -> ModelConfig:
    """A small V3.2-shaped config: every feature on (YaRN, MoE with groups and shared experts, dense
    first layer) and index_topk far below the test sequence length so sparsity matters. 16 indexer
    heads make exact-zero score ties (all heads ReLU'd to 0) rare, so top-k is well defined."""
    base = ModelConfig(
        name=f"test-tiny-{seed}", vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        index_n_heads=16, index_head_dim=16, index_topk=24,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=1024, quant_block=16,
    )
    return dataclasses.replace(base, **overrides).validate()


def random_model(cfg: ModelConfig, seed: int = 0, std: float = 0.08):
    m = build_model(cfg).init_weights(seed=seed, std=std)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in m.named_parameters():  # non-trivial norms and routing bias
            if name.endswith("gate.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return m.eval()


def hf_model_from(ours):
    """transformers.DeepseekV32ForCausalLM (or GlmMoeDsaForCausalLM for a `glm_moe_dsa` config,
    with its indexer plan) holding exactly `ours`' (dequantized) weights."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM, GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    c = ours.cfg
    glm = c.model_type == "glm_moe_dsa"
    config_cls, model_cls = (GlmMoeDsaConfig, GlmMoeDsaForCausalLM) if glm else (DeepseekV32Config, DeepseekV32ForCausalLM)
    extra = {"indexer_types": list(c.indexer_types or ["full"] * c.num_hidden_layers)} if glm else {}
    rs = c.rope_scaling
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if rs is not None:
        rope = {"rope_type": "yarn", "rope_theta": c.rope_theta, "factor": rs.factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings,
                "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow, "mscale": rs.mscale,
                "mscale_all_dim": rs.mscale_all_dim}
    hc = config_cls(**extra,
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
        n_shared_experts=c.n_shared_experts, n_routed_experts=c.n_routed_experts,
        routed_scaling_factor=c.routed_scaling_factor, kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank,
        qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, qk_nope_head_dim=c.qk_nope_head_dim,
        n_group=c.n_group, topk_group=c.topk_group, num_experts_per_tok=c.num_experts_per_tok,
        norm_topk_prob=c.norm_topk_prob, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=rope, index_topk=c.index_topk,
        index_head_dim=c.index_head_dim, index_n_heads=c.index_n_heads,
        first_k_dense_replace=c.first_k_dense_replace, tie_word_embeddings=False,
    )
    hc._attn_implementation = "eager"
    hf = model_cls(hc).float().eval()
    sd = {}
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name, t in ours.state_dict().items():
        parts = name.split(".")
        if "experts" in parts and "shared_experts" not in parts:
            layer, e, w = int(parts[1]), int(parts[4]), parts[5]
            experts.setdefault((layer, e), {})[w] = t
            continue
        sd[official_to_hf(name)] = t.float()
    for layer in {k[0] for k in experts}:
        es = [experts[(layer, e)] for e in range(c.n_routed_experts)]
        sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([x["w1"], x["w3"]], 0) for x in es]).float()
        sd[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([x["w2"] for x in es]).float()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    return hf


# ---------------------------------------------------------------- dtype parity (tests/model/test_dtype_parity.py,
# benchmarks/dtype_parity.py)
LAYOUTS = ("official_fp8", "hf_save_pretrained")


def logit_error(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Distance of logits `got` from the reference `ref` (both [..., vocab]): the mean over positions
    of the relative L2 error |got - ref| / |ref|, its max, and the share of positions whose argmax
    agrees."""
    got, ref = got.detach().float(), ref.detach().float()
    rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    return {"rel_err": rel.mean().item(), "rel_err_max": rel.max().item(),
            "argmax_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "finite": bool(torch.isfinite(got).all())}


def hf_pretrained(path, dtype=torch.float32):
    """transformers' own load of a `save_pretrained` directory at `dtype` (its keep-in-fp32 rules)."""
    from transformers import DeepseekV32ForCausalLM

    hf = DeepseekV32ForCausalLM.from_pretrained(str(path), dtype=dtype)
    hf.config._attn_implementation = "eager"
    return hf.eval()


def write_checkpoint(model, path, layout: str, shard_bytes: int | None = 40_000):
    """Write `model` (ours) to `path` in one of LAYOUTS -> path:
    "official_fp8": the official layout (FP8 e4m3 + weight_scale_inv, sharded with an index);
    "hf_save_pretrained": transformers' `save_pretrained` of the same weights loaded by transformers
    in bf16 (per-expert tensors, `rope_parameters` in config.json): a bf16 checkpoint as HF writes it."""
    import tempfile
    from pathlib import Path

    from dsa_rag.model.load import save_checkpoint

    path = Path(path)
    if layout == "official_fp8":
        return save_checkpoint(model, path, fp8_weights=True, shard_bytes=shard_bytes)
    if layout != "hf_save_pretrained":
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    with tempfile.TemporaryDirectory() as tmp:
        hf_model_from(model).save_pretrained(tmp)
        hf_pretrained(tmp, torch.bfloat16).save_pretrained(str(path))
    return path


def indexer_selections(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Run `model` on `ids` [B, T] (a prefill from position 0) and return, per layer, the indexer's
    top-k key indices [B, T, index_topk] (the `trace` hook of the absorbed attention); needs
    T > index_topk (else there is no selection)."""
    got: dict[tuple[int, int], torch.Tensor] = {}

    def trace(layer, row, idx, mass):
        got[(layer, row)] = idx.detach().clone()

    with torch.no_grad():
        model(ids, trace=trace)
    B, L = ids.shape[0], model.cfg.num_hidden_layers
    return [torch.stack([got[(layer, b)] for b in range(B)]) for layer in range(L)]


def topk_overlap(a: torch.Tensor, b: torch.Tensor, topk: int) -> float:
    """Mean |a_t & b_t| / topk over the queries t that have more than topk causal keys (position
    t >= topk), for selections a, b [B, T, topk] (-1 = padding)."""
    a, b = a[:, topk:].long(), b[:, topk:].long()
    n = a.shape[-1]
    hits = (a.unsqueeze(-1) == b.unsqueeze(-2)) & (a.unsqueeze(-1) >= 0)
    return (hits.any(-1).sum(-1).float() / n).mean().item()


# ---------------------------------------------------------------- engine oracles
def ids_of(n: int, seed: int, vocab: int = 96) -> list[int]:
    """n random token ids past the byte tokenizer's specials."""
    return torch.randint(8, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def small_engine(model, **kw):
    """An Engine with tiny blocks and prefill chunks, so every test crosses block and chunk edges."""
    return Engine(model, **{"block_size": 8, "prefill_chunk": 16, **kw})


@torch.no_grad()
def greedy_full(model, ids, n: int) -> list[int]:
    """The oracle of cached generation: the plain forward over the whole sequence for every new
    token, no cache."""
    toks, out = list(ids), []
    for _ in range(n):
        t = int(model(torch.tensor([toks]))[0, -1].argmax())
        toks.append(t)
        out.append(t)
    return out
