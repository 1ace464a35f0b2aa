"""The RAG core end to end with the SHIPPED dsa-tiny weights and a real Redis: three documents
(one a 3-page PDF made here), a question whose answer sits on page 2 of the PDF -> the right
answer and a citation to that page; a second question over the same pack prefills only the
question (counters prove the hit); a new process on the same data directory finds the documents
and the cached prefix (restored from the store, no prefill).

The documents are written in the register dsa-tiny was trained on (model/training/data.py: filler from
its grammar, the fact in one of its templates); the value is a fresh random number, so the only
way to answer is to read it from the page. One fact in the pack, asked two ways: the shipped
model is reliable on a single needle (its model card: niah_single), not yet on several similar
facts (niah_multikey), so this test does not plant distractor facts.

Answers go through the service's one ask path (`ask_sync` over a `LocalBackend`).

    .venv/bin/python -m pytest -q tests/rag_service/test_answers_from_documents.py
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

from dsa_rag.model.engine.factory import load_engine
from dsa_rag.model.training import data
from dsa_rag.rag_service.ask.fanout import ask_sync
from dsa_rag.rag_service.ask.local import LocalBackend
from dsa_rag.rag_service.ask.params import AskParams
from dsa_rag.rag_service.ask.worker import PackWorker
from dsa_rag.rag_service.pipeline import RagPipeline
from tests.rag_service.pdfs import make_pdf

REPO = Path(__file__).resolve().parents[2]
ANSWER_PAGE = 2


def _prose(rng: random.Random, n_sentences: int) -> list[str]:
    return [data.filler_sentence(rng) for _ in range(n_sentences)]


def _corpus(seed: int = 11) -> tuple[list[tuple[str, bytes]], dict[str, tuple[str, str]]]:
    """-> (files, {label: (question, answer)}). The PDF is one sentence per line, as pypdf
    extracts a typeset page; the answer is only on page 2."""
    rng = random.Random(seed)
    code = str(rng.randint(1_000_000, 9_999_999))
    pages = [_prose(rng, 4), _prose(rng, 2) + [f"The access code of Project Lomiren is {code}."] + _prose(rng, 2),
             _prose(rng, 4)]
    pdf = make_pdf(["\n".join(p) for p in pages])
    notes = " ".join(_prose(rng, 7))
    minutes = "# Minutes\n\n" + " ".join(_prose(rng, 5))
    files = [("report.pdf", pdf), ("notes.txt", notes.encode()), ("minutes.md", minutes.encode())]
    questions = {"pdf": ("What is the access code of Project Lomiren?", code),
                 "again": ("What is Project Lomiren's access code?", code)}
    return files, questions


def test_answer_from_page_two_then_cache_hit_then_new_process(make_settings, tmp_path):
    settings = make_settings(max_context=4096)
    files, qs = _corpus()
    with RagPipeline(settings) as rag:
        docs = {r.document.name: r.document for r in rag.ingest_many(files)}
        assert set(docs) == {"report.pdf", "notes.txt", "minutes.md"} and docs["report.pdf"].pages == 3
        assert len(rag.list_packs()) == 1  # the three documents share one pack
        worker = PackWorker(rag, load_engine("dsa-tiny", device="cpu"))
        backend = LocalBackend(rag=rag, worker=worker)
        try:
            q, want = qs["pdf"]
            first = ask_sync(backend, AskParams.of(q, max_tokens=32))
            assert first["answer"] == want
            assert first["packs"][0]["cache"] == "prefill" and first["usage"]["cached_tokens"] == 0
            pdf_id = docs["report.pdf"].id
            cited = [(c.document_id, c.page) for c in first["citations"]]
            assert (pdf_id, ANSWER_PAGE) in cited, cited
            page2 = next(c for c in first["citations"] if (c.document_id, c.page) == (pdf_id, ANSWER_PAGE))
            assert want in rag.document_text(pdf_id)[page2.char_start - 200: page2.char_end + 200]

            q2, want2 = qs["again"]
            second = ask_sync(backend, AskParams.of(q2, max_tokens=32))
            assert second["answer"] == want2
            assert second["packs"][0]["cache"] == "memory"
            # only the question was prefilled: everything before it came from the cache
            assert second["usage"]["cached_tokens"] == second["usage"]["prompt_tokens"] - len(rag.tok.question_ids(q2))
            assert worker.counters["prefill"] == 1 and worker.counters["memory"] == 1
            assert rag.kv.stats()["entries"] == 1
        finally:
            worker.close()

    # A new process on the same data directory and Redis: the documents are there and the pack's
    # prefix is restored from the KV store (no prefill).
    script = textwrap.dedent("""
        import json, sys
        from dsa_rag.model.engine.factory import load_engine
        from dsa_rag.rag_service.ask.fanout import ask_sync
        from dsa_rag.rag_service.ask.local import LocalBackend
        from dsa_rag.rag_service.ask.params import AskParams
        from dsa_rag.rag_service.ask.worker import PackWorker
        from dsa_rag.rag_service.pipeline import RagPipeline
        from dsa_rag.rag_service.settings import RagSettings
        settings = RagSettings.model_validate_json(sys.argv[1])
        with RagPipeline(settings) as rag:
            worker = PackWorker(rag, load_engine("dsa-tiny", device="cpu"))
            try:
                out = ask_sync(LocalBackend(rag=rag, worker=worker), AskParams.of(sys.argv[2], max_tokens=32))
                print(json.dumps({"docs": sorted(d.name for d in rag.list_documents()), "answer": out["answer"],
                                  "cache": out["packs"][0]["cache"], "usage": out["usage"],
                                  "counters": worker.counters}))
            finally:
                worker.close()
    """)
    proc = subprocess.run([sys.executable, "-c", script, settings.model_dump_json(), q], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["docs"] == ["minutes.md", "notes.txt", "report.pdf"]
    assert out["cache"] == "store" and out["counters"]["prefill"] == 0 and out["counters"]["store"] == 1
    assert out["usage"]["cached_tokens"] == out["usage"]["prompt_tokens"] - len(rag.tok.question_ids(q))
    assert out["answer"] == want
