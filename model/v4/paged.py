"""Paged DeepSeek-V4 caches: the compressed pools of every sequence in shared, refcounted blocks,
so a question forked off a cached pack shares the pack's pools instead of copying them.

What a V4 sequence caches (cache.py) splits in two:
  - what grows with the sequence: per CSA / HCA layer the compressed entries (head_dim each, one
    per `ratio` tokens), and per CSA layer the indexer's compressed keys (index_head_dim, one per
    `ratio` tokens, the same count as the layer's entries). These live here, in blocks;
  - what does not: the sliding window (sliding_window - 1 rows per layer) and the compressors'
    rolling state (the open window, CSA's overlap half). Small, rewritten every token: copied
    per fork, as a plain V4Cache keeps them.

Blocks reuse the V3.2 engine's machinery (model/engine/paged.py): one `BlockPool` per compression
ratio (entry i of every layer with that ratio lives in row i of the same block table), whose
per-layer `kv` storage holds the compressed entries and `ik` storage, on CSA layers only, the
indexer keys of the same entry; a `PagedSequence` per ratio is a sequence's block table, with
refcounted `fork()` and copy-on-write `reserve()` of a shared, partially filled last block.
Block size is in entries (default 64): on V4-Flash a CSA block spans 256 tokens, an HCA block
(ratio 128) 8,192.

    pool = V4BlockPool(model.cfg, dtype=torch.float32, block_size=64)
    cache = pool.new_cache()              # a V4Cache whose pools are paged (PagedV4Cache)
    model.hidden(ids, cache)              # chunked prefill, decode: as with a plain V4Cache
    child = cache.fork()                  # shares every block; copies windows + rolling state
    model.hidden(more, child)             # copy-on-write of the shared partial last block
    child.free(); cache.free()            # refcounts down; pool.used_blocks() back to 0

The sparse attention reads a paged pool where it lies (`CompressorState.source` -> the block
storage and physical row indices), the indexer reads its keys as a view when the sequence's blocks
are consecutive (a pack prefilled alone) and as a gather otherwise (a fork's own last blocks).

    .venv/bin/python -m pytest -q tests/model/test_deepseek_v4_paged.py -p no:cacheprovider
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsa_rag.model.engine.paged import BLOCK_SIZE, BlockPool, PagedSequence
from dsa_rag.model.v4.cache import CompressorState, LayerCache, V4Cache, layer_tensors
from dsa_rag.model.v4.config import CSA, V4Config

__all__ = ["V4BlockPool", "PagedV4Cache", "PagedEntries"]


class PagedEntries:
    """One layer's compressed entries (part "kv") or indexer keys (part "ik") of one sequence,
    in its block table's rows: the entry store of a paged cache's CompressorState (same methods
    as cache.DenseEntries). Batch is 1: a paged cache is one sequence."""

    def __init__(self, seq: PagedSequence, layer: int, part: str, count: int = 0):
        self.seq, self.layer, self.part, self._n = seq, layer, part, count

    def _storage(self) -> torch.Tensor:  # re-read each time: the pool's storage grows by copying
        pool = self.seq.pool
        return pool.kv[self.layer] if self.part == "kv" else pool.ik[self.layer]

    @property
    def count(self) -> int:
        return self._n

    @property
    def entries(self) -> torch.Tensor:
        """[1, n, dim]: a view of the storage when the blocks are consecutive, else a gather."""
        if self._n == 0:  # (the V3.2 reader expects at least one block)
            return self._storage()[:0].unsqueeze(0)
        c = self.seq.layers[self.layer]
        t = c.kv(self._n) if self.part == "kv" else c.index_k(self._n)
        return t.unsqueeze(0)

    def set(self, value: torch.Tensor | None) -> None:
        """Replace the pool by value [1, n, dim] (restore); an empty value is a no-op."""
        if value is None or value.shape[1] == 0:
            return
        if self._n:
            raise ValueError("a paged pool is only set whole when empty (restore into a new cache)")
        self.append(value)

    def append(self, new: torch.Tensor) -> None:
        """Add entries new [1, m, dim]: reserve their rows (new blocks, or a copy of a shared
        last block), then write them in place."""
        if new.shape[0] != 1:
            raise ValueError(f"a paged V4 cache holds one sequence, got a batch of {new.shape[0]}")
        m = new.shape[1]
        if m == 0:
            return
        storage = self._storage()
        if new.dtype != storage.dtype:
            raise ValueError(f"layer {self.layer} {self.part}: the block pool caches {storage.dtype}, "
                             f"got entries in {new.dtype}")
        start, end = self._n, self._n + m
        self.seq.reserve(start, end)  # may grow the pool: take the storage again below
        self._storage().index_copy_(0, self.seq.rows(start, end), new[0].detach())
        self._n = end
        self.seq.length = max(self.seq.length, end)

    def source(self, b: int, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole storage and the physical rows of entries `cols` [T, k] (-1 stays -1)."""
        return self._storage(), self.seq.layers[self.layer].physical(cols)

    def copy(self):
        raise TypeError("a paged pool is shared, not copied: fork the PagedV4Cache instead")


