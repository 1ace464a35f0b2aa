"""Answering: pack prompt -> prefix KV (replica memory, else the KV store, else prefill) ->
question -> streamed answer with a model score and citations from the sparse attention trace.

    from dsa_rag.rag_service.ask.worker import PackWorker, answer, make_engine
    worker = PackWorker(rag, make_engine("dsa-tiny"))     # one per model replica (loads weights)
    out = answer(rag, worker, "What was the revenue?")    # {"answer", "citations", "usage", "timings", ...}
    async for ev in worker.stream(pack_id, "question", max_tokens=32):   # the per-pack stream
        ...  # {"event": "start"|"token"|"end", ...}

Per pack (`PackWorker.stream`), on `dsa_rag.model.engine.engine.Engine` through its `AsyncEngine` (one engine
thread; concurrent questions on a replica decode together, continuous batching):
  1. key = KVStore.key_for(engine fingerprint, tenant, pack prompt ids);
  2. the prefix handle comes from the replica's memory (LRU of `warm_packs` handles), else from
     the KV store (safetensors in the data dir, metadata in Redis: another replica or node
     prefilled it; `Engine.restore` checks the model fingerprint), else it is prefilled here,
     snapshotted and stored for everyone. Concurrent questions over one cold pack prefill it once;
  3. the question forks the handle (shared blocks, no copy) and decodes: greedy at temperature 0,
     seeded sampling otherwise; stops at <eos>, a stop string or max_tokens;
  4. score = mean model log-prob of the generated tokens (untempered; <eos> included);
     citations = prompt positions with the most attention mass (the engine's per-token trace:
     top positions the sparse attention read, averaged over heads and layers; summed over the
     answer's tokens), mapped through the pack layout to (document, name, page, char span, snippet).
`merge` picks the best pack answer by score, keeps every pack's citations (best pack's first)
and sums usage {prompt_tokens, cached_tokens, completion_tokens}.

Imports neither FastAPI nor Ray. Tests: `.venv/bin/python -m pytest -q tests/service`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import AsyncIterator

from dsa_rag.rag_service.errors import EngineError, RagError
from dsa_rag.rag_service.packing.layout import PackLayout
from dsa_rag.rag_service.schemas import Citation

log = logging.getLogger(__name__)



MIN_TEMPERATURE = 1e-3  # below this sampling is greedy (found by the API fuzz: 2e-66 gave NaN probabilities)
TRACE_TOP = 32  # positions per generated token in the engine's attention trace
CITE_POSITIONS = 64  # most-attended prompt positions turned into citations


def make_engine(model: str = "dsa-tiny", device: str | None = None, tokenizer=None):
    """Load a model (preset or checkpoint dir) into a `dsa_rag.model.engine.engine.Engine`."""
    import torch

    from dsa_rag.model.engine.engine import Engine
    from dsa_rag.model.load import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 on GPUs (what real checkpoints need to fit); fp32 on CPU, where dsa-tiny is small.
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return Engine(load_model(model, device=device, dtype=dtype), tokenizer)


# ------------------------------------------------------------------ per-pack answers
@dataclass
class PackResult:
    pack_id: str
    text: str = ""
    score: float = float("-inf")
    cache: str = "prefill"
    replica: str = ""
    node: str = ""
    finish_reason: str = "stop"
    citations: list[Citation] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_end_event(cls, ev: dict) -> "PackResult":
        return cls(
            pack_id=ev["pack_id"], text=ev["text"], score=ev["score"], cache=ev["cache"],
            replica=ev.get("replica", ""), node=ev.get("node", ""), finish_reason=ev["finish_reason"],
            citations=[Citation(**c) for c in ev["citations"]], prompt_tokens=ev["usage"]["prompt_tokens"],
            cached_tokens=ev["usage"]["cached_tokens"], completion_tokens=ev["usage"]["completion_tokens"],
            timings=ev.get("timings", {}),
        )


class PackWorker:
    """The model side of one replica: engine, warm prefix handles (memory LRU), the KV store.
    Async: call it from one event loop (a Ray replica's, or the app's)."""

    def __init__(self, rag, engine, *, replica_id: str = "local", warm_packs: int = 8, citations: int = 5,
                 max_new_tokens: int = 512):
        from dsa_rag.model.engine.engine import AsyncEngine

        self.rag = rag
        self.engine = engine
        self.aengine = AsyncEngine(engine)
        self.replica_id = replica_id
        self.warm_limit = warm_packs
        self.citations = citations
        self.max_new_tokens = max_new_tokens
        self._warm: OrderedDict[str, object] = OrderedDict()  # cache key -> PrefixHandle
        self._prompts: OrderedDict[str, tuple] = OrderedDict()  # pack id -> (ids, layout, key, (tokens, version))
        self._loading: dict[str, asyncio.Future] = {}  # cache key -> in-flight prefill / restore
        # A handle handed to a question is pinned until the question has forked it: evicting it
        # from the warm LRU meanwhile only retires it, and the last unpin releases it (else a
        # concurrent eviction could free the blocks between lookup and fork).
        self._pins: dict[int, int] = {}  # id(handle) -> pins
        self._retired: dict[int, object] = {}  # id(handle) -> evicted while pinned
        self.counters = {"memory": 0, "store": 0, "prefill": 0, "requests": 0}

    @property
    def fingerprint(self) -> str:
        return self.engine.fingerprint

    def close(self) -> None:
        self.aengine.close()

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
            await self.aengine.call(self.engine.release, old)

    async def _evict(self) -> None:
        while len(self._warm) > self.warm_limit:
            _, old = self._warm.popitem(last=False)
            if id(old) in self._pins:
                self._retired[id(old)] = old
            else:
                await self.aengine.call(self.engine.release, old)  # running forks keep their blocks

    async def prefix(self, pack_id: str):
        """-> (PrefixHandle, ids, layout, source, cached tokens) with source memory | store |
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
            if handle.seq.freed:  # evicted and released while we waited: look again
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
        else:
            self._retired[id(handle)] = handle  # not kept warm: released when its question forked it
        return handle, ids, layout, source, cached

    async def _load(self, pack_id: str, ids: list[int], key: str):
        entry = await asyncio.to_thread(self.rag.kv.get, key)
        if entry is not None:
            try:
                return await self.aengine.call(self.engine.restore, entry.tensors, entry.metadata), "store", len(ids)
            except ValueError as e:  # another model / a broken file: drop it and prefill
                log.warning("KV entry for pack %s not restorable (%s); prefilling", pack_id, e)
                await asyncio.to_thread(self.rag.kv.remove, key, "stale")
        # An open pack that grew: its previous prompt is a prefix of this one, extend it.
        base = max((h for h in self._warm.values() if len(h.tokens) < len(ids) and ids[:len(h.tokens)] == h.tokens),
                   key=lambda h: len(h.tokens), default=None)
        rest, reused = (ids[len(base.tokens):], len(base.tokens)) if base is not None else (ids, 0)
        if base is not None:
            self._pin(base)  # it must outlive the prefill that extends it
        try:
            if hasattr(self.aengine, "prefill_prefix"):  # chunks interleave with other streams' decoding
                handle = await self.aengine.prefill_prefix(rest, base)
            else:
                handle = await self.aengine.call(self.engine.prefill_prefix, rest, base)
        finally:
            if base is not None:
                await self.unpin(base)
        snap = await self.aengine.call(self.engine.snapshot, handle)
        try:
            await asyncio.to_thread(self.rag.kv.put, key, snap.tensors, snap.metadata, pack_id=pack_id,
                                    model=self.fingerprint, tokens=len(ids))
        except Exception:  # the answer does not depend on the store; the next replica re-prefills
            log.exception("storing the prefix cache of pack %s failed", pack_id)
        return handle, "prefill", reused

    async def warm(self, pack_id: str) -> str:
        """Make the pack's prefix warm in this replica (background prefill). -> cache source."""
        handle, _, _, source, _ = await self.prefix(pack_id)
        await self.unpin(handle)
        return source

    def warm_pack_ids(self) -> list[str]:
        keys = set(self._warm)
        return [p for p, (_, _, k, _) in self._prompts.items() if k in keys]

    def stats(self) -> dict:
        return {"replica": self.replica_id, "warm_packs": len(self._warm), **self.counters}

    # --- one pack, streamed ---------------------------------------------------------------------
    async def stream(self, pack_id: str, question: str, max_tokens: int = 64, temperature: float = 0.0,
                     seed: int | None = None, stop: list[str] | None = None, top_p: float = 1.0
                     ) -> AsyncIterator[dict]:
        """Events: start {pack_id, cache, prompt_tokens, cached_tokens, replica}; token {text,
        token_id, logprob} per generated token; end {text, score, citations, usage, timings}."""
        from dsa_rag.model.engine.engine import SamplingParams

        t0 = time.perf_counter()
        self.counters["requests"] += 1
        temperature = float(temperature)
        if temperature < MIN_TEMPERATURE:  # logits / 1e-66 overflow to inf: such a temperature is greedy
            temperature = 0.0
        params = SamplingParams(max_tokens=max(1, min(int(max_tokens), self.max_new_tokens)),
                                temperature=temperature, top_p=float(top_p), seed=seed,
                                stop=tuple(stop or ()), trace=True, trace_top=TRACE_TOP)
        handle, ids, layout, source, cached = await self.prefix(pack_id)
        try:
            n = len(ids)
            t_prefix = time.perf_counter()
            q_ids = self.rag.tok.question_ids(question)
            yield {"event": "start", "pack_id": pack_id, "cache": source, "prompt_tokens": n + len(q_ids),
                   "cached_tokens": cached, "replica": self.replica_id}
            mass: dict[int, float] = {}
            logps, text, finish, n_out, t_first = [], [], "length", 0, None
            async for ev in self.aengine.generate(q_ids, params, prefix=handle):
                if ev.token_id < 0:  # the engine ended the request without a token: abort or error
                    if ev.finish_reason == "error":
                        raise EngineError(f"pack {pack_id}: the engine failed this request: "
                                          f"{getattr(ev, 'error', None) or 'unknown error'}")
                    break
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
        top = sorted(mass, key=mass.get, reverse=True)[:CITE_POSITIONS]
        citations = layout.cite(top, max_citations=self.citations) if self.citations and top else []
        decode_s = t_end - (t_first or t_end)
        yield {
            "event": "end", "pack_id": pack_id, "text": "".join(text),
            "score": sum(logps) / len(logps) if logps else float("-inf"), "cache": source,
            "replica": self.replica_id, "finish_reason": finish,
            "citations": [c.model_dump() for c in citations],
            "usage": {"prompt_tokens": n + len(q_ids), "cached_tokens": cached, "completion_tokens": n_out},
            "timings": {
                "prefix_s": t_prefix - t0, "first_token_s": (t_first or t_end) - t0, "total_s": t_end - t0,
                "tokens_per_s": (n_out - 1) / decode_s if n_out > 1 and decode_s > 0 else 0.0,
            },
        }


