"""Benchmark: parity at the dtypes that serve (bf16, fp16, FP8 numerics) against transformers.

1. Tiny random DeepSeek-V3.2 checkpoints (tests/model/helpers.tiny_config: YaRN, MoE with groups,
   16 indexer heads, index_topk 24 < the 96-token inputs), several seeds, written in BOTH layouts
   (official FP8 e4m3 + weight_scale_inv, sharded; and transformers' `save_pretrained` in bf16),
   loaded with `load_model(dir, dtype=...)`. Against the fp32 `transformers` reference on the same
   weights and inputs: this project's bf16/fp16 logits and transformers' own bf16/fp16 logits (mean
   relative L2 error per position, argmax agreement). `fp8_numerics=True` (bf16): the indexer top-k
   overlap with the exact mode per layer and the logits' distance from the fp32 reference.
   A diagnosis re-runs our bf16/fp16 with the CPU kernels' math dtype forced to fp32 (which op
   loses the precision).
2. dsa-tiny (the shipped trained weights): greedy answers in bf16 vs fp32 on the eval prompts
   (`dsa_rag.model.evals.example_sets.cell_examples`, seed 1234 as `dsa_rag.model.evals.eval`, so
   the ids are the eval's), through the eval's own `answer_correct` (chunked prefill through the
   cache, teacher-forced greedy + greedy continuation after a miss). Every example whose greedy answer
   differs is printed with both answers, the truth, and the fp32/bf16 logit margins at the first
   differing token.

The correctness gate runs first: each layout loaded in fp32 must equal transformers in fp32
(max |logit diff| <= 1e-3), else nothing is reported (exit 1).

    .venv/bin/python benchmarks/dtype_parity.py --threads 2 --samples 1024=12,4096=1 --out benchmarks/results/dtype_parity.json

(~3.5 minutes on 2 threads at commit 5ebef69; before it, bf16 CPU GEMMs made it ~25 minutes.)
Quick: `--seeds 2 --samples
1024=1 --no-diagnose`. Progress goes to stderr; JSON is the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dsa_rag.kernels.indexer.torch_impl as indexer_torch  # noqa: E402
import dsa_rag.kernels.sparse_mla.torch_impl as sparse_mla_torch  # noqa: E402
from dsa_rag.model.cache import new_sequence_cache  # noqa: E402
from dsa_rag.model.evals.eval import answer_correct  # noqa: E402
from dsa_rag.model.evals.example_sets import cell_examples  # noqa: E402
from dsa_rag.model.load import load_model  # noqa: E402
from dsa_rag.model.tokenizer import ByteTokenizer  # noqa: E402
from dsa_rag.model.training import data  # noqa: E402
from tests.model.helpers import (LAYOUTS, hf_model_from, hf_pretrained, indexer_selections,  # noqa: E402
                                 logit_error, random_model, tiny_config, topk_overlap, write_checkpoint)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
EVAL_SEED = 1234  # dsa_rag.model.evals.eval's default: the same example ids as the eval runs


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- tiny random V3.2 checkpoints
def checkpoint_dirs(seed: int, layout: str, root: Path, seq: int, batch: int):
    """-> (cfg, our checkpoint dir, a transformers `save_pretrained` dir of the same weights, ids)."""
    cfg = tiny_config(seed)
    d = root / f"{layout}-{seed}"
    write_checkpoint(random_model(cfg, seed), d, layout)
    hd = d
    if layout == "official_fp8":  # transformers reads the dequantized weights (its FP8 path needs a GPU)
        hd = root / f"{layout}-{seed}-hf"
        hf_model_from(load_model(d)).save_pretrained(str(hd))
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return cfg, d, hd, ids


def gate(seeds, seq, batch, root) -> dict:
    """Each layout loaded by us in fp32 == transformers fp32 on the same weights."""
    out = {}
    for layout in LAYOUTS:
        worst = 0.0
        for seed in seeds:
            cfg, d, hd, ids = checkpoint_dirs(seed, layout, root, seq, batch)
            with torch.no_grad():
                worst = max(worst, (load_model(d)(ids) - hf_pretrained(hd)(ids).logits).abs().max().item())
        out[layout] = worst
        log(f"gate {layout}: max |ours fp32 - transformers fp32| = {worst:.2e}")
    return out


def with_math_dtype(fn, indexer=None, sparse_mla=None):
    """Run fn() with the CPU kernels' math dtype forced (diagnosis only; restored after)."""
    saved = indexer_torch._math_dtype, sparse_mla_torch._math_dtype
    try:
        if indexer is not None:
            indexer_torch._math_dtype = lambda q: indexer
        if sparse_mla is not None:
            sparse_mla_torch._math_dtype = lambda q: sparse_mla
        return fn()
    finally:
        indexer_torch._math_dtype, sparse_mla_torch._math_dtype = saved


