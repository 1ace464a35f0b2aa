"""Sparse MLA: MQA attention of each query row over its own top-k rows of the latent KV cache.

    sparse_mla(q, kv, indices, *, v_dim, scale) -> (out [T, H, v_dim], lse [T, H])

Backends: naive.py (fp32 dense-mask reference), torch_impl.py (fast CPU, autograd),
triton.py (GPU / interpreter forward; backward in torch). Chosen by kernels/dispatch.py.
Test: .venv/bin/python -m pytest -q tests/kernels/test_sparse_mla.py
"""

from __future__ import annotations

import torch

from dsa_rag.kernels import dispatch
from dsa_rag.kernels.checks import FLOAT_DTYPES, check_tensor

__all__ = ["sparse_mla"]


def sparse_mla(q, kv, indices, *, v_dim, scale):
    """Sparse attention over selected latent-cache rows (absorbed MLA / MQA form).

    Args:
        q: [T, H, D] bf16/fp16/fp32, D = latent + rope dims (576 in V3.2, 144 in dsa-tiny).
        kv: [S, D] same dtype family, the cached [c_kv | k_pe]; values are kv[:, :v_dim].
        indices: [T, K] int32/int64 rows of kv per query, -1 = none; valid entries unique, < S.
        v_dim: value width (<= D), e.g. 512 (V3.2) or 128 (dsa-tiny).
        scale: softmax scale applied to q . kv.
    Returns:
        out [T, H, v_dim] in q.dtype = softmax(scale * q . kv[idx]^T) @ kv[idx, :v_dim]
        lse [T, H] fp32 natural-log logsumexp of the scaled logits over valid indices.
        Rows with no valid index: out = 0, lse = -inf. Differentiable w.r.t. q and kv.
    """
    check_tensor("q", q, ("T", "H", "D"), FLOAT_DTYPES)
    T, H, D = q.shape
    check_tensor("kv", kv, ("S", D), FLOAT_DTYPES, q.device)
    check_tensor("indices", indices, (T, "K"), (torch.int32, torch.int64), q.device)
    if not isinstance(v_dim, int) or not 0 < v_dim <= D:
        raise ValueError(f"v_dim: expected an int in [1, {D}] (D of q), got {v_dim!r}")
    if not kv.is_cuda and indices.numel() and int(indices.max()) >= kv.shape[0]:
        raise ValueError(f"indices: expected values in [-1, {kv.shape[0]}) (rows of kv), got max {int(indices.max())}")
    return dispatch.call("sparse_mla", "sparse_mla", q, kv, indices, v_dim=v_dim, scale=float(scale))
