"""Packing and selection: whole documents into contexts (packs), a pack's prompt layout and its
citations, and the lexical (BM25) pack selection for a question."""
