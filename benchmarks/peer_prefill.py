"""Peer comparison on this CPU: this project's prefill against `transformers.DeepseekV32ForCausalLM`
on the same random V3.2-shaped checkpoint, bf16 on both sides, seconds and peak memory as ratios.

    .venv/bin/python benchmarks/peer_prefill.py                      # 4k 8k (both) + 16k (ours), ~10-15 min
    .venv/bin/python benchmarks/peer_prefill.py --lengths 1024 2048 --ours-only-lengths 4096   # quick

Checkpoint: dsa-tiny's shape (hidden 256, 4 layers, 8 heads, kv_lora 128, 8 routed experts) with
V3.2's ReLU indexer (the form transformers implements) at 16 heads x 32 and index_topk 512; seeded
random weights (the cost does not depend on their values), written in the HF layout by
`save_checkpoint` to a temporary directory. Ours: `load_model(dir, dtype=torch.bfloat16)`; theirs:
the same tensors mapped by `tests/model/helpers.hf_model_from`, then cast to bf16 except the modules
transformers keeps in fp32 (`_keep_in_fp32_modules(_strict)`: router weight + bias, indexer
weights_proj), attention "sdpa" (transformers' default for this model).

1. Correctness gate (nothing is timed when red), on one 640-token input (> index_topk, so the
   sparse selection matters): fp32 logits of both within 1e-3 (the weight mapping is right); then
   bf16 expectations set by the peer: ours' bf16 logits may not be further from the fp32 reference
   than transformers' bf16 logits are (per-token median relative error <= 0.05 and <= 1.5x theirs
   + 0.005; next-token argmax agreement with fp32 >= 0.85 and >= theirs - 0.05). On random weights
   a bf16 run has heavy-tailed errors (MoE routing and top-k boundary flips), on both sides alike.
2. Each measurement runs in a FRESH subprocess (so ru_maxrss is that run's peak), 1 torch thread
   (OMP_NUM_THREADS=1 too), after a 256-token warm-up forward:
     ours:   Engine.prefill_prefix(ids) (paged caches, chunked prefill of --chunk tokens, the
             production path; the prefill computes no logits, the last token is the question's);
     theirs: model(ids, use_cache=False, logits_to_keep=1) (one forward, as transformers prefills).
   Reported: wall seconds and CPU seconds (user + system of the child: with one thread, robust
   to other jobs time-slicing a shared machine; the extrapolation fits CPU seconds), peak RSS of the child (ru_maxrss, includes the Python + torch (+ transformers)
   imports: `rss_after_load_gb` is the RSS right before the timed prefill, so the prefill's own
   growth is peak - that).
3. Theirs at a length in --ours-only-lengths is run only if the fit of its two largest measured
   lengths (time a*L + b*L^2, memory c + d*L^2, stated as an extrapolation) stays under
   --their-max-gb and --their-max-s; otherwise it is recorded as skipped with those estimates.
Writes benchmarks/results/peer_prefill.{json,md}; the JSON is also the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GATE_TOKENS = 640
WARMUP_TOKENS = 256


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def cpu_s() -> float:
    """This process's user + system CPU seconds: with one torch thread, robust to other jobs
    time-slicing the machine (wall seconds are not)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_now_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peer_config():
    import dataclasses

    from dsa_rag.model.config import preset

    return dataclasses.replace(preset("dsa-tiny"), name="peer-tiny", index_score="relu", index_n_heads=16,
                               index_head_dim=32, index_topk=512, num_nextn_predict_layers=0).validate()


def build_checkpoint(d: Path) -> dict:
    """Seeded random weights (tests/model/helpers.random_model: non-trivial norms and router bias)."""
    from dsa_rag.model.load import save_checkpoint
    from tests.model.helpers import random_model

    cfg = peer_config()
    m = random_model(cfg, seed=0, std=0.08)
    save_checkpoint(m, d)
    return {"params_m": round(sum(p.numel() for p in m.parameters()) / 1e6, 2)}


def load_ours(d: Path, dtype):
    from dsa_rag.model.load import load_model

    return load_model(d, dtype=dtype)


