"""The service on a GLM-5-layout checkpoint (`glm_moe_dsa`, a "shared" indexer layer that ships no
indexer tensors, FP8 release layout, its own tokenizer.json, an eos_token_id list), end to end on
CPU: `dsa-rag serve --model DIR --dtype bfloat16 --fp8-numerics --no-ray` as a subprocess, then
upload a PDF -> ask -> ask again (prefix from memory, cached_tokens > 0). The prefix KV in the
store holds indexer keys only for the full layers.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/service/test_real_checkpoint_glm5.py
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors import safe_open

from dsa_rag.rag_service.client import DSARagClient
from tests.rag_service.pdfs import make_pdf
from tests.service.real_checkpoint import write_checkpoint
from tests.service.test_real_checkpoint import PAGES, Server, ask, ask_again_from_memory, kv_entries


@pytest.mark.slow
def test_serve_glm5_checkpoint_end_to_end(tmp_path):
    ckpt = write_checkpoint(tmp_path / "glm5-tiny", family="glm_moe_dsa")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "glm_moe_dsa" and cfg["indexer_types"] == ["full", "shared", "full"]
    data_dir = tmp_path / "data"
    server = Server(ckpt, data_dir, tmp_path / "serve.log")
    try:
        with DSARagClient(server.url, timeout=120, max_retries=0) as c:
            assert c.models()[0]["id"]
            up = c.upload([("report.pdf", make_pdf(PAGES))])
            assert up["data"][0]["ok"], up
            first = ask(c)
            assert first["packs"][0]["cache"] in ("prefill", "memory")
            entries = kv_entries(data_dir)
            assert len(entries) == 1, entries
            with safe_open(str(entries[0]), framework="pt") as f:
                keys = set(f.keys())
                assert f.get_tensor("layer.1.kv").dtype == torch.bfloat16
            # the shared layer caches its latent kv only; the full layers their FP8 indexer keys too
            assert "layer.1.index_k" not in keys and "layer.1.kv" in keys
            assert {"layer.0.index_k", "layer.2.index_k", "layer.2.index_scale"} <= keys

            ask_again_from_memory(c, first)
    finally:
        rc = server.stop()
    assert rc in (0, -signal.SIGTERM), server.output()[-4000:]
