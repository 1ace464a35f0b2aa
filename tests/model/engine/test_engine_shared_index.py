"""The engine under an indexer plan (ModelConfig.indexer_types: "full" layers select, "shared"
layers reuse): cached greedy == full recomputation, snapshot -> restore -> continue ==
uninterrupted, shared layers keep no indexer keys (pool storage and snapshots), traces on shared
layers, FP8 numerics, and batched decode over rows at different positions.

    .venv/bin/python -m pytest tests/model/engine/test_engine_shared_index.py -q
"""

from __future__ import annotations

import pytest
import torch

from dsa_rag.model.engine.engine import Snapshot
from dsa_rag.model.engine.sampling import SamplingParams
from tests.model.helpers import greedy_full, ids_of, random_model, small_engine as engine, tiny_config

GREEDY = dict(temperature=0.0, stop_token_ids=[])
PLAN = ["full", "shared", "full", "shared"]


@pytest.fixture(scope="module", params=["v32-form", "glm-form"])
def model(request):
    glm = request.param == "glm-form"
    cfg = tiny_config(0, num_hidden_layers=4, indexer_types=PLAN, model_type="glm_moe_dsa" if glm else "deepseek_v32",
                      index_rope_interleaved=glm)
    return random_model(cfg, 0)


def test_cached_greedy_equals_full_recomputation(model):
    ids = ids_of(50, 1)
    c = engine(model).complete(ids, SamplingParams(max_tokens=20, **GREEDY))
    assert c.token_ids == greedy_full(model, ids, 20)


def test_batched_rows_at_different_positions(model):
    """Rows of one decode step sit at different positions: each shared layer must reuse its own
    row's selection."""
    eng = engine(model)
    prompts = [ids_of(n, n) for n in (47, 30, 61)]
    outs = eng.run_batch([(p, SamplingParams(max_tokens=10, **GREEDY), None) for p in prompts])
    for p, o in zip(prompts, outs):
        assert o.token_ids == greedy_full(model, p, 10)


def test_trace_reports_the_reused_keys_on_shared_layers(model):
    """Citations read the traces: every layer reports what it attended to, a shared layer the keys
    its full layer selected (with its own attention mass)."""
    eng = engine(model)
    c = eng.complete(ids_of(60, 50), SamplingParams(max_tokens=3, trace=True, trace_top=5, trace_layers=True, **GREEDY))
    for tr in c.traces:
        assert len(tr.layers) == 4 and len(tr.positions) == 5
        (p0, m0), (p1, m1), (p2, _), (p3, _) = tr.layers
        assert sorted(p1) == sorted(p0) and sorted(p3) == sorted(p2)
        assert sum(m1) == pytest.approx(1.0, abs=1e-4) and m1 != m0


def test_shared_layers_keep_no_indexer_keys(model, tmp_path):
    eng = engine(model)
    assert eng.pool.ik[1] is None and eng.pool.ik[3] is None and eng.pool.ik[0] is not None
    full_pool = engine(random_model(tiny_config(0, num_hidden_layers=4), 0)).pool
    assert eng.pool.nbytes() < full_pool.nbytes()  # half the layers' index storage is gone

    prefix, question = ids_of(53, 11), ids_of(6, 12)
    p = SamplingParams(max_tokens=12, **GREEDY)
    straight = engine(model).complete(prefix + question, p)
    h = eng.prefill_prefix(prefix)
    snap = eng.snapshot(h)
    assert "layer.1.index_k" not in snap.tensors and "layer.2.index_k" in snap.tensors
    snap.save(tmp_path / "pack.safetensors")
    eng2 = engine(model)
    resumed = eng2.complete(question, p, prefix=eng2.restore(Snapshot.load(tmp_path / "pack.safetensors")))
    assert resumed.token_ids == straight.token_ids


def test_plan_is_part_of_the_fingerprint(model):
    """A cache made under one plan never restores into an engine running another."""
    every = random_model(tiny_config(0, num_hidden_layers=4, model_type=model.cfg.model_type,
                                     index_rope_interleaved=model.cfg.index_rope_interleaved), 0)
    eng = engine(model)
    snap = eng.snapshot(eng.prefill_prefix(ids_of(30, 2)))
    with pytest.raises(ValueError, match="fingerprint"):
        engine(every).restore(snap)


def test_fp8_numerics_with_a_plan():
    cfg = tiny_config(0, num_hidden_layers=4, indexer_types=PLAN, fp8_numerics=True)
    m = random_model(cfg, 0)
    eng = engine(m)
    ids = ids_of(44, 60)
    h = eng.prefill_prefix(ids[:40])
    snap = eng.snapshot(h)
    assert "layer.1.index_scale" not in snap.tensors and "layer.1.index_k" not in snap.tensors
    assert snap.tensors["layer.2.index_k"].dtype == torch.float8_e4m3fn and snap.tensors["layer.2.index_scale"].shape == (40,)
    p = SamplingParams(max_tokens=8, **GREEDY)
    assert eng.complete(ids[40:], p, prefix=eng.restore(snap)).token_ids == eng.complete(ids[40:], p, prefix=h).token_ids
