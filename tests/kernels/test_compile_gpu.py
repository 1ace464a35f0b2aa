"""The Triton kernels compiled for NVIDIA GPUs on the CPU (no GPU, no driver): kernels/gpu_compile.py.

Each case is a launch the dispatch can make (the launchers' own plan()/launch_config on meta
tensors), compiled with triton.compile for sm_90 and sm_80 by Triton 3.9 and its bundled ptxas.
A representative subset here (~20 compiles, ~20-40 s on 2 cores); the full matrix (+ sm_100,
fp16, fp32 rows) is benchmarks/kernels_compile.py. The compile runs in a child process without
TRITON_INTERPRET (the interpreter's global patches of triton.language break the compiler).

Also: dispatch fallback to torch on Triton compile / resource errors, fp32 CUDA -> torch, FP8 on
GPUs without FP8 dots converted on the host.
Run: .venv/bin/python -m pytest -q tests/kernels/test_compile_gpu.py
"""

import os
import types
import warnings

import pytest
import torch

from dsa_rag.kernels import dispatch
from dsa_rag.kernels import gpu_compile as gc
from dsa_rag.kernels.dispatch import Target

SUBSET = [
    "indexer/v32/fp8/prefill", "indexer/v32/fp8/decode", "indexer/glm5/fp8/decode", "indexer/tiny/bf16/prefill",
    "indexer/d16/fp8/decode",  # finding 1: an 8-bit dot with K = 16
    "sparse_mla/v32/bf16/prefill", "sparse_mla/v32/bf16/decode", "sparse_mla/tiny/bf16/prefill",
    "sparse_mla/tiny-mha/bf16/decode",
    "sparse_mla/v32/bf16/decode-B64", "sparse_mla/tiny/bf16/decode",  # the split-K decode launch
    "sparse_mla_combine/v32/bf16/decode-B1",
]
# Cases whose alternative configs (the per-arch tables' later entries, what the autotuner may pick)
# are compiled here too; the full matrix compiles every one (benchmarks/kernels_compile.py).
ALT_SUBSET = ["sparse_mla/v32/bf16/decode", "indexer/v32/fp8/prefill", "sparse_mla/tiny/bf16/decode"]
ARCHS = (90, 80)

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled():
    # DSA_COMPILE_REF=<git rev>: compile that revision's kernels/*/triton.py instead (how the
    # failures of the old code were checked: DSA_COMPILE_REF=HEAD before this change)
    ref = os.environ.get("DSA_COMPILE_REF") or None
    res = gc.run_matrix(SUBSET, ARCHS, ref=ref, ttir_check=True, all_variants=False)
    if not ref:
        res += gc.run_matrix(ALT_SUBSET, ARCHS, ttir_check=True)
    return {(r["case"], r["arch"]): r for r in res}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", SUBSET)
def test_compiles_within_limits(compiled, name, arch):
    r = compiled[(name, f"sm_{arch}")]
    assert r["ok"], f"{name} sm_{arch}: {r['error']} (config {r.get('config')})"
    assert r["violations"] == [], f"{name} sm_{arch}: {r['violations']}"
    assert r["shared"] <= gc.SMEM_LIMIT[arch] and (r["spill_stores"] or 0) <= gc.SPILL_LIMIT
    assert r["regs"] is not None and r["regs"] <= gc.MAX_REGS  # the ptxas log was parsed
    if not name.startswith("sparse_mla_combine"):  # the combine is a weighted sum: no dot
        assert r["mma"], f"{name} sm_{arch}: no tensor-core instruction in the PTX"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ALT_SUBSET)
def test_every_config_table_entry_compiles(compiled, name, arch):
    """Every entry of the launcher's per-arch table (the autotuner's candidates) is in bounds."""
    c = gc.case(name)
    n = gc.variants(c, gc.target_for(arch))
    for v in range(n):
        r = compiled[(gc.case_name(c, v), f"sm_{arch}")]
        assert r["ok"] and r["violations"] == [], (r["case"], r["error"], r.get("violations"))
    assert n >= 2, f"{name} sm_{arch}: the table has one entry (nothing for the autotuner to pick)"


@pytest.mark.parametrize("name, splits", [("sparse_mla/v32/bf16/decode", 16), ("sparse_mla/v32/bf16/decode-B64", 2),
                                          ("sparse_mla/tiny/bf16/decode", 2)])
