"""Benchmark: what a bigger lightning indexer costs in dsa-tiny's prefill on this CPU. For each
(index_n_heads, index_head_dim), a randomly initialized dsa-tiny of that shape (the cost does not
depend on the weights) prefills the same random tokens in chunks through its caches; reported as
seconds and as the ratio to the shipped shape (4 x 32) measured in the same run. JSON last line.

    .venv/bin/python benchmarks/indexer_capacity_cost.py --lengths 16384 32768 \\
        --out benchmarks/results/indexer_capacity_cost.json
Progress goes to stderr. What each shape buys in recall: MODEL_CARD.md ("Indexer capacity").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dsa_rag.model.config import preset  # noqa: E402
from dsa_rag.model.load import build_model  # noqa: E402
from model_prefill import prefill  # noqa: E402  the same chunked prefill through the caches


def prefill_seconds(heads: int, dim: int, L: int, chunk: int) -> float:
    model = build_model(preset("dsa-tiny", index_n_heads=heads, index_head_dim=dim)).init_weights(seed=0).eval()
    return prefill(model, L, chunk)["seconds"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384])
    ap.add_argument("--shapes", default="4x32,8x32,4x64,8x64,16x32,16x64", help="heads x head_dim, the first is the baseline")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/indexer_capacity_cost.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    runs = []
    for L in a.lengths:
        base = None
        for h, d in shapes:
            sec = prefill_seconds(h, d, L, a.chunk)
            base = base or sec
            # per key: the indexer's 2*H*d FLOPs against the absorbed MLA's 2*8*(2*128+16) = 4352
            runs.append({"tokens": L, "index_n_heads": h, "index_head_dim": d, "seconds": round(sec, 2),
                         "vs_4x32": round(sec / base, 3), "indexer_flops_per_key": 2 * h * d})
            print(runs[-1], file=sys.stderr, flush=True)
    res = {"benchmark": "indexer_capacity_cost", "model": "dsa-tiny (random init)", "chunk": a.chunk,
           "threads": torch.get_num_threads(), "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
