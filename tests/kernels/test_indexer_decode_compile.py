"""The decode indexer kernel (kernels/indexer/triton_decode.py, `_decode_kernel`) compiled for
NVIDIA GPUs on the CPU (no GPU, no driver), with kernels/gpu_compile.py's compile_launch.

Each case is the launch indexer_decode_topk makes (the launcher's own _prep / launch_config /
plan on meta tensors) at a 128k-key prefix: dsa-tiny (H=8, D=64, bf16; its softmax_mixture is the
MIXTURE kernel; relu too) with B = 1 and 8 rows, and V3.2 (H=64, D=128, FP8 with key scales, relu)
with B = 1 and 32 rows (B = 1 is its own specialization: Triton makes an int 1 a constexpr); for
sm_90 and sm_80 (FP8 there: the host bf16 conversion). Checked: it compiles, shared memory within
gpu_compile.SMEM_LIMIT, spills within SPILL_LIMIT, a tensor-core dot of the expected dtype and
shape (sm_90: one m64 x (rows * heads) wgmma sequence per row block, BLOCK_D / k of them), the key
tile staged to shared memory once (not inside the row loop), int64 key-row offsets.

The compiles run in a child process without TRITON_INTERPRET (the interpreter's global patches of
triton.language break the compiler; tests/kernels/conftest.py sets it): this file run as a script
prints the results as JSON.
Run: .venv/bin/python -m pytest -q -s tests/kernels/test_indexer_decode_compile.py   (~30 s on 2 cores)
     .venv/bin/python tests/kernels/test_indexer_decode_compile.py                     (the JSON)
"""

import json

import pytest
import torch

P = 131072  # a 128k-key shared prefix
# (name, B, H, D, dtype, score)
CASES = [
    ("tiny/bf16/mixture/B1", 1, 8, 64, torch.bfloat16, "mixture"),
    ("tiny/bf16/mixture/B8", 8, 8, 64, torch.bfloat16, "mixture"),
    ("tiny/bf16/relu/B1", 1, 8, 64, torch.bfloat16, "relu"),
    ("tiny/bf16/relu/B8", 8, 8, 64, torch.bfloat16, "relu"),
    ("v32/fp8/relu/B1", 1, 64, 128, torch.float8_e4m3fn, "relu"),
    ("v32/fp8/relu/B32", 32, 64, 128, torch.float8_e4m3fn, "relu"),
]
ARCHS = (90, 80)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def decode_launch(B, H, D, dtype, score, target):
    """(kernel, args, kwargs) of indexer_decode_topk's kernel launch for B rows over P keys (with
    key scales), built by the launcher's own _prep / launch_config / plan on meta tensors."""
    from dsa_rag.kernels.indexer import triton_decode as td

    q, k, cast = td.prep_qk(_meta(B, H, D, dtype=dtype), _meta(P, D, dtype=dtype), target)
    cfg = td.launch_config(B, H, D, q.dtype, target)
    nb = -(-P // cfg["BLOCK_S"])
    if score == "relu":
        out, e, bmax, bsum = _meta(B, P), None, None, None
    else:
        out, e, bmax, bsum = None, _meta(B, nb, H, cfg["BLOCK_S"]), _meta(B, nb, H), _meta(B, nb, H)
    _, args, kwargs = td.plan(q, k, _meta(B, H), _meta(P), out, e, bmax, bsum, score, cast, target)
    return td._decode_kernel, args, kwargs


def compile_all() -> list[dict]:
    """Every case x arch: config, shared memory, registers, spills, mma shapes and counts."""
    from dsa_rag.kernels import gpu_compile as gc
    from dsa_rag.kernels.dispatch import Target

    return [gc.launch_report(*decode_launch(B, H, D, dtype, score, Target("cuda", (arch // 10, arch % 10))), arch,
                             case=name)
            for name, B, H, D, dtype, score in CASES for arch in ARCHS]


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    from dsa_rag.kernels import gpu_compile as gc

    res = gc.reports_from_child(__file__)
    print("\ncase                  arch   BLOCK_R x HP  shared  regs  spills  mma")
    for r in res:
        if r["ok"]:
            c = r["config"]
            print(f"{r['case']:<21} sm_{r['arch']}  {c['BLOCK_R']:>3} x {c['HP']:<3}  {r['shared']:>7}  "
                  f"{r['regs']:>4}  {r['spill_stores']:>4}/{r['spill_loads']}  {r['mma_count']}")
    return {(r["case"], r["arch"]): r for r in res}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_decode_kernel_compiles_within_limits(compiled, name, arch):
    from dsa_rag.kernels import gpu_compile as gc

    r = compiled[(name, arch)]
    assert r["ok"], f"{name} sm_{arch}: {r['error']} (config {r['config']})"
    assert r["shared"] <= gc.SMEM_LIMIT[arch], r
    assert r["regs"] is not None and r["regs"] <= gc.MAX_REGS  # the ptxas log was parsed
    assert (r["spill_stores"] or 0) <= gc.SPILL_LIMIT, r
    fp8_dot = "fp8" in name and arch >= 89
    assert r["mma"] and all(("e4m3" if fp8_dot else "bf16") in m for m in r["mma"]), r["mma"]
    assert r["loop_smem_stores"] == 0, "the key tile is staged to shared memory inside the row loop"
    assert r["i32_offset_muls"] == [], r["i32_offset_muls"]


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_decode_kernel_sm90_one_wgmma_sequence_per_row_block(compiled, name):
    """sm_90: the key tile is each warpgroup's 64-row M operand, the row block's heads the N
    (BLOCK_R * HP >= 16): one m64 n(BLOCK_N) wgmma per k-step of the head dim, nothing more."""
    r = compiled[(name, 90)]
    assert r["ok"], r["error"]
    c = r["config"]
    k = 32 if "fp8" in name else 16
    assert c["BLOCK_R"] * c["HP"] >= 16
    assert r["mma_count"] == {f"m64n{c['BLOCK_R'] * c['HP']}k{k}": c["BLOCK_D"] // k}, r["mma_count"]


if __name__ == "__main__":
    print(json.dumps(compile_all()))
