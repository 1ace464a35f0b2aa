"""Indexer ops (kernels.indexer_logits / indexer_topk): every backend against naive.py.

Awkward sizes (T=63, S off the block grid, topk=37), start_pos > 0, decode (T=1), S < topk
(padding), the released shapes (32 or 64 heads of 128 dims), fp32 / bf16 / FP8 e4m3 with
k_scale, NaN-poisoned allocations (conftest).
Run: .venv/bin/python -m pytest -q tests/kernels/test_indexer.py
"""

import pytest
import torch

from dsa_rag.kernels.indexer import indexer_head_lse, indexer_logits, indexer_topk
from dsa_rag.kernels.indexer import naive, row_topk

from .conftest import DEVICE, rms_ratio

FP8 = torch.float8_e4m3fn
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, FP8: 1e-2}

# (T, S, start_pos, H, D, topk): S = start_pos + T is a prefill continuing a cached prefix
CASES = [
    pytest.param((63, 63, 0, 4, 32, 37), id="prefill-T63-topk37"),
    pytest.param((63, 200, 137, 3, 16, 37), id="chunk-T63-S200-start137"),
    pytest.param((1, 130, 129, 4, 32, 37), id="decode-S130"),
    pytest.param((20, 25, 5, 2, 64, 48), id="S25-lt-topk48-padding"),
    pytest.param((7, 150, 0, 5, 24, 200), id="topk-gt-S-D24"),
    # the released indexer shapes: GLM-5's 32 heads x 128, V3.2's 64 x 128 (decode over a cache)
    pytest.param((9, 140, 131, 32, 128, 40), id="glm5-H32-D128"),
    pytest.param((1, 160, 159, 64, 128, 48), id="v32-H64-D128-decode"),
]
DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in (torch.float32, torch.bfloat16, FP8)]


def make_inputs(T, S, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D, generator=g)
    k = torch.randn(S, D, generator=g)
    w = torch.randn(T, H, generator=g) / H  # mixed signs: scores can be negative
    k_scale = None
    if dtype == FP8:  # per-key absmax quantization, as the model's act_quant does
        k_scale = k.abs().amax(dim=1).clamp_min(1e-4) / 448.0
        k = (k / k_scale[:, None]).to(FP8)
        q = (q / q.abs().amax() * 200).to(FP8)
    else:
        q, k = q.to(dtype), k.to(dtype)
    mv = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return mv(q), mv(k), mv(w), mv(k_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_logits_match_naive(backend, small_blocks, case, dtype):
    T, S, sp, H, D, _ = case
    q, k, w, ks = make_inputs(T, S, H, D, dtype)
    ref = naive.indexer_logits(q, k, w, k_scale=ks, start_pos=sp)
    out = indexer_logits(q, k, w, k_scale=ks, start_pos=sp)
    assert out.shape == (T, S) and out.dtype == torch.float32
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isneginf(out), ~fin), "causal -inf pattern differs from naive"
    assert not out.isnan().any()
    assert rms_ratio(out[fin], ref[fin]) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_topk_matches_naive_scores(backend, small_blocks, case, dtype):
    T, S, sp, H, D, topk = case
    q, k, w, ks = make_inputs(T, S, H, D, dtype, seed=1)
    scores = naive.indexer_logits(q, k, w, k_scale=ks, start_pos=sp)  # [T, S] oracle
    ref = naive.indexer_topk(q, k, w, topk, k_scale=ks, start_pos=sp)
    idx = indexer_topk(q, k, w, topk, k_scale=ks, start_pos=sp)
    check_topk(idx, ref, scores, case, dtype)


