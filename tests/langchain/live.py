"""One live service for the LangChain tests: the real FastAPI app over an in-process backend
(pipeline + the default `dsa-tiny` engine + the embedded Redis the service starts itself),
served by uvicorn in a thread on 127.0.0.1 and a free port, with a PDF and a Markdown file
uploaded through the service client. Started once per test session (fixture `live_service` in
conftest.py).

    .venv/bin/python -m pytest -q tests/langchain
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

# Small packs and short answers: the tests check structure, streaming, usage, metadata and
# citations, never the (untrained tiny model's) answer text.
SETTINGS = dict(max_context=1024, pack_reserve_tokens=0, pack_overlap=64, chunk_tokens=64, chunk_overlap=8,
                pack_seal_free_tokens=16, parse_timeout_s=20, default_max_tokens=8, max_new_tokens=32,
                torch_threads=1, redis_appendfsync="everysec",
                abstain_threshold=0.0)  # prose the tiny model cannot answer: never "Not in the documents."
MAX_TOKENS = 8  # what the LangChain objects ask for in the tests

TREATY = ("# The Treaty of Rome\n\nThe treaty was signed in Rome in 1957 by six countries. "
          "It created the European Economic Community.\n\n") * 4
PDF_PAGES = ["The annual report: revenue grew to 12 million euros in 2023.",
             "Page two: the Paris office opened in March and employs forty people."]


@dataclass
class LiveService:
    base_url: str = "http://127.0.0.1:9"  # unit tests never connect
    documents: dict[str, str] = field(default_factory=dict)  # name -> id
    started: bool = False


LIVE = LiveService()  # the standard-test classes read it from their (fixture-less) properties


def start(data_dir) -> tuple[LiveService, callable]:
    from dsa_rag.rag_service.ask.local import LocalBackend
    from dsa_rag.rag_service.client import DSARagAPIError, DSARagClient
    from dsa_rag.rag_service.serve.app import create_app
    from dsa_rag.rag_service.serve.settings import ServeSettings
    from tests.net import live_server
    from tests.rag_service.pdfs import make_pdf

    settings = ServeSettings(data_dir=data_dir, host="127.0.0.1", **SETTINGS)
    running = ExitStack()  # the server runs until stop() closes it, across the whole test session
    base = running.enter_context(live_server(create_app(LocalBackend(settings)), start_timeout_s=120,
                                             name="live service"))
    stop = running.close
    files = [("report.pdf", make_pdf(PDF_PAGES), "application/pdf"), ("treaty.md", TREATY.encode(), "text/markdown")]
    try:
        with DSARagClient(base, api_key="", timeout=120) as c:
            uploaded = c.upload(files)
    except DSARagAPIError as e:
        stop()
        raise RuntimeError(f"upload to the live service failed: {e}") from e
    LIVE.base_url = base
    LIVE.documents = {d["name"]: d["document"]["id"] for d in uploaded["data"]}
    LIVE.started = True
    return LIVE, stop
