"""Benchmark: cross-layer index reuse (ModelConfig.indexer_types, `index_every=N`) on the shipped
dsa-tiny, in one run: the indexer on every layer against every 2nd and every 4th layer (the
layers between reuse the last full layer's top-k). Per plan: a real chunked prefill to 32k (tok/s,
the share of the time spent in top-k selection); at 128k, over a cache of random values, the
prefill chunk that ends there (its tok/s: the marginal prefill rate at 128k) and decode steps
(ms/token). The plans take turns chunk by chunk and step by step, so a busy machine slows them
alike. Accuracy is the eval's (model/evals/eval.py
--index-every N; benchmarks/results/index_reuse/eval_every*_*.json), joined into the report
when present. JSON is the last line.

    .venv/bin/python benchmarks/index_reuse_bench.py                                   # 32k + 128k
    .venv/bin/python benchmarks/index_reuse_bench.py --rejoin benchmarks/results/index_reuse/index_reuse_bench.json
    .venv/bin/python benchmarks/index_reuse_bench.py --prefill 4096 --probe 16384 --decode-steps 4 --out /tmp/reuse.json  # quick
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
# CPU seconds of this (single-threaded) process, not wall time: on a machine shared with other
# jobs, wall time mostly measures the others; the plans still take turns, for cache effects.
CLOCK = time.process_time


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
        self.prefill, self.probe, self.steps, self.step_sel = None, None, [], []

    def run(self, ids, start: int, timer: SelectionTimer):
        timer.seconds = 0.0
        t = CLOCK()
        logits = self.model(ids, start, self.cache, last_only=True)
        dt = CLOCK() - t
        assert torch.isfinite(logits).all()
        return dt, timer.seconds

    def result(self) -> dict:
        cfg = self.model.cfg
        med = statistics.median(self.steps)
        return {"every": self.every, "indexer_types": cfg.indexer_types, "full_layers": cfg.full_index_layers,
                "gate_max_abs_diff": self.gate, "prefill": self.prefill, "long_chunk": self.probe,
                "decode": {"steps": len(self.steps), "ms_per_token": round(1000 * med, 2),
                           "selection_share": round(statistics.median(self.step_sel) / med, 3)},
                "indexer_cache_bytes_per_token": 4 * cfg.index_head_dim * len(cfg.full_index_layers)}


def synthetic_cache(cfg, upto: int, capacity: int, seed: int):
    """A per-layer cache holding random latent kv and indexer keys for positions 0 .. upto-1 (what a
    probe at a long context needs when a real prefill there does not fit the time budget: the cost
    depends on the cache length, not its values)."""
    g = torch.Generator().manual_seed(seed)
    cache = new_sequence_cache(cfg.num_hidden_layers, capacity=capacity)
    for i, c in enumerate(cache):
        kv = torch.randn(upto, cfg.kv_lora_rank + cfg.qk_rope_head_dim, generator=g)
        ik = torch.randn(upto, cfg.index_head_dim, generator=g) if cfg.layer_has_indexer(i) else None
        c.write(0, kv, ik, None)
    return cache


@torch.no_grad()
def run_plans(everies: list[int], prefill_len: int, probe_len: int, chunk: int, decode_steps: int,
              timer: SelectionTimer, on_prefill=None) -> list[dict]:
    """1. Every plan prefills the same tokens 0 .. prefill_len-1 chunk by chunk, in turn (a busy
    machine slows all plans alike): tok/s of the whole prefill and its selection share.
    2. At probe_len, over a synthetic cache: the last chunk (probe_len - chunk .. probe_len-1),
    tok/s of that chunk, then decode_steps decode steps at probe_len, plans in turn per step."""
    plans = [Plan(e, prefill_len) for e in everies]
    ids = torch.randint(8, plans[0].model.cfg.vocab_size, (1, max(prefill_len, probe_len) + decode_steps),
                        generator=torch.Generator().manual_seed(prefill_len))
    for done in range(0, prefill_len, chunk):
        n = min(chunk, prefill_len - done)
        for p in plans:
            dt, sel = p.run(ids[:, done: done + n], done, timer)
            p.seconds += dt
            p.selection += sel
        print(f"  {done + n} / {prefill_len} tokens: " + ", ".join(f"every {p.every} {p.seconds:.0f}s" for p in plans),
              file=sys.stderr, flush=True)
    for p in plans:
        p.prefill = {"tokens": prefill_len, "seconds": round(p.seconds, 2), "tokens_per_s": round(prefill_len / p.seconds, 1),
                     "selection_share": round(p.selection / p.seconds, 3)}
        p.cache = None  # free it before the long synthetic caches
    if on_prefill is not None:
        on_prefill([{"every": p.every, "prefill": p.prefill} for p in plans])
    start = probe_len - chunk
    for p in plans:
        p.cache = [synthetic_cache(p.model.cfg, start, probe_len + decode_steps, seed=probe_len)]
    for p in plans:
        dt, sel = p.run(ids[:, start: probe_len], start, timer)
        p.probe = {"positions": [start, probe_len], "seconds": round(dt, 2), "tokens_per_s": round(chunk / dt, 1),
                   "selection_share": round(sel / dt, 3)}
        print(f"  every {p.every}: chunk at {probe_len}: {dt:.1f}s", file=sys.stderr, flush=True)
    for i in range(decode_steps):  # teacher-forced decode steps: the cost of one generated token at probe_len
        for p in plans:
            dt, sel = p.run(ids[:, probe_len + i: probe_len + i + 1], probe_len + i, timer)
            p.steps.append(dt)
            p.step_sel.append(sel)
    out = [p.result() for p in plans]
    for r in out:
        r["decode"]["context"] = probe_len
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
    P, L = res["prefill_len"], res["probe_len"]
    lines = ["# Cross-layer index reuse on dsa-tiny (CPU)", "",
             f"Command: `{res['command']}`  ",
             f"torch {res['torch']}, {res['threads']} thread(s), float32, prefill chunk {res['chunk']}, index_topk 256, "
             "shipped dsa-tiny weights; times are the process's CPU seconds (the machine was shared). "
             "Correctness gate (chunked prefill == one forward, per plan): green.", "",
             f"| indexer on | full layers | prefill tok/s 0..{P} | selection share | tok/s of the chunk ending at {L} "
             f"| selection share | decode ms/tok at {L} | selection share | needle acc 4k | needle acc 32k |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["plans"]:
        acc = r.get("niah_single", {})
        cell = lambda k: f"{acc[k]['acc']:.3f} (n={acc[k]['n']})" if k in acc else "—"  # noqa: E731
        pf, lc, dc = r["prefill"], r["long_chunk"], r["decode"]
        lines.append(f"| every {r['every']} | {len(r['full_layers'])}/4 | {pf['tokens_per_s']} | {pf['selection_share']} "
                     f"| {lc['tokens_per_s']} | {lc['selection_share']} | {dc['ms_per_token']} | {dc['selection_share']} "
                     f"| {cell('4096')} | {cell('32768')} |")
    lines += ["",
              f"- prefill: a real chunked prefill of tokens 0..{P}, the plans taking turns chunk by chunk.",
              f"- long context: a {res['chunk']}-token chunk ending at {L} and {r['decode']['steps']} decode steps after it, "
              f"over a cache of random values for the positions before (the cost depends on the cache length, not its "
              f"values; a real prefill to {L} of three plans does not fit this shared 2-core machine's session). The "
              f"chunk's tok/s is the prefill's marginal rate at that length, not the average of a whole prefill.",
              "- accuracy: `model/evals/eval.py --index-every N --modes dsa --tasks niah_single` on the existing eval sets "
              "(seed 1234; 40 samples at 4k, 10 at 32k), files `eval_every{N}_{4k,32k}.json` here."]
    path.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--prefill", type=int, default=32768, help="a real prefill from 0 to this length")
    ap.add_argument("--probe", type=int, default=131008, help="the long-context probe: a chunk ending here, then decode")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "index_reuse_bench.json"))
    ap.add_argument("--rejoin", metavar="JSON", help="re-attach the eval accuracies to a saved result and rewrite its .md")
    a = ap.parse_args()
    if a.rejoin:  # the evals finish after the timing run: attach them without timing again
        res = json.loads(Path(a.rejoin).read_text())
        join_accuracy(res)
        Path(a.rejoin).write_text(json.dumps(res, indent=1))
        write_md(res, Path(a.rejoin).with_suffix(".md"))
        return print(json.dumps(res))
    torch.set_num_threads(a.threads)
    timer = SelectionTimer(CLOCK)
    res = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "threads": a.threads,
           "clock": "process CPU seconds (time.process_time)",
           "chunk": a.chunk, "prefill_len": a.prefill, "probe_len": a.probe, "plans": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    def partial(plans):
        out.write_text(json.dumps({**res, "partial": True, "plans": plans}, indent=1))

    res["plans"] = run_plans(a.every, a.prefill, a.probe, a.chunk, a.decode_steps, timer, partial)
    res["peak_rss_gb"] = round(peak_rss_gb(), 3)
    join_accuracy(res)
    out.write_text(json.dumps(res, indent=1))
    write_md(res, out.with_suffix(".md"))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
