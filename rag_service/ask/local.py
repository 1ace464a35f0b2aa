"""`LocalBackend`: the `Backend` (ask/backend.py) with the pipeline and one `PackWorker` in this
process; blocking work runs in threads (the engine in its own), never on the event loop. What
`dsa-rag serve --no-ray`, the tests, the benchmarks and notebooks use.

    from dsa_rag.rag_service.ask.fanout import ask_sync
    from dsa_rag.rag_service.ask.local import LocalBackend
    from dsa_rag.rag_service.ask.params import AskParams
    from dsa_rag.rag_service.serve.settings import ServeSettings
    backend = LocalBackend(ServeSettings(data_dir="/tmp/rag"))     # loads pipeline + model in start()
    out = ask_sync(backend, AskParams.of("What was the revenue?", max_tokens=32))
    # or, with objects you already have (their settings are the pipeline's):
    backend = LocalBackend(rag=rag, worker=PackWorker.from_settings(rag, settings))

The serving app over it: `create_app(LocalBackend(settings))` (rag_service/serve/app.py).
Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_ask_path.py tests/service/test_api.py`.
"""

from __future__ import annotations

import asyncio

from dsa_rag.rag_service.ask.cachestate import pack_states
from dsa_rag.rag_service.ask.params import AskParams
from dsa_rag.rag_service.ask.worker import PackWorker
from dsa_rag.rag_service.docview import text_window
from dsa_rag.rag_service.pipeline import RagPipeline
from dsa_rag.rag_service.settings import RagSettings


class LocalBackend:
    """Pipeline + PackWorker in this process. What is not given loads in `start()` (the app's
    lifespan, or `ask_sync`) from `settings` (a ServeSettings: model, dtype, fp8_numerics,
    warm_packs_per_replica, citations_per_pack, max_new_tokens, torch_threads) and is closed by
    `close()`."""

    def __init__(self, settings: RagSettings | None = None, *, rag: RagPipeline | None = None,
                 worker: PackWorker | None = None):
        if settings is None:
            if rag is None:
                raise ValueError("LocalBackend needs settings, or a pipeline to take them from")
            settings = rag.settings
        self.settings = settings
        self.rag, self.worker = rag, worker
        self._own, self._own_worker = rag is None, worker is None
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._start_lock:
            if self.rag is None:
                self.rag = await asyncio.to_thread(RagPipeline, self.settings)
            if self.worker is None:
                self.worker = await asyncio.to_thread(PackWorker.from_settings, self.rag, self.settings)


    async def close(self) -> None:
        if self._own_worker and self.worker is not None:
            self.worker.close()
            self.worker = None
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

    async def select(self, params: AskParams):
        return await asyncio.to_thread(self.rag.select_packs, params.question, params.document_ids, params.tenant)

    async def stream_pack(self, pack_id: str, params: AskParams):
        async for ev in self.worker.stream(pack_id, params):
            yield ev

    async def prefetch(self, pack_ids):
        for pid in pack_ids:
            await self.worker.warm(pid)

    async def pack_states(self, tenant):
        live = self.worker.cache_states()  # read on the loop: the worker's state lives here
        return await asyncio.to_thread(pack_states, self.rag, tenant, live)

    async def document_text(self, doc_id, tenant, start, end):
        return await asyncio.to_thread(text_window, self.rag, doc_id, tenant, start, end)

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
