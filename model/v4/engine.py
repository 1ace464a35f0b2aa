"""The DeepSeek-V4 engine: what `load_engine` runs for a `deepseek_v4` checkpoint, with the same
sync surface as `dsa_rag.model.engine.engine.Engine`, so `AsyncEngine` wraps it unchanged and the
service sees the same EngineProtocol.

V4's cache is not paged token rows: per sequence it is a `V4Cache` (sliding window, compressed
pools, compressor rolling state, indexer pool; model/v4/cache.py), a few KB per token on the real
models. So a prefix handle owns one V4Cache plus the logits of its last token; a question forks it
by copying the cache (small: ~1/10 of a V3.2 latent cache) and feeds only its own tokens. Requests
decode one after another inside a step (no cross-request batching yet). Snapshots are the cache's
tensors by name (`layer.{i}.window`, `layer.{i}.compressor.entries`, ...), plus `tokens` and
`last_logits`; restore checks the format and the model fingerprint.

Request bookkeeping, stop / finish handling, outboxes and the drivers are the V3.2 engine's
(model/engine/requests.py); the fingerprint hashes the weights as it does (`weights_digest`).

Traces: per generated token, the token positions the attention read (window tokens, and the
windows of the compressed entries it attended, an entry's mass spread over its tokens), mass
averaged over heads and layers, as the citations expect.

    .venv/bin/python -m pytest -q tests/model/test_deepseek_v4_engine.py -p no:cacheprovider
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from dsa_rag.model.engine.engine import Snapshot, open_snapshot, snapshot_metadata, weights_digest
from dsa_rag.model.engine.requests import (EngineBase, Request, TokenEvent, Trace, aggregate_trace, check_token_ids,
                                           token_ids)
from dsa_rag.model.engine.sampling import SamplingParams, sample
from dsa_rag.model.v4.cache import V4Cache
from dsa_rag.model.v4.model import Transformer

SNAPSHOT_FORMAT = "dsa-v4-snapshot/1"
_STATE_FIELDS = ("buffer_kv", "buffer_gate", "overlap_kv", "overlap_gate", "entries")


@dataclass(eq=False)
class V4PrefixHandle:
    """A cached, read-only prefix: its V4Cache and the logits after its last token."""

    cache: V4Cache | None
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
    """Step-driven generation over per-sequence V4 caches (see the module docstring)."""

    running: dict[int, _Request]
    _prefixes: dict[int, V4PrefixHandle | BaseException]  # finished add_prefix requests, until taken

    def __init__(self, model: Transformer, tokenizer=None, *, prefill_chunk: int = 512, max_batch: int = 32):
        super().__init__(model, tokenizer, prefill_chunk, max_batch)
        self.device = model.embed.weight.device

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
        tokens = (list(prefix.tokens) if prefix is not None else []) + ids
        if prefix is not None:  # fork: copy the (small) cache, keep the prefix's last logits
            cache, fed, logits = prefix.cache.snapshot(), prefix.length, prefix.logits
        else:
            cache, fed, logits = self.model.new_cache(), 0, None
        rid = self.new_request_id() if rid is None else rid
        if rid in self.running:
            raise ValueError(f"request id {rid} is already running")
        self.running[rid] = _Request(rid, tokens, params, cache, fed, logits, self.tokenizer, self.eos_id, prefix_only)
        return rid

    def add_request(self, prompt_ids, params: SamplingParams | None = None, prefix: V4PrefixHandle | None = None,
                    request_id: int | None = None) -> int:
        return self._start(request_id, self._ids_checked(prompt_ids, prefix), params or SamplingParams(), prefix, False)

    def add_prefix(self, ids, prefix: V4PrefixHandle | None = None, request_id: int | None = None) -> int:
        return self._start(request_id, self._ids_checked(ids, prefix), SamplingParams(), prefix, True)

    # --- one scheduling step ---------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Prefill chunks within the budget (oldest first), then one token for every request
        whose prompt is in its cache."""
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
                        r.pending_trace = self._aggregate(rec, r.params)
                except (MemoryError, RuntimeError, ValueError) as e:
                    events.append(self._fail(r, e))
                    continue
                r.fed += n
                budget -= n
            if r.prefix_only and r.fed == len(r.tokens):
                self._prefixes[r.rid] = V4PrefixHandle(r.cache, r.tokens, r.logits)
                del self.running[r.rid]
        ready = [r for r in self.running.values() if not r.prefix_only and r.fed == len(r.tokens)][: self.max_batch]
        for r in ready:
            try:
                events.append(self._decode(r))
            except (MemoryError, RuntimeError, ValueError) as e:
                events.append(self._fail(r, e))
        return self._post(events)

    def _decode(self, r: _Request) -> TokenEvent:
        """Sample from the logits of the last cached token, then feed the sampled token."""
        tok, lp = sample(r.logits, r.params, r.generator)
        tr, r.pending_trace = r.pending_trace, None
        ev = self._emit(r, tok, lp, tr)
        if not ev.finished:
            rec = [] if r.params.trace else None
            ids = torch.tensor([[tok]], device=self.device)
            r.logits = self.model.head(self.model.hidden(ids, r.cache, rec)[:, -1])[0].float()
            r.fed += 1
            # The trace of the token just fed says what the attention read to produce the next
            # one; the service attributes it to the event that carries it, the next token's.
            r.pending_trace = self._aggregate(rec, r.params) if rec is not None else None
        return ev

    def _aggregate(self, rec, params: SamplingParams) -> Trace:
        """rec: per layer (positions [1, T, m], mass [1, T, m]) -> the last token's trace, summed on the CPU."""
        last = [(i, p[0, -1].cpu(), m[0, -1].cpu()) for i, (p, m) in enumerate(rec)]
        return aggregate_trace(last, self.cfg.num_attention_heads, params)

    # --- prefixes, snapshots ---------------------------------------------------------------
    def prefix_progress(self, rid: int) -> tuple[int, int] | None:
        r = self.running.get(rid)
        return None if r is None else (r.fed, len(r.tokens))

    def release(self, handle: V4PrefixHandle) -> None:
        handle.cache = None  # running forks hold their own copies

    def snapshot(self, handle: V4PrefixHandle) -> Snapshot:
        if handle.cache is None:
            raise ValueError("snapshot: the prefix handle was released")
        t = {"tokens": torch.tensor(handle.tokens, dtype=torch.int64), "last_logits": handle.logits.cpu()}
        for i, layer in enumerate(handle.cache.layers):
            if layer.window is not None:
                t[f"layer.{i}.window"] = layer.window.cpu()
            for part in ("compressor", "indexer"):
                state = getattr(layer, part)
                for f in _STATE_FIELDS if state is not None else ():
                    v = getattr(state, f)
                    if v is not None:
                        t[f"layer.{i}.{part}.{f}"] = v.cpu()
        meta = snapshot_metadata(self, SNAPSHOT_FORMAT, handle.length, kv_dtype=str(self.model.embed.weight.dtype))
        return Snapshot({k: v.contiguous() for k, v in t.items()}, meta)

    def restore(self, snapshot: Snapshot | dict, metadata: dict | None = None) -> V4PrefixHandle:
        tensors = open_snapshot(self, snapshot, metadata, SNAPSHOT_FORMAT)  # dtype: per window tensor, below
        for need in ("tokens", "last_logits"):
            if need not in tensors:
                raise ValueError(f"snapshot lacks tensor {need!r}")
        tokens = [int(x) for x in tensors["tokens"].tolist()]
        if not 0 < len(tokens) <= self.cfg.max_position_embeddings:
            raise ValueError(f"snapshot holds {len(tokens)} tokens: expected 1 .. {self.cfg.max_position_embeddings}")
        dev, act = self.device, self.model.embed.weight.dtype
        cache = self.model.new_cache()
        cache.length = len(tokens)
        for i, layer in enumerate(cache.layers):
            w = tensors.get(f"layer.{i}.window")
            if w is not None and w.dtype != act:
                raise ValueError(f"snapshot tensor 'layer.{i}.window' is {w.dtype}, this engine caches {act}: "
                                 f"prefill the prefix again")
            layer.window = None if w is None else w.to(dev)
            for part in ("compressor", "indexer"):
                state = getattr(layer, part)
                for f in _STATE_FIELDS if state is not None else ():
                    v = tensors.get(f"layer.{i}.{part}.{f}")
                    setattr(state, f, None if v is None else v.to(dev))
        return V4PrefixHandle(cache, tokens, tensors["last_logits"].float().to(dev))

    def stats(self) -> dict:
        return {"running": len(self.running)}
