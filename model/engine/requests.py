"""What both engines do the same way with requests: the token events and traces they return, a
request's bookkeeping (incremental decoder, stop strings and stop ids, finish reasons), and the
request ids, outboxes, prefix hand-over and drivers (`generate`, `prefill_prefix`) built on a
`step()`. The paged V3.2 / GLM-5 `Engine` (model/engine/engine.py) and the per-sequence
`V4Engine` (model/v4/engine.py) subclass `EngineBase` and bring their own caches, prefill,
decode and snapshots.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/model/engine tests/model/test_deepseek_v4_engine.py
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch

from dsa_rag.model.engine.sampling import SamplingParams, StopMatcher, make_generator
from dsa_rag.model.tokenizer import ByteTokenizer, IncrementalDecoder

__all__ = ["Trace", "TokenEvent", "Request", "EngineBase", "aggregate_trace", "token_ids", "check_token_ids"]


@dataclass
class Trace:
    """What the sparse attention read for one generated token. positions: context token positions
    by descending mass; mass: attention probability averaged over heads and layers (over all
    positions it sums to 1). layers (trace_layers=True): per layer (positions, mass / heads)."""

    positions: list[int]
    mass: list[float]
    layers: list[tuple[list[int], list[float]]] | None = None


@dataclass
class TokenEvent:
    """One generated token. text: the text this token releases (may be "" while a UTF-8
    character or a possible stop string is incomplete); position: its index in the sequence.
    finish_reason: "stop" (EOS / stop token / stop string), "length" (max_tokens or the model's
    context), "abort", "error" (see `error`; e.g. the block pool is full)."""

    request_id: int
    token_id: int
    text: str
    logprob: float | None
    position: int
    trace: Trace | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None  # finish_reason "error": what went wrong (the engine keeps serving others)


def token_ids(ids) -> list[int]:
    """A prompt as a list of ints (from a list, or a 1-D tensor)."""
    return [int(t) for t in (ids.tolist() if torch.is_tensor(ids) else ids)]


def check_token_ids(ids: list[int], vocab_size: int, what: str = "token ids") -> None:
    """ValueError naming the first id outside [0, vocab_size)."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} must be in [0, {vocab_size}), got e.g. {bad[0]}")


def aggregate_trace(recs, heads: int, params: SamplingParams) -> Trace:
    """recs: per layer (layer id, positions [k], mass summed over heads [k]; position -1 = unused)
    -> the top `params.trace_top` positions by mass averaged over heads and layers (summed on the
    tensors' device), and per layer, by layer id, when params.trace_layers."""
    L = len(recs)
    idx = torch.cat([i for _, i, _ in recs]).long()
    mass = torch.cat([m for _, _, m in recs]).float() / (heads * L)
    keep = idx >= 0
    idx, mass = idx[keep], mass[keep]
    uniq, inv = torch.unique(idx, return_inverse=True)
    agg = torch.zeros(uniq.shape[0], dtype=torch.float32, device=mass.device).index_add_(0, inv, mass)
    top = agg.topk(min(params.trace_top, agg.shape[0]))
    layers = None
    if params.trace_layers:
        layers = [(i[i >= 0].tolist(), (m[i >= 0].float() / heads).tolist()) for _, i, m in sorted(recs, key=lambda x: x[0])]
    return Trace(uniq[top.indices].tolist(), top.values.tolist(), layers)


class Request:
    """One request: its tokens (prompt, then what it generated), sampling state, and the decoder
    and stop matcher that turn tokens into released text. An engine subclasses it with its cache.
    cached: prompt tokens that came from a prefix handle; prefix_only: cache every token, sample
    nothing, end as a prefix handle."""

    def __init__(self, rid, tokens, params, cached, tokenizer, eos, prefix_only=False):
        self.rid, self.tokens, self.params = rid, tokens, params
        self.prefix_only = prefix_only
        self.n_prompt, self.cached = len(tokens), cached
        self.out_ids: list[int] = []
        self.generator = make_generator(params)
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = StopMatcher(params.stop)
        self.stop_ids = set(params.stop_token_ids if params.stop_token_ids is not None else [eos])

    def push(self, tok: int, max_context: int) -> tuple[str, str | None]:
        """Append a sampled token -> (the text it releases, finish reason or None). A stop id
        releases no text of its own; on any finish the decoder and the stop matcher give up what
        they still hold (a stop string is trimmed)."""
        self.tokens.append(tok)
        self.out_ids.append(tok)
        finish = None
        if tok in self.stop_ids:
            text, hit, finish = "", False, "stop"
        else:
            text, hit = self.stops.push(self.decoder.push(tok))
            if hit:
                finish = "stop"
            elif len(self.out_ids) >= self.params.max_tokens or len(self.tokens) >= max_context:
                finish = "length"
        if finish and not hit:  # release what the decoder / stop matcher still hold
            more, hit = self.stops.push(self.decoder.flush())
            text += more if hit else more + self.stops.flush()
        return text, finish


