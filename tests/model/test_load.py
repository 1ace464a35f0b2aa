"""Checkpoint loading: official HF layout (FP8 + scale_inv, shards), the MTP layer skipped with a
log line, clear errors naming tensors and shapes, the 671B config built on the meta device, presets,
and `load_any` on a training run dir.

    .venv/bin/python -m pytest tests/model/test_load.py -q
"""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsa_rag.model.config import ModelConfig, preset
from dsa_rag.model.load import WEIGHTS_DIR, build_model, load_any, load_model, save_checkpoint
from tests.model.helpers import random_model, tiny_config


@pytest.fixture
def ckpt(tmp_path):
    cfg = tiny_config(0)
    m = random_model(cfg, 0)
    save_checkpoint(m, tmp_path, fp8_weights=True)
    return tmp_path, m


def test_fp8_checkpoint_layout_and_dequant(ckpt):
    d, m = ckpt
    sd = load_file(str(d / "model.safetensors"))
    w = sd["model.layers.1.self_attn.q_a_proj.weight"]
    assert w.dtype == torch.float8_e4m3fn
    assert sd["model.layers.1.self_attn.q_a_proj.weight_scale_inv"].shape == (1, 1)
    assert sd["model.layers.1.mlp.experts.3.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert sd["model.layers.1.self_attn.indexer.weights_proj.weight"].dtype == torch.float32
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in sd
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg["rope_scaling"]["type"] == "yarn"
    loaded = load_model(d)
    a, b = loaded.layers[1].attn.wq_a.weight, m.layers[1].attn.wq_a.weight
    assert ((a - b).norm() / b.norm()) < 0.05  # FP8 round trip of the weights
    assert torch.equal(loaded.layers[1].ffn.gate.bias, m.layers[1].ffn.gate.bias)


def test_mtp_layer_is_skipped_with_a_log_line(ckpt, caplog):
    d, m = ckpt
    sd = load_file(str(d / "model.safetensors"))
    n = m.cfg.num_hidden_layers
    sd[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(4, 4)
    sd[f"model.layers.{n}.self_attn.q_a_proj.weight"] = torch.zeros(4, 4)
    save_file(sd, str(d / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="dsa_rag.model.load"):
        load_model(d)
    assert any(f"model.layers.{n}" in r.message and "MTP" in r.message for r in caplog.records)


def test_missing_tensor_error_names_tensor_and_shape(ckpt):
    d, m = ckpt
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.0.self_attn.kv_b_proj.weight"], sd["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.kv_b_proj\.weight \(128, 32\)"):
        load_model(d)


def test_wrong_shape_error_names_both_shapes(ckpt):
    d, m = ckpt
    sd = load_file(str(d / "model.safetensors"))
    sd["model.norm.weight"] = torch.ones(65)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(65,\).*\(64,\)"):
        load_model(d)


def test_fp8_without_scale_is_an_error(ckpt):
    d, m = ckpt
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.2.self_attn.o_proj.weight_scale_inv"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="o_proj|wo.*weight_scale_inv"):
        load_model(d)


def test_official_converted_names_load_too(tmp_path):
    """convert.py output: no `model.` prefix, attn/ffn names, `.scale` for weight_scale_inv."""
    cfg = tiny_config(1)
    m = random_model(cfg, 1)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    loaded = load_model(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        assert torch.allclose(loaded(ids), m(ids), atol=1e-6)


def test_v32_config_builds_on_meta_device():
    cfg = preset("deepseek-v3.2")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.index_topk, cfg.kv_lora_rank) == (7168, 61, 2048, 512)
    assert abs(cfg.softmax_scale - 0.1352338) < 1e-6  # 192^-0.5 * mscale(40)^2
    m = build_model(cfg, meta=True)
    n = sum(p.numel() for p in m.parameters())
    assert 6.6e11 < n < 6.8e11, n  # 671B without the MTP layer
    assert m.layers[5].attn.wq_a.weight.device.type == "meta"


def test_official_config_json_round_trip():
    hf = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "hidden_size": 7168,
          "num_hidden_layers": 61, "index_topk": 2048, "eos_token_id": [1],
          "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
          "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    cfg = ModelConfig.from_hf_dict(hf)
    assert cfg.rope_scaling.factor == 40 and cfg.eos_token_id == 1
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()).to_hf_dict() == cfg.to_hf_dict()
    with pytest.raises(ValueError, match="index_head_dim"):
        ModelConfig.from_hf_dict({**hf, "index_head_dim": 32})


def test_preset_without_weights_is_seeded_and_unknown_preset_errors():
    a, b = load_model("dsa-tiny"), load_model("dsa-tiny")
    assert torch.equal(a.layers[0].attn.wq_a.weight, b.layers[0].attn.wq_a.weight)
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_model("no-such-model")


def test_relu_variant_shares_the_default_main_model():
    """model/weights/dsa-tiny-relu (V3.2's ReLU indexer) and the default dsa-tiny (the same main
    model with the indexer refitted as a softmax mixture): the main-model tensors are equal, only
    the indexer differs. What the model card claims, so the dense figures stand for both."""
    base, relu = load_model("dsa-tiny"), load_model(WEIGHTS_DIR / "dsa-tiny-relu")
    assert base.cfg.index_score == "softmax_mixture" and (base.cfg.index_n_heads, base.cfg.index_head_dim) == (8, 64)
    assert relu.cfg.index_score == "relu" and (relu.cfg.index_n_heads, relu.cfg.index_head_dim) == (4, 32)
    a, b = base.state_dict(), relu.state_dict()
    main = [k for k in a if ".indexer." not in k]
    assert main and set(main) == {k for k in b if ".indexer." not in k}
    assert all(torch.equal(a[k], b[k]) for k in main)
    assert {k for k in a if ".indexer." in k} == {k for k in b if ".indexer." in k}


def test_load_any_reads_a_training_run_dir_and_a_weights_dir(tmp_path):
    """A run dir's ckpt.pt (config + state dict, as training writes it) and a weights dir load to
    the same tensors, in eval mode."""
    m = random_model(tiny_config(0), 0)
    torch.save({"cfg": m.cfg, "model": m.state_dict(), "step": 1}, tmp_path / "ckpt.pt")
    save_checkpoint(m, tmp_path / "w")
    for got in (load_any(tmp_path), load_any(tmp_path / "w"), load_any(str(tmp_path))):
        assert not got.training
        sd = got.state_dict()
        assert sd.keys() == m.state_dict().keys() and all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
