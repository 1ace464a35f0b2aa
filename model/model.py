"""DeepSeek-V3.2 (DSA) in plain PyTorch, in paper order:
config -> RMSNorm -> YaRN RoPE -> lightning Indexer -> MLA (sparse) -> MoE -> Block -> Transformer.

Follows the official fixed inference code (indexer RoPE half-split, not interleaved) and
`transformers.DeepseekV32ForCausalLM`; module and parameter names are the official ones
(`attn.wq_a`, `ffn.experts.3.w1`, ...), `model/load.py` maps HF checkpoint names onto them.
The GLM-5 family (`transformers.GlmMoeDsaForCausalLM`) is the same network with an interleaved
indexer RoPE (`cfg.index_rope_interleaved`) and a per-layer indexer plan (`cfg.indexer_types`):
a "shared" layer has no indexer and attends to the keys its previous full layer selected
(`Selection`, passed down the layers of one forward).

Layout: [B, T, H, D] (batch, tokens, heads, dims). Attention runs per sequence over the cache
(`model/cache.py`), so sequences of one batch may sit at different positions (batched decode).

    .venv/bin/python examples/model_demo.py --context 512 --new 4      # build dsa-tiny and generate
    .venv/bin/python -m pytest -q tests/model/test_parity.py          # parity with transformers
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsa_rag.kernels.indexer import indexer_decode_topk, indexer_topk
from dsa_rag.kernels.sparse_mla import sparse_mla
from dsa_rag.model import fp8
from dsa_rag.model.cache import ContiguousLayerCache
from dsa_rag.model.config import ModelConfig


# ---------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)  # fp32 weight x fp32 statistics, cast back as V3.2 does


class LayerNorm(nn.LayerNorm):
    """The indexer's key norm: fp32 statistics and fp32 affine parameters, output cast back to the
    input dtype (V3.2's `F.layer_norm(x.float(), ...).type_as(x)`)."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


# ---------------------------------------------------------------- RoPE (YaRN)
def rope_inv_freq(dim: int, base: float, yarn=None) -> torch.Tensor:
    """Inverse frequencies of `dim` rotary channels (dim / 2 of them), YaRN-blended when `yarn`
    (anything with factor, original_max_position_embeddings, beta_fast, beta_slow: RopeScaling,
    V4's YarnScaling) has factor > 1. V3.2's and V4's RoPE both take theirs from here."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn is None or yarn.factor <= 1:
        return inv

    def corr_dim(rot):
        return dim * math.log(yarn.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(corr_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (high-frequency dims keep their frequency)
    return inv / yarn.factor * (1 - keep) + inv * keep


def yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the qk_rope_head_dim rotary dims and the cos/sin attention factor."""
    inv = rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    rs = cfg.rope_scaling
    if rs is None or rs.factor <= 1:
        return inv, 1.0

    # transformers scales cos/sin by mscale(factor, mscale)/mscale(factor, mscale_all_dim): 1.0 for V3.2.
    def mscale(m):
        return 0.1 * m * math.log(rs.factor) + 1.0

    att = mscale(rs.mscale) / mscale(rs.mscale_all_dim) if rs.mscale and rs.mscale_all_dim else mscale(1.0)
    return inv, float(att)


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv, self.attention_factor = yarn_inv_freq(cfg)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, positions: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, rope_dim / 2] (fp32 unless `dtype` says otherwise;
        the rope functions rotate in fp32 whatever the activation dtype)."""
        f = positions.float()[..., None] * self.inv_freq.to(positions.device)
        return (f.cos() * self.attention_factor).to(dtype), (f.sin() * self.attention_factor).to(dtype)


def rope_interleaved(x, cos, sin):
    """MLA RoPE: pairs (2i, 2i+1). x [B, T, (H,) d]; cos/sin [B, T, d/2]. Output stays interleaved.
    Rotates in fp32 and casts back to x.dtype (V3.2's apply_rotary_emb)."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    xf, cos, sin = x.float(), cos.float(), sin.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2).to(x.dtype)


def rope_half(x, cos, sin):
    """Indexer RoPE (the V3.2 fix): pairs (i, i + d/2), NeoX style; fp32 math, cast back."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    xf, cos, sin = x.float(), cos.float(), sin.float()
    h = x.shape[-1] // 2
    x1, x2 = xf[..., :h], xf[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def rope_pairs_interleaved(x, cos, sin):
    """GLM-5's indexer RoPE: interleaved pairs (2i, 2i+1) rotated, the output in half-split order
    (evens' results, then odds'), as transformers' apply_rotary_pos_emb_interleave returns it:
    rope_half of the de-interleaved input."""
    return rope_half(torch.cat([x[..., 0::2], x[..., 1::2]], -1), cos, sin)


# ---------------------------------------------------------------- lightning indexer
def combine_heads(dots, w, score: str, lse=None):
    """Index scores from per-head dot products dots [..., H, S] and head weights w [..., H] (what
    Indexer.queries returns): "relu" (V3.2) sum_h w_h ReLU(dot_h); "mixture" logsumexp_h(w_h + dot_h);
    "softmax_mixture" logsumexp_h(w_h + dot_h - lse_h), lse [..., H] each head's log-normalizer over
    the query's causal keys (head_lse)."""
    if score == "relu":
        return torch.einsum("...hs,...h->...s", dots.relu(), w)
    if score == "softmax_mixture":
        if lse is None:
            raise ValueError("index_score 'softmax_mixture' needs each head's log-normalizer (lse)")
        w = w - lse
    return (dots + w[..., None]).logsumexp(-2)


def head_lse(dots, q_pos):
    """Each indexer head's log-normalizer over the causal keys: dots [..., T, H, S] of queries at key
    indices q_pos [T] (query t sees keys 0..q_pos[t]) -> [..., T, H]."""
    causal = torch.arange(dots.shape[-1], device=dots.device)[None] <= q_pos[:, None]  # [T, S]
    return dots.masked_fill(~causal[:, None, :], float("-inf")).logsumexp(-1)


class Indexer(nn.Module):
    """Scores I[t,s] (the attention keeps the top-k s), by cfg.index_score, with d_h = q[t,h].k[s]:
      "relu" (V3.2's):     sum_h w[t,h] * D^-1/2 * ReLU(d_h)
      "mixture":           log sum_h exp(b[t,h] + D^-1/2 d_h)
      "softmax_mixture":   log sum_h exp(b[t,h]) softmax_s(D^-1/2 d_h)   (softmax over causal keys)

    Why the mixtures: the indexer learns to imitate p_t, the dense attention summed over heads, which
    is a sum of per-head softmaxes. Each head's softmax divides by its own normalizer, which depends
    on every key the query sees; "softmax_mixture" has exactly that form (softmax(I) = sum_h pi_h
    softmax_h with pi = softmax(b)), where a ReLU sum can only approximate it. It costs one more pass
    over the keys (each head's normalizer), fused into dsa_rag.kernels.indexer.indexer_topk. The shipped
    dsa-tiny weights use it; the recall figures are in dsa-tiny's MODEL_CARD.md ("Measured" and
    "Indexer score study")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        # V3.2 rotates (i, i + d/2) pairs, GLM-5 interleaved ones (see ModelConfig.index_rope_interleaved).
        self.rope = rope_pairs_interleaved if cfg.index_rope_interleaved else rope_half
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = LayerNorm(self.head_dim, eps=1e-6)
        # Kept in fp32 in V3.2 (called on x.float()).
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False, dtype=torch.float32)

    def keys(self, x, cos, sin):
        """x [B, T, dim] -> (k [B, T, D], k_scale [B, T] or None): what the indexer key cache holds."""
        k = self.k_norm(self.wk(x))
        k = torch.cat([self.rope(k[..., : self.rope_dim], cos, sin), k[..., self.rope_dim:]], -1)
        if not self.cfg.fp8_numerics:
            return k, None
        k8, ks = fp8.act_quant(fp8.rotate(k), self.head_dim)
        return k8, ks.squeeze(-1)

    def queries(self, x, qr, cos, sin):
        """-> (q [B, T, H, D], w [B, T, H] fp32): for "relu" w holds every scale but k's; for
        the mixtures q holds d^-1/2 and w is the heads' log-weights b (no FP8 path: validate() refuses it)."""
        B, T, _ = x.shape
        q = self.wq_b(qr).view(B, T, self.n_heads, self.head_dim)
        q = torch.cat([self.rope(q[..., : self.rope_dim], cos, sin), q[..., self.rope_dim:]], -1)
        if self.cfg.index_score != "relu":
            return q * self.head_dim**-0.5, self.weights_proj(x.float())
        w = self.weights_proj(x.float()) * (self.n_heads**-0.5 * self.head_dim**-0.5)
        if not self.cfg.fp8_numerics:
            return q, w
        q8, qs = fp8.act_quant(fp8.rotate(q), self.head_dim)
        return q8, w * qs.squeeze(-1)


# ---------------------------------------------------------------- MLA with sparse attention
class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        self.n_heads = cfg.num_attention_heads
        self.dn, self.dr, self.dv, self.r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.wq_a = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank)
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * (self.dn + self.dr), bias=False)
        self.wkv_a = nn.Linear(cfg.hidden_size, self.r + self.dr, bias=False)
        self.kv_norm = RMSNorm(self.r)
        self.wkv_b = nn.Linear(self.r, self.n_heads * (self.dn + self.dv), bias=False)
        self.wo = nn.Linear(self.n_heads * self.dv, cfg.hidden_size, bias=False)
        # A "shared" layer of the indexer plan has no indexer (and its checkpoint no indexer tensors).
        self.indexer = Indexer(cfg) if cfg.layer_has_indexer(layer_id) else None
        self.scale = cfg.softmax_scale

    def _select(self, iq, iw, c, end: int, sp: int):
        """Top-k key indices [T, topk] of the queries at sp.. over the cached keys 0..end-1."""
        return indexer_topk(iq, c.index_k(end), iw, self.cfg.index_topk, k_scale=c.index_scale(end), start_pos=sp,
                            score=self.cfg.index_score)

    def _select_decode(self, iq, iw, rows, start_pos, needs) -> dict:
        """Top-k of the decoding rows (T = 1), one indexer call per group of rows that share a
        pack's cached keys: {row: idx [1, topk]}. Rows are grouped by the storage their caches
        share (`shared_with`: forks of one pack prefix share its blocks); a group's common prefix
        is scored once for all its rows (kernels.indexer.indexer_decode_topk: one GEMM over B*H
        query heads), each row's own tail (question and answer so far) separately. A row alone
        takes its cache's contiguous run of keys as the prefix (`contiguous_keys`), so a fork whose
        blocks lie elsewhere in the pool is not gathered into a copy of its whole context. Caches
        without these methods are left to _select."""
        groups: list[tuple[int, list[int], int]] = []  # (leader, rows, common prefix length)
        for b, c in enumerate(rows):
            if not needs[b] or not hasattr(c, "shared_with"):
                continue
            end = start_pos[b] + 1
            for g, (lead, members, p) in enumerate(groups):
                shared = rows[lead].shared_with(c)
                if shared >= max(1, end // 2):  # most of this row's keys: worth scoring together
                    groups[g] = (lead, members + [b], min(p, shared))
                    break
            else:
                groups.append((b, [b], c.contiguous_keys(end)))
        out = {}
        for lead, members, p in groups:
            c0 = rows[lead]
            tails = [rows[b].index_tail(p, start_pos[b] + 1) for b in members]
            scale = c0.index_scale(p)
            idx = indexer_decode_topk(iq[members, 0], c0.index_k(p), iw[members, 0], self.cfg.index_topk,
                                      k_scale=scale, tails=[t[0] for t in tails],
                                      tail_scales=None if scale is None else [t[1] for t in tails],
                                      score=self.cfg.index_score)
            out.update({b: idx[j: j + 1] for j, b in enumerate(members)})
        return out

    def _reuse(self, selection, row: int):
        """A shared layer's keys: the previous full layer's top-k of this row."""
        idx = None if selection is None else selection[row]
        if idx is None:
            raise ValueError(f"layer {self.layer_id} is a shared-index layer: it needs the top-k of a full layer before "
                             f"it in the same forward (call the whole Transformer, or pass `selection`)")
        return idx

    def forward(self, x, cos, sin, start_pos: list[int], caches=None, mode: str = "auto", trace=None,
                selection: list | None = None):
        """x [B, T, dim]; row b holds positions start_pos[b] .. start_pos[b] + T - 1.
        caches: per row a LayerCache (or None for a fresh prefill at position 0).
        selection: per row the top-k indices [T, k] (or None: all causal keys) that the last full
        layer of this forward chose; a full layer writes it, a shared layer attends to it.
        mode: "mha" (expand keys per head), "absorb" (MQA over the latent), or "auto": MHA for dense
        prefill (compute-bound: 2*H*(dqk+dv) FLOPs per key), absorbed for decode and for sparse
        prefill, where gathering the shared 576-dim latent once per key beats gathering H expanded
        heads (FlashMLA's sparse prefill is MQA over the latent for the same reason).
        In bf16/fp16 "auto" takes the absorbed form for dense prefill too (unless dense_attention):
        the two forms agree to ~1e-6 in fp32 but round differently in 16-bit (~1e-2), which would
        make a cache depend on how its prefix was chunked; with one form, cached decoding equals
        recomputing the whole sequence, token for token. Only the first index_topk tokens are
        dense, so the cost is small."""
        B, T, _ = x.shape
        mha_ok = x.dtype == torch.float32 or self.cfg.dense_attention  # see "auto" above
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).view(B, T, self.n_heads, self.dn + self.dr)
        q_nope, q_pe = q[..., : self.dn], rope_interleaved(q[..., self.dn:], cos, sin)
        kv = self.wkv_a(x)
        c_kv = self.kv_norm(kv[..., : self.r])
        if self.cfg.fp8_numerics:  # V3.2 caches c_kv in FP8 (k_pe stays bf16)
            c_kv = fp8.fp8_roundtrip(c_kv, min(self.cfg.quant_block, self.r))
        kv = torch.cat([c_kv, rope_interleaved(kv[..., self.r:], cos, sin)], -1)  # [B, T, r + dr]
        full = self.indexer is not None
        ik, iks = self.indexer.keys(x, cos, sin) if full else (None, None)
        # Indexer queries only matter when some row has more causal keys than top-k keeps
        # (and never in dense mode); the keys are always computed, the cache needs them.
        sparse = not self.cfg.dense_attention and max(start_pos) + T > self.cfg.index_topk
        iq, iw = self.indexer.queries(x, qr, cos, sin) if sparse and full else (None, None)
        rows = []
        for b in range(B):
            sp = start_pos[b]
            if caches is None or caches[b] is None:
                if sp != 0:
                    raise ValueError("a forward at start_pos > 0 needs a cache holding the earlier tokens")
                c = ContiguousLayerCache.over(kv[b], None if ik is None else ik[b], None if iks is None else iks[b])
            else:
                c = caches[b]
                c.write(sp, kv[b], None if ik is None else ik[b], None if iks is None else iks[b])
            rows.append(c)
        needs = [not self.cfg.dense_attention and sp + T > self.cfg.index_topk for sp in start_pos]
        decoded = self._select_decode(iq, iw, rows, start_pos, needs) if full and T == 1 else {}
        outs = []
        for b, c in enumerate(rows):
            sp, end = start_pos[b], start_pos[b] + T
            idx = None
            if needs[b]:
                idx = decoded.get(b)
                if idx is None:
                    idx = self._select(iq[b], iw[b], c, end, sp) if full else self._reuse(selection, b)
            if full and selection is not None:
                selection[b] = idx
            # idx None: every causal key fits in top-k (or dense mode) -> DSA == dense causal attention.
            row_mode = mode if mode != "auto" else ("mha" if idx is None and T > 1 and mha_ok else "absorb")
            if row_mode == "mha":
                o = self._attend_mha(q_nope[b], q_pe[b], c.kv(end), idx, sp)
            else:
                o = self._attend_absorbed(q_nope[b], q_pe[b], c, end, idx, sp, trace, b)
            outs.append(o)
        o = torch.stack(outs).flatten(2)  # [B, T, H * dv]
        return self.wo(o)

    # --- MHA form: k_nope, v = wkv_b(c_kv) per head ---------------------------------------
    def _expand(self, kv_all):
        kvb = self.wkv_b(kv_all[:, : self.r]).view(-1, self.n_heads, self.dn + self.dv)
        k_nope, v = kvb[..., : self.dn], kvb[..., self.dn:]
        k_pe = kv_all[:, None, self.r:].expand(-1, self.n_heads, -1)
        return torch.cat([k_nope, k_pe], -1), v  # [S, H, dn + dr], [S, H, dv]

    def _attend_mha(self, q_nope, q_pe, kv_all, idx, sp):
        q = torch.cat([q_nope, q_pe], -1)  # [T, H, dqk]
        k, v = self._expand(kv_all)
        if idx is None:
            return dense_attention(q, k, v, sp, self.scale)
        # Sparse MHA through the MQA kernel, one head at a time: with kv_h = [v_h | k_h] and
        # q_h' = [0 | q_h], q_h'.kv_h = q_h.k_h and the values are kv_h[:, :dv] = v_h (exact).
        outs = []
        zeros = q.new_zeros(q.shape[0], 1, self.dv)
        for h in range(self.n_heads):
            kv_h = torch.cat([v[:, h], k[:, h]], -1)
            q_h = torch.cat([zeros, q[:, h: h + 1]], -1)
            outs.append(sparse_mla(q_h, kv_h, idx, v_dim=self.dv, scale=self.scale)[0])
        return torch.cat(outs, 1)  # [T, H, dv]

    # --- absorbed (MQA) form over the latent cache -------------------------------------------
    def _attend_absorbed(self, q_nope, q_pe, cache, end, idx, sp, trace=None, row=0):
        w = self.wkv_b.weight.view(self.n_heads, self.dn + self.dv, self.r)
        q_c = torch.einsum("thd,hdr->thr", q_nope, w[:, : self.dn])  # q_nope absorbed into W_UK
        q576 = torch.cat([q_c, q_pe], -1)  # [T, H, r + dr]
        if idx is None:
            idx = causal_indices(q576.shape[0], end, sp, q576.device)
        # The kernel gathers rows straight from the cache's storage (paged caches translate the
        # token positions to rows), so no [S, D] copy of the context is made per step.
        pool, phys = cache.kv_pool(), cache.physical(idx)
        o_c, lse = sparse_mla(q576, pool, phys, v_dim=self.r, scale=self.scale)
        if trace is not None:
            trace(self.layer_id, row, idx, attention_mass(q576, pool, phys, lse, self.scale))
        return torch.einsum("thr,hvr->thv", o_c, w[:, self.dn:])  # out through W_UV


