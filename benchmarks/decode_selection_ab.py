"""The indexer's cost per decoded token at a long context, A/B in one run, on dsa-tiny (its
8-head x 64-dim softmax-mixture indexer) over a cache of random values restored at L tokens (the
cost depends on the length, not the values):

  * one request: the blocked prefill path for the single decode query (A: the model's per-row
    indexer_topk with `FUSED_DECODE = False`, the path before 2026-12-06's decode work) against the
    decode path (kernels/indexer/torch_decode.py) with its key product on torch.mm (B) and on the
    AVX2 extension (C: kernels/indexer/cpu_dots.py, the default on x86), and dense attention on the
    same weights for scale;
  * a decode step of n requests forked off the same pack: rows selected one call each (ungrouped)
    against one indexer call for all rows of the pack (grouped: model.MLA._select_decode ->
    indexer_decode_topk, one GEMM over n x 8 query heads), per step and per token.

Rounds alternate the variants; times are this single-threaded process's CPU seconds (the machine
is shared). Same tokens in every variant are checked first. JSON is the last line.

    .venv/bin/python benchmarks/decode_selection_ab.py                       # L = 131008, 3 rounds x 5 steps, n = 4, 8
    .venv/bin/python benchmarks/decode_selection_ab.py --length 16384 --rounds 2 --batch 4 --out /tmp/ab.json
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
import dsa_rag.kernels.indexer.torch_impl as indexer_torch  # noqa: E402
from dsa_rag.kernels.indexer import cpu_dots  # noqa: E402
from dsa_rag.model import model as model_module  # noqa: E402
from dsa_rag.model.engine.engine import Engine, SamplingParams  # noqa: E402
from dsa_rag.model.load import load_model  # noqa: E402
from engine_bench import synthetic_prefix  # noqa: E402


def decode_steps(eng: Engine, handle, n: int, rows: int = 1) -> tuple[list[float], list[list[int]]]:
    """CPU seconds of each decode step of `rows` greedy requests forked off `handle` (their first
    step, the questions' prefill, excluded) and the tokens each produced."""
    rids = [eng.add_request([10 + r, 11, 12], SamplingParams(max_tokens=n + 1, temperature=0.0, stop_token_ids=[]),
                            prefix=handle) for r in range(rows)]
    times, toks = [], {r: [] for r in rids}
    while eng.has_unfinished():
        t = time.process_time()
        events = eng.step()
        times.append(time.process_time() - t)
        for e in events:
            toks[e.request_id].append(e.token_id)
    return times[1:], [toks[r] for r in rids]


class Ungrouped:
    """Rows of one pack selected one indexer call each (the engine before grouped decode)."""

    def __enter__(self):
        self.real = model_module.MLA._select_decode
        model_module.MLA._select_decode = lambda *a, **k: {}

    def __exit__(self, *exc):
        model_module.MLA._select_decode = self.real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=131008)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", default="4,8", help="request counts of the grouped / ungrouped steps")
    ap.add_argument("--out", default="benchmarks/results/decode_selection_ab.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model("dsa-tiny")
    eng = Engine(model)
    h = synthetic_prefix(eng, a.length, model.cfg.vocab_size)
    batches = [int(x) for x in a.batch.split(",") if x]
    times, tokens = {}, {}

    def run(name, rows=1):
        ts, toks = decode_steps(eng, h, a.steps, rows)
        times.setdefault(name, []).extend(ts)
        tokens.setdefault(name, toks)

    for _ in range(a.rounds):
        indexer_torch.FUSED_DECODE = False
        with Ungrouped():
            run("A_blocked")
        indexer_torch.FUSED_DECODE = True
        min_keys, cpu_dots.MIN_KEYS = cpu_dots.MIN_KEYS, 1 << 62  # the key product on torch.mm
        run("B_decode_mm")
        cpu_dots.MIN_KEYS = min_keys
        run("C_decode_avx2")
        model.cfg.dense_attention = True
        run("dense")
        model.cfg.dense_attention = False
        for n in batches:
            run(f"grouped_x{n}", n)
            with Ungrouped():
                run(f"ungrouped_x{n}", n)
    same = tokens["A_blocked"] == tokens["B_decode_mm"] == tokens["C_decode_avx2"] and all(
        tokens[f"grouped_x{n}"] == tokens[f"ungrouped_x{n}"] for n in batches)
    step_ms = {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}
    res = {"benchmark": "decode_selection_ab", "command": "python " + " ".join(sys.argv), "model": "dsa-tiny",
           "context": a.length, "clock": "process CPU seconds, 1 thread", "same_tokens": same,
           "decode_ms_per_step": step_ms, "steps": {k: len(v) for k, v in times.items()},
           "avx2_extension": cpu_dots._module() is not None,
           "decode_mm_over_blocked": round(step_ms["B_decode_mm"] / step_ms["A_blocked"], 3),
           "decode_avx2_over_blocked": round(step_ms["C_decode_avx2"] / step_ms["A_blocked"], 3),
           "dense_over": {k: round(step_ms["dense"] / step_ms[k], 2) for k in ("A_blocked", "B_decode_mm", "C_decode_avx2")},
           "ms_per_token": {f"x{n}": {"grouped": round(step_ms[f"grouped_x{n}"] / n, 2),
                                      "ungrouped": round(step_ms[f"ungrouped_x{n}"] / n, 2)} for n in batches},
           "grouped_speedup": {f"x{n}": round(step_ms[f"ungrouped_x{n}"] / step_ms[f"grouped_x{n}"], 2)
                               for n in batches}}
    if not same:
        res["error"] = "variants decoded different tokens: timings not reported as a comparison"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
