"""The per-sequence cache of a DeepSeek-V4 model, and what it costs per token.

A V4 layer does not keep one KV row per token. It keeps
  - the sliding window: the last `sliding_window - 1` K=V rows (head_dim each), a constant size;
  - on CSA / HCA layers, the compressed pool: one head_dim entry per `ratio` tokens, plus the
    compressor's rolling state (the tokens of a window not closed yet, and on CSA the previous
    window's first-half series that the next, overlapping, entry needs);
  - on CSA layers, the indexer's own pool: one index_head_dim key per `ratio` tokens, with the
    same kind of rolling state.
Everything here is what `Transformer.forward(tokens, cache)` reads and extends, so a prefill in
chunks of any size followed by decode equals one full forward (tests/model/test_deepseek_v4.py).
`snapshot()` deep-copies it. The pools sit behind an entry store (`DenseEntries` here: one
growing tensor per batch); paged.py's `PagedV4Cache` keeps them in shared refcounted blocks
instead (`PagedEntries`), so a fork copies only the window and the rolling state.

    .venv/bin/python -m dsa_rag.model.v4.cache      # cache bytes per token, V4-Flash vs V3.2-style
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import torch

from dsa_rag.model.config import preset as v3_preset
from dsa_rag.model.v4.config import CSA, HCA, SLIDING, V4Config, preset


class DenseEntries:
    """A compressor's pool as one tensor per sequence batch: entries [B, n, dim] in a buffer that
    doubles when full, so emitting an entry costs O(dim), not a copy of the pool. What a plain
    `V4Cache` keeps; a paged cache keeps `PagedEntries` (paged.py) with the same methods."""

    def __init__(self, entries: torch.Tensor | None = None):
        self._store: torch.Tensor | None = None
        self._n = 0
        self.set(entries)

    @property
    def count(self) -> int:
        return self._n

    @property
    def entries(self) -> torch.Tensor | None:
        return None if self._store is None else self._store[:, : self._n]

    def set(self, value: torch.Tensor | None) -> None:
        self._store, self._n = value, (0 if value is None else value.shape[1])

    def append(self, new: torch.Tensor) -> None:
        """Add entries new [B, m, dim] to the pool."""
        if self._store is None:
            self.set(new.clone())
            return
        need = self._n + new.shape[1]
        if need > self._store.shape[1]:
            grown = self._store.new_empty(self._store.shape[0], max(need, 2 * self._store.shape[1], 16),
                                          self._store.shape[2])
            grown[:, : self._n] = self._store[:, : self._n]
            self._store = grown
        self._store[:, self._n: need] = new
        self._n = need

    def source(self, b: int, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the sparse kernel reads entries `cols` [T, k] of batch row b: (rows [S, dim],
        row indices [T, k], -1 kept). Here the pool itself, indices unchanged."""
        return self._store[b], cols

    def copy(self) -> "DenseEntries":
        """A copy trimmed to the entries in use (a snapshot does not carry spare capacity)."""
        e = self.entries
        return DenseEntries(None if e is None else e.clone())


