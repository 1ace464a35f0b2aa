"""A window of a stored document's extracted text, with the pages it overlaps: what the web UI
shows around a citation (citations index this text: `text[char_start:char_end]`).

    text_window(rag, "doc_ab12", "default", 1200, 1900)
    # {"id", "start", "end", "chars", "text", "pages": [{"page", "char_start", "char_end"}]}

The window is clipped to the text and to WINDOW_MAX characters (a 300-page report's text is
megabytes; a person reads a page or two around the span). Tenant-checked like every document
read (another tenant's id is a NotFound). Imports neither FastAPI nor Ray.
Tests: `.venv/bin/python -m pytest -q tests/service/test_ui_api.py tests/service/test_ui.py`.
"""

from __future__ import annotations

from dsa_rag.rag_service.pipeline import RagPipeline

WINDOW_MAX = 20_000  # characters per request


def text_window(rag: RagPipeline, doc_id: str, tenant: str, start: int = 0, end: int | None = None) -> dict:
    rag.get_document(doc_id, tenant)  # NotFound for another tenant's / an unknown id
    text = rag.document_text(doc_id)
    start = max(0, min(start, len(text)))
    end = len(text) if end is None else max(start, min(end, len(text)))
    end = min(end, start + WINDOW_MAX)
    pages = [p.model_dump() for p in rag.document_pages(doc_id) if p.char_end > start and p.char_start < end]
    return {"id": doc_id, "start": start, "end": end, "chars": len(text), "text": text[start:end], "pages": pages}
