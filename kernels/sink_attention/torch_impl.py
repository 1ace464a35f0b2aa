"""Sparse sink attention, torch path: two sparse MLA calls merged with the sink (no copy of a source).

Each source goes through the torch sparse MLA (kernels/sparse_mla/torch_impl.py: chunked gather +
bmm, autograd), which returns its softmax output and logsumexp; the sources and the sink then
merge exactly:
    out = (out_1 e^lse_1 + out_2 e^lse_2) / (e^lse_1 + e^lse_2 + e^sink)
so neither source is copied (V4's compressed pool stays where the cache keeps it) and a row that
selects nothing from a source (lse -inf) just gets no mass from it. Differentiable w.r.t. q, kv,
extra_kv and sink. The fast CPU path, and what a CUDA call falls back to when the Triton kernel
does not compile (kernels/dispatch.py).

Test: .venv/bin/python -m pytest -q tests/kernels/test_sink_attention.py -k torch
"""

from __future__ import annotations

import torch

from dsa_rag.kernels.sparse_mla.torch_impl import sparse_mla


def sparse_sink_attention(q, kv, indices, sink, *, scale, extra_kv=None, extra_indices=None):
    """q [T, H, D], kv [S, D], indices [T, K] int (-1 = none), sink [H] (+ a second source
    extra_kv [S2, D] / extra_indices [T, K2]) -> out [T, H, D] q.dtype."""
    T, H, D = q.shape
    parts = [sparse_mla(q, kv, indices, v_dim=D, scale=scale)]
    if extra_kv is not None:
        parts.append(sparse_mla(q, extra_kv, extra_indices, v_dim=D, scale=scale))
    lses = torch.stack([lse for _, lse in parts] + [sink.float().expand(T, H)])          # [n + 1, T, H]
    w = torch.softmax(lses, 0)[:-1]                                                      # sources' shares
    out = sum(o.float() * wi[..., None] for (o, _), wi in zip(parts, w))
    return out.to(q.dtype)
