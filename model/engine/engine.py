"""The inference engine: paged caches, chunked prefill, batched sparse decode, continuous batching,
sampling and streaming, prefix snapshots (safetensors-ready) and attention traces for citations.

    from dsa_rag.model.engine.engine import Engine, SamplingParams
    eng = Engine(load_model("dsa-tiny"))
    pack = eng.prefill_prefix(tok.prompt_ids(docs))              # once per pack (chunked prefill)
    snap = eng.snapshot(pack)                                    # tensors + str metadata -> safetensors
    pack2 = eng.restore(snap)                                    # on another replica / later
    for ev in eng.generate(tok.question_ids(q), SamplingParams(max_tokens=64, trace=True), prefix=pack2):
        print(ev.text, end="")                                   # ev.token_id, ev.logprob, ev.trace
    eng.run_batch([(ids_a, p), (ids_b, p, pack)])                # many requests, one decode batch per step

How a step works (`Engine.step`): every running request whose prompt is not in the cache yet gets
a prefill chunk (a shared budget of `prefill_chunk` tokens per step, oldest first; memory
O(chunk * k) per layer: the model's indexer streams over keys and attends to top-k rows only).
The last prompt token is not prefilled: it is fed by the decode batch, so every generated token,
the first included, comes out of the same [B, 1] decode call (rows at different positions) with
the same numerics and the same trace. Then every request with its prompt cached decodes one token
together: indexer -> top-k -> sparse MQA over the paged latent cache (model/engine/paged.py).

Prefixes: `prefill_prefix(ids)` (or `add_prefix` + `take_prefix`, prefilled by step() between
other requests' decode tokens) / `restore(snapshot)` give a PrefixHandle whose blocks are
read-only; `add_request(question, params, prefix=handle)` forks it (refcounts, no copy; the
partially filled last block is copied on the first write), so many questions share one 128k pack.

Drivers: call `step()` yourself and read its events, or use `generate` / `run_batch` /
`complete` / `AsyncEngine.generate`, which collect the events of their own requests (a request
added with plain `add_request` while a generator steps the engine gets its tokens, but its events
are only in the return values of those steps). A request that fails (e.g. MemoryError: the block
pool reached max_blocks) ends with an event of finish_reason "error"; the others go on.

Known costs: the indexer reads every index key of a sequence each step; they are a view of the
pool when the sequence's blocks are consecutive (a prefix and its first fork) and a gather
(index_keys bytes per layer per step) otherwise, e.g. the 2nd..nth question on one pack. The
pool grows by doubling (a copy) and never shrinks; size it with n_blocks / max_blocks.

What is not about paged caches (request bookkeeping, stop strings and finish reasons, outboxes,
the generate / prefill_prefix drivers, TokenEvent, Trace) is shared with the V4 engine
(model/v4/engine.py) in model/engine/requests.py.

Speed work stays here, the model stays plain PyTorch: inference_mode, no per-step context copies
(the sparse kernel gathers rows through the block table), index keys read as a view when a
sequence's blocks are consecutive. torch.compile of the decode step is not used: the model's
per-row Python loop and data-dependent top-k give graph breaks, not speed, on this CPU.

    .venv/bin/python -m pytest tests/model/engine/test_engine*.py -q
    .venv/bin/python benchmarks/engine_bench.py --quick
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from dsa_rag.kernels.indexer import cpu_dots
from dsa_rag.model.engine.paged import BLOCK_SIZE, BlockPool, PagedSequence
from dsa_rag.model.engine.requests import (EngineBase, Request, TokenEvent, Trace, aggregate_trace, check_token_ids,
                                           token_ids)
from dsa_rag.model.engine.sampling import SamplingParams, sample

__all__ = ["Engine", "AsyncEngine", "SamplingParams", "TokenEvent", "Completion", "Trace", "PrefixHandle",
           "Snapshot", "cache_dtypes", "model_fingerprint", "weights_digest", "open_snapshot", "snapshot_metadata",
           "SNAPSHOT_FORMAT"]

SNAPSHOT_FORMAT = "dsa-engine-snapshot/1"


# ---------------------------------------------------------------- results (Trace, TokenEvent: requests.py)
@dataclass
class Completion:
    request_id: int
    token_ids: list[int]  # generated tokens (a final EOS / stop token included)
    text: str  # their text, stop string trimmed
    logprobs: list[float | None]
    traces: list[Trace | None]
    finish_reason: str | None
    prompt_tokens: int  # prefix + prompt
    cached_tokens: int  # of which came from a prefix handle (not recomputed)
    error: str | None = None


@dataclass(eq=False)
class PrefixHandle:
    """A cached, read-only token prefix (all layers). Fork it with add_request(prefix=...);
    release it when no new question needs it (children keep their shared blocks alive)."""

    seq: PagedSequence
    tokens: list[int]

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class Snapshot:
    """Prefix caches as flat tensors (`tokens`, `layer.{i}.kv`, `layer.{i}.index_k`,
    `layer.{i}.index_scale` in FP8 mode) plus str->str metadata: what safetensors writes."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file(self.tensors, str(path), metadata=self.metadata)

    @classmethod
    def load(cls, path: str | Path) -> "Snapshot":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return cls({k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {}))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def cache_dtypes(model) -> tuple[torch.dtype, torch.dtype]:
    """(latent kv dtype, indexer key dtype) of the caches `model` writes: its activation dtype (the
    embedding's), and float8_e4m3fn for the index keys under fp8_numerics."""
    act = model.embed.weight.dtype
    return act, (torch.float8_e4m3fn if model.cfg.fp8_numerics else act)