def check_topk(idx, ref, scores, case, dtype):
    """idx (backend) against ref (naive top-k) and the oracle scores [T, S]: padding, causality,
    uniqueness, and the chosen keys' scores equal to the true top-k's, in descending order."""
    T, S, sp, H, D, topk = case
    assert idx.shape == (T, topk) and idx.dtype == torch.int32
    # same number of valid entries per row, all at the front, unique, causal
    n_valid = torch.clamp(torch.arange(T, device=idx.device) + sp + 1, max=S).clamp(max=topk)
    assert torch.equal((idx >= 0).sum(1), n_valid)
    assert torch.equal(idx >= 0, ref >= 0)
    pos = torch.arange(topk, device=idx.device)[None, :]
    assert torch.equal(idx >= 0, pos < n_valid[:, None]), "-1 padding must sit at the end"
    for t in range(T):
        row = idx[t, : n_valid[t]].long()
        assert row.unique().numel() == row.numel(), f"row {t}: duplicate indices"
        assert int(row.max()) <= sp + t, f"row {t}: selected a future key"
    # ties may break either way: compare the oracle scores of the chosen keys, in order
    got = scores.gather(1, idx.clamp(min=0).long()).masked_fill(idx < 0, 0.0)
    want = scores.gather(1, ref.clamp(min=0).long()).masked_fill(ref < 0, 0.0)
    scale = want.pow(2).mean().sqrt().item() + 1e-6
    # bf16 GEMM outputs (torch path) round scores to ~2^-9 relative: allow a few ulps at the max
    atol = 1e-5 * scale if dtype == torch.float32 else 5e-2 * scale
    assert (got - want).abs().max().item() <= atol, "chosen keys' scores differ from the true top-k"
    assert rms_ratio(got, want) < TOL[dtype]
    rises = (got[:, 1:] - got[:, :-1]).masked_fill(idx[:, 1:] < 0, 0.0)
    assert rises.max().item() <= atol, "not sorted by descending score"


def key_scale(S, seed):
    """A positive per-key scale [S] in [0.5, 1.5) for float keys (the mixture tests' k_scale)."""
    return (torch.rand(S, generator=torch.Generator().manual_seed(seed)) + 0.5).to(DEVICE)


MIX_DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtype", MIX_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_mixture_score_matches_naive(backend, small_blocks, case, dtype):
    """score="mixture": log sum_h exp(w + q.k * k_scale), logits and top-k, with a key scale."""
    T, S, sp, H, D, topk = case
    q, k, w, _ = make_inputs(T, S, H, D, dtype, seed=4)
    ks = key_scale(S, seed=5)
    ref = naive.indexer_logits(q, k, w, k_scale=ks, start_pos=sp, score="mixture")
    lse = (torch.einsum("thd,sd->ths", q.float(), k.float()) * ks + w[:, :, None]).logsumexp(1)
    fin = torch.isfinite(ref)
    assert torch.allclose(ref[fin], lse[fin], atol=1e-5), "naive mixture is not logsumexp_h(w + dot)"
    out = indexer_logits(q, k, w, k_scale=ks, start_pos=sp, score="mixture")
    assert torch.equal(torch.isneginf(out), ~fin) and not out.isnan().any()
    assert rms_ratio(out[fin], ref[fin]) < TOL[dtype]
    idx = indexer_topk(q, k, w, topk, k_scale=ks, start_pos=sp, score="mixture")
    check_topk(idx, naive.indexer_topk(q, k, w, topk, k_scale=ks, start_pos=sp, score="mixture"), ref, case, dtype)


