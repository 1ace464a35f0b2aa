"""Tokenizers: byte-level with RAG specials (dsa-tiny) and HF tokenizer.json (real checkpoints).

    .venv/bin/python -m pytest tests/model/test_tokenizer.py -q
"""

import json

from dsa_rag.model.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDecoder, load_tokenizer


def test_byte_roundtrip_and_prompt_layout():
    tok = ByteTokenizer()
    text = "Zürich — 東京 🚀"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.prompt_ids([("a.txt", "x"), ("b.md", "y")], "q?")
    assert ids[0] == tok.bos_id and ids[-1] == tok.special("<answer>")
    assert ids.count(tok.special("<doc>")) == 2 and ids.count(tok.special("</doc>")) == 2
    assert tok.prompt_ids([("a.txt", "x")]) == ids[: len(tok.prompt_ids([("a.txt", "x")]))]  # prefix property
    assert tok.decode(ids, skip_special=False).startswith("<bos><doc>a.txt\nx</doc>")
    assert max(ids) < tok.vocab_size == 264


def test_incremental_decoder_never_splits_characters():
    tok = ByteTokenizer()
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode("a東🚀b")]
    assert "".join(pieces) + dec.flush() == "a東🚀b"
    assert all("\ufffd" not in p for p in pieces)


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<bos>": 0, "<eos>": 1, "[UNK]": 2, "Question": 3, ":": 4, "hello": 5, "world": 6, "Answer": 7}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1]}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 1
    assert tok.encode("hello world") == [5, 6]
    assert tok.question_ids("hello") == [3, 4, 5, 7, 4]


def test_load_tokenizer_byte_spec(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(ByteTokenizer().to_json()))
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)


def test_glm_tokenizer_without_bos_in_config(tmp_path):
    """GLM-5's config.json names no bos_token_id and an eos_token_id list: the prompt opens with
    tokenizer_config's bos_token if any, else GLM's [gMASK]; eos is the list's first id."""
    import json

    from dsa_rag.model.tokenizer import load_tokenizer
    from tests.service.real_checkpoint import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens(["[gMASK]", "<sop>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm_moe_dsa", "eos_token_id": [1, 2]}))
    t = load_tokenizer(tmp_path)
    assert t.bos_id == tok.token_to_id("[gMASK]") and t.eos_id == 1
    assert t.prompt_ids([("a.txt", "x")], "q")[0] == t.bos_id
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<sop>"}}))
    assert load_tokenizer(tmp_path).bos_id == tok.token_to_id("<sop>")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    assert load_tokenizer(tmp_path).bos_id == 0  # the config's own wins
