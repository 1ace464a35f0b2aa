"""sparse_sink_attention (kernels.sink_attention): the torch and Triton backends against naive.py,
and the V4 model's use of it (window rows + CSA picks / HCA pools, model/v4/attention.py) against
the model's dense oracle `window_sparse_attention`.

Every case runs on both backends (the `backend` fixture; Triton in the interpreter on CPU) with one
and two sources: awkward sizes (T=13, H=3, D=24, K=37), H=20 (two head blocks of 16, the second
partial), D=64 and D=512 (V4-Flash's head dim), -1 padding, a row with nothing selected from
either source (all mass on the sink: output 0), a row with nothing from the first source only,
a sink that takes ~nothing (-30) and one that takes ~everything (+30), fp32 and bf16. The Triton
kernel's sm_90 layout (value dims split over two programs) and its lse run in the interpreter too;
gradients (the Triton backend hands a call that needs them to the torch path) against naive's.
Run: TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/kernels/test_sink_attention.py
"""

import pytest
import torch

from dsa_rag.kernels.sink_attention import naive, sparse_sink_attention
from dsa_rag.model.v4.attention import attended_rows, window_sparse_attention

from .conftest import DEVICE, rms_ratio
from .test_sparse_mla import make_inputs

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in TOL]
# (T, H, D, S, K): the first source; the second (two sources) has S // 2 + 5 rows and K // 2 + 3 picks
CASES = [
    pytest.param((13, 3, 24, 90, 37), id="T13-H3-D24-K37"),
    pytest.param((1, 4, 64, 300, 40), id="decode-T1-D64"),
    pytest.param((6, 8, 32, 20, 24), id="K-gt-S"),
    pytest.param((5, 20, 64, 50, 19), id="H20-partial-head-block"),
    pytest.param((4, 2, 512, 33, 9), id="D512"),
]


