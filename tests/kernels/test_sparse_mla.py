"""sparse_mla (kernels.sparse_mla): every backend against naive.py, forward and gradients.

Awkward sizes (T=63, K=37, D=24), dsa-tiny head shape (D=144 = 128 latent + 16 rope), no rope
(v_dim == D), -1 padding, rows with no valid index (out 0, lse -inf), fp32 and bf16.
Run: .venv/bin/python -m pytest -q tests/kernels/test_sparse_mla.py
"""

import pytest
import torch

from dsa_rag.kernels.sparse_mla import sparse_mla
from dsa_rag.kernels.sparse_mla import naive

from .conftest import DEVICE, rms_ratio

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

# (T, H, D, v_dim, S, K)
CASES = [
    pytest.param((63, 3, 24, 16, 90, 37), id="T63-H3-D24-v16-K37"),
    pytest.param((9, 8, 144, 128, 300, 37), id="tiny-H8-D144-v128"),
    pytest.param((5, 16, 32, 32, 64, 70), id="no-rope-K70-gt-S"),
    pytest.param((1, 4, 48, 32, 1000, 64), id="decode-T1"),
]
DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in TOL]


def make_inputs(T, H, D, S, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    kv = torch.randn(S, D, generator=g).to(dtype)
    n = min(K, S)
    idx = torch.full((T, K), -1, dtype=torch.int32)
    for t in range(T):  # unique valid indices, a ragged number per row, shuffled with the -1s
        m = int(torch.randint(1, n + 1, (1,), generator=g))
        row = torch.cat([torch.randperm(S, generator=g)[:m], torch.full((K - m,), -1)])
        idx[t] = row[torch.randperm(K, generator=g)].int()
    if T > 3:
        idx[3] = -1  # a row with nothing selected
    if T > 1:
        idx[0, :] = -1
        idx[0, :n] = torch.arange(n)  # a full row in order
    return q.to(DEVICE), kv.to(DEVICE), idx.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_naive(backend, small_blocks, case, dtype):
    T, H, D, v, S, K = case
    q, kv, idx = make_inputs(T, H, D, S, K, dtype)
    scale = D**-0.5
    ref_out, ref_lse = naive.sparse_mla(q, kv, idx, v_dim=v, scale=scale)
    out, lse = sparse_mla(q, kv, idx, v_dim=v, scale=scale)
    assert out.shape == (T, H, v) and out.dtype == dtype
    assert lse.shape == (T, H) and lse.dtype == torch.float32
    empty = (idx < 0).all(dim=1)
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
    assert torch.isfinite(lse[~empty]).all() and torch.isfinite(out).all()
    assert rms_ratio(out.float(), ref_out.float()) < TOL[dtype]
    assert rms_ratio(lse[~empty], ref_lse[~empty]) < TOL[dtype] / 10


def test_int64_indices_and_noncontiguous_q(backend):
    T, H, D, v, S, K = 6, 4, 40, 32, 50, 9
    q, kv, idx = make_inputs(T, H, D, S, K, torch.float32, seed=4)
    q_nc = torch.randn(T, D, H, device=DEVICE).transpose(1, 2)  # [T, H, D] view, strided
    ref_out, ref_lse = naive.sparse_mla(q_nc, kv, idx, v_dim=v, scale=0.1)
    out, lse = sparse_mla(q_nc, kv, idx.long(), v_dim=v, scale=0.1)
    assert rms_ratio(out, ref_out) < 1e-5
    ok = ~torch.isneginf(ref_lse)
    assert torch.equal(ok, ~torch.isneginf(lse)) and rms_ratio(lse[ok], ref_lse[ok]) < 1e-5


@pytest.mark.parametrize("case", CASES[:2])
def test_gradients_match_naive(backend, small_blocks, case):
    """dq and dkv of (out . dout + lse . dlse) vs naive's autograd, fp32."""
    T, H, D, v, S, K = case
    q, kv, idx = make_inputs(T, H, D, S, K, torch.float32, seed=5)
    g = torch.Generator().manual_seed(6)
    dout = torch.randn(T, H, v, generator=g).to(DEVICE)
    dlse = torch.randn(T, H, generator=g).to(DEVICE)
    grads = []
    for fn in (naive.sparse_mla, sparse_mla):
        qq, kk = q.clone().requires_grad_(), kv.clone().requires_grad_()
        out, lse = fn(qq, kk, idx, v_dim=v, scale=0.3)
        fin = torch.isfinite(lse)
        loss = (out * dout).sum() + (lse[fin] * dlse[fin]).sum()
        loss.backward()
        grads.append((qq.grad, kk.grad))
    (dq_ref, dkv_ref), (dq, dkv) = grads
    assert rms_ratio(dq, dq_ref) < 1e-5
    assert rms_ratio(dkv, dkv_ref) < 1e-5
    assert dkv_ref.abs().sum() > 0 and dq_ref.abs().sum() > 0


def test_gradients_bf16_close(monkeypatch):
    """bf16 inputs: gradients come back in bf16 and stay within bf16 tolerance of fp32 naive."""
    monkeypatch.setenv("DSA_KERNEL_BACKEND", "torch")
    T, H, D, v, S, K = 12, 8, 144, 128, 100, 37
    q, kv, idx = make_inputs(T, H, D, S, K, torch.float32, seed=7)
    dout = torch.randn(T, H, v, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    qa, ka = q.clone().requires_grad_(), kv.clone().requires_grad_()
    (naive.sparse_mla(qa, ka, idx, v_dim=v, scale=0.1)[0] * dout).sum().backward()
    qb, kb = q.bfloat16().requires_grad_(), kv.bfloat16().requires_grad_()
    (sparse_mla(qb, kb, idx, v_dim=v, scale=0.1)[0].float() * dout).sum().backward()
    assert qb.grad.dtype == torch.bfloat16 and kb.grad.dtype == torch.bfloat16
    assert rms_ratio(qb.grad.float(), qa.grad) < 2e-2
    assert rms_ratio(kb.grad.float(), ka.grad) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_v32_shape_on_gpu(monkeypatch):
    monkeypatch.setenv("DSA_KERNEL_BACKEND", "triton")
    T, H, D, v, S, K = 64, 128, 576, 512, 4096, 2048
    q, kv, idx = make_inputs(T, H, D, S, K, torch.bfloat16)
    ref_out, ref_lse = naive.sparse_mla(q, kv, idx, v_dim=v, scale=0.135)
    out, lse = sparse_mla(q, kv, idx, v_dim=v, scale=0.135)
    ok = torch.isfinite(ref_lse)
    assert rms_ratio(out.float(), ref_out.float()) < 1e-2
    assert rms_ratio(lse[ok], ref_lse[ok]) < 1e-3
