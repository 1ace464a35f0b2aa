"""Kernel libraries behind the ops (kernels/libraries.py) and their place in the dispatch.

CPU: detection reports every candidate absent (none is installed here) and the dispatch keeps
torch / triton; a forced DSA_KERNEL_BACKEND=library without one says so; the adapters' layout
conversions run against fakes that follow each library's contract as read from its wheel
(FlashMLA: [T, 1, K] int32 indices in blocks of 64, kv [S, 1, D], lse in base 2 for sgl-kernel,
garbage in rows without a valid index; DeepGEMM: [T, S] logits, unspecified outside
[ks, ke)), compared with naive.py; a library call that raises falls back to triton once with a
warning. CUDA (skipped here): every present library against naive.py at V3.2 shapes.
Run: TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/kernels/test_libraries.py
"""

import types
import warnings

import pytest
import torch

from dsa_rag.kernels import dispatch, libraries
from dsa_rag.kernels.indexer import naive as idx_naive
from dsa_rag.kernels.sparse_mla import naive as mla_naive

from .conftest import rms_ratio


def mla_inputs(T=5, H=4, D=40, S=70, K=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, kv = torch.randn(T, H, D, generator=g), torch.randn(S, D, generator=g)
    idx = torch.full((T, K), -1, dtype=torch.int32)
    for t in range(T):
        n = int(torch.randint(1, min(K, S) + 1, (1,), generator=g))
        idx[t, :n] = torch.randperm(S, generator=g)[:n].int()
    idx[2] = -1  # a row with no valid index
    return q, kv, idx


def fake_flash_mla_sparse_fwd(base2, seen):
    """FlashMLA's flash_mla_sparse_fwd contract in torch: q [T,H,D], kv [S,1,D], indices [T,1,K] int32
    (K a multiple of 64), -1 invalid; (out, max_logits, lse), lse in base 2 if `base2`; rows with no
    valid index get NaN out and +inf lse (the adapter must not rely on either)."""
    def fwd(q, kv, indices, sm_scale, d_v=512, **kw):
        seen.append((tuple(kv.shape), tuple(indices.shape), indices.dtype, kw))
        assert kv.dim() == 3 and kv.shape[1] == 1 and indices.dim() == 3 and indices.shape[1] == 1
        assert indices.dtype == torch.int32 and indices.shape[2] % 64 == 0
        out, lse = mla_naive.sparse_mla(q, kv[:, 0], indices[:, 0], v_dim=d_v, scale=sm_scale)
        empty = torch.isneginf(lse)
        out = out.masked_fill(empty[..., None], float("nan"))
        lse = lse.masked_fill(empty, float("inf"))
        return out, lse, lse / libraries.LN2 if base2 else lse
    return fwd


@pytest.fixture
def fresh_status(monkeypatch):
    monkeypatch.setattr(dispatch, "_failed", set())
    monkeypatch.setattr(dispatch, "_warned", set())


def test_detection_reports_absent_here():
    st = libraries.status()
    assert set(st) == {"flash_mla", "sgl_kernel", "deep_gemm", "flashinfer"}
    for lib in st.values():
        assert not lib.present and lib.reason, lib  # none installed on the CPU set-up, with the reason
    assert libraries.present() == []
    assert all(not r["present"] for r in libraries.report().values())


def test_dispatch_keeps_triton_and_torch(monkeypatch):
    monkeypatch.delenv("DSA_KERNEL_BACKEND", raising=False)
    fake = lambda dt: types.SimpleNamespace(is_cuda=True, dtype=dt, device="cuda:0")  # noqa: E731
    assert dispatch.backend_for(fake(torch.bfloat16)) == "triton"
    assert dispatch.backend_for(fake(torch.float32)) == "torch"
    assert dispatch.backend_for(torch.zeros(1)) == "torch"


def test_forced_library_without_one_says_so(monkeypatch):
    monkeypatch.setenv("DSA_KERNEL_BACKEND", "library")
    with pytest.raises(RuntimeError, match="no kernel library is importable.*kernels-sm90"):
        dispatch.backend_for(torch.zeros(1))


def test_default_prefers_a_present_library(monkeypatch):
    """sm_90 / sm_100 with a library present -> library by default; sm_80 -> triton."""
    monkeypatch.delenv("DSA_KERNEL_BACKEND", raising=False)
    monkeypatch.setattr(libraries, "present", lambda: [libraries.Lib("fake", "fake", present=True)])
    for cap, want in (((9, 0), "library"), ((10, 0), "library"), ((8, 0), "triton")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, cap=cap: cap)
        t = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device="cuda:0")
        assert dispatch.backend_for(t) == want


