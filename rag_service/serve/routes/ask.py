"""POST /v1/ask: a question over the tenant's documents (or `document_ids`), answered from every
selected pack in parallel; JSON, or server-sent events with `stream=true`:

    data: {"type": "progress", "pack_id": "...", "done_tokens": ..., "total_tokens": ..., "eta_s": ...}
                                                    (while a cold pack prefills; see ../sse.py)
    data: {"type": "token", "text": "...", "pack_id": "...", "logprob": -1.2}     (one per token)
    data: {"type": "citations", "answer": ..., "citations": [...], "usage": {...}, "timings": {...}}
    data: [DONE]

A stream takes one of the API key's stream slots (429 when `max_streams_per_key` are open) and
reads the fan-out's first event (pack selection) before it answers 200, so "no documents" or
"another tenant's document" still get their HTTP status; an error after that is sent in-band
(`{"type": "error", "error": {...}}`, then [DONE]). `open_stream` is shared with openai.py.

Tests: `.venv/bin/python -m pytest -q tests/service/test_api.py -k ask tests/service/test_faults.py`.
"""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from dsa_rag.rag_service.ask.fanout import ask, ask_events
from dsa_rag.rag_service.serve import sse as S
from dsa_rag.rag_service.serve.deps import (AskQuestion, BackendDep, MetricsDep, PrincipalDep, SettingsDep,
                                            StreamsDep)
from dsa_rag.rag_service.serve.errors import ERROR_RESPONSES, stream_error
from dsa_rag.rag_service.serve.guard import StreamSlot, StreamSlots
from dsa_rag.rag_service.serve.schemas_api import AskResponse

router = APIRouter(tags=["ask"])


@router.post("/v1/ask", response_model=AskResponse, responses={**ERROR_RESPONSES, 200: {
    "content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}})
async def ask_route(q: AskQuestion, backend: BackendDep, metrics: MetricsDep, settings: SettingsDep,
                    streams: StreamsDep, principal: PrincipalDep):
    if not q.req.stream:
        return AskResponse(**await ask(backend, metrics, q.params, retries=settings.stream_retries))
    events = ask_events(backend, metrics, q.params, retries=settings.stream_retries)
    slot = await open_stream(streams, principal, events)
    return StreamingResponse(_ask_sse(events, slot), media_type="text/event-stream", headers=S.SSE_HEADERS)


async def open_stream(streams: StreamSlots, principal: str, events: AsyncIterator[dict]) -> StreamSlot:
    """Take a stream slot of `principal` and read the first event (pack selection), whose errors
    then become a proper HTTP status; the slot is given back when that fails."""
    slot = streams.acquire(principal)
    try:
        await events.__anext__()
    except BaseException:
        slot.release()
        raise
    return slot


async def _ask_sse(events: AsyncIterator[dict], slot: StreamSlot):
    try:
        async for ev in events:
            if ev["event"] == "token":
                if ev["text"]:
                    yield S.sse({"type": "token", "text": ev["text"], "pack_id": ev["pack_id"],
                                 "logprob": ev["logprob"]})
            elif ev["event"] == "progress":
                yield S.sse({"type": "progress", **{k: v for k, v in ev.items() if k != "event"}})
            elif ev["event"] == "done":
                done = AskResponse(**ev).model_dump(mode="json")
                yield S.sse({"type": "citations", **done})
    except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
        yield S.sse({"type": "error", "error": stream_error(e)})
    finally:
        slot.release()
    yield S.DONE