def causal_indices(T: int, S: int, start_pos: int, device) -> torch.Tensor:
    """All causal keys as an index list [T, S] (-1 beyond each query's position)."""
    ar = torch.arange(S, device=device, dtype=torch.int32)
    pos = torch.arange(start_pos, start_pos + T, device=device)[:, None]
    return torch.where(ar[None] <= pos, ar[None], torch.full_like(ar[None], -1))


def attention_mass(q, kv, idx, lse, scale):
    """Attention probability of each selected key, summed over heads: [T, k] (0 for -1 slots)."""
    valid = idx >= 0
    g = kv[idx.clamp_min(0).long()]  # [T, k, D]
    logits = torch.einsum("thd,tkd->thk", q.float(), g.float()) * scale
    p = torch.exp(logits - lse.float()[..., None]).sum(1)
    return torch.where(valid, p, torch.zeros_like(p))


def dense_attention(q, k, v, start_pos, scale, max_elems: int = 1 << 26):
    """Causal attention of queries at start_pos.. over keys 0..S-1, chunked over queries so the
    [H, Tc, S] score block stays under max_elems. q [T, H, D], k [S, H, D], v [S, H, Dv]."""
    T, H, _ = q.shape
    S = k.shape[0]
    kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # [H, S, D]
    step = max(1, max_elems // max(1, H * S))
    outs = []
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        qt = q[t0:t1].transpose(0, 1)
        pos = torch.arange(start_pos + t0, start_pos + t1, device=q.device)[:, None]
        mask = torch.arange(S, device=q.device)[None] <= pos
        outs.append(F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.cat(outs, 0)


# ---------------------------------------------------------------- MLP / MoE
class MLP(nn.Module):
    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)

    def forward(self, x):
        """SwiGLU; the gate product runs in fp32 and is cast back before w2 (as V3.2's MLP/Expert)."""
        return self.w2((F.silu(self.w1(x).float()) * self.w3(x).float()).to(x.dtype))


class Gate(nn.Module):
    """Sigmoid router with group-limited selection (noaux_tc). `bias` = e_score_correction_bias,
    used only to choose experts, never in the weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32), requires_grad=False)

    def forward(self, x):
        c = self.cfg
        s = F.linear(x.float(), self.weight.float()).sigmoid()  # [N, E]
        choice = s + self.bias
        if c.n_group > 1:
            g = choice.view(-1, c.n_group, c.n_routed_experts // c.n_group)
            gscore = g.topk(2, -1)[0].sum(-1) if g.shape[-1] >= 2 else g.amax(-1)
            keep = torch.zeros_like(gscore).scatter_(1, gscore.topk(c.topk_group, -1)[1], 1.0).bool()
            choice = choice.masked_fill(~keep.repeat_interleave(c.n_routed_experts // c.n_group, 1), float("-inf"))
        idx = choice.topk(c.num_experts_per_tok, -1)[1]
        w = s.gather(1, idx)
        if c.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * c.routed_scaling_factor, idx


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x):
        """Routed experts weighted by the fp32 router weights and summed in fp32 with the shared
        expert, then cast back to x.dtype (V3.2's MoE keeps its accumulator in fp32)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.gate(x)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        counts = torch.bincount(idx.flatten(), minlength=len(self.experts)).tolist()
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok, slot = torch.where(idx == e)
            y.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        return (y + self.shared_experts(x)).to(x.dtype).view(shape)


# ---------------------------------------------------------------- block / transformer
class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size) if layer_id < cfg.first_k_dense_replace else MoE(cfg)

    def forward(self, h, cos, sin, start_pos, caches=None, mode="auto", trace=None, selection=None):
        h = h + self.attn(self.attn_norm(h), cos, sin, start_pos, caches, mode, trace, selection)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=torch.float32)
        self.rotary = Rotary(cfg)

    def forward(self, input_ids, start_pos=0, caches=None, mode: str = "auto", trace=None,
                last_only: bool = False):
        """input_ids [B, T] -> logits [B, T, vocab] fp32 (or [B, 1, vocab] with last_only).
        start_pos: int or one per row; caches: per row a list of per-layer caches (or None =
        fresh prefill from position 0). trace(layer, row, indices [T, k], mass [T, k]) is called
        by absorbed-form attention with the selected keys and their attention mass."""
        B, T = input_ids.shape
        sp = [int(start_pos)] * B if isinstance(start_pos, int) else [int(s) for s in start_pos]
        if max(sp) + T > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {max(sp) + T} tokens exceeds max_position_embeddings={self.cfg.max_position_embeddings}")
        pos = torch.tensor(sp, device=input_ids.device)[:, None] + torch.arange(T, device=input_ids.device)
        h = self.embed(input_ids)  # the activation dtype: the embedding's (build_model / load_model `dtype`)
        cos, sin = self.rotary(pos)
        selection = [None] * B  # the last full layer's top-k per row, for the shared layers after it
        for i, layer in enumerate(self.layers):
            lc = None if caches is None else [None if c is None else c[i] for c in caches]
            h = layer(h, cos, sin, sp, lc, mode, trace, selection)
        if last_only:
            h = h[:, -1:]
        return self.head(self.norm(h).float())

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Random init (tests, benchmarks, training from scratch): normal(std) linears, unit norms."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("gate.bias") or name.endswith(".bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
        return self