class V4BlockPool:
    """The block storage of every paged V4 cache of an engine: one BlockPool per compression
    ratio (its layers: those of that ratio; indexer keys on the CSA ones), storage in the
    model's activation dtype, growing by doubling up to max_blocks (then MemoryError)."""

    def __init__(self, cfg: V4Config, dtype: torch.dtype = torch.float32, device="cpu",
                 block_size: int = BLOCK_SIZE, n_blocks: int = 16, max_blocks: int | None = None):
        self.cfg, self.dtype, self.block_size = cfg, dtype, block_size
        self.slot: list[tuple[int, int] | None] = []   # per model layer: (ratio, layer index in its pool)
        self.groups: dict[int, BlockPool] = {}
        by_ratio: dict[int, list[int]] = {}
        for i in range(cfg.num_hidden_layers):
            r = cfg.ratio(i)
            self.slot.append(None if r == 0 else (r, len(by_ratio.setdefault(r, []))))
            if r:
                by_ratio[r].append(i)
        for r, layers in by_ratio.items():
            index = [j for j, i in enumerate(layers) if cfg.layer_types[i] == CSA]
            pool = BlockPool(len(layers), cfg.head_dim, cfg.index_head_dim, block_size, n_blocks, max_blocks,
                             device, index_layers=index)
            pool.ensure_storage(dtype, dtype, False)
            self.groups[r] = pool

    def new_cache(self) -> "PagedV4Cache":
        seqs = {r: PagedSequence(p) for r, p in self.groups.items()}
        return PagedV4Cache(self._layers(seqs, None), 0, self, seqs)

    def _layers(self, seqs: dict[int, PagedSequence], like: list[LayerCache] | None) -> list[LayerCache]:
        """LayerCaches over `seqs`; with `like`, copies of its windows and rolling states and
        its entry counts (a fork)."""
        out = []
        for i, t in enumerate(self.cfg.layer_types):
            old = like[i] if like is not None else None
            lc = LayerCache(window=None if old is None or old.window is None else old.window.clone())
            if self.slot[i] is not None:
                r, j = self.slot[i]
                for part, name in (("kv", "compressor"), ("ik", "indexer")):
                    if part == "ik" and t != CSA:
                        continue
                    prev = getattr(old, name) if old is not None else None
                    store = PagedEntries(seqs[r], j, part, 0 if prev is None else prev.count)
                    setattr(lc, name, CompressorState(store=store) if prev is None else prev.with_store(store))
            out.append(lc)
        return out

    def used_blocks(self) -> int:
        return sum(p.used_blocks() for p in self.groups.values())

    def total_blocks(self) -> int:
        return sum(p.alloc.n_blocks for p in self.groups.values())

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.groups.values())

    def block_bytes(self) -> dict[int, int]:
        """Bytes of one block, per ratio (all its layers, entries and indexer keys)."""
        return {r: p.nbytes() // max(p.alloc.n_blocks, 1) for r, p in self.groups.items()}


@dataclass
class PagedV4Cache(V4Cache):
    """A V4Cache whose compressed pools are rows of a V4BlockPool (one block table per ratio):
    windows and rolling state per sequence, pools shared by fork()."""

    pool: V4BlockPool | None = None
    seqs: dict[int, PagedSequence] = field(default_factory=dict)
    freed: bool = False

    def fork(self) -> "PagedV4Cache":
        """An independent continuation: shares every block (refcount + 1), copies the rest."""
        if self.freed:
            raise ValueError("fork: the paged V4 cache was freed")
        seqs = {r: s.fork() for r, s in self.seqs.items()}
        return PagedV4Cache(self.pool._layers(seqs, self.layers), self.length, self.pool, seqs)

    def snapshot(self) -> "PagedV4Cache":
        """What V4Cache.snapshot promises (a copy that does not move with this cache), by fork."""
        return self.fork()

    def free(self) -> None:
        """Give the blocks back (shared ones stay while another cache holds them). Idempotent."""
        if not self.freed:
            for s in self.seqs.values():
                s.free()
            self.freed = True

    def blocks(self) -> int:
        """Block-table entries of this cache (shared blocks included)."""
        return sum(len(s.blocks) for s in self.seqs.values())

    def private_nbytes(self) -> int:
        """Bytes outside the pool: windows and rolling states (what a fork copies)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer_tensors(layer, pools=False))
