"""A decode step selects the keys of all rows that share a pack in ONE indexer call
(model.MLA._select_decode -> kernels.indexer.indexer_decode_topk over the pack's common prefix plus
each row's own tail), and the tokens stay those of full recomputation.

    .venv/bin/python -m pytest -q tests/model/engine/test_engine_decode_groups.py
"""

from __future__ import annotations

import pytest

import dsa_rag.model.model as model_module
from dsa_rag.model.engine.engine import SamplingParams
from tests.model.helpers import greedy_full, ids_of, random_model, small_engine, tiny_config

GREEDY = dict(temperature=0.0, stop_token_ids=[])


@pytest.fixture
def decode_calls(monkeypatch):
    """Spy on the grouped decode selection: the row count of every call."""
    calls = []
    real = model_module.indexer_decode_topk

    def spy(q, *a, **kw):
        calls.append(q.shape[0])
        return real(q, *a, **kw)

    monkeypatch.setattr(model_module, "indexer_decode_topk", spy)
    return calls


@pytest.mark.parametrize("score,fp8", [("relu", False), ("relu", True), ("softmax_mixture", False), ("mixture", False)])
def test_forks_of_two_packs_decode_in_one_call_per_pack_and_equal_recomputation(decode_calls, score, fp8):
    m = random_model(tiny_config(0, index_score=score, fp8_numerics=fp8), 0)
    eng = small_engine(m)
    packs = [eng.prefill_prefix(ids_of(61, 40)), eng.prefill_prefix(ids_of(50, 41))]  # partial last blocks (CoW)
    jobs = [(ids_of(n, 50 + n), SamplingParams(max_tokens=12, **GREEDY), packs[i % 2]) for i, n in enumerate((1, 3, 7, 2, 9))]
    outs = eng.run_batch(jobs)
    for (q, _, h), o in zip(jobs, outs):
        assert o.token_ids == greedy_full(m, h.tokens + q, 12)
    # 3 rows on pack 0, 2 on pack 1: the steps where they decode together make one call per pack and layer
    assert 3 in decode_calls and 2 in decode_calls
    assert max(decode_calls) == 3


def test_rows_without_a_shared_pack_are_selected_alone(decode_calls):
    m = random_model(tiny_config(0), 0)
    eng = small_engine(m)
    jobs = [(ids_of(40, 60 + i), SamplingParams(max_tokens=6, **GREEDY), None) for i in range(3)]
    outs = eng.run_batch(jobs)
    for (q, _, _), o in zip(jobs, outs):
        assert o.token_ids == greedy_full(m, q, 6)
    assert decode_calls and set(decode_calls) == {1}


def test_a_fork_in_scattered_blocks_reads_its_contiguous_run_without_a_copy(monkeypatch):
    """A question forked off a pack whose next block is taken by another sequence: its own blocks
    lie elsewhere in the pool, so the decode selection scores the pack's contiguous run of keys in
    place (a view) and only the question's tail is gathered; tokens equal full recomputation."""
    m = random_model(tiny_config(0), 0)
    eng = small_engine(m)
    pack = eng.prefill_prefix(ids_of(64, 70))  # 8 full blocks of 8
    other = eng.prefill_prefix(ids_of(8, 71))  # takes the block right after the pack
    seen = []
    real = model_module.indexer_decode_topk

    def spy(q, k, *a, **kw):
        in_pool = any(k.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in eng.pool.ik)
        seen.append((k.shape[0], in_pool, [t.shape[0] for t in kw["tails"]]))
        return real(q, k, *a, **kw)

    monkeypatch.setattr(model_module, "indexer_decode_topk", spy)
    q = ids_of(5, 72)
    c = eng.complete(q, SamplingParams(max_tokens=10, **GREEDY), prefix=pack)
    assert c.token_ids == greedy_full(m, pack.tokens + q, 10)
    assert seen and all(p == 64 and in_pool and tails[0] > 0 for p, in_pool, tails in seen)
    eng.release(other)
