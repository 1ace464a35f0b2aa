"""The one-launch sink attention kernel (kernels/sink_attention/triton.py, `_sink_kernel`) compiled
for NVIDIA GPUs on the CPU (no GPU, no driver), with kernels/gpu_compile.py's compile_launch.

Each case is the launch the Triton backend makes at V4-Flash shapes (H = 64, D = 512, bf16, window
128 rows + top-k 512 compressed entries, int64 indices as model/v4/attention.py builds them),
through the launcher's own configs / plan on meta tensors: decode (T = 1) and a 2048-query
prefill chunk, for sm_90 and sm_80, every entry of the config table (the default and the
alternative DSA_KERNEL_AUTOTUNE=1 may pick). Checked: it compiles, shared memory within
gpu_compile.SMEM_LIMIT, spill stores within SPILL_LIMIT, bf16 tensor-core dots, int64 query-row
offsets. The figures (shared memory, registers, spills, mma counts) are printed.

The compiles run in a child process without TRITON_INTERPRET (the interpreter's global patches of
triton.language break the compiler; tests/kernels/conftest.py sets it): this file run as a script
prints the results as JSON.
Run: .venv/bin/python -m pytest -q -s tests/kernels/test_sink_attention_compile.py   (a few minutes on 2 cores)
     .venv/bin/python tests/kernels/test_sink_attention_compile.py                     (the JSON)
"""

import json

import pytest
import torch

H, D, WINDOW, TOPK = 64, 512, 128, 512  # V4-Flash
POOL = 32768  # compressed entries in the pool storage (any size: only its row stride matters)
# (name, T)
CASES = [("v4flash/bf16/decode", 1), ("v4flash/bf16/prefill", 2048)]
ARCHS = (90, 80)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def launches(T, target):
    """[(config index, (kernel, args, kwargs))] of every config-table entry for T queries after
    WINDOW - 1 cached window rows, on meta tensors through the launcher's own plan()."""
    from dsa_rag.kernels.sink_attention import triton as st

    dt = torch.bfloat16
    q, kv, win = _meta(T, H, D, dtype=dt), _meta(WINDOW - 1 + T, D, dtype=dt), _meta(T, WINDOW, dtype=torch.int64)
    pool, ent = _meta(POOL, D, dtype=dt), _meta(T, TOPK, dtype=torch.int64)
    sink, out = _meta(H), _meta(T, H, D, dtype=dt)
    res = []
    for i, cfg in enumerate(st.configs(H, D, dt, target)):
        _, args, kwargs = st.plan(q, kv, win, sink, out, None, D ** -0.5, pool, ent, target, cfg)
        res.append((i, (st._sink_kernel, args, kwargs)))
    return res


def compile_all() -> list[dict]:
    from dsa_rag.kernels import gpu_compile as gc

    return [gc.launch_report(kernel, args, kwargs, arch, case=name, variant=i)
            for name, T in CASES for arch in ARCHS for i, (kernel, args, kwargs) in launches(T, gc.target_for(arch))]


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    from dsa_rag.kernels import gpu_compile as gc

    res = gc.reports_from_child(__file__)
    print("\ncase                  arch   cfg  BLOCK_H x K  warps DV_SPLIT  shared  regs  spills  mma")
    for r in res:
        c = r["config"]
        head = (f"{r['case']:<21} sm_{r['arch']}  #{r['variant']}   {c['BLOCK_H']:>3} x {c['BLOCK_K']:<3}  "
                f"{c['num_warps']:>4}  {c['DV_SPLIT']:>5}")
        print(f"{head}  {r['shared']:>7}  {r['regs']:>4}  {r['spill_stores']:>4}/{r['spill_loads']}  {r['mma_count']}"
              if r["ok"] else f"{head}  FAILED {r['error']}")
    return res


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_sink_kernel_compiles_within_limits(compiled, name, arch):
    from dsa_rag.kernels import gpu_compile as gc

    rows = [r for r in compiled if r["case"] == name and r["arch"] == arch]
    assert rows
    for r in rows:  # every config-table entry: the dispatch (or the autotuner) may launch any
        assert r["ok"], f"{name} sm_{arch} #{r['variant']}: {r['error']} (config {r['config']})"
        assert r["shared"] <= gc.SMEM_LIMIT[arch], r
        assert r["regs"] is not None and r["regs"] <= gc.MAX_REGS  # the ptxas log was parsed
        assert (r["spill_stores"] or 0) <= gc.SPILL_LIMIT, r
        assert r["mma"] and all("bf16" in m for m in r["mma"]), r["mma"]
        assert r["i32_offset_muls"] == [], r["i32_offset_muls"]


if __name__ == "__main__":
    print(json.dumps(compile_all()))
