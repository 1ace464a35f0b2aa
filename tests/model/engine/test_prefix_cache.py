"""Automatic prefix caching of the engine server (model/engine/prefix_cache.py) on the shipped
dsa-tiny: a second prompt that shares a pack with the first forks its cache (cached tokens = the
common prefix) and decodes exactly what a cold engine decodes; a grown prompt is cached as a new
entry; the LRU releases what it evicts.

    .venv/bin/python -m pytest -q tests/model/engine/test_prefix_cache.py
"""

from __future__ import annotations

import asyncio

import pytest

from dsa_rag.model.engine.factory import load_engine
from dsa_rag.model.engine.prefix_cache import PrefixCache, common_prefix
from dsa_rag.model.engine.sampling import SamplingParams
from dsa_rag.model.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
DOC = ("Warehouse report\nThe access code of the Porto warehouse is 7351902.\nDeliveries arrive on Tuesdays.\n" * 2)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def engine():
    eng = load_engine("dsa-tiny", device="cpu", threads=1)
    yield eng
    eng.close()


async def _answer(engine, cache, ids):
    lease = await cache.lease(ids)
    try:
        toks = [ev.token_id async for ev in engine.generate(lease.rest, GREEDY, prefix=lease.prefix)
                if ev.token_id >= 0]
    finally:
        await lease.close()
    return toks, lease.cached


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([7] * 1000, [7] * 1000) == 1000


def test_a_second_question_on_the_pack_forks_its_cache_and_decodes_the_same(engine):
    async def run():
        cache = PrefixCache(engine, max_entries=2, extend_tokens=10_000)
        q1 = TOK.prompt_ids([("r.txt", DOC)], "What is the access code of the Porto warehouse?")
        q2 = TOK.prompt_ids([("r.txt", DOC)], "When do deliveries arrive at the Porto warehouse?")
        t1, c1 = await _answer(engine, cache, q1)
        t2, c2 = await _answer(engine, cache, q2)
        cold_cache = PrefixCache(engine, max_entries=0)
        cold, _ = await _answer(engine, cold_cache, q2)  # no reuse: a fresh prefill
        await cache.clear()
        await cold_cache.clear()
        return q1, q2, t1, c1, t2, c2, cold, cache

    q1, q2, t1, c1, t2, c2, cold, cache = asyncio.run(run())
    assert c1 == 0 and t1  # the first prompt was prefilled
    assert c2 == common_prefix(q1, q2) > len(TOK.prompt_ids([("r.txt", DOC)]))  # the pack and more
    assert t2 == cold  # forked at the common prefix: the same greedy tokens as a cold engine
    assert cache.stats["hits"] == 1 and cache.stats["hit_tokens"] == c2


def test_a_grown_prompt_becomes_an_entry_and_evictions_release(engine):
    async def run():
        before = engine.engine.pool.used_blocks()
        cache = PrefixCache(engine, max_entries=1, extend_tokens=64)
        base = TOK.prompt_ids([("r.txt", DOC)])
        grown = TOK.prompt_ids([("r.txt", DOC), ("s.txt", DOC)], "What is the access code?")
        _, c0 = await _answer(engine, cache, base)
        _, c1 = await _answer(engine, cache, grown)  # extends the first entry, evicts it (max 1)
        _, c2 = await _answer(engine, cache, grown)  # the grown prompt is now cached itself
        used = engine.engine.pool.used_blocks()
        await cache.clear()
        return base, grown, c0, c1, c2, used - before, engine.engine.pool.used_blocks() - before, len(cache._entries)

    base, grown, c0, c1, c2, used, after, n = asyncio.run(run())
    assert c0 == 0 and c1 == len(base) and c2 == len(grown) - 1
    assert used > 0 and after == 0 and n == 0  # nothing leaked: every entry and fork released
