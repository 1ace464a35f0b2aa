"""Chunking, pack layouts and packing invariants (through the real pipeline + Redis).

    .venv/bin/python -m pytest -q tests/rag_service/test_chunk_pack.py
"""

from __future__ import annotations

import random

import pytest

from dsa_rag.rag_service.parsing.chunk import TextTokens, chunk_text
from dsa_rag.rag_service.errors import NotFound
from dsa_rag.rag_service.packing.pack import plan_members
from dsa_rag.rag_service.schemas import PageSpan
from tests.rag_service.helpers import TOK, pack_invariants, words

MIXED = "Zürich — 東京 and naïve café; emoji 🙂 ok. " * 40


@pytest.mark.parametrize("text", [MIXED, "plain ascii text " * 50], ids=["utf8", "ascii"])
def test_text_tokens_match_byte_tokenizer(text):
    tt = TextTokens(TOK, text)
    raw = text.encode()
    assert tt.total == len(TOK.encode(text)) == len(raw)
    rng = random.Random(0)
    for _ in range(200):
        a, b = sorted(rng.randrange(len(text) + 1) for _ in range(2))
        assert tt.tokens(a, b) == len(text[a:b].encode())
        end = tt.fit(a, 37)
        assert tt.tokens(a, end) <= 37 and (end == len(text) or tt.tokens(a, end + 1) > 37)
        t = rng.randrange(len(raw))
        c = tt.char_at_token(t)
        assert len(text[:c].encode()) <= t < len(text[: c + 1].encode())


def test_chunks_respect_pages_budget_and_offsets():
    text = words(1, 300) + "\n\n" + MIXED + "\n\n" + words(2, 50)
    a = len(words(1, 300))
    b = a + 2 + len(MIXED)
    pages = [PageSpan(page=1, char_start=0, char_end=a), PageSpan(page=2, char_start=a + 2, char_end=b),
             PageSpan(page=3, char_start=b + 2, char_end=len(text))]
    tt = TextTokens(TOK, text)
    chunks = chunk_text(tt, pages, chunk_tokens=64, overlap=8)
    assert {c.page for c in chunks} == {1, 2, 3}
    for c in chunks:
        p = pages[c.page - 1]
        assert p.char_start <= c.char_start < c.char_end <= p.char_end  # never crosses a page
        assert c.token_end - c.token_start == len(text[c.char_start:c.char_end].encode()) <= 64
        assert c.token_start == len(text[: c.char_start].encode())
    for p in pages:  # the chunks of a page cover it, consecutive ones overlap
        cs = [c for c in chunks if c.page == p.page]
        assert cs[0].char_start == p.char_start and cs[-1].char_end == p.char_end
        for x, y in zip(cs, cs[1:]):
            assert y.char_start <= x.char_end and y.char_start > x.char_start


def test_long_document_windows_overlap_and_fit():
    text = words(3, 3000)
    tt = TextTokens(TOK, text)
    plans = plan_members(TOK, tt, "long.txt", capacity=2048, overlap=128)
    assert len(plans) > 5 and [p.window for p in plans] == list(range(len(plans)))
    assert plans[0].char_start == 0 and plans[-1].char_end == len(text)
    for p in plans:
        assert p.windows == len(plans)
        assert p.tokens == len(TOK.encode(f"long.txt\n{text[p.char_start:p.char_end]}")) + 2
        assert 1 + p.tokens <= 2048
    for x, y in zip(plans, plans[1:]):
        shared = tt.tokens(y.char_start, x.char_end)
        assert 100 <= shared <= 128  # ~pack_overlap tokens (the start snaps to a word)
    short = plan_members(TOK, TextTokens(TOK, "tiny"), "t.txt", 2048, 128)
    assert len(short) == 1 and short[0].tokens == len(TOK.encode("t.txt\ntiny")) + 2