def load_theirs(d: Path, dtype, attn: str):
    """transformers model holding exactly the checkpoint's tensors (through ours' loader + the
    tested name mapping), in `dtype` except transformers' keep-in-fp32 modules."""
    from tests.model.helpers import hf_model_from

    ours = load_ours(d, torch.float32)
    hf = hf_model_from(ours)
    del ours
    if dtype != torch.float32:
        keep = {n: p.detach().clone() for n, p in hf.named_parameters()
                if n.endswith(("mlp.gate.weight", "indexer.weights_proj.weight"))}
        keep.update({n: b.detach().clone() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias")})
        hf = hf.to(dtype)
        with torch.no_grad():
            for n, p in list(hf.named_parameters()) + list(hf.named_buffers()):
                if n in keep:
                    p.data = keep[n]
    hf.config._attn_implementation = attn
    return hf.eval()


# ---------------------------------------------------------------- 1. gate
def gate_ids(vocab):
    return torch.randint(8, vocab, (1, GATE_TOKENS), generator=torch.Generator().manual_seed(1))


def token_rel_err(a, b):
    """Per position: RMS(a - b) / RMS(b) over the vocabulary -> [T]."""
    a, b = a.double(), b.double()
    return (a - b).pow(2).mean(-1).sqrt() / b.pow(2).mean(-1).sqrt()


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


@torch.no_grad()
def correctness_gate(d: Path, attn: str) -> dict:
    cfg = peer_config()
    ids = gate_ids(cfg.vocab_size)
    out = {"tokens": GATE_TOKENS, "index_topk": cfg.index_topk}
    logits = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours = load_ours(d, dt)
        logits[f"ours_{name}"] = ours(ids)[0].float()
        del ours
        hf = load_theirs(d, dt, attn)
        logits[f"theirs_{name}"] = hf(ids).logits[0].float()
        del hf
    ref = logits["theirs_fp32"]
    out["fp32_max_abs_diff"] = (logits["ours_fp32"] - ref).abs().max().item()
    out["fp32_ref_max_abs"] = ref.abs().max().item()
    for side in ("ours", "theirs"):
        x = logits[f"{side}_bf16"]
        out[f"bf16_{side}_rel_err_vs_fp32"] = rel_err(x, ref)
        out[f"bf16_{side}_median_token_rel_err_vs_fp32"] = token_rel_err(x, ref).median().item()
        out[f"bf16_{side}_argmax_vs_fp32"] = (x.argmax(-1) == ref.argmax(-1)).float().mean().item()
    out["bf16_argmax_ours_vs_theirs"] = (logits["ours_bf16"].argmax(-1) == logits["theirs_bf16"].argmax(-1)).float().mean().item()
    # bf16 expectations, set by the peer itself: ours' bf16 run may deviate from the fp32 reference
    # about as much as transformers' bf16 run does (routing and top-k boundary flips give heavy tails,
    # hence the per-token median), not more.
    med_o, med_t = out["bf16_ours_median_token_rel_err_vs_fp32"], out["bf16_theirs_median_token_rel_err_vs_fp32"]
    am_o, am_t = out["bf16_ours_argmax_vs_fp32"], out["bf16_theirs_argmax_vs_fp32"]
    checks = {"fp32_match": out["fp32_max_abs_diff"] <= 1e-3 and out["fp32_ref_max_abs"] > 0.1,
              "ours_bf16_median_err_ok": med_o <= 0.05 and med_o <= 1.5 * med_t + 5e-3,
              "ours_bf16_argmax_ok": am_o >= 0.85 and am_o >= am_t - 0.05}
    out["checks"] = checks
    out["thresholds"] = {"fp32_max_abs_diff": 1e-3,
                         "bf16_median_token_rel_err_vs_fp32": "ours <= 0.05 and <= 1.5 * theirs + 0.005",
                         "bf16_argmax_vs_fp32": "ours >= 0.85 and >= theirs - 0.05"}
    out["gate"] = "green" if all(checks.values()) else "red"
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


# ---------------------------------------------------------------- 2. one measurement (child process)
@torch.no_grad()
def child(side: str, d: Path, L: int, chunk: int, attn: str) -> dict:
    torch.set_num_threads(1)
    cfg = peer_config()
    ids = torch.randint(8, cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(L))
    warm = ids[:, :WARMUP_TOKENS]
    if side == "ours":
        from dsa_rag.model.engine.engine import Engine

        model = load_ours(d, torch.bfloat16)
        # pool sized for L up front (no doubling copy inside the timing); same for the warm-up
        eng = Engine(model, prefill_chunk=chunk, n_blocks=-(-L // 64) + 4)
        eng.release(eng.prefill_prefix(warm[0].tolist()))
        base = rss_now_gb()
        c0, t0 = cpu_s(), time.perf_counter()
        h = eng.prefill_prefix(ids[0].tolist())
        dt, dc = time.perf_counter() - t0, cpu_s() - c0
        assert h.length == L
        how = f"Engine.prefill_prefix, chunk {chunk}, paged caches"
    else:
        model = load_theirs(d, torch.bfloat16, attn)
        model(warm, use_cache=False, logits_to_keep=1)
        base = rss_now_gb()
        c0, t0 = cpu_s(), time.perf_counter()
        out = model(ids, use_cache=False, logits_to_keep=1).logits
        dt, dc = time.perf_counter() - t0, cpu_s() - c0
        assert torch.isfinite(out).all()
        how = f"DeepseekV32ForCausalLM forward (use_cache=False, logits_to_keep=1, attn {attn})"
    return {"side": side, "L": L, "seconds": round(dt, 2), "cpu_seconds": round(dc, 2), "tok_s": round(L / dt, 1),
            "load_avg_1min": round(os.getloadavg()[0], 2), "peak_rss_gb": round(peak_rss_gb(), 3),
            "rss_after_load_gb": round(base, 3), "threads": torch.get_num_threads(), "dtype": "bfloat16", "how": how}


def run_child(side, d, L, chunk, attn, timeout) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", side, "--ckpt", str(d), "--length", str(L), "--chunk", str(chunk),
           "--attn", attn]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"side": side, "L": L, "error": f"timed out after {timeout} s"}
    if p.returncode != 0:
        return {"side": side, "L": L, "error": f"child exited {p.returncode}", "stderr_tail": p.stderr[-3000:]}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["child_wall_s"] = round(time.perf_counter() - t0, 1)
    return r


# ---------------------------------------------------------------- 3. extrapolation
def fit_two(points, kind):
    """Two (L, y) points -> (predict(L), formula): time a*L + b*L^2, memory c + d*L^2."""
    (L1, y1), (L2, y2) = sorted(points)[-2:]
    if kind == "time":
        # y = a L + b L^2: solve the 2x2 system
        b = (y2 / L2 - y1 / L1) / (L2 - L1)
        a = y1 / L1 - b * L1
        return (lambda L: a * L + b * L * L), f"{a:.4g}*L + {b:.4g}*L^2 (fit of L={L1}, {L2})"
    d = (y2 - y1) / (L2 * L2 - L1 * L1)
    c = y1 - d * L1 * L1
    return (lambda L: c + d * L * L), f"{c:.4g} + {d:.4g}*L^2 GB (fit of L={L1}, {L2})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192], help="both sides")
    ap.add_argument("--ours-only-lengths", type=int, nargs="+", default=[16384],
                    help="ours; theirs only if its extrapolation fits --their-max-gb / --their-max-s")
    ap.add_argument("--chunk", type=int, default=4096, help="ours: prefill chunk")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention implementation")
    ap.add_argument("--their-max-gb", type=float, default=16.0)
    ap.add_argument("--their-max-s", type=float, default=300.0)
    ap.add_argument("--child-timeout", type=int, default=1800)
    ap.add_argument("--out", default="benchmarks/results/peer_prefill")
    ap.add_argument("--ckpt", default=None, help="(child / reuse) checkpoint directory")
    ap.add_argument("--child", choices=["ours", "theirs"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, Path(a.ckpt), a.length, a.chunk, a.attn)))
        return

    import transformers

    torch.set_num_threads(1)
    tmp = None
    if a.ckpt:
        d = Path(a.ckpt)
        info = {"params_m": None}
        if not (d / "config.json").exists():
            info = build_checkpoint(d)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="peer_ckpt_")
        d = Path(tmp.name)
        info = build_checkpoint(d)
    cfg = peer_config()
    t0 = time.perf_counter()
    gate = correctness_gate(d, a.attn)
    gate["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"gate": gate}), flush=True)
    res = {"benchmark": "peer_prefill", "command": " ".join(["python"] + sys.argv), "torch": torch.__version__,
           "transformers": transformers.__version__, "threads": 1, "dtype": "bfloat16", "device": "cpu",
           "cpu": _cpu_name(), "checkpoint": {**info, **{k: getattr(cfg, k) for k in (
               "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "q_lora_rank",
               "index_n_heads", "index_head_dim", "index_topk", "index_score", "n_routed_experts",
               "num_experts_per_tok", "vocab_size")}, "weights": "seeded random (tests/model/helpers.random_model)"},
           "gate": gate, "cpu_bf16_gemm": gemm_bf16_slowdown()}
    if gate["gate"] != "green":
        res["error"] = "correctness gate red: no timings reported"
        _write(res, a.out)
        print(json.dumps(res))
        sys.exit(1)

    runs = []
    for L in sorted(set(a.lengths) | set(a.ours_only_lengths)):
        for side in ("ours", "theirs"):
            if side == "theirs" and L not in a.lengths:
                ok = [r for r in runs if r["side"] == "theirs" and "seconds" in r]
                if len(ok) < 2:
                    runs.append({"side": side, "L": L, "skipped": "fewer than two measured lengths to extrapolate from"})
                    continue
                ft, ft_s = fit_two([(r["L"], r["cpu_seconds"]) for r in ok], "time")
                fm, fm_s = fit_two([(r["L"], r["peak_rss_gb"]) for r in ok], "mem")
                est_s, est_gb = ft(L), fm(L)
                if est_gb > a.their_max_gb or est_s > a.their_max_s:
                    runs.append({"side": side, "L": L, "skipped": f"would need ~{est_gb:.1f} GB / ~{est_s:.0f} CPU s "
                                 f"(EXTRAPOLATED, not measured: limits {a.their_max_gb} GB / {a.their_max_s} s)",
                                 "extrapolated_cpu_seconds": round(est_s, 1), "extrapolated_peak_rss_gb": round(est_gb, 2),
                                 "time_fit": ft_s, "memory_fit": fm_s})
                    print(json.dumps(runs[-1]), flush=True)
                    continue
            r = run_child(side, d, L, a.chunk, a.attn, a.child_timeout)
            runs.append(r)
            print(json.dumps(r), flush=True)
    res["runs"] = runs
    ratios = []
    for L in sorted({r["L"] for r in runs}):
        o = next((r for r in runs if r["L"] == L and r["side"] == "ours" and "seconds" in r), None)
        t = next((r for r in runs if r["L"] == L and r["side"] == "theirs" and "seconds" in r), None)
        row = {"L": L}
        if o and t:
            row.update(seconds_ours_over_theirs=round(o["seconds"] / t["seconds"], 3),
                       cpu_seconds_ours_over_theirs=round(o["cpu_seconds"] / t["cpu_seconds"], 3),
                       peak_rss_ours_over_theirs=round(o["peak_rss_gb"] / t["peak_rss_gb"], 3),
                       speedup=round(t["seconds"] / o["seconds"], 2), cpu_speedup=round(t["cpu_seconds"] / o["cpu_seconds"], 2),
                       prefill_growth_ours_over_theirs=round(
                           (o["peak_rss_gb"] - o["rss_after_load_gb"]) / max(1e-9, t["peak_rss_gb"] - t["rss_after_load_gb"]), 3))
        ratios.append(row)
    res["ratios"] = ratios
    res["machine_load_at_end"] = os.getloadavg()
    _write(res, a.out)
    print(json.dumps(res))


def gemm_bf16_slowdown() -> dict:
    """Context for the bf16 figures: one projection-sized GEMM (2048 x 256 @ 256 x 256, what the
    model's linears do per chunk), bf16 against fp32 on this CPU, 1 thread. CPUs without native
    bf16 (no AVX512-BF16 / AMX) run bf16 GEMMs through a slow path."""
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        a, w = torch.randn(2048, 256, dtype=dt), torch.randn(256, 256, dtype=dt)
        a @ w
        t = time.perf_counter()
        for _ in range(5):
            a @ w
        out[str(dt).replace("torch.", "")] = (time.perf_counter() - t) / 5
    return {"fp32_ms": round(1e3 * out["float32"], 2), "bf16_ms": round(1e3 * out["bfloat16"], 2),
            "bf16_over_fp32": round(out["bfloat16"] / out["float32"], 1),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return "unknown"


def _write(res, stem):
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    Path(stem + ".json").write_text(json.dumps(res, indent=2) + "\n")
    g = res["gate"]
    c = res["checkpoint"]
    lines = ["# Peer comparison: prefill of this project vs transformers, bf16 both sides, CPU", "",
             f"Command: `{res['command']}`  ",
             f"torch {res['torch']}, transformers {res['transformers']}, {res['cpu']}, 1 torch thread per run, "
             "each measurement in a fresh subprocess (peak RSS = that process's ru_maxrss).", "",
             f"Checkpoint: random V3.2-shaped, hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
             f"{c['num_attention_heads']} heads, kv_lora {c['kv_lora_rank']}, indexer {c['index_n_heads']} heads x "
             f"{c['index_head_dim']} ({c['index_score']}), top-k {c['index_topk']}, {c['n_routed_experts']} experts "
             f"(top-{c['num_experts_per_tok']}); same tensors on both sides.", "",
             f"Correctness gate ({g['tokens']} tokens > top-k): **{g['gate']}**: fp32 max |logit diff| ours vs theirs "
             f"{g['fp32_max_abs_diff']:.2e} (<= 1e-3). bf16 against the fp32 reference, per-token median relative error "
             f"ours {g['bf16_ours_median_token_rel_err_vs_fp32']:.3g} / theirs {g['bf16_theirs_median_token_rel_err_vs_fp32']:.3g} "
             f"(ours <= 0.05 and <= 1.5x theirs + 0.005), whole-tensor relative error ours "
             f"{g['bf16_ours_rel_err_vs_fp32']:.3g} / theirs {g['bf16_theirs_rel_err_vs_fp32']:.3g}, next-token argmax "
             f"agreement ours {g['bf16_ours_argmax_vs_fp32']:.3f} / theirs {g['bf16_theirs_argmax_vs_fp32']:.3f} (ours >= 0.85 "
             f"and >= theirs - 0.05); ours bf16 vs theirs bf16 argmax agreement {g['bf16_argmax_ours_vs_theirs']:.3f}.", ""]
    if "runs" in res:
        lines += ["| L | ours s (CPU s) | ours peak RSS GB | theirs s (CPU s) | theirs peak RSS GB | ours/theirs time (CPU) | "
                  "ours/theirs peak RSS | speedup (CPU) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in res["ratios"]:
            L = row["L"]
            o = next(r for r in res["runs"] if r["L"] == L and r["side"] == "ours")
            t = next((r for r in res["runs"] if r["L"] == L and r["side"] == "theirs"), {})

            def cell(r, k):
                return str(r[k]) if k in r else ("error" if "error" in r else ("skipped" if "skipped" in r else "-"))
            lines.append(f"| {L} | {cell(o, 'seconds')} ({cell(o, 'cpu_seconds')}) | {cell(o, 'peak_rss_gb')} | "
                         f"{cell(t, 'seconds')} ({cell(t, 'cpu_seconds')}) | {cell(t, 'peak_rss_gb')} | "
                         f"{row.get('seconds_ours_over_theirs', '-')} ({row.get('cpu_seconds_ours_over_theirs', '-')}) | "
                         f"{row.get('peak_rss_ours_over_theirs', '-')} | "
                         + (f"{row['speedup']}x ({row['cpu_speedup']}x)" if 'speedup' in row else '-') + " |")
        notes = [r for r in res["runs"] if "skipped" in r or "error" in r]
        for r in notes:
            lines.append("")
            lines.append(f"- {r['side']} at L={r['L']}: " + (f"skipped: {r['skipped']}" if "skipped" in r else
                                                             f"ERROR: {r['error']}"))
            if "time_fit" in r:
                lines.append(f"  time fit {r['time_fit']}; memory fit {r['memory_fit']}")
            if "stderr_tail" in r:
                lines += ["  ```", *("  " + x for x in r["stderr_tail"].splitlines()[-25:]), "  ```"]
        lines += ["", "Peak RSS includes each process's imports and model (right before the timed prefill: "
                  + ", ".join(f"{r['side']} {r['L']}: {r['rss_after_load_gb']} GB" for r in res["runs"] if "rss_after_load_gb" in r)
                  + ").", "",
                  "How: ours = `Engine.prefill_prefix` (paged latent + indexer caches, chunked prefill); theirs = one "
                  "`DeepseekV32ForCausalLM` forward with `use_cache=False, logits_to_keep=1`; a 256-token warm-up forward "
                  "first on both sides. Extrapolations (if any) are fits of the two largest measured lengths, stated as such."]
        gb = res.get("cpu_bf16_gemm")
        if gb:
            lines += ["", f"bf16 on this CPU ({gb['cpu_capability']}, no native bf16): a 2048x256 @ 256x256 GEMM takes "
                      f"{gb['bf16_ms']} ms in bf16 vs {gb['fp32_ms']} ms in fp32 ({gb['bf16_over_fp32']}x), so both sides' "
                      "bf16 runs are slower than their fp32 ones; which side loses more depends on how much of its work "
                      "is bf16 GEMMs (transformers' indexer scores in fp32, `q.float()`)."]
        if res.get("machine_load_at_end"):
            lines += ["", f"1/5/15-min load average at the end of the run: {[round(x, 2) for x in res['machine_load_at_end']]} "
                      "(2-core machine shared with other jobs: absolute seconds are noisy)."]
    else:
        lines.append(f"**{res.get('error')}**")
    Path(stem + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