@pytest.mark.parametrize("dtype", MIX_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_head_lse_matches_naive(backend, small_blocks, case, dtype):
    """Each head's log-normalizer over the causal keys (softmax_mixture's first pass)."""
    T, S, sp, H, D, _ = case
    q, k, _, _ = make_inputs(T, S, H, D, dtype, seed=6)
    ks = key_scale(S, seed=7)
    ref = naive.indexer_head_lse(q, k, k_scale=ks, start_pos=sp)
    dots = torch.einsum("thd,sd->ths", q.float(), k.float()) * ks
    for t in (0, T - 1):  # the oracle itself, row by row
        want = dots[t, :, : sp + t + 1].logsumexp(-1)
        assert torch.allclose(ref[t], want, atol=1e-5)
    out = indexer_head_lse(q, k, k_scale=ks, start_pos=sp)
    assert out.shape == (T, H) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rms_ratio(out, ref) < TOL[dtype]  # bf16: the GEMM's outputs round to ~2^-9 relative


@pytest.mark.parametrize("scaled", [False, True], ids=["no-k-scale", "k-scale"])
@pytest.mark.parametrize("dtype", MIX_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_softmax_mixture_topk_matches_naive(backend, small_blocks, case, dtype, scaled):
    """indexer_topk(score="softmax_mixture"): each head's softmax over the causal keys, mixed with
    weights softmax(w); the torch backend ranks in probability space in one call. Without key
    scales it takes its fast path (block 0's max subtracted by the GEMM), with them the per-block max."""
    T, S, sp, H, D, topk = case
    q, k, w, _ = make_inputs(T, S, H, D, dtype, seed=8)
    q = q * 2  # peakier heads than make_inputs gives, so the per-head normalizers differ
    ks = key_scale(S, seed=9) if scaled else torch.ones(S, device=DEVICE)
    lse = naive.indexer_head_lse(q, k, k_scale=ks, start_pos=sp)
    ref_scores = naive.indexer_logits(q, k, w - lse, k_scale=ks, start_pos=sp, score="mixture")
    # the oracle itself: log of the softmax(w)-weighted mixture of per-head softmaxes (+ a row constant)
    t = T - 1
    dots = torch.einsum("hd,sd->hs", q[t].float(), k[: sp + t + 1].float()) * ks[: sp + t + 1]
    mix = (w[t].softmax(0)[:, None] * dots.softmax(-1)).sum(0).log()
    got_row = ref_scores[t, : sp + t + 1]
    assert torch.allclose(got_row - got_row.max(), mix - mix.max(), atol=1e-4)
    ref = naive.indexer_topk(q, k, w, topk, k_scale=ks, start_pos=sp, score="softmax_mixture")
    assert torch.equal(ref, naive.indexer_topk(q, k, w - lse, topk, k_scale=ks, start_pos=sp, score="mixture"))
    idx = indexer_topk(q, k, w, topk, k_scale=ks if scaled else None, start_pos=sp, score="softmax_mixture")
    check_topk(idx, ref, ref_scores, case, dtype)


def test_softmax_mixture_topk_survives_dots_far_above_the_first_block(small_blocks):
    """Keys after block 0 whose dots exceed block 0's max by more than fp32's exp range: the
    torch path's reference (block 0's max) would overflow there, so it must redo those blocks
    against their own max and still rank like the naive reference."""
    T, S, H, D, topk = 5, 300, 3, 16, 20
    q, k, w, _ = make_inputs(T, S, H, D, torch.float32, seed=11)
    q[..., 0], k[:, 0] = 10.0, 0.0  # dimension 0 shifts every key's dots in every head alike:
    k[:48, 0] = -12.0  # block 0 (48 keys under small_blocks) sits 120 below the rest
    sp = S - T
    idx = indexer_topk(q, k, w, topk, start_pos=sp, score="softmax_mixture")
    ref = naive.indexer_topk(q, k, w, topk, start_pos=sp, score="softmax_mixture")
    lse = naive.indexer_head_lse(q, k, start_pos=sp)
    scores = naive.indexer_logits(q, k, w - lse, start_pos=sp, score="mixture")
    assert torch.isfinite(scores.gather(1, idx.long())).all()
    check_topk(idx, ref, scores, (T, S, sp, H, D, topk), torch.float32)


def test_mixture_score_refuses_fp8_and_unknown_scores():
    q, k, w, ks = make_inputs(4, 10, 2, 16, FP8)
    with pytest.raises(ValueError, match="mixture"):
        indexer_topk(q, k, w, 3, k_scale=ks, score="mixture")
    with pytest.raises(ValueError, match="mixture"):
        indexer_topk(q, k, w, 3, k_scale=ks, score="softmax_mixture")
    with pytest.raises(ValueError, match="mixture"):
        indexer_head_lse(q, k, k_scale=ks)
    q, k, w, _ = make_inputs(4, 10, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="score"):
        indexer_logits(q, k, w, score="softmax")
    with pytest.raises(ValueError, match="score"):  # logits: use w - indexer_head_lse with "mixture"
        indexer_logits(q, k, w, score="softmax_mixture")


@pytest.mark.parametrize("n,k", [(5000, 20), (4099, 64), (700, 37), (300, 300), (40, 64)])
def test_row_topk_by_group_maxima_is_exact(n, k):
    """row_topk.row_topk (one topk over group maxima, one over the chosen groups) keeps the same
    values as torch.topk, with heavy ties, -inf tails and rows shorter than k."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=g)
    x[1] = torch.randint(0, 5, (n,), generator=g).float()  # ties everywhere
    x[2, n // 3:] = float("-inf")  # a causal tail
    x[3] = float("-inf")
    x[3, :3] = 1.0
    vals, idx = row_topk.row_topk(x, k)
    kk = min(k, n)
    assert vals.shape == idx.shape == (6, kk)
    assert torch.equal(x.gather(1, idx), vals)
    for r in range(6):
        assert idx[r].unique().numel() == kk, f"row {r}: a key chosen twice"
    assert torch.equal(vals.sort(1).values, x.topk(kk, 1).values.sort(1).values)


def test_topk_streams_many_blocks_default_sizes():
    """Default block sizes, S spanning several 4096-key blocks, scores from the fp32 oracle."""
    T, S, H, D, topk = 6, 9000, 2, 16, 37
    q, k, w, _ = make_inputs(T, S, H, D, torch.float32, seed=2)
    idx = indexer_topk(q, k, w, topk, start_pos=S - T)
    scores = naive.indexer_logits(q, k, w, start_pos=S - T)
    want = scores.topk(topk, dim=1).values
    got = scores.gather(1, idx.long())
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_empty_cache_gives_all_padding(backend):
    T, H, D = 3, 2, 16
    q, k, w, _ = make_inputs(T, 0, H, D, torch.float32)
    assert indexer_logits(q, k, w).shape == (T, 0)
    assert torch.equal(indexer_topk(q, k, w, 5), torch.full((T, 5), -1, dtype=torch.int32, device=q.device))


@pytest.mark.parametrize("score", ["relu", "mixture"])
def test_logits_gradients_match_naive(monkeypatch, small_blocks, score):
    monkeypatch.setenv("DSA_KERNEL_BACKEND", "torch")
    T, S, sp, H, D = 9, 40, 31, 3, 16
    q, k, w, _ = make_inputs(T, S, H, D, torch.float32)
    ks = torch.rand(S, device=DEVICE) + 0.5
    grads = []
    for fn in (naive.indexer_logits, indexer_logits):
        leaves = [t.clone().requires_grad_() for t in (q, k, w)]
        out = fn(*leaves, k_scale=ks, start_pos=sp, score=score)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        (out.masked_fill(out.isneginf(), 0) * dout).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip("qkw", grads[1], grads[0]):
        assert rms_ratio(a, b) < 1e-5, f"grad of {name}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_fp8_v32_shape_on_gpu(monkeypatch):
    monkeypatch.setenv("DSA_KERNEL_BACKEND", "triton")
    T, S, H, D, topk = 256, 5000, 64, 128, 2048
    q, k, w, ks = make_inputs(T, S, H, D, FP8)
    ref = naive.indexer_logits(q, k, w, k_scale=ks, start_pos=S - T)
    out = indexer_logits(q, k, w, k_scale=ks, start_pos=S - T)
    fin = torch.isfinite(ref)
    assert rms_ratio(out[fin], ref[fin]) < 1e-2
    idx = indexer_topk(q, k, w, topk, k_scale=ks, start_pos=S - T)
    got = ref.gather(1, idx.long())
    want = ref.topk(topk, dim=1).values
    assert (got - want).abs().max() <= 2e-2 * want.pow(2).mean().sqrt()


def test_softmax_mixture_topk_with_every_dot_far_below_zero(small_blocks):
    """Dots near -120 for every key, with key scales (the per-block-max path): a query that sees no
    key of a diagonal block (query chunks of 12 from position 5 cross the 48-key block edge) must
    not give that block a reference of 0, which would push every real block's exps below fp32's
    range (all ties) instead of ranking like the naive reference."""
    T, sp, H, D, topk = 63, 5, 3, 16, 10
    S = sp + T
    q, k, w, _ = make_inputs(T, S, H, D, torch.float32, seed=12)
    q[..., 0], k[:, 0] = 10.0, -12.0
    ks = torch.ones(S)
    idx = indexer_topk(q, k, w, topk, k_scale=ks, start_pos=sp, score="softmax_mixture")
    ref = naive.indexer_topk(q, k, w, topk, k_scale=ks, start_pos=sp, score="softmax_mixture")
    lse = naive.indexer_head_lse(q, k, k_scale=ks, start_pos=sp)
    scores = naive.indexer_logits(q, k, w - lse, k_scale=ks, start_pos=sp, score="mixture")
    check_topk(idx, ref, scores, (T, S, sp, H, D, topk), torch.float32)
