"""Tiny DeepSeek-V4 configs and random models for the V4 tests, and the transformers oracle.

The tiny config mixes every layer kind (HCA, CSA, sliding), hash-MoE and routed-MoE layers,
hc_mult 2, 16 indexer heads (exact-zero score ties, all heads ReLU'd to 0, become rare) and an
index_topk far below the number of CSA entries of the test sequences, so top-k drops entries.
HCA's ratio is 8 (128 in the real models) so that pooled entries exist on short sequences.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dsa_rag.model.v4.config import CSA, HCA, SLIDING, V4Config, YarnScaling
from dsa_rag.model.v4.load import save_v4_checkpoint
from dsa_rag.model.v4.model import Transformer


def tiny_v4_config(**overrides) -> V4Config:
    base = V4Config(
        name="test-tiny-v4", vocab_size=96, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, head_dim=32, q_lora_rank=32, qk_rope_head_dim=8, num_experts_per_tok=2,
        n_routed_experts=8, layer_types=[HCA, CSA, SLIDING, CSA],
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
        compress_rates={CSA: 4, HCA: 8}, hc_mult=2, hc_sinkhorn_iters=20, sliding_window=8, o_groups=2, o_lora_rank=16,
        index_n_heads=16, index_head_dim=16, index_topk=4, max_position_embeddings=1024, swiglu_limit=0.5,
        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=256),
    )
    return dataclasses.replace(base, **overrides).validate()


def random_v4(cfg: V4Config, seed: int = 0, std: float = 0.1) -> Transformer:
    """Random weights with every fp32 side parameter non-trivial (norms, sinks, ape, hc bases and
    scales, router bias), so parity checks them all."""
    m = Transformer(cfg).init_weights(seed=seed, std=std)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith("_scale"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(("attn_sink", "ape")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(("_base", "gate.bias")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return m.eval()


def v4_ids(n: int, seed: int) -> list[int]:
    """n random token ids of the tiny V4 configs' vocabulary (past the specials)."""
    return torch.randint(2, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_from(ours: Transformer, tmp: Path):
    """transformers.DeepseekV4ForCausalLM holding `ours`' weights, through a saved checkpoint."""
    from transformers import DeepseekV4ForCausalLM

    d = save_v4_checkpoint(ours, tmp / "hf-layout")
    return DeepseekV4ForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
