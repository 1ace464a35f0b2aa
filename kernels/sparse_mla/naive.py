"""Sparse MLA (MQA over the latent cache) reference: pure PyTorch, fp32 math, dense mask form.

Oracle for every other sparse_mla backend (tests/kernels/test_sparse_mla.py). Differentiable, so
the tests also compare gradients against it. Materializes [T, H, S]: small shapes only.

    logits[t, h, s] = scale * q[t, h] . kv[s]            for s in indices[t] (-1 = none)
    out[t, h]       = softmax_s(logits[t, h]) @ kv[s, :v_dim]
    lse[t, h]       = logsumexp_s(logits[t, h])           (natural log; -inf and out = 0 if no index)

Run the tests:  .venv/bin/python -m pytest -q tests/kernels -k sparse_mla
"""

from __future__ import annotations

import torch


def sparse_mla(q, kv, indices, *, v_dim, scale):
    """q [T, H, D], kv [S, D], indices [T, K] int (-1 = none) -> (out [T, H, v_dim] q.dtype, lse [T, H] fp32)."""
    T, H, D = q.shape
    S = kv.shape[0]
    qf, kvf = q.float(), kv.float()
    valid = indices >= 0
    # mask[t, s] = True where s is selected for query t (scatter through a dummy column S for -1)
    mask = torch.zeros(T, S + 1, dtype=torch.bool, device=q.device)
    mask.scatter_(1, torch.where(valid, indices.long(), S), True)
    mask = mask[:, :S]
    # rows no query selects never enter the math (kv may be a cache pool with unwritten rows: 0 * NaN)
    kvf = kvf.masked_fill(~mask.any(0)[:, None], 0.0)
    logits = scale * torch.einsum("thd,sd->ths", qf, kvf)  # [T, H, S]
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    has_any = mask.any(dim=-1)[:, None]  # [T, 1]
    # logsumexp of an all -inf row has a NaN gradient: give empty rows zeros, then set -inf after
    lse_safe = torch.logsumexp(logits.masked_fill(~has_any[..., None], 0.0), dim=-1)  # [T, H]
    lse = lse_safe.masked_fill(~has_any, float("-inf"))
    p = torch.exp(logits - lse_safe[..., None])  # empty rows: exp(-inf) = 0
    out = torch.einsum("ths,sv->thv", p, kvf[:, :v_dim])
    out = torch.where(has_any[..., None], out, torch.zeros_like(out))
    return out.to(q.dtype), lse
