"""Merge model/eval.py result files into the markdown tables of the model card: accuracy per task
and context length (DSA vs dense, samples, prefill speed) and the indexer recall lines.

    .venv/bin/python -m model.eval_report benchmarks/results/eval_dsa-tiny*.json

A (task, length, mode) cell measured in several files is merged: samples are added up, so a
cell's accuracy is over every sample that was run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge(paths: list[str]) -> tuple[dict, list[dict]]:
    """-> ({(task, n): {mode: {"ok", "n", "tok", "secs"}}}, recall records)."""
    cells: dict = {}
    recall = []
    for p in paths:
        r = json.loads(Path(p).read_text())
        for mode, tasks in r.get("accuracy", {}).items():
            for task, by_len in tasks.items():
                for n, c in by_len.items():
                    m = cells.setdefault((task, int(n)), {}).setdefault(mode, {"ok": 0, "n": 0, "tok": 0.0, "secs": 0.0})
                    m["ok"] += round(c["acc"] * c["n"])
                    m["n"] += c["n"]
                    m["tok"] += c["prefill_tok_s"] * c["seconds"]
                    m["secs"] += c["seconds"]
        recall += r.get("recall", [])
    return cells, recall


def table(cells: dict) -> list[str]:
    out = ["| task | context | DSA exact match | dense exact match | DSA prefill tok/s | dense prefill tok/s |",
           "|---|---:|---:|---:|---:|---:|"]
    for (task, n), modes in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        def acc(m):
            c = modes.get(m)
            return f"{100 * c['ok'] / c['n']:.0f}% ({c['ok']}/{c['n']})" if c else "not run"

        def speed(m):
            c = modes.get(m)
            return f"{c['tok'] / c['secs']:.0f}" if c and c["secs"] else "-"

        out.append(f"| {task} | {n} | {acc('dsa')} | {acc('dense')} | {speed('dsa')} | {speed('dense')} |")
    return out


def recall_lines(recall: list[dict]) -> list[str]:
    return [f"- {r['tokens']} tokens ({r['samples']} samples, k={r['topk']}): recall **{r['recall']:.3f}** "
            f"(per layer {', '.join(f'{v:.2f}' for v in r['recall_per_layer'])}); dense attention mass covered "
            f"{r['mass']:.3f} (per layer {', '.join(f'{v:.2f}' for v in r['mass_per_layer'])})" for r in recall]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    a = ap.parse_args(argv)
    cells, recall = merge(a.files)
    print("\n".join(table(cells)))
    print()
    print("\n".join(recall_lines(recall)))


if __name__ == "__main__":
    main()
