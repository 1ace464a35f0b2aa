"""Evaluate a DSA model on the synthetic long-document QA of model/training/data.py: exact-match accuracy per
task and per context length, DSA vs dense (the same weights with the indexer off), prefill speed,
and the indexer's recall of the dense attention's top-k. Writes JSON (updated after every cell, so
a long run leaves partial results) and a PNG.

Accuracy is greedy exact match of the whole answer (+ <eos>), computed in one teacher-forced pass:
the greedy decode reproduces the answer iff every answer token is the argmax given the previous
ones. Prompts are prefilled in chunks through the model's own cache (the inference path).

    .venv/bin/python -m dsa_rag.model.evals.eval --lengths 1024,4096 --samples 20 --out tmp/eval_quick.json   # quick
    .venv/bin/python -m dsa_rag.model.evals.eval --lengths 1024,4096,16384,32768,65536,131072 --samples 50 \\
        --long-samples 4 --dense-max-len 32768 --out benchmarks/results/eval_dsa-tiny.json
    .venv/bin/python -m dsa_rag.model.evals.eval --model tmp/run/s2 --lengths 1024 --samples 6   # any weights dir / run dir
    .venv/bin/python -m dsa_rag.model.evals.eval --index-every 2 --lengths 4096 --tasks niah_single --modes dsa  # indexer reuse
    .venv/bin/python -m dsa_rag.model.evals.eval --decode-answers --lengths 4096 --tasks niah_single --modes dsa  # real decode

Each cell's per-sample outcomes are kept under "samples" (mode -> task -> length -> one record per
example, with an id that names the example), so `dsa_rag.model.evals.eval_report` can pair DSA and dense on the
same examples, also when the two modes ran in different files. Wrong answers keep the model's own
output and its failure kind (model/evals/failure_kinds.py).

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/model/evals
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from dsa_rag.model.cache import new_sequence_cache
from dsa_rag.model.evals.example_sets import cell_examples
from dsa_rag.model.evals.failure_kinds import failure_kind
from dsa_rag.model.load import load_any, load_model
from dsa_rag.model.tokenizer import ByteTokenizer
from dsa_rag.model.training import data
from dsa_rag.model.training.train import forward_train


@torch.no_grad()
def answer_correct(model, ids: list[int], a0: int, chunk: int = 4096, eos: int | None = None
                   ) -> tuple[bool, float, list[int] | None]:
    """-> (greedy exact match of ids[a0:], prefill seconds, the model's own answer tokens when it
    is wrong and `eos` is given, else None)."""
    dev = next(model.parameters()).device
    x = torch.tensor([ids[:-1]], device=dev)
    cache = [new_sequence_cache(model.cfg.num_hidden_layers, capacity=len(ids))]
    preds, t0 = [], time.perf_counter()
    for s in range(0, x.shape[1], chunk):
        logits = model(x[:, s: s + chunk], s, cache)
        lo = max(s, a0 - 1)
        if lo < s + logits.shape[1]:
            preds.append(logits[0, lo - s:].argmax(-1))
    dt = time.perf_counter() - t0
    pred = torch.cat(preds).tolist()
    ok = pred == ids[a0:]
    return ok, dt, (None if ok or eos is None else _greedy_after_mismatch(model, cache, ids, a0, pred, eos))


@torch.no_grad()
def answer_decoded(model, ids: list[int], a0: int, chunk: int = 4096, eos: int | None = None
                   ) -> tuple[bool, float, list[int] | None]:
    """answer_correct by a real greedy decode: the prompt ids[:a0] prefilled in chunks, then one
    token per forward (T = 1, the engine's decode path, whose indexer selection differs in code from
    the prefill's) until `eos` or len(answer) tokens. -> (exact match, prefill seconds, the output
    when it is wrong)."""
    dev = next(model.parameters()).device
    cache = [new_sequence_cache(model.cfg.num_hidden_layers, capacity=len(ids) + 1)]
    t0 = time.perf_counter()
    for s in range(0, a0, chunk):
        logits = model(torch.tensor([ids[s: min(s + chunk, a0)]], device=dev), s, cache)
    dt = time.perf_counter() - t0
    out = [int(logits[0, -1].argmax())]
    while out[-1] != eos and len(out) < len(ids) - a0:
        logits = model(torch.tensor([[out[-1]]], device=dev), a0 + len(out) - 1, cache)
        out.append(int(logits[0, -1].argmax()))
    ok = out == ids[a0:]
    return ok, dt, None if ok else [t for t in out if t != eos]


def _greedy_after_mismatch(model, cache, ids, a0, pred, eos, extra: int = 16) -> list[int]:
    """The greedy answer, continued from the first wrong token of the teacher-forced pass. The cache
    holds the prompt and the true answer; rows past the current position are overwritten or never
    read (attention reads up to the current position only)."""
    dev = next(model.parameters()).device
    j = next(i for i, (p, t) in enumerate(zip(pred, ids[a0:])) if p != t)
    out = ids[a0: a0 + j] + [pred[j]]
    limit = len(ids) - a0 + extra
    while out[-1] != eos and len(out) < limit:
        pos = a0 + len(out) - 1
        logits = model(torch.tensor([[out[-1]]], device=dev), pos, cache)
        out.append(int(logits[0, -1].argmax()))
    return out[:-1] if out[-1] == eos else out


def set_dense(model, dense: bool):
    model.cfg.dense_attention = dense  # every module shares this config object


@torch.no_grad()
def indexer_recall(model, rng, n_tokens: int, samples: int, tasks) -> dict:
    """Per layer: |topk(I_t) & topk(p_t)| / k (recall of the dense attention's top-k) and the
    dense attention mass that the indexer's top-k covers, over queries with > k causal keys."""
    tok = ByteTokenizer()
    k = model.cfg.index_topk
    rec, mass = [], []
    for _ in range(samples):
        ids, _ = data.encode(data.make_example(rng, rng.choice(tasks), n_tokens, tok), tok)
        stats = {"want_recall": True, "want_mass": True}
        forward_train(model, torch.tensor([ids]), 1, stats)
        rec.append(stats["recall"])
        mass.append(stats["mass"])
    L = model.cfg.num_hidden_layers
    per_layer = [sum(r[i] for r in rec) / len(rec) for i in range(L)]
    per_mass = [sum(m[i] for m in mass) / len(mass) for i in range(L)]
    return {"tokens": n_tokens, "samples": samples, "topk": k, "recall_per_layer": per_layer,
            "recall": sum(per_layer) / L, "mass_per_layer": per_mass, "mass": sum(per_mass) / L}


def plot(res: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, style in (("dsa", "-o"), ("dense", "--s")):
        for task, cells in res["accuracy"].get(mode, {}).items():
            xs = sorted(int(n) for n in cells)
            ax.plot(xs, [100 * cells[str(n)]["acc"] for n in xs], style, label=f"{mode} {task}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("exact match %")
    ax.set_title(f"{res['model']}: accuracy by context length")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dsa-tiny", help="preset, weights dir or training run dir")
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--tasks", default=",".join(data.TASKS))
    ap.add_argument("--samples", type=int, default=20, help="samples per (task, length) up to 16k")
    ap.add_argument("--long-samples", type=int, default=4, help="samples per (task, length) above 16k")
    ap.add_argument("--long-tasks", default="niah_single", help="tasks evaluated above 16k")
    ap.add_argument("--modes", default="dsa,dense")
    ap.add_argument("--dense-max-len", type=int, default=32768, help="skip dense above this length (CPU time)")
    ap.add_argument("--recall-lengths", default="1024", help="lengths for the indexer recall ('' = skip)")
    ap.add_argument("--recall-samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--subset", default=None, metavar="A:B",
                    help="run only examples A..B-1 of each cell (the same examples and ids as a full run: "
                         "a slow mode can cover part of a set that the other mode ran in full)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--index-every", type=int, default=None, metavar="N",
                    help="indexer plan: run the indexer on layers 0, N, 2N, ... and reuse its top-k in between "
                         "(a preset or weights dir; ModelConfig.indexer_types)")
    ap.add_argument("--decode-answers", action="store_true",
                    help="score answers by a real token-by-token greedy decode (the decode path's selection) "
                         "instead of one teacher-forced pass")
    ap.add_argument("--out", default="benchmarks/results/eval_dsa-tiny.json")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_any(a.model, device) if a.index_every is None else load_model(a.model, device, index_every=a.index_every)
    tok = ByteTokenizer()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lengths = [int(v) for v in a.lengths.split(",") if v]
    tasks = a.tasks.split(",")
    res = {"model": model.cfg.name, "source": a.model, "argv": sys.argv, "device": device,
           "indexer_types": model.cfg.indexer_types,
           "index_topk": model.cfg.index_topk,
           "metric": "greedy exact match (" + ("token-by-token decode" if a.decode_answers else "teacher-forced argmax") + ")",
           "chance": 0.0, "accuracy": {}, "speed": {}, "recall": [], "samples": {}}

    def dump():
        out.write_text(json.dumps(res, indent=1))

    for n in [int(v) for v in a.recall_lengths.split(",") if v]:
        set_dense(model, False)
        r = indexer_recall(model, random.Random(a.seed + n), n, a.recall_samples, tasks)
        res["recall"].append(r)
        print(f"recall@{n}: {r['recall']:.3f}  mass {r['mass']:.3f}", flush=True)
        dump()

    for n in lengths:
        long = n > 16384
        cell_tasks = a.long_tasks.split(",") if long else tasks
        ns = a.long_samples if long else a.samples
        for task in cell_tasks:
            # The same examples for both modes.
            exs = cell_examples(a.seed, task, n, ns, model.cfg.max_position_embeddings, tok)
            enc = [data.encode(e, tok) for e in exs]
            lo, hi = (int(v) for v in a.subset.split(":")) if a.subset else (0, ns)
            for mode in a.modes.split(","):
                if mode == "dense" and n > a.dense_max_len:
                    continue
                set_dense(model, mode == "dense")
                ok, secs, toks, per = 0, 0.0, 0, []
                for i, (ids, a0) in list(enumerate(enc))[lo:hi]:
                    c, dt, got = (answer_decoded if a.decode_answers else answer_correct)(model, ids, a0, eos=tok.eos_id)
                    ok += c
                    secs += dt  # prefill only: the decode of a wrong answer is not timed
                    toks += len(ids) - 1
                    # The id names the example: the same seed, task, length and count draw the same ones.
                    rec = {"example": f"{a.seed}-{task}-{n}-{ns}-{i}", "tokens": len(ids), "correct": bool(c)}
                    if got is not None:
                        rec["output"] = tok.decode(got)
                        rec["failure"] = failure_kind(exs[i], rec["output"])
                    per.append(rec)
                res["samples"].setdefault(mode, {}).setdefault(task, {})[str(n)] = per
                run = len(per)
                cell = {"acc": ok / run, "n": run, "tokens_mean": toks / run, "prefill_tok_s": toks / secs, "seconds": secs}
                res["accuracy"].setdefault(mode, {}).setdefault(task, {})[str(n)] = cell
                res["speed"].setdefault(mode, {})[str(n)] = toks / secs
                print(f"{mode:5s} {task:16s} {n:7d}: {ok}/{run} = {100 * ok / run:5.1f}%  ({toks / secs:.0f} tok/s)", flush=True)
                dump()
    set_dense(model, False)
    # DSA vs dense at each length (mean over tasks), and where DSA beats dense.
    cmp = {}
    for n in lengths:
        d = [c[str(n)]["acc"] for c in res["accuracy"].get("dsa", {}).values() if str(n) in c]
        e = [c[str(n)]["acc"] for c in res["accuracy"].get("dense", {}).values() if str(n) in c]
        if d:
            cmp[str(n)] = {"dsa": sum(d) / len(d), "dense": sum(e) / len(e) if e else None}
    res["summary"] = cmp
    dump()
    try:
        plot(res, out.with_suffix(".png"))
    except Exception as e:  # pragma: no cover - plotting is optional
        print("plot failed:", e)
    print(json.dumps(cmp))
    return res


if __name__ == "__main__":
    main()
