"""Sparse MLA, fast CPU PyTorch path: chunked over T, gather + bmm, analytic chunked backward.

Forward, per chunk of Tc query rows (memory O(Tc * K * (D + H)), never [T, H, S]):

    g      = kv[clamp(idx, 0)]                        [Tc, K, D] gather (index_select)
    logits = scale * bmm(q_c, g^T)                    [Tc, H, K], -inf where idx == -1
    lse    = logsumexp(logits); p = exp(logits - lse) fp32 softmax
    out    = bmm(p, g[..., :v_dim])                   [Tc, H, v_dim]

GEMMs run in fp32 for fp32 and fp16 inputs; for bf16 inputs in bf16 (fp32 accumulate) where the
CPU has native bf16 GEMMs, else in fp32 on the gathered rows (`dispatch.lowp_math_dtype`);
softmax and lse always in fp32. kv (often a whole cache pool) is never converted as a whole: the gathered
rows are, when its dtype is not the math dtype (fp16). Backward (torch.autograd.Function) recomputes g and p per chunk from the
saved lse (FlashAttention style: delta = rowsum(dout * out)) and scatters dkv with index_add_.

Test: .venv/bin/python -m pytest -q tests/kernels/test_sparse_mla.py
Bench: .venv/bin/python benchmarks/kernels_cpu.py
"""

from __future__ import annotations

import torch

from dsa_rag.kernels.precision import lowp_math_dtype

CHUNK_BYTES = 32 << 20  # per-chunk working set target (24-48 MiB measured best on 2 cores)


def _math_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float32 if q.dtype == torch.float32 else lowp_math_dtype(q)


def _t_chunk(H: int, K: int, D: int, elem: int) -> int:
    per_row = K * (D * elem + H * 4 * 3)  # gathered rows + fp32 logits/probs
    return max(1, CHUNK_BYTES // max(per_row, 1))


def _gather(kv, idx):
    """kv [S, D], idx [Tc, K] (-1 = none) -> g [Tc, K, D], valid [Tc, K] bool, flat clamped idx."""
    valid = idx >= 0
    flat = idx.clamp(min=0).reshape(-1).long()
    return kv.index_select(0, flat).view(*idx.shape, kv.shape[1]), valid, flat


def _probs(q_c, g, valid, scale, lse=None):
    """fp32 softmax probs [Tc, H, K] and lse [Tc, H] (-inf on rows without a valid index)."""
    logits = torch.bmm(q_c, g.transpose(1, 2)).float().mul_(scale)
    logits.masked_fill_(~valid[:, None, :], float("-inf"))
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp_(logits.sub_(lse_safe[..., None])), lse


def _forward(q, kv, indices, v_dim, scale):
    T, H, D = q.shape
    K = indices.shape[1]
    dt = _math_dtype(q)
    out = torch.empty(T, H, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    tc = min(_t_chunk(H, K, D, torch.empty((), dtype=dt).element_size()), max(T, 1))
    # Buffers reused by every chunk: fresh multi-MB allocations page-fault on every call and
    # cost as much as the gather itself on this CPU.
    g_buf = torch.empty(tc * K, D, dtype=dt, device=q.device)
    s_buf = torch.empty(tc, H, K, dtype=dt, device=q.device)  # logits, then probs, in dt
    l_buf = torch.empty(tc, H, K, dtype=torch.float32, device=q.device) if dt != torch.float32 else s_buf
    o_buf = torch.empty(tc, H, D, dtype=dt, device=q.device)
    for t0 in range(0, T, tc):
        t1 = min(t0 + tc, T)
        n = t1 - t0
        idx = indices[t0:t1]
        valid = idx >= 0
        flat = idx.clamp(min=0).reshape(-1).long()
        if kv.dtype == dt:
            g = torch.index_select(kv, 0, flat, out=g_buf[: n * K]).view(n, K, D)
        else:  # convert the selected rows only
            g = g_buf[: n * K].copy_(kv.index_select(0, flat)).view(n, K, D)
        s = torch.bmm(q[t0:t1].to(dt), g.transpose(1, 2), out=s_buf[:n])  # [n, H, K]
        logits = l_buf[:n]
        if logits is not s:
            logits.copy_(s)
        logits.mul_(scale).masked_fill_(~valid[:, None, :], float("-inf"))
        lse_c = torch.logsumexp(logits, dim=-1)  # [n, H]
        lse_safe = torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c))
        p = torch.exp_(logits.sub_(lse_safe[..., None]))  # empty rows: exp(-inf) = 0
        if p is not s:
            s.copy_(p)
        # values = the first v_dim columns; multiplying all D contiguous columns and slicing is
        # faster than a bmm on the strided [n, K, v_dim] view
        o = torch.bmm(s, g, out=o_buf[:n])
        out[t0:t1] = o[..., :v_dim]
        lse[t0:t1] = lse_c
    return out, lse


def _backward(q, kv, indices, out, lse, dout, dlse, v_dim, scale):
    T, H, D = q.shape
    K = indices.shape[1]
    dt = _math_dtype(q)
    dq = torch.empty(T, H, D, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
    tc = _t_chunk(H, K, D, torch.empty((), dtype=dt).element_size() * 3)
    for t0 in range(0, T, tc):
        t1 = min(t0 + tc, T)
        g, valid, flat = _gather(kv, indices[t0:t1])
        g = g.to(dt)
        q_c = q[t0:t1].to(dt)
        p, _ = _probs(q_c, g, valid, scale, lse[t0:t1])  # [Tc, H, K] fp32
        do = dout[t0:t1].float()  # [Tc, H, v]
        delta = (do * out[t0:t1].float()).sum(-1)  # [Tc, H]
        dp = torch.bmm(do.to(dt), g[..., :v_dim].transpose(1, 2)).float()  # [Tc, H, K]
        ds = dp.sub_(delta[..., None])
        if dlse is not None:
            ds.add_(dlse[t0:t1].float()[..., None])
        ds = ds.mul_(p).mul_(scale).to(dt)  # d logits_raw = p * (dp - delta + dlse) * scale
        dq[t0:t1] = torch.bmm(ds, g).float()
        dg = torch.bmm(ds.transpose(1, 2), q_c).float()  # [Tc, K, D]
        dg[..., :v_dim] += torch.bmm(p.to(dt).transpose(1, 2), do.to(dt)).float()
        dg.masked_fill_(~valid[..., None], 0.0)
        dkv.index_add_(0, flat, dg.view(-1, D))
    return dq.to(q.dtype), dkv.to(kv.dtype)


class SparseMLA(torch.autograd.Function):
    """Any sparse_mla forward (`fwd`: this file's or Triton's) with the chunked torch backward."""

    @staticmethod
    def forward(ctx, q, kv, indices, v_dim, scale, fwd):
        out, lse = fwd(q, kv, indices, v_dim, scale)
        ctx.save_for_backward(q, kv, indices, out, lse)
        ctx.v_dim, ctx.scale = v_dim, scale
        ctx.mark_non_differentiable(indices)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, kv, indices, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dkv = _backward(q, kv, indices, out, lse, dout, dlse, ctx.v_dim, ctx.scale)
        return dq, dkv, None, None, None, None


def differentiable(fwd):
    """The public op over a forward: autograd only when a gradient is wanted."""

    def sparse_mla(q, kv, indices, *, v_dim, scale):
        if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
            return SparseMLA.apply(q, kv, indices, v_dim, scale, fwd)
        return fwd(q, kv, indices, v_dim, scale)

    return sparse_mla


sparse_mla = differentiable(_forward)
