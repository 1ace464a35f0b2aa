"""Packs, layouts and citations with a checkpoint-style tokenizer.json (a byte-level BPE trained
here), the path a real DeepSeek-V3.2 checkpoint takes: every pack prompt fits its capacity, each
member's text tokens decode to exactly its text window, and citations name the right page.

    .venv/bin/python -m pytest -q tests/rag_service/test_hf_tokenizer_packs.py
"""

from __future__ import annotations

import json
import random

import pytest

from dsa_rag.model.tokenizer import HFTokenizer, doc_cost, load_tokenizer
from dsa_rag.rag_service.pipeline import RagPipeline
from tests.rag_service.helpers import words
from tests.rag_service.pdfs import make_pdf


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [words(i, 200) for i in range(50)] + ['<document name="x">\n', "\n</document>\n", "Question: Answer:"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return d


def test_prompt_is_the_concatenation_of_separately_encoded_pieces(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert isinstance(tok, HFTokenizer)
    docs = [("a.txt", words(1, 40)), ("b.md", words(2, 30))]
    ids = tok.prompt_ids(docs, "what?")
    assert ids[0] == tok.bos_id
    assert len(ids) == 1 + sum(doc_cost(tok, n, len(tok.encode(t))) for n, t in docs) + len(tok.question_ids("what?"))
    assert tok.decode(ids[1:]).startswith('<document name="a.txt">\n' + docs[0][1] + "\n</document>\n")


def test_packs_layouts_and_page_citations(make_settings, bpe_dir):
    settings = make_settings(tokenizer_dir=bpe_dir, max_context=512, pack_overlap=32)
    rng = random.Random(0)
    pages = [words(rng.randrange(10_000), 60) for _ in range(3)]
    files = [("report.pdf", make_pdf(pages)), ("short.txt", words(5, 20).encode()),
             ("long.txt", words(6, 700).encode())]  # long.txt needs several windows
    with RagPipeline(settings) as rag:
        docs = {r.document.name: r.document for r in rag.ingest_many(files)}
        assert all(d is not None for d in docs.values())
        packs = rag.list_packs()
        assert sum(1 for p in packs for m in p.documents if m.name == "long.txt") > 1
        for p in packs:
            ids, layout = rag.pack_prompt(p.id)
            assert len(ids) == p.tokens <= settings.max_context
            for e in layout.entries:
                text = rag.document_text(e.document_id)
                assert rag.tok.decode(ids[e.text_token_start: e.text_token_end]) == text[e.char_start: e.char_end]
                # every text position maps into the window, in order
                chars = [e.char_at(i) for i in range(e.text_token_start, e.text_token_end)]
                assert chars == sorted(chars) and e.char_start <= chars[0] and chars[-1] < max(e.char_end, 1)
                assert e.char_at(e.token_start) is None and e.char_at(e.token_end - 1) is None
        # a span of prompt tokens inside page 2 of the PDF cites page 2
        pdf = docs["report.pdf"]
        pack = next(p for p in packs if any(m.document_id == pdf.id for m in p.documents))
        ids, layout = rag.pack_prompt(pack.id)
        e = next(e for e in layout.entries if e.document_id == pdf.id)
        page2 = rag.document_pages(pdf.id)[1]
        t0 = e.tt.token_offset(page2.char_start + 5) + e.text_token_start
        c = layout.citation(t0, t0 + 8)
        assert c.page == 2 and c.snippet in rag.document_text(pdf.id)[page2.char_start: page2.char_end]
