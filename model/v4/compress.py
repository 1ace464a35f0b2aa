"""DeepSeek-V4's compressors and the CSA lightning indexer (paper sections 2.3.1-2.3.2).

A compressor turns every `ratio` source tokens into one KV entry: per channel, a softmax over the
window's gate logits (`wgate(x) + ape`, ape a learned per-slot bias) weights the window's
`wkv(x)` rows; the sum is RMS-normed and RoPE'd at the window's first position
(`entry_index * ratio`). HCA windows do not overlap. CSA windows overlap: each token projects to
two series (2 * dim channels), entry w pools the first half of window w-1 with the second half
of window w, i.e. 2 * ratio slots at stride ratio; entry 0 has no previous window (its slots get
weight 0). Entry w is complete once token (w + 1) * ratio - 1 has arrived, so query t may read
entries w < (t + 1) // ratio.

State between calls (chunked prefill, decode) lives in a `CompressorState`: the open window's
tokens and, on CSA, the last closed window's first-half series; calling with chunks of any size
emits exactly the entries of one call over the whole sequence. Each module splits into `project`
(the linear layers: one call for every sequence of a decode batch) and `absorb` / `select` (the
state update and scoring of one cache).

The indexer (CSA only) keeps its own compressed key pool at index_head_dim and scores query t
against entry s as sum_h w[t,h] * ReLU(q[t,h] . k[s]) (the lightning-indexer op of
kernels/indexer); it returns the top `index_topk` complete entries per query, -1 where fewer exist
(the reference's handling of the incomplete tail).

    .venv/bin/python -m pytest -q tests/model/test_deepseek_v4.py -p no:cacheprovider
"""

from __future__ import annotations

import torch
from torch import nn

from dsa_rag.kernels.indexer import indexer_logits
from dsa_rag.model.v4.cache import CompressorState
from dsa_rag.model.v4.ops import RMSNorm, Rotary, apply_rope


class Compressor(nn.Module):
    """x [B, T, hidden] (+ state) -> the new entries [B, n_new, dim]; the state gains them."""

    def __init__(self, hidden: int, dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.dim, self.ratio, self.overlap = dim, ratio, overlap
        width = 2 * dim if overlap else dim
        self.wkv = nn.Linear(hidden, width, bias=False)
        self.wgate = nn.Linear(hidden, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))  # per-slot gate bias
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, state: CompressorState, rotary: Rotary) -> torch.Tensor:
        return self.absorb(*self.project(x), state, rotary)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> (kv, gate) [B, T, width]: the part that batches across sequences."""
        return self.wkv(x), self.wgate(x)

    def absorb(self, kv: torch.Tensor, gate: torch.Tensor, state: CompressorState, rotary: Rotary) -> torch.Tensor:
        """Projected rows kv / gate [B, T, width] of the sequence(s) `state` holds -> the new
        entries [B, n_new, dim]; the state gains them (and keeps the open window)."""
        B, r, d = kv.shape[0], self.ratio, self.dim
        first = state.count  # index of the first entry this call can emit
        if state.buffer_kv is not None and state.buffer_kv.shape[1]:
            kv = torch.cat([state.buffer_kv, kv], 1)
            gate = torch.cat([state.buffer_gate, gate], 1)
        usable = kv.shape[1] // r * r
        state.buffer_kv, state.buffer_gate = kv[:, usable:], gate[:, usable:]
        n = usable // r
        if n == 0:
            if state.entries is None:  # an empty pool, so readers need not special-case None
                state.entries = kv.new_zeros(B, 0, d)
            return kv.new_zeros(B, 0, d)
        kv = kv[:, :usable].view(B, n, r, -1)                     # [B, n, r, width]
        gate = gate[:, :usable].view(B, n, r, -1) + self.ape
        if self.overlap:
            kv, gate = self._overlap(kv, gate, state)               # [B, n, 2r, d]
        w = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
        pooled = self.norm((kv * w).sum(2))                         # [B, n, d]
        pos = ((torch.arange(n, device=kv.device) + first) * r).unsqueeze(0).expand(B, -1)
        cos, sin = rotary(pos, "compress")
        new = apply_rope(pooled, cos, sin)
        state.append(new)
        return new

    def _overlap(self, kv, gate, state: CompressorState):
        """Lay the two series of consecutive windows side by side: slots [:r] = window w-1's first
        half (from the state for w = 0; weight 0 when there is none), slots [r:] = window w's
        second half."""
        B, n, r, _ = kv.shape
        d = self.dim
        okv = kv.new_zeros(B, n, 2 * r, d)
        ogate = gate.new_full((B, n, 2 * r, d), float("-inf"))
        okv[:, :, r:], ogate[:, :, r:] = kv[..., d:], gate[..., d:]
        okv[:, 1:, :r], ogate[:, 1:, :r] = kv[:, :-1, :, :d], gate[:, :-1, :, :d]
        if state.overlap_kv is not None:
            okv[:, 0, :r], ogate[:, 0, :r] = state.overlap_kv, state.overlap_gate
        state.overlap_kv, state.overlap_gate = kv[:, -1, :, :d].clone(), gate[:, -1, :, :d].clone()
        return okv, ogate


def visible_entries(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """positions [B, T] -> how many compressed entries each query may read: (t + 1) // ratio."""
    return (positions + 1) // ratio


