"""Sparse MLA decode (kernels/sparse_mla/decode.py): the split-K launch and its combine vs naive.py.

Decode shapes: B rows of one query each over one shared pool (rows of different sequences in one
call), ragged -1 padding, a row whose indices are all -1, splits 1 and > 1 (forced, and the
automatic plan), fp32 and bf16, dsa-tiny's head shape and a V3.2-like one (576 = 512 + 64 with
the value split of the sm_90 config forced on). Runs the Triton kernels under TRITON_INTERPRET=1.
Run: TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/kernels/test_sparse_mla_decode.py
"""

import pytest
import torch

from dsa_rag.kernels.dispatch import Target
from dsa_rag.kernels.sparse_mla import decode, naive
from dsa_rag.kernels.sparse_mla import triton as mla_triton

from .conftest import DEVICE, rms_ratio

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def decode_inputs(B, H, D, S, K, dtype, seed=0):
    """q [B, H, D], one pool kv [S, D], per-row indices [B, K]: row 0 full, row 1 (B > 1) all -1,
    the others a ragged number of valid rows with -1 padding at the end (as indexer_topk pads)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    kv = torch.randn(S, D, generator=g).to(dtype)
    idx = torch.full((B, K), -1, dtype=torch.int32)
    for b in range(B):
        n = K if b == 0 else int(torch.randint(1, K + 1, (1,), generator=g))
        idx[b, :n] = torch.randperm(S, generator=g)[:n].int()
    if B > 1:
        idx[1] = -1
    return q.to(DEVICE), kv.to(DEVICE), idx.to(DEVICE)


def check(q, kv, idx, v, out, lse, dtype):
    ref_out, ref_lse = naive.sparse_mla(q, kv, idx, v_dim=v, scale=q.shape[-1] ** -0.5)
    empty = (idx < 0).all(dim=1)
    assert out.shape == ref_out.shape and out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
    assert torch.isfinite(lse[~empty]).all() and torch.isfinite(out).all()
    assert rms_ratio(out.float(), ref_out.float()) < TOL[dtype]
    assert rms_ratio(lse[~empty], ref_lse[~empty]) < TOL[dtype] / 10


# (B, H, D, v_dim, S, K)
SHAPES = [
    pytest.param((1, 8, 144, 128, 300, 96), id="tiny-B1"),
    pytest.param((3, 8, 144, 128, 300, 96), id="tiny-B3"),
    pytest.param((3, 5, 40, 24, 90, 37), id="B3-H5-K37-ragged"),
]


@pytest.mark.parametrize("dtype", [pytest.param(d, id=str(d)[6:]) for d in TOL])
@pytest.mark.parametrize("splits", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", SHAPES)
def test_split_decode_matches_naive(shape, splits, dtype):
    B, H, D, v, S, K = shape
    q, kv, idx = decode_inputs(B, H, D, S, K, dtype)
    out, lse = mla_triton._forward(q, kv, idx, v, D**-0.5, num_splits=splits)
    check(q, kv, idx, v, out, lse, dtype)


@pytest.mark.parametrize("B", [1, 3])
def test_automatic_split_through_public_op(monkeypatch, B):
    """The public op on T = B decode rows takes the split path by itself (small grid)."""
    from dsa_rag.kernels.sparse_mla import sparse_mla

    monkeypatch.setenv("DSA_KERNEL_BACKEND", "triton")
    calls = []
    real = decode.combine
    monkeypatch.setattr(decode, "combine", lambda *a: calls.append(a[0].shape[1]) or real(*a))
    q, kv, idx = decode_inputs(B, 8, 144, 300, 96, torch.float32, seed=B)
    out, lse = sparse_mla(q, kv, idx, v_dim=128, scale=144**-0.5)
    assert calls and calls[0] > 1, calls  # split-K ran, then the combine
    check(q, kv, idx, 128, out, lse, torch.float32)


def test_v32_like_value_split_with_k_split(monkeypatch):
    """The V3.2 sm_90 layout (value dims over 2 programs) combined with the K split, D = 576 = 512 + 64."""
    orig = mla_triton.launch_config

    def split_config(*a, **k):
        cfg = orig(*a, **k)
        return dict(cfg, DV_SPLIT=2, BLOCK_DV=cfg["BLOCK_DV"] // 2)

    monkeypatch.setattr(mla_triton, "launch_config", split_config)
    q, kv, idx = decode_inputs(2, 4, 576, 80, 48, torch.float32, seed=3)
    out, lse = mla_triton._forward(q, kv, idx, 512, 576**-0.5, num_splits=3)
    check(q, kv, idx, 512, out, lse, torch.float32)


def test_all_rows_empty():
    q, kv, idx = decode_inputs(2, 8, 144, 80, 64, torch.float32)
    idx[:] = -1
    out, lse = mla_triton._forward(q, kv, idx, 128, 0.1, num_splits=4)
    assert torch.isneginf(lse).all() and (out == 0).all()


@pytest.mark.parametrize("programs, K, block_k, sms, want", [
    (2, 2048, 32, 132, 16),     # V3.2 B=1 on sm_90: 2 programs (value halves) -> 16 splits of 128 indices
    (128, 2048, 32, 132, 2),    # V3.2 B=64: 128 programs -> 264 / 128 -> 2 splits
    (264, 2048, 32, 132, 1),    # >= 2 waves: no split
    (1, 256, 64, 132, 2),       # dsa-tiny B=1: K = 256 caps it at 2 splits of 128
    (64, 256, 64, 132, 2),      # dsa-tiny B=64 (one 16-row head block per row)
    (8192, 2048, 32, 132, 1),   # prefill
])
def test_split_plan(programs, K, block_k, sms, want):
    splits, k_split = decode.split_plan(programs, K, block_k, Target("cuda", (9, 0), sms))
    assert splits == want
    assert k_split % block_k == 0 and (splits - 1) * k_split < K <= splits * k_split
    if splits > 1:
        assert k_split >= decode.MIN_SPLIT_KEYS


def test_split_plan_forced_is_clamped():
    t = Target("cuda", (9, 0), 132)
    assert decode.split_plan(4, 100, 32, t, num_splits=16) == (4, 32)  # at most one split per block
    assert decode.split_plan(4, 100, 32, t, num_splits=3) == (2, 64)  # ceil(100/3) = 34 -> 64 (whole blocks): 2 splits
    assert decode.split_plan(4, 100, 32, t, num_splits=1) == (1, 100)
