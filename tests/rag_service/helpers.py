"""Shared helpers of the rag_service tests: deterministic filler text and the pack invariants
every test that ingests checks.

    from tests.rag_service.helpers import words, pack_invariants
"""

from __future__ import annotations

import random

from dsa_rag.model.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
VOCAB = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def words(seed: int, n: int, vocab: list[str] | None = None) -> str:
    """n random words from a small vocabulary, then a full stop (same seed, same text)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(vocab or VOCAB) for _ in range(n)) + "."


def pack_invariants(rag):
    """Every pack's prompt is what its members say (tokens add up, <= max_context, the ids are
    the tokenizer's prompt of the member texts) and document <-> pack links agree both ways."""
    packs = rag.list_packs()
    docs = {d.id: d for d in rag.list_documents()}
    for p in packs:
        ids, layout = rag.pack_prompt(p.id)
        assert p.tokens == len(ids) == 1 + sum(m.tokens for m in p.documents) <= rag.settings.max_context
        assert ids == TOK.prompt_ids([(m.name, rag.document_text(m.document_id)[m.char_start:m.char_end])
                                      for m in p.documents])
        assert [e.document_id for e in layout.entries] == [m.document_id for m in p.documents]
        for m in p.documents:
            assert p.id in docs[m.document_id].packs
    for d in docs.values():
        for pid in d.packs:
            assert any(m.document_id == d.id for m in rag.get_pack(pid).documents)
    return packs
