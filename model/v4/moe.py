"""DeepSeek-V4's feed-forward: DeepSeekMoE with clamped SwiGLU experts, a `sqrtsoftplus` router,
and hash routing on the first layers.

- Expert / shared expert: w2(silu(min(w1 x, limit)) * clamp(w3 x, -limit, limit)); the clamp
  (`swiglu_limit`) bounds the activations V4 was trained with.
- Router ("moe" layers): scores = sqrt(softplus(x W^T)); the top-k of scores + bias pick the
  experts, the picked scores (normalized to sum 1, times routed_scaling_factor) weight them.
- Hash router ("hash_moe" layers): the experts are a frozen table lookup tid2eid[token id];
  the learned scores still weight them.

    .venv/bin/python -m pytest -q tests/model/test_deepseek_v4.py -p no:cacheprovider
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsa_rag.model.v4.config import V4Config


class Expert(nn.Module):
    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.w1(x).clamp(max=self.limit)
        up = self.w3(x).clamp(min=-self.limit, max=self.limit)
        return self.w2(F.silu(gate) * up)


def router_scores(logits: torch.Tensor, func: str) -> torch.Tensor:
    if func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if func == "sigmoid":
        return logits.sigmoid()
    return logits.softmax(-1)


class Gate(nn.Module):
    def __init__(self, cfg: V4Config, hashed: bool):
        super().__init__()
        self.hashed, self.topk, self.func = hashed, cfg.num_experts_per_tok, cfg.scoring_func
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.topk, dtype=torch.long))
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim], tokens [N] -> (weights [N, k], expert indices [N, k])."""
        scores = router_scores(F.linear(x, self.weight), self.func)
        if self.hashed:
            idx = self.tid2eid[tokens].long()
        else:
            idx = torch.topk(scores + self.bias, self.topk, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scale, idx


class MoE(nn.Module):
    def __init__(self, cfg: V4Config, layer: int):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.gate = Gate(cfg, hashed=cfg.mlp_layer_types[layer] == "hash_moe")
        inter, lim = cfg.moe_intermediate_size, cfg.swiglu_limit
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, inter, lim) for _ in range(cfg.n_routed_experts))
        self.shared_experts = Expert(cfg.hidden_size, inter, lim)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim], tokens [B, T] -> [B, T, dim]."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        w, idx = self.gate(flat, tokens.reshape(-1))
        out = torch.zeros_like(flat)
        for e in torch.unique(idx).tolist():  # only the experts some token picked
            rows, slot = torch.where(idx == e)
            y = self.experts[e](flat[rows]) * w[rows, slot, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return (out + self.shared_experts(flat)).view(shape)