def make_sources(case, dtype, two):
    """q, kv, idx, sink and (extra_kv, extra_indices) or (None, None), as described above."""
    T, H, D, S, K = case
    q, kv, idx = make_inputs(T, H, D, S, K, dtype)
    sink = torch.randn(H, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 3
    sink[0] = -30.0  # a head whose sink takes ~nothing
    if H > 1:
        sink[-1] = 30.0  # and one whose sink takes ~all of the mass
    if not two:
        return q, kv, idx, sink, None, None
    _, pool, pidx = make_inputs(T, H, D, S // 2 + 5, K // 2 + 3, dtype, seed=7)  # row 3: -1 too
    if T > 2:
        idx[1] = -1  # nothing from the first source, something from the second
    return q, kv, idx, sink, pool, pidx


@pytest.mark.parametrize("two", [False, True], ids=["one-source", "two-sources"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_naive(backend, small_blocks, case, dtype, two):
    T, H, D, S, K = case
    q, kv, idx, sink, pool, pidx = make_sources(case, dtype, two)
    ref = naive.sparse_sink_attention(q, kv, idx, sink, scale=D ** -0.5, extra_kv=pool, extra_indices=pidx)
    out = sparse_sink_attention(q, kv, idx, sink, scale=D ** -0.5, extra_kv=pool, extra_indices=pidx)
    assert out.dtype == q.dtype and out.shape == (T, H, D)
    assert torch.isfinite(out).all()
    assert rms_ratio(out.float(), ref.float()) < TOL[dtype]
    if H > 1:  # the +30 sink head: outputs ~e^-30 of the others, still right relative to themselves
        assert rms_ratio(out[:, -1].float(), ref[:, -1].float()) < TOL[dtype]
    if T > 3:
        assert torch.all(out[3] == 0)  # nothing selected: all the mass went to the sink


def test_sources_validated(backend):
    q, kv, idx = make_inputs(9, 4, 24, 40, 12, torch.float32, seed=3)
    _, pool, pidx = make_inputs(9, 4, 24, 25, 7, torch.float32, seed=4)
    sink = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="both or neither"):
        sparse_sink_attention(q, kv, idx, sink, scale=0.3, extra_kv=pool)
    with pytest.raises(ValueError, match="extra_kv: expected shape"):
        sparse_sink_attention(q, kv, idx, sink, scale=0.3, extra_kv=pool[:, :8], extra_indices=pidx)
    with pytest.raises(ValueError, match="extra_indices: expected values"):
        sparse_sink_attention(q, kv, idx, sink, scale=0.3, extra_kv=pool[:5], extra_indices=pidx)
    with pytest.raises(ValueError, match="indices: expected dtype"):
        sparse_sink_attention(q, kv, idx.float(), sink, scale=0.3)


def test_strided_inputs_int64(backend):
    """A non-contiguous q, a pool read in place from wider rows (row stride > D), int64 indices."""
    T, H, D = 7, 5, 40
    q, kv, idx = make_inputs(T, H, D, 60, 11, torch.float32, seed=8)
    g = torch.Generator().manual_seed(9)
    q_nc = torch.randn(T, D, H, generator=g).to(DEVICE).transpose(1, 2)              # [T, H, D], strided
    wide = torch.randn(30, D + 24, generator=g).to(DEVICE)
    pool, pidx = wide[:, :D], make_inputs(T, H, D, 30, 6, torch.float32, seed=10)[2].long()
    sink = torch.randn(H, generator=g).to(DEVICE)
    ref = naive.sparse_sink_attention(q_nc, kv, idx, sink, scale=0.2, extra_kv=pool, extra_indices=pidx)
    out = sparse_sink_attention(q_nc, kv, idx.long(), sink, scale=0.2, extra_kv=pool, extra_indices=pidx)
    assert rms_ratio(out, ref) < 1e-5


def test_gradients_match_naive(backend):
    """d/dq, d/dkv, d/dextra_kv, d/dsink of a weighted sum vs naive's autograd, fp32 (the Triton
    backend's kernel is forward-only: such a call takes the torch path)."""
    q, kv, idx, sink, pool, pidx = make_sources((6, 4, 24, 30, 9), torch.float32, two=True)
    w = torch.randn(6, 4, 24, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    grads = []
    for fn in (naive.sparse_sink_attention, sparse_sink_attention):
        leaves = [t.clone().requires_grad_() for t in (q, kv, pool, sink)]
        out = fn(leaves[0], leaves[1], idx, leaves[3], scale=0.2, extra_kv=leaves[2], extra_indices=pidx)
        (out * w).sum().backward()
        grads.append([t.grad for t in leaves])
    for g, ref in zip(*grads[::-1]):
        assert rms_ratio(g, ref) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_value_split_and_lse(dtype):
    """The sm_90 layout (DV_SPLIT=2: each program accumulates half of the value dims and uses the
    other half only in the logits) and the lse output, with the interpreter's block sizes."""
    from dsa_rag.kernels.dispatch import target_of
    from dsa_rag.kernels.sink_attention import triton as st

    case = (6, 20, 64, 50, 19)
    T, H, D, S, K = case
    q, kv, idx, sink, pool, pidx = make_sources(case, dtype, two=True)
    cfg = st.configs(H, D, q.dtype, target_of(q.device))[0]
    cfg = dict(cfg, DV_SPLIT=2, BLOCK_DV=cfg["BLOCK_DV"] // 2 if cfg["DV_SPLIT"] == 1 else cfg["BLOCK_DV"])
    out, lse = st.forward(q, kv, idx, sink, D ** -0.5, pool, pidx, want_lse=True, cfg=cfg)
    ref = naive.sparse_sink_attention(q, kv, idx, sink, scale=D ** -0.5, extra_kv=pool, extra_indices=pidx)
    assert rms_ratio(out.float(), ref.float()) < TOL[dtype]
    # lse over the selected logits of both sources and the sink (dense, fp32)
    logits = []
    for src, ix in ((kv, idx), (pool, pidx)):
        lg = torch.einsum("thd,tkd->thk", q.float(), src.float()[ix.long().clamp_min(0)]) * D ** -0.5
        logits.append(lg.masked_fill((ix < 0)[:, None, :], float("-inf")))
    ref_lse = torch.logsumexp(torch.cat(logits + [sink.float().view(1, H, 1).expand(T, H, 1)], -1), -1)
    assert rms_ratio(lse, ref_lse) < TOL[dtype] / 10
    assert torch.allclose(lse[3], sink.float())  # nothing selected: the lse is the sink's


@pytest.mark.parametrize("kind", ["csa", "hca", "sliding"])
def test_v4_rows_match_the_dense_oracle(backend, kind):
    """A prefill chunk of 11 queries after 9 cached window rows, window 8, 6 compressed entries."""
    g = torch.Generator().manual_seed(2)
    B, T, H, D, W, P, ratio = 2, 11, 4, 32, 8, 6, 4
    keys = torch.randn(B, (W - 1) + T, D, generator=g)
    start = 20
    key_pos = torch.arange(start - (W - 1), start + T)
    q_pos = (torch.arange(T) + start).expand(B, -1)
    q = torch.randn(B, T, H, D, generator=g)
    sink = torch.randn(H, generator=g)
    entries = torch.randn(B, P, D, generator=g) if kind != "sliding" else None
    idx = limit = None
    if kind == "csa":  # picks among complete entries, -1 padded, different per query
        visible = (q_pos + 1) // ratio
        idx = torch.stack([torch.stack([torch.cat([torch.randperm(int(v), generator=g)[:3],
                                                   torch.full((3,), -1)])[:3] if v else torch.full((3,), -1)
                                        for v in row]) for row in visible.clamp(max=P)])
    elif kind == "hca":
        limit = ((q_pos + 1) // ratio).clamp(max=P) - 1  # the last entry not complete yet for some
    ref = window_sparse_attention(q, keys, key_pos, q_pos, W, sink, D ** -0.5, entries, idx, limit)
    win, ent = attended_rows(key_pos, q_pos, W, 0 if entries is None else P, idx, limit)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = torch.stack([sparse_sink_attention(q[b].to(DEVICE), keys[b].to(DEVICE), win[b].to(DEVICE), sink.to(DEVICE),
                                             scale=D ** -0.5, extra_kv=dev(entries[b] if ent is not None else None),
                                             extra_indices=dev(ent[b] if ent is not None else None))
                       for b in range(B)])
    assert rms_ratio(out.cpu(), ref) < 1e-5