class EngineBase:
    """Request ids, running requests, per-request outboxes (filled by step() for the drivers'
    requests) and finished prefixes of an engine, and the drivers over its `step()`. A subclass
    defines step(), add_request(), add_prefix(), _compute_fingerprint(), and _free(r) when a
    request's cache must be given back as it ends (finish, abort, error)."""

    def __init__(self, model, tokenizer, prefill_chunk: int, max_batch: int):
        if prefill_chunk < 1 or max_batch < 1:
            raise ValueError(f"prefill_chunk and max_batch must be >= 1, got {prefill_chunk}, {max_batch}")
        self.model, self.cfg = model.eval(), model.cfg
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.eos_id = getattr(self.tokenizer, "eos_id", self.cfg.eos_token_id)
        self.prefill_chunk, self.max_batch = prefill_chunk, max_batch
        self.running: dict[int, Request] = {}
        self._ids = itertools.count()
        self._outbox: dict[int, deque[TokenEvent]] = {}
        self._prefixes: dict = {}  # finished add_prefix requests (handle, or what failed them), until taken
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        raise NotImplementedError

    # --- requests --------------------------------------------------------------------------
    def new_request_id(self) -> int:
        return next(self._ids)

    def abort(self, rid: int) -> None:
        r = self.running.pop(rid, None)
        if r is not None:
            self._free(r)
            if rid in self._outbox:
                self._outbox[rid].append(TokenEvent(rid, -1, "", None, len(r.tokens) - 1, None, True, "abort"))

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def _free(self, r: Request) -> None:
        """Give back r's cache once it ended (finished, aborted, failed); nothing by default."""

    def _post(self, events: list[TokenEvent]) -> list[TokenEvent]:
        """Append a step's events to their requests' outboxes (the drivers' requests); returns them."""
        for ev in events:
            if ev.request_id in self._outbox:
                self._outbox[ev.request_id].append(ev)
        return events

    def _fail(self, r: Request, e: BaseException) -> TokenEvent:
        self.running.pop(r.rid, None)
        self._free(r)
        if r.prefix_only:
            self._prefixes[r.rid] = e  # take_prefix raises it
        return TokenEvent(r.rid, -1, "", None, len(r.tokens) - 1, None, True, "error", f"{type(e).__name__}: {e}")

    def _emit(self, r: Request, tok: int, lp, tr: Trace | None) -> TokenEvent:
        text, finish = r.push(tok, self.cfg.max_position_embeddings)
        if finish:
            self.running.pop(r.rid, None)
            self._free(r)
        return TokenEvent(r.rid, tok, text, lp, len(r.tokens) - 1, tr, finish is not None, finish)

    # --- drivers ---------------------------------------------------------------------------
    def generate(self, prompt_ids, params: SamplingParams | None = None, prefix=None) -> Iterator[TokenEvent]:
        """Stream one request's tokens; other requests (other generators, add_request) advance in
        the same steps. Closing the iterator early aborts the request."""
        rid = self.new_request_id()
        self._outbox[rid] = deque()
        try:
            self.add_request(prompt_ids, params, prefix, request_id=rid)
            yield from self._drain(rid)
        finally:
            self._outbox.pop(rid, None)
            self.abort(rid)

    def _drain(self, rid: int) -> Iterator[TokenEvent]:
        q = self._outbox[rid]
        while True:
            while q:
                ev = q.popleft()
                yield ev
                if ev.finished:
                    return
            if rid not in self.running:
                return
            self.step()

    # --- prefixes --------------------------------------------------------------------------
    def take_prefix(self, rid: int):
        """The prefix handle of a finished add_prefix request (once), or None while it prefills.
        Raises what made its prefill fail (e.g. MemoryError: the paged block pool is full)."""
        h = self._prefixes.pop(rid, None)
        if isinstance(h, BaseException):
            raise h
        return h

    def prefill_prefix(self, ids, prefix=None):
        """Cache every token of `ids` (continuing `prefix` if given); returns a read-only handle
        to fork questions from. Steps the engine until done, so running requests keep decoding."""
        rid = self.add_prefix(ids, prefix)
        while (h := self.take_prefix(rid)) is None:
            self.step()
        return h
