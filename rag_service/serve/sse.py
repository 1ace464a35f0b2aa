"""Server-sent events: framing and the event streams of /v1/ask and the OpenAI routes.

    sse({"type": "token", "text": "Hi"})   # b'data: {"type": "token", "text": "Hi"}\n\n'
    sse("[DONE]")                           # b'data: [DONE]\n\n'

/v1/ask with stream=true sends unnamed events (so `EventSource.onmessage` and `curl -N` see
everything), each a JSON object with a "type":
    data: {"type": "progress", "pack_id": "...", "done_tokens": 8192, "total_tokens": 30000,
           "percent": 27.3, "elapsed_s": 12.1, "eta_s": 32.2, "replica": "..."}  (a cold pack prefilling)
    data: {"type": "token", "text": "...", "pack_id": "...", "logprob": -1.2}     (one per token)
    data: {"type": "citations", "answer": ..., "citations": [...], "usage": {...}, "timings": {...}}
    data: [DONE]
An error after the stream started is sent as `data: {"type": "error", "error": {...}}` then
`data: [DONE]` (the HTTP status is already 200 by then).

The OpenAI routes send the same progress as SSE comments (`: progress {...}`), which every SSE
client skips (the openai package included), so a standard client sees only standard chunks.

The client side (parsing these streams) is rag_service/client.py: `parse_sse`, `SSEDecoder`,
`iter_events`.
"""

from __future__ import annotations

import json

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
DONE = b"data: [DONE]\n\n"


def comment(name: str, data: dict) -> bytes:
    """An SSE comment line, `: <name> <json>`: a documented extension that clients may read and
    standard SSE parsers ignore (used for prefill progress on the OpenAI routes)."""
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    return f": {name} {body}\n\n".encode()


def sse(data) -> bytes:
    if isinstance(data, (bytes, str)):
        body = data if isinstance(data, str) else data.decode()
    else:
        body = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    return f"data: {body}\n\n".encode()

