"""DeepSeek-V4 configuration: a dataclass that reads the HF `config.json` of `model_type:
deepseek_v4` (transformers' `DeepseekV4Config`, including its legacy spellings) and two named
presets, `deepseek-v4-flash` and `deepseek-v4-pro`.

V4 is not V3.2 with a new indexer: attention is one shared K=V head of `head_dim` 512 over a
sliding window plus *compressed* KV entries, so it gets its own config rather than more fields on
ModelConfig. The per-layer schedule is `layer_types`:

- "sliding_attention": the window only (plain RoPE, `rope_theta`);
- "compressed_sparse_attention" (CSA): window + the indexer's top-k of entries pooled every
  `compress_rates[csa]` (4) tokens over overlapping windows of twice that width;
- "heavily_compressed_attention" (HCA): window + every entry pooled every `compress_rates[hca]`
  (128) tokens, no indexer.
CSA/HCA layers rotate with `compress_rope_theta` (YaRN when `rope_scaling` says so).

    .venv/bin/python -m dsa_rag.model.v4.config deepseek-v4-flash    # print a preset as config.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
MLP_TYPES = ("hash_moe", "moe")
_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}  # legacy `compress_ratios` ints


def default_layer_types(n: int) -> list[str]:
    """transformers' default schedule: two HCA layers, then HCA / CSA alternating."""
    return [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]


@dataclass
class YarnScaling:
    """YaRN of the compressed layers' RoPE. V4 keeps cos/sin unscaled (attention_factor 1)."""

    factor: float = 1.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass
class V4Config:
    # Names and defaults follow transformers' DeepseekV4Config (= V4-Flash).
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    q_lora_rank: int = 1024
    qk_rope_head_dim: int = 64
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    max_position_embeddings: int = 1048576
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: YarnScaling | None = None  # applies to CSA/HCA layers only
    layer_types: list[str] = field(default_factory=list)
    compress_rates: dict = field(default_factory=lambda: {CSA: 4, HCA: 128})
    mlp_layer_types: list[str] = field(default_factory=list)
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    torch_dtype: str | None = None
    quantization_config: dict | None = None
    name: str = "deepseek-v4-flash"
    model_type: str = "deepseek_v4"

    def __post_init__(self):
        n = self.num_hidden_layers
        if not self.layer_types:
            self.layer_types = default_layer_types(n)
        if not self.mlp_layer_types:
            self.mlp_layer_types = ["hash_moe"] * min(n, 3) + ["moe"] * max(0, n - 3)

    def validate(self) -> "V4Config":
        def need(ok, msg):
            if not ok:
                raise ValueError(f"V4 config {self.name}: {msg}")

        n = self.num_hidden_layers
        need(len(self.layer_types) == n, f"layer_types has {len(self.layer_types)} entries for {n} layers")
        need(all(t in LAYER_TYPES for t in self.layer_types), f"layer_types entries must be one of {LAYER_TYPES}")
        need(len(self.mlp_layer_types) == n, f"mlp_layer_types has {len(self.mlp_layer_types)} entries for {n} layers")
        need(all(t in MLP_TYPES for t in self.mlp_layer_types), f"mlp_layer_types entries must be one of {MLP_TYPES}")
        need(self.qk_rope_head_dim % 2 == 0 and self.qk_rope_head_dim <= self.head_dim,
             "qk_rope_head_dim must be even and <= head_dim")
        need(self.num_attention_heads % self.o_groups == 0, "num_attention_heads must divide into o_groups")
        need(self.scoring_func in ("sqrtsoftplus", "sigmoid", "softmax"), f"scoring_func {self.scoring_func!r} unknown")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok must be <= n_routed_experts")
        need(self.sliding_window >= 1 and self.hc_mult >= 1, "sliding_window and hc_mult must be >= 1")
        for t in (CSA, HCA):
            need(int(self.compress_rates.get(t, 0)) >= 1, f"compress_rates[{t!r}] must be >= 1")
        return self

    def ratio(self, layer: int) -> int:
        """Compression ratio of layer `layer` (0 for a sliding-only layer)."""
        t = self.layer_types[layer]
        return 0 if t == SLIDING else int(self.compress_rates[t])

    # ---- HF config.json ----
    @classmethod
    def from_hf_dict(cls, d: dict, **overrides) -> "V4Config":
        d = dict(d)
        if d.get("model_type", "deepseek_v4") != "deepseek_v4":
            raise ValueError(f"config model_type {d.get('model_type')!r} is not deepseek_v4")
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "name"}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        n = int(kw.get("num_hidden_layers", cls.num_hidden_layers))
        # Legacy spellings that transformers folds in (configs written before its rename).
        rates = dict(d.get("compress_rates") or {CSA: 4, HCA: 128})
        if d.get("compress_rate_csa") is not None:
            rates[CSA] = d["compress_rate_csa"]
        if d.get("compress_rate_hca") is not None:
            rates[HCA] = d["compress_rate_hca"]
        kw["compress_rates"] = {k: int(v) for k, v in rates.items()}
        if not d.get("layer_types") and d.get("compress_ratios") is not None:
            kw["layer_types"] = [_RATIO_TO_TYPE[int(r)] for r in d["compress_ratios"]]
        kw["layer_types"] = list(kw.get("layer_types") or default_layer_types(n))[:n]
        if not d.get("mlp_layer_types"):
            n_hash = int(d.get("num_hash_layers", 3) if d.get("num_hash_layers") is not None else 3)
            kw["mlp_layer_types"] = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
        kw["mlp_layer_types"] = list(kw["mlp_layer_types"])[:n]
        head_dim = int(kw.get("head_dim", cls.head_dim))
        if d.get("partial_rotary_factor") is not None:
            kw["qk_rope_head_dim"] = int(head_dim * float(d["partial_rotary_factor"]))
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        if "dtype" in d and "torch_dtype" not in d:
            kw["torch_dtype"] = d["dtype"]
        kw["rope_scaling"] = _read_compress_rope(d, kw)
        kw.update(overrides)
        return cls(**kw).validate()

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> "V4Config":
        return cls.from_hf_dict(json.loads(Path(path).read_text()), **overrides)

    def to_hf_dict(self) -> dict:
        """What transformers' DeepseekV4Config reads back to the same model."""
        d = dataclasses.asdict(self)
        for k in ("rope_scaling", "name", "qk_rope_head_dim", "torch_dtype"):
            d.pop(k)
        if self.quantization_config is None:
            d.pop("quantization_config")
        compress = {"rope_type": "default", "rope_theta": self.compress_rope_theta,
                    "partial_rotary_factor": self.qk_rope_head_dim / self.head_dim}
        if self.rope_scaling is not None:
            compress.update(rope_type="yarn", attention_factor=1.0, **dataclasses.asdict(self.rope_scaling))
        d["rope_parameters"] = {
            "main": {"rope_type": "default", "rope_theta": self.rope_theta,
                     "partial_rotary_factor": self.qk_rope_head_dim / self.head_dim},
            "compress": compress}
        d.update(architectures=["DeepseekV4ForCausalLM"], num_key_value_heads=1,
                 partial_rotary_factor=self.qk_rope_head_dim / self.head_dim, hidden_act="silu")
        if self.torch_dtype:
            d["torch_dtype"] = self.torch_dtype
        return d


