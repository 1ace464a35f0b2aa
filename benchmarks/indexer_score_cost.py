"""Cost of the indexer's head-combination forms on this CPU: relu (V3.2), mixture and
softmax_mixture (normalizer pass + mixture top-k, fused in one call; "_2pass" as two calls), at
4 and 8 heads, for one chunk of queries at the end of a long
context, through the kernels' torch path. Ratios to relu 4x32 in the same run.

    .venv/bin/python benchmarks/indexer_score_cost.py --threads 1 --out benchmarks/results/indexer_score_cost.json
    .venv/bin/python benchmarks/indexer_score_cost.py --threads 1 --dtype fp32 \
        --out benchmarks/results/indexer_score_cost_fp32.json     # the dtype the CPU model runs in
    .venv/bin/python benchmarks/indexer_score_cost.py --threads 1 --topk-only --repeats 7 \
        --out benchmarks/results/indexer_topk_step.json

Correctness gate (nothing is reported when red): on a small case, each form's top-k scores equal
the naive reference's. The last line of stdout is the JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dsa_rag.kernels.indexer import naive, torch_impl

FORMS = [("relu", 4, 32), ("mixture", 4, 32), ("softmax_mixture", 4, 32), ("softmax_mixture", 4, 64),
         ("softmax_mixture_2pass", 4, 64), ("softmax_mixture", 8, 32), ("softmax_mixture", 8, 64)]


def select(q, k, w, topk, start_pos, form):
    """The model's selection (MLA._select) for one form; "softmax_mixture_2pass" is the same ranking
    as two calls (the normalizer pass, then the mixture top-k), as the model ran it before the fusion."""
    if form == "softmax_mixture_2pass":
        w, form = w - torch_impl.indexer_head_lse(q, k, start_pos=start_pos), "mixture"
    return torch_impl.indexer_topk(q, k, w, topk, start_pos=start_pos, score=form)


def gate() -> None:
    g = torch.Generator().manual_seed(0)
    T, S, H, D, topk = 16, 300, 4, 32, 20
    q, k, w = torch.randn(T, H, D, generator=g), torch.randn(S, D, generator=g), torch.randn(T, H, generator=g)
    for form in dict.fromkeys(f for f, _, _ in FORMS):
        ww = w - naive.indexer_head_lse(q, k, start_pos=S - T) if form.startswith("softmax_mixture") else w
        ref = naive.indexer_logits(q, k, ww, start_pos=S - T, score="relu" if form == "relu" else "mixture")
        got = ref.gather(1, select(q, k, w, topk, S - T, form).long())
        if not torch.allclose(got, ref.topk(topk, 1).values, atol=1e-4):
            raise SystemExit(f"correctness gate red: {form} top-k differs from naive")


def topk_only(repeats: int) -> dict:
    """Seconds of the top-k step alone for 128 queries: one _row_topk over the row against a running
    merge per 4096-key block (how the torch path selected before) and one plain torch.topk."""
    res = {}
    for S in (8192, 32768, 131072):
        g = torch.Generator().manual_seed(S)
        x = torch.randn(128, S, generator=g) + torch.linspace(0, 2, S)  # a mild recency trend

        def merged():
            vals, idx = torch.empty(128, 0), torch.empty(128, 0, dtype=torch.int64)
            for s0 in range(0, S, 4096):
                vals, idx = torch_impl._merge(vals, idx, x[:, s0:s0 + 4096], s0, 256)

        fns = {"row_topk": lambda: torch_impl._row_topk(x, 256), "merge_per_4096_block": merged,
               "plain_topk": lambda: x.topk(256, 1, sorted=False)}
        res[S] = {name: min(timed(f) for _ in range(repeats)) for name, f in fns.items()}
        print(S, {n: f"{t * 1e3:.1f} ms" for n, t in res[S].items()})
    return res


def timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--keys", type=int, default=32768)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="median of this many timings per form")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="q and k (the CPU model runs fp32)")
    ap.add_argument("--topk-only", action="store_true", help="time the top-k step alone (min of --repeats)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.topk_only:
        res = {"queries": 128, "topk": 256, "threads": a.threads, "seconds": topk_only(a.repeats)}
        if a.out:
            open(a.out, "w").write(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res))
        return
    gate()
    T, S = a.queries, a.keys
    times = {}
    for form, H, D in FORMS:
        g = torch.Generator().manual_seed(1)
        dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
        q = (torch.randn(T, H, D, generator=g) * D**-0.5).to(dt)
        k, w = torch.randn(S, D, generator=g).to(dt), torch.randn(T, H, generator=g)
        runs = [timed(lambda: select(q, k, w, a.topk, S - T, form)) for _ in range(a.repeats)]
        times[f"{form} {H}x{D}"] = sorted(runs)[len(runs) // 2]
    base = times["relu 4x32"]
    res = {"queries": T, "keys": S, "topk": a.topk, "threads": a.threads, "dtype": a.dtype, "seconds": times,
           "ratio_to_relu_4x32": {f: round(t / base, 2) for f, t in times.items()}}
    for f, t in times.items():
        print(f"{f:22s} {t:6.3f} s  {t / base:4.2f}x")
    if a.out:
        open(a.out, "w").write(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
