"""`dsa-rag serve --no-ray` as a user starts it: a subprocess that prints its URL and answers
on it; the parser knows every command. (Ray-mode serve and the client commands are exercised in
test_ray.py against the two-node service.)

    .venv/bin/python -m pytest -q tests/service/test_cli.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from dsa_rag.rag_service.cli import build_parser


def test_parser_has_every_command():
    p = build_parser()
    for argv in (["serve", "--config", "deploy/serve.yaml"], ["serve", "--no-ray", "--port", "0"],
                 ["ingest", "a.pdf", "docs/"], ["ask", "why?", "--max-tokens", "5"], ["status"]):
        assert p.parse_args(argv).command == argv[0]


def test_serve_no_ray_prints_its_url_and_serves(tmp_path, redis_url):
    env = dict(os.environ, DSA_RAG_REDIS_URL=redis_url, DSA_RAG_REDIS_PREFIX="cli" + str(os.getpid()),
               DSA_RAG_TORCH_THREADS="1", DSA_RAG_MAX_CONTEXT="2048", DSA_RAG_PACK_RESERVE_TOKENS="64",
               DSA_RAG_PACK_OVERLAP="64")
    proc = subprocess.Popen([sys.executable, "-m", "dsa_rag.rag_service.cli", "serve", "--no-ray", "--port", "0",
                             "--data-dir", str(tmp_path / "data")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline, seen = None, time.time() + 120, []
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"serve exited: {''.join(seen)}")
            seen.append(line)
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert url, "".join(seen)
        assert httpx.get(f"{url}/readyz", timeout=30).json()["status"] == "ok"
        r = httpx.post(f"{url}/v1/documents", files=[("files", ("a.md", b"# A\n\nalpha beta gamma " * 20))], timeout=60)
        assert r.status_code == 200
        a = httpx.post(f"{url}/v1/ask", json={"question": "alpha?", "max_tokens": 2}, timeout=60).json()
        assert a["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
