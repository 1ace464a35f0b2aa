"""The model in bf16 / fp16: `load_model(dir, dtype=torch.bfloat16, fp8_numerics=...)` from both
checkpoint layouts (the official FP8 layout with weight_scale_inv, written by `save_checkpoint`,
and a bf16 checkpoint written by transformers' `save_pretrained`), which parameters stay fp32, which
dtype each op sees, and what dtype a checkpoint asks for.

    .venv/bin/python -m pytest -q tests/model/test_model_dtype.py
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dsa_rag.model.load import _keeps_fp32, as_dtype, cast_model, checkpoint_dtype, load_model, save_checkpoint
from dsa_rag.model.model import LayerNorm, RMSNorm
from tests.model.helpers import hf_model_from, random_model, tiny_config

FP32_NAMES = ("ffn.gate.weight", "ffn.gate.bias", "indexer.weights_proj.weight", "head.weight", "attn_norm.weight",
              "q_norm.weight", "kv_norm.weight", "k_norm.weight", "k_norm.bias", "norm.weight")


@pytest.fixture(scope="module")
def source():
    return random_model(tiny_config(0), 0)


@pytest.fixture(scope="module")
def checkpoints(source, tmp_path_factory):
    """{"official-fp8": dir, "save_pretrained": dir} holding `source`'s weights."""
    root = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(source, root / "official-fp8", fp8_weights=True)
    pytest.importorskip("transformers")
    hf_model_from(source).to(torch.bfloat16).save_pretrained(root / "save_pretrained")
    return {"official-fp8": root / "official-fp8", "save_pretrained": root / "save_pretrained"}


def check_dtypes(model, dtype):
    for name, p in model.named_parameters():
        want = torch.float32 if _keeps_fp32(name) else dtype
        assert p.dtype == want, (name, p.dtype, want)
    names = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert all(any(n.endswith(s) for n in names) for s in FP32_NAMES)
    assert model.layers[1].attn.wq_a.weight.dtype == dtype and model.layers[1].ffn.experts[0].w1.weight.dtype == dtype


@pytest.mark.parametrize("fp8_numerics", [False, True], ids=["plain", "fp8-numerics"])
@pytest.mark.parametrize("layout", ["official-fp8", "save_pretrained"])
def test_load_bf16_from_both_layouts(checkpoints, source, layout, fp8_numerics):
    d = checkpoints[layout]
    assert checkpoint_dtype(d) == torch.bfloat16
    m = load_model(d, dtype=torch.bfloat16, fp8_numerics=fp8_numerics)
    assert m.cfg.fp8_numerics is fp8_numerics
    check_dtypes(m, torch.bfloat16)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(ids)
        ref = load_model(d, dtype=torch.float32, fp8_numerics=fp8_numerics)(ids)
    assert out.dtype == torch.float32 and out.shape == (2, 60, m.cfg.vocab_size) and torch.isfinite(out).all()
    # bf16 tracks the fp32 model of the same checkpoint where no indexer top-k can flip (the first
    # index_topk positions attend to every causal key; MoE routing still may); e4m3 round trips of
    # bf16 vs fp32 inputs land on other codes now and then (3 mantissa bits): a looser FP8 bound
    k, tol = m.cfg.index_topk, (0.2 if fp8_numerics else 0.1)
    assert ((out[:, :k] - ref[:, :k]).norm() / ref[:, :k].norm()) < tol


def test_every_op_sees_the_serving_dtype(source):
    """bf16 into every linear but the fp32 ones (router, weights_proj, head: fed x.float()); the
    norms compute in fp32 and hand bf16 on."""
    m = cast_model(random_model(tiny_config(0), 0), torch.bfloat16)
    seen = []

    def hook(name):
        def f(mod, inp, out):
            seen.append((name, inp[0].dtype, out.dtype if torch.is_tensor(out) else None))
        return f

    for name, mod in m.named_modules():
        if isinstance(mod, (nn.Linear, RMSNorm, LayerNorm)):
            mod.register_forward_hook(hook(name))
    with torch.no_grad():
        m(torch.randint(0, 96, (1, 40)))
    for name, i, o in seen:
        if name == "head" or name.endswith("weights_proj"):
            assert i == o == torch.float32, name
        else:
            assert i == o == torch.bfloat16, (name, i, o)
    assert any(n.endswith("k_norm") for n, _, _ in seen)


def test_fp16_forward_and_fp32_unchanged_by_cast(source):
    ids = torch.randint(0, 96, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = source(ids)
        half = cast_model(random_model(tiny_config(0), 0), torch.float16)(ids)
        same = cast_model(random_model(tiny_config(0), 0), "float32")(ids)
    assert torch.isfinite(half).all() and ((half - ref).norm() / ref.norm()) < 0.1
    assert torch.equal(same, ref)


def test_checkpoint_dtype_and_dtype_names(tmp_path, source):
    save_checkpoint(source, tmp_path / "a")
    assert checkpoint_dtype(tmp_path / "a") == torch.float32
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    for value, want in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("fp8", torch.bfloat16)):
        (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "torch_dtype": value}))
        assert checkpoint_dtype(tmp_path / "a") == want
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "int8"}))
    with pytest.raises(ValueError, match="torch_dtype 'int8'"):
        checkpoint_dtype(tmp_path / "a")
    assert checkpoint_dtype("dsa-tiny") == torch.float32 and checkpoint_dtype("deepseek-v3.2") == torch.bfloat16
    assert as_dtype("torch.bfloat16") == as_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        as_dtype(torch.int8)
