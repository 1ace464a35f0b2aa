"""sparse_sink_attention (kernels.sink_attention): the torch and Triton backends against naive.py,
and the V4 model's use of it (window rows + CSA picks / HCA pools, model/v4/attention.py) against
the model's dense oracle `window_sparse_attention`.

Awkward sizes (T=13, H=3, D=24, K=37), -1 padding, a row with nothing selected (all mass on the
sink: output 0), large and very negative sinks, fp32 and bf16.
Run: TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/kernels/test_sink_attention.py
"""

import pytest
import torch

from dsa_rag.kernels.sink_attention import naive, sparse_sink_attention
from dsa_rag.model.v4.attention import attended_rows, window_sparse_attention

from .conftest import DEVICE, rms_ratio
from .test_sparse_mla import make_inputs

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
CASES = [
    pytest.param((13, 3, 24, 90, 37), id="T13-H3-D24-K37"),
    pytest.param((1, 4, 64, 300, 40), id="decode-T1-D64"),
    pytest.param((6, 8, 32, 20, 24), id="K-gt-S"),
]


@pytest.mark.parametrize("dtype", [pytest.param(d, id=str(d).replace("torch.", "")) for d in TOL])
@pytest.mark.parametrize("case", CASES)
def test_matches_naive(backend, small_blocks, case, dtype):
    T, H, D, S, K = case
    q, kv, idx = make_inputs(T, H, D, S, K, dtype)
    sink = torch.randn(H, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 3
    sink[0] = -30.0  # a head whose sink takes ~nothing
    ref = naive.sparse_sink_attention(q, kv, idx, sink, scale=D ** -0.5)
    out = sparse_sink_attention(q, kv, idx, sink, scale=D ** -0.5)
    assert out.dtype == q.dtype and out.shape == (T, H, D)
    assert rms_ratio(out.float(), ref.float()) < TOL[dtype]
    if T > 3:
        assert torch.all(out[3] == 0)  # nothing selected: all the mass went to the sink


@pytest.mark.parametrize("dtype", [pytest.param(d, id=str(d).replace("torch.", "")) for d in TOL])
def test_two_sources_match_naive(backend, small_blocks, dtype):
    """Window rows + pool rows as two sources equal one concatenated source (naive)."""
    T, H, D = 9, 4, 24
    q, kv, idx = make_inputs(T, H, D, 40, 12, dtype, seed=3)
    _, pool, pidx = make_inputs(T, H, D, 25, 7, dtype, seed=4)
    sink = torch.randn(H, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref = naive.sparse_sink_attention(q, kv, idx, sink, scale=0.3, extra_kv=pool, extra_indices=pidx)
    out = sparse_sink_attention(q, kv, idx, sink, scale=0.3, extra_kv=pool, extra_indices=pidx)
    assert rms_ratio(out.float(), ref.float()) < TOL[dtype]
    with pytest.raises(ValueError, match="both or neither"):
        sparse_sink_attention(q, kv, idx, sink, scale=0.3, extra_kv=pool)


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