def test_packing_fills_packs_and_sealed_packs_never_change(rag):
    docs = [rag.ingest(f"d{i}.txt", words(i, 60 + 10 * i).encode()) for i in range(12)]
    packs = pack_invariants(rag)
    assert len(packs) >= 2 and all(len(d.packs) == 1 for d in docs)
    sealed = {p.id: p.model_dump() for p in packs if p.state == "sealed"}
    assert sealed, "with 12 docs of ~400-1000 tokens in 2048-token packs some pack must be sealed"
    for i in range(12, 20):
        rag.ingest(f"d{i}.txt", words(i, 80).encode())
    after = {p.id: p.model_dump() for p in pack_invariants(rag)}
    for pid, dump in sealed.items():
        assert after[pid] == dump  # untouched: same members, tokens, version


def test_long_document_becomes_window_packs_with_mapping(rag):
    text = words(7, 1200) + " Zürich 東京 " + words(8, 600)
    doc = rag.ingest("long.txt", text.encode())
    assert len(doc.packs) >= 3
    windows = [rag.get_pack(pid) for pid in doc.packs]
    assert all(p.state == "sealed" and len(p.documents) == 1 for p in windows)
    assert [p.documents[0].window for p in windows] == list(range(len(windows)))
    target = text.index("東京")
    holder = next(p for p in windows if p.documents[0].char_start <= target < p.documents[0].char_end)
    ids, layout = rag.pack_prompt(holder.id)
    e = layout.entries[0]
    pos = e.text_token_start + len(text[e.char_start:target].encode())  # first byte of 東
    entry, char = layout.locate(pos)
    assert entry.document_id == doc.id and char == target
    assert layout.locate(pos + 2)[1] == target  # third byte of the same character
    assert layout.locate(0) is None and layout.locate(e.token_start) is None  # <bos>, <doc>
    pack_invariants(rag)


def test_layout_citations_round_trip_chunks(rag):
    a = rag.ingest("a.txt", ("Intro line. " + MIXED[:400]).encode())
    b = rag.ingest("b.txt", words(9, 100).encode())
    assert a.packs == b.packs
    ids, layout = rag.pack_prompt(a.packs[0])
    eb = layout.entries[1]
    assert eb.document_id == b.id
    for c in rag.document_chunks(b.id):
        cit = layout.citation(eb.text_token_start + c.token_start, eb.text_token_start + c.token_end)
        assert (cit.document_id, cit.char_start, cit.char_end) == (b.id, c.char_start, c.char_end)
    text = rag.document_text(a.id)
    k = text.index("東京")
    ea = layout.entries[0]
    pos = ea.text_token_start + len(text[:k].encode())
    cites = layout.cite([pos, pos + 1, pos + 3, 10_000_000])
    assert len(cites) == 1 and cites[0].document_id == a.id and cites[0].snippet.startswith("東京")


def test_pdf_pages_reach_citations(rag):
    from tests.rag_service.pdfs import make_pdf

    doc = rag.ingest("r.pdf", make_pdf(["first page words", "second page has the answer", "third"]))
    assert doc.pages == 3 and doc.media_type == "pdf"
    ids, layout = rag.pack_prompt(doc.packs[0])
    text = rag.document_text(doc.id)
    e = layout.entries[0]
    pos = e.text_token_start + len(text[: text.index("answer")].encode())
    cit = layout.citation(pos, pos + 6)
    assert cit.page == 2 and cit.snippet == "answer"


def test_idempotent_upload(rag):
    data = words(11, 50).encode()
    first = rag.ingest("x.txt", data)
    tokens_before = rag.get_pack(first.packs[0]).tokens
    again = rag.ingest("renamed.txt", data)
    assert again.id == first.id and again.name == "x.txt" and again.packs == first.packs
    assert [d.id for d in rag.list_documents()] == [first.id]
    assert rag.get_pack(first.packs[0]).tokens == tokens_before
    other_tenant = rag.ingest("x.txt", data, tenant="acme")
    assert other_tenant.id != first.id and other_tenant.packs != first.packs
    assert [d.id for d in rag.list_documents("acme")] == [other_tenant.id]
    rag.delete_document(first.id)  # the blob is still referenced by the other tenant's copy
    assert rag.blobs.exists(first.sha256) and rag.document_text(other_tenant.id) == data.decode()
    rag.delete_document(other_tenant.id, tenant="acme")
    assert not rag.blobs.exists(first.sha256)