def random_checkpoints(seeds, seq, batch, root, diagnose: bool) -> dict:
    res = {}
    for layout in LAYOUTS:
        per_seed = []
        for seed in seeds:
            t0 = time.perf_counter()
            cfg, d, hd, ids = checkpoint_dirs(seed, layout, root, seq, batch)
            k = cfg.index_topk
            rec = {"seed": seed}
            with torch.no_grad():
                ref = hf_pretrained(hd)(ids).logits
                for name, dt in DTYPES.items():
                    rec[f"ours_{name}"] = logit_error(load_model(d, dtype=dt)(ids), ref)
                    rec[f"hf_{name}"] = logit_error(hf_pretrained(hd, dt)(ids).logits, ref)
                    if diagnose:
                        rec[f"ours_{name}_indexer_fp32"] = with_math_dtype(
                            lambda: logit_error(load_model(d, dtype=dt)(ids), ref), indexer=torch.float32)
                        rec[f"ours_{name}_kernels_fp32"] = with_math_dtype(
                            lambda: logit_error(load_model(d, dtype=dt)(ids), ref), indexer=torch.float32,
                            sparse_mla=torch.float32)
                m8 = load_model(d, dtype=torch.bfloat16, fp8_numerics=True)
                rec["ours_bf16_fp8_numerics"] = logit_error(m8(ids), ref)
            s8 = indexer_selections(m8, ids)
            sb = indexer_selections(load_model(d, dtype=torch.bfloat16), ids)
            s32 = indexer_selections(load_model(d), ids)
            rec["topk_overlap"] = {
                "fp8_bf16_vs_exact_bf16": [topk_overlap(a, b, k) for a, b in zip(s8, sb)],
                "fp8_bf16_vs_exact_fp32": [topk_overlap(a, b, k) for a, b in zip(s8, s32)],
                "exact_bf16_vs_exact_fp32": [topk_overlap(a, b, k) for a, b in zip(sb, s32)],
            }
            per_seed.append(rec)
            log(f"{layout} seed {seed}: ours bf16 {rec['ours_bf16']['rel_err']:.4f}/{rec['ours_bf16']['argmax_agree']:.3f}"
                f"  hf bf16 {rec['hf_bf16']['rel_err']:.4f}/{rec['hf_bf16']['argmax_agree']:.3f}"
                f"  ours fp16 {rec['ours_fp16']['rel_err']:.4f}  hf fp16 {rec['hf_fp16']['rel_err']:.4f}"
                f"  fp8 overlap L0 {rec['topk_overlap']['fp8_bf16_vs_exact_bf16'][0]:.3f}"
                f"  fp8 logits {rec['ours_bf16_fp8_numerics']['rel_err']:.4f}  ({time.perf_counter() - t0:.1f}s)")
        keys = [k for k in per_seed[0] if isinstance(per_seed[0][k], dict) and "rel_err" in per_seed[0][k]]
        pooled = {k: {m: statistics.mean(s[k][m] for s in per_seed) for m in ("rel_err", "argmax_agree")} for k in keys}
        for name in DTYPES:
            pooled[f"ratio_{name}"] = pooled[f"ours_{name}"]["rel_err"] / pooled[f"hf_{name}"]["rel_err"]
            pooled[f"agree_diff_{name}"] = pooled[f"ours_{name}"]["argmax_agree"] - pooled[f"hf_{name}"]["argmax_agree"]
        L = len(per_seed[0]["topk_overlap"]["fp8_bf16_vs_exact_bf16"])
        pooled["topk_overlap"] = {kind: [statistics.mean(s["topk_overlap"][kind][i] for s in per_seed) for i in range(L)]
                                  for kind in per_seed[0]["topk_overlap"]}
        res[layout] = {"pooled": pooled, "per_seed": per_seed}
    return res


