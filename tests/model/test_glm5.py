"""The GLM-5 family (`glm_moe_dsa`) against transformers.GlmMoeDsaForCausalLM: tiny random
checkpoints with mixed "full" and "shared" indexer layers (shared layers ship no indexer tensors),
the interleaved indexer RoPE, one-group routing, in fp32 on sequences longer than index_topk.

    .venv/bin/python -m pytest tests/model/test_glm5.py -q
"""

import json

import pytest
import torch

from dsa_rag.model.config import ModelConfig, indexer_plan, preset
from dsa_rag.model.load import load_model, save_checkpoint
from dsa_rag.model.model import rope_half, rope_pairs_interleaved
from tests.model.helpers import hf_model_from, indexer_selections, random_model, tiny_config

PLAN = ["full", "shared", "full", "shared"]


def glm_config(seed=0, **overrides):
    """A tiny GLM-5-shaped config: glm_moe_dsa, one expert group (as GLM-5), plain RoPE, 16 indexer
    heads (no exact ReLU ties at the top-k edge), layers full/shared/full/shared."""
    base = dict(model_type="glm_moe_dsa", index_rope_interleaved=True, num_hidden_layers=4, indexer_types=PLAN,
                n_group=1, topk_group=1, rope_scaling=None, rms_norm_eps=1e-5, first_k_dense_replace=2)
    base.update(overrides)
    return tiny_config(seed, **base)


def max_logit_diff(ours, seed, seq_len):
    hf = hf_model_from(ours)
    ids = torch.randint(0, ours.cfg.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert ref.abs().max() > 0.1  # not a degenerate all-zero comparison
    return (got - ref).abs().max().item()


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-layout", "fp8-release"])
def test_glm5_checkpoint_matches_transformers(tmp_path, fp8):
    cfg = glm_config(0)
    save_checkpoint(random_model(cfg, 0), tmp_path, fp8_weights=fp8, shard_bytes=40_000)
    names = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    # shared layers ship no indexer weights, as GLM-5.2's checkpoints
    assert not any(n.startswith(("model.layers.1.self_attn.indexer", "model.layers.3.self_attn.indexer")) for n in names)
    assert any(n.startswith("model.layers.2.self_attn.indexer.") for n in names)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "glm_moe_dsa" and written["indexer_types"] == PLAN
    ours = load_model(tmp_path)
    assert ours.cfg.indexer_types == PLAN and ours.layers[1].attn.indexer is None
    seq_len = 80
    assert seq_len > ours.cfg.index_topk  # the indexer really drops keys
    assert max_logit_diff(ours, 0, seq_len) <= 1e-3


def test_glm5_hf_save_pretrained_layout_loads(tmp_path):
    """A checkpoint as transformers writes it (save_pretrained of GlmMoeDsaForCausalLM: its
    config.json with rope_parameters and indexer_types, its tensor names) loads and matches."""
    cfg = glm_config(1, index_topk=32)
    hf = hf_model_from(random_model(cfg, 1))
    hf.save_pretrained(str(tmp_path))
    ours = load_model(tmp_path)
    assert ours.cfg.model_type == "glm_moe_dsa" and ours.cfg.indexer_types == PLAN and ours.cfg.index_rope_interleaved
    ids = torch.randint(0, cfg.vocab_size, (1, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-3


def test_indexer_rope_layout_matters():
    """The parity above is only meaningful if the GLM and V3.2 indexer RoPE layouts select
    differently on the same weights."""
    cfg = glm_config(2, indexer_types=None)
    m = random_model(cfg, 2)
    ids = torch.randint(0, cfg.vocab_size, (1, 96), generator=torch.Generator().manual_seed(2))
    inter = indexer_selections(m, ids)
    for blk in m.layers:
        blk.attn.indexer.rope = rope_half
    half = indexer_selections(m, ids)
    assert any(not torch.equal(a, b) for a, b in zip(inter, half))


def test_shared_layers_reuse_the_full_layers_selection():
    cfg = glm_config(3)
    m = random_model(cfg, 3)
    ids = torch.randint(0, cfg.vocab_size, (1, 70), generator=torch.Generator().manual_seed(3))
    sel = indexer_selections(m, ids)
    assert torch.equal(sel[1], sel[0]) and torch.equal(sel[3], sel[2])
    assert not torch.equal(sel[2], sel[0])


def test_v32_form_with_index_every(tmp_path):
    """index_every=2 on a V3.2-form checkpoint that has an indexer on every layer: the shared layers'
    indexers are dropped, and the result is transformers' GLM model with the same plan."""
    cfg = tiny_config(4, num_hidden_layers=4, n_group=1, topk_group=1)
    save_checkpoint(random_model(cfg, 4), tmp_path)
    m = load_model(tmp_path, index_every=2)
    assert m.cfg.indexer_types == indexer_plan(4, 2) == PLAN
    assert [blk.attn.indexer is None for blk in m.layers] == [False, True, False, True]
    # transformers' GLM class is V3.2 plus the plan and an interleaved indexer RoPE: same rope to compare
    m.cfg.index_rope_interleaved = True
    for blk in m.layers:
        if blk.attn.indexer is not None:
            blk.attn.indexer.rope = rope_pairs_interleaved
    m.cfg.model_type = "glm_moe_dsa"
    assert max_logit_diff(m, 4, 70) <= 1e-3


def test_config_reader_and_presets():
    for name, n_full in (("glm-5", 78), ("glm-5.1", 78), ("glm-5.2", 21)):
        c = preset(name)
        assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (2048, 512, 192, 64, 256)
        assert (c.index_n_heads, c.index_head_dim, c.index_topk) == (32, 128, 2048)
        assert len(c.full_index_layers) == n_full
        assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    assert preset("glm-5.2").full_index_layers[:5] == [0, 1, 2, 6, 10]
    # the keys vLLM / SGLang / transformers spell the plan with
    d = preset("glm-5").to_hf_dict()
    assert ModelConfig.from_hf_dict({**d, "index_topk_freq": 4, "index_skip_topk_offset": 3}).indexer_types == preset("glm-5.2").indexer_types
    assert ModelConfig.from_hf_dict({**d, "num_hidden_layers": 4, "index_topk_pattern": "FSFS",
                                     "first_k_dense_replace": 1}).indexer_types == PLAN
    # transformers' mlp_layer_types spelling of the dense prefix
    no_k = {k: v for k, v in d.items() if k != "first_k_dense_replace"} | {"num_hidden_layers": 4, "indexer_types": None}
    assert ModelConfig.from_hf_dict(no_k | {"mlp_layer_types": ["dense", "dense", "sparse", "sparse"]}).first_k_dense_replace == 2


@pytest.mark.parametrize("bad,msg", [
    ({"model_type": "deepseek_v4"}, "not a DSA family"),
    ({"indexer_types": ["shared", "full", "full", "full"]}, "must be 'full'"),
    ({"indexer_types": ["full", "sometimes", "full", "full"]}, "entries must be one of"),
    ({"indexer_types": ["full"]}, "4 layers"),
])
def test_config_errors_say_what_is_wrong(bad, msg):
    d = preset("glm-5").to_hf_dict() | {"num_hidden_layers": 4, "first_k_dense_replace": 1}
    with pytest.raises(ValueError, match=msg):
        ModelConfig.from_hf_dict(d | bad)
