"""The service on a real-layout checkpoint, the exact path a GPU user takes, run on CPU:
`dsa-rag serve --model DIR --dtype bfloat16 --fp8-numerics --no-ray` over a tiny random
DeepSeek-V3.2 checkpoint in the official FP8 layout with its own `tokenizer.json`
(tests/service/real_checkpoint.py), as a subprocess on a free port, then over HTTP:

  upload a PDF -> ask (200: answer, citations, usage; the prefix KV stored with bf16 latents and
  e4m3 indexer keys) -> ask again (prefix from the replica's memory, cached_tokens > 0) -> SIGTERM,
  start again on the same data dir -> ask (prefix restored from the KV store) -> OpenAI
  /v1/chat/completions (choices, usage.prompt_tokens_details.cached_tokens) -> a streamed ask that
  ends with `data: [DONE]`.

Random weights answer garbage; what is checked is the path (status codes, events, usage, cache
sources, citation shape), not the answer.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/service/test_real_checkpoint.py
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open

from dsa_rag.rag_service.client import DSARagClient, parse_sse
from tests.rag_service.pdfs import make_pdf
from tests.service.real_checkpoint import write_checkpoint

# The console script a user runs (`.venv/bin/dsa-rag`); the module where it is not installed.
_SCRIPT = Path(sys.executable).with_name("dsa-rag")
DSA_RAG = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dsa_rag.rag_service.cli"]
START_TIMEOUT_S = 120  # cold imports + checkpoint load on a loaded 2-core machine
MAX_TOKENS = 3
SERVE_FLAGS = ("--dtype", "bfloat16", "--fp8-numerics")  # the numerics a GPU user runs a V3.2 checkpoint in
SERVE_ENV = {"DSA_RAG_DTYPE": "bfloat16", "DSA_RAG_FP8_NUMERICS": "1"}  # the same, as settings env vars

PAGES = [
    "Warehouse report 2023\nThe access code of the Porto warehouse is 7351902.\n"
    "The manager of the Porto warehouse is Ana Silva.\nDeliveries arrive on Tuesdays.",
    "The Lisbon office opens at nine and closes at five.\n"
    "Revenue in 2023 was 41 million euros, up from 37 million in 2022.\n"
    "Returns are handled on Fridays by the logistics team.",
]
QUESTION = "What is the access code of the Porto warehouse?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("dsa-v32-tiny"))


def test_fixture_is_the_official_layout(checkpoint):
    """What the server is given is what DeepSeek ships: sharded HF names, e4m3 linears with
    float32 128x128-block scale_inv (ragged blocks where a dim is no multiple of 128), bf16
    embed/head/router/weights_proj, the MTP layer, and a tokenizer.json sized to the vocab."""
    from tokenizers import Tokenizer

    cfg = json.loads((checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v32" and cfg["torch_dtype"] == "bfloat16"
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 3
    tensors = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(checkpoint / shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(tensors) == set(index)
    n = cfg["num_hidden_layers"]
    qb = tensors["model.layers.1.self_attn.q_b_proj.weight"]  # 8 heads x 24 = 192 rows: two row blocks
    assert qb.dtype == torch.float8_e4m3fn and qb.shape == (192, cfg["q_lora_rank"])
    s = tensors["model.layers.1.self_attn.q_b_proj.weight_scale_inv"]
    assert s.dtype == torch.float32 and s.shape == (2, 1)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # ue8m0: powers of two
    assert tensors["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (1, 2)  # 64 x 160
    assert tensors["model.layers.1.mlp.experts.7.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.self_attn.indexer.wk.weight"].dtype == torch.float8_e4m3fn
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.self_attn.indexer.weights_proj.weight"):
        assert tensors[name].dtype == torch.bfloat16, name
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.layers.0.self_attn.indexer.k_norm.bias"].dtype == torch.float32
    assert f"model.layers.{n}.eh_proj.weight" in tensors  # MTP layer, skipped by the loader
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    assert tok.get_vocab_size() == cfg["vocab_size"] == tensors["lm_head.weight"].shape[0]
    assert tok.id_to_token(cfg["bos_token_id"]) == "<｜begin▁of▁sentence｜>"
    assert tok.id_to_token(cfg["eos_token_id"]) == "<｜end▁of▁sentence｜>"


class Server:
    """`dsa-rag serve --model DIR --dtype bfloat16 --fp8-numerics --no-ray --port 0` as a
    subprocess (output to a log file, so a chatty server never blocks on a pipe). env_numerics:
    the dtype and fp8_numerics come from DSA_RAG_DTYPE / DSA_RAG_FP8_NUMERICS instead of flags."""

    def __init__(self, model: Path, data_dir: Path, log: Path, env_numerics: bool = False):
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSA_RAG_") and k != "REDIS_URL"}
        env.update(DSA_RAG_TORCH_THREADS="1", DSA_RAG_PARSE_WORKERS="1", DSA_RAG_MAX_CONTEXT="1024",
                   DSA_RAG_PACK_RESERVE_TOKENS="128", DSA_RAG_PACK_OVERLAP="64", DSA_RAG_CHUNK_TOKENS="64",
                   DSA_RAG_CHUNK_OVERLAP="8", DSA_RAG_DEFAULT_MAX_TOKENS=str(MAX_TOKENS),
                   DSA_RAG_MAX_NEW_TOKENS="16", **(SERVE_ENV if env_numerics else {}),
                   # random weights never answer from the documents: abstention would hide the
                   # citations these tests check the shape of
                   DSA_RAG_ABSTAIN_THRESHOLD="0")
        self._out = open(log, "w")
        flags = () if env_numerics else SERVE_FLAGS
        self.proc = subprocess.Popen(
            [*DSA_RAG, "serve", "--model", str(model), *flags, "--no-ray", "--port", "0", "--data-dir", str(data_dir)],
            env=env, stdout=self._out, stderr=subprocess.STDOUT, text=True)
        try:
            self.url = self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def _wait_ready(self) -> str:
        deadline = time.time() + START_TIMEOUT_S
        url = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"dsa-rag serve exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            if url is None:
                m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", self.output())
                url = m.group(1) if m else None
            if url is not None:
                try:
                    r = httpx.get(f"{url}/readyz", timeout=10)
                    if r.status_code == 200 and r.json()["status"] == "ok":
                        return url
                except httpx.HTTPError:
                    pass
            time.sleep(0.25)
        pytest.fail(f"dsa-rag serve not ready after {START_TIMEOUT_S}s:\n{self.output()[-4000:]}")

    def stop(self) -> int | None:
        """SIGTERM (graceful: uvicorn shuts the app down, the embedded Redis stops), then kill.
        -> the exit status (uvicorn re-raises the SIGTERM it handled: -15 after a clean stop)."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            return self.proc.returncode
        finally:
            self._out.close()


