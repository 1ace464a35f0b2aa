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


@pytest.mark.parametrize("case", [
    pytest.param((7, 8, 48, 32, 90, 37), id="H8-D48-v32"),
    pytest.param((6, 5, 40, 24, 60, 21), id="H5-D40-v24-ragged-halves"),
    pytest.param((4, 4, 32, 32, 50, 19), id="no-rope"),
])
def test_triton_dv_split_matches_naive(monkeypatch, case):
    """The V3.2 sm_90 configuration's DV_SPLIT=2 path (value dims in two programs, each also
    computing the other half's logits), forced on the interpreter at small shapes."""
    from dsa_rag.kernels.sparse_mla import triton as mla_triton

    orig = mla_triton.launch_config

    def split_config(*a, **k):
        cfg = orig(*a, **k)
        return dict(cfg, DV_SPLIT=2, BLOCK_DV=cfg["BLOCK_DV"] // 2)

    monkeypatch.setenv("DSA_KERNEL_BACKEND", "triton")
    monkeypatch.setattr(mla_triton, "launch_config", split_config)
    T, H, D, v, S, K = case
    q, kv, idx = make_inputs(T, H, D, S, K, torch.float32)
    ref_out, ref_lse = naive.sparse_mla(q, kv, idx, v_dim=v, scale=D**-0.5)
    out, lse = mla_triton._forward(q, kv, idx, v, D**-0.5)
    ok = torch.isfinite(ref_lse)
    assert torch.isneginf(lse[~ok]).all() and (out[~ok] == 0).all()
    assert rms_ratio(out, ref_out) < 1e-5
    assert rms_ratio(lse[ok], ref_lse[ok]) < 1e-6


def test_v32_sm90_config_has_no_repeated_qk():
    """V3.2 on sm_90: each warpgroup owns 64 of the 128 heads (BLOCK_H = 2 x 64, 8 warps), so the
    QK^T is one wgmma sequence with N = BLOCK_K; the value dims are split over 2 programs."""
    from dsa_rag.kernels.dispatch import Target
    from dsa_rag.kernels.sparse_mla import triton as mla_triton

    cfg = mla_triton.launch_config(128, 512, 576, torch.bfloat16, Target("cuda", (9, 0)))
    assert cfg["BLOCK_H"] == 64 * cfg["num_warps"] // 4 and cfg["DV_SPLIT"] * cfg["BLOCK_DV"] == 512
    for cap in ((8, 0), (10, 0)):  # mma.sync / tcgen05 targets keep BLOCK_H = 64, no split
        assert mla_triton.launch_config(128, 512, 576, torch.bfloat16, Target("cuda", cap))["DV_SPLIT"] == 1
