"""Plot training logs (model/training/train.py's log.csv) of consecutive runs end to end: answer CE, teacher-
forced answer exact match, indexer KL and recall against the cumulative step, one shade per run.

    .venv/bin/python -m dsa_rag.model.training.plot_train benchmarks/results/train_dsa-tiny_{0a,0b,0,1,2,2b,3a,3b,3c,3d}.csv \\
        --out benchmarks/results/train_dsa-tiny.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

PANELS = (("ans_ce", "answer CE (nats/byte)"), ("ans_acc", "answer exact match (teacher-forced)"),
          ("kl", "indexer KL"), ("recall", "indexer recall of dense top-k"))


def read_runs(paths: list[str]) -> list[tuple[str, list[dict]]]:
    """-> [(run name, rows with float fields and a cumulative 'x' step)]."""
    runs, offset = [], 0
    for p in paths:
        rows = []
        for r in csv.DictReader(open(p)):
            row = {k: float(v) for k, v in r.items() if v not in ("", None)}
            row["x"] = offset + row["step"]
            rows.append(row)
        if rows:
            offset = rows[-1]["x"]
            runs.append((Path(p).stem.rsplit("_", 1)[-1], rows))
    return runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="log.csv files, in training order")
    ap.add_argument("--out", default="train.png")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_runs(a.logs)
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(9, 9), sharex=True)
    for ax, (key, label) in zip(axes, PANELS):
        for i, (name, rows) in enumerate(runs):
            pts = [(r["x"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), lw=1, color=f"C{i % 10}", label=name)
            ax.axvspan(rows[0]["x"] - rows[0]["step"], rows[-1]["x"], color=f"C{i % 10}", alpha=0.06)
        ax.set_ylabel(label, fontsize=8)
    axes[0].legend(fontsize=7, ncol=len(runs), title="run", title_fontsize=7)
    axes[-1].set_xlabel("cumulative step")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
