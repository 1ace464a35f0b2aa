"""The DeepSeek-V4 engine: what `load_engine` runs for a `deepseek_v4` checkpoint, with the same
sync surface as `dsa_rag.model.engine.engine.Engine`, so `AsyncEngine` wraps it unchanged and the
service sees the same EngineProtocol.

Caches: per sequence a `PagedV4Cache` (model/v4/paged.py): the compressed pools and indexer keys
in refcounted blocks of one `V4BlockPool` per engine, the sliding window and the compressors'
rolling state per sequence. A prefix handle owns one such cache plus the logits of its last token;
a question forks it (`cache.fork()`: the pack's blocks shared, its partially filled last block
copied on the first write, window and rolling state copied: ~19 MB on V4-Flash by cache.py's
accounting, where a copy of a 128k-token pack's cache is ~0.9 GB) and feeds only its own tokens.
`release(handle)` gives the handle's blocks back; running forks keep theirs.

A step prefills chunks (budget `prefill_chunk` tokens, oldest request first), then samples one
token for every request whose prompt is cached and feeds all of them in one forward
(`Transformer.hidden` over a list of one-row caches: projections, hyper-connections and MoE
batched, window / compressor / indexer / sparse attention per sequence). `batched=False` feeds
them one forward each: the reference the tests hold the batched step to.

Snapshots are the cache's tensors by name (`layer.{i}.window`, `layer.{i}.compressor.entries`,
...; the pools read out of the blocks), plus `tokens` and `last_logits`; restore checks the
format, the model fingerprint, every tensor's dtype, and that each pool holds the entries its
token count makes, then writes the pools into fresh blocks. Paging did not change these tensors,
so the format is still dsa-v4-snapshot/1 (a snapshot does not depend on the block size).

Request bookkeeping, stop / finish handling, outboxes and the drivers are the V3.2 engine's
(model/engine/requests.py); the fingerprint hashes the weights as it does (`weights_digest`).

Traces: per generated token, the token positions the attention read (window tokens, and the
windows of the compressed entries it attended, an entry's mass spread over its tokens), mass
averaged over heads and layers, as the citations expect.

    .venv/bin/python -m pytest -q tests/model/test_deepseek_v4_engine.py tests/model/test_deepseek_v4_paged.py -p no:cacheprovider
    .venv/bin/python benchmarks/v4_engine_bench.py     # fork cost copy vs paged, decode sequential vs batched
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from dsa_rag.model.engine.engine import Snapshot, open_snapshot, snapshot_metadata, weights_digest
from dsa_rag.model.engine.paged import BLOCK_SIZE
from dsa_rag.model.engine.requests import (EngineBase, Request, TokenEvent, Trace, aggregate_trace, check_token_ids,
                                           token_ids)
from dsa_rag.model.engine.sampling import SamplingParams, sample
from dsa_rag.model.v4.model import Transformer
from dsa_rag.model.v4.paged import PagedV4Cache, V4BlockPool

SNAPSHOT_FORMAT = "dsa-v4-snapshot/1"
_STATE_FIELDS = ("buffer_kv", "buffer_gate", "overlap_kv", "overlap_gate", "entries")


@dataclass(eq=False)
class V4PrefixHandle:
    """A cached, read-only prefix: its (paged) V4Cache and the logits after its last token."""

    cache: PagedV4Cache | None
    tokens: list[int]
    logits: torch.Tensor

    @property
    def length(self) -> int:
        return len(self.tokens)


class _Request(Request):
    def __init__(self, rid, tokens, params, cache, fed, logits, tokenizer, eos, prefix_only=False):
        super().__init__(rid, tokens, params, fed, tokenizer, eos, prefix_only)
        self.cache, self.fed, self.logits = cache, fed, logits  # tokens in the cache; their last logits
        self.pending_trace: Trace | None = None  # what the attention read for the next sampled token


def v4_fingerprint(model: Transformer) -> str:
    """Config, activation dtype, parameter names / shapes / dtypes and a strided value sample."""
    h = hashlib.sha256(json.dumps(model.cfg.to_hf_dict(), sort_keys=True, default=str).encode())
    h.update(f"v4:act={model.embed.weight.dtype}".encode())
    weights_digest(h, model)
    return h.hexdigest()[:32]


class V4Engine(EngineBase):
    """Step-driven generation over paged V4 caches (see the module docstring).

    block_size: entries per cache block (64: a CSA block holds 256 tokens' entries);
    n_blocks / max_blocks: initial / largest blocks per compression ratio (MemoryError past it);
    batched: one decode forward for all requests of a step (False: one each)."""

    running: dict[int, _Request]
    _prefixes: dict[int, V4PrefixHandle | BaseException]  # finished add_prefix requests, until taken

    def __init__(self, model: Transformer, tokenizer=None, *, prefill_chunk: int = 512, max_batch: int = 32,
                 block_size: int = BLOCK_SIZE, n_blocks: int = 16, max_blocks: int | None = None,
                 batched: bool = True):
        super().__init__(model, tokenizer, prefill_chunk, max_batch)
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype  # the activations', so the caches'
        self.pool = V4BlockPool(self.cfg, self.dtype, self.device, block_size, n_blocks, max_blocks)
        self.batched = batched

    def _compute_fingerprint(self) -> str:
        return v4_fingerprint(self.model)

    # --- requests --------------------------------------------------------------------------
    def _ids_checked(self, ids, prefix: V4PrefixHandle | None) -> list[int]:
        ids = token_ids(ids)
        check_token_ids(ids, self.cfg.vocab_size)
        if prefix is not None and prefix.cache is None:
            raise ValueError("the prefix handle was released; restore or prefill it again")
        n = (prefix.length if prefix is not None else 0) + len(ids)
        if not 0 < n <= self.cfg.max_position_embeddings:
            raise ValueError(f"prompt of {n} tokens: expected 1 .. {self.cfg.max_position_embeddings}")
        return ids

    def _start(self, rid, ids, params, prefix, prefix_only) -> int:
        rid = self.new_request_id() if rid is None else rid
        if rid in self.running:
            raise ValueError(f"request id {rid} is already running")
        tokens = (list(prefix.tokens) if prefix is not None else []) + ids
        if prefix is not None:  # fork: share the pools' blocks, keep the prefix's last logits
            cache, fed, logits = prefix.cache.fork(), prefix.length, prefix.logits
        else:
            cache, fed, logits = self.pool.new_cache(), 0, None
        self.running[rid] = _Request(rid, tokens, params, cache, fed, logits, self.tokenizer, self.eos_id, prefix_only)
        return rid

    def add_request(self, prompt_ids, params: SamplingParams | None = None, prefix: V4PrefixHandle | None = None,
                    request_id: int | None = None) -> int:
        return self._start(request_id, self._ids_checked(prompt_ids, prefix), params or SamplingParams(), prefix, False)

    def add_prefix(self, ids, prefix: V4PrefixHandle | None = None, request_id: int | None = None) -> int:
        return self._start(request_id, self._ids_checked(ids, prefix), SamplingParams(), prefix, True)

    def _free(self, r: _Request) -> None:
        r.cache.free()

    # --- one scheduling step ---------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Prefill chunks within the budget (oldest first), then one token for every request
        whose prompt is in its cache, fed back in one forward (or one each, batched=False)."""
        budget, events = self.prefill_chunk, []
        for r in list(self.running.values()):
            if budget <= 0:
                break
            n = min(len(r.tokens) - r.fed, budget)
            if n > 0:
                try:
                    ids = torch.tensor([r.tokens[r.fed: r.fed + n]], device=self.device)
                    last = r.fed + n == len(r.tokens)
                    rec = [] if last and r.params.trace and not r.prefix_only else None
                    r.logits = self.model.head(self.model.hidden(ids, r.cache, rec)[:, -1])[0].float()
                    if rec is not None:
                        r.pending_trace = self._aggregate(rec, r.params, 0)
                except (MemoryError, RuntimeError, ValueError) as e:
                    events.append(self._fail(r, e))
                    continue
                r.fed += n
                budget -= n
            if r.prefix_only and r.fed == len(r.tokens):
                self._prefixes[r.rid] = V4PrefixHandle(r.cache, r.tokens, r.logits)
                del self.running[r.rid]
        ready = [r for r in self.running.values() if not r.prefix_only and r.fed == len(r.tokens)][: self.max_batch]
        feed = []
        for r in ready:  # sample from the logits of the last cached token
            tok, lp = sample(r.logits, r.params, r.generator)
            tr, r.pending_trace = r.pending_trace, None
            ev = self._emit(r, tok, lp, tr)
            events.append(ev)
            if not ev.finished:
                feed.append(r)
        for group in ([feed] if self.batched else [[r] for r in feed]) if feed else []:
            try:
                self._feed(group)
            except (MemoryError, RuntimeError, ValueError) as e:  # a batch's caches moved together: all fail
                events += [self._fail(r, e) for r in group]
        return self._post(events)

    def _feed(self, rs: list[_Request]) -> None:
        """Feed each request's last sampled token, all in one forward; keep the next logits."""
        ids = torch.tensor([[r.tokens[-1]] for r in rs], device=self.device)
        rec = [] if any(r.params.trace for r in rs) else None
        logits = self.model.head(self.model.hidden(ids, [r.cache for r in rs], rec)[:, -1]).float()
        for b, r in enumerate(rs):
            r.logits = logits[b]
            r.fed += 1
            # The trace of the token just fed says what the attention read to produce the next
            # one; the service attributes it to the event that carries it, the next token's.
            r.pending_trace = self._aggregate(rec, r.params, b) if rec is not None and r.params.trace else None

    def _aggregate(self, rec, params: SamplingParams, row: int) -> Trace:
        """rec: per layer (positions [B, T, m], mass [B, T, m]) -> row's last token's trace, summed on the CPU."""
        last = [(i, p[row, -1].cpu(), m[row, -1].cpu()) for i, (p, m) in enumerate(rec)]
        return aggregate_trace(last, self.cfg.num_attention_heads, params)

    # --- prefixes, snapshots ---------------------------------------------------------------
    def prefix_progress(self, rid: int) -> tuple[int, int] | None:
        r = self.running.get(rid)
        return None if r is None else (r.fed, len(r.tokens))

    def release(self, handle: V4PrefixHandle) -> None:
        if handle.cache is not None:  # running forks keep the blocks they share (refcounts)
            handle.cache.free()
        handle.cache = None

    def snapshot(self, handle: V4PrefixHandle) -> Snapshot:
        """The handle's cache as named CPU tensors, copies: on CPU a pool read is a view of the
        block storage, whose rows a later sequence reuses once the handle is released."""
        if handle.cache is None:
            raise ValueError("snapshot: the prefix handle was released")
        t = {"tokens": torch.tensor(handle.tokens, dtype=torch.int64), "last_logits": handle.logits}
        for i, layer in enumerate(handle.cache.layers):
            if layer.window is not None:
                t[f"layer.{i}.window"] = layer.window
            for part in ("compressor", "indexer"):
                state = getattr(layer, part)
                for f in _STATE_FIELDS if state is not None else ():
                    v = getattr(state, f)
                    if v is not None:
                        t[f"layer.{i}.{part}.{f}"] = v
        meta = snapshot_metadata(self, SNAPSHOT_FORMAT, handle.length, kv_dtype=str(self.model.embed.weight.dtype))
        return Snapshot({k: v.detach().to("cpu", copy=True).contiguous() for k, v in t.items()}, meta)

    def restore(self, snapshot: Snapshot | dict, metadata: dict | None = None) -> V4PrefixHandle:
        """A prefix handle from snapshot tensors (+ metadata: format and fingerprint checked).
        ValueError names the tensor when one is of another dtype than this engine caches in, or
        a pool holds another number of entries than its tokens make."""
        tensors = open_snapshot(self, snapshot, metadata, SNAPSHOT_FORMAT,
                                (("kv_dtype", self.dtype),))  # and per tensor, below
        for need in ("tokens", "last_logits"):
            if need not in tensors:
                raise ValueError(f"snapshot lacks tensor {need!r}")
        tokens = [int(x) for x in tensors["tokens"].tolist()]
        n = len(tokens)
        if not 0 < n <= self.cfg.max_position_embeddings:
            raise ValueError(f"snapshot holds {n} tokens: expected 1 .. {self.cfg.max_position_embeddings}")
        cache = self.pool.new_cache()
        cache.length = n
        try:
            for i, layer in enumerate(cache.layers):
                w = tensors.get(f"layer.{i}.window")
                layer.window = None if w is None else self._cache_tensor(f"layer.{i}.window", w, self.dtype)
                for part in ("compressor", "indexer"):
                    state = getattr(layer, part)
                    for f in _STATE_FIELDS if state is not None else ():
                        name, v = f"layer.{i}.{part}.{f}", tensors.get(f"layer.{i}.{part}.{f}")
                        if v is None:
                            continue
                        # The gates are computed in the activation dtype too (wgate(x) + fp32 ape -> fp32).
                        want = self.dtype if f in ("buffer_kv", "overlap_kv", "entries") else v.dtype
                        v = self._cache_tensor(name, v, want)
                        if f == "entries" and v.shape[1] != n // self.cfg.ratio(i):
                            raise ValueError(f"snapshot tensor {name!r} holds {v.shape[1]} entries; {n} tokens at "
                                             f"ratio {self.cfg.ratio(i)} make {n // self.cfg.ratio(i)}")
                        setattr(state, f, v)
        except Exception:
            cache.free()
            raise
        return V4PrefixHandle(cache, tokens, tensors["last_logits"].float().to(self.device))

    def _cache_tensor(self, name: str, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if v.dtype != dtype:
            raise ValueError(f"snapshot tensor {name!r} is {v.dtype}, this engine caches {dtype}: "
                             f"prefill the prefix again")
        return v.to(self.device)

    def stats(self) -> dict:
        return {"running": len(self.running), "blocks_used": self.pool.used_blocks(),
                "blocks_total": self.pool.total_blocks(), "block_size": self.pool.block_size,
                "pool_bytes": self.pool.nbytes()}