class CompressorState:
    """Rolling state of one compressor and the entries it emitted so far.

    buffer_kv / buffer_gate [B, < ratio, width]: the tokens of the window not closed yet;
    overlap_kv / overlap_gate [B, ratio, dim]: the last closed window's first-half series (CSA);
    entries [B, n, dim]: the pool, RoPE'd at each window's start, kept by `store` (DenseEntries,
    or a paged cache's PagedEntries): the rolling state is per sequence and small, the pool is
    what grows and what forks share."""

    def __init__(self, buffer_kv=None, buffer_gate=None, overlap_kv=None, overlap_gate=None, entries=None,
                 store=None):
        self.buffer_kv, self.buffer_gate = buffer_kv, buffer_gate
        self.overlap_kv, self.overlap_gate = overlap_kv, overlap_gate
        self.store = store if store is not None else DenseEntries()
        if entries is not None:
            self.store.set(entries)

    @property
    def entries(self) -> torch.Tensor | None:
        return self.store.entries

    @entries.setter
    def entries(self, value: torch.Tensor | None) -> None:
        self.store.set(value)

    @property
    def count(self) -> int:
        return self.store.count

    def append(self, new: torch.Tensor) -> None:
        """Add entries new [B, m, dim] to the pool."""
        self.store.append(new)

    def source(self, b: int, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.source(b, cols)

    def rolling(self) -> tuple:
        """The per-sequence tensors (not the pool): what a fork copies."""
        return self.buffer_kv, self.buffer_gate, self.overlap_kv, self.overlap_gate

    def with_store(self, store) -> "CompressorState":
        """A copy of the rolling state over `store` (a fork's pool, or a copy of this one's)."""
        c = lambda t: None if t is None else t.clone()  # noqa: E731
        return CompressorState(*(c(t) for t in self.rolling()), store=store)

    def __deepcopy__(self, memo):
        return self.with_store(self.store.copy())


@dataclass
class LayerCache:
    window: torch.Tensor | None = None        # [B, <= sliding_window - 1, head_dim], RoPE'd K=V rows
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None


@dataclass
class V4Cache:
    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0                           # tokens seen (the next token's position)

    @classmethod
    def empty(cls, cfg: V4Config) -> "V4Cache":
        return cls([LayerCache(compressor=None if t == SLIDING else CompressorState(),
                               indexer=CompressorState() if t == CSA else None) for t in cfg.layer_types])

    def snapshot(self) -> "V4Cache":
        return copy.deepcopy(self)

    def nbytes(self) -> int:
        """Bytes of every cache tensor (a paged cache: its pools counted whole, shared blocks too)."""
        total = 0
        for layer in self.layers:
            for t in layer_tensors(layer):
                total += t.numel() * t.element_size()
        return total


def layer_tensors(layer: LayerCache, pools: bool = True):
    """The layer's cache tensors: window, rolling states and (pools=True) the entries."""
    if layer.window is not None:
        yield layer.window
    for s in (layer.compressor, layer.indexer):
        if s is not None:
            for t in s.rolling() + ((s.entries,) if pools else ()):
                if t is not None:
                    yield t


def pool_bytes_per_token(cfg: V4Config, elem_bytes: int = 2) -> tuple[float, float]:
    """(compressed entries, indexer keys): cache bytes that grow with the sequence, per token, of
    this layout, split by pool: head_dim per `ratio` tokens on CSA / HCA layers, index_head_dim
    per `ratio` on CSA layers (the replica planner prints the two apart)."""
    kv = ix = 0.0
    for i, t in enumerate(cfg.layer_types):
        if t != SLIDING:
            kv += cfg.head_dim / cfg.ratio(i)
        if t == CSA:
            ix += cfg.index_head_dim / cfg.ratio(i)
    return kv * elem_bytes, ix * elem_bytes


def bytes_per_token(cfg: V4Config, elem_bytes: int = 2) -> float:
    """Cache bytes that grow with the sequence, per token, of this layout: the compressed
    entries (head_dim per `ratio` tokens) and the indexer keys (index_head_dim per `ratio`)."""
    return sum(pool_bytes_per_token(cfg, elem_bytes))


def fixed_bytes(cfg: V4Config, elem_bytes: int = 2, state_bytes: int = 4) -> int:
    """Bytes that do not grow with the sequence: windows and compressor rolling state (fp32 here,
    as the reference keeps gates; the kv halves in the model dtype counted at state_bytes too)."""
    b = 0
    for i, t in enumerate(cfg.layer_types):
        b += (cfg.sliding_window - 1) * cfg.head_dim * elem_bytes
        if t == SLIDING:
            continue
        r = cfg.ratio(i)
        width = 2 * cfg.head_dim if t == CSA else cfg.head_dim
        b += 2 * (r - 1) * width * state_bytes          # open-window kv + gate
        if t == CSA:
            b += 2 * r * cfg.head_dim * state_bytes      # overlap kv + gate
            b += 2 * (r - 1) * 2 * cfg.index_head_dim * state_bytes + 2 * r * cfg.index_head_dim * state_bytes
    return b


def v32_bytes_per_token(n_layers: int, kv_lora_rank: int = 512, rope_dim: int = 64, index_head_dim: int = 128,
                        elem_bytes: int = 2) -> float:
    """A V3.2-style stack: every layer keeps the latent (kv_lora_rank + rope) and an indexer key
    for every token."""
    return n_layers * (kv_lora_rank + rope_dim + index_head_dim) * elem_bytes


def table(tokens: int = 1 << 20) -> str:
    """A markdown table of cache bytes per token (bf16) and GiB at `tokens`, for the DSA family
    from their configs: V3.2-style stacks keep every token's latent (kv_lora_rank + rope) on every
    layer and an indexer key on indexer layers; V4 keeps pooled entries (this module's layout)."""
    rows = []
    for name in ("deepseek-v3.2", "glm-5", "glm-5.2"):
        c = v3_preset(name)
        n_index = len(c.full_index_layers)
        b = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 2 + n_index * c.index_head_dim * 2
        rows.append((name, b, b * tokens))
    for name in ("deepseek-v4-flash", "deepseek-v4-pro"):
        c = preset(name)
        rows.append((name, bytes_per_token(c), bytes_per_token(c) * tokens + fixed_bytes(c)))
    out = [f"| model | cache bytes / token (bf16) | GiB at {tokens:,} tokens |", "|---|---|---|"]
    out += [f"| {n} | {b:,.0f} | {total / (1 << 30):.2f} |" for n, b, total in rows]
    return "\n".join(out)


def report(tokens: int = 1 << 20) -> dict:
    flash = preset("deepseek-v4-flash")
    gib = 1 << 30
    v4 = bytes_per_token(flash) * tokens + fixed_bytes(flash)
    return {
        "tokens": tokens,
        "v4_flash_layers": {t: flash.layer_types.count(t) for t in (SLIDING, CSA, HCA)},
        "v4_flash_bytes_per_token_bf16": bytes_per_token(flash),
        "v4_flash_fixed_bytes": fixed_bytes(flash),
        "v4_flash_gib": round(v4 / gib, 2),
        "v32_style_same_depth_bytes_per_token": v32_bytes_per_token(flash.num_hidden_layers),
        "v32_style_same_depth_gib": round(v32_bytes_per_token(flash.num_hidden_layers) * tokens / gib, 2),
        "v32_61_layers_gib": round(v32_bytes_per_token(61) * tokens / gib, 2),
    }


if __name__ == "__main__":
    print(table())
    print(json.dumps(report()))
