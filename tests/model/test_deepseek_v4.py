"""DeepSeek-V4 (dsa_rag.model.v4) against transformers.DeepseekV4ForCausalLM, and its loading.

Parity runs on a tiny random checkpoint with HCA, CSA and sliding layers mixed, hc_mult 2,
hash-MoE and routed-MoE layers, 16 indexer heads, in fp32, on sequences long enough that the
indexer's top-k drops compressed entries and HCA pools exist.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/model/test_deepseek_v4.py -p no:cacheprovider
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from dsa_rag.model import fp8
from dsa_rag.model.v4.config import CSA, HCA, SLIDING, V4Config, preset
from dsa_rag.model.v4.load import fp4_dequant, fp4_quant, load_v4_model, save_v4_checkpoint
from dsa_rag.model.v4.model import Transformer
from tests.model.v4_helpers import hf_from, random_v4, tiny_v4_config

pytest.importorskip("transformers.models.deepseek_v4")
T = 72  # 18 CSA entries (top-k keeps 4), 9 HCA pools, window 8


def _tokens(batch=2, length=T, seed=1):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_transformers(tmp_path):
    ours = random_v4(tiny_v4_config())
    hf = hf_from(ours, tmp_path)
    tok = _tokens()
    cache = ours.new_cache()
    a = ours(tok, cache)
    b = hf(tok).logits
    diff = (a - b).abs().max().item()
    print(f"max |logit diff| vs transformers: {diff:.3g} (logits up to {a.abs().max().item():.3g})")
    assert diff <= 1e-3
    # What the comparison covered: HCA pools and CSA entries beyond top-k.
    assert cache.layers[0].compressor.count == T // 8
    assert cache.layers[1].compressor.count == T // 4 > ours.cfg.index_topk
    # Top-k really drops entries: keeping them all gives other logits.
    dense = random_v4(tiny_v4_config(index_topk=64))
    assert (dense(tok) - a).abs().max().item() > 1e-3


@torch.no_grad()
def test_logits_match_transformers_default_schedule(tmp_path):
    """transformers' own default layer schedule (2 HCA, then HCA / CSA), hc_mult 3, no YaRN."""
    cfg = tiny_v4_config(num_hidden_layers=4, layer_types=[], mlp_layer_types=[], hc_mult=3, rope_scaling=None,
                         compress_rates={CSA: 4, HCA: 16}, sliding_window=16)
    assert cfg.layer_types == [HCA, HCA, HCA, CSA] and cfg.mlp_layer_types[:3] == ["hash_moe"] * 3
    ours = random_v4(cfg, seed=3)
    hf = hf_from(ours, tmp_path)
    tok = _tokens(batch=1, length=67, seed=4)
    assert (ours(tok) - hf(tok).logits).abs().max().item() <= 1e-3


