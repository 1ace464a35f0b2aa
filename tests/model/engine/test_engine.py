"""Engine behaviour: cached greedy == full recomputation, batched == alone (continuous batching),
snapshot -> safetensors -> restore -> continue == uninterrupted, forked prefixes stay untouched,
log-probs, traces, stop conditions, FP8 and dense modes, the async stream.

Tiny test configs (tests/model/helpers.py: 16 indexer heads, so top-k has no exact score ties and
"same tokens" is a fair demand), small blocks (8 tokens) and chunks so every path crosses block
and chunk boundaries.

    .venv/bin/python -m pytest tests/model/engine/test_engine.py -q
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from dsa_rag.model.cache import new_sequence_cache
from dsa_rag.model.engine.engine import AsyncEngine, Engine, SamplingParams, Snapshot
from tests.model.helpers import greedy_full, ids_of, random_model, small_engine as engine, tiny_config

GREEDY = dict(temperature=0.0, stop_token_ids=[])  # no EOS: fixed-length outputs to compare


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(0), 0)


@pytest.mark.parametrize("n_prompt,chunk,block", [(50, 16, 8), (20, 7, 8), (41, 64, 64), (1, 16, 8)],
                         ids=["sparse-chunks", "short-dense-odd-chunk", "one-chunk-block64", "one-token"])
def test_cached_greedy_equals_full_recomputation(model, n_prompt, chunk, block):
    ids = ids_of(n_prompt, n_prompt)
    c = engine(model, prefill_chunk=chunk, block_size=block).complete(ids, SamplingParams(max_tokens=24, **GREEDY))
    assert c.token_ids == greedy_full(model, ids, 24)
    assert c.finish_reason == "length" and len(c.logprobs) == 24


@pytest.mark.parametrize("score", ["mixture", "softmax_mixture"])
def test_mixture_indexers_cached_greedy_equals_full_recomputation(score):
    """The mixture index scores through the engine's cached, chunked sparse path select what the
    uncached model selects (softmax_mixture: each head normalized over the keys seen so far)."""
    m = random_model(tiny_config(0, index_score=score), 0)
    ids = ids_of(50, 7)
    c = engine(m).complete(ids, SamplingParams(max_tokens=16, **GREEDY))
    assert c.token_ids == greedy_full(m, ids, 16)


def test_logprobs_are_the_models_and_match_score(model):
    ids = ids_of(40, 1)
    eng = engine(model)
    c = eng.complete(ids, SamplingParams(max_tokens=10, **GREEDY))
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids + c.token_ids]))[0], -1)
    ref = [float(full[len(ids) - 1 + i, t]) for i, t in enumerate(c.token_ids)]
    assert c.logprobs == pytest.approx(ref, abs=1e-4)
    assert eng.score(ids, c.token_ids) == pytest.approx(ref, abs=1e-4)
    assert eng.stats()["blocks_used"] == 0  # everything freed


def test_batched_equals_alone_with_joins_and_leaves(model):
    """Continuous batching: requests join while others decode and leave at different times; every
    request gets the tokens (and log-probs) it gets alone. Sampled ones too (per-request seeds)."""
    eng = engine(model)
    pre = eng.prefill_prefix(ids_of(37, 9))
    reqs = [(ids_of(45, 2), SamplingParams(max_tokens=12, **GREEDY), None),
            (ids_of(9, 3), SamplingParams(max_tokens=5, **GREEDY), None),
            (ids_of(6, 4), SamplingParams(max_tokens=9, **GREEDY), pre),
            (ids_of(30, 5), SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, stop_token_ids=[]), None),
            (ids_of(3, 6), SamplingParams(max_tokens=7, temperature=1.3, seed=3, stop_token_ids=[]), pre)]
    alone = [eng.complete(*r) for r in reqs]
    # staggered: one request joins every other step
    got: dict[int, list] = {}
    rids, pending, steps = [], list(reqs), 0
    while pending or eng.has_unfinished():
        if pending and steps % 2 == 0:
            rids.append(eng.add_request(*pending.pop(0)))
        for ev in eng.step():
            got.setdefault(ev.request_id, []).append(ev)
        steps += 1
    for rid, a in zip(rids, alone):
        assert [e.token_id for e in got[rid]] == a.token_ids
        assert [e.logprob for e in got[rid]] == pytest.approx(a.logprobs, abs=1e-4)
    # all at once, in one batch
    for b, a in zip(eng.run_batch(reqs), alone):
        assert b.token_ids == a.token_ids
    eng.release(pre)
    assert eng.stats()["blocks_used"] == 0


def test_snapshot_restore_continue_equals_uninterrupted(model, tmp_path):
    prefix, question = ids_of(53, 11), ids_of(6, 12)
    p = SamplingParams(max_tokens=15, **GREEDY)
    straight = engine(model).complete(prefix + question, p)

    eng = engine(model)
    h = eng.prefill_prefix(prefix)
    snap = eng.snapshot(h)
    assert snap.tensors["layer.0.kv"].shape == (53, 40) and snap.tensors["tokens"].tolist() == prefix
    snap.save(tmp_path / "pack.safetensors")  # safetensors, no pickle
    loaded = Snapshot.load(tmp_path / "pack.safetensors")
    assert loaded.metadata["fingerprint"] == eng.fingerprint

    eng2 = engine(model)  # another replica
    h2 = eng2.restore(loaded)
    resumed = eng2.complete(question, p, prefix=h2)
    assert resumed.token_ids == straight.token_ids
    assert resumed.logprobs == pytest.approx(straight.logprobs, abs=1e-4)
    assert resumed.cached_tokens == 53 and resumed.prompt_tokens == 59

    # a snapshot of part of the prefix continues just as well
    part = eng2.restore(eng.snapshot(h, upto=30))
    assert eng2.complete(prefix[30:] + question, p, prefix=part).token_ids == straight.token_ids
    # and of a running request's caches
    rid = eng.add_request(prefix + question, SamplingParams(max_tokens=3, **GREEDY))
    while eng.running[rid].seq.length < 40:
        eng.step()
    mid = eng2.restore(eng.snapshot(rid, upto=40))
    assert eng2.complete(prefix[40:] + question, p, prefix=mid).token_ids == straight.token_ids


def test_forked_prefix_is_not_modified_by_its_children(model):
    eng = engine(model)
    h = eng.prefill_prefix(ids_of(45, 21))  # 45 = 5 full blocks of 8 + a partial one (CoW)
    before = eng.snapshot(h).tensors
    blocks = list(h.seq.blocks)
    qs = [ids_of(n, 30 + n) for n in (1, 4, 13)]
    outs = eng.run_batch([(q, SamplingParams(max_tokens=20, **GREEDY), h) for q in qs]
                         + [([], SamplingParams(max_tokens=5, **GREEDY), h)])  # empty question: rewrites pos 44
    after = eng.snapshot(h).tensors
    assert h.seq.blocks == blocks
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [eng.pool.alloc.ref[b] for b in blocks] == [1] * len(blocks)  # children gave their shares back
    # the children saw the prefix: same as running prefix + question without sharing
    for q, o in zip(qs, outs):
        assert o.token_ids == greedy_full(model, h.tokens + q, 20)
    assert outs[3].token_ids == greedy_full(model, h.tokens, 5)
    eng.release(h)
    assert eng.stats()["blocks_used"] == 0


def test_forks_share_blocks_while_running(model):
    eng = engine(model)
    h = eng.prefill_prefix(ids_of(40, 5))  # exactly 5 blocks
    rids = [eng.add_request(ids_of(3, i), SamplingParams(max_tokens=4, **GREEDY), h) for i in range(3)]
    eng.step()
    assert [eng.pool.alloc.ref[b] for b in h.seq.blocks] == [4] * 5
    for r in rids:
        assert eng.running[r].seq.blocks[:5] == h.seq.blocks
    used = eng.stats()["blocks_used"]
    assert used == 5 + 3  # one own block per child, not a copy of the prefix
    while eng.has_unfinished():
        eng.step()


def test_prefix_prefill_interleaves_with_decoding_and_continues(model):
    """A pack prefill goes through step() in chunks while a running request keeps getting one
    token per step; a prefix grown in two parts continues like one prefilled at once."""
    eng = engine(model, prefill_chunk=16)
    part1, part2, q = ids_of(29, 1), ids_of(30, 2), ids_of(5, 3)
    p = SamplingParams(max_tokens=12, **GREEDY)
    want = eng.complete(part1 + part2 + q, p).token_ids
    rid = eng.add_request(ids_of(10, 4), SamplingParams(max_tokens=6, **GREEDY))
    pid = eng.add_prefix(part1)
    per_step = []
    while (h1 := eng.take_prefix(pid)) is None:
        per_step.append(sum(ev.request_id == rid for ev in eng.step()))
    assert len(per_step) >= 2 and all(n == 1 for n in per_step[1:])  # decoding never stalled
    h2 = eng.prefill_prefix(part2, prefix=h1)
    eng.release(h1)
    assert h2.tokens == part1 + part2 and h2.seq.length == 59
    assert eng.complete(q, p, prefix=h2).token_ids == want
    while eng.has_unfinished():
        eng.step()
    eng.release(h2)
    assert eng.stats()["blocks_used"] == 0


def test_stop_conditions(model):
    eng = engine(model)
    ids = ids_of(30, 40)
    free = eng.complete(ids, SamplingParams(max_tokens=12, **GREEDY))
    # EOS = a stop token: generation ends on it, the token is reported, no text for it
    c = eng.complete(ids, SamplingParams(max_tokens=12, stop_token_ids=[free.token_ids[4]]))
    assert c.token_ids == free.token_ids[:5] and c.finish_reason == "stop"
    # stop string: output trimmed before it, streamed pieces never show any of it
    stop = free.text[5:8]
    evs = list(eng.generate(ids, SamplingParams(max_tokens=12, stop=[stop], **GREEDY)))
    text = "".join(e.text for e in evs)
    assert text == free.text[: free.text.index(stop)] and evs[-1].finish_reason == "stop"
    assert stop not in text
    # default stop token is the tokenizer's EOS
    assert SamplingParams().stop_token_ids is None and eng.eos_id == 1


def test_trace_reports_read_positions_and_mass(model):
    eng = engine(model)
    ids = ids_of(60, 50)
    c = eng.complete(ids, SamplingParams(max_tokens=3, trace=True, trace_top=5, trace_layers=True, **GREEDY))
    plain = eng.complete(ids, SamplingParams(max_tokens=3, **GREEDY))
    assert c.token_ids == plain.token_ids and plain.traces == [None] * 3
    for i, tr in enumerate(c.traces):
        assert len(tr.positions) == 5 and tr.mass == sorted(tr.mass, reverse=True)
        assert all(0 <= p < 60 + i for p in tr.positions)
        assert len(tr.layers) == model.cfg.num_hidden_layers
        for pos, mass in tr.layers:
            assert len(pos) == model.cfg.index_topk  # the top-k the indexer kept
            assert sum(mass) == pytest.approx(1.0, abs=1e-4)  # mass / heads sums to 1 per layer
        # aggregated mass = per-layer mass averaged over layers
        agg = {}
        for pos, mass in tr.layers:
            for p_, m_ in zip(pos, mass):
                agg[p_] = agg.get(p_, 0.0) + m_ / len(tr.layers)
        assert tr.mass[0] == pytest.approx(agg[tr.positions[0]], abs=1e-5)


def test_fp8_mode_caches_fp8_index_keys(model):
    """FP8 numerics quantize the indexer scores, so exact score ties appear and top-k can depend
    on how a sequence was chunked (the model itself then differs between one full forward and
    prefill + decode). So the oracle here is the model over its contiguous reference cache with
    the engine's schedule: same tokens through the paged FP8 cache means the same cache bytes."""
    cfg = tiny_config(0, fp8_numerics=True)
    m = random_model(cfg, 0)
    eng = engine(m, prefill_chunk=16)
    ids = ids_of(44, 60)
    c = eng.complete(ids, SamplingParams(max_tokens=12, **GREEDY))
    cache, toks = [new_sequence_cache(cfg.num_hidden_layers)], list(ids)
    with torch.no_grad():
        for s in range(0, 43, 16):
            m(torch.tensor([toks[s: min(s + 16, 43)]]), s, cache)
        for _ in range(12):
            toks.append(int(m(torch.tensor([toks[-1:]]), len(toks) - 1, cache)[0, -1].argmax()))
    assert c.token_ids == toks[44:]
    h = eng.prefill_prefix(ids[:43])
    snap = eng.snapshot(h)
    assert snap.tensors["layer.1.index_k"].dtype == torch.float8_e4m3fn
    assert snap.tensors["layer.1.index_scale"].shape == (43,)
    ref = cache[0][1]
    assert torch.equal(snap.tensors["layer.1.index_k"].view(torch.uint8), ref.index_k(43).view(torch.uint8))
    assert torch.equal(snap.tensors["layer.1.kv"], ref.kv(43))
    again = eng.complete(ids[43:], SamplingParams(max_tokens=12, **GREEDY), prefix=eng.restore(snap))
    assert again.token_ids == c.token_ids


