"""An engine's error event -> the service's error (rag_service/errors.py). The in-house engine says
only what went wrong (`error`: EngineError, 503); an `engine: openai` upstream backend
(model/engine/upstream.py) also says which kind of failure it was (`error_code`), which picks the
HTTP status the client sees: 429 upstream_busy (with Retry-After), 503 upstream_unavailable,
504 upstream_timeout, 502 upstream_error.

    raise engine_failure(pack_id, ev)      # ev: a TokenEventProtocol with finish_reason "error"

Tests: `.venv/bin/python -m pytest -q tests/service/test_upstream.py`.
"""

from __future__ import annotations

import math

from dsa_rag.rag_service.errors import (EngineError, RagError, UpstreamBusy, UpstreamError, UpstreamTimeout,
                                        UpstreamUnavailable)

_BY_CODE = {"upstream_busy": UpstreamBusy, "upstream_unavailable": UpstreamUnavailable,
            "upstream_timeout": UpstreamTimeout, "upstream_error": UpstreamError}


def engine_failure(pack_id: str, ev) -> RagError:
    """The error to raise for an engine event that ended a pack's answer with finish_reason "error"."""
    cls = _BY_CODE.get(getattr(ev, "error_code", None) or "", EngineError)
    what = "the upstream failed this request" if cls is not EngineError else "the engine failed this request"
    msg = f"pack {pack_id}: {what}: {getattr(ev, 'error', None) or 'unknown error'}"
    retry = getattr(ev, "retry_after", None)
    headers = {"Retry-After": str(max(1, math.ceil(retry)))} if cls is UpstreamBusy else None
    if cls is UpstreamBusy and retry is None:
        headers = {"Retry-After": "1"}
    return cls(msg, headers=headers)