def _read_compress_rope(d: dict, kw: dict) -> YarnScaling | None:
    """The compressed layers' YaRN: transformers nests it as rope_parameters["compress"]; older
    configs give a flat `rope_scaling` / `rope_parameters` with rope_type yarn."""
    rp = d.get("rope_parameters") or {}
    if isinstance(rp.get("compress"), dict):
        main, rp = rp.get("main") or {}, rp["compress"]
        if "rope_theta" in main and "rope_theta" not in d:
            kw["rope_theta"] = float(main["rope_theta"])
        if "rope_theta" in rp and "compress_rope_theta" not in d:
            kw["compress_rope_theta"] = float(rp["rope_theta"])
    else:
        rp = d.get("rope_scaling") or rp
    if (rp.get("rope_type") or rp.get("type")) != "yarn":
        return None
    return YarnScaling(factor=float(rp.get("factor", 1.0)),
                       original_max_position_embeddings=int(rp.get("original_max_position_embeddings", 65536)),
                       beta_fast=float(rp.get("beta_fast") or 32), beta_slow=float(rp.get("beta_slow") or 1))


def _flash() -> V4Config:
    # transformers' DeepseekV4Config defaults are V4-Flash (checkpoint DeepSeek-V4-Flash-Base);
    # YaRN x16 over 65536 on the compressed layers, as its config notes say.
    return V4Config(name="deepseek-v4-flash", rope_scaling=YarnScaling(factor=16.0)).validate()


def _pro() -> V4Config:
    # From transformers' notes (hidden 7168, 128 heads, o_groups 16, o_lora_rank 1024) and the
    # reported top-1024. NOT from an official config.json (none here): 61 layers, 384 experts and
    # q_lora_rank 1536 are assumptions in V3's proportions; load the real config.json to be exact.
    return V4Config(name="deepseek-v4-pro", hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
                    q_lora_rank=1536, o_groups=16, o_lora_rank=1024, n_routed_experts=384, index_topk=1024,
                    rope_scaling=YarnScaling(factor=16.0)).validate()


PRESETS = {"deepseek-v4-flash": _flash, "deepseek-v4-pro": _pro}


def preset(name: str, **overrides) -> V4Config:
    if name not in PRESETS:
        raise ValueError(f"unknown V4 preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), **overrides).validate()


if __name__ == "__main__":
    print(json.dumps(preset(sys.argv[1] if len(sys.argv) > 1 else "deepseek-v4-flash").to_hf_dict(), indent=2))
