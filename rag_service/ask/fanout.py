"""The one ask path: fan-out of a question to its selected packs, in parallel, and the merge of
their answers. The HTTP routes, the Ray ingress, the CLI (through the routes), the benchmarks and
notebooks all answer through `ask_events` / `ask` / `ask_sync`.

    params = AskParams.of("What was the revenue?", max_tokens=64)        # ask/params.py
    async for ev in ask_events(backend, metrics, params, retries=1):
        ev["event"]   # "selected" | "progress" | "token" | "done"
    out = await ask(backend, metrics, params)                          # the "done" event
    out = ask_sync(LocalBackend(settings), params)                    # scripts (no running loop)

Every selected pack is answered concurrently (`backend.stream_pack(pack_id, params)`, which in
Ray mode is a call routed to the replica holding the pack's prefix cache). Tokens of the
*primary* pack (the best by lexical selection) stream to the client live, so the first token
does not wait for the slowest pack (with `params.abstain`, the default, they are held until that
pack's answer is scored, then released, or replaced by one "Not in the documents." token when
the evidence does not support it); the final "done" event carries the merged result
(`dsa_rag.rag_service.ask.merge.merge`: best answer by model score, all citations, summed usage;
with `params.document_ids`, only citations of those documents), which non-streaming routes
return as is. Metrics (TTFT, tokens/s, prefix-cache hits/queries) are observed here, per pack,
when a `metrics` object is given (None: no metrics).

Faults: a pack stream that fails before its first token (a replica killed or restarting, the
engine failing the request) is retried up to `retries` times, transparently (in Ray the retry
is routed to a live replica). After a token was produced the failure reaches the client: the
streaming routes send an in-band error event, then [DONE]. Client errors (4xx) are not retried.

Imports neither FastAPI nor Ray. Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_ask_path.py
tests/service/test_api.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from dsa_rag.rag_service.ask.backend import Backend
from dsa_rag.rag_service.ask.merge import PackResult, merge
from dsa_rag.rag_service.ask.params import AskParams
from dsa_rag.rag_service.ask.support import ABSTAIN_TEXT
from dsa_rag.rag_service.errors import NoDocuments, RagError

log = logging.getLogger(__name__)


async def ask_events(backend: Backend, metrics, params: AskParams, *, retries: int = 0) -> AsyncIterator[dict]:
    """Events: selected {packs}; progress {pack_id, done_tokens, total_tokens, percent, eta_s, ...}
    of any pack whose cold prefix is being prefilled (ask/progress.py); token {pack_id, text,
    token_id, logprob} of the primary pack;
    done {answer, pack_id, score, finish_reason, citations, packs, usage, primary_pack_id,
    timings}. NoDocuments when no pack matches."""
    document_ids = params.document_ids
    t0 = time.perf_counter()
    selections = await backend.select(params)
    if not selections:
        raise NoDocuments(
            "no documents to answer from" + (" (none of the given document_ids has a pack)" if document_ids else
                                             "; upload some with POST /v1/documents first")
        )
    t_sel = time.perf_counter()
    yield {"event": "selected", "packs": [s.pack_id for s in selections]}
    primary = selections[0].pack_id
    queue: asyncio.Queue = asyncio.Queue()
    _END = object()

    async def run(pack_id: str):
        t_start = time.perf_counter()
        first = None
        attempt = 0
        try:
            while True:
                try:
                    async for ev in backend.stream_pack(pack_id, params):
                        if ev["event"] == "start" and metrics is not None:
                            metrics.observe_prefix(ev["prompt_tokens"], ev["cached_tokens"], ev["cache"])
                        elif ev["event"] == "token" and first is None:
                            first = time.perf_counter()
                            if metrics is not None:
                                metrics.ttft.observe(first - t_start)
                        elif ev["event"] == "end" and metrics is not None:
                            metrics.observe_end(ev)
                        await queue.put(ev)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001
                    if attempt < retries and first is None and _retryable(e):
                        attempt += 1
                        log.warning("pack %s: answer stream failed before its first token (%s: %s); retry %d/%d",
                                    pack_id, type(e).__name__, e, attempt, retries)
                        continue
                    raise
        except BaseException as e:  # forwarded to the consumer, which re-raises it
            await queue.put(e)
        finally:
            await queue.put((_END, pack_id))

    metrics and metrics.in_flight.inc()
    tasks = [asyncio.create_task(run(s.pack_id)) for s in selections]
    results: list[PackResult] = []
    first_token = None
    held: list[dict] = []  # the primary pack's tokens, while params.abstain waits for its support score
    # only when an answer can be abstained: a threshold of 0 streams live as before
    hold = params.abstain and getattr(getattr(backend, "settings", None), "abstain_threshold", 0.0) > 0
    try:
        pending = len(tasks)
        while pending:
            item = await queue.get()
            if isinstance(item, tuple) and item[0] is _END:
                pending -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            if item["event"] == "token" and item["pack_id"] == primary:
                if hold:  # held until the answer is scored: an unsupported value never streams
                    held.append(item)
                    continue
                if first_token is None:
                    first_token = time.perf_counter()
                yield item
            elif item["event"] == "progress":  # any pack's prefill: the client sees why it waits
                yield item
            elif item["event"] == "end":
                results.append(PackResult.from_end_event(item))
                if item["pack_id"] == primary and held:
                    first_token = first_token or time.perf_counter()
                    for tok in ([{**held[0], "text": ABSTAIN_TEXT, "logprob": None}] if item.get("abstained")
                                else held):
                        yield tok
                    held = []
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        metrics and metrics.in_flight.dec()
    order = {s.pack_id: i for i, s in enumerate(selections)}
    results.sort(key=lambda r: order.get(r.pack_id, 1 << 30))
    if document_ids is not None:  # a pack may hold other documents too: cite only the asked-for ones
        wanted = set(document_ids)
        for r in results:
            r.citations = [c for c in r.citations if c.document_id in wanted]
    out = merge(results)
    t_end = time.perf_counter()
    out["primary_pack_id"] = primary
    out["timings"] = {"select_s": t_sel - t0, "first_token_s": (first_token or t_end) - t0, "total_s": t_end - t0}
    yield {"event": "done", **out}


def _retryable(e: BaseException) -> bool:
    """Server-side failures (replica gone, engine error, storage) are; client errors are not."""
    return not (isinstance(e, RagError) and e.status_code < 500)


async def ask(backend: Backend, metrics, params: AskParams, *, retries: int = 0) -> dict:
    """Non-streaming form: the merged "done" event."""
    async for ev in ask_events(backend, metrics, params, retries=retries):
        if ev["event"] == "done":
            return ev
    raise RuntimeError("answer stream ended without a result")


def ask_sync(backend: Backend, params: AskParams, *, metrics=None, retries: int = 0) -> dict:
    """`ask` for scripts and benchmarks: starts the backend (idempotent) and answers in a fresh
    event loop. Not from inside a running loop (a notebook cell: `await ask(...)` instead)."""

    async def run() -> dict:
        await backend.start()
        return await ask(backend, metrics, params, retries=retries)

    return asyncio.run(run())
