"""indexer_decode_topk (B decoding queries over a shared key prefix plus their own tails, one
call) and the T = 1 path of indexer_topk that uses it: every backend against naive.py.

Cases: B = 1 and several rows, tails of different lengths (one empty), an empty prefix,
P + tail < topk (padding), H = 3 and B * H = 15 (off the triton kernel's tiles), V3.2's 64 x 128
heads, fp32 / bf16 / FP8 with key scales, all three scores; the triton mixtures in row chunks.
Run: .venv/bin/python -m pytest -q tests/kernels/test_indexer_decode.py
"""

import pytest
import torch

from dsa_rag.kernels.indexer import indexer_decode_topk, indexer_topk, naive

from .conftest import DEVICE
from .test_indexer import FP8, check_topk, make_inputs

# (B, P, tail lengths, H, D, topk)
CASES = [
    pytest.param((1, 300, None, 8, 64, 37), id="B1-P300-no-tails"),
    pytest.param((3, 250, (5, 0, 17), 4, 32, 40), id="B3-P250-tails"),
    pytest.param((2, 0, (30, 9), 3, 16, 12), id="empty-prefix"),
    pytest.param((4, 20, (3, 0, 1, 8), 2, 32, 48), id="fewer-keys-than-topk"),
    pytest.param((2, 160, (4, 6), 16, 64, 24), id="H16"),
    # H = 3 (not a power of 2), B * H = 15 (not a multiple of 16), P = 70 (off the key tiles):
    # the triton kernel's padded heads / rows and several row blocks per key tile
    pytest.param((5, 70, (2, 0, 3, 1, 0), 3, 16, 20), id="B5-H3-P70"),
    pytest.param((2, 90, (3, 1), 64, 128, 30), id="v32-H64-D128"),
]
DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in (torch.float32, torch.bfloat16, FP8)]
SCORES = ["relu", "mixture", "softmax_mixture"]


def make_decode_inputs(B, P, tails, H, D, dtype, seed):
    """q [B, H, D], prefix k [P, D], w [B, H], prefix scale, per-row tails and their scales."""
    n = list(tails) if tails else [0] * B
    q, kall, w, ks = make_inputs(B, P + sum(n), H, D, dtype, seed=seed)
    if dtype != FP8:  # a positive key scale on float keys too (the mixtures' k_scale)
        ks = (torch.rand(kall.shape[0], generator=torch.Generator().manual_seed(seed + 1)) + 0.5).to(DEVICE)
    q = q if dtype == FP8 else q * 2  # peakier heads: per-head normalizers differ
    cuts = torch.tensor([P] + n).cumsum(0).tolist()
    tk = [kall[a:b] for a, b in zip(cuts[:-1], cuts[1:])] if tails else None
    ts = [ks[a:b] for a, b in zip(cuts[:-1], cuts[1:])] if tails else None
    return q, kall[:P], w, ks[:P], tk, ts


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_decode_topk_matches_naive(backend, small_blocks, case, dtype, score):
    if dtype == FP8 and score != "relu":
        pytest.skip("the mixtures take float q/k only")
    B, P, tails, H, D, topk = case
    q, k, w, ks, tk, ts = make_decode_inputs(B, P, tails, H, D, dtype, seed=3)
    idx = indexer_decode_topk(q, k, w, topk, k_scale=ks, tails=tk, tail_scales=ts, score=score)
    ref = naive.indexer_decode_topk(q, k, w, topk, k_scale=ks, tails=tk, tail_scales=ts, score=score)
    assert idx.shape == (B, topk) and idx.dtype == torch.int32
    for b in range(B):  # each row against the oracle scores of its own key list
        kb = k if tk is None else torch.cat([k, tk[b]])
        ksb = ks if tk is None else torch.cat([ks, ts[b]])
        S = kb.shape[0]
        wb = w[b: b + 1]
        if score == "softmax_mixture":
            wb, sc = wb - naive.indexer_head_lse(q[b: b + 1], kb, k_scale=ksb, start_pos=S - 1), "mixture"
        else:
            sc = score
        scores = naive.indexer_logits(q[b: b + 1], kb, wb, k_scale=ksb, start_pos=S - 1, score=sc)
        check_topk(idx[b: b + 1], ref[b: b + 1], scores, (1, S, S - 1, H, D, topk), dtype)


@pytest.mark.parametrize("score", ["mixture", "softmax_mixture"])
def test_triton_mixture_row_chunks(monkeypatch, score):
    """The triton mixtures launch row chunks when E (rows * H * P fp32) passes E_BUDGET: one
    row per launch here gives the same top-k as one launch for all rows."""
    from dsa_rag.kernels.indexer import triton_decode

    monkeypatch.setenv("DSA_KERNEL_BACKEND", "triton")
    q, k, w, ks, tk, ts = make_decode_inputs(3, 100, (2, 0, 5), 4, 32, torch.float32, seed=5)
    one = indexer_decode_topk(q, k, w, 16, k_scale=ks, tails=tk, tail_scales=ts, score=score)
    monkeypatch.setattr(triton_decode, "E_BUDGET", 1)
    chunked = indexer_decode_topk(q, k, w, 16, k_scale=ks, tails=tk, tail_scales=ts, score=score)
    assert torch.equal(one, chunked)


