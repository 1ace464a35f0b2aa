"""The per-sequence cache contract the model reads and writes, and its simplest implementation.

Per layer a sequence keeps
  - the MLA latent cache  kv   [S, kv_lora_rank + qk_rope_head_dim]  ([c_kv | k_pe], FP8-simulated
    c_kv when the model runs fp8_numerics), and
  - the indexer key cache index_k [S, index_head_dim] (float8_e4m3fn + index_scale [S] in FP8 mode);
    None on the "shared" layers of an indexer plan, which run no indexer.

Anything with `write / kv / index_k / index_scale / kv_pool / physical` works as a layer cache (the engine adds paged,
shareable variants). `ContiguousLayerCache` grows a preallocated buffer by doubling. Optional, for
a decode step that selects the keys of several rows in one indexer call (model.MLA._select_decode):
`shared_with(other)` (leading positions both caches hold in the SAME storage rows: forks of one
pack), `contiguous_keys(end)` (how many leading keys index_k returns without a copy) and
`index_tail(start, end)` (index_k and index_scale of positions start .. end-1).

    .venv/bin/python -m pytest -q tests/model -k cache
"""

from __future__ import annotations

from typing import Protocol

import torch


class LayerCache(Protocol):
    def write(self, start: int, kv: torch.Tensor, index_k: torch.Tensor, index_scale: torch.Tensor | None) -> None: ...
    def kv(self, end: int) -> torch.Tensor: ...
    def index_k(self, end: int) -> torch.Tensor: ...
    def index_scale(self, end: int) -> torch.Tensor | None: ...
    def kv_pool(self) -> torch.Tensor: ...  # storage rows the attention kernel gathers from
    def physical(self, idx: torch.Tensor) -> torch.Tensor: ...  # token positions -> rows of kv_pool (-1 kept)


class ContiguousLayerCache:
    """One layer of one sequence, contiguous in memory; `write` may only append or overwrite."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._kv = self._ik = self._is = None
        self.length = 0

    @classmethod
    def over(cls, kv, index_k, index_scale=None) -> "ContiguousLayerCache":
        """A cache holding exactly these tensors, without copying them (a fresh prefill's row;
        autograd flows through, which training needs)."""
        c = cls(capacity=kv.shape[0])
        c._kv, c._ik, c._is = kv, index_k, index_scale
        c.length = kv.shape[0]
        return c

    def _grow(self, need: int, kv, ik, is_):
        if self._kv is not None and need <= self._kv.shape[0]:
            return
        cap = max(self.capacity, need)
        if self._kv is not None:
            cap = max(cap, 2 * self._kv.shape[0])
        new_kv = kv.new_empty(cap, kv.shape[-1])
        new_ik = ik.new_empty(cap, ik.shape[-1]) if ik is not None else None
        new_is = is_.new_empty(cap) if is_ is not None else None
        if self._kv is not None and self.length:
            new_kv[: self.length] = self._kv[: self.length]
            if new_ik is not None:
                new_ik[: self.length] = self._ik[: self.length]
            if new_is is not None:
                new_is[: self.length] = self._is[: self.length]
        self._kv, self._ik, self._is = new_kv, new_ik, new_is

    def write(self, start, kv, index_k, index_scale):
        if start > self.length:
            raise ValueError(f"cache write at {start} leaves a hole: the cache holds {self.length} tokens")
        end = start + kv.shape[0]
        self._grow(end, kv, index_k, index_scale)
        self._kv[start:end] = kv
        if index_k is not None:
            self._ik[start:end] = index_k
        if index_scale is not None:
            self._is[start:end] = index_scale
        self.length = max(self.length, end)

    def kv(self, end):
        return self._kv[:end]

    def index_k(self, end):
        return None if self._ik is None else self._ik[:end]

    def index_scale(self, end):
        return None if self._is is None else self._is[:end]

    def kv_pool(self):
        return self._kv

    def physical(self, idx):
        return idx

    def shared_with(self, other) -> int:
        """Positions whose storage this cache shares with `other`: all of them for itself only."""
        return self.length if other is self else 0

    def contiguous_keys(self, end: int) -> int:
        return end

    def index_tail(self, start, end):
        """(index_k, index_scale) of positions start .. end-1 (views)."""
        return self._ik[start:end], None if self._is is None else self._is[start:end]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


def new_sequence_cache(n_layers: int, capacity: int = 256) -> list[ContiguousLayerCache]:
    return [ContiguousLayerCache(capacity) for _ in range(n_layers)]
