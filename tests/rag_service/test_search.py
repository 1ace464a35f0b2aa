"""BM25 over chunks and pack selection (fan-out budget, document filter, windows, deletes).

    .venv/bin/python -m pytest -q tests/rag_service/test_search.py
"""

from __future__ import annotations

import pytest

from dsa_rag.rag_service.errors import NotFound
from dsa_rag.rag_service.packing.search import Bm25Index, terms
from tests.rag_service.helpers import words


def test_terms_lowercase_words_without_stopwords():
    assert terms("What is the Vault-code of ZÜRICH?") == ["vault", "code", "zürich"]


def test_bm25_ranks_and_updates_incrementally():
    idx = Bm25Index()
    idx.add("a", ["the cat sat on the mat", "dogs bark loudly at night"])
    idx.add("b", ["a cat and a cat and a cat", "quantum chromodynamics lecture notes"])
    hits = idx.search("cat")
    assert [(d, c) for _, d, c in hits] == [("b", 0), ("a", 0)]  # tf 3 beats tf 1
    assert idx.search("chromodynamics")[0][1:] == ("b", 1)
    assert idx.search("cat", doc_ids={"a"})[0][1:] == ("a", 0)
    assert idx.search("unknownword") == []
    assert idx.df["cat"] == 2
    idx.remove("b")
    assert idx.search("chromodynamics") == [] and idx.df["cat"] == 1 and "chromodynamics" not in idx.df
    assert idx.n_chunks == 2 and "b" not in idx


def _corpus(rag, n=10):
    """n filler documents (~500 tokens each: several packs at 2048) + one with the fact."""
    docs = [rag.ingest(f"filler{i}.txt", words(100 + i, 80).encode()) for i in range(n)]
    fact = rag.ingest("zanzibar.txt", ("The vault code of Zanzibar is 7741. " + words(8, 80)).encode())
    return docs, fact


def test_bm25_picks_the_pack_with_the_answer(make_settings):
    from dsa_rag.rag_service.pipeline import RagPipeline

    with RagPipeline(make_settings(fanout_max_packs=2)) as rag:
        _, fact = _corpus(rag)
        assert len(rag.list_packs()) > 2
        sel = rag.select_packs("What is the vault code of Zanzibar?")
        assert len(sel) == 2  # over the fan-out budget: only the best packs
        assert sel[0].pack_id == fact.packs[0] and sel[0].score > sel[1].score
        best = sel[0].chunks[0].citation
        assert best.document_id == fact.id and best.name == "zanzibar.txt"
        assert "Zanzibar is 7741" in best.snippet
        assert rag.document_text(fact.id)[best.char_start:best.char_end] .startswith(best.snippet[:50])


def test_every_pack_when_corpus_fits_the_fanout(make_settings):
    from dsa_rag.rag_service.pipeline import RagPipeline

    with RagPipeline(make_settings(fanout_max_packs=50)) as rag:
        _, fact = _corpus(rag)
        packs = {p.id for p in rag.list_packs()}
        sel = rag.select_packs("vault code Zanzibar")
        assert {s.pack_id for s in sel} == packs and sel[0].pack_id == fact.packs[0]
        assert all(s.score == 0 and not s.chunks for s in sel[1:] if fact.id not in
                   {m.document_id for m in rag.get_pack(s.pack_id).documents})
        assert len(rag.select_packs("no such words anywhere")) == len(packs)


def test_document_filter_and_deletes(rag):
    docs, fact = _corpus(rag, n=4)
    only = rag.select_packs("Zanzibar vault", document_ids=[docs[0].id])
    assert [s.pack_id for s in only] == docs[0].packs
    assert all(c.citation.document_id == docs[0].id for s in only for c in s.chunks)
    with pytest.raises(NotFound):
        rag.select_packs("x", document_ids=["doc_missing"])
    rag.delete_document(fact.id)
    sel = rag.select_packs("Zanzibar vault code")
    assert all(c.citation.document_id != fact.id for s in sel for c in s.chunks)
    assert fact.packs[0] not in {s.pack_id for s in sel}


def test_fact_in_a_late_window_selects_that_window(make_settings):
    from dsa_rag.rag_service.pipeline import RagPipeline

    with RagPipeline(make_settings(fanout_max_packs=1)) as rag:
        text = words(1, 1500) + " Quetzalcoatl guards the obsidian gate. " + words(2, 300)
        doc = rag.ingest("epic.txt", text.encode())
        sel = rag.select_packs("Who guards the obsidian gate? Quetzalcoatl")
        pack = rag.get_pack(sel[0].pack_id)
        m = pack.documents[0]
        k = text.index("Quetzalcoatl")
        assert pack.id in doc.packs and pack.id != doc.packs[0]
        assert m.char_start <= k < m.char_end
        assert sel[0].chunks[0].citation.char_start <= k < sel[0].chunks[0].citation.char_end
