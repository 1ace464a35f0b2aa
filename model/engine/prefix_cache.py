"""Automatic prefix caching for an engine served alone (model/engine/server.py): a request that
shares a long token prefix with an earlier one forks that prefix's cache instead of prefilling it
again, and says how many prompt tokens came from the cache, as vLLM's automatic prefix caching and
SGLang's radix cache do (`usage.prompt_tokens_details.cached_tokens`).

    cache = PrefixCache(async_engine, max_entries=8)
    lease = await cache.lease(prompt_ids)        # lease.prefix (a handle or None), lease.rest, lease.cached
    try:
        async for ev in async_engine.generate(lease.rest, params, prefix=lease.prefix): ...
    finally:
        await lease.close()

How: the cache keeps up to `max_entries` prefilled prompts (an LRU of prefix handles). A new
prompt is matched against each by its longest common token prefix L (binary search over list
slices: ~17 C-speed comparisons for 128k tokens). L >= `min_tokens`: the matching entry is forked
at L (shared blocks, no copy; the engine copies a partly shared last block on its first write) and
only prompt[L:] is computed; when prompt[L:] is long (>= `extend_tokens`: a pack that grew, not a
question) it is prefilled as a new entry first, so the next request finds it. Otherwise (a miss)
the whole prompt is prefilled as a new entry and the request continues from it (cached = 0).
This is what makes "the same pack prompt, another question" cheap through an OpenAI-style API
that knows nothing about packs: the pack is the common prefix of its questions' prompts.

Forking needs the in-house engine's paged handles (`PrefixHandle.seq.fork(upto)`); with another
engine (DeepSeek-V4's), only an entry that is a whole prefix of the prompt is reused.
Tests: `.venv/bin/python -m pytest -q tests/model/engine/test_prefix_cache.py`.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from dsa_rag.model.engine.engine import PrefixHandle

MIN_TOKENS = 64  # a shared prefix shorter than one cache block is not worth a fork (vLLM caches full blocks)
EXTEND_TOKENS = 512  # a prompt this much longer than its match is cached as a new entry (a grown pack)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (binary search on slice equality)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # invariant: a[:lo] == b[:lo]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(eq=False)
class _Entry:
    handle: object
    tokens: list[int]
    pins: int = 0  # leases between lookup and fork (an evicted pinned entry is released by its last unpin)
    evicted: bool = False
    released: bool = False  # its handle was given back to the engine: never fork it again


@dataclass(eq=False)
class Lease:
    """One request's use of the cache: generate `rest` after `prefix`; `cached` prompt tokens
    came from the cache. close() gives back what the lease holds (its fork, its pin)."""

    prefix: object | None
    rest: list[int]
    cached: int
    _owned: object | None = None  # a fork made for this lease: released on close
    _entry: _Entry | None = None  # an entry used as it is: unpinned on close
    _cache: "PrefixCache | None" = field(default=None, repr=False)

    async def close(self) -> None:
        c, self._cache = self._cache, None
        if c is None:
            return
        if self._owned is not None:
            await c.engine.release(self._owned)
        if self._entry is not None:
            await c._unpin(self._entry)


class PrefixCache:
    """An LRU of prefilled prompts over an AsyncEngine, matched by longest common token prefix."""

    def __init__(self, engine, *, max_entries: int = 8, min_tokens: int = MIN_TOKENS,
                 extend_tokens: int = EXTEND_TOKENS):
        self.engine = engine
        self.max_entries = max_entries
        self.min_tokens = max(1, min_tokens)
        self.extend_tokens = extend_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # id -> entry, least recent first
        self._loading: dict[tuple, asyncio.Future] = {}  # prompt -> its in-flight prefill (shared)
        self.stats = {"queries": 0, "hits": 0, "query_tokens": 0, "hit_tokens": 0}

    def _forkable(self, handle) -> bool:
        return isinstance(handle, PrefixHandle)

    def _best(self, ids: list[int]) -> tuple[_Entry | None, int]:
        best, best_n = None, 0
        for e in self._entries.values():
            n = common_prefix(e.tokens, ids)
            if n < len(e.tokens) and not self._forkable(e.handle):
                continue  # not forkable: only a whole entry can be reused
            if n > best_n:
                best, best_n = e, n
        return (best, best_n) if best_n >= self.min_tokens else (None, 0)

    async def lease(self, ids: list[int]) -> Lease:
        """Where `ids` continues from: a cached prefix (forked) or a fresh prefill of it."""
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        self.stats["queries"] += 1
        self.stats["query_tokens"] += len(ids)
        entry, n = self._best(ids)
        if entry is None:
            entry = await self._prefill(ids, None)
            while entry.released:  # a shared prefill, evicted before this waiter resumed: do it again
                entry = await self._prefill(ids, None)
            return await self._use(entry, len(ids), ids, cached=0)
        self._touch(entry)
        cached = min(n, len(ids) - 1)  # the engine feeds >= 1 prompt token itself
        self.stats["hits"] += 1
        self.stats["hit_tokens"] += cached
        if len(ids) - n >= self.extend_tokens:  # a grown prompt: cache the longer one too
            entry.pins += 1
            try:
                base = await self._fork(entry, n)
            finally:
                await self._unpin(entry)
            try:
                grown = await self._prefill(ids, base)
            finally:
                await self.engine.release(base)
            return await self._use(grown, len(ids), ids, cached=cached)
        return await self._use(entry, n, ids, cached=cached)

    async def _use(self, entry: _Entry, n: int, ids: list[int], cached: int) -> Lease:
        entry.pins += 1
        if self._forkable(entry.handle):
            try:
                view = await self._fork(entry, n)
            finally:
                await self._unpin(entry)
            return Lease(view, ids[n:], cached, _owned=view, _cache=self)
        return Lease(entry.handle, ids[n:], cached, _entry=entry, _cache=self)  # stays pinned until close

    async def _fork(self, entry: _Entry, n: int) -> PrefixHandle:
        h = entry.handle
        return await self.engine.call(lambda: PrefixHandle(h.seq.fork(n), list(h.tokens[:n])))

    async def _prefill(self, ids: list[int], base) -> _Entry:
        """Prefill `ids` (after `base`, a fork of its first tokens) as a new entry; concurrent
        requests with the same prompt share one prefill."""
        key = tuple(ids)
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            rest = ids[len(base.tokens):] if base is not None else ids
            handle = await self.engine.prefill_prefix(rest, base)
            entry = _Entry(handle, list(ids))
            self._entries[id(entry)] = entry
            entry.pins += 1  # not evictable before its first lease forks it
            fut.set_result(entry)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no warning when nobody else waited
            raise
        finally:
            self._loading.pop(key, None)
        await self._evict()
        entry.pins -= 1
        return entry

    def _touch(self, entry: _Entry) -> None:
        if id(entry) in self._entries:
            self._entries.move_to_end(id(entry))

    async def _unpin(self, entry: _Entry) -> None:
        entry.pins -= 1
        if entry.pins <= 0 and entry.evicted:
            entry.evicted, entry.released = False, True  # released once
            await self.engine.release(entry.handle)
        elif entry.pins <= 0 and len(self._entries) > self.max_entries:
            await self._evict()

    async def _evict(self) -> None:
        for key in list(self._entries):
            if len(self._entries) <= self.max_entries:
                return
            e = self._entries.pop(key)
            if e.pins > 0:
                e.evicted = True  # its last lease releases it
            else:
                e.released = True
                await self.engine.release(e.handle)

    async def clear(self) -> None:
        """Release every entry (server shutdown)."""
        for e in list(self._entries.values()):
            e.released = True
            await self.engine.release(e.handle)
        self._entries.clear()
