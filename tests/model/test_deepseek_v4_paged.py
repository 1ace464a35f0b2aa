"""Paged DeepSeek-V4 caches (model/v4/paged.py) and the batched V4 decode step (model/v4/engine.py):
forks share the pack's blocks, copy-on-write keeps the pack intact, snapshots of paged caches
restore, one decode forward per step gives the tokens one forward per request gives, and all of
it equals recomputing the whole sequence. Blocks are 2 entries here (8 tokens on CSA, 16 on HCA),
so every prefix ends inside a partially filled block.

    .venv/bin/python -m pytest -q tests/model/test_deepseek_v4_paged.py -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

from dsa_rag.model.engine.engine import Snapshot
from dsa_rag.model.engine.sampling import SamplingParams
from dsa_rag.model.load import load_any, load_model
from dsa_rag.model.v4.engine import V4Engine
from dsa_rag.model.v4.load import cast_v4, load_v4_model, save_v4_checkpoint
from dsa_rag.model.v4.model import Transformer
from dsa_rag.model.v4.paged import V4BlockPool
from tests.model.v4_helpers import random_v4, tiny_v4_config, v4_ids

BS = 2  # entries per block


@pytest.fixture(scope="module")
def model():
    return random_v4(tiny_v4_config(), seed=21)


_ids = v4_ids


@torch.no_grad()
def _recompute_greedy(model, ids, n):
    seq = torch.tensor([ids])
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, len(ids):].tolist()


def _run(eng, requests):
    """Add every (ids, params, prefix) request, step until all finish -> tokens per request."""
    rids = [eng.add_request(ids, params, prefix) for ids, params, prefix in requests]
    out = {rid: [] for rid in rids}
    while eng.has_unfinished():
        for ev in eng.step():
            assert ev.finish_reason != "error", ev.error
            out[ev.request_id].append(ev)
    return [out[rid] for rid in rids]


def _decode_batches(eng):
    """Record the batch size of every one-token forward the engine makes."""
    sizes, hidden = [], eng.model.hidden

    def spy(tokens, cache=None, trace=None):
        if tokens.shape[1] == 1 and isinstance(cache, list):
            sizes.append(tokens.shape[0])
        return hidden(tokens, cache, trace)

    eng.model.hidden = spy
    return sizes


def _entries(n_tokens, ratio):
    return n_tokens // ratio


def _owned_blocks(n_prefix, n_total, ratio):
    """Blocks a fork of an n_prefix-token pack owns once it holds n_total tokens: its entries'
    blocks past the pack's full ones (the shared partial block is copied on its first write)."""
    p, t = _entries(n_prefix, ratio), _entries(n_total, ratio)
    if t == p:
        return 0
    return -(-t // BS) - p // BS


def test_forked_questions_batched_decode_equal_recomputation(model):
    """(a) A pack prefilled in chunks of 7 (boundaries inside CSA-4 and HCA-8 windows), two
    questions forked off its handle, 40 greedy tokens each decoded together (one forward per
    step for both), each equal to recomputing its whole sequence."""
    eng = V4Engine(model, prefill_chunk=7, block_size=BS)
    sizes = _decode_batches(eng)
    pack, questions = _ids(45, 1), [_ids(6, 2), _ids(3, 3)]
    handle = eng.prefill_prefix(pack)
    greedy = SamplingParams(max_tokens=40, stop_token_ids=[], trace=True)
    evs = _run(eng, [(q, greedy, handle) for q in questions])
    for q, ev in zip(questions, evs):
        got = [e.token_id for e in ev]
        assert len(got) == 40 and ev[-1].finish_reason == "length"
        assert got == _recompute_greedy(model, pack + q, 40)
        assert len(set(got)) > 3  # not a degenerate repetition
        for e in ev:  # traces read positions inside each question's own context
            assert e.trace is not None and all(0 <= p < e.position for p in e.trace.positions)
    # One forward per step for both: the 3-token question's prefill waits one step for budget
    # (7 - 6 = 1 token), so the first and the last feed are the other question's alone; a
    # request's 40th token is not fed.
    assert sizes == [1] + [2] * 38 + [1]
    # The pack was not changed by its forks' copy-on-write.
    again = _run(eng, [(questions[0], greedy, handle)])[0]
    assert [e.token_id for e in again] == [e.token_id for e in evs[0]]
    eng.release(handle)
    assert eng.pool.used_blocks() == 0


def test_forks_share_blocks(model):
    """(b) N forks of a 45-token pack grow the pool by their own tokens' blocks only (plus one
    copied partial block each), not by N copies of the pack."""
    eng = V4Engine(model, prefill_chunk=16, block_size=BS)
    pack = _ids(45, 4)
    handle = eng.prefill_prefix(pack)
    ratios = sorted(eng.pool.groups)  # [4, 8]
    base = sum(-(-_entries(45, r) // BS) for r in ratios)
    assert eng.pool.used_blocks() == base
    lengths = [3, 11, 20, 2]  # 45 + 3 closes one more CSA and HCA entry; 45 + 2 closes none
    children = [eng.prefill_prefix(_ids(n, 10 + i), prefix=handle) for i, n in enumerate(lengths)]
    own = sum(_owned_blocks(45, 45 + n, r) for n in lengths for r in ratios)
    assert eng.pool.used_blocks() == base + own
    assert own < len(lengths) * base  # what copying the pack per fork would have cost, at least
    # A fork that closed no new entry shares everything: 45 + 2 = 47 closes none at ratio 4 or 8.
    assert all(_owned_blocks(45, 47, r) == 0 for r in ratios)
    assert children[3].cache.blocks() == handle.cache.blocks()
    for c in children:
        eng.release(c)
    assert eng.pool.used_blocks() == base
    eng.release(handle)
    assert eng.pool.used_blocks() == 0


@torch.no_grad()
def test_paged_cache_equals_dense_cache_and_full_forward(model):
    """The model over a paged cache: chunked prefill, a fork, decode on both the fork and the
    parent (copy-on-write of the shared partial blocks) all equal one full forward."""
    tok = torch.tensor([_ids(70, 5)])
    full = model(tok)
    pool = V4BlockPool(model.cfg, block_size=BS)
    cache = pool.new_cache()
    got, s = [], 0
    for n in (5, 11, 3, 17):  # 36 tokens
        got.append(model(tok[:, s: s + n], cache))
        s += n
    child = cache.fork()
    tail_child = [model(tok[:, t: t + 1], child) for t in range(s, 70)]
    tail_parent = [model(tok[:, t: t + 1], cache) for t in range(s, 70)]
    for tail in (tail_child, tail_parent):
        assert (torch.cat(got + tail, 1) - full).abs().max().item() <= 1e-4
    dense = model.new_cache()
    model(tok, dense)
    assert cache.layers[1].compressor.count == dense.layers[1].compressor.count == 70 // 4
    assert torch.allclose(cache.layers[1].indexer.entries, dense.layers[1].indexer.entries, atol=1e-5)
    child.free()
    cache.free()
    assert pool.used_blocks() == 0


@torch.no_grad()
def test_batched_forward_equals_one_forward_per_sequence(model):
    """(d) One forward over a list of caches at different lengths gives each row the logits its
    own forward gives."""
    pool = V4BlockPool(model.cfg, block_size=BS)
    caches, lens = [], [9, 30, 45, 4]
    for i, n in enumerate(lens):
        caches.append(pool.new_cache())
        model.hidden(torch.tensor([_ids(n, 20 + i)]), caches[-1])
    twins = [c.fork() for c in caches]
    nxt = torch.tensor([[7], [8], [9], [10]])
    batched = model(nxt, caches)
    one = torch.cat([model(nxt[b: b + 1], twins[b]) for b in range(4)])
    assert (batched - one).abs().max().item() <= 1e-5
    assert torch.equal(batched.argmax(-1), one.argmax(-1))
    assert [c.length for c in caches] == [n + 1 for n in lens]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_step_equals_sequential(dtype):
    """(d) The engine's batched decode (one forward per step) and its sequential one (one per
    request) give the same greedy tokens, for requests at different lengths, with and without a
    prefix, one of them finishing early."""
    m = random_v4(tiny_v4_config(), seed=21)
    m = cast_v4(m, dtype) if dtype != "float32" else m
    out = {}
    for batched in (True, False):
        eng = V4Engine(m, prefill_chunk=9, block_size=BS, batched=batched)
        pack = eng.prefill_prefix(_ids(29, 6))
        reqs = [(_ids(5, 7), SamplingParams(max_tokens=33, stop_token_ids=[]), pack),
                (_ids(13, 8), SamplingParams(max_tokens=33, stop_token_ids=[]), None),
                (_ids(2, 9), SamplingParams(max_tokens=12, stop_token_ids=[]), pack),
                (_ids(40, 10), SamplingParams(max_tokens=33, stop_token_ids=[]), None)]
        out[batched] = [[(e.token_id, e.logprob) for e in ev] for ev in _run(eng, reqs)]
    for a, b in zip(out[True], out[False]):
        assert [t for t, _ in a] == [t for t, _ in b]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= (1e-4 if dtype == "float32" else 0.05)
    assert [len(x) for x in out[True]] == [33, 33, 12, 33]


def test_snapshot_of_a_fork_restores_and_continues(model, tmp_path):
    """(c) A handle that is a fork of a pack (its own blocks not consecutive with the pack's):
    snapshot -> safetensors -> restore in another engine -> the same continuation. The snapshot
    is a copy: releasing the handle and reusing its blocks does not change it."""
    eng = V4Engine(model, prefill_chunk=6, block_size=BS)
    pack = eng.prefill_prefix(_ids(37, 11))
    other_fork = eng.prefill_prefix(_ids(9, 12), prefix=pack)  # takes blocks between the pack and the next fork
    handle = eng.prefill_prefix(_ids(14, 13), prefix=pack)
    params = SamplingParams(max_tokens=20, stop_token_ids=[])
    want = [(e.token_id, e.logprob) for e in _run(eng, [(_ids(4, 14), params, handle)])[0]]
    snap = eng.snapshot(handle)
    before = {k: v.clone() for k, v in snap.tensors.items()}
    for h in (handle, other_fork, pack):
        eng.release(h)
    _run(eng, [(_ids(60, 15), params, None)])  # reuses the freed blocks
    assert all(torch.equal(before[k], v) for k, v in snap.tensors.items())
    snap.save(tmp_path / "fork.safetensors")
    fresh = V4Engine(model, block_size=3)  # another block size: the snapshot does not depend on it
    restored = fresh.restore(Snapshot.load(tmp_path / "fork.safetensors"))
    got = [(e.token_id, e.logprob) for e in _run(fresh, [(_ids(4, 14), params, restored)])[0]]
    assert got == want
    # Wrong format, wrong dtype, a pool of the wrong size: refused, naming what is wrong.
    with pytest.raises(ValueError, match="format"):
        fresh.restore(snap.tensors, {**snap.metadata, "format": "dsa-v4-snapshot/0"})
    used = fresh.pool.used_blocks()
    bad = dict(snap.tensors)
    bad["layer.1.compressor.entries"] = bad["layer.1.compressor.entries"][:, :-1]
    with pytest.raises(ValueError, match="entries"):
        fresh.restore(bad)
    assert fresh.pool.used_blocks() == used  # a refused restore gives its blocks back
    bf16 = V4Engine(cast_v4(random_v4(tiny_v4_config(), seed=21), "bfloat16"))
    with pytest.raises(ValueError, match="bfloat16|fingerprint"):
        bf16.restore(snap)
    with pytest.raises(ValueError, match="torch.float32, this engine caches torch.bfloat16"):
        bf16.restore(snap.tensors)  # no metadata: the per-tensor dtype check catches it


def test_pool_limit_fails_the_request_not_the_engine(model):
    """A pool at max_blocks fails the request that needs another block; the engine goes on."""
    eng = V4Engine(model, prefill_chunk=64, block_size=BS, n_blocks=2, max_blocks=4)
    [ev] = _run(eng, [(_ids(5, 16), SamplingParams(max_tokens=2, stop_token_ids=[]), None)])
    assert len(ev) == 2
    rid = eng.add_request(_ids(80, 17), SamplingParams(max_tokens=2, stop_token_ids=[]))
    evs = [e for _ in range(3) for e in eng.step() if e.request_id == rid]
    assert evs and evs[-1].finish_reason == "error" and "MemoryError" in evs[-1].error
    assert eng.pool.used_blocks() == 0 and not eng.has_unfinished()


def test_load_model_on_a_v4_checkpoint_names_the_v4_loader(model, tmp_path):
    """load_model builds V3.2 / GLM-5 networks (what its callers drive: Engine, eval, training);
    on a deepseek_v4 dir it says what loads it instead, and that loader gives the same model
    (load_engine routes the dir to V4Engine: test_deepseek_v4_engine.py)."""
    d = save_v4_checkpoint(model, tmp_path / "tiny-v4")
    for load in (load_model, load_any):
        with pytest.raises(ValueError, match=r"DeepSeek-V4 checkpoint.*load_v4_model.*load_engine"):
            load(d)
    m = load_v4_model(d)
    assert isinstance(m, Transformer) and not m.training
    tok = torch.tensor([_ids(20, 18)])
    with torch.no_grad():
        assert (m(tok) - model(tok)).abs().max().item() <= 1e-5