# ---------------------------------------------------------------- dsa-tiny greedy answers
@torch.no_grad()
def last_logits(model, ids: list[int], chunk: int = 4096) -> torch.Tensor:
    """Logits after ids (chunked prefill through the cache, as answer_correct does)."""
    x = torch.tensor([ids])
    cache = [new_sequence_cache(model.cfg.num_hidden_layers, capacity=len(ids))]
    for s in range(0, x.shape[1], chunk):
        logits = model(x[:, s: s + chunk], s, cache)
    return logits[0, -1].float()


def explain(models, tok, ids, a0, ans32: list[int], ans16: list[int]) -> dict:
    """At the first token where the two greedy answers part: each dtype's top-2 tokens and margins."""
    j = next((i for i, (a, b) in enumerate(zip(ans32, ans16)) if a != b), min(len(ans32), len(ans16)))
    prefix = ids[:a0] + ans32[:j]
    t32 = ans32[j] if j < len(ans32) else tok.eos_id
    t16 = ans16[j] if j < len(ans16) else tok.eos_id
    out = {"answer_token": j}
    for name, m in models.items():
        lg = last_logits(m, prefix)
        out[name] = {"fp32_choice_minus_bf16_choice": round((lg[t32] - lg[t16]).item(), 4),
                     "top2_margin": round((lg.topk(2).values[0] - lg.topk(2).values[1]).item(), 4)}
    out["tokens"] = {"fp32": tok.decode([t32], skip_special=False), "bf16": tok.decode([t16], skip_special=False)}
    return out


def dsa_tiny(samples: dict[int, int], tasks: list[str]) -> dict:
    tok = ByteTokenizer()
    models = {"fp32": load_model("dsa-tiny"), "bf16": load_model("dsa-tiny", dtype=torch.bfloat16)}
    assert models["bf16"].layers[0].attn.wq_a.weight.dtype == torch.bfloat16
    cells, diffs, n_total, n_same = [], [], 0, 0
    for n, count in samples.items():
        for task in tasks:
            exs = cell_examples(EVAL_SEED, task, n, count, models["fp32"].cfg.max_position_embeddings, tok)
            cell = {"length": n, "task": task, "n": 0, "same": 0, "correct": {"fp32": 0, "bf16": 0}, "seconds": {}}
            for i, ex in enumerate(exs):
                ids, a0 = data.encode(ex, tok)
                ans, ok = {}, {}
                for name, m in models.items():
                    t0 = time.perf_counter()
                    c, _, got = answer_correct(m, ids, a0, eos=tok.eos_id)
                    cell["seconds"][name] = cell["seconds"].get(name, 0.0) + time.perf_counter() - t0
                    ans[name] = ids[a0:-1] if c else got  # the greedy answer tokens, <eos> excluded
                    ok[name] = bool(c)
                    cell["correct"][name] += c
                same = ans["fp32"] == ans["bf16"]
                cell["n"] += 1
                cell["same"] += same
                n_total += 1
                n_same += same
                if not same:
                    d = {"example": f"{EVAL_SEED}-{task}-{n}-{count}-{i}", "truth": ex.answer,
                         "fp32": tok.decode(ans["fp32"]), "bf16": tok.decode(ans["bf16"]),
                         "fp32_correct": ok["fp32"], "bf16_correct": ok["bf16"],
                         "at_first_difference": explain(models, tok, ids, a0, ans["fp32"], ans["bf16"])}
                    diffs.append(d)
                    log("DIFFERS", json.dumps(d))
            log(f"dsa-tiny {task:16s} {n:6d}: same {cell['same']}/{cell['n']}  correct fp32 {cell['correct']['fp32']}"
                f" bf16 {cell['correct']['bf16']}  ({cell['seconds']['fp32']:.0f}s fp32, {cell['seconds']['bf16']:.0f}s bf16)")
            cells.append(cell)
    return {"examples": n_total, "same_greedy_answer": n_same, "agreement": n_same / max(n_total, 1),
            "eval_seed": EVAL_SEED, "cells": cells, "differences": diffs}


