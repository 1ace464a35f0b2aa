"""Start the real service (`python -m dsa_rag.rag_service.cli serve --no-ray`) on loopback for the
hardening benchmarks (fuzz_api.py, load_test.py): small-context dsa-tiny, API keys on,
embedded Redis under a temp data dir. Not a benchmark itself.

    from benchmarks.service_proc import Service
    with Service(keys={"bench-key-0001": "tenantA"}) as svc:
        httpx.get(svc.url + "/readyz")
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"MAX_CONTEXT": "2048", "PACK_RESERVE_TOKENS": "64", "PACK_OVERLAP": "128", "CHUNK_TOKENS": "64",
         "CHUNK_OVERLAP": "8", "PACK_SEAL_FREE_TOKENS": "16", "DEFAULT_MAX_TOKENS": "4", "MAX_NEW_TOKENS": "16",
         "TORCH_THREADS": "1", "PARSE_TIMEOUT_S": "10"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, keys: dict[str, str], **env):
        self.keys, self.extra = keys, {k.upper(): str(v) for k, v in env.items()}
        self.tmp = tempfile.TemporaryDirectory(prefix="dsa-rag-bench-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Service":
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSA_RAG_") and k != "REDIS_URL"}
        env.update({f"DSA_RAG_{k}": v for k, v in {**SMALL, **self.extra}.items()})
        env["DSA_RAG_API_KEYS"] = ",".join(f"{k}:{t}" for k, t in self.keys.items())
        env["PYTHONPATH"] = str(ROOT)
        self.log = open(Path(self.tmp.name) / "server.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "dsa_rag.rag_service.cli", "serve", "--no-ray", "--port",
                                      str(self.port), "--data-dir", str(Path(self.tmp.name) / "data")],
                                     env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited: {(Path(self.tmp.name) / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("service did not become ready")

    def server_log(self) -> str:
        return (Path(self.tmp.name) / "server.log").read_text()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        self.tmp.cleanup()