def test_delete_rebuilds_pack_and_removes_everything(rag):
    a = rag.ingest("a.txt", words(21, 40).encode())
    b = rag.ingest("b.txt", words(22, 40).encode())
    c = rag.ingest("c.txt", words(21, 40).encode() + b" extra")  # different bytes
    old = rag.get_pack(a.packs[0])
    assert {m.document_id for m in old.documents} == {a.id, b.id, c.id}
    kv_key = rag.kv.key_for("model-x", "default", rag.pack_prompt(old.id)[0])
    rag.kv.put(kv_key, {"k": __import__("torch").zeros(4)}, pack_id=old.id)
    out = rag.delete_document(b.id)
    assert out["removed_packs"] == [old.id] and len(out["rebuilt_packs"]) == 1
    new = rag.get_pack(out["rebuilt_packs"][0])
    assert new.id != old.id and new.version == old.version + 1 and new.previous == old.id
    assert [m.document_id for m in new.documents] == [a.id, c.id]  # order kept
    with pytest.raises(NotFound):
        rag.get_pack(old.id)
    with pytest.raises(NotFound):
        rag.get_document(b.id)
    assert rag.get_document(a.id).packs == [new.id] == rag.get_document(c.id).packs
    assert not rag.kv.contains(kv_key) and rag.kv.stats()["invalidations"] == 1
    assert not rag.blobs.exists(b.sha256) and not rag.blobs.exists(b.text_sha256)
    assert rag.blobs.exists(a.sha256)
    assert rag.r.get(rag.keys.doc_chunks(b.id)) is None
    assert rag.r.scard(rag.keys.blob_refs(b.sha256)) == 0
    pack_invariants(rag)
    with pytest.raises(NotFound):
        rag.delete_document(b.id)
    rag.delete_document(a.id)
    rag.delete_document(c.id)
    assert rag.list_packs() == [] and rag.list_documents() == []
    assert rag.blobs.digests() == []


def test_delete_long_document_drops_its_windows(rag):
    doc = rag.ingest("long.txt", words(5, 1500).encode())
    keep = rag.ingest("k.txt", b"keep me")
    out = rag.delete_document(doc.id)
    assert sorted(out["removed_packs"]) == sorted(doc.packs) and out["rebuilt_packs"] == []
    assert [p.id for p in rag.list_packs()] == keep.packs


def test_citations_never_span_two_pages(tmp_path):
    """Attended positions on both sides of a page break give one citation per page."""
    from dsa_rag.rag_service.packing.layout import PackLayout, LayoutEntry
    from dsa_rag.rag_service.parsing.chunk import TextTokens
    from dsa_rag.rag_service.schemas import PageSpan
    from dsa_rag.model.tokenizer import ByteTokenizer

    text = "alpha page one text.\n\nbeta page two text."
    split = text.index("beta")
    tt = TextTokens(ByteTokenizer(), text)
    entry = LayoutEntry(document_id="d1", name="a.pdf", token_start=1, text_token_start=8,
                        text_token_end=8 + len(text.encode()),
                        token_end=8 + len(text.encode()) + 1, char_start=0, char_end=len(text),
                        pages=[PageSpan(page=1, char_start=0, char_end=split), PageSpan(page=2, char_start=split, char_end=len(text))],
                        tt=tt)
    layout = PackLayout(pack_id="p", version=1, total_tokens=entry.token_end, entries=[entry])
    positions = range(8 + split - 5, 8 + split + 5)  # five tokens before the break, five after
    cites = layout.cite(positions)
    assert sorted(c.page for c in cites) == [1, 2]
    for c in cites:
        assert (c.char_end <= split) if c.page == 1 else (c.char_start >= split)