def model_fingerprint(model) -> str:
    """Changes whenever cache bytes could: config (shapes, numerics, attention mode), the cache
    dtypes and fp8_numerics (explicitly: a cache prefilled in bf16 never restores into an fp32
    engine), parameter names / shapes / dtypes and a strided sample of every tensor's values
    (cheap, even at 671B)."""
    h = hashlib.sha256(json.dumps(model.cfg.fingerprint_fields(), sort_keys=True, default=str).encode())
    kv_dtype, ik_dtype = cache_dtypes(model)
    h.update(f"cache:kv={kv_dtype}:index_k={ik_dtype}:fp8_numerics={bool(model.cfg.fp8_numerics)}".encode())
    weights_digest(h, model)
    return h.hexdigest()[:32]


def weights_digest(h, model) -> None:
    """Feed `h` (a hashlib object) every parameter's and buffer's name, shape and dtype and 64
    strided values (as fp32): what the engines' fingerprints (V3.2 / GLM-5, V4) hash of the weights."""
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            if p.device.type != "meta" and p.numel():
                flat = p.reshape(-1)
                h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())


def snapshot_metadata(engine, fmt: str, n_tokens: int, **extra: str) -> dict[str, str]:
    """A snapshot's str metadata: its format, the engine's fingerprint and model name, the token
    and layer counts, then `extra` (e.g. the cache dtypes)."""
    return {"format": fmt, "fingerprint": engine.fingerprint, "model": engine.cfg.name,
            "tokens": str(n_tokens), "layers": str(engine.cfg.num_hidden_layers), **extra}


