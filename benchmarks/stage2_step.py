"""Benchmark: one stage-2 training step (forward + backward) of dsa-tiny on this CPU, with the
dense-masked training attention of model/training/train.py (O(T^2): [B, H, T, T] scores) against the
gathered one of model/training/sparse_train.py (O(T k)), by context length. Each (mode, length) runs in a
fresh process so its peak RSS is its own. JSON last line; the ratio dense / sparse is taken on
the lengths both ran.

    .venv/bin/python benchmarks/stage2_step.py --dense 2048 4096 --sparse 2048 4096 8192 16384 32768 \\
        --out benchmarks/results/stage2_step.json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from dsa_rag.model.load import load_model
from dsa_rag.model.tokenizer import ByteTokenizer
from dsa_rag.model.training import data, train

ROOT = Path(__file__).resolve().parents[1]


def one(mode: str, T: int, chunk: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    m = load_model("dsa-tiny").train()
    x, y, w = data.batch(random.Random(T), T, T, ("niah_single",), None, ByteTokenizer())
    t0 = time.perf_counter()
    L = train.losses(m, x, y, w, 2, 0.5, sparse_chunk=chunk if mode == "sparse" else 0)
    (L["lm"] + L["kl"]).backward()
    dt = time.perf_counter() - t0
    return {"mode": mode, "tokens": int(x.shape[1]), "seconds": round(dt, 2), "tok_s": round(x.shape[1] / dt, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "lm": round(float(L["lm"]), 4), "kl": round(float(L["kl"]), 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense", type=int, nargs="*", default=[2048, 4096])
    ap.add_argument("--sparse", type=int, nargs="*", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", nargs=2, metavar=("MODE", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/stage2_step.json")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]), a.chunk, a.threads)))
        return
    runs = []
    for mode, lengths in (("dense", a.dense), ("sparse", a.sparse)):
        for T in lengths:
            r = subprocess.run([sys.executable, __file__, "--one", mode, str(T), "--chunk", str(a.chunk),
                                "--threads", str(a.threads)], capture_output=True, text=True, cwd=ROOT)
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else
                        {"mode": mode, "tokens": T, "error": r.stderr.strip().splitlines()[-1:]})
            print(runs[-1], file=sys.stderr, flush=True)
    ratio = {}
    for d in runs:
        s = next((r for r in runs if r["mode"] == "sparse" and r.get("tokens") == d.get("tokens") and "seconds" in r), None)
        if d["mode"] == "dense" and "seconds" in d and s:
            ratio[d["tokens"]] = {"time_dense_over_sparse": round(d["seconds"] / s["seconds"], 2),
                                  "rss_dense_over_sparse": round(d["peak_rss_gb"] / s["peak_rss_gb"], 2)}
    res = {"benchmark": "stage2_step", "model": "dsa-tiny (shipped weights)", "chunk": a.chunk, "threads": a.threads,
           "runs": runs, "ratios": ratio}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
