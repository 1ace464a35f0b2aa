"""A/B of one engine decode step at a long context, in one run: the softmax-mixture indexer with
its keys-with-ones copy on every call (A, `K1_MIN_ROWS_PER_DIM = 0`, the behaviour before
2026-12-06) against the copy only when enough query rows share it (B, the default: never in
decode), and dense attention on the same weights for scale. dsa-tiny over a cache of random
values restored at L tokens (the cost depends on the length, not the values); rounds alternate
A / B / dense; times are this single-threaded process's CPU seconds (the machine is shared).
Same tokens in A and B are checked first. JSON is the last line.

    .venv/bin/python benchmarks/decode_selection_ab.py                       # L = 131008, 3 rounds x 5 steps
    .venv/bin/python benchmarks/decode_selection_ab.py --length 16384 --rounds 2 --out /tmp/ab.json
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
from dsa_rag.model.engine.engine import Engine, SamplingParams  # noqa: E402
from dsa_rag.model.load import load_model  # noqa: E402
from engine_bench import synthetic_prefix  # noqa: E402

VARIANTS = {"A_copy_every_call": 0, "B_copy_when_shared": indexer_torch.K1_MIN_ROWS_PER_DIM}


def decode_steps(eng: Engine, handle, n: int) -> tuple[list[float], list[int]]:
    """CPU seconds of each decode step of a greedy request forked off `handle` (its first step,
    the question's prefill, excluded) and the tokens it produced."""
    rid = eng.add_request([10, 11, 12], SamplingParams(max_tokens=n + 1, temperature=0.0, stop_token_ids=[]), prefix=handle)
    times, toks = [], []
    while eng.has_unfinished():
        t = time.process_time()
        events = eng.step()
        times.append(time.process_time() - t)
        toks += [e.token_id for e in events if e.request_id == rid]
    return times[1:], toks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=131008)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/decode_selection_ab.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model("dsa-tiny")
    eng = Engine(model)
    h = synthetic_prefix(eng, a.length, model.cfg.vocab_size)
    tokens, times = {}, {name: [] for name in [*VARIANTS, "dense"]}
    for _ in range(a.rounds):
        for name, k1_min in VARIANTS.items():
            indexer_torch.K1_MIN_ROWS_PER_DIM = k1_min
            ts, toks = decode_steps(eng, h, a.steps)
            times[name] += ts
            tokens.setdefault(name, toks)
        indexer_torch.K1_MIN_ROWS_PER_DIM = VARIANTS["B_copy_when_shared"]
        model.cfg.dense_attention = True
        times["dense"] += decode_steps(eng, h, a.steps)[0]
        model.cfg.dense_attention = False
    same = tokens["A_copy_every_call"] == tokens["B_copy_when_shared"]
    ms = {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}
    res = {"benchmark": "decode_selection_ab", "command": "python " + " ".join(sys.argv), "model": "dsa-tiny",
           "context": a.length, "clock": "process CPU seconds, 1 thread", "same_tokens": same,
           "decode_ms_per_token": ms, "steps": {k: len(v) for k, v in times.items()},
           "b_over_a": round(ms["B_copy_when_shared"] / ms["A_copy_every_call"], 3),
           "dense_over_b": round(ms["dense"] / ms["B_copy_when_shared"], 2)}
    if not same:
        res["error"] = "A and B decoded different tokens: timings not reported as a comparison"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
