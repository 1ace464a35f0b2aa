"""Merge model/evals/eval.py result files into the markdown tables of the model card: accuracy per task
and context length (DSA vs dense, samples, prefill speed) and the indexer recall lines.

    .venv/bin/python -m dsa_rag.model.evals.eval_report benchmarks/results/eval_dsa-tiny*.json
    .venv/bin/python -m pytest -q tests/model/evals/test_eval.py

A (task, length, mode) cell measured in several files is merged: samples are added up, so a
cell's accuracy is over every sample that was run. Where the files hold both modes' outcomes on the
same examples (eval.py records each sample with an id), DSA and dense are also paired example by example:
how many only one of them answered, with an exact two-sided sign test on those (McNemar's test),
which says whether a gap between the two is more than the luck of the draw. Per context length,
the paired examples of every task are pooled into one DSA-minus-dense difference in points with a
95% interval (the issue's "within 2 points at every length"). Wrong answers that eval.py decoded
are counted by failure kind (model/evals/failure_kinds.py).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from dsa_rag.model.evals.failure_kinds import KINDS


def sample_records(res: dict):
    """(mode, task, length, record) for every per-sample record of a model/evals/eval.py result."""
    for mode, tasks in res.get("samples", {}).items():
        for task, by_len in tasks.items():
            for n, recs in by_len.items():
                for rec in recs:
                    yield mode, task, int(n), rec


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


def pairs(paths: list[str]) -> dict:
    """-> {(task, n): {"both", "dsa_only", "dense_only", "neither"}} over the examples that were run
    in both modes, in one file or in two (matched by the example ids that eval.py records; files
    from before it recorded them add nothing). The files must be one model's."""
    seen: dict = {}  # (mode, task, length, example id) -> correct
    for p in paths:
        for mode, task, n, rec in sample_records(json.loads(Path(p).read_text())):
            key = (mode, task, n, rec["example"])
            if seen.setdefault(key, rec["correct"]) != rec["correct"]:
                raise ValueError(f"{p}: example {rec['example']} ({mode}) disagrees with an earlier file: "
                                 "are these files one model's?")
    out: dict = {}
    names = {(True, True): "both", (True, False): "dsa_only", (False, True): "dense_only", (False, False): "neither"}
    for (mode, task, n, ex), ok in seen.items():
        if mode != "dsa" or ("dense", task, n, ex) not in seen:
            continue
        c = out.setdefault((task, n), dict.fromkeys(names.values(), 0))
        c[names[(ok, seen[("dense", task, n, ex)])]] += 1
    return out


def sign_test(a: int, b: int) -> float:
    """Exact two-sided p of a split a:b of the discordant pairs under 'either mode is as likely to
    be the one that is right' (McNemar's exact test)."""
    m = a + b
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(a, b) + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def pair_lines(pc: dict) -> list[str]:
    out = []
    for (task, n), c in sorted(pc.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        tot = sum(c.values())
        out.append(f"- {task} at {n}, {tot} examples run in both modes: only DSA right on {c['dsa_only']}, only dense "
                   f"on {c['dense_only']}, both on {c['both']}, neither on {c['neither']} "
                   f"(exact sign test p = {sign_test(c['dsa_only'], c['dense_only']):.2g})")
    return out


def paired_difference(dsa_only: int, dense_only: int, n: int) -> tuple[float, float, float]:
    """DSA minus dense accuracy over n paired examples, in points, with a 95% normal interval
    (the variance of a paired difference of proportions: discordant pairs only)."""
    d = (dsa_only - dense_only) / n
    se = math.sqrt(max(dsa_only + dense_only - n * d * d, 0.0)) / n
    return 100 * d, 100 * (d - 1.96 * se), 100 * (d + 1.96 * se)


def length_lines(pc: dict) -> list[str]:
    by_n: dict = {}
    for (task, n), c in pc.items():
        t = by_n.setdefault(n, {"tasks": 0, **dict.fromkeys(c, 0)})
        t["tasks"] += 1
        for k, v in c.items():
            t[k] += v
    out = []
    for n, t in sorted(by_n.items()):
        tot = t["both"] + t["dsa_only"] + t["dense_only"] + t["neither"]
        d, lo, hi = paired_difference(t["dsa_only"], t["dense_only"], tot)
        out.append(f"- {n} tokens, {tot} paired examples of {t['tasks']} tasks: DSA {100 * (t['both'] + t['dsa_only']) / tot:.1f}%, "
                   f"dense {100 * (t['both'] + t['dense_only']) / tot:.1f}%, DSA - dense {d:+.1f} points "
                   f"(95% interval {lo:+.1f} to {hi:+.1f}; only DSA right {t['dsa_only']}, only dense {t['dense_only']}, "
                   f"sign test p = {sign_test(t['dsa_only'], t['dense_only']):.2g})")
    return out


def failures(paths: list[str]) -> dict:
    """-> {(mode, task, n): {kind: count}} over the wrong answers that eval.py decoded (each example
    once, however many files hold it)."""
    seen: dict = {}
    for p in paths:
        for mode, task, n, rec in sample_records(json.loads(Path(p).read_text())):
            if "failure" in rec:
                seen[(mode, task, n, rec["example"])] = rec["failure"]
    out: dict = {}
    for (mode, task, n, _), kind in seen.items():
        c = out.setdefault((mode, task, n), {})
        c[kind] = c.get(kind, 0) + 1
    return out


def failure_lines(fc: dict) -> list[str]:
    return [f"- {mode} {task} at {n}: " + ", ".join(f"{kind} {c[kind]}" for kind in KINDS if c.get(kind))
            for (mode, task, n), c in sorted(fc.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0]))]


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
    pc = pairs(a.files)
    for lines in (pair_lines(pc), length_lines(pc), failure_lines(failures(a.files))):
        if lines:
            print()
            print("\n".join(lines))


if __name__ == "__main__":
    main()