def test_decode_is_split_and_in_bounds(compiled, name, splits):
    """Decode (B = 1 and 64 rows) compiles the split-K launch the op makes on an H100 (132 SMs):
    V3.2 B=1: 2 programs (value halves) -> 16 splits of 128 indices; B=64: 128 programs -> 2 splits."""
    r = compiled[(name, "sm_90")]
    assert r["ok"], r["error"]
    assert r["config"]["SPLIT"] and r["config"]["NUM_SPLITS"] == splits, r["config"]
    assert r["spill_stores"] == 0 and r["shared"] <= gc.SMEM_LIMIT[90]


def test_matrix_enumerates_every_config_table_entry():
    """No compile: the matrix's variants are exactly the launchers' config tables on every arch, so
    whatever DSA_KERNEL_AUTOTUNE=1 can pick is compiled by benchmarks/kernels_compile.py."""
    from dsa_rag.kernels.indexer import triton as idx_triton
    from dsa_rag.kernels.sparse_mla import triton as mla_triton

    for c in gc.cases():
        for arch in (80, 90, 100):
            t = gc.target_for(arch)
            if c.op == "sparse_mla":
                table = mla_triton.configs(c.H, c.v_dim, c.D, c.dtype, t)
            elif c.op == "indexer":
                q, k, w, cast = idx_triton._prep(gc._meta(1, c.H, c.D, dtype=c.dtype), gc._meta(1, c.D, dtype=c.dtype),
                                                 gc._meta(1, c.H), t)
                table = idx_triton.configs(c.D, q.dtype, t)
            else:
                continue
            assert gc.variants(c, t) == len(table) >= 1
            assert gc.launch_of(c, t, variant=None) == table


def test_fp8_head_dim_16_compiles_for_sm90(compiled):
    """Finding 1: BLOCK_D = 16 made an FP8 tl.dot with K = 16 ('K >= 32' compile error on sm_90)."""
    r = compiled[("indexer/d16/fp8/decode", "sm_90")]
    assert r["ok"], r["error"]
    assert r["config"]["BLOCK_D"] >= 32
    assert any("e4m3" in m for m in r["mma"]), r["mma"]  # still an FP8 tensor-core dot


def test_fp8_on_sm80_is_bf16_dot(compiled):
    """Finding 3: no FP8 dot operands below sm_89; FP8 goes through a bf16 dot (host conversion)."""
    r = compiled[("indexer/v32/fp8/prefill", "sm_80")]
    assert r["ok"], r["error"]
    assert all("bf16" in m for m in r["mma"]), r["mma"]


