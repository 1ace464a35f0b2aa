"""The engine in bf16: cached generation equals full recomputation token for token, snapshots
restore only into an engine of the same cache dtype, the fingerprint names the dtype and
fp8_numerics, and `load_engine` takes the serving dtype as a setting.

Tiny random V3.2-shaped models (tests/model/helpers.py) converted with `cast_model` (the router,
norms, indexer weights_proj and lm head stay fp32), small blocks and chunks so every path crosses
block and chunk boundaries; the torch kernels run with both GEMM dtypes they pick for 16-bit inputs
(DSA_KERNEL_LOWP_MATH: fp32 on CPUs without native bf16, bf16 with it).

    .venv/bin/python -m pytest -q tests/model/engine/test_engine_dtype.py
"""

from __future__ import annotations

import json

import pytest
import torch

from dsa_rag.model.engine.engine import SamplingParams, Snapshot, model_fingerprint
from dsa_rag.model.engine.factory import load_engine, resolve_dtype
from dsa_rag.model.load import WEIGHTS_DIR, cast_model, save_checkpoint
from tests.model.helpers import greedy_full, ids_of, random_model, small_engine as engine, tiny_config

GREEDY = dict(temperature=0.0, stop_token_ids=[])  # no EOS: fixed-length outputs to compare


def bf16_model(seed=0, **cfg):
    return cast_model(random_model(tiny_config(0, **cfg), seed), torch.bfloat16)


@pytest.mark.parametrize("fp8_numerics,math", [(False, "fp32"), (False, "bf16"), (True, "fp32")],
                         ids=["bf16", "bf16-bf16gemm", "bf16-fp8numerics"])
def test_cached_bf16_greedy_equals_full_recomputation(fp8_numerics, math, monkeypatch):
    """64 greedy tokens after a 40-token prefix (chunked, forked) + a 10-token question: every
    cached decode step gives the token the plain bf16 forward over the whole sequence gives."""
    monkeypatch.setenv("DSA_KERNEL_LOWP_MATH", math)
    m = bf16_model(0, fp8_numerics=fp8_numerics)
    assert m.embed.weight.dtype == torch.bfloat16 and m.head.weight.dtype == torch.float32
    ids = ids_of(50, 0)
    eng = engine(m)
    assert eng.dtype == torch.bfloat16 and eng.pool.kv_dtype == torch.bfloat16
    assert eng.pool.ik_dtype == (torch.float8_e4m3fn if fp8_numerics else torch.bfloat16)
    pre = eng.prefill_prefix(ids[:40])
    got = eng.complete(ids[40:], SamplingParams(max_tokens=64, **GREEDY), prefix=pre)
    assert got.cached_tokens == 40 and len(got.token_ids) == 64
    assert got.token_ids == greedy_full(m, ids, 64)
    assert all(lp is not None and lp <= 0 for lp in got.logprobs)


def test_fp16_engine_generates():
    """fp16 runs end to end too: caches in fp16, finite log-probs."""
    m = cast_model(random_model(tiny_config(0), 0), torch.float16)
    eng = engine(m)
    assert eng.pool.kv_dtype == torch.float16
    c = eng.complete(ids_of(40, 3), SamplingParams(max_tokens=12, **GREEDY))
    assert len(c.token_ids) == 12 and all(lp is not None and lp == lp and lp <= 0 for lp in c.logprobs)


def test_bf16_snapshot_restores_in_bf16_and_is_refused_in_fp32(tmp_path):
    m = bf16_model(0)
    prefix, question = ids_of(45, 11), ids_of(6, 12)
    p = SamplingParams(max_tokens=24, **GREEDY)
    straight = engine(m).complete(prefix + question, p)

    eng = engine(m)
    snap = eng.snapshot(eng.prefill_prefix(prefix))
    assert snap.tensors["layer.0.kv"].dtype == torch.bfloat16 and snap.metadata["kv_dtype"] == "torch.bfloat16"
    assert snap.metadata["fp8_numerics"] == "False"
    snap.save(tmp_path / "pack.safetensors")
    loaded = Snapshot.load(tmp_path / "pack.safetensors")
    assert loaded.tensors["layer.2.index_k"].dtype == torch.bfloat16

    eng2 = engine(m)  # another replica, same dtype
    resumed = eng2.complete(question, p, prefix=eng2.restore(loaded))
    assert resumed.token_ids == straight.token_ids and resumed.cached_tokens == 45

    fp32 = engine(cast_model(random_model(tiny_config(0), 0), torch.float32))  # the same weights, in fp32
    with pytest.raises(ValueError, match=r"torch\.bfloat16.*torch\.float32"):
        fp32.restore(loaded)
    with pytest.raises(ValueError, match=r"'layer\.0\.kv' is torch\.bfloat16.*torch\.float32"):
        fp32.restore(loaded.tensors)  # no metadata: the tensors' own dtype is checked, never cast
    back = engine(bf16_model(0))
    with pytest.raises(ValueError, match=r"torch\.float32.*torch\.bfloat16"):
        back.restore(fp32.snapshot(fp32.prefill_prefix(prefix)))
    assert back.stats()["blocks_used"] == 0  # nothing half-restored


def test_fingerprint_names_the_dtype_and_fp8_numerics():
    a = random_model(tiny_config(0), 0)
    b = cast_model(random_model(tiny_config(0), 0), torch.bfloat16)
    c = random_model(tiny_config(0, fp8_numerics=True), 0)
    fps = {model_fingerprint(a), model_fingerprint(b), model_fingerprint(c)}
    assert len(fps) == 3
    assert model_fingerprint(a) == model_fingerprint(random_model(tiny_config(0), 0))


def test_load_engine_takes_the_dtype_setting(tmp_path):
    e = load_engine("dsa-tiny", device="cpu", dtype="bfloat16")
    try:
        assert e.engine.dtype == torch.bfloat16 and e.engine.pool.kv_dtype == torch.bfloat16
        assert e.engine.model.layers[1].ffn.gate.weight.dtype == torch.float32
    finally:
        e.close()
    e = load_engine("dsa-tiny", device="cpu")  # auto on CPU: float32 (the shipped answers)
    try:
        assert e.engine.dtype == torch.float32 and not e.engine.cfg.fp8_numerics
    finally:
        e.close()
    e = load_engine(str(WEIGHTS_DIR / "dsa-tiny-relu"), device="cpu", dtype="bfloat16", fp8_numerics=True)
    try:
        assert e.engine.cfg.fp8_numerics and e.engine.pool.ik_dtype == torch.float8_e4m3fn
    finally:
        e.close()
    with pytest.raises(ValueError, match="bfloat16"):
        load_engine("dsa-tiny", device="cpu", dtype="bf17")


def test_auto_dtype_is_the_checkpoints_on_cuda_and_fp32_on_cpu(tmp_path):
    m = random_model(tiny_config(0), 0)
    save_checkpoint(m, tmp_path / "fp8", fp8_weights=True)  # torch_dtype bfloat16 (the official layout)
    save_checkpoint(m, tmp_path / "fp32")
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert resolve_dtype("auto", str(tmp_path / "fp8"), "cuda") == torch.bfloat16
    assert resolve_dtype("auto", str(tmp_path / "fp32"), "cuda") == torch.float32
    assert resolve_dtype("auto", str(tmp_path / "fp8"), "cpu") == torch.float32
    assert resolve_dtype("auto", "deepseek-v3.2", "cuda:0") == torch.bfloat16
    assert resolve_dtype("auto", "dsa-tiny", "cuda") == torch.float32  # its config names no dtype
    assert resolve_dtype("float16", "dsa-tiny", "cpu") == torch.float16
