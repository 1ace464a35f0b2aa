"""Model configuration: a dataclass that reads the official HF `config.json` of the DSA family it
runs (DeepSeek-V3.2(-Exp), `deepseek_v32`; GLM-5 / 5.1 / 5.2, `glm_moe_dsa`) and named presets
(`deepseek-v3.2`, the 671B shape; `glm-5`, `glm-5.1`, `glm-5.2`, the 744B-class shapes; `dsa-tiny`,
the CPU default).

The two families differ in three things this engine models: the indexer's RoPE layout (V3.2
rotates pairs (i, i + d/2), GLM-5 interleaved pairs (2i, 2i + 1): `index_rope_interleaved`), the
per-layer indexer plan (`indexer_types`: "full" layers run the lightning indexer, "shared" layers
reuse the previous full layer's top-k and ship no indexer weights; GLM-5.2 ships one, any model can
be given one with `index_every`), and the config keys that spell them.

    .venv/bin/python -m dsa_rag.model.config dsa-tiny        # print a preset as config.json
    .venv/bin/python -m dsa_rag.model.config glm-5.2
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RopeScaling:
    """YaRN parameters (`rope_scaling` in config.json). factor <= 1 means plain RoPE."""

    type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


INDEX_SCORES = ("relu", "mixture", "softmax_mixture")
INDEXER_TYPES = ("full", "shared")
MODEL_TYPES = {"deepseek_v32": "DeepseekV32ForCausalLM", "glm_moe_dsa": "GlmMoeDsaForCausalLM"}


def indexer_plan(n_layers: int, every: int = 1, offset: int = 1) -> list[str]:
    """Per-layer "full"/"shared" plan of cross-layer index reuse, with the schedule of
    transformers' GlmMoeDsaConfig (`index_topk_freq` = every, `index_skip_topk_offset` = offset):
    layer i runs the indexer iff max(i - offset + 1, 0) % every == 0. offset 1 gives layers
    0, every, 2*every, ...; GLM-5.2's "0, 1, 2, then every 4th" is every=4, offset=3."""
    if every < 1 or offset < 1:
        raise ValueError(f"indexer plan needs every >= 1 and offset >= 1, got every={every}, offset={offset}")
    return ["full" if max(i - offset + 1, 0) % every == 0 else "shared" for i in range(n_layers)]