@pytest.mark.parametrize("base2", [False, True], ids=["flash_mla-natural-lse", "sgl_kernel-base2-lse"])
def test_flashmla_adapter_matches_naive(base2):
    seen = []
    lib = libraries.Lib("fake", "fake", present=True, sparse_mla=fake_flash_mla_sparse_fwd(base2, seen),
                        sparse_mla_lse_base2=base2)
    q, kv, idx = mla_inputs()
    out, lse = libraries.sparse_mla_forward(lib, q, kv, idx, 24, 0.2)
    ref_out, ref_lse = mla_naive.sparse_mla(q, kv, idx, v_dim=24, scale=0.2)
    assert seen[0][:3] == ((70, 1, 40), (5, 1, 64), torch.int32)  # K = 37 padded to 64 with -1
    assert torch.isneginf(lse[2]).all() and (out[2] == 0).all()  # no valid index: our contract, not the library's
    ok = torch.isfinite(ref_lse)
    assert rms_ratio(out, ref_out) < 1e-6 and rms_ratio(lse[ok], ref_lse[ok]) < 1e-6


def test_flashmla_inputs_keep_aligned_topk():
    q, kv, idx = mla_inputs(K=128)
    _, kv3, idx3 = libraries.flashmla_inputs(q, kv, idx.long())
    assert idx3.shape == (5, 1, 128) and idx3.dtype == torch.int32 and torch.equal(idx3[:, 0], idx)
    assert kv3.shape == (70, 1, 40) and kv3.data_ptr() == kv.data_ptr()  # a view, no copy of the pool


def fp8_indexer_inputs(T=6, S=40, H=4, D=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(T, H, D, generator=g) * 8).to(torch.float8_e4m3fn)
    k = (torch.randn(S, D, generator=g) * 8).to(torch.float8_e4m3fn)
    return q, k, torch.randn(T, H, generator=g), torch.rand(S, generator=g) + 0.1


def fake_mqa_logits(q, kv, w, ks, ke):
    """DeepGEMM fp8_mqa_logits' contract: [T, S] fp32 valid on [ks, ke), anything elsewhere."""
    k, scale = kv
    assert ks.dtype == ke.dtype == torch.int32 and w.dtype == torch.float32
    x = torch.einsum("thd,sd->ths", q.float(), k.float()) * scale[None, None, :]
    out = (x.relu() * w[:, :, None]).sum(1)
    cols = torch.arange(k.shape[0])[None]
    return torch.where((cols >= ks[:, None]) & (cols < ke[:, None]), out, torch.full_like(out, 1e30))


@pytest.mark.parametrize("start_pos", [0, 34])
def test_mqa_logits_adapter_matches_naive(start_pos):
    q, k, w, ks = fp8_indexer_inputs()
    lib = libraries.Lib("fake", "fake", present=True, mqa_logits=fake_mqa_logits)
    got = libraries.mqa_logits_forward(lib, q, k, w, ks, start_pos)
    ref = idx_naive.indexer_logits(q, k, w, k_scale=ks, start_pos=start_pos)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))  # causal mask: -inf exactly where naive's is
    fin = torch.isfinite(ref)
    assert rms_ratio(got[fin], ref[fin]) < 1e-6


@pytest.mark.parametrize("S, topk, budget", [(40, 8, 4 * 40 * 2), (40, 64, 1 << 20)], ids=["chunked", "S<topk"])
def test_topk_from_library_logits(S, topk, budget):
    q, k, w, ks = fp8_indexer_inputs(S=S)
    lib = libraries.Lib("fake", "fake", present=True, mqa_logits=fake_mqa_logits)
    sp = 3
    out = libraries.topk_from_logits(
        lambda t0, t1: libraries.mqa_logits_forward(lib, q[t0:t1], k, w[t0:t1], ks, sp + t0), 6, S, topk, "cpu", budget)
    ref = idx_naive.indexer_logits(q, k, w, k_scale=ks, start_pos=sp)
    for t in range(6):
        valid = out[t][out[t] >= 0].long()
        n_causal = min(sp + t + 1, S)
        assert len(valid) == min(topk, n_causal) and (out[t][len(valid):] == -1).all()  # -1 padding at the end
        got = ref[t, valid]
        assert torch.equal(got, ref[t].topk(len(valid)).values)  # the top scores, in descending order


