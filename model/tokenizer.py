"""Tokenizers: a byte-level tokenizer with RAG special tokens for dsa-tiny, and a thin wrapper
over HF `tokenizers` (tokenizer.json) for real DeepSeek-V3.2 checkpoints.

Both expose the same small interface the engine and the service use:
    encode(text) -> list[int]        decode(ids) -> str
    bos_id, eos_id, pad_id           special(name) -> int   (document / question / answer markers)
    prompt_ids(documents, question)  (the one prompt format the service and the training data share)
    doc_head(name), doc_tail()       a document's marker ids around its text: a prompt is
                                     [bos] + (doc_head + encode(text) + doc_tail)* + question_ids,
                                     each piece encoded alone, so pack layouts can count exactly

Run `.venv/bin/python -m dsa_rag.model.tokenizer` to print a round-trip example.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The prompt layout dsa-tiny is trained on and the service prompts with:
#   <bos> (<doc> name \n text </doc>)* <question> question <answer> answer <eos>
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<doc>", "</doc>", "<question>", "<answer>", "<sep>")


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes shifted past the special tokens: id = len(SPECIAL_TOKENS) + byte."""

    specials: tuple[str, ...] = SPECIAL_TOKENS

    @property
    def offset(self) -> int:
        return len(self.specials)

    @property
    def vocab_size(self) -> int:
        return self.offset + 256

    def special(self, name: str) -> int:
        try:
            return self.specials.index(name)
        except ValueError:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(self.specials)}") from None

    @property
    def bos_id(self) -> int:
        return self.special("<bos>")

    @property
    def eos_id(self) -> int:
        return self.special("<eos>")

    @property
    def pad_id(self) -> int:
        return self.special("<pad>")

    def encode(self, text: str) -> list[int]:
        off = self.offset
        return [off + b for b in text.encode("utf-8")]

    def decode(self, ids, skip_special: bool = True) -> str:
        """Bytes -> text; an incomplete UTF-8 tail is replaced, not raised (streaming decodes
        token by token, so callers that stream should use `IncrementalDecoder`)."""
        off = self.offset
        out = bytearray()
        for i in ids:
            i = int(i)
            if off <= i < off + 256:
                out.append(i - off)
            elif not skip_special:
                out.extend(self.specials[i].encode())
        return out.decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        """A special id or an id past the 256 bytes (a model whose vocab is larger than this
        tokenizer's, e.g. a V3.2-shaped engine without its tokenizer) decodes to no bytes."""
        return bytes([i - self.offset]) if self.offset <= i < self.offset + 256 else b""

    def prompt_ids(self, documents: list[tuple[str, str]], question: str | None = None) -> list[int]:
        """[(name, text), ...] + question -> ids of `<bos> <doc>name\\ntext</doc>... <question>q<answer>`.
        With question=None only the documents prefix is returned (what a pack's KV cache holds)."""
        return _prompt_ids(self, documents, question)

    def doc_head(self, name: str) -> list[int]:
        return [self.special("<doc>")] + self.encode(f"{name}\n")

    def doc_tail(self) -> list[int]:
        return [self.special("</doc>")]

    def question_ids(self, question: str) -> list[int]:
        return [self.special("<question>")] + self.encode(question) + [self.special("<answer>")]

    def to_json(self) -> dict:
        return {"type": "byte", "specials": list(self.specials)}


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces without splitting UTF-8 characters."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.pending = b""

    def push(self, token_id: int) -> str:
        if isinstance(self.tok, ByteTokenizer):
            self.pending += self.tok.token_bytes(token_id)
            try:
                text = self.pending.decode("utf-8")
            except UnicodeDecodeError as e:
                if e.reason == "unexpected end of data" and len(self.pending) < 4:
                    return ""  # wait for the rest of the character
                text = self.pending.decode("utf-8", errors="replace")
            self.pending = b""
            return text
        return self.tok.decode([token_id])

    def flush(self) -> str:
        text = self.pending.decode("utf-8", errors="replace")
        self.pending = b""
        return text


class HFTokenizer:
    """tokenizer.json of a real checkpoint (HF `tokenizers`); RAG markers are plain text there."""

    def __init__(self, path: str | Path, bos_id: int = 0, eos_id: int = 1):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, eos_id
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def prompt_ids(self, documents: list[tuple[str, str]], question: str | None = None) -> list[int]:
        """<bos> (<document name="..."> text </document>)* Question: ... Answer: (markers as text)."""
        return _prompt_ids(self, documents, question)

    def doc_head(self, name: str) -> list[int]:
        return self.encode(f"<document name=\"{name}\">\n")

    def doc_tail(self) -> list[int]:
        return self.encode("\n</document>\n")

    def question_ids(self, question: str) -> list[int]:
        return self.encode(f"Question: {question}\nAnswer:")


def _prompt_ids(tok, documents: list[tuple[str, str]], question: str | None) -> list[int]:
    """[bos] + (doc_head + text + doc_tail)* (+ question_ids): every piece encoded on its own, so
    a document's text costs exactly len(encode(text)) wherever it sits (a BPE merge never crosses
    a marker), which is what pack planning and citation layouts count on."""
    ids = [tok.bos_id]
    for name, text in documents:
        ids += tok.doc_head(name) + tok.encode(text) + tok.doc_tail()
    if question is not None:
        ids += tok.question_ids(question)
    return ids


def doc_cost(tok, name: str, text_tokens: int) -> int:
    """Tokens a document (or window) of `text_tokens` text tokens costs in a prompt."""
    return len(tok.doc_head(name)) + text_tokens + len(tok.doc_tail())


def _bos_without_config(d: Path, tok: HFTokenizer) -> int:
    """The prompt's first token when config.json names no bos_token_id (GLM-5's does not):
    tokenizer_config.json's bos_token, else GLM's "[gMASK]" (the token its prompts open with), else 0."""
    spec = d / "tokenizer_config.json"
    names = []
    if spec.exists():
        b = json.loads(spec.read_text()).get("bos_token")
        names.append(b.get("content") if isinstance(b, dict) else b)
    for name in [*names, "[gMASK]"]:
        i = tok._tok.token_to_id(name) if isinstance(name, str) else None
        if i is not None:
            return i
    return 0


def load_tokenizer(model_dir: str | Path | None = None):
    """tokenizer.json -> HFTokenizer; tokenizer_config.json with {"type": "byte"} or no dir -> ByteTokenizer."""
    if model_dir is None:
        return ByteTokenizer()
    d = Path(model_dir)
    if (d / "tokenizer.json").exists():
        bos, eos = None, 1
        cfg = d / "config.json"
        if cfg.exists():
            c = json.loads(cfg.read_text())
            bos, eos = c.get("bos_token_id"), c.get("eos_token_id", 1)
            eos = eos[0] if isinstance(eos, list) else eos
        tok = HFTokenizer(d / "tokenizer.json", 0, eos)
        tok.bos_id = bos if bos is not None else _bos_without_config(d, tok)
        return tok
    spec = d / "tokenizer_config.json"
    if spec.exists():
        s = json.loads(spec.read_text())
        if s.get("type") == "byte":
            return ByteTokenizer(tuple(s.get("specials", SPECIAL_TOKENS)))
    return ByteTokenizer()


if __name__ == "__main__":
    tok = ByteTokenizer()
    ids = tok.prompt_ids([("a.txt", "The key of Rome is 42.")], "What is the key of Rome?")
    print(ids[:12], "...", len(ids), "tokens")
    print(repr(tok.decode(ids, skip_special=False)))
