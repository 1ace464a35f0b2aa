"""DeepSeek-V4 attention: one shared K=V head over a sliding window plus compressed entries.

Per layer (shapes [B, T, H, D], D = head_dim):
  q = wq_b(q_norm(wq_a(x))) per-head RMS-normed, kv = kv_norm(wkv(x)) (one head, K = V), both
  RoPE'd on their trailing qk_rope_head_dim channels at the token positions;
  keys = the window (key s visible to query t iff t - W < s <= t) + compressed entries:
    sliding layer: none; HCA: every complete entry (w < (t + 1) // ratio);
    CSA: the indexer's top-k complete entries;
  softmax over [keys, sink] with a learned per-head sink logit (the sink takes mass, adds no value);
  the output's rope channels are rotated back by -position (K = V carried the keys' rotation);
  grouped low-rank output: heads split in o_groups groups, each projected to o_lora_rank (wo_a),
  then mixed to hidden (wo_b).
The model runs that core as one `sparse_sink_attention` call per sequence (kernels/sink_attention:
sparse MLA over the window rows and over the pool, merged with the sink, nothing copied; torch or
Triton backend), with the row lists of `attended_rows` (a paged cache maps the entry columns to
rows of its block storage, `CompressorState.source`). A decode batch of different sequences
passes one LayerCache per row: projections batched, cache work per sequence;
`window_sparse_attention` is the same core as batched dense math, the oracle the tests hold it to.

    .venv/bin/python -m pytest -q tests/model/test_deepseek_v4.py -p no:cacheprovider
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsa_rag.kernels.sink_attention import sparse_sink_attention
from dsa_rag.model.v4.cache import LayerCache
from dsa_rag.model.v4.compress import Compressor, Indexer, visible_entries
from dsa_rag.model.v4.config import CSA, HCA, V4Config
from dsa_rag.model.v4.ops import RMSNorm, Rotary, apply_rope, rms_unweighted, rope_kind


def window_sparse_attention(q, keys, key_pos, q_pos, window: int, sink, scale,
                            entries=None, entry_idx=None, entry_limit=None):
    """One attention call over window keys + compressed entries + a sink.

    q [B, T, H, D]; keys [B, L, D] (the shared K=V head) at key_pos [L]; q_pos [B, T];
    window: key s is visible to query t iff t - window < s <= t; sink [H] fp32 (a logit that
    takes softmax mass and adds no value). Compressed entries [B, P, D], read one of two ways:
      entry_idx [B, T, k] long (CSA: the indexer's picks, -1 = unused slot), gathered; or
      entry_limit [B, T] (HCA: every entry e < limit, dense over the pool, no gather).
    -> [B, T, H, D] in q's dtype; logits and softmax in fp32."""
    B, T, H, D = q.shape
    qf = q.float()
    logits = torch.einsum("bthd,bld->bthl", qf, keys.float()) * scale                # [B, T, H, L]
    rel = q_pos[:, :, None] - key_pos[None, None, :]                                # [B, T, L]
    logits = logits.masked_fill(~((rel >= 0) & (rel < window))[:, :, None, :], float("-inf"))
    parts, values = [logits], None
    if entries is not None and entry_idx is not None and entry_idx.shape[-1] > 0:
        values = torch.gather(entries.unsqueeze(1).expand(B, T, -1, -1), 2,
                              entry_idx.clamp_min(0)[..., None].expand(-1, -1, -1, D)).float()  # [B, T, k, D]
        el = torch.einsum("bthd,btkd->bthk", qf, values) * scale
        parts.append(el.masked_fill((entry_idx < 0)[:, :, None, :], float("-inf")))
    elif entries is not None and entry_limit is not None and entries.shape[1] > 0:
        values = entries.float()                                                     # [B, P, D]
        el = torch.einsum("bthd,bpd->bthp", qf, values) * scale
        future = torch.arange(entries.shape[1], device=q.device) >= entry_limit[..., None]  # [B, T, P]
        parts.append(el.masked_fill(future[:, :, None, :], float("-inf")))
    parts.append(sink.float().view(1, 1, H, 1).expand(B, T, H, 1))
    p = torch.cat(parts, -1).softmax(-1)
    L = keys.shape[1]
    out = torch.einsum("bthl,bld->bthd", p[..., :L], keys.float())
    if values is not None:
        pe = p[..., L:-1]
        out = out + (torch.einsum("bthk,btkd->bthd", pe, values) if values.dim() == 4
                     else torch.einsum("bthp,bpd->bthd", pe, values))
    return out.to(q.dtype)


def attended_rows(key_pos, q_pos, window: int, n_entries: int = 0, entry_idx=None, entry_limit=None):
    """Which rows each query reads, in the kernel's form: window columns into the keys (consecutive
    positions key_pos [L]) and entry columns into the compressed pool, -1 = none.

    q_pos [B, T]; entry_idx [B, T, k] (CSA picks, -1 = none) or entry_limit [B, T] (HCA: every
    entry e < limit of the n_entries). -> (window cols [B, T, window], entry cols [B, T, k or
    n_entries] or None)."""
    B, T = q_pos.shape
    win = (q_pos - key_pos[0])[..., None] - torch.arange(window, device=q_pos.device)        # [B, T, W]
    win = torch.where(win >= 0, win, torch.full_like(win, -1))
    if entry_idx is not None:
        return win, entry_idx
    if entry_limit is not None and n_entries > 0:
        e = torch.arange(n_entries, device=q_pos.device).expand(B, T, -1)
        return win, torch.where(e < entry_limit[..., None], e, torch.full_like(e, -1))
    return win, None


class GroupedLinear(nn.Module):
    """Block-diagonal projection: x [.., G, in] -> [.., G, out], one [out, in] block per group
    (the weight is stored stacked, [G * out, in], as the checkpoints ship it)."""

    def __init__(self, in_per_group: int, out_total: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_total, in_per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.groups, -1, self.weight.shape[-1])  # [G, out, in]
        return torch.einsum("...gi,goi->...go", x, w)


class Attention(nn.Module):
    def __init__(self, cfg: V4Config, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.layer_type = cfg.layer_types[layer]
        self.rope_kind = rope_kind(self.layer_type)
        H, D, eps = cfg.num_attention_heads, cfg.head_dim, cfg.rms_norm_eps
        self.n_heads, self.head_dim, self.eps = H, D, eps
        self.wq_a = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, H * D, bias=False)
        self.wkv = nn.Linear(cfg.hidden_size, D, bias=False)
        self.kv_norm = RMSNorm(D, eps)
        self.wo_a = GroupedLinear(H * D // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, cfg.o_groups)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H, dtype=torch.float32))
        self.ratio = cfg.ratio(layer)
        self.compressor = Compressor(cfg.hidden_size, D, self.ratio, overlap=self.layer_type == CSA, eps=eps) \
            if self.ratio else None
        self.indexer = Indexer(cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim, self.ratio,
                               cfg.index_topk, eps) if self.layer_type == CSA else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, caches: list[LayerCache] | LayerCache,
                rotary: Rotary, trace: list | None = None) -> torch.Tensor:
        """x [B, T, hidden] at positions [B, T] (consecutive, after what the caches hold) -> [B, T, hidden].
        caches: one LayerCache holding all B rows (they share positions), or B LayerCaches of one
        row each (a decode batch of different sequences at different positions). The projections
        and the output run batched either way; window, compressor state, indexer scoring and the
        sparse attention go per cache (each reads its own pool).
        trace: a list to append what each query read, (token positions [B, T, n], attention
        mass summed over heads [B, T, n], -1 / 0 padded); a compressed entry's mass is spread
        evenly over the `ratio` tokens of its window (the citations need token positions)."""
        B, T, _ = x.shape
        caches = [caches] if isinstance(caches, LayerCache) else caches
        if len(caches) not in (1, B):
            raise ValueError(f"{len(caches)} layer caches for a batch of {B} rows: give 1 (shared) or {B}")
        cos, sin = rotary(positions, self.rope_kind)
        q_res = self.q_norm(self.wq_a(x))                                             # [B, T, q_lora]
        q = rms_unweighted(self.wq_b(q_res).view(B, T, self.n_heads, self.head_dim), self.eps)
        q = apply_rope(q, cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)                           # [B, T, D]
        comp = self.compressor.project(x) if self.compressor is not None else None
        ix = self.indexer.project(x, q_res, positions, rotary) if self.indexer is not None else None
        rows = [slice(0, B)] if len(caches) == 1 else [slice(b, b + 1) for b in range(B)]
        outs, reads = [], []
        for sl, cache in zip(rows, caches):
            pick = lambda ts: None if ts is None else tuple(t[sl] for t in ts)  # noqa: E731
            o, read = self._attend(q[sl], kv[sl], positions[sl], cache, rotary, pick(comp), pick(ix),
                                   trace is not None)
            outs.append(o)
            reads += read
        o = outs[0] if len(outs) == 1 else torch.cat(outs)                            # [B, T, H, D]
        if trace is not None:
            trace.append(_pad_stack(reads))
        o = apply_rope(o, cos, -sin)                                                  # undo K=V's rotation
        o = self.wo_a(o.reshape(B, T, self.cfg.o_groups, -1)).flatten(2)               # [B, T, G * o_lora]
        return self.wo_b(o)

    def _attend(self, q, kv, positions, cache: LayerCache, rotary, comp, ix, want_trace: bool):
        """The per-cache part: q [b, T, H, D], kv [b, T, D] at positions [b, T] (the rows of one
        cache) -> (attention output [b, T, H, D], per row (positions, mass) or [])."""
        b, T = positions.shape
        past = cache.window
        keys = kv if past is None else torch.cat([past, kv], 1)
        start = int(positions[0, 0])
        key_pos = torch.arange(start - (keys.shape[1] - T), start + T, device=kv.device)
        keep = self.cfg.sliding_window - 1   # what a later query can still see
        cache.window = keys[:, max(keys.shape[1] - keep, 0):] if keep > 0 else keys[:, :0]

        state, idx, limit, n_entries = None, None, None, 0
        if self.compressor is not None:
            state = cache.compressor
            self.compressor.absorb(*comp, state, rotary)
            n_entries = state.count
            if self.layer_type == HCA:
                limit = visible_entries(positions, self.ratio)
            else:
                idx = self.indexer.select(*ix, positions, cache.indexer, rotary)
        win, ent = attended_rows(key_pos, positions, self.cfg.sliding_window, n_entries, idx, limit)
        if ent is not None and n_entries == 0:
            ent = None  # nothing pooled yet: the indexer's picks are all -1
        scale = self.head_dim ** -0.5
        outs, reads = [], []
        for i in range(b):
            # The pool's rows where the kernel reads them (a paged cache: its block storage, no copy).
            src, rows = (None, None) if ent is None else state.source(i, ent[i])
            outs.append(sparse_sink_attention(q[i], keys[i], win[i], self.attn_sink, scale=scale,
                                              extra_kv=src, extra_indices=rows))
            if want_trace:
                reads.append(self._read_positions(q[i], keys[i], win[i], key_pos, src, rows,
                                                  None if ent is None else ent[i]))
        return torch.stack(outs), reads

    @torch.no_grad()
    def _read_positions(self, q, keys, win, key_pos, src, rows, ent):
        """What each query of one sequence read: (token positions [T, m], attention mass summed
        over heads [T, m], -1 / 0 where unused). q [T, H, D], keys [L, D], win [T, W]; src /
        rows: the pool and the row indices the kernel read; ent [T, k]: the entries' own indices
        (for their token positions). Recomputes the selected logits (cheap at decode); a
        compressed entry's mass is spread evenly over the `ratio` tokens of its window."""
        T, H, D = q.shape
        r = max(self.ratio, 1)
        logits = []
        for c, s in [(win, keys)] + ([] if ent is None else [(rows, src)]):
            sel = s[c.clamp_min(0)].float()                                            # [T, K, D]
            lg = torch.einsum("thd,tkd->thk", q.float(), sel) * self.head_dim ** -0.5
            logits.append(lg.masked_fill((c < 0)[:, None, :], float("-inf")))
        sink = self.attn_sink.float().view(1, H, 1).expand(T, H, 1)
        mass = torch.cat(logits + [sink], -1).softmax(-1)[..., :-1].sum(1)                # [T, K_all]
        W = win.shape[-1]
        pos = [torch.where(win >= 0, key_pos[win.clamp_min(0)], torch.full_like(win, -1))]
        ms = [mass[..., :W]]
        if ent is not None:
            tok = (ent.clamp_min(0)[..., None] * r + torch.arange(r, device=q.device)).flatten(1)  # [T, K * r]
            used = (ent >= 0)[..., None].expand(-1, -1, r).flatten(1)
            pos.append(torch.where(used, tok, torch.full_like(tok, -1)))
            ms.append((mass[..., W:, None] / r).expand(-1, -1, r).flatten(1))
        pos, ms = torch.cat(pos, -1), torch.cat(ms, -1)
        return torch.where(ms > 0, pos, torch.full_like(pos, -1)), ms


def _pad_stack(reads: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (positions [T, m_b], mass [T, m_b]) -> ([B, T, max m], [B, T, max m]), padded
    with position -1 / mass 0 (rows of a decode batch read different numbers of entries)."""
    m = max(p.shape[-1] for p, _ in reads)
    pos = torch.stack([F.pad(p, (0, m - p.shape[-1]), value=-1) for p, _ in reads])
    mass = torch.stack([F.pad(w, (0, m - w.shape[-1]), value=0.0) for _, w in reads])
    return pos, mass
