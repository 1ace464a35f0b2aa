"""Pydantic models the RAG core returns (and the API layer serializes): documents, packs,
citations, pack selections and batch-ingest results. Limits live in `Field(...)`.

    from dsa_rag.rag_service.schemas import Citation
    Citation(document_id="doc_1", name="a.pdf", page=2, char_start=10, char_end=42, snippet="...")

Conventions: character offsets index the document's *extracted text* (`str` indices, end
exclusive); pages are 1-based and None for unpaginated text; token counts use the service
tokenizer. Tests: `.venv/bin/python -m pytest -q tests/rag_service`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MediaType = Literal["pdf", "text", "markdown"]
NAME_MAX = 512


class PageSpan(BaseModel):
    """Where page `page` lies in the extracted text: text[char_start:char_end]."""

    model_config = ConfigDict(frozen=True)

    page: int = Field(..., ge=1)
    char_start: int = Field(..., ge=0)
    char_end: int = Field(..., ge=0)
    ocr: bool = Field(False, description="the page had no text layer; its text was recognized by OCR")


class DocumentInfo(BaseModel):
    id: str = Field(..., min_length=1, max_length=64)
    name: str = Field(..., min_length=1, max_length=NAME_MAX)
    tenant: str = Field("default", min_length=1, max_length=128)
    media_type: MediaType
    sha256: str = Field(..., min_length=64, max_length=64, description="of the uploaded bytes")
    text_sha256: str = Field(..., min_length=64, max_length=64, description="of the extracted UTF-8 text")
    size_bytes: int = Field(..., ge=0)
    chars: int = Field(..., ge=0)
    tokens: int = Field(..., ge=0, description="prompt cost of the whole document, <doc> markers included")
    pages: int = Field(..., ge=0, description="PDF pages; 0 for unpaginated text")
    chunks: int = Field(..., ge=0)
    created: float = Field(..., description="unix time of the first upload")
    packs: list[str] = Field(default_factory=list, description="pack ids, in window order")
    ocr_pages: list[int] = Field(default_factory=list, description="1-based pages whose text was recognized by OCR")


class PackMember(BaseModel):
    """One document (or one window of a long document) inside a pack."""

    document_id: str
    name: str
    char_start: int = Field(..., ge=0, description="window start in the document text")
    char_end: int = Field(..., ge=0)
    tokens: int = Field(..., ge=0, description="cost in the pack prompt, <doc> markers included")
    window: int = Field(0, ge=0, description="index of this window; 0 for a whole document")
    windows: int = Field(1, ge=1, description="how many windows the document was cut into")


class PackInfo(BaseModel):
    id: str
    tenant: str = "default"
    version: int = Field(1, ge=1, description="bumped each time the pack is rebuilt after a delete")
    previous: str | None = Field(None, description="the pack id this one was rebuilt from")
    state: Literal["open", "sealed"]
    tokens: int = Field(..., ge=1, description="prompt prefix length, <bos> included")
    capacity: int = Field(..., ge=1)
    created: float
    documents: list[PackMember] = Field(default_factory=list)


class Citation(BaseModel):
    document_id: str
    name: str
    page: int | None = Field(None, ge=1)
    char_start: int = Field(..., ge=0)
    char_end: int = Field(..., ge=0)
    snippet: str = Field("", max_length=2000)
    share: float | None = Field(
        None, ge=0, le=1, description="share of the answer's attention mass on document text that this span "
        "drew (attention sinks discounted); citations come in descending share")
    citation_method: Literal["attention", "lexical"] = Field(
        "attention", description="how the span was found: the answer's attention trace, or lexical overlap of the "
        "answer with the pack's sentences when the engine returns no trace (an OpenAI-compatible upstream; then "
        "`share` is the span's share of the lexical score)")


class ScoredChunk(BaseModel):
    score: float
    citation: Citation


class PackSelection(BaseModel):
    """A pack chosen for a question: its lexical score and its best chunks (best first)."""

    pack_id: str
    score: float
    chunks: list[ScoredChunk] = Field(default_factory=list)


class IngestResult(BaseModel):
    """One file of a batch upload: either `document` or `error` is set."""

    name: str
    ok: bool
    document: DocumentInfo | None = None
    error: str | None = Field(None, description="machine code, e.g. encrypted_document")
    message: str | None = None
    status_code: int | None = Field(None, ge=400, le=599)
