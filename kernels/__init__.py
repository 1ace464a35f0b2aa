"""DSA kernels: lightning-indexer scores/top-k and sparse MLA, each with naive / torch / triton
backends behind one public function (see kernels/README.md and kernels/dispatch.py).

    from kernels import indexer_head_lse, indexer_logits, indexer_topk, sparse_mla

Test: .venv/bin/python -m pytest -q tests/kernels
"""

from kernels.indexer import indexer_head_lse, indexer_logits, indexer_topk
from kernels.sparse_mla import sparse_mla

__all__ = ["indexer_head_lse", "indexer_logits", "indexer_topk", "sparse_mla"]