class Indexer(nn.Module):
    """Lightning indexer over compressed keys: top-k entry indices per query, -1 = none."""

    def __init__(self, hidden: int, q_lora_rank: int, n_heads: int, head_dim: int, ratio: int, topk: int, eps: float):
        super().__init__()
        self.n_heads, self.head_dim, self.ratio, self.topk = n_heads, head_dim, ratio, topk
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(hidden, n_heads, bias=False)
        self.compressor = Compressor(hidden, head_dim, ratio, overlap=True, eps=eps)

    def forward(self, x, q_residual, positions, state: CompressorState, rotary: Rotary) -> torch.Tensor:
        """x [B, T, hidden], q_residual [B, T, q_lora_rank], positions [B, T] -> idx [B, T, k]."""
        return self.select(*self.project(x, q_residual, positions, rotary), positions, state, rotary)

    def project(self, x, q_residual, positions, rotary: Rotary):
        """The batchable part: -> (kv, gate) [B, T, 2 * head_dim] for the key compressor, the
        RoPE'd queries q [B, T, H, head_dim] and the head weights w [B, T, H] (fp32)."""
        B, T, _ = x.shape
        kv, gate = self.compressor.project(x)
        q = self.wq_b(q_residual).view(B, T, self.n_heads, self.head_dim)
        q = apply_rope(q, *rotary(positions, "compress"))
        # The lightning-indexer op (kernels/indexer: torch / Triton backends) scores
        # sum_h w[t, h] ReLU(q[t, h] . k[s]); w carries both scales (ReLU(x) c = ReLU(x c), c > 0).
        w = self.weights_proj(x).float() * (self.n_heads ** -0.5 * self.head_dim ** -0.5)  # [B, T, H]
        return kv, gate, q, w

    def select(self, kv, gate, q, w, positions, state: CompressorState, rotary: Rotary) -> torch.Tensor:
        """Extend the key pool of the sequence(s) `state` holds, then the top-k visible entries
        per query -> idx [B, T, k], -1 = none."""
        B, T = positions.shape
        self.compressor.absorb(kv, gate, state, rotary)
        keys = state.entries                                          # [B, P, head_dim]
        P = keys.shape[1]
        if P == 0:
            return torch.full((B, T, 0), -1, dtype=torch.long, device=q.device)
        q = q.to(keys.dtype)
        # start_pos = P: its token-causal mask hides nothing; V4's own rule follows.
        scores = torch.stack([indexer_logits(q[b], keys[b], w[b], start_pos=P) for b in range(B)])  # [B, T, P]
        limit = visible_entries(positions, self.ratio).unsqueeze(-1)  # [B, T, 1]
        scores = scores.masked_fill(torch.arange(P, device=q.device) >= limit, float("-inf"))
        idx = scores.topk(min(self.topk, P), dim=-1).indices
        # A query with fewer visible entries than k gets some future picks: mark them -1.
        return torch.where(idx >= limit, torch.full_like(idx, -1), idx)