def test_library_failure_falls_back_to_triton_once(monkeypatch, fresh_status):
    """Default choice: a library call that raises -> triton for that (op, shape), one warning."""
    monkeypatch.delenv("DSA_KERNEL_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "backend_for", lambda *t: "library")
    monkeypatch.setattr(libraries, "supports", lambda *a: True)
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise RuntimeError("Only h_q == 64 or 128 is supported")

    monkeypatch.setattr(libraries, "function", lambda *a: boom)
    q, kv, idx = mla_inputs()
    from dsa_rag.kernels.sparse_mla import sparse_mla
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        outs = [sparse_mla(q, kv, idx, v_dim=24, scale=0.2) for _ in range(2)]
    msgs = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
    assert len(msgs) == 1 and "kernel library failed" in msgs[0] and "Triton backend" in msgs[0], msgs
    assert calls == [1]
    ref_out, _ = mla_naive.sparse_mla(q, kv, idx, v_dim=24, scale=0.2)
    for out, _ in outs:
        assert rms_ratio(out, ref_out) < 1e-5


def test_forced_library_raises_library_errors(monkeypatch, fresh_status):
    monkeypatch.setenv("DSA_KERNEL_BACKEND", "library")
    monkeypatch.setattr(libraries, "present", lambda: [libraries.Lib("fake", "fake", present=True)])
    monkeypatch.setattr(libraries, "supports", lambda *a: True)
    monkeypatch.setattr(libraries, "function", lambda *a: (_ for _ in ()).throw(RuntimeError("bad layout")))
    q, kv, idx = mla_inputs()
    from dsa_rag.kernels.sparse_mla import sparse_mla
    with pytest.raises(RuntimeError, match="bad layout"):
        sparse_mla(q, kv, idx, v_dim=24, scale=0.2)


def test_forced_library_sends_unsupported_calls_to_triton(monkeypatch, fresh_status):
    """A present library that does not serve the call (here: CPU tensors, dsa-tiny shapes) -> triton."""
    monkeypatch.setenv("DSA_KERNEL_BACKEND", "library")
    monkeypatch.setattr(libraries, "present", lambda: [libraries.Lib("fake", "fake", present=True)])
    q, kv, idx = mla_inputs()
    assert not libraries.supports("sparse_mla", "sparse_mla", (q, kv, idx), dict(v_dim=24, scale=0.2))
    from dsa_rag.kernels.sparse_mla import sparse_mla
    out, lse = sparse_mla(q, kv, idx, v_dim=24, scale=0.2)
    ref_out, _ = mla_naive.sparse_mla(q, kv, idx, v_dim=24, scale=0.2)
    assert rms_ratio(out, ref_out) < 1e-5


# --- CUDA: each present library against naive.py ---------------------------------------------

def _present(provides):
    if not torch.cuda.is_available():
        return []
    return [pytest.param(l.name, id=l.name) for l in libraries.present() if provides in l.provides]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", _present("sparse_mla") or [pytest.param(None, marks=pytest.mark.skip("no library"))])
def test_library_sparse_mla_on_gpu(name):
    lib = libraries.status()[name]
    T, H, D, v, S, K = 64, 128, 576, 512, 4096, 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(T, H, D, device="cuda", generator=g).bfloat16()
    kv = torch.randn(S, D, device="cuda", generator=g).bfloat16()
    idx = torch.rand(T, S, device="cuda", generator=g).argsort(1)[:, :K].int()
    idx[::7, 1000:] = -1
    idx[3] = -1
    out, lse = libraries.sparse_mla_forward(lib, q, kv, idx, v, 0.135)
    ref_out, ref_lse = mla_naive.sparse_mla(q, kv, idx, v_dim=v, scale=0.135)
    ok = torch.isfinite(ref_lse)
    assert torch.isneginf(lse[3]).all() and (out[3] == 0).all()
    assert rms_ratio(out.float(), ref_out.float()) < 1e-2 and rms_ratio(lse[ok], ref_lse[ok]) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", _present("indexer_logits") or [pytest.param(None, marks=pytest.mark.skip("no library"))])
def test_library_mqa_logits_on_gpu(name):
    lib = libraries.status()[name]
    T, S, H, D = 256, 4096, 64, 128
    q = (torch.randn(T, H, D, device="cuda") * 30).to(torch.float8_e4m3fn)
    k = (torch.randn(S, D, device="cuda") * 30).to(torch.float8_e4m3fn)
    w, ks = torch.randn(T, H, device="cuda") * H**-0.5, torch.rand(S, device="cuda") / 448
    got = libraries.mqa_logits_forward(lib, q, k, w, ks, S - T)
    ref = idx_naive.indexer_logits(q, k, w, k_scale=ks, start_pos=S - T)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(got)) and rms_ratio(got[fin], ref[fin]) < 1e-2
