"""Sparse attention with a per-head attention sink over two K=V sources in one call: DeepSeek-V4's
core attention (its sliding-window rows plus the compressed entries it reads).

    sparse_sink_attention(q, kv, indices, sink, *, scale, extra_kv=None, extra_indices=None) -> [T, H, D]

A sink is a per-head logit that joins the softmax but carries no value. Each source goes through
the sparse MLA op (every backend: naive / torch / triton, kernels/dispatch.py), which returns its
softmax output and logsumexp; the sources and the sink then merge exactly:
    out = (out_1 e^lse_1 + out_2 e^lse_2) / (e^lse_1 + e^lse_2 + e^sink)
So neither source is copied (V4's compressed pool stays where the cache keeps it) and a row that
selects nothing from a source (lse -inf) just gets no mass from it.
naive.py is the dense fp32 reference, the sink in the softmax.

Test: .venv/bin/python -m pytest -q tests/kernels/test_sink_attention.py
"""

from __future__ import annotations

import torch

from dsa_rag.kernels.checks import FLOAT_DTYPES, check_tensor
from dsa_rag.kernels.sparse_mla import sparse_mla

__all__ = ["sparse_sink_attention"]


def sparse_sink_attention(q, kv, indices, sink, *, scale, extra_kv=None, extra_indices=None):
    """Sparse MQA over selected rows of one shared K=V head (one or two sources), with a sink.

    Args:
        q: [T, H, D] bf16/fp16/fp32 queries.
        kv: [S, D] same dtype family; each row is both key and value (V4: the window rows).
        indices: [T, K] int32/int64 rows of kv per query, -1 = none; valid entries unique, < S.
        sink: [H] fp32 sink logits.
        scale: softmax scale applied to q . kv.
        extra_kv: [S2, D] or None, a second source (V4: the compressed entries).
        extra_indices: [T, K2] rows of extra_kv per query (-1 = none); given iff extra_kv is.
    Returns:
        out [T, H, D] in q.dtype = sum over selected rows r of p[r] row_r, p = softmax over all
        selected logits and the sink. A row that selects nothing gives 0 (all mass on the sink).
    """
    check_tensor("q", q, ("T", "H", "D"), FLOAT_DTYPES)
    T, H, D = q.shape
    check_tensor("sink", sink, (H,), FLOAT_DTYPES, q.device)
    if (extra_kv is None) != (extra_indices is None):
        raise ValueError("extra_kv and extra_indices: give both or neither")
    parts = [sparse_mla(q, kv, indices, v_dim=D, scale=scale)]
    if extra_kv is not None:
        parts.append(sparse_mla(q, extra_kv, extra_indices, v_dim=D, scale=scale))
    lses = torch.stack([lse for _, lse in parts] + [sink.float().expand(T, H)])          # [n + 1, T, H]
    w = torch.softmax(lses, 0)[:-1]                                                      # sources' shares
    out = sum(o.float() * wi[..., None] for (o, _), wi in zip(parts, w))
    return out.to(q.dtype)