# ------------------------------------------------------------------ merging
def merge(results: list[PackResult]) -> dict:
    """Best answer by score; every pack's citations kept (best pack's first, duplicates dropped);
    usage summed over packs."""
    if not results:
        return {"answer": "", "pack_id": None, "score": None, "finish_reason": "stop", "citations": [],
                "packs": [], "usage": {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0}}
    best = max(results, key=lambda r: r.score)
    ordered = [best] + [r for r in results if r is not best]
    seen, cites = set(), []
    for r in ordered:
        for c in r.citations:
            k = (c.document_id, c.char_start, c.char_end)
            if k not in seen:
                seen.add(k)
                cites.append(c)
    return {
        "answer": best.text, "pack_id": best.pack_id, "score": best.score if best.score > float("-inf") else None,
        "finish_reason": best.finish_reason, "citations": cites,
        "packs": [{"pack_id": r.pack_id, "answer": r.text, "score": r.score if r.score > float("-inf") else -1e9,
                   "cache": r.cache, "replica": r.replica, "node": r.node, "finish_reason": r.finish_reason,
                   "citations": r.citations} for r in results],
        "usage": {
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "cached_tokens": sum(r.cached_tokens for r in results),
            "completion_tokens": sum(r.completion_tokens for r in results),
        },
    }


