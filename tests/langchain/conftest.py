"""Fixtures of the LangChain tests: one live service per session (live.py).

    .venv/bin/python -m pytest -q tests/langchain
"""

from __future__ import annotations

import pytest

from tests.langchain import live


@pytest.fixture(scope="session")
def live_service(tmp_path_factory):
    service, stop = live.start(tmp_path_factory.mktemp("langchain-live"))
    yield service
    stop()
