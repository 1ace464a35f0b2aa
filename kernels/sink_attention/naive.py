"""Sparse attention with a per-head sink, reference: pure PyTorch, fp32 math, dense mask form.

The oracle of `dsa_rag.kernels.sink_attention.sparse_sink_attention` (same signature). The two
sources are concatenated and the whole [T, H, S] is materialized: small shapes only.

    logits[t, h, s] = scale * q[t, h] . kv[s]           for s in indices[t] (-1 = none)
    p               = softmax over [logits[t, h, :], sink[h]]   (the sink takes mass, adds no value)
    out[t, h]       = sum_s p[t, h, s] kv[s]

Run the tests:  .venv/bin/python -m pytest -q tests/kernels/test_sink_attention.py
"""

from __future__ import annotations

import torch


def sparse_sink_attention(q, kv, indices, sink, *, scale, extra_kv=None, extra_indices=None):
    """q [T, H, D], kv [S, D], indices [T, K] int (-1 = none), sink [H] (+ a second source
    extra_kv [S2, D] / extra_indices [T, K2]) -> out [T, H, D] q.dtype."""
    if extra_kv is not None:
        S = kv.shape[0]
        kv = torch.cat([kv, extra_kv.to(kv.dtype)])
        indices = torch.cat([indices.long(), torch.where(extra_indices >= 0, extra_indices.long() + S, -1)], 1)
    T, H, D = q.shape
    S = kv.shape[0]
    mask = torch.zeros(T, S + 1, dtype=torch.bool, device=q.device)
    mask.scatter_(1, torch.where(indices >= 0, indices.long(), S), True)
    mask = mask[:, :S]
    kvf = kv.float().masked_fill(~mask.any(0)[:, None], 0.0)  # unselected rows never enter the math
    logits = (scale * torch.einsum("thd,sd->ths", q.float(), kvf)).masked_fill(~mask[:, None, :], float("-inf"))
    logits = torch.cat([logits, sink.float().view(1, H, 1).expand(T, H, 1)], -1)
    p = logits.softmax(-1)[..., :S]
    return torch.einsum("ths,sd->thd", p, kvf).to(q.dtype)
