"""Benchmark: cross-layer index reuse (ModelConfig.indexer_types, `index_every=N`) on the shipped
dsa-tiny, in one run: the indexer on every layer against every 2nd and every 4th layer (the
layers between reuse the last full layer's top-k). Per plan: one chunked prefill grown to 32k and
on to 128k (tok/s at each, and the share of the time spent in top-k selection), then decode
steps at 128k (ms/token, selection share). The plans take turns chunk by chunk, so a busy
machine slows them alike. Accuracy is the eval's (model/evals/eval.py
--index-every N; benchmarks/results/index_reuse/eval_every*_*.json), joined into the report
when present. JSON is the last line.

    .venv/bin/python benchmarks/index_reuse_bench.py                                   # 32k + 128k (~30 min, 1 thread)
    .venv/bin/python benchmarks/index_reuse_bench.py --lengths 4096 8192 --decode-steps 4 --out /tmp/reuse.json  # quick
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dsa_rag.model.cache import new_sequence_cache  # noqa: E402
from dsa_rag.model.load import load_model  # noqa: E402
from model_prefill import SelectionTimer, correctness_gate, peak_rss_gb  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "index_reuse"


class Plan:
    """One indexer plan: its model, its cache, and the seconds spent so far."""

    def __init__(self, every: int, capacity: int):
        self.every = every
        self.model = load_model("dsa-tiny", index_every=every)
        self.gate = correctness_gate(self.model)
        if self.gate > 1e-3:
            raise SystemExit(f"correctness gate red for every={every}: chunked prefill differs from one forward by {self.gate}")
        self.cache = [new_sequence_cache(self.model.cfg.num_hidden_layers, capacity=capacity)]
        self.seconds = self.selection = 0.0
        self.prefill, self.steps, self.step_sel = [], [], []

    def run(self, ids, start: int, timer: SelectionTimer):
        timer.seconds = 0.0
        t = time.perf_counter()
        logits = self.model(ids, start, self.cache, last_only=True)
        dt = time.perf_counter() - t
        assert torch.isfinite(logits).all()
        return dt, timer.seconds

    def result(self) -> dict:
        cfg = self.model.cfg
        med = statistics.median(self.steps)
        return {"every": self.every, "indexer_types": cfg.indexer_types, "full_layers": cfg.full_index_layers,
                "gate_max_abs_diff": self.gate, "prefill": self.prefill,
                "decode": {"steps": len(self.steps), "ms_per_token": round(1000 * med, 2),
                           "selection_share": round(statistics.median(self.step_sel) / med, 3)},
                "indexer_cache_bytes_per_token": 4 * cfg.index_head_dim * len(cfg.full_index_layers)}


@torch.no_grad()
def run_plans(everies: list[int], lengths: list[int], chunk: int, decode_steps: int, timer: SelectionTimer) -> list[dict]:
    """Every plan prefills the same tokens chunk by chunk, in turn (so a busy machine slows all
    plans alike), then decodes in turn at the longest length."""
    L = max(lengths)
    plans = [Plan(e, L + decode_steps) for e in everies]
    ids = torch.randint(8, plans[0].model.cfg.vocab_size, (1, L + decode_steps), generator=torch.Generator().manual_seed(L))
    done = 0
    for target in sorted(lengths):
        while done < target:
            n = min(chunk, target - done)
            for p in plans:
                dt, sel = p.run(ids[:, done: done + n], done, timer)
                p.seconds += dt
                p.selection += sel
            done += n
            print(f"  {done} / {L} tokens: " + ", ".join(f"every {p.every} {p.seconds:.0f}s" for p in plans),
                  file=sys.stderr, flush=True)
        for p in plans:
            p.prefill.append({"tokens": target, "seconds": round(p.seconds, 2), "tokens_per_s": round(target / p.seconds, 1),
                              "selection_share": round(p.selection / p.seconds, 3)})
    for i in range(decode_steps):  # teacher-forced decode steps: the cost of one generated token at L
        for p in plans:
            dt, sel = p.run(ids[:, L + i: L + i + 1], L + i, timer)
            p.steps.append(dt)
            p.step_sel.append(sel)
    out = [p.result() for p in plans]
    for r in out:
        r["decode"]["context"] = L
    return out


def join_accuracy(res: dict) -> None:
    """Attach the eval's single-needle accuracy per plan and length, where its files exist."""
    for r in res["plans"]:
        acc = {}
        for f in sorted(RESULTS.glob(f"eval_every{r['every']}_*.json")):
            d = json.loads(f.read_text())
            for length, cell in d["accuracy"].get("dsa", {}).get("niah_single", {}).items():
                acc[length] = {"acc": cell["acc"], "n": cell["n"], "file": f.name}
        r["niah_single"] = acc


def write_md(res: dict, path: Path) -> None:
    lo, hi = min(res["lengths"]), max(res["lengths"])
    lines = ["# Cross-layer index reuse on dsa-tiny (CPU)", "",
             f"Command: `{res['command']}`  ",
             f"torch {res['torch']}, {res['threads']} thread(s), float32, prefill chunk {res['chunk']}, index_topk 256. "
             "Correctness gate (chunked prefill == one forward, per plan): green.", "",
             f"| indexer on | full layers | prefill tok/s at {lo} | prefill tok/s at {hi} | selection share of prefill ({hi}) "
             f"| decode ms/tok at {hi} | selection share of decode | needle acc 4k | needle acc 32k |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["plans"]:
        pf = {p["tokens"]: p for p in r["prefill"]}
        acc = r.get("niah_single", {})
        cell = lambda k: f"{acc[k]['acc']:.3f} (n={acc[k]['n']})" if k in acc else "—"  # noqa: E731
        lines.append(f"| every {r['every']} | {len(r['full_layers'])}/4 | {pf[lo]['tokens_per_s']} | {pf[hi]['tokens_per_s']} "
                     f"| {pf[hi]['selection_share']} | {r['decode']['ms_per_token']} | {r['decode']['selection_share']} "
                     f"| {cell('4096')} | {cell('32768')} |")
    lines += ["", "Accuracy: `model/evals/eval.py --index-every N --modes dsa --tasks niah_single` on the existing "
              "eval sets (seed 1234; 40 samples at 4k, 10 at 32k), files `eval_every{N}_{4k,32k}.json` here."]
    path.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131008])
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "index_reuse_bench.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    timer = SelectionTimer()
    res = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "threads": a.threads,
           "chunk": a.chunk, "lengths": a.lengths, "plans": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res["plans"] = run_plans(a.every, a.lengths, a.chunk, a.decode_steps, timer)
    res["peak_rss_gb"] = round(peak_rss_gb(), 3)
    join_accuracy(res)
    out.write_text(json.dumps(res, indent=1))
    write_md(res, out.with_suffix(".md"))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
