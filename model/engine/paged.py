"""Paged caches: one block pool per engine, fixed-size blocks (64 tokens, as vLLM and SGLang page
them), refcounted so sequences share read-only prefix blocks, copy-on-write on the first write
into a shared block.

    pool = BlockPool(n_layers=4, kv_dim=144, index_dim=32)      # storage grows by doubling
    seq = PagedSequence(pool)                                   # an empty block table
    model(ids, 0, [seq.layers])                                 # seq.layers: the model's LayerCache list
    child = seq.fork()                                          # shares every block (refcount += 1)
    model(more, seq.length, [child.layers])                     # CoW of the shared partial block
    child.free(); seq.free()

Storage per layer (all sequences together): kv [N * 64, kv_lora_rank + rope] in the model's
activation dtype, index_k [N * 64, index_head_dim] (float8_e4m3fn stored as uint8 bytes in FP8
mode: CPU index_copy has no float8 kernel) and index_scale [N * 64] fp32 (FP8 mode only); the
"shared" layers of an indexer plan (ModelConfig.indexer_types) run no indexer, so `index_layers`
leaves them without index storage (None).
Block b holds rows b*64 .. b*64+63; a sequence's token at position p lives in row
table[p // 64] * 64 + p % 64 of every layer (one block id covers all layers).

The sparse attention kernel gathers its top-k rows straight from `kv_pool()` through
`physical()`, so decode never copies the context. `index_k(end)` (the indexer scores every key)
is a view when the sequence's blocks are consecutive in the pool (the allocator prefers the
block after a sequence's last one, so a prefix prefilled alone is one run) and a gather
otherwise (e.g. a question forked off a shared prefix).

    .venv/bin/python -m pytest tests/model/engine/test_engine_paged.py -q
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 64


class BlockAllocator:
    """Block ids with refcounts. `alloc(prefer)` takes `prefer` if it is free (keeps a growing
    sequence consecutive), else the lowest free id; returns None when every block is taken."""

    def __init__(self, n_blocks: int = 0):
        self.ref: list[int] = []
        self.free_ids: set[int] = set()
        self.grow(n_blocks)

    @property
    def n_blocks(self) -> int:
        return len(self.ref)

    @property
    def n_free(self) -> int:
        return len(self.free_ids)

    def grow(self, n_blocks: int) -> None:
        old = len(self.ref)
        if n_blocks > old:
            self.ref.extend([0] * (n_blocks - old))
            self.free_ids.update(range(old, n_blocks))

    def alloc(self, prefer: int | None = None) -> int | None:
        if not self.free_ids:
            return None
        b = prefer if prefer is not None and prefer in self.free_ids else min(self.free_ids)
        self.free_ids.remove(b)
        self.ref[b] = 1
        return b

    def incref(self, b: int) -> None:
        if self.ref[b] <= 0:
            raise RuntimeError(f"block {b} is free; cannot share it")
        self.ref[b] += 1

    def decref(self, b: int) -> None:
        if self.ref[b] <= 0:
            raise RuntimeError(f"block {b} freed twice")
        self.ref[b] -= 1
        if self.ref[b] == 0:
            self.free_ids.add(b)


class BlockPool:
    """Per-layer block storage for every sequence of an engine. Storage is allocated on the first
    write (dtypes are the model's) and doubles when the allocator runs out; `max_blocks` caps it."""

    def __init__(self, n_layers: int, kv_dim: int, index_dim: int, block_size: int = BLOCK_SIZE,
                 n_blocks: int = 16, max_blocks: int | None = None, device="cpu",
                 index_layers: list[int] | None = None):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.n_layers, self.kv_dim, self.index_dim = n_layers, kv_dim, index_dim
        # Layers that cache indexer keys (default: all); the others hold None in ik / isc.
        self.index_layers = set(range(n_layers) if index_layers is None else index_layers)
        self.block_size, self.max_blocks, self.device = block_size, max_blocks, torch.device(device)
        self.alloc = BlockAllocator(n_blocks)
        self.kv: list[torch.Tensor] = []  # per layer [N*bs, kv_dim]
        self.ik: list[torch.Tensor | None] = []  # per layer [N*bs, index_dim] (uint8 bytes in FP8 mode)
        self.isc: list[torch.Tensor | None] | None = None  # per layer [N*bs] fp32 (FP8 mode)
        self.kv_dtype = self.ik_dtype = None

    # --- storage ---------------------------------------------------------------------------
    @property
    def allocated(self) -> bool:
        return bool(self.kv)

    def ensure_storage(self, kv_dtype, ik_dtype, has_scale: bool) -> None:
        if self.allocated:
            if kv_dtype != self.kv_dtype or ik_dtype != self.ik_dtype or has_scale != (self.isc is not None):
                raise ValueError(f"cache dtype mismatch: the pool holds kv {self.kv_dtype} / index_k {self.ik_dtype}"
                                 f" (scales: {self.isc is not None}), got kv {kv_dtype} / index_k {ik_dtype}"
                                 f" (scales: {has_scale})")
            return
        self.kv_dtype, self.ik_dtype = kv_dtype, ik_dtype
        rows = self.alloc.n_blocks * self.block_size
        st = torch.uint8 if _is_fp8(ik_dtype) else ik_dtype
        self.kv = [torch.zeros(rows, self.kv_dim, dtype=kv_dtype, device=self.device) for _ in range(self.n_layers)]
        has = self.index_layers
        self.ik = [torch.zeros(rows, self.index_dim, dtype=st, device=self.device) if i in has else None
                   for i in range(self.n_layers)]
        self.isc = [torch.zeros(rows, dtype=torch.float32, device=self.device) if i in has else None
                    for i in range(self.n_layers)] if has_scale else None

    def _grow(self) -> None:
        old = self.alloc.n_blocks
        new = max(2 * old, old + 1)
        if self.max_blocks is not None:
            new = min(new, self.max_blocks)
        if new <= old:
            raise MemoryError(f"KV block pool exhausted: all {old} blocks of {self.block_size} tokens are in use "
                              f"(raise max_blocks, or finish / release sequences and prefix handles)")
        self.alloc.grow(new)
        if self.allocated:
            extra = (new - old) * self.block_size

            def cat(ts):
                return [None if t is None else torch.cat([t, t.new_zeros((extra,) + tuple(t.shape[1:]))]) for t in ts]

            # Growth usually happens inside Engine.step (inference mode), where new tensors would
            # be inference tensors that no later write outside inference mode (restore(), a
            # caller's thread) may touch. Storage stays normal tensors, writable from anywhere.
            with torch.inference_mode(False):
                self.kv, self.ik = cat(self.kv), cat(self.ik)
                if self.isc is not None:
                    self.isc = cat(self.isc)

    def allocate(self, prefer: int | None = None) -> int:
        b = self.alloc.alloc(prefer)
        if b is None:
            self._grow()
            b = self.alloc.alloc(prefer)
        return b

    def copy_block(self, src: int, dst: int) -> None:
        if not self.allocated:
            return
        bs = self.block_size
        s, d = slice(src * bs, (src + 1) * bs), slice(dst * bs, (dst + 1) * bs)
        for ts in (self.kv, self.ik, self.isc or []):
            for t in ts:
                if t is not None:
                    t[d] = t[s]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in (self.kv, self.ik, self.isc or []) for t in ts
                   if t is not None)

    def used_blocks(self) -> int:
        return self.alloc.n_blocks - self.alloc.n_free