@dataclass
class ModelConfig:
    # Names and defaults follow HF `DeepseekV32Config` (= the 671B model).
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # Lightning indexer
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    # How the indexer heads combine (our knob, not in HF configs): "relu" is V3.2's
    # sum_h w_h ReLU(q_h.k); "mixture" is log sum_h exp(b_h + q_h.k / sqrt(d)); "softmax_mixture"
    # also divides each head by its softmax normalizer over the causal keys, so softmax(I) is a
    # mixture of per-head softmaxes, the form of the dense attention's own p_t (see Indexer).
    index_score: str = "relu"
    # Indexer RoPE layout: False = V3.2's half-split pairs (i, i + d/2); True = GLM-5's interleaved
    # pairs (2i, 2i+1) (transformers' GlmMoeDsaIndexer applies apply_rotary_pos_emb_interleave).
    index_rope_interleaved: bool = False
    # Per-layer indexer plan: None = every layer "full"; else one of INDEXER_TYPES per layer. A
    # "shared" layer has no indexer: it attends to the keys the previous full layer selected, and
    # the engine keeps no indexer keys for it (see indexer_plan, full_index_layers).
    indexer_types: list[str] | None = None
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    first_k_dense_replace: int = 3
    # Norms, positions
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = field(default_factory=lambda: RopeScaling(factor=40.0))
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    num_nextn_predict_layers: int = 1
    # FP8 checkpoint format ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], ...})
    quantization_config: dict | None = None
    # Our own knobs (not in HF configs):
    # fp8_numerics: reproduce the official kernels' numerics (Hadamard + e4m3 act_quant of indexer q/k,
    # FP8-simulated c_kv). Off = exact fp32/bf16 math (what transformers does).
    fp8_numerics: bool = False
    # Block size of act_quant (official: 128).
    quant_block: int = 128
    # dense_attention: ignore the indexer and attend to every causal token (the "indexer off" baseline).
    dense_attention: bool = False
    # The HF family this config reads and writes (a key of MODEL_TYPES).
    model_type: str = "deepseek_v32"
    # Preset name / tokenizer kind (informational).
    name: str = "custom"
    tokenizer: str = "hf"

    # ---- derived ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def full_index_layers(self) -> list[int]:
        """The layers that run the lightning indexer (and cache indexer keys)."""
        if self.indexer_types is None:
            return list(range(self.num_hidden_layers))
        return [i for i, t in enumerate(self.indexer_types) if t == "full"]

    def layer_has_indexer(self, layer: int) -> bool:
        return self.indexer_types is None or self.indexer_types[layer] == "full"

    @property
    def softmax_scale(self) -> float:
        """MLA score scale: qk_head_dim^-0.5, times mscale^2 under YaRN (as transformers applies it)."""
        s = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.factor > 1 and rs.mscale_all_dim:
            m = 0.1 * rs.mscale_all_dim * math.log(rs.factor) + 1.0
            s = s * m * m
        return s

    def validate(self) -> "ModelConfig":
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid model config ({self.name}): {msg}")

        need(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim must be >= qk_rope_head_dim (RoPE on the first rope dims)")
        need(self.index_score in INDEX_SCORES, f"index_score {self.index_score!r} is not one of {INDEX_SCORES}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even")
        need(self.n_routed_experts % max(self.n_group, 1) == 0, "n_routed_experts must divide into n_group groups")
        need(self.topk_group <= self.n_group, "topk_group must be <= n_group")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok must be <= n_routed_experts")
        need(self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace must be <= num_hidden_layers")
        need(self.model_type in MODEL_TYPES, f"model_type {self.model_type!r} is not one of {', '.join(MODEL_TYPES)}")
        if self.indexer_types is not None:
            t = self.indexer_types
            need(len(t) == self.num_hidden_layers,
                 f"indexer_types has {len(t)} entries for {self.num_hidden_layers} layers")
            need(all(x in INDEXER_TYPES for x in t), f"indexer_types entries must be one of {INDEXER_TYPES}, got {sorted(set(t))}")
            need(not t or t[0] == "full", "indexer_types[0] must be 'full': a shared layer reuses an earlier full layer's top-k")
        if self.fp8_numerics:
            need(self.index_score == "relu", "fp8_numerics supports index_score 'relu' only (V3.2's FP8 indexer)")
            d = self.index_head_dim
            need(d & (d - 1) == 0, "fp8_numerics needs a power-of-two index_head_dim (Hadamard rotation)")
        return self

    # ---- HF config.json ----
    @classmethod
    def from_hf_dict(cls, d: dict, **overrides) -> "ModelConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k != "rope_scaling"}
        # Official demo-JSON aliases (inference/config_671B_v3.2.json)
        aliases = {"dim": "hidden_size", "inter_dim": "intermediate_size", "moe_inter_dim": "moe_intermediate_size",
                   "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads", "n_activated_experts": "num_experts_per_tok",
                   "n_expert_groups": "n_group", "n_limited_groups": "topk_group", "route_scale": "routed_scaling_factor",
                   "n_dense_layers": "first_k_dense_replace"}
        for a, k in aliases.items():
            if a in d and k not in kw:
                kw[k] = d[a]
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        mt = d.get("model_type")
        if mt is not None and mt not in MODEL_TYPES:
            raise ValueError(f"config model_type {mt!r} is not a DSA family this engine runs "
                             f"(one of {', '.join(MODEL_TYPES)}; a DeepSeek-V4 checkpoint loads with "
                             f"dsa_rag.model.v4.load.load_v4_model, and load_engine / `dsa-rag serve` route it there)")
        if mt is not None:
            kw["model_type"] = mt
        if "index_rope_interleaved" not in kw:
            # GLM-5 rotates its indexer interleaved (transformers' GlmMoeDsaIndexer); some exports
            # spell it `indexer_rope_interleave`.
            kw["index_rope_interleaved"] = bool(d.get("indexer_rope_interleave", mt == "glm_moe_dsa"))
        if kw.get("indexer_types") is None:
            n_layers = int(kw.get("num_hidden_layers", cls.num_hidden_layers))
            pattern = d.get("index_topk_pattern")
            if pattern:  # "FSSS..." or a list, as vLLM / SGLang / transformers read it
                kw["indexer_types"] = [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
            elif int(d.get("index_topk_freq", 1) or 1) > 1:
                kw["indexer_types"] = indexer_plan(n_layers, int(d["index_topk_freq"]),
                                                   int(d.get("index_skip_topk_offset", 2)))
        plan = kw.get("indexer_types")
        if plan is not None and len(plan) == int(kw.get("num_hidden_layers", cls.num_hidden_layers)) and all(t == "full" for t in plan):
            kw["indexer_types"] = None  # the same model as no plan; one spelling keeps fingerprints equal
        mlp_types = d.get("mlp_layer_types")
        if mlp_types and "first_k_dense_replace" not in d:
            n_dense = next((i for i, t in enumerate(mlp_types) if t != "dense"), len(mlp_types))
            if any(t == "dense" for t in mlp_types[n_dense:]):
                raise ValueError(f"mlp_layer_types {mlp_types}: dense layers after the first MoE layer are not supported")
            kw["first_k_dense_replace"] = n_dense
        rs = d.get("rope_scaling") or d.get("rope_parameters")
        if rs and (rs.get("type") or rs.get("rope_type")) == "yarn":
            kw["rope_scaling"] = RopeScaling(
                type="yarn", factor=float(rs.get("factor", 1.0)),
                original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 4096)),
                beta_fast=float(rs.get("beta_fast", 32)), beta_slow=float(rs.get("beta_slow", 1)),
                mscale=float(rs.get("mscale", 1.0)), mscale_all_dim=float(rs.get("mscale_all_dim", 0.0) or 0.0))
            if "rope_theta" in rs and "rope_theta" not in d:
                kw["rope_theta"] = float(rs["rope_theta"])
        else:
            kw["rope_scaling"] = None
            if rs and "rope_theta" in rs and "rope_theta" not in d:
                kw["rope_theta"] = float(rs["rope_theta"])
        index_every = overrides.pop("index_every", None)
        kw.update(overrides)
        cfg = cls(**kw)
        return with_overrides(cfg, index_every=index_every) if index_every is not None else cfg.validate()

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> "ModelConfig":
        return cls.from_hf_dict(json.loads(Path(path).read_text()), **overrides)

    def to_hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            d["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        d.update(architectures=[MODEL_TYPES[self.model_type]], model_type=self.model_type,
                 num_key_value_heads=self.num_attention_heads, topk_method="noaux_tc", moe_layer_freq=1,
                 hidden_act="silu")
        if self.indexer_types is None:
            d.pop("indexer_types")
        return d

    def fingerprint_fields(self) -> dict:
        """What changes the KV cache bytes: shapes, numerics, attention mode."""
        return self.to_hf_dict()


def _dsa_tiny() -> ModelConfig:
    # The shape the training recipe starts from (MODEL_CARD.md): V3.2's ReLU indexer, 4 heads x 32.
    # Per key it costs 2*H_I*d_I = 256 FLOPs vs the MQA attention's 2*H*(2*r_kv + d_rope) =
    # 2*8*272 = 4352: ~17x cheaper, the same ratio as V3.2 (16.4K vs 278.5K). The shipped weights
    # (model/weights/dsa-tiny/config.json, what load_model reads) refit it as 8 x 64, softmax_mixture:
    # 1024 FLOPs per key plus an exp per head; dsa-tiny-relu keeps this shape.
    return ModelConfig(
        name="dsa-tiny", tokenizer="byte",
        vocab_size=264, hidden_size=256, intermediate_size=768, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=128,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        index_n_heads=4, index_head_dim=32, index_topk=256,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=1.0, first_k_dense_replace=1,
        rope_theta=10000.0, rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=4096),
        max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
        num_nextn_predict_layers=0, quant_block=32,
    ).validate()