@pytest.mark.parametrize("score", SCORES)
def test_topk_single_query_takes_the_decode_path_and_matches_the_prefill_path(small_blocks, monkeypatch, score):
    """indexer_topk with T = 1 (the engine's decode step) routes to the decode path on the torch
    backend; the blocked prefill path (a two-query call, its second row) picks the same keys."""
    monkeypatch.setenv("DSA_KERNEL_BACKEND", "torch")
    S, H, D, topk = 400, 8, 32, 50
    q, k, w, _ = make_inputs(2, S, H, D, torch.float32, seed=12)
    one = indexer_topk(q[1:], k, w[1:], topk, start_pos=S - 1, score=score)
    two = indexer_topk(q, k, w, topk, start_pos=S - 2, score=score)[1:]
    assert torch.equal(one.sort(1).values, two.sort(1).values)
    # a query before the end of k: the future keys are not candidates
    mid = indexer_topk(q[1:], k, w[1:], topk, start_pos=120, score=score)
    assert int(mid.max()) <= 120 and torch.equal(mid, naive.indexer_topk(q[1:], k, w[1:], topk, start_pos=120,
                                                                            score=score))


def test_decode_topk_rejects_bad_tails():
    q, k, w, _ = make_inputs(2, 10, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="tails"):
        indexer_decode_topk(q, k, w, 3, tails=[k[:2]])
    with pytest.raises(ValueError, match="tails"):
        indexer_decode_topk(q, k, w, 3, tails=[k[:2], k[:2, :8]])
    with pytest.raises(ValueError, match="tail_scales"):
        indexer_decode_topk(q, k, w, 3, k_scale=torch.ones(10), tails=[k[:2], k[:1]])
    with pytest.raises(ValueError, match="w"):
        indexer_decode_topk(q, k, w[:1], 3)


@pytest.mark.parametrize("R,P", [(8, 1), (8, 4099), (16, 37), (64, 301)])
def test_cpu_dots_extension_matches_mm(R, P):
    """The AVX2 key-major product of kernels/indexer/cpu_dots.py (fp32, query rows in groups of 8,
    a key count off the 8-key step) against torch.mm; it declines what it does not handle."""
    from dsa_rag.kernels.indexer import cpu_dots

    if cpu_dots._module() is None:
        pytest.skip("no AVX2 / compiler here: the decode path uses torch.mm (tested above)")
    g = torch.Generator().manual_seed(R + P)
    k, q = torch.randn(P, 64, generator=g), torch.randn(R, 64, generator=g)
    out = torch.full((P, R), float("nan"))
    old, cpu_dots.MIN_KEYS = cpu_dots.MIN_KEYS, 0
    try:
        mx = cpu_dots.dots_into(out, k, q)
        assert cpu_dots.dots_into(torch.empty(P, R + 4), k, torch.randn(R + 4, 64)) is None  # not a multiple of 8
        assert cpu_dots.dots_into(out.clone(), k.bfloat16(), q) is None
    finally:
        cpu_dots.MIN_KEYS = old
    torch.testing.assert_close(out, k @ q.t(), rtol=1e-5, atol=1e-4)
    assert torch.equal(mx, out.amax(0))  # the column maxima it returns are those of its own output


def test_decode_mixtures_shift_only_when_exp_needs_it(small_blocks, monkeypatch):
    """The mixtures skip the max subtraction when every head's max dot lies in [0, EXP_SAFE]; with
    dots far above (overflow) or all below zero (early underflow) they shift. Same top-k as naive
    either way."""
    from dsa_rag.kernels.indexer import torch_decode

    monkeypatch.setenv("DSA_KERNEL_BACKEND", "torch")
    for shift in (0.0, 150.0, -150.0):
        q, k, w, ks, tk, ts = make_decode_inputs(2, 200, (3, 5), 8, 16, torch.float32, seed=21)
        q[..., 0], k[:, 0] = 10.0, shift / 10.0  # every dot moves by `shift`, in every head alike
        tk = [t.clone() for t in tk]
        for t in tk:
            t[:, 0] = shift / 10.0
        for score in ("mixture", "softmax_mixture"):
            idx = indexer_decode_topk(q, k, w, 30, tails=tk, score=score)
            ref = naive.indexer_decode_topk(q, k, w, 30, tails=tk, score=score)
            for b in range(2):
                kb = torch.cat([k, tk[b]])
                wb, sc = w[b: b + 1], score
                if score == "softmax_mixture":
                    wb = wb - naive.indexer_head_lse(q[b: b + 1], kb, start_pos=kb.shape[0] - 1)
                    sc = "mixture"
                scores = naive.indexer_logits(q[b: b + 1], kb, wb, start_pos=kb.shape[0] - 1, score=sc)
                check_topk(idx[b: b + 1], ref[b: b + 1], scores, (1, kb.shape[0], kb.shape[0] - 1, 8, 16, 30),
                           torch.float32)
    assert torch_decode.EXP_SAFE < 88.0