@pytest.mark.parametrize("name", ["sparse_mla/v32/bf16/prefill", "sparse_mla/v32/bf16/decode"])
def test_v32_sparse_mla_sm90_no_spill_no_repeated_qk(compiled, name):
    """Fix 4: BLOCK_H=64 with 8 warps put both warpgroups on the same 64 heads of the chained
    QK^T (2 x 36 m64n16k16 wgmmas per iteration: QK twice), 255 regs, 168 B of spills. Now each
    warpgroup owns 64 of the 128 heads: QK^T is one sequence of D/16 = 36 wgmmas with N = BLOCK_K,
    PV 2 x m64n256 (BLOCK_K/16 k-steps over a 256-wide value half), no spills, smem <= 227 KB."""
    r = compiled[(name, "sm_90")]
    assert r["ok"], r["error"]
    cfg = r["config"]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert r["shared"] <= gc.SMEM_LIMIT[90]
    qk = f"m64n{cfg['BLOCK_K']}k16"
    pv = f"m64n{cfg['BLOCK_DV']}k16"
    assert r["mma_count"] == {qk: 576 // 16, pv: cfg["BLOCK_K"] // 16}, r["mma_count"]
    assert cfg["BLOCK_H"] == 64 * cfg["num_warps"] // 4  # one 64-row wgmma M tile per warpgroup


@pytest.mark.parametrize("name", ["indexer/v32/fp8/prefill", "indexer/v32/fp8/decode", "indexer/glm5/fp8/decode",
                                  "indexer/tiny/bf16/prefill"])
def test_indexer_key_tile_stored_once(compiled, name):
    """Fix 4: the key tile (loop-invariant over the heads) was re-stored to shared memory inside
    the head loop (1 local_alloc per head = 64 stores per program at V3.2). Now it is the A
    operand, staged once before the loop: no register -> smem store inside any loop; the QK is
    still one m64n64 wgmma sequence per head (BLOCK_D/k wgmmas)."""
    r = compiled[(name, "sm_90")]
    assert r["ok"], r["error"]
    assert r["loop_smem_stores"] == 0
    cfg = r["config"]
    kstep = 32 if "fp8" in name else 16
    assert r["mma_count"] == {f"m64n{cfg['BLOCK_T']}k{kstep}": cfg["BLOCK_D"] // kstep}, r["mma_count"]


def test_loop_smem_store_counter():
    ttgir = """
    %k = ttg.local_alloc %k_0 : (tensor<64x128xf8E4M3FN, #blocked>) -> !ttg.memdesc<64x128xf8E4M3FN>
    %r:2 = scf.for %h = %c0 to %H step %c1 iter_args(%a = %z) -> (tensor<64x64xf32, #mma>) : i32 {
      %x = ttg.local_alloc %k_0 : (tensor<64x128xf8E4M3FN, #blocked>) -> !ttg.memdesc<64x128xf8E4M3FN>
      %y = scf.if %c -> (i32) {
        ttg.local_store %v, %buf : tensor<16xi32> -> !ttg.memdesc<16xi32>
      }
      %e = ttg.local_alloc : () -> !ttg.memdesc<2x64x128xf8E4M3FN>
      scf.yield %a
    }
    ttg.local_store %v, %buf : tensor<16xi32> -> !ttg.memdesc<16xi32>
    """
    assert gc.loop_smem_stores(ttgir) == 2


@pytest.mark.parametrize("name", ["sparse_mla/v32/bf16/prefill", "indexer/v32/fp8/prefill"])
def test_query_offsets_are_int64(compiled, name):
    """Finding 2: t * stride in i32 wraps at V3.2 shapes (sparse_mla: stride_qt = 128 * 576, so
    from t = 29,128; a 32k-token prefill chunk reaches 32767 * 73728 > 2^31). The TTIR does not
    depend on T (a runtime grid dim / i32 arg), so the V3.2 prefill compile is the config where
    t * stride > 2^31: every multiply of a program_id(0)-derived value by a stride is i64."""
    assert 32767 * 128 * 576 > 2**31 and 32767 * 64 * 128 < 2**31 < 2**31 * 2  # the shapes where it matters
    r = compiled[(name, "sm_90")]
    assert r["ok"], r["error"]
    assert r["i32_offset_muls"] == []


def test_ttir_offset_check_flags_i32():
    """The checker itself: an i32 t * stride multiply (the old code's TTIR) is reported, i64 is not."""
    old = """
    %t = tt.get_program_id x : i32 loc(#loc1)
    %q_row = arith.muli %t, %stride_qt : i32 loc(#loc2)
    %h = tt.get_program_id y : i32 loc(#loc3)
    %o = arith.muli %h, %stride_qh : i32 loc(#loc4)
    """
    new = """
    %t = tt.get_program_id x : i32 loc(#loc1)
    %t_9 = arith.extsi %t : i32 to i64 loc(#loc1)
    %q_row = arith.extsi %stride_qt : i32 to i64 loc(#loc2)
    %q_row_18 = arith.muli %t_9, %q_row : i64 loc(#loc2)
    """
    assert gc.i32_offset_muls(old) == ["%q_row = arith.muli %t, %stride_qt : i32"]
    assert gc.i32_offset_muls(new) == []


# --- dispatch ---------------------------------------------------------------------------------

def _compile_error():
    from triton.compiler.errors import CompilationError
    return CompilationError(None, None, "Input shapes should have M >= 1, N >= 1 and K >= 32")


def _oor():
    from triton.runtime.errors import OutOfResources
    return OutOfResources(234496, 232448, "shared memory")


@pytest.fixture
def default_triton(monkeypatch):
    """The unforced default picks triton (as for CUDA tensors); fresh fallback state."""
    monkeypatch.delenv("DSA_KERNEL_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "backend_for", lambda *t: "triton")
    monkeypatch.setattr(dispatch, "_failed", set(), raising=False)
    monkeypatch.setattr(dispatch, "_warned", set())


def test_fallback_on_compile_error_warns_once(default_triton, monkeypatch):
    from dsa_rag.kernels.indexer import indexer_logits
    from dsa_rag.kernels.indexer import torch_impl
    from dsa_rag.kernels.indexer import triton as idx_triton

    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise _compile_error()

    monkeypatch.setattr(idx_triton, "_launch", boom)
    q, k, w = torch.randn(5, 2, 16), torch.randn(7, 16), torch.randn(5, 2)
    want = torch_impl.indexer_logits(q, k, w, start_pos=2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        outs = [indexer_logits(q, k, w, start_pos=2) for _ in range(3)]
    msgs = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
    assert len(msgs) == 1 and "CompilationError" in msgs[0] and "torch backend" in msgs[0], msgs
    assert calls == [1]  # the failing (op, dtype, shape) is not retried
    for out in outs:
        torch.testing.assert_close(out, want, equal_nan=True)


def test_fallback_on_out_of_resources(default_triton, monkeypatch):
    from dsa_rag.kernels.sparse_mla import sparse_mla
    from dsa_rag.kernels.sparse_mla import torch_impl
    from dsa_rag.kernels.sparse_mla import triton as mla_triton

    class Boom:
        def __getitem__(self, grid):
            def run(*a, **k):
                raise _oor()
            return run

    monkeypatch.setattr(mla_triton, "_fwd_kernel", Boom())
    q, kv = torch.randn(3, 2, 24), torch.randn(9, 24)
    idx = torch.tensor([[0, 3, -1], [1, 2, 8], [4, -1, -1]], dtype=torch.int32)
    with pytest.warns(RuntimeWarning, match="OutOfResources"):
        o, lse = sparse_mla(q, kv, idx, v_dim=16, scale=0.3)
    o_ref, lse_ref = torch_impl.sparse_mla(q, kv, idx, v_dim=16, scale=0.3)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)


def test_forced_triton_raises(monkeypatch):
    from dsa_rag.kernels.indexer import indexer_logits
    from dsa_rag.kernels.indexer import triton as idx_triton
    from triton.compiler.errors import CompilationError

    monkeypatch.setenv("DSA_KERNEL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_failed", set(), raising=False)
    monkeypatch.setattr(idx_triton, "_launch", lambda *a, **k: (_ for _ in ()).throw(_compile_error()))
    with pytest.raises(CompilationError):
        indexer_logits(torch.randn(2, 2, 16), torch.randn(3, 16), torch.randn(2, 2))


def test_fp32_cuda_defaults_to_torch(monkeypatch):
    monkeypatch.delenv("DSA_KERNEL_BACKEND", raising=False)
    fake = lambda dt: types.SimpleNamespace(is_cuda=True, dtype=dt)  # noqa: E731
    assert dispatch.backend_for(fake(torch.float32)) == "torch"
    assert dispatch.backend_for(fake(torch.bfloat16)) == "triton"
    assert dispatch.backend_for(fake(torch.float8_e4m3fn)) == "triton"


@pytest.mark.parametrize("target, fp8_in_kernel", [
    (Target("cuda", (9, 0)), True), (Target("cuda", (8, 9)), True), (Target("cuda", (8, 0)), False),
    (Target("hip", (9, 4)), False), (Target("interp"), False)])
def test_fp8_host_conversion(target, fp8_in_kernel):
    from dsa_rag.kernels.indexer import triton as idx_triton
    q8 = torch.randn(3, 2, 32).to(torch.float8_e4m3fn)
    k8 = torch.randn(5, 32).to(torch.float8_e4m3fn)
    q, k, w, cast = idx_triton._prep(q8, k8, torch.randn(3, 2), target)
    assert (q.dtype == torch.float8_e4m3fn) == fp8_in_kernel and k.dtype == q.dtype
    if not fp8_in_kernel:
        assert q.dtype == torch.bfloat16 and torch.equal(q.float(), q8.float())  # exact
    assert cast == (2 if target.kind == "interp" else 0)
    cfg = idx_triton.launch_config(32 if fp8_in_kernel else 16, q.dtype, target)
    assert cfg["BLOCK_D"] >= (32 if fp8_in_kernel else 16)
