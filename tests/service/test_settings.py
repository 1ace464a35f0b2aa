"""ServeSettings: a checkpoint directory given as the model also selects its tokenizer.

    .venv/bin/python -m pytest -q tests/service/test_settings.py
"""

import json

from dsa_rag.rag_service.serve.settings import ServeSettings


def test_checkpoint_dir_brings_its_tokenizer(tmp_path, monkeypatch):
    monkeypatch.delenv("DSA_RAG_TOKENIZER_DIR", raising=False)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert ServeSettings(model=str(ckpt)).tokenizer_dir is None  # no tokenizer files: byte tokenizer
    (ckpt / "tokenizer.json").write_text(json.dumps({}))
    assert ServeSettings(model=str(ckpt)).tokenizer_dir == ckpt
    other = tmp_path / "other"
    assert ServeSettings(model=str(ckpt), tokenizer_dir=other).tokenizer_dir == other  # explicit wins
    assert ServeSettings(model="dsa-tiny").tokenizer_dir is None


def test_dtype_and_fp8_numerics_settings(monkeypatch):
    """DSA_RAG_DTYPE / DSA_RAG_FP8_NUMERICS parse; bad values are refused naming the choices;
    `auto` resolves to the checkpoint's dtype on CUDA and to float32 on CPU."""
    import pytest
    import torch
    from pydantic import ValidationError

    from dsa_rag.model.engine.factory import resolve_dtype

    for k in ("DSA_RAG_DTYPE", "DSA_RAG_FP8_NUMERICS"):
        monkeypatch.delenv(k, raising=False)
    s = ServeSettings()
    assert s.dtype == "auto" and s.fp8_numerics is None
    monkeypatch.setenv("DSA_RAG_DTYPE", "bfloat16")
    monkeypatch.setenv("DSA_RAG_FP8_NUMERICS", "true")
    s = ServeSettings()
    assert s.dtype == "bfloat16" and s.fp8_numerics is True
    monkeypatch.setenv("DSA_RAG_FP8_NUMERICS", "0")
    assert ServeSettings().fp8_numerics is False
    monkeypatch.setenv("DSA_RAG_FP8_NUMERICS", "")
    assert ServeSettings().fp8_numerics is None
    monkeypatch.setenv("DSA_RAG_DTYPE", "bf16")
    with pytest.raises(ValidationError, match=r"dtype[\s\S]*'auto', 'float32', 'bfloat16' or 'float16'"):
        ServeSettings()
    monkeypatch.setenv("DSA_RAG_DTYPE", "float16")
    monkeypatch.setenv("DSA_RAG_FP8_NUMERICS", "sometimes")
    with pytest.raises(ValidationError, match="fp8_numerics"):
        ServeSettings()
    assert ServeSettings(fp8_numerics=None).dtype == "float16"
    assert resolve_dtype(ServeSettings(dtype="auto", fp8_numerics=None).dtype, "dsa-tiny", "cpu") == torch.float32
    assert resolve_dtype("auto", "deepseek-v3.2", "cpu") == torch.float32
    assert resolve_dtype("auto", "deepseek-v3.2", "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16", "dsa-tiny", "cpu") == torch.bfloat16


def test_cli_serve_dtype_flags(monkeypatch, tmp_path):
    from dsa_rag.rag_service.cli import _settings, build_parser

    for k in ("DSA_RAG_DTYPE", "DSA_RAG_FP8_NUMERICS"):
        monkeypatch.delenv(k, raising=False)
    p = build_parser()
    s = _settings(p.parse_args(["serve", "--dtype", "bfloat16", "--fp8-numerics", "--data-dir", str(tmp_path)]))
    assert s.dtype == "bfloat16" and s.fp8_numerics is True
    s = _settings(p.parse_args(["serve", "--no-fp8-numerics", "--data-dir", str(tmp_path)]))
    assert s.dtype == "auto" and s.fp8_numerics is False
    s = _settings(p.parse_args(["serve", "--data-dir", str(tmp_path)]))
    assert s.fp8_numerics is None


def test_index_every_setting(monkeypatch):
    """DSA_RAG_INDEX_EVERY / --index-every: unset = the checkpoint's plan; N >= 1 reaches the engine."""
    import pytest
    from pydantic import ValidationError

    from dsa_rag.model.engine.factory import load_engine

    monkeypatch.delenv("DSA_RAG_INDEX_EVERY", raising=False)
    assert ServeSettings().index_every is None
    monkeypatch.setenv("DSA_RAG_INDEX_EVERY", "2")
    s = ServeSettings()
    assert s.index_every == 2
    with pytest.raises(ValidationError, match="index_every"):
        ServeSettings(index_every=0)
    eng = load_engine("dsa-tiny", device="cpu", index_every=s.index_every)
    try:
        assert eng.engine.model.cfg.indexer_types == ["full", "shared", "full", "shared"]
    finally:
        eng.close()