# ---------------------------------------------------------------- report
def markdown(res: dict, cmd: str) -> str:
    lines = ["# dtype parity: bf16 / fp16 / FP8 numerics against transformers", "",
             f"Command ({res['env']['threads']} torch threads, {res['env']['cpu']}, torch {res['env']['torch']}, "
             f"transformers {res['env']['transformers']}; {res['seconds_total']:.0f} s):", "", f"    {cmd}", "",
             f"Correctness gate first: each layout loaded by us in fp32 equals transformers fp32 (max |logit diff| "
             + ", ".join(f"{k} {v:.1e}" for k, v in res["gate"].items()) + ").", "",
             f"## Tiny random V3.2 checkpoints ({len(res['seeds'])} seeds x {res['batch']}x{res['seq']} tokens, "
             "index_topk 24, 16 indexer heads)", "",
             "Mean relative L2 error of the logits per position against transformers fp32 on the same weights, and "
             "argmax agreement (pooled mean over seeds; ratio = ours / transformers).", "",
             "| layout | dtype | ours rel. err | transformers rel. err | ratio | ours argmax | transformers argmax |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for layout, r in res["random"].items():
        p = p_ = r["pooled"]
        for name in DTYPES:
            lines.append(f"| {layout} | {name} | {p[f'ours_{name}']['rel_err']:.4f} | {p[f'hf_{name}']['rel_err']:.4f} | "
                         f"{p_[f'ratio_{name}']:.2f}x | {100 * p[f'ours_{name}']['argmax_agree']:.1f}% | "
                         f"{100 * p[f'hf_{name}']['argmax_agree']:.1f}% |")
    if any("ours_bf16_kernels_fp32" in r["pooled"] for r in res["random"].values()):
        lines += ["", "Diagnosis (our model with the CPU kernels' math dtype forced to fp32; rel. err / argmax):", "",
                  "| layout | dtype | default | indexer fp32 | indexer + sparse MLA fp32 | transformers |", "|---|---|---:|---:|---:|---:|"]
        for layout, r in res["random"].items():
            p = r["pooled"]
            for name in DTYPES:
                f = lambda k: f"{p[k]['rel_err']:.4f} / {100 * p[k]['argmax_agree']:.1f}%"  # noqa: E731
                lines.append(f"| {layout} | {name} | {f(f'ours_{name}')} | {f(f'ours_{name}_indexer_fp32')} | "
                             f"{f(f'ours_{name}_kernels_fp32')} | {f(f'hf_{name}')} |")
        lines += ["", "What the columns isolate: the math dtype of the CPU kernels (`kernels/indexer/torch_impl.py`, "
                  "`kernels/sparse_mla/torch_impl.py`, `_math_dtype` = `dispatch.lowp_math_dtype` for 16-bit inputs) "
                  "forced to fp32. On random weights nearly all of the bf16/fp16 logit error is top-k flips at the "
                  "selection boundary (with index_topk >= the sequence length the bf16 error of both is ~0.015-0.03), "
                  "so the indexer's score precision is what moves the figures; transformers scores the indexer in fp32."]
    lines += ["", "`fp8_numerics=True` in bf16 (Hadamard + e4m3 indexer q/k, FP8-simulated c_kv): indexer top-k overlap per "
              "layer (queries with more than top-k causal keys; layer 0 sees the same input in both modes, later layers "
              "also carry the drift of the layers before) and the logits' distance from transformers fp32:", "",
              "| layout | overlap vs exact bf16 | overlap vs exact fp32 | exact bf16 vs exact fp32 | logits rel. err | argmax |",
              "|---|---|---|---|---:|---:|"]
    for layout, r in res["random"].items():
        p = r["pooled"]
        o = p["topk_overlap"]
        fmt = lambda v: " / ".join(f"{x:.3f}" for x in v)  # noqa: E731
        lines.append(f"| {layout} | {fmt(o['fp8_bf16_vs_exact_bf16'])} | {fmt(o['fp8_bf16_vs_exact_fp32'])} | "
                     f"{fmt(o['exact_bf16_vs_exact_fp32'])} | {p['ours_bf16_fp8_numerics']['rel_err']:.4f} | "
                     f"{100 * p['ours_bf16_fp8_numerics']['argmax_agree']:.1f}% |")
    t = res["dsa_tiny"]
    lines += ["", f"## dsa-tiny (trained weights): greedy answers, bf16 vs fp32", "",
              f"Eval prompts of `dsa_rag.model.evals.eval` (seed {t['eval_seed']}, `cell_examples`), greedy answers through "
              f"`answer_correct`: **{t['same_greedy_answer']}/{t['examples']} identical ({100 * t['agreement']:.1f}%)**.", "",
              "| length | task | examples | same answer | fp32 correct | bf16 correct | fp32 s | bf16 s |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in t["cells"]:
        lines.append(f"| {c['length']} | {c['task']} | {c['n']} | {c['same']} | {c['correct']['fp32']} | {c['correct']['bf16']} | "
                     f"{c['seconds']['fp32']:.0f} | {c['seconds']['bf16']:.0f} |")
    if t["differences"]:
        lines += ["", "Examples whose greedy answer differs:", ""]
        for d in t["differences"]:
            e = d["at_first_difference"]
            lines.append(f"- `{d['example']}`: truth `{d['truth']}`, fp32 `{d['fp32']}` ({'right' if d['fp32_correct'] else 'wrong'}), "
                         f"bf16 `{d['bf16']}` ({'right' if d['bf16_correct'] else 'wrong'}); at answer token {e['answer_token']} "
                         f"fp32 picks {e['tokens']['fp32']!r} over bf16's {e['tokens']['bf16']!r} by "
                         f"{e['fp32']['fp32_choice_minus_bf16_choice']} logits in fp32 and by "
                         f"{e['bf16']['fp32_choice_minus_bf16_choice']} in bf16")
    lines += ["", "Raw figures: `dtype_parity.json`.", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=8, help="tiny random checkpoints per layout")
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--samples", default="1024=12,4096=1", help="dsa-tiny: length=examples per task, comma separated")
    ap.add_argument("--tasks", default=",".join(data.TASKS))
    ap.add_argument("--no-diagnose", action="store_true", help="skip the kernels-in-fp32 diagnosis")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/dtype_parity.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t_start = time.perf_counter()
    seeds = list(range(a.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        g = gate(seeds[:2], a.seq, a.batch, root)
        if max(g.values()) > 1e-3:
            print(json.dumps({"gate_failed": g}))
            return 1
        rnd = random_checkpoints(seeds, a.seq, a.batch, root, not a.no_diagnose)
    samples = {int(k): int(v) for k, v in (p.split("=") for p in a.samples.split(",") if p)}
    tiny = dsa_tiny(samples, a.tasks.split(","))
    res = {"benchmark": "dtype_parity", "argv": sys.argv, "seeds": seeds, "seq": a.seq, "batch": a.batch,
           "env": {"threads": a.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                   "cpu": platform.processor() or platform.machine()},
           "metric": "rel_err = mean over positions of |logits - ref|_2 / |ref|_2, ref = transformers fp32 on the same "
                     "weights; argmax_agree = share of positions whose argmax equals ref's",
           "gate": g, "random": rnd, "dsa_tiny": tiny, "seconds_total": time.perf_counter() - t_start}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    cmd = ".venv/bin/python benchmarks/dtype_parity.py " + " ".join(sys.argv[1:])
    out.with_suffix(".md").write_text(markdown(res, cmd.strip()))
    summary = {"gate": g, "dsa_tiny_agreement": tiny["agreement"], "dsa_tiny_examples": tiny["examples"],
               "dsa_tiny_differences": len(tiny["differences"])}
    for layout, r in rnd.items():
        p = r["pooled"]
        summary[layout] = {f"{w}_{name}": [round(p[f"{w}_{name}"]["rel_err"], 4), round(p[f"{w}_{name}"]["argmax_agree"], 4)]
                           for name in DTYPES for w in ("ours", "hf")}
        summary[layout]["fp8_overlap_vs_exact_bf16"] = [round(x, 4) for x in p["topk_overlap"]["fp8_bf16_vs_exact_bf16"]]
        summary[layout]["fp8_logits"] = [round(p["ours_bf16_fp8_numerics"]["rel_err"], 4),
                                         round(p["ours_bf16_fp8_numerics"]["argmax_agree"], 4)]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
