"""The DeepSeek-V4 network in plain PyTorch, in paper order: hyper-connections -> block ->
transformer. Attention (window + CSA/HCA) is in attention.py, the compressors in compress.py, the
MoE in moe.py; parameter names are those of DeepSeek's official V4 release (`layers.3.attn.wq_a`,
`layers.3.hc_attn_fn`, ...), load.py maps transformers' names onto them.

Manifold-constrained hyper-connections (mHC): the residual is `hc_mult` parallel streams
[B, T, N, hidden]. Before each sub-block a small fp32 projection of the RMS-normed, flattened
streams gives `pre` (collapse the N streams into the block input), `post` (spread the block
output back over N streams) and `comb` (an N x N mixing of the residual streams, pushed towards a
doubly-stochastic matrix by Sinkhorn iterations so the residual cannot blow up):
    streams = post * block(sum_j pre_j stream_j) + comb^T @ streams.
The embedding starts as N copies; a last `pre`-only collapse (hc_head) feeds the final norm.

`Transformer.forward(tokens, cache=None)`: tokens [B, T] -> logits [B, T, vocab]. With a
`V4Cache` (cache.py; or a paged one, paged.py) the tokens continue what the cache holds and the
cache is extended, so chunked prefill and token-by-token decode reproduce one full forward. A list
of one-row caches runs a decode batch of different sequences in one forward.

    .venv/bin/python -m pytest -q tests/model/test_deepseek_v4.py -p no:cacheprovider
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsa_rag.model.v4.attention import Attention
from dsa_rag.model.v4.cache import V4Cache
from dsa_rag.model.v4.config import V4Config
from dsa_rag.model.v4.moe import MoE
from dsa_rag.model.v4.ops import RMSNorm, Rotary, rms_unweighted


def hc_weights(streams, fn, base, scale, n: int, iters: int, eps: float, norm_eps: float):
    """streams [B, T, N, D] -> (pre [B, T, N], post [B, T, N], comb [B, T, N, N]), all fp32."""
    flat = rms_unweighted(streams.flatten(2).float(), norm_eps)
    mix = F.linear(flat, fn.float())
    pre_w, post_w, comb_w = mix.split([n, n, n * n], -1)
    pre_b, post_b, comb_b = base.float().split([n, n, n * n])
    pre = torch.sigmoid(pre_w * scale[0] + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
    comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * scale[2] + comb_b.view(n, n), -1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)   # columns first, then alternate (Sinkhorn)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return (pre.unsqueeze(-1) * streams).sum(2).to(streams.dtype)


def expand(streams, out, post, comb):
    """post * out on every stream + comb^T mixing of the residual streams (comb[j, k]: j -> k)."""
    dt = streams.dtype
    return post.to(dt).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dt).transpose(-1, -2), streams)


class Block(nn.Module):
    def __init__(self, cfg: V4Config, layer: int):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.hc_mult, cfg.hidden_size
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ffn = MoE(cfg, layer)
        k = (2 + n) * n
        for site in ("attn", "ffn"):  # fp32, as the reference keeps them
            setattr(self, f"hc_{site}_fn", nn.Parameter(torch.zeros(k, n * d, dtype=torch.float32)))
            setattr(self, f"hc_{site}_base", nn.Parameter(torch.zeros(k, dtype=torch.float32)))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.ones(3, dtype=torch.float32)))

    def _hc(self, site: str, streams):
        c = self.cfg
        return hc_weights(streams, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_base"),
                          getattr(self, f"hc_{site}_scale"), c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)

    def forward(self, streams, tokens, positions, caches, rotary, trace=None):
        """caches: this layer's LayerCache(s), one for all rows or one per row (Attention.forward)."""
        pre, post, comb = self._hc("attn", streams)
        out = self.attn(self.attn_norm(collapse(streams, pre)), positions, caches, rotary, trace)
        streams = expand(streams, out, post, comb)
        pre, post, comb = self._hc("ffn", streams)
        out = self.ffn(self.ffn_norm(collapse(streams, pre)), tokens)
        return expand(streams, out, post, comb)


class Transformer(nn.Module):
    def __init__(self, cfg: V4Config):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.hc_mult, cfg.hidden_size
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.hc_head_fn = nn.Parameter(torch.zeros(n, n * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)

    def new_cache(self) -> V4Cache:
        return V4Cache.empty(self.cfg)

    def hidden(self, tokens: torch.Tensor, cache: V4Cache | list[V4Cache] | None = None,
               trace: list | None = None) -> torch.Tensor:
        """tokens [B, T] -> final-normed hidden states [B, T, hidden]; extends the cache(s).
        cache: one V4Cache holding all B rows (same length), or a list of B one-row caches of
        different lengths (a decode batch: one forward for every request of a step).
        trace: a list that gets, per layer, what the attention read (Attention.forward)."""
        B, T = tokens.shape
        caches = [cache if cache is not None else self.new_cache()] if not isinstance(cache, list) else cache
        if len(caches) not in (1, B):
            raise ValueError(f"{len(caches)} caches for a batch of {B} rows: give one V4Cache or a list of {B}")
        start = torch.tensor([c.length for c in caches], device=tokens.device)
        positions = (torch.arange(T, device=tokens.device) + start[:, None]).expand(B, -1)  # [B, T]
        h = self.embed(tokens)
        streams = h.unsqueeze(2).expand(-1, -1, self.cfg.hc_mult, -1).contiguous()   # [B, T, N, D]
        for i, layer in enumerate(self.layers):
            streams = layer(streams, tokens, positions, [c.layers[i] for c in caches], self.rotary, trace)
        for c in caches:
            c.length += T
        flat = rms_unweighted(streams.flatten(2).float(), self.cfg.rms_norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.hc_head_fn.float()) * self.hc_head_scale.float()
                            + self.hc_head_base.float()) + self.cfg.hc_eps
        return self.norm(collapse(streams, pre))

    def forward(self, tokens: torch.Tensor, cache: V4Cache | None = None) -> torch.Tensor:
        return self.head(self.hidden(tokens, cache))

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> "Transformer":
        """Seeded random init of every parameter (norm weights 1, biases / sinks 0), and a random
        but fixed hash-routing table: what tests and tiny checkpoints start from."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("_scale"):
                p.fill_(1.0)
            elif name.endswith(("bias", "_base", "attn_sink", "ape")):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in self.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(self.cfg.n_routed_experts, generator=g)[: b.shape[1]]
                                     for _ in range(b.shape[0])]))
        return self
