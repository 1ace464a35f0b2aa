"""Compile every Triton kernel configuration the dispatch can pick for NVIDIA GPUs, on the CPU.

    .venv/bin/python benchmarks/kernels_compile.py                 # AFTER (working tree), sm_90/80/100
    .venv/bin/python benchmarks/kernels_compile.py --ref HEAD      # + BEFORE: that revision's kernels
    .venv/bin/python benchmarks/kernels_compile.py --archs 90 --cases indexer/v32/fp8/prefill

No GPU or driver: triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) with the
ptxas bundled in the Triton 3.9 wheel; the launchers' own plan()/launch_config pick the
configuration (kernels/gpu_compile.py explains how). Matrix: dsa-tiny, V3.2, GLM-5 (32-head
indexer), a D=16 indexer, prefill (2048-query chunk / 4096 rows) and decode (T=1; sparse_mla
also B=64 rows, both on the split-K decode launch, and its combine kernel), FP8 / bf16 / fp16,
plus ungated fp32 rows (the default dispatch sends fp32 CUDA inputs to torch); every entry of the
launchers' per-architecture config tables (`<case>#alt<i>`: what DSA_KERNEL_AUTOTUNE=1 may pick).
Writes benchmarks/results/kernels_compile.{json,md}; the JSON is also the last stdout line.
The CI test (tests/kernels/test_compile_gpu.py) compiles a subset for sm_90 and sm_80.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret (see kernels/gpu_compile.py)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from dsa_rag.kernels import gpu_compile as gc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def table(rows: list[dict]) -> list[str]:
    out = ["| case | arch | ok | shared (B) | regs | spill st/ld (B) | tensor-core instr | config | error / violations |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = r.get("config") or {}
        cfg_s = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in cfg.items()
                         if k.startswith("BLOCK") or k.startswith("num_")
                         or k in ("DOT_CAST", "DV_SPLIT", "NUM_SPLITS"))
        gated = "" if r["gated"] else " (ungated)"
        if r["ok"]:
            out.append(f"| {r['case']}{gated} | {r['arch']} | {'yes' if not r['violations'] else 'LIMIT'} | "
                       f"{r['shared']} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | "
                       f"{'<br>'.join(m.replace('.sync.aligned', '') for m in r['mma'])} | {cfg_s} | "
                       f"{'; '.join(r['violations'])}{' i32 t*stride: ' + str(len(r['i32_offset_muls'])) if r.get('i32_offset_muls') else ''} |")
        else:
            out.append(f"| {r['case']}{gated} | {r['arch']} | **FAIL** | | | | | {cfg_s} | {r['error'][:160]} |")
    return out


def summary(rows):
    gated = [r for r in rows if r["gated"]]
    return dict(compiled=sum(r["ok"] for r in rows), total=len(rows),
                gated_failures=[f"{r['case']}@{r['arch']}" for r in gated if not r["ok"]],
                gated_violations=[f"{r['case']}@{r['arch']}" for r in gated if r["ok"] and r["violations"]],
                i32_offsets=[f"{r['case']}@{r['arch']}" for r in rows if r.get("i32_offset_muls")])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="90,80,100")
    ap.add_argument("--cases", default="")
    ap.add_argument("--ref", default=None, help="also compile this git revision's kernels (BEFORE)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels_compile"))
    a = ap.parse_args()
    archs = tuple(int(x) for x in a.archs.split(","))
    names = [n for n in a.cases.split(",") if n] or None
    import triton

    res = dict(triton=triton.__version__, host=platform.machine(), archs=[f"sm_{x}" for x in archs],
               smem_limit={f"sm_{k}": v for k, v in gc.SMEM_LIMIT.items() if k in archs},
               spill_limit=gc.SPILL_LIMIT)
    t0 = time.time()
    if a.ref:
        res["before_ref"] = a.ref
        res["before"] = gc.run_matrix(names, archs, ref=a.ref, ttir_check=True)
        res["before_summary"] = summary(res["before"])
    res["after"] = gc.run_matrix(names, archs, ttir_check=True)
    res["after_summary"] = summary(res["after"])
    res["seconds"] = round(time.time() - t0, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["# Triton kernels compiled for NVIDIA targets on CPU (no GPU)", "",
          f"Command: `.venv/bin/python benchmarks/kernels_compile.py{' --ref ' + a.ref if a.ref else ''}`  ",
          f"Triton {res['triton']}, bundled ptxas; shared-memory limits {res['smem_limit']} B per block; "
          f"spill bound {gc.SPILL_LIMIT} B (kernels/gpu_compile.py). `shared` = the compiled kernel's "
          "metadata.shared (dynamic smem), regs/spills from `ptxas -v`. ungated = the default dispatch "
          "does not pick Triton for it (fp32 on CUDA goes to torch). `i32 t*stride: n` = n int32 "
          "multiplies of a program_id(0)-derived row by a stride in the TTIR (wraps past 2^31).", ""]
    if a.ref:
        md += [f"## BEFORE ({a.ref})", "", f"Summary: `{json.dumps(res['before_summary'])}`", ""] + table(res["before"]) + [""]
    md += ["## AFTER (working tree)", "", f"Summary: `{json.dumps(res['after_summary'])}`", ""] + table(res["after"]) + [""]
    out.with_suffix(".md").write_text("\n".join(md))
    print(json.dumps(dict(after_summary=res["after_summary"], before_summary=res.get("before_summary"),
                          seconds=res["seconds"], json=str(out.with_suffix(".json")))))
    sys.exit(1 if res["after_summary"]["gated_failures"] or res["after_summary"]["gated_violations"] else 0)


if __name__ == "__main__":
    main()