def _deepseek_v32() -> ModelConfig:
    return ModelConfig(
        name="deepseek-v3.2",
        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                             "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
        fp8_numerics=True,
    ).validate()


def _glm5(name: str, **over) -> ModelConfig:
    # zai-org/GLM-5's config.json shape (glm_moe_dsa): MLA q_lora 2048 / kv_lora 512 / nope 192 /
    # rope 64 / v 256, 64 heads, 78 layers, 256 routed experts (top-8, one group) + 1 shared, the
    # first 3 layers dense, a 32 x 128 indexer keeping 2048 keys, plain RoPE (no YaRN).
    base = dict(
        name=name, model_type="glm_moe_dsa", vocab_size=154880, hidden_size=6144, intermediate_size=12288,
        moe_intermediate_size=2048, num_hidden_layers=78, num_attention_heads=64, q_lora_rank=2048,
        kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256,
        index_n_heads=32, index_head_dim=128, index_topk=2048, index_rope_interleaved=True,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1,
        routed_scaling_factor=2.5, first_k_dense_replace=3, rms_norm_eps=1e-5, rope_theta=1000000.0,
        rope_scaling=None, max_position_embeddings=202752, eos_token_id=154820, bos_token_id=0,
        num_nextn_predict_layers=1,
        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                             "weight_block_size": [128, 128]},
    )
    base.update(over)
    return ModelConfig(**base).validate()


PRESETS = {
    "dsa-tiny": _dsa_tiny,
    "deepseek-v3.2": _deepseek_v32,
    "glm-5": lambda: _glm5("glm-5"),
    "glm-5.1": lambda: _glm5("glm-5.1"),
    # GLM-5.2: IndexShare, 21 of 78 layers run the indexer (0, 1, 2, then every 4th), 1M context.
    "glm-5.2": lambda: _glm5("glm-5.2", indexer_types=indexer_plan(78, every=4, offset=3), rope_theta=8000000.0,
                             max_position_embeddings=1048576),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    return with_overrides(cfg, **overrides) if overrides else cfg


def with_overrides(cfg: ModelConfig, index_every: int | None = None, **overrides) -> ModelConfig:
    """cfg with ModelConfig fields replaced; `index_every=N` (N >= 1) sets the indexer plan to
    "run the indexer on layers 0, N, 2N, ..., reuse its top-k in between" (1 = every layer)."""
    if index_every is not None:
        n = overrides.get("num_hidden_layers", cfg.num_hidden_layers)
        plan = indexer_plan(n, every=int(index_every))
        overrides["indexer_types"] = None if all(t == "full" for t in plan) else plan
    return dataclasses.replace(cfg, **overrides).validate()


if __name__ == "__main__":
    print(json.dumps(preset(sys.argv[1] if len(sys.argv) > 1 else "dsa-tiny").to_hf_dict(), indent=2))