def open_snapshot(engine, snapshot: Snapshot | dict, metadata: dict | None, fmt: str,
                  dtypes: tuple[tuple[str, torch.dtype], ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of `snapshot` (a Snapshot, or a tensor dict with `metadata` beside it), once
    its metadata (when there is any) says format `fmt`, the cache dtypes `dtypes` ((metadata key,
    this engine's dtype) pairs; a key it lacks is not checked) and this engine's fingerprint.
    Raises ValueError naming what differs."""
    tensors = snapshot.tensors if isinstance(snapshot, Snapshot) else snapshot
    metadata = snapshot.metadata if isinstance(snapshot, Snapshot) else metadata
    if metadata:
        if metadata.get("format") != fmt:
            raise ValueError(f"snapshot format {metadata.get('format')!r}, expected {fmt!r}")
        for key, mine in dtypes:
            if key in metadata and metadata[key] != str(mine):
                raise ValueError(f"snapshot cache dtype {metadata[key]} ({key}) differs from this engine's {mine}: "
                                 f"a cache prefilled in one dtype is never restored into another; "
                                 f"prefill the prefix again")
        if metadata.get("fingerprint") != engine.fingerprint:
            raise ValueError(f"snapshot was made by model {metadata.get('model')!r} with fingerprint "
                             f"{metadata.get('fingerprint')}; this engine runs {engine.cfg.name!r} with "
                             f"{engine.fingerprint}: prefill the prefix again")
    return tensors


# ---------------------------------------------------------------- requests
class _Request(Request):
    def __init__(self, rid, tokens, params, seq, cached, tokenizer, eos, prefix_only=False):
        super().__init__(rid, tokens, params, cached, tokenizer, eos, prefix_only)
        self.seq = seq

    @property
    def target(self) -> int:
        """Tokens to have in the cache before sampling: all but the last (fed by the decode batch)."""
        return len(self.tokens) if self.prefix_only else len(self.tokens) - 1


class Engine(EngineBase):
    """Continuous-batching generation over paged DSA caches (see the module docstring).

    model: a dsa_rag.model.model.Transformer (plain PyTorch, eval mode). tokenizer: default ByteTokenizer.
    block_size: tokens per cache block. prefill_chunk: prefill tokens per step (all requests).
    max_batch: decode rows per step. n_blocks / max_blocks: initial / largest pool size."""

    running: dict[int, _Request]
    _prefixes: dict[int, PrefixHandle | BaseException]  # finished add_prefix requests, until taken

    def __init__(self, model, tokenizer=None, *, block_size: int = BLOCK_SIZE, prefill_chunk: int = 2048,
                 max_batch: int = 32, n_blocks: int = 64, max_blocks: int | None = None):
        super().__init__(model, tokenizer, prefill_chunk, max_batch)
        c = self.cfg
        p = model.embed.weight
        self.pool = BlockPool(c.num_hidden_layers, c.kv_lora_rank + c.qk_rope_head_dim, c.index_head_dim,
                              block_size, n_blocks, max_blocks, p.device, index_layers=c.full_index_layers)
        self.dtype, ik_dtype = cache_dtypes(model)  # the serving dtype: the model's activations and its caches
        self.pool.ensure_storage(self.dtype, ik_dtype, c.fp8_numerics)
        self.device = p.device
        if self.device.type == "cpu" and self.dtype == torch.float32:
            cpu_dots.warm_in_background()  # the decode indexer's AVX2 product, built before it is needed

    def _compute_fingerprint(self) -> str:
        return model_fingerprint(self.model)

    # --- requests --------------------------------------------------------------------------
    def add_request(self, prompt_ids, params: SamplingParams | None = None, prefix: PrefixHandle | None = None,
                    request_id: int | None = None) -> int:
        """Queue a request; returns its id. The prompt continues `prefix` when given (its cache
        is shared, not copied). Tokens come out of `step()`."""
        params = params or SamplingParams()
        ids = token_ids(prompt_ids)
        check_token_ids(ids, self.cfg.vocab_size, "prompt token ids")
        if prefix is not None and prefix.seq.freed:
            raise ValueError("the prefix handle was released; restore or prefill it again")
        tokens = (list(prefix.tokens) if prefix is not None else []) + ids
        if not tokens:
            raise ValueError("empty prompt: give at least one token (e.g. the tokenizer's bos_id)")
        if len(tokens) > self.cfg.max_position_embeddings:
            raise ValueError(f"prompt of {len(tokens)} tokens exceeds the model's context of "
                             f"{self.cfg.max_position_embeddings}")
        if prefix is not None:  # keep >= 1 token to feed: an empty question recomputes the prefix's last one
            cached = min(prefix.length, len(tokens) - 1)
            seq = prefix.seq.fork(cached)
        else:
            cached, seq = 0, PagedSequence(self.pool)
        rid = self.new_request_id() if request_id is None else request_id
        if rid in self.running:
            raise ValueError(f"request id {rid} is already running")
        self.running[rid] = _Request(rid, tokens, params, seq, cached, self.tokenizer, self.eos_id)
        return rid

    def _free(self, r: _Request) -> None:
        r.seq.free()

    # --- one scheduling step ---------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Prefill chunks within the budget, then one decode token for every request whose
        prompt is cached, all rows in one model call. Returns this step's token events."""
        budget = self.prefill_chunk
        events: list[TokenEvent] = []
        for r in list(self.running.values()):
            if budget <= 0:
                break
            todo = r.target - r.seq.length
            if todo > 0:
                n = min(todo, budget)
                try:
                    self._forward_chunk(r.seq, r.tokens, r.seq.length, n)
                except (MemoryError, RuntimeError, ValueError) as e:  # this request fails, the others go on
                    events.append(self._fail(r, e))
                    continue
                budget -= n
            if r.prefix_only and r.seq.length == r.target:
                self._prefixes[r.rid] = PrefixHandle(r.seq, r.tokens)
                del self.running[r.rid]
        ready = [r for r in self.running.values() if not r.prefix_only and r.seq.length == r.target][: self.max_batch]
        if ready:
            try:
                events += self._decode(ready)
            except (MemoryError, RuntimeError, ValueError) as e:
                events += [self._fail(r, e) for r in ready if r.rid in self.running]
        return self._post(events)

    def _forward_chunk(self, seq, tokens, start, n, last_only=True):
        ids = torch.tensor([tokens[start: start + n]], device=self.device)
        return self.model(ids, start, [seq.layers], last_only=last_only)

    def _decode(self, ready: list[_Request]) -> list[TokenEvent]:
        ids = torch.tensor([[r.tokens[-1]] for r in ready], device=self.device)
        pos = [r.seq.length for r in ready]
        want = [r.params.trace for r in ready]
        rec: dict[int, list] = {}
        trace = None
        if any(want):
            def trace(layer, row, idx, mass):
                if want[row]:
                    rec.setdefault(row, []).append((layer, idx[-1], mass[-1]))
        logits = self.model(ids, pos, [r.seq.layers for r in ready], trace=trace)[:, -1]
        events = []
        for b, r in enumerate(ready):
            tok, lp = sample(logits[b], r.params, r.generator)
            tr = aggregate_trace(rec[b], self.cfg.num_attention_heads, r.params) if b in rec else None
            events.append(self._emit(r, tok, lp, tr))
        return events

    # --- convenience drivers ---------------------------------------------------------------
    def run_batch(self, requests: Iterable[tuple]) -> list[Completion]:
        """[(prompt_ids, params[, prefix]), ...] -> completions, all decoded together."""
        info = {}
        try:
            for req in requests:
                rid = self.new_request_id()
                self._outbox[rid] = deque()
                self.add_request(*req, request_id=rid)
                info[rid] = (self.running[rid].n_prompt, self.running[rid].cached)
            while any(r in self.running for r in info):
                self.step()
            return [self._collect(rid, *info[rid]) for rid in info]
        finally:
            for rid in info:
                self._outbox.pop(rid, None)
                self.abort(rid)

    def complete(self, prompt_ids, params: SamplingParams | None = None, prefix: PrefixHandle | None = None) -> Completion:
        return self.run_batch([(prompt_ids, params, prefix)])[0]

    def _collect(self, rid: int, n_prompt: int, cached: int) -> Completion:
        evs = [e for e in self._outbox[rid] if e.token_id >= 0]
        last = self._outbox[rid][-1] if self._outbox[rid] else None
        return Completion(rid, [e.token_id for e in evs], "".join(e.text for e in evs), [e.logprob for e in evs],
                          [e.trace for e in evs], last.finish_reason if last else None, n_prompt, cached,
                          last.error if last else None)

    # --- prefixes, snapshots ---------------------------------------------------------------
    def add_prefix(self, ids, prefix: PrefixHandle | None = None, request_id: int | None = None) -> int:
        """Queue the prefill of a prefix (continuing `prefix` if given) through step(), in chunks
        interleaved with other requests' decoding; take it with `take_prefix(rid)` when ready."""
        ids = token_ids(ids)
        tokens = (list(prefix.tokens) if prefix is not None else []) + ids
        if not tokens or len(tokens) > self.cfg.max_position_embeddings:
            raise ValueError(f"prefix of {len(tokens)} tokens: expected 1 .. {self.cfg.max_position_embeddings}")
        check_token_ids(ids, self.cfg.vocab_size, "prefix token ids")
        if prefix is not None and prefix.seq.freed:
            raise ValueError("the prefix handle was released; restore or prefill it again")
        seq = prefix.seq.fork() if prefix is not None else PagedSequence(self.pool)
        rid = self.new_request_id() if request_id is None else request_id
        self.running[rid] = _Request(rid, tokens, SamplingParams(), seq, seq.length, self.tokenizer, self.eos_id,
                                     prefix_only=True)
        return rid

    def prefix_progress(self, rid: int) -> tuple[int, int] | None:
        """(tokens cached, tokens in total) of a queued add_prefix request; None once it is done.
        Plain int reads, so another thread (the async wrapper's loop) may poll it between steps."""
        r = self.running.get(rid)
        return None if r is None else (r.seq.length, len(r.tokens))

    def release(self, handle: PrefixHandle) -> None:
        handle.seq.free()

    def snapshot(self, source: PrefixHandle | int, upto: int | None = None) -> Snapshot:
        """The caches of a prefix handle (or a running request id) for positions 0 .. upto-1."""
        if isinstance(source, PrefixHandle):
            seq, tokens = source.seq, source.tokens
        elif source in self.running:
            seq, tokens = self.running[source].seq, self.running[source].tokens
        else:
            raise ValueError(f"snapshot: {source!r} is neither a PrefixHandle nor a running request id")
        n = seq.length if upto is None else int(upto)
        if seq.freed or not 0 < n <= seq.length:
            raise ValueError(f"snapshot upto={n}: the sequence holds {seq.length} cached tokens")
        t = {"tokens": torch.tensor(tokens[:n], dtype=torch.int64)}
        for i in range(self.cfg.num_hidden_layers):
            kv, ik, isc = seq.read(i, n)
            t[f"layer.{i}.kv"] = kv.cpu()
            if ik is not None:  # shared-index layers keep no indexer keys
                t[f"layer.{i}.index_k"] = ik.cpu()
            if isc is not None:
                t[f"layer.{i}.index_scale"] = isc.cpu()
        meta = snapshot_metadata(self, SNAPSHOT_FORMAT, n, kv_dtype=str(self.pool.kv_dtype),
                                 index_dtype=str(self.pool.ik_dtype), fp8_numerics=str(bool(self.cfg.fp8_numerics)))
        return Snapshot(t, meta)

    def restore(self, snapshot: Snapshot | dict, metadata: dict | None = None) -> PrefixHandle:
        """A PrefixHandle from snapshot tensors (+ metadata: checked against this model's
        fingerprint). Raises ValueError naming the tensor when one is missing, misshapen or of
        another dtype than this engine's caches (a bf16 cache never restores into an fp32 engine,
        nor the reverse: no silent cast), and naming both dtypes when the metadata says so."""
        tensors = open_snapshot(self, snapshot, metadata, SNAPSHOT_FORMAT,
                                (("kv_dtype", self.pool.kv_dtype), ("index_dtype", self.pool.ik_dtype)))
        if "tokens" not in tensors:
            raise ValueError("snapshot lacks tensor 'tokens' (int64 [n])")
        tokens = [int(x) for x in tensors["tokens"].tolist()]
        n, c = len(tokens), self.cfg
        if not 0 < n <= c.max_position_embeddings:
            raise ValueError(f"snapshot holds {n} tokens: expected 1 .. {c.max_position_embeddings}")
        want = {"kv": (n, c.kv_lora_rank + c.qk_rope_head_dim), "index_k": (n, c.index_head_dim)}
        dtypes = {"kv": self.pool.kv_dtype, "index_k": self.pool.ik_dtype, "index_scale": torch.float32}
        if c.fp8_numerics:
            want["index_scale"] = (n,)
        seq = PagedSequence(self.pool)
        try:
            for i, layer in enumerate(seq.layers):
                got = {}
                # Shared-index layers (ModelConfig.indexer_types) hold latent kv only.
                layer_want = want if i in self.pool.index_layers else {"kv": want["kv"]}
                for k, shape in layer_want.items():
                    name = f"layer.{i}.{k}"
                    if name not in tensors:
                        raise ValueError(f"snapshot lacks tensor {name!r} (expected shape {list(shape)})")
                    if tuple(tensors[name].shape) != shape:
                        raise ValueError(f"snapshot tensor {name!r} has shape {list(tensors[name].shape)}, "
                                         f"expected {list(shape)}")
                    if tensors[name].dtype != dtypes[k]:
                        raise ValueError(f"snapshot tensor {name!r} is {tensors[name].dtype}, this engine caches "
                                         f"{dtypes[k]}: a cache prefilled in one dtype is never restored into "
                                         f"another; prefill the prefix again")
                    got[k] = tensors[name].to(self.device)
                layer.write(0, got["kv"], got.get("index_k"), got.get("index_scale"))
        except Exception:
            seq.free()
            raise
        return PrefixHandle(seq, tokens)

    # --- scoring ---------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompt_ids, continuation_ids, prefix: PrefixHandle | None = None) -> list[float]:
        """Log-probs of `continuation_ids` after prefix + prompt (teacher forcing), one per token."""
        cont = [int(t) for t in continuation_ids]
        tokens = (list(prefix.tokens) if prefix is not None else []) + [int(t) for t in prompt_ids] + cont
        if not cont or len(tokens) - len(cont) < 1:
            raise ValueError("score needs a non-empty continuation after at least one context token")
        start = len(tokens) - len(cont) - 1  # the position whose logits predict cont[0]
        seq = prefix.seq.fork(min(prefix.length, start)) if prefix is not None else PagedSequence(self.pool)
        try:
            for s in range(seq.length, start, self.prefill_chunk):
                self._forward_chunk(seq, tokens, s, min(self.prefill_chunk, start - s))
            out = []
            for s in range(start, len(tokens) - 1, self.prefill_chunk):
                n = min(self.prefill_chunk, len(tokens) - 1 - s)
                lp = torch.log_softmax(self._forward_chunk(seq, tokens, s, n, last_only=False)[0].float(), -1)
                out += lp.gather(1, torch.tensor(tokens[s + 1: s + 1 + n], device=lp.device)[:, None])[:, 0].tolist()
            return out
        finally:
            seq.free()

    # --- accounting ------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"running": len(self.running), "blocks_used": self.pool.used_blocks(),
                "blocks_total": self.pool.alloc.n_blocks, "block_size": self.pool.block_size,
                "pool_bytes": self.pool.nbytes()}


# ---------------------------------------------------------------- asyncio wrapper
class AsyncEngine:
    """Async streaming for the service, and the `dsa_rag.model.engine.protocol.EngineProtocol`
    the service depends on: one worker thread owns the Engine (every call is serialized through
    it), a driver task steps while any stream is open.

        aeng = AsyncEngine(engine)
        pack = await aeng.prefill_prefix(ids)       # or: await aeng.restore(tensors, metadata)
        async for ev in aeng.generate(q_ids, SamplingParams(max_tokens=32), prefix=pack): ...
        snap = await aeng.snapshot(pack); await aeng.release(pack); aeng.close()

    Streams may come from several event loops in turn (e.g. one `asyncio.run` per question):
    events are handed to each stream's own loop, and a loop without a live driver starts one.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="dsa-engine")
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._driver: asyncio.Task | None = None

    @property
    def fingerprint(self) -> str:
        return self.engine.fingerprint

    async def call(self, fn, *args):
        """Run any Engine method on the engine's thread (prefill_prefix, snapshot, restore, score...)."""
        return await asyncio.get_running_loop().run_in_executor(self._exec, lambda: fn(*args))

    async def restore(self, tensors, metadata=None) -> PrefixHandle:
        """`Engine.restore` on the engine's thread (ValueError: another model's cache, a broken one)."""
        return await self.call(self.engine.restore, tensors, metadata)

    async def snapshot(self, handle: PrefixHandle) -> Snapshot:
        return await self.call(self.engine.snapshot, handle)

    async def release(self, handle: PrefixHandle) -> None:
        await self.call(self.engine.release, handle)

    def _ensure_driver(self, loop: asyncio.AbstractEventLoop) -> None:
        d = self._driver
        if d is None or d.done() or d.get_loop() is not loop:
            self._driver = loop.create_task(self._drive())

    async def generate(self, prompt_ids, params: SamplingParams | None = None, prefix: PrefixHandle | None = None):
        rid = self.engine.new_request_id()
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = (loop, q)  # before the request exists, so no event can be missed
        try:
            await self.call(self.engine.add_request, prompt_ids, params, prefix, rid)
            self._ensure_driver(loop)
            while True:
                ev = await q.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if ev.finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if rid in self.engine.running:
                await self.call(self.engine.abort, rid)

    async def prefill_prefix(self, ids, prefix: PrefixHandle | None = None, progress=None) -> PrefixHandle:
        """Prefill a pack without stalling open streams: chunks interleave with their decoding.
        `progress(done, total)` (optional) is called on this loop each time a chunk lands."""
        rid = await self.call(self.engine.add_prefix, ids, prefix)
        seen = None
        while (h := await self.call(self.engine.take_prefix, rid)) is None:
            if progress is not None and (now := self.engine.prefix_progress(rid)) not in (None, seen):
                seen = now
                progress(*now)
            d = self._driver
            if d is None or d.done() or d.get_loop().is_closed():  # nobody steps: step here
                for ev in await self.call(self.engine.step):
                    self._deliver(ev.request_id, ev)
            else:
                await asyncio.sleep(0.005)
        return h

    def _deliver(self, rid: int, item) -> None:
        entry = self._queues.get(rid)
        if entry is None:
            return
        loop, q = entry
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is running:
            q.put_nowait(item)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(q.put_nowait, item)

    async def _drive(self):
        while self._queues and self.engine.has_unfinished():
            try:
                events = await self.call(self.engine.step)
            except Exception as e:  # hand the failure to every open stream
                for rid in list(self._queues):
                    self._deliver(rid, e)
                return
            for ev in events:
                self._deliver(ev.request_id, ev)

    def close(self):
        self._exec.shutdown(wait=True)
