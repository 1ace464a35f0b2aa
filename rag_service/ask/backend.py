"""The `Backend` interface the HTTP routes and the fan-out (`ask.fanout.ask_events`) call:
documents, pack selection, per-pack answer streams, health. Two implementations:

- `dsa_rag.rag_service.ask.local.LocalBackend`: the pipeline and one `PackWorker` in this
  process (tests, benchmarks, notebooks, `dsa-rag serve --no-ray`);
- `dsa_rag.rag_service.serve.deployments.RayBackend`: the same calls through Ray Serve handles.

A question's parameters travel whole (`AskParams`): `select(params)`, `stream_pack(pack_id, params)`.
Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_ask_path.py`.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from dsa_rag.rag_service.ask.params import AskParams
from dsa_rag.rag_service.schemas import DocumentInfo, IngestResult, PackSelection
from dsa_rag.rag_service.settings import RagSettings


class Backend(Protocol):
    settings: RagSettings  # the serving layer's backends carry its ServeSettings (a RagSettings)

    async def start(self) -> None:
        """Load what the backend needs (idempotent)."""
        ...

    async def close(self) -> None: ...
    async def ingest(self, files: list[tuple[str, bytes]], tenant: str) -> list[IngestResult]: ...
    async def list_documents(self, tenant: str) -> list[DocumentInfo]: ...
    async def get_document(self, doc_id: str, tenant: str) -> DocumentInfo: ...
    async def delete_document(self, doc_id: str, tenant: str) -> dict: ...

    async def select(self, params: AskParams) -> list[PackSelection]:
        """The packs to answer `params.question` from (tenant, document_ids), best first."""
        ...

    def stream_pack(self, pack_id: str, params: AskParams) -> AsyncIterator[dict]:
        """One pack's answer events (see `PackWorker.stream`)."""
        ...

    async def health(self) -> dict[str, str]: ...
    async def ready(self) -> dict[str, str]: ...
    async def replicas(self) -> int: ...
    async def prefetch(self, pack_ids: list[str]) -> None: ...

    async def pack_states(self, tenant: str) -> list[dict]:
        """The tenant's packs with their cache state (ask/cachestate.py)."""
        ...

    async def document_text(self, doc_id: str, tenant: str, start: int, end: int | None) -> dict:
        """A window of a document's extracted text with its pages (rag_service/docview.py)."""
        ...