async def answer_async(rag, worker: PackWorker, question: str, document_ids: list[str] | None = None, *,
                       max_tokens: int = 64, temperature: float = 0.0, tenant: str = "default",
                       seed: int | None = None) -> dict:
    """The whole question path in one process (no Ray, no HTTP): select packs, answer them
    concurrently (one decode batch), merge."""
    t0 = time.perf_counter()
    selections = await asyncio.to_thread(rag.select_packs, question, document_ids, tenant)
    t_sel = time.perf_counter()
    first: list[float] = []

    async def one(pack_id: str) -> PackResult:
        async for ev in worker.stream(pack_id, question, max_tokens, temperature, seed):
            if ev["event"] == "token" and not first:
                first.append(time.perf_counter())
            if ev["event"] == "end":
                return PackResult.from_end_event(ev)
        raise RuntimeError(f"pack {pack_id}: answer stream ended without a result")

    results = await asyncio.gather(*(one(s.pack_id) for s in selections))
    out = merge(list(results))
    t_end = time.perf_counter()
    out["timings"] = {"select_s": t_sel - t0, "first_token_s": (first[0] if first else t_end) - t0,
                      "total_s": t_end - t0}
    return out


def answer(rag, worker: PackWorker, question: str, document_ids: list[str] | None = None, **kw) -> dict:
    """Sync form of `answer_async` (notebooks, scripts); not from inside a running event loop."""
    return asyncio.run(answer_async(rag, worker, question, document_ids, **kw))