def _is_fp8(dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


class PagedSequence:
    """A block table over a BlockPool: the caches of one sequence (all layers)."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.blocks: list[int] = []
        self.length = 0  # tokens written (positions 0 .. length-1 valid)
        self._table: torch.Tensor | None = None  # int64 [n_blocks] (rebuilt lazily)
        self._rows: torch.Tensor | None = None  # int64 rows of positions 0 .. len(blocks)*bs-1
        self._run = 0  # leading blocks that are consecutive ids (index_k can be a view)
        self.layers = [PagedLayerCache(self, i) for i in range(pool.n_layers)]
        self.freed = False

    # --- block table -----------------------------------------------------------------------
    def _changed(self) -> None:
        self._table = self._rows = None
        run = 1 if self.blocks else 0
        while run < len(self.blocks) and self.blocks[run] == self.blocks[run - 1] + 1:
            run += 1
        self._run = run

    def table(self) -> torch.Tensor:
        if self._table is None:
            self._table = torch.tensor(self.blocks, dtype=torch.int64, device=self.pool.device)
        return self._table

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Pool rows of positions start .. end-1 (int64)."""
        if self._rows is None:
            bs = self.pool.block_size
            self._rows = (self.table()[:, None] * bs + torch.arange(bs, device=self.pool.device)).flatten()
        return self._rows[start:end]

    def contiguous_upto(self) -> int:
        """Positions 0 .. n-1 live in consecutive pool rows starting at blocks[0] * bs."""
        return self._run * self.pool.block_size

    def reserve(self, start: int, end: int) -> None:
        """Make positions start .. end-1 writable: allocate missing blocks, copy-on-write the
        shared ones. Idempotent, so every layer's write may call it."""
        if start > self.length:
            raise ValueError(f"cache write at {start} leaves a hole: the sequence holds {self.length} tokens")
        bs = self.pool.block_size
        changed = False
        for j in range(start // bs, min(len(self.blocks), -(-end // bs))):
            b = self.blocks[j]
            if self.pool.alloc.ref[b] > 1:  # shared with a prefix / sibling: copy before writing
                nb = self.pool.allocate(prefer=self.blocks[j - 1] + 1 if j else None)
                self.pool.copy_block(b, nb)
                self.pool.alloc.decref(b)
                self.blocks[j] = nb
                changed = True
        while len(self.blocks) * bs < end:
            self.blocks.append(self.pool.allocate(prefer=self.blocks[-1] + 1 if self.blocks else None))
            changed = True
        if changed:
            self._changed()

    def fork(self, upto: int | None = None) -> "PagedSequence":
        """A new sequence sharing this one's blocks for positions 0 .. upto-1 (no copy)."""
        upto = self.length if upto is None else upto
        if not 0 <= upto <= self.length:
            raise ValueError(f"fork upto={upto}: the sequence holds {self.length} tokens")
        child = PagedSequence(self.pool)
        n = -(-upto // self.pool.block_size)
        for b in self.blocks[:n]:
            self.pool.alloc.incref(b)
        child.blocks, child.length = list(self.blocks[:n]), upto
        child._changed()
        return child

    def free(self) -> None:
        if self.freed:
            return
        for b in self.blocks:
            self.pool.alloc.decref(b)
        self.blocks, self.length, self.freed = [], 0, True
        self._changed()

    # --- bulk read / write (snapshots) -----------------------------------------------------
    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Contiguous copies of (kv, index_k, index_scale) for positions 0 .. end-1 (index_k and
        index_scale None on a layer without indexer keys)."""
        c = self.layers[layer]
        ik, isc = c.index_k(end), c.index_scale(end)
        return c.kv(end).clone(), None if ik is None else ik.clone(), None if isc is None else isc.clone()

    def __len__(self) -> int:
        return self.length


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two block tables (PagedSequence.table(), cached):
    model.MLA._select_decode asks it per row and layer on every decode step, where a Python loop
    over a 128k context's 2,047 block ids cost ~0.4 ms a call; three tensor ops cost ~0.02 ms."""
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if len(diff) else n


class PagedLayerCache:
    """One layer of a PagedSequence: the model's LayerCache contract (model/cache.py)."""

    def __init__(self, seq: PagedSequence, layer: int):
        self.seq, self.layer = seq, layer

    def write(self, start, kv, index_k, index_scale):
        seq, pool = self.seq, self.seq.pool
        end = start + kv.shape[0]
        i = self.layer
        if (index_k is not None) != (i in pool.index_layers):
            raise ValueError(f"layer {i}: the pool {'keeps' if i in pool.index_layers else 'has no'} indexer keys "
                             f"for it, the write {'has none' if index_k is None else 'brings some'} "
                             f"(engine and model disagree on the indexer plan)")
        if index_k is not None:  # allocates the storage on the first write, else checks its dtypes
            pool.ensure_storage(kv.dtype, index_k.dtype, index_scale is not None)
        elif not pool.allocated:
            raise ValueError("the pool's first write must come from a layer with indexer keys (storage dtypes)")
        seq.reserve(start, end)
        rows = seq.rows(start, end)
        pool.kv[i].index_copy_(0, rows, kv.detach())
        if index_k is not None:
            ik = index_k.detach()
            pool.ik[i].index_copy_(0, rows, ik.view(torch.uint8) if _is_fp8(ik.dtype) else ik)
        if index_scale is not None:
            pool.isc[i].index_copy_(0, rows, index_scale.detach().float())
        seq.length = max(seq.length, end)

    def _read(self, t: torch.Tensor, end: int) -> torch.Tensor:
        seq = self.seq
        if end <= seq.contiguous_upto():
            r0 = seq.blocks[0] * seq.pool.block_size
            return t[r0: r0 + end]
        return t.index_select(0, seq.rows(0, end))

    def kv(self, end):
        return self._read(self.seq.pool.kv[self.layer], end)

    def index_k(self, end):
        pool = self.seq.pool
        if pool.ik[self.layer] is None:
            return None
        ik = self._read(pool.ik[self.layer], end)
        return ik.view(pool.ik_dtype) if _is_fp8(pool.ik_dtype) else ik

    def index_scale(self, end):
        pool = self.seq.pool
        return None if pool.isc is None or pool.isc[self.layer] is None else self._read(pool.isc[self.layer], end)

    def kv_pool(self):
        return self.seq.pool.kv[self.layer]

    def shared_with(self, other) -> int:
        """Leading positions this row and `other` read from the same pool rows (forks of one pack
        share its blocks until a write copies one): their keys are identical there, so a decode
        step can score them once for both (model.MLA._select_decode)."""
        if not isinstance(other, PagedLayerCache) or other.seq.pool is not self.seq.pool:
            return 0
        n = _common_prefix(self.seq.table(), other.seq.table())
        return min(n * self.seq.pool.block_size, self.seq.length, other.seq.length)

    def contiguous_keys(self, end: int) -> int:
        """Leading positions (of 0 .. end-1) in consecutive pool rows: index_k of them is a view."""
        return min(end, self.seq.contiguous_upto())

    def index_tail(self, start, end):
        """(index_k, index_scale) of positions start .. end-1: a gather of those rows only."""
        pool = self.seq.pool
        rows = self.seq.rows(start, end)
        ik = pool.ik[self.layer].index_select(0, rows)
        isc = None if pool.isc is None or pool.isc[self.layer] is None else pool.isc[self.layer].index_select(0, rows)
        return (ik.view(pool.ik_dtype) if _is_fp8(pool.ik_dtype) else ik), isc

    def physical(self, idx):
        bs = self.seq.pool.block_size
        i = idx.long()
        rows = self.seq.table()[i.clamp_min(0) // bs] * bs + i.clamp_min(0) % bs
        return torch.where(i >= 0, rows, torch.full_like(rows, -1))