def ask(c: DSARagClient) -> dict:
    a = c.ask(QUESTION, max_tokens=MAX_TOKENS)
    assert isinstance(a["answer"], str)
    assert a["packs"] and a["pack_id"] == a["packs"][0]["pack_id"]
    u = a["usage"]
    # more prompt tokens than the config's index_topk (64): the FP8 indexer's top-k selects keys
    assert u["prompt_tokens"] > 64 and 1 <= u["completion_tokens"] <= MAX_TOKENS * len(a["packs"])
    assert a["citations"], a
    for ct in a["citations"]:
        assert ct["name"] == "report.pdf" and ct["page"] in (1, 2)
        assert 0 <= ct["char_start"] < ct["char_end"] and ct["snippet"]
    return a


def ask_again_from_memory(c: DSARagClient, first: dict, ask_fn=ask) -> dict:
    """The question of `first` again: its pack's prefix comes from the replica's memory and every
    prompt token but the question's is cached."""
    again = ask_fn(c)
    assert again["packs"][0]["cache"] == "memory"
    assert again["usage"]["cached_tokens"] > 0
    assert again["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]
    return again


def kv_entries(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "kv").rglob("*.safetensors"))


@pytest.mark.slow
def test_serve_official_fp8_checkpoint_in_bf16_end_to_end(checkpoint, tmp_path):
    data_dir = tmp_path / "data"
    server = Server(checkpoint, data_dir, tmp_path / "serve-1.log")
    try:
        with DSARagClient(server.url, timeout=120, max_retries=0) as c:
            up = c.upload([("report.pdf", make_pdf(PAGES))])
            assert up["data"][0]["ok"], up
            doc = up["data"][0]["document"]
            assert doc["pages"] == 2 and doc["tokens"] > 0

            first = ask(c)
            assert first["packs"][0]["cache"] in ("prefill", "memory")  # memory: warmed at upload
            # The prefix KV went to the store with the numerics asked for: bf16 latents, e4m3
            # indexer keys (fp8_numerics) and their scales.
            entries = kv_entries(data_dir)
            assert len(entries) == 1, entries
            with safe_open(str(entries[0]), framework="pt") as f:
                meta = f.metadata()
                assert meta["kv_dtype"] == "torch.bfloat16" and meta["index_dtype"] == "torch.float8_e4m3fn"
                assert f.get_tensor("layer.0.kv").dtype == torch.bfloat16
                assert f.get_tensor("layer.1.index_k").dtype == torch.float8_e4m3fn
                assert "layer.1.index_scale" in f.keys()

            again = ask_again_from_memory(c, first)
    finally:
        rc = server.stop()
    assert rc in (0, -signal.SIGTERM), server.output()[-4000:]  # uvicorn re-raises SIGTERM after a clean shutdown

    # Restarted with the env equivalents of the flags: the same engine (its fingerprint keys the
    # store), so the prefix is restored, not prefilled.
    server = Server(checkpoint, data_dir, tmp_path / "serve-2.log", env_numerics=True)
    try:
        with DSARagClient(server.url, timeout=120, max_retries=0) as c:
            assert [d["id"] for d in c.list_documents()] == [doc["id"]]  # Redis metadata survived
            restored = ask(c)
            assert restored["packs"][0]["cache"] == "store", restored["packs"]
            assert restored["usage"]["cached_tokens"] == again["usage"]["cached_tokens"] > 0
            assert len(kv_entries(data_dir)) == 1

            model_id = c.models()[0]["id"]
            chat = c.chat_completions({"model": model_id, "max_tokens": MAX_TOKENS,
                                       "messages": [{"role": "user", "content": QUESTION}]})
            assert chat["object"] == "chat.completion" and chat["model"] == model_id
            choice = chat["choices"][0]
            assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
            assert choice["finish_reason"] in ("stop", "length")
            u = chat["usage"]
            assert u["prompt_tokens_details"]["cached_tokens"] > 0
            assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] >= 1

            r = httpx.post(f"{server.url}/v1/ask", json={"question": QUESTION, "max_tokens": MAX_TOKENS,
                                                         "stream": True}, timeout=120)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = parse_sse(r.content)
            assert events[-1] == "[DONE]", events[-3:]
            kinds = [e["type"] for e in events[:-1]]
            assert "token" in kinds and kinds[-1] == "citations", kinds
            final = events[-2]
            assert final["usage"]["cached_tokens"] > 0 and final["citations"]
            assert final["packs"][0]["cache"] == "memory"
    finally:
        rc = server.stop()
    assert rc in (0, -signal.SIGTERM), server.output()[-4000:]  # uvicorn re-raises SIGTERM after a clean shutdown
