"""Benchmark: a long prefill of dsa-tiny on this CPU (random weights are fine: the cost does not
depend on them), chunked through the latent/indexer caches so memory stays O(L * k), not O(L^2).
Reports tokens/s per context length, the seconds spent in the indexer's top-k selection (the
share that the lightning indexer costs), and the peak RSS of the process; JSON is the last line.

    .venv/bin/python benchmarks/model_prefill.py                      # 128k (the issue's check)
    .venv/bin/python benchmarks/model_prefill.py --lengths 4096 --chunk 1024   # quick
    .venv/bin/python benchmarks/model_prefill.py --lengths 16384 32768 --out benchmarks/results/model_prefill_16k-32k.json
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dsa_rag.model.model as model_module  # noqa: E402
from dsa_rag.model.cache import new_sequence_cache  # noqa: E402
from dsa_rag.model.load import load_model  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def correctness_gate(model) -> float:
    """Chunked prefill through the caches must equal one full forward (else report nothing)."""
    ids = torch.randint(8, model.cfg.vocab_size, (1, 700), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = [new_sequence_cache(model.cfg.num_hidden_layers)]
        parts = [model(ids[:, i: i + 256], i, cache) for i in range(0, 700, 256)]
    return (torch.cat(parts, 1) - full).abs().max().item()


class SelectionTimer:
    """Wraps the model's indexer_topk to add up the seconds spent in it (on `clock`: wall time by
    default, time.process_time for CPU seconds on a shared machine)."""

    def __init__(self, clock=time.perf_counter):
        self.seconds, self._f, self.clock = 0.0, model_module.indexer_topk, clock
        model_module.indexer_topk = self

    def __call__(self, *args, **kw):
        t = self.clock()
        out = self._f(*args, **kw)
        self.seconds += self.clock() - t
        return out


def prefill(model, L: int, chunk: int, timer: SelectionTimer) -> dict:
    ids = torch.randint(8, model.cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(L))
    cache = [new_sequence_cache(model.cfg.num_hidden_layers, capacity=L)]
    timer.seconds = 0.0
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, L, chunk):
            logits = model(ids[:, s: s + chunk], s, cache, last_only=True)
            print(f"  {s + chunk} / {L} tokens, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    dt = time.perf_counter() - t0
    assert torch.isfinite(logits).all()
    return {"tokens": L, "seconds": round(dt, 2), "tokens_per_s": round(L / dt, 1),
            "selection_s": round(timer.seconds, 2), "selection_share": round(timer.seconds / dt, 3),
            "peak_rss_gb": round(peak_rss_gb(), 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[131072])
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: two-thread OpenMP collapses when the 2-core box is shared)")
    ap.add_argument("--out", default="benchmarks/results/model_prefill.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = load_model("dsa-tiny", dtype=getattr(torch, a.dtype))
    err = correctness_gate(model)
    if err > 1e-3:
        print(json.dumps({"error": f"correctness gate failed: chunked vs full max diff {err}"}))
        sys.exit(1)
    runs, timer = [], SelectionTimer()
    for L in a.lengths:
        runs.append(prefill(model, L, a.chunk, timer))
        print(runs[-1], flush=True)
    res = {"benchmark": "model_prefill", "model": "dsa-tiny", "index_score": model.cfg.index_score,
           "index_heads": model.cfg.index_n_heads, "index_head_dim": model.cfg.index_head_dim, "dtype": a.dtype, "chunk": a.chunk,
           "threads": torch.get_num_threads(), "gate_max_diff": err, "runs": runs,
           "peak_rss_gb": round(peak_rss_gb(), 3), "rss_limit_gb": 8.0, "within_limit": peak_rss_gb() <= 8.0}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