@torch.no_grad()
def test_transformers_save_pretrained_loads(tmp_path):
    """A config + checkpoint written by transformers' save_pretrained loads and agrees."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = tiny_v4_config()
    torch.manual_seed(0)
    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg.to_hf_dict())).eval()
    g = torch.Generator().manual_seed(5)
    for name, p in hf.named_parameters():  # transformers zero-inits sinks, ape, hc bases
        p.data.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() > 1 else 0.3) + (1.0 if "norm" in name else 0))
    for name, b in hf.named_buffers():
        if name.endswith("tid2eid"):
            b.copy_(torch.randint(0, cfg.n_routed_experts, b.shape, generator=g))
    hf.save_pretrained(tmp_path / "saved")
    ours = load_v4_model(tmp_path / "saved")
    assert ours.cfg.layer_types == cfg.layer_types and ours.cfg.rope_scaling == cfg.rope_scaling
    tok = _tokens(batch=1)
    assert (ours(tok) - hf(tok).logits).abs().max().item() <= 1e-3


@torch.no_grad()
def test_release_names_and_fp8_load(tmp_path):
    """DeepSeek's release names (ours, per-expert tensors) load as they are; an FP8 checkpoint
    (e4m3 + weight_scale_inv blocks) loads with exactly the dequantized weights."""
    ours = random_v4(tiny_v4_config(), seed=2)
    rel = tmp_path / "release"
    rel.mkdir()
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(rel / "model.safetensors"))
    (rel / "config.json").write_text(json.dumps(ours.cfg.to_hf_dict()))
    tok = _tokens(batch=1)
    assert (load_v4_model(rel)(tok) - ours(tok)).abs().max().item() <= 1e-5

    q = load_v4_model(save_v4_checkpoint(ours, tmp_path / "fp8", fp8_weights=True, block=16))
    w = ours.layers[1].attn.wq_b.weight
    assert torch.equal(q.layers[1].attn.wq_b.weight, fp8.weight_dequant(*fp8.weight_quant(w, 16), 16))
    assert torch.equal(q.layers[1].attn.compressor.wkv.weight, ours.layers[1].attn.compressor.wkv.weight)  # BF16 branch
    assert not torch.equal(q.layers[1].ffn.experts[0].w1.weight, ours.layers[1].ffn.experts[0].w1.weight)
    assert torch.allclose(q.layers[1].ffn.experts[0].w1.weight, ours.layers[1].ffn.experts[0].w1.weight, atol=0.02)


def test_fp4_dequant_hand_computed():
    """Packed FP4 as the V4 release stores routed experts: two e2m1 values per int8 byte, the low
    nibble the even column; one E8M0 scale per row and 32 columns (2 ** (byte - 127))."""
    # Row 0: bytes 0x21 -> (nibble 1, nibble 2) = (0.5, 1.0); row 1: 0xF7 -> (6.0, -6.0), 0x9A -> (-1.0, -0.5).
    packed = torch.tensor([[0x21] * 32, [0xF7] * 16 + [0x9A] * 16], dtype=torch.uint8).view(torch.int8)
    e8m0 = torch.tensor([[128, 126], [127, 130]], dtype=torch.uint8)  # scales 2, 1/2, 1, 8
    want = torch.tensor([[0.5 * 2, 1.0 * 2] * 16 + [0.5 / 2, 1.0 / 2] * 16,
                         [6.0, -6.0] * 16 + [-1.0 * 8, -0.5 * 8] * 16])
    for scale in (e8m0, e8m0.view(torch.float8_e8m0fnu), (e8m0.float() - 127).exp2()):
        assert torch.equal(fp4_dequant(packed, scale), want)
    with pytest.raises(ValueError, match="scale grid"):
        fp4_dequant(packed, e8m0[:, :1].expand(2, 3))


def test_fp4_dequant_matches_transformers():
    """The same bytes through transformers' own FP4 path (Fp8Dequantize, what it loads V4's FP4
    experts with when dequantizing), fused [E, M, N / 2] experts with E8M0 scales."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    g = torch.Generator().manual_seed(0)
    packed = torch.randint(-128, 128, (3, 8, 32), generator=g, dtype=torch.int8)
    scale = torch.randint(120, 134, (3, 8, 2), generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    ref = Fp8Dequantize(None)._dequantize_one(packed, scale, torch.float32)
    assert torch.equal(fp4_dequant(packed, scale), ref)
    w = torch.randn(3, 8, 64, generator=g)
    q, s = fp4_quant(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float8_e8m0fnu and s.shape == (3, 8, 2)
    dq = fp4_dequant(q, s)
    assert torch.equal(dq, Fp8Dequantize(None)._dequantize_one(q, s, torch.float32))
    # Round to nearest: within half the widest e2m1 step (2 at |x| in [4, 6]) of the block scale.
    assert ((dq - w).abs() <= s.float().repeat_interleave(32, -1)).all()


@torch.no_grad()
@pytest.mark.parametrize("layout", ["transformers", "release"])
def test_fp4_experts_load(tmp_path, layout):
    """A checkpoint with FP4 routed experts (transformers' fused layout + `_scale_inv`, or the
    release's per-expert `w1.weight` + `w1.scale`) loads with exactly the dequantized weights."""
    ours = random_v4(tiny_v4_config(), seed=2)
    d = save_v4_checkpoint(ours, tmp_path / "fp4", fp4_experts=True)
    if layout == "release":
        from safetensors.torch import load_file

        hf = load_file(str(d / "model.safetensors"))
        rel = {k: v.contiguous() for k, v in ours.state_dict().items() if ".experts." not in k}
        for i in range(ours.cfg.num_hidden_layers):
            m = f"model.layers.{i}.mlp.experts."
            gu, gus, dn, dns = hf[m + "gate_up_proj"], hf[m + "gate_up_proj_scale_inv"], hf[m + "down_proj"], \
                hf[m + "down_proj_scale_inv"]
            for e in range(ours.cfg.n_routed_experts):
                p = f"layers.{i}.ffn.experts.{e}."
                (rel[p + "w1.weight"], rel[p + "w3.weight"]), (rel[p + "w1.scale"], rel[p + "w3.scale"]) = \
                    gu[e].chunk(2), gus[e].chunk(2)
                rel[p + "w2.weight"], rel[p + "w2.scale"] = dn[e], dns[e]
        d = tmp_path / "release"
        d.mkdir()
        save_file({k: v.contiguous() for k, v in rel.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text((tmp_path / "fp4" / "config.json").read_text())
    q = load_v4_model(d)
    w1 = ours.layers[3].ffn.experts[5].w1.weight
    assert torch.equal(q.layers[3].ffn.experts[5].w1.weight, fp4_dequant(*fp4_quant(w1)))
    assert torch.equal(q.layers[3].ffn.experts[5].w2.weight, fp4_dequant(*fp4_quant(ours.layers[3].ffn.experts[5].w2.weight)))
    assert torch.equal(q.layers[1].attn.wq_b.weight, ours.layers[1].attn.wq_b.weight)  # only the experts are FP4
    tok = _tokens(batch=1)
    assert torch.isfinite(q(tok)).all()


def test_config_reader_legacy_keys_and_presets():
    d = {"model_type": "deepseek_v4", "num_hidden_layers": 3, "compress_ratios": [128, 4, 0], "num_hash_layers": 1,
         "qk_rope_head_dim": 64, "head_dim": 512, "compress_rate_hca": 64,
         "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536},
         "eos_token_id": [1, 2]}
    c = V4Config.from_hf_dict(d)
    assert c.layer_types == [HCA, CSA, SLIDING] and c.mlp_layer_types == ["hash_moe", "moe", "moe"]
    assert c.compress_rates == {CSA: 4, HCA: 64} and c.rope_scaling.factor == 16 and c.eos_token_id == 1
    assert [c.ratio(i) for i in range(3)] == [64, 4, 0]
    with pytest.raises(ValueError, match="layer_types"):
        V4Config.from_hf_dict({"num_hidden_layers": 2, "layer_types": ["dense_attention"] * 2})
    flash = preset("deepseek-v4-flash")
    assert (flash.hidden_size, flash.num_hidden_layers, flash.head_dim, flash.index_topk) == (4096, 43, 512, 512)
    assert preset("deepseek-v4-pro").hidden_size == 7168
    # transformers reads our config.json back to the same schedule and rope.
    from transformers import DeepseekV4Config

    hc = DeepseekV4Config(**flash.to_hf_dict())
    assert hc.layer_types == flash.layer_types and hc.rope_parameters["compress"]["factor"] == 16
    assert V4Config.from_hf_dict(hc.to_dict()).to_hf_dict() == flash.to_hf_dict()


def test_meta_build_of_flash_shapes():
    """The full V4-Flash network builds (on the meta device) with the parameter count it should
    have: ~284B (reported), less the MTP layer this package does not build."""
    with torch.device("meta"):
        m = Transformer(preset("deepseek-v4-flash"))
    n = sum(p.numel() for p in m.parameters())
    assert 2.6e11 < n < 2.9e11, n


@torch.no_grad()
def test_kernel_backends_agree(monkeypatch):
    """The model's indexer scores (kernels/indexer) and its window + entries + sink attention
    (kernels/sink_attention) on every backend: naive, torch, and Triton (the interpreter on CPU,
    run this file with TRITON_INTERPRET=1)."""
    m = random_v4(tiny_v4_config(), seed=1)
    tok = _tokens(batch=1, length=40, seed=2)
    out = {}
    backends = ["naive", "torch"]
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    for b in backends:
        monkeypatch.setenv("DSA_KERNEL_BACKEND", b)
        out[b] = m(tok)
    for b in backends[1:]:
        assert (out[b] - out["naive"]).abs().max().item() <= 1e-4, b
