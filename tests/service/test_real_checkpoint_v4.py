"""The service on a DeepSeek-V4-layout checkpoint, end to end on CPU: `dsa-rag serve --model DIR
--no-ray` (bf16 through DSA_RAG_DTYPE) as a subprocess over a tiny random V4 checkpoint
(transformers' layout, FP8 e4m3 + weight_scale_inv projections, its own tokenizer.json), then
upload a PDF -> ask -> ask again (the prefix from the replica's memory, cached_tokens > 0) ->
restart -> ask (the prefix restored from the KV store, the same answer). The prefix cache in the
KV store is V4's: windows, compressed pools and compressor state, in bf16.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/service/test_real_checkpoint_v4.py
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors import safe_open

import tests.service.test_real_checkpoint as trc
from dsa_rag.model.v4.load import save_v4_checkpoint
from dsa_rag.rag_service.client import DSARagClient
from tests.model.v4_helpers import random_v4, tiny_v4_config
from tests.rag_service.pdfs import make_pdf
from tests.service.real_checkpoint import build_tokenizer, tokenizer_config


def write_v4_checkpoint(d):
    tok = build_tokenizer()
    cfg = tiny_v4_config(vocab_size=tok.get_vocab_size(), max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                         index_topk=8)
    save_v4_checkpoint(random_v4(cfg, seed=0), d, fp8_weights=True, block=128)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), ensure_ascii=False))
    c = json.loads((d / "config.json").read_text())
    c["torch_dtype"] = "bfloat16"
    (d / "config.json").write_text(json.dumps(c))
    return d


def ask(c: DSARagClient) -> dict:
    """trc.ask's checks, with abstention off: random weights never write a supported answer, and
    an abstained answer carries no citations; the citations are what this test looks at."""
    a = c.ask(trc.QUESTION, max_tokens=trc.MAX_TOKENS, abstain=False)
    assert isinstance(a["answer"], str) and not a["abstained"]
    u = a["usage"]
    assert u["prompt_tokens"] > 64 and 1 <= u["completion_tokens"] <= trc.MAX_TOKENS * len(a["packs"])
    assert a["citations"], a
    for ct in a["citations"]:
        assert ct["name"] == "report.pdf" and ct["page"] in (1, 2)
        assert 0 <= ct["char_start"] < ct["char_end"] and ct["snippet"]
    return a


@pytest.mark.slow
def test_serve_v4_checkpoint_end_to_end(tmp_path, monkeypatch):
    ckpt = write_v4_checkpoint(tmp_path / "v4-tiny")
    # The shared Server helper takes its numerics from env vars with env_numerics=True: bf16, and
    # no fp8_numerics (a V3.2 option that a V4 checkpoint refuses).
    monkeypatch.setattr(trc, "SERVE_ENV", {"DSA_RAG_DTYPE": "bfloat16"})
    data_dir = tmp_path / "data"
    server = trc.Server(ckpt, data_dir, tmp_path / "serve.log", env_numerics=True)
    try:
        with DSARagClient(server.url, timeout=300, max_retries=0) as c:
            up = c.upload([("report.pdf", make_pdf(trc.PAGES))])
            assert up["data"][0]["ok"], up
            first = ask(c)
            assert first["packs"][0]["cache"] in ("prefill", "memory")
            entries = trc.kv_entries(data_dir)
            assert len(entries) == 1, entries
            with safe_open(str(entries[0]), framework="pt") as f:
                assert f.metadata()["format"] == "dsa-v4-snapshot/1"
                keys = set(f.keys())
                assert f.get_tensor("layer.1.compressor.entries").dtype == torch.bfloat16
                assert {"layer.0.window", "layer.1.indexer.entries", "layer.1.compressor.overlap_kv"} <= keys
            again = trc.ask_again_from_memory(c, first, ask)
    finally:
        rc = server.stop()
    assert rc in (0, -signal.SIGTERM), server.output()[-4000:]

    # Restarted on the same data dir: the pack's V4 cache is restored from the KV store (the
    # engine's fingerprint keys it), not prefilled, and answers the same.
    server = trc.Server(ckpt, data_dir, tmp_path / "serve-2.log", env_numerics=True)
    try:
        with DSARagClient(server.url, timeout=300, max_retries=0) as c:
            restored = ask(c)
            assert restored["packs"][0]["cache"] == "store", restored["packs"]
            assert restored["usage"]["cached_tokens"] == again["usage"]["cached_tokens"] > 0
            assert restored["answer"] == again["answer"]
    finally:
        rc = server.stop()
    assert rc in (0, -signal.SIGTERM), server.output()[-4000:]
