"""Server-sent events: framing and the event streams of /v1/ask and the OpenAI routes.

    sse({"type": "token", "text": "Hi"})   # b'data: {"type": "token", "text": "Hi"}\n\n'
    sse("[DONE]")                           # b'data: [DONE]\n\n'

/v1/ask with stream=true sends unnamed events (so `EventSource.onmessage` and `curl -N` see
everything), each a JSON object with a "type":
    data: {"type": "token", "text": "...", "pack_id": "...", "logprob": -1.2}     (one per token)
    data: {"type": "citations", "answer": ..., "citations": [...], "usage": {...}, "timings": {...}}
    data: [DONE]
An error after the stream started is sent as `data: {"type": "error", "error": {...}}` then
`data: [DONE]` (the HTTP status is already 200 by then).

The client side (parsing these streams) is rag_service/client.py: `parse_sse`, `SSEDecoder`,
`iter_events`.
"""

from __future__ import annotations

import json

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
DONE = b"data: [DONE]\n\n"


def sse(data) -> bytes:
    if isinstance(data, (bytes, str)):
        body = data if isinstance(data, str) else data.decode()
    else:
        body = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    return f"data: {body}\n\n".encode()

