"""FP8 numerics mode: the indexer's scores against an independent fp32 re-implementation of the
official `act_quant` / `fp8_index` / `rotate_activation` math, and its top-k against exact mode.

    .venv/bin/python -m pytest tests/model/test_fp8.py -q
"""

import torch

from dsa_rag.kernels.indexer import indexer_logits, indexer_topk
from dsa_rag.model import fp8
from dsa_rag.model.model import rope_half
from tests.model.helpers import random_model, tiny_config


def ref_hadamard(d):  # Sylvester construction, as scipy.linalg.hadamard
    h = torch.tensor([[1.0]])
    while h.shape[0] < d:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    return h


def ref_act_quant(x, block):
    """kernel.py act_quant with scale_fmt ue8m0, in fp32: one scale per `block` values."""
    xb = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = xb.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    s = torch.pow(2.0, torch.ceil(torch.log2(amax / 448.0)))
    y = torch.clamp(xb / s, -448.0, 448.0).to(torch.float8_e4m3fn)
    return y.reshape(x.shape), s.squeeze(-1)


def ref_fp8_index(q, k, w, d, n_heads):
    """inference/model.py Indexer.forward (fixed) with fp8_index as an einsum; q [T,H,D], k [S,D]."""
    hd = ref_hadamard(d)  # fast_hadamard_transform(x, scale=d**-0.5): +-1 transform, then scale
    q8, qs = ref_act_quant(q @ hd * d**-0.5, d)  # qs [T, H, 1 block]
    k8, ks = ref_act_quant(k @ hd * d**-0.5, d)  # ks [S, 1]
    weights = w * n_heads**-0.5 * qs[..., 0] * d**-0.5  # [T, H]
    logits = torch.einsum("thd,sd->ths", q8.float(), k8.float()).relu()
    return torch.einsum("ths,th->ts", logits, weights) * ks[:, 0][None]


def indexer_inputs(model, ids):
    attn = model.layers[1].attn
    x = model.layers[1].attn_norm(model.embed(ids))
    pos = torch.arange(ids.shape[1])[None]
    cos, sin = model.rotary(pos, x.dtype)
    qr = attn.q_norm(attn.wq_a(x))
    return attn.indexer, x, qr, cos, sin


def test_fp8_index_scores_match_official_math(monkeypatch):
    cfg = tiny_config(0, index_head_dim=32, index_n_heads=8, fp8_numerics=True)
    m = random_model(cfg, 0)
    ids = torch.randint(0, cfg.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ind, x, qr, cos, sin = indexer_inputs(m, ids)
        k8, ks = ind.keys(x, cos, sin)
        q8, w = ind.queries(x, qr, cos, sin)
        monkeypatch.setenv("DSA_KERNEL_BACKEND", "naive")  # fp32 einsum: the official math exactly
        got = indexer_logits(q8[0], k8[0], w[0], k_scale=ks[0])
        monkeypatch.setenv("DSA_KERNEL_BACKEND", "torch")  # the fast CPU path (bf16 GEMMs)
        fast = indexer_logits(q8[0], k8[0], w[0], k_scale=ks[0])
        # the reference starts from the same pre-quantization q, k (after RoPE) and raw weights
        q = ind.wq_b(qr).view(1, 96, cfg.index_n_heads, cfg.index_head_dim)
        r = cfg.qk_rope_head_dim
        q = torch.cat([rope_half(q[..., :r], cos, sin), q[..., r:]], -1)[0]
        k = ind.k_norm(ind.wk(x))
        k = torch.cat([rope_half(k[..., :r], cos, sin), k[..., r:]], -1)[0]
        ref = ref_fp8_index(q, k, ind.weights_proj(x.float())[0], cfg.index_head_dim, cfg.index_n_heads)
    assert k8.dtype == torch.float8_e4m3fn and q8.dtype == torch.float8_e4m3fn
    causal = torch.ones(96, 96).tril().bool()
    assert torch.isinf(got[~causal]).all() and (got[~causal] < 0).all()
    err = (got[causal] - ref[causal]).abs().max() / ref[causal].abs().max()
    assert err < 1e-5, err
    fast_err = (fast[causal] - ref[causal]).abs().max() / ref[causal].abs().max()
    assert fast_err < 2e-2, fast_err


def test_fp8_topk_overlaps_exact_mode():
    """Top-k of the FP8 scores keeps >= 95% of the exact-mode (fp32) selection."""
    cfg = tiny_config(0, index_head_dim=64, index_n_heads=16, index_topk=128)
    m = random_model(cfg, 3)
    T = 512
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    overlaps = []
    with torch.no_grad():
        for fp8_mode in (False, True):
            m.cfg.fp8_numerics = fp8_mode
            ind, x, qr, cos, sin = indexer_inputs(m, ids)
            k, ks = ind.keys(x, cos, sin)
            q, w = ind.queries(x, qr, cos, sin)
            overlaps.append(indexer_topk(q[0], k[0], w[0], cfg.index_topk, k_scale=None if ks is None else ks[0]))
    exact, quant = overlaps
    rows = range(cfg.index_topk, T)  # rows where top-k really drops keys
    ov = sum(len(set(exact[t].tolist()) & set(quant[t].tolist())) for t in rows) / (len(rows) * cfg.index_topk)
    assert ov >= 0.95, ov


def test_act_quant_matches_reference_and_roundtrips():
    x = torch.randn(5, 3, 64) * torch.logspace(-3, 2, 64)
    a, sa = fp8.act_quant(x, 32)
    b, sb = ref_act_quant(x, 32)
    assert torch.equal(a.float(), b.float()) and torch.equal(sa, sb)
    # ue8m0 scales are powers of two
    assert torch.equal(torch.log2(sa), torch.log2(sa).round())
    y = fp8.act_dequant(a, sa)
    assert ((y - x).norm() / x.norm()) < 0.05


def test_weight_quant_roundtrip_and_shape_error():
    w = torch.randn(200, 300)
    q, s = fp8.weight_quant(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    assert ((fp8.weight_dequant(q, s) - w).norm() / w.norm()) < 0.05
    try:
        fp8.weight_dequant(q, s[:1])
    except ValueError as e:
        assert "(2, 3)" in str(e)
    else:
        raise AssertionError("a wrong weight_scale_inv shape must raise")
