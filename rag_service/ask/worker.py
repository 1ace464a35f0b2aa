"""The model side of one replica: a pack's prompt prefix (replica memory, else the KV store, else
prefill) -> the question -> a streamed answer with a model score and citations read from the
sparse attention trace.

    from dsa_rag.model.engine.factory import load_engine
    from dsa_rag.rag_service.ask.params import AskParams
    from dsa_rag.rag_service.ask.worker import PackWorker
    worker = PackWorker(rag, load_engine("dsa-tiny", tokenizer=rag.tok))   # one per model replica
    async for ev in worker.stream(pack_id, AskParams("What was the revenue?")):
        ...  # {"event": "start"|"token"|"end", ...}
    worker.close()                                                       # closes its engine

The worker drives any `dsa_rag.model.engine.protocol.EngineProtocol` (concurrent questions on a
replica decode together, continuous batching). Per pack (`PackWorker.stream`):
  1. key = KVStore.key_for(engine fingerprint, tenant, pack prompt ids);
  2. the prefix handle comes from the replica's memory (LRU of `warm_packs` handles), else from
     the KV store (safetensors in the data dir, metadata in Redis: another replica or node
     prefilled it; the engine's `restore` checks the model fingerprint), else it is prefilled
     here, snapshotted and stored for everyone. Concurrent questions over one cold pack prefill
     it once;
  3. the question forks the handle (shared blocks, no copy) and decodes with the question's
     `SamplingParams` (max_tokens capped at `max_new_tokens`, attention trace on);
  4. score = mean model log-prob of the generated tokens (untempered; <eos> included);
     citations = the document sentences that drew the answer's attention mass (the engine's
     per-token trace summed over the answer's tokens, attention sinks discounted), through the
     pack layout to (document, name, page, char span, snippet, share), and the answer's support
     score (ask/grounding.py); "abstained" when the question asked for abstention and the
     support is below `abstain_threshold`.
A question's packs are fanned out and merged by `dsa_rag.rag_service.ask.fanout.ask_events`.

Imports neither FastAPI nor Ray. Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_ask_path.py
tests/service/test_api.py`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from contextlib import aclosing
from dataclasses import replace
from typing import AsyncIterator

from dsa_rag.model.engine.factory import load_engine
from dsa_rag.model.engine.protocol import EngineProtocol, PrefixHandleProtocol, accepts_progress
from dsa_rag.rag_service.ask.cachestate import (PUBLISH_EVERY_S, WARM_REFRESH_S, clear_progress, clear_warm,
                                                publish_progress, publish_warm)
from dsa_rag.rag_service.ask.grounding import ground
from dsa_rag.rag_service.ask.lexical_citations import lexical_ground
from dsa_rag.rag_service.ask.params import AskParams
from dsa_rag.rag_service.ask.progress import PrefillProgress
from dsa_rag.rag_service.ask.upstream_errors import engine_failure
from dsa_rag.rag_service.packing.layout import PackLayout

log = logging.getLogger(__name__)

TRACE_TOP = 32  # positions per generated token in the engine's attention trace
PROGRESS_POLL_S = 0.5  # how often a question waiting on a prefill looks at its progress
PROGRESS_HEARTBEAT_S = 5.0  # a progress event at least this often (a fresh ETA) even between chunks


class PackWorker:
    """The model side of one replica: the engine, warm prefix handles (memory LRU), the KV store.
    Async: call it from one event loop at a time (a Ray replica's, the app's). The worker owns
    the engine it is given: `close()` closes it. `publish_warm`: write the set of packs held warm
    to Redis (ask/cachestate.py) for processes without this worker (a Ray replica's ingress)."""

    def __init__(self, rag, engine: EngineProtocol, *, replica_id: str = "local", warm_packs: int = 8,
                 citations: int = 5, max_new_tokens: int = 512, publish_warm: bool = False):
        self.rag = rag
        self.engine = engine
        self.replica_id = replica_id
        self.warm_limit = warm_packs
        self.citations = citations
        self.max_new_tokens = max_new_tokens
        self._warm: OrderedDict[str, PrefixHandleProtocol] = OrderedDict()  # cache key -> prefix handle
        self._prompts: OrderedDict[str, tuple] = OrderedDict()  # pack id -> (ids, layout, key, (tokens, version))
        self._loading: dict[str, asyncio.Future] = {}  # cache key -> in-flight prefill / restore
        # A handle handed to a question is pinned until the question has forked it: evicting it
        # from the warm LRU meanwhile only retires it, and the last unpin releases it (else a
        # concurrent eviction could free the blocks between lookup and fork).
        self._pins: dict[int, int] = {}  # id(handle) -> pins
        self._retired: dict[int, PrefixHandleProtocol] = {}  # id(handle) -> evicted while pinned
        self.counters = {"memory": 0, "store": 0, "prefill": 0, "requests": 0}
        self.prefilling: dict[str, PrefillProgress] = {}  # pack id -> the prefill running for it now
        self._progress_ok = accepts_progress(engine)  # the progress= hook is optional in the protocol
        self.publish_warm = publish_warm
        self._warm_task: asyncio.Task | None = None  # rewrites the published warm set (_publish_warm)
        self._warm_dirty: asyncio.Event | None = None  # set when the warm set changed
        self._warm_lock = threading.Lock()  # a write and the removal on close never interleave
        self._warm_closed = False

    @classmethod
    def from_settings(cls, rag, settings, *, replica_id: str = "local", engine=None,
                      publish_warm: bool = False) -> "PackWorker":
        """The worker a replica runs: the engine `settings` name (model, dtype, fp8_numerics,
        index_every, torch_threads), decoding with the pipeline's tokenizer, within the settings' limits
        (warm_packs_per_replica, citations_per_pack, max_new_tokens). `settings`: a ServeSettings.
        `engine`: one already built (a multi-device replica's leader, serve/ranks.py) instead."""
        s = settings
        if engine is None and getattr(s, "replica_ranks", 1) > 1:
            raise ValueError(f"tensor_parallel_size / expert_parallel_size > 1 ({s.replica_ranks} ranks per replica) "
                             f"runs on Ray, one placement group per replica: serve with Ray (not --no-ray)")
        if engine is None:
            engine = load_engine(s.model, tokenizer=rag.tok, threads=s.torch_threads, dtype=s.dtype,
                                 fp8_numerics=s.fp8_numerics, index_every=s.index_every,
                                 backend=s.engine, upstream=s.upstream_options())  # engine: dsa | openai
        return cls(rag, engine, replica_id=replica_id, warm_packs=s.warm_packs_per_replica,
                   citations=s.citations_per_pack, max_new_tokens=s.max_new_tokens, publish_warm=publish_warm)

    @property
    def fingerprint(self) -> str:
        return self.engine.fingerprint

    def close(self) -> None:
        self.unpublish_warm()
        self.engine.close()

    # --- prompts and prefix caches -----------------------------------------------------------------
    async def _prompt(self, pack_id: str) -> tuple[list[int], PackLayout, str]:
        """The pack's prompt ids, layout and cache key. An open pack grows under the same id
        (documents are appended), so the cached prompt is checked against its token count."""
        pack = await asyncio.to_thread(self.rag.get_pack, pack_id)
        stamp = (pack.tokens, pack.version)
        hit = self._prompts.get(pack_id)
        if hit is not None and hit[3] == stamp:
            self._prompts.move_to_end(pack_id)
            return hit[:3]

        def load():
            ids, layout = self.rag.pack_prompt(pack_id)
            return ids, layout, self.rag.kv.key_for(self.fingerprint, pack.tenant, ids)

        ids, layout, key = await asyncio.to_thread(load)
        self._prompts[pack_id] = (ids, layout, key, (len(ids), layout.version))
        while len(self._prompts) > max(4 * self.warm_limit, 16):
            self._prompts.popitem(last=False)
        return ids, layout, key

    def _held(self, handle) -> bool:
        """The handle is warm or retired-but-pinned, i.e. not released yet."""
        return self._retired.get(id(handle)) is handle or any(h is handle for h in self._warm.values())

    def _pin(self, handle) -> None:
        self._pins[id(handle)] = self._pins.get(id(handle), 0) + 1

    async def unpin(self, handle) -> None:
        """The caller of `prefix()` is done with the handle (it has forked it, or gave up)."""
        n = self._pins.get(id(handle), 0) - 1
        if n > 0:
            self._pins[id(handle)] = n
            return
        self._pins.pop(id(handle), None)
        old = self._retired.pop(id(handle), None)
        if old is not None:
            await self.engine.release(old)

    async def _evict(self) -> None:
        while len(self._warm) > self.warm_limit:
            _, old = self._warm.popitem(last=False)
            if id(old) in self._pins:
                self._retired[id(old)] = old
            else:
                await self.engine.release(old)  # running forks keep their blocks

    async def prefix(self, pack_id: str):
        """-> (prefix handle, ids, layout, source, cached tokens) with source memory | store |
        prefill (cached > 0 there when a grown pack extended its older warm prefix). The handle
        comes pinned: call `unpin(handle)` once it is forked."""
        while True:
            ids, layout, key = await self._prompt(pack_id)
            handle = self._warm.get(key)
            if handle is not None:
                self._warm.move_to_end(key)
                self._pin(handle)
                self.counters["memory"] += 1
                return handle, ids, layout, "memory", len(ids)
            pending = self._loading.get(key)
            if pending is None:
                break
            # another question is loading this pack right now: share its work
            handle, _, _ = await asyncio.shield(pending)
            if not self._held(handle):  # evicted and released while we waited: look again
                continue
            self._pin(handle)
            self.counters["memory"] += 1
            return handle, ids, layout, "memory", len(ids)
        fut = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            handle, source, cached = await self._load(pack_id, ids, key)
            fut.set_result((handle, source, cached))
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            self._loading.pop(key, None)
        self.counters[source] += 1
        self._pin(handle)
        if self.warm_limit:
            self._warm[key] = handle
            await self._evict()
            self._warm_changed()
        else:
            self._retired[id(handle)] = handle  # not kept warm: released when its question forked it
        return handle, ids, layout, source, cached

    async def _load(self, pack_id: str, ids: list[int], key: str):
        entry = await asyncio.to_thread(self.rag.kv.get, key)
        if entry is not None:
            try:
                return await self.engine.restore(entry.tensors, entry.metadata), "store", len(ids)
            except ValueError as e:  # another model / a broken file: drop it and prefill
                log.warning("KV entry for pack %s not restorable (%s); prefilling", pack_id, e)
                await asyncio.to_thread(self.rag.kv.remove, key, "stale")
        # An open pack that grew: its previous prompt is a prefix of this one, extend it.
        base = max((h for h in self._warm.values() if len(h.tokens) < len(ids) and ids[:len(h.tokens)] == h.tokens),
                   key=lambda h: len(h.tokens), default=None)
        rest, reused = (ids[len(base.tokens):], len(base.tokens)) if base is not None else (ids, 0)
        if base is not None:
            self._pin(base)  # it must outlive the prefill that extends it
        prog = self.prefilling[pack_id] = PrefillProgress(pack_id, total=len(ids), done=reused)
        hook = {"progress": prog.update} if self._progress_ok else {}
        stop = asyncio.Event()
        publisher = asyncio.ensure_future(self._publish(prog, stop))  # for processes without this worker
        try:
            try:
                handle = await self.engine.prefill_prefix(rest, base, **hook)  # chunks interleave with others' decoding
            finally:
                if self.prefilling.get(pack_id) is prog:
                    del self.prefilling[pack_id]
                if base is not None:
                    await self.unpin(base)
            snap = await self.engine.snapshot(handle)
            try:
                await asyncio.to_thread(self.rag.kv.put, key, snap.tensors, snap.metadata, pack_id=pack_id,
                                        model=self.fingerprint, tokens=len(ids))
            except Exception:  # the answer does not depend on the store; the next replica re-prefills
                log.exception("storing the prefix cache of pack %s failed", pack_id)
        finally:  # published until it is stored: an observer never sees "cold" in between
            stop.set()
            await publisher
        return handle, "prefill", reused

    async def _publish(self, prog: PrefillProgress, stop: asyncio.Event) -> None:
        """Write `prog` to Redis every PUBLISH_EVERY_S until `stop`, then remove it (ask/cachestate.py).
        One task owns the key, so no late write can outlive the removal."""
        try:
            while not stop.is_set():
                await asyncio.to_thread(publish_progress, self.rag, prog, self.replica_id)
                try:
                    await asyncio.wait_for(stop.wait(), PUBLISH_EVERY_S)
                except TimeoutError:
                    pass
            await asyncio.to_thread(clear_progress, self.rag, prog.pack_id)
        except Exception as e:  # noqa: BLE001 - Redis trouble must not fail a prefill; /v1/packs shows less
            log.warning("publishing the prefill progress of pack %s failed: %s", prog.pack_id, e)

    # --- the warm set, published for processes without this worker (ask/cachestate.py) ----------
    def _warm_changed(self) -> None:
        """The warm set changed: have `_publish_warm` write it now (started on the first change)."""
        if not self.publish_warm or self._warm_closed:
            return
        if self._warm_task is None or self._warm_task.done():
            self._warm_dirty = asyncio.Event()
            self._warm_task = asyncio.ensure_future(self._publish_warm())
        self._warm_dirty.set()

    async def _publish_warm(self) -> None:
        """Write the warm pack ids when they change and every WARM_REFRESH_S (the entry's TTL lets a
        dead replica's expire), until `unpublish_warm`."""
        while not self._warm_closed:
            self._warm_dirty.clear()
            try:
                await asyncio.to_thread(self._write_warm, self.warm_pack_ids())
            except Exception as e:  # noqa: BLE001 - Redis trouble must not fail questions; /v1/packs shows less
                log.warning("publishing the warm packs of replica %s failed: %s", self.replica_id, e)
            try:
                await asyncio.wait_for(self._warm_dirty.wait(), WARM_REFRESH_S)
            except TimeoutError:
                pass

    def _write_warm(self, pack_ids: list[str]) -> None:
        with self._warm_lock:
            if not self._warm_closed:
                publish_warm(self.rag, self.replica_id, pack_ids)

    def unpublish_warm(self) -> None:
        """Stop publishing the warm set and remove it (blocking; from any thread: `close()`, a Ray
        replica's shutdown). A write in flight lands before the removal or not at all."""
        with self._warm_lock:
            was_closed, self._warm_closed = self._warm_closed, True
            if self.publish_warm and not was_closed:
                try:
                    clear_warm(self.rag, self.replica_id)
                except Exception as e:  # noqa: BLE001 - the entry then expires after its TTL
                    log.warning("removing the warm packs of replica %s failed: %s", self.replica_id, e)
        task = self._warm_task
        if task is not None and not task.done():
            try:
                task.get_loop().call_soon_threadsafe(task.cancel)
            except RuntimeError:  # its loop is closed already
                pass

    async def warm(self, pack_id: str) -> str:
        """Make the pack's prefix warm in this replica (background prefill). -> cache source."""
        handle, _, _, source, _ = await self.prefix(pack_id)
        await self.unpin(handle)
        return source

    def warm_pack_ids(self) -> list[str]:
        keys = set(self._warm)
        return [p for p, (_, _, k, _) in self._prompts.items() if k in keys]

    def cache_states(self) -> dict[str, dict]:
        """Pack id -> {"state": "memory"} or {"state": "prefilling", done_tokens, total_tokens,
        percent, eta_s, ...} for the packs this replica holds or is prefilling now."""
        out = {p: {"state": "memory", "replica": self.replica_id} for p in self.warm_pack_ids()}
        out.update({p: prog.state(self.replica_id) for p, prog in self.prefilling.items()})
        return out

    async def _prefix_events(self, pack_id: str) -> AsyncIterator:
        """`prefix(pack_id)`, yielding progress events while the pack prefills (when a chunk
        landed, else every PROGRESS_HEARTBEAT_S), then the prefix tuple as the last item.
        Giving up early cancels the lookup and gives back a handle it had pinned."""
        task = asyncio.ensure_future(self.prefix(pack_id))
        last_done, last_t = None, 0.0
        try:
            while not (await asyncio.wait({task}, timeout=PROGRESS_POLL_S))[0]:
                prog = self.prefilling.get(pack_id)
                if prog is not None and (prog.done != last_done or time.monotonic() - last_t >= PROGRESS_HEARTBEAT_S):
                    last_done, last_t = prog.done, time.monotonic()
                    yield prog.event(self.replica_id)
        except BaseException:
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is None:
                await self.unpin(task.result()[0])
            raise
        yield task.result()

    def stats(self) -> dict:
        return {"replica": self.replica_id, "warm_packs": len(self._warm), **self.counters}

    # --- one pack, streamed ---------------------------------------------------------------------
    async def stream(self, pack_id: str, params: AskParams) -> AsyncIterator[dict]:
        """Answer `params.question` over one pack. Events: progress {pack_id, done_tokens,
        total_tokens, percent, elapsed_s, eta_s, replica} while a cold prefix is prefilled (see
        ask/progress.py); start {pack_id, cache, prompt_tokens, cached_tokens, replica}; token {text, token_id, logprob} per generated token; end {text,
        score, citations, usage, timings}."""
        t0 = time.perf_counter()
        self.counters["requests"] += 1
        sampling = replace(params.sampling, max_tokens=min(params.sampling.max_tokens, self.max_new_tokens),
                           logprobs=True, trace=True, trace_top=TRACE_TOP)  # the score and citations need them
        async with aclosing(self._prefix_events(pack_id)) as lookup:  # closed with us, not by the GC
            async for item in lookup:
                if isinstance(item, dict):
                    yield item  # {"event": "progress", ...} while the pack's prefix is prefilled
                else:
                    handle, ids, layout, source, cached = item
        try:
            n = len(ids)
            t_prefix = time.perf_counter()
            q_ids = self.rag.tok.question_ids(params.question)
            yield {"event": "start", "pack_id": pack_id, "cache": source, "prompt_tokens": n + len(q_ids),
                   "cached_tokens": cached, "replica": self.replica_id}
            mass: dict[int, float] = {}
            logps, text, finish, n_out, t_first = [], [], "length", 0, None
            traced, upstream_usage = False, None  # an upstream engine: no traces, its own usage (engine: openai)
            async for ev in self.engine.generate(q_ids, sampling, prefix=handle):
                if ev.token_id < 0:  # the engine ended the request without a token: abort or error
                    if ev.finish_reason == "error":
                        raise engine_failure(pack_id, ev)  # 503 engine_error; an upstream's 429 / 502 / 503 / 504
                    break
                upstream_usage = getattr(ev, "usage", None) or upstream_usage
                traced = traced or ev.trace is not None
                n_out += 1
                if ev.logprob is not None:
                    logps.append(ev.logprob)
                if ev.trace is not None:
                    for p, m in zip(ev.trace.positions, ev.trace.mass):
                        if p < n:
                            mass[p] = mass.get(p, 0.0) + m
                if t_first is None:
                    t_first = time.perf_counter()
                if ev.text:
                    text.append(ev.text)
                yield {"event": "token", "pack_id": pack_id, "text": ev.text, "token_id": ev.token_id,
                       "logprob": ev.logprob}
                if ev.finished:
                    finish = "length" if ev.finish_reason == "length" else "stop"
        finally:
            await self.unpin(handle)  # forked by now (or failed): it may be released
        t_end = time.perf_counter()
        s = self.rag.settings  # citations ranked and the answer's support scored: ask/grounding.py
        if traced or not n_out:
            g = ground(layout, mass, params.question, "".join(text), max_citations=self.citations,
                       ranking=getattr(s, "citation_ranking", "evidence"), threshold=getattr(s, "abstain_threshold", 0.0))
        else:  # no attention trace (an upstream engine): cite by lexical overlap, ask/lexical_citations.py
            g = lexical_ground(layout, params.question, "".join(text), max_citations=self.citations,
                               threshold=getattr(s, "abstain_threshold", 0.0))
        if upstream_usage is not None:  # the upstream's own count of what its prefix cache held
            cached = min(upstream_usage["cached_tokens"], n + len(q_ids))
        citations = g.citations
        decode_s = t_end - (t_first or t_end)
        yield {
            "event": "end", "pack_id": pack_id, "text": "".join(text),
            "score": sum(logps) / len(logps) if logps else float("-inf"), "cache": source,
            "replica": self.replica_id, "finish_reason": finish,
            "citations": [c.model_dump() for c in citations],
            "support": g.support, "abstained": params.abstain and not g.supported,
            "usage": {"prompt_tokens": n + len(q_ids), "cached_tokens": cached, "completion_tokens": n_out},
            "timings": {
                "prefix_s": t_prefix - t0, "first_token_s": (t_first or t_end) - t0, "total_s": t_end - t0,
                "tokens_per_s": (n_out - 1) / decode_s if n_out > 1 and decode_s > 0 else 0.0,
            },
        }
