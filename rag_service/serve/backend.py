"""What the HTTP routes call: a `Backend` (documents, pack selection, per-pack answer streams,
health) with two implementations behind one interface:

- `InProcessBackend`: the pipeline and one `PackWorker` in this process (fast tests,
  `dsa-rag serve --no-ray`); blocking work runs in threads (the engine in its own), never on
  the event loop;
- `RayBackend` (rag_service/serve/deployments.py): the same calls through Ray Serve handles.

    backend = InProcessBackend(ServeSettings(data_dir="/tmp/rag"))
    app = create_app(backend)          # rag_service/serve/app.py

Tests: `.venv/bin/python -m pytest -q tests/service`.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Protocol

from dsa_rag.rag_service.schemas import DocumentInfo, IngestResult, PackSelection
from dsa_rag.rag_service.serve.settings import ServeSettings


class Backend(Protocol):
    settings: ServeSettings

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ingest(self, files: list[tuple[str, bytes]], tenant: str) -> list[IngestResult]: ...
    async def list_documents(self, tenant: str) -> list[DocumentInfo]: ...
    async def get_document(self, doc_id: str, tenant: str) -> DocumentInfo: ...
    async def delete_document(self, doc_id: str, tenant: str) -> dict: ...
    async def select(self, question: str, document_ids: list[str] | None, tenant: str) -> list[PackSelection]: ...
    def stream_pack(self, pack_id: str, question: str, max_tokens: int, temperature: float,
                    seed: int | None, stop: list[str] | None = None, top_p: float = 1.0) -> AsyncIterator[dict]: ...
    async def health(self) -> dict[str, str]: ...
    async def ready(self) -> dict[str, str]: ...
    async def replicas(self) -> int: ...
    async def prefetch(self, pack_ids: list[str]) -> None: ...


class InProcessBackend:
    """Pipeline + PackWorker in this process. Heavy objects load in `start()` (app lifespan)."""

    def __init__(self, settings: ServeSettings, *, rag=None, worker=None):
        self.settings = settings
        self.rag, self.worker = rag, worker
        self._own, self._own_worker = rag is None, worker is None
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._start_lock:
            if self.rag is None:
                from dsa_rag.rag_service.pipeline import RagPipeline

                self.rag = await asyncio.to_thread(RagPipeline, self.settings)
            if self.worker is None:
                await asyncio.to_thread(self._load_worker)

    def _load_worker(self) -> None:
        import torch

        from dsa_rag.rag_service.ask.worker import PackWorker, make_engine

        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self.worker = PackWorker(self.rag, make_engine(s.model, tokenizer=self.rag.tok), replica_id="local",
                                 warm_packs=s.warm_packs_per_replica, citations=s.citations_per_pack,
                                 max_new_tokens=s.max_new_tokens)

    async def close(self) -> None:
        if self._own_worker and self.worker is not None:
            self.worker.close()
        if self._own and self.rag is not None:
            await asyncio.to_thread(self.rag.close)
            self.rag = None

    async def ingest(self, files, tenant):
        return await asyncio.to_thread(self.rag.ingest_many, files, tenant)

    async def list_documents(self, tenant):
        return await asyncio.to_thread(self.rag.list_documents, tenant)

    async def get_document(self, doc_id, tenant):
        return await asyncio.to_thread(self.rag.get_document, doc_id, tenant)

    async def delete_document(self, doc_id, tenant):
        return await asyncio.to_thread(self.rag.delete_document, doc_id, tenant)

    async def select(self, question, document_ids, tenant):
        return await asyncio.to_thread(self.rag.select_packs, question, document_ids, tenant)

    async def stream_pack(self, pack_id, question, max_tokens, temperature, seed, stop=None, top_p=1.0):
        async for ev in self.worker.stream(pack_id, question, max_tokens, temperature, seed, stop, top_p):
            yield ev

    async def prefetch(self, pack_ids):
        for pid in pack_ids:
            await self.worker.warm(pid)

    async def health(self):
        return {"process": "ok"}

    async def ready(self):
        checks = {}
        try:
            await asyncio.to_thread(self.rag.r.ping)
            checks["redis"] = "ok"
        except Exception as e:  # noqa: BLE001 - reported, not raised
            checks["redis"] = f"error: {e}"
        checks["model"] = "ok" if self.worker is not None else "loading"
        return checks

    async def replicas(self):
        return 1 if self.worker is not None else 0
