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