def test_dense_mode_uses_the_same_engine(model):
    cfg = tiny_config(0, dense_attention=True)
    m = random_model(cfg, 0)
    ids = ids_of(50, 70)
    assert engine(m).complete(ids, SamplingParams(max_tokens=8, **GREEDY)).token_ids == greedy_full(m, ids, 8)


def test_restore_rejects_foreign_or_broken_snapshots(model):
    eng = engine(model)
    snap = eng.snapshot(eng.prefill_prefix(ids_of(20, 1)))
    other = engine(random_model(tiny_config(0), seed=1))
    with pytest.raises(ValueError, match="fingerprint"):
        other.restore(snap)
    t = dict(snap.tensors)
    t["layer.2.kv"] = t["layer.2.kv"][:, :10]
    with pytest.raises(ValueError, match=r"layer\.2\.kv.*expected \[20, 40\]"):
        eng.restore(t)
    del t["layer.2.kv"]
    with pytest.raises(ValueError, match=r"lacks tensor 'layer\.2\.kv'"):
        eng.restore(t)
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([1000])


def test_a_full_block_pool_fails_one_request_not_the_engine(model):
    eng = engine(model, n_blocks=4, max_blocks=8)  # 64 tokens of cache in all
    p = SamplingParams(max_tokens=4, **GREEDY)
    small, big = ids_of(20, 1), ids_of(70, 2)
    outs = eng.run_batch([(small, p), (big, p)])
    assert outs[1].finish_reason == "error" and "max_blocks" in outs[1].error and outs[1].token_ids == []
    assert outs[0].token_ids == greedy_full(model, small, 4)
    with pytest.raises(MemoryError, match="block pool exhausted"):
        eng.prefill_prefix(big)
    assert eng.stats()["blocks_used"] == 0
    assert eng.complete(small, p).token_ids == outs[0].token_ids  # still serving


def test_generate_closed_early_aborts_and_frees(model):
    eng = engine(model)
    it = eng.generate(ids_of(30, 3), SamplingParams(max_tokens=50, **GREEDY))
    first = [next(it) for _ in range(3)]
    assert [e.position for e in first] == [30, 31, 32]
    it.close()
    assert not eng.has_unfinished() and eng.stats()["blocks_used"] == 0


def test_async_streams_interleave_and_match_sync(model):
    eng = engine(model)
    a, b = ids_of(33, 1), ids_of(12, 2)
    p = SamplingParams(max_tokens=8, **GREEDY)
    want = [eng.complete(a, p).token_ids, eng.complete(b, p).token_ids]

    async def run():
        aeng = AsyncEngine(eng)

        async def one(ids):
            return [ev.token_id async for ev in aeng.generate(ids, p)]

        try:
            return await asyncio.gather(one(a), one(b))
        finally:
            aeng.close()

    assert asyncio.run(run()) == want


def test_restore_after_the_pool_grew_inside_a_step(model):
    """Regression (load test): a pool grown during step() (inference mode) must still accept the
    writes restore() makes outside inference mode."""
    eng = Engine(model, n_blocks=1)
    ids = torch.randint(8, model.cfg.vocab_size, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    first = eng.prefill_prefix(ids)  # 200 tokens > 1 block: the pool grows in step()
    snap = eng.snapshot(first)
    eng.release(first)  # its blocks are free again: restore reuses them, no further growth
    handle = eng.restore(snap)  # writes into the grown storage, outside inference mode
    assert handle.length == 200
    out = eng.complete(ids[:5], SamplingParams(max_tokens=3), prefix=handle)
    assert out.finish_reason == "length" and len(out.token_ids) == 3
