"""The prepared GPU check: every stage of it, run one by one by benchmarks/gpu_check.sh.

    bash benchmarks/gpu_check.sh            # on one H100: <= 8 min, writes benchmarks/results/gpu/gpu_check.{json,md}
    bash benchmarks/gpu_check.sh --dry      # CPU dry run (automatic without CUDA): gpu_check_dry.{json,md}
    .venv/bin/python benchmarks/gpu_check.py --list-stages      # name, budget (what the shell runs)

Stages (budget = the shell's `timeout`; estimates for an H100 SXM from the FLOP counts below):
  env               15 s  torch / triton / device facts, nvidia-smi.                      ~5 s
  pytest_gpu        80 s  `pytest -m gpu` (Triton kernels at V3.2 shapes vs naive, the
                          /v1/ask path on a CUDA engine).                                 ~40 s (collection + compiles)
  kernels_vs_naive  55 s  Triton vs naive.py on V3.2 shapes: kernels_gpu.gate (indexer FP8
                          logits + top-k T256 x S4096 x 64 x 128; sparse_mla T64 x H128 x
                          D576/v512, K2048), plus indexer bf16 logits and the 128k-key
                          paths (indexer FP8 top-k and sparse_mla over S = 131072).       ~25 s (mostly JIT)
  kernels_tflops    55 s  TFLOP/s (CUDA events, median of 10): sparse_mla prefill T4096 x
                          K2048 x H128 at S 8k..128k (2.34 TFLOP a call, FlashMLA's count
                          2*T*K*H*(576+512)); decode: 128 rows at S 32k as 128 T=1 calls and as one call,
                          one call of 1 and of 64 rows (split-K decode); each installed kernel
                          library (kernels/libraries.py) on the same shapes; FP8 indexer_logits
                          T2048 x H64 x D128 at S 4k..64k (causal pairs: 2*H*D*(T*(S-T) + T(T+1)/2), 1.9 TFLOP
                          at 64k) and indexer_topk seconds. Even at 20 TFLOP/s every
                          timing loop is < 2 s: ~15 s in all with the compiles.           ~20 s
  engine           220 s  Engine TTFT and decode ms/token, DSA vs dense in the same run, of
                          a V3.2-shaped model (below) in bf16 with fp8_numerics at L = 8k,
                          32k, 128k. Per layer at 128k: projections ~48 TFLOP, FP8 indexer
                          8192*L^2 = 141 TFLOP (causal half), sparse MLA 2*L*2048*128*1088
                          = 75 TFLOP; dense MHA L^2*128*320 = 704 TFLOP. DSA 128k prefill
                          (2 layers) ~5-15 s; dense 128k ~15-30 s (measured only if the
                          fit of 8k/32k says it fits what is left of the budget; else the
                          dense probes integrated over 0..L, stated as an extrapolation). ~90 s
The shell's budgets add up to 425 s (+ at most 5 s kill grace per stage and 30 s for the report):
the whole check fits 8 minutes (480 s) even when every stage runs into its timeout; expect ~3-4 min.

Engine model ("V3.2-shaped"): deepseek-v3.2 preset widths unchanged (vocab 129280, hidden 7168,
128 heads, q_lora 1536, kv_lora 512, nope 128 / rope 64 / v 128, indexer 64 heads x 128, top-k
2048, YaRN x40, max positions 163840, dense MLP 18432, expert width 2048, 1 shared expert, 8
active). Shrunk: 61 layers -> 2 (layer 0 dense MLP like V3.2's first 3, layer 1 MoE), 256 routed
experts -> 32 (8 groups of 4, top-4 groups, 8 active: the same routing shape, per-token FLOPs
unchanged), MTP layer dropped; weights random normal(0, 0.02) in bf16 (not FP8 checkpoint blocks;
fp8_numerics=True simulates V3.2's FP8 indexer and c_kv cache). ~4.1B parameters, ~10 GB.
On CUDA the model's dense_attention query chunk is raised from 2^26 to 2^31 score elements (its
default is sized for CPU RAM and would make the dense baseline ~10x slower than it needs to be).

Dry mode (no CUDA, or --dry): every stage runs its CPU part at tiny shapes: the Triton kernels
under TRITON_INTERPRET=1 vs naive (tiny V3.2-like shapes, real head dims 576/512 and 128), the
TFLOP/s code paths once with a wall-clock timer (interpreter: not a performance figure), the
engine on a tiny bf16 + fp8_numerics model DSA vs dense at L = 256/512/1024; CUDA-only parts are
marked "skipped: no CUDA device". Each stage records pass / fail / skipped with a reason; a
failing stage never stops the others; the report is written from whatever the stages left.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STAGES = [("env", 15), ("pytest_gpu", 80), ("kernels_vs_naive", 55), ("kernels_tflops", 55), ("engine", 220)]
MARGIN_S = 15  # a stage stops starting new work this long before its budget ends
NO_CUDA = "skipped: no CUDA device"
OUT_DIR = ROOT / "benchmarks" / "results" / "gpu"


# ---------------------------------------------------------------- stage bookkeeping
class Stage:
    """One stage's record: parts (each pass / fail / skipped: reason), results, written to
    <dir>/<name>.json after every update, so a stage killed by its timeout still leaves what it
    measured."""

    def __init__(self, name: str, d: Path, budget: float, dry: bool):
        self.name, self.path, self.budget, self.dry = name, d / f"{name}.json", budget, dry
        self.t0 = time.monotonic()
        self.rec = {"stage": name, "mode": "dry" if dry else "gpu", "budget_s": budget, "parts": {}, "results": {},
                    "finished": False}
        self.save()

    def left(self) -> float:
        return self.budget - MARGIN_S - (time.monotonic() - self.t0)

    def part(self, name: str, status: str, **info):
        self.rec["parts"][name] = {"status": status, **info}
        self.save()

    def result(self, key, value):
        self.rec["results"][key] = value
        self.save()

    def save(self):
        self.rec["wall_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rec, indent=1, default=str))
        tmp.replace(self.path)

    def finish(self):
        self.rec["finished"] = True
        self.save()


def run_part(st: Stage, name: str, fn, *a, **kw):
    """Run one part; an exception fails that part (traceback kept), never the stage's others."""
    try:
        out = fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 - the check records every failure and goes on
        st.part(name, "fail", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        return None
    return out


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_timer(fn, warmup=1, reps=3):
    """Dry-run stand-in for kernels_gpu.cuda_time (median wall seconds)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


# ---------------------------------------------------------------- stage: env
def stage_env(st: Stage):
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "host": platform.node(), "cpus": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        info["triton"] = f"not importable: {e}"
    smi = shutil.which("nvidia-smi")
    if smi:
        p = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        info["nvidia_smi"] = (p.stdout or p.stderr).strip()
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    elif smi:
        info["warning"] = ("nvidia-smi sees a GPU but this torch has no CUDA (" + torch.__version__ +
                           "): install a CUDA build of torch in .venv, else the check can only dry-run")
    try:
        info["git_head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    st.rec["results"] = info
    st.part("facts", "pass")


# ---------------------------------------------------------------- stage: pytest -m gpu
def stage_pytest(st: Stage):
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
           f"--timeout={max(10, int(st.left()))}"]
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5, st.left()))
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), None
    summary = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)\b.* in [\d.]+s", ln)]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary[-1] if summary else "")}
    lines = [ln for ln in out.splitlines() if ln.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))]
    st.result("command", " ".join(["python"] + cmd[1:]))
    st.result("counts", counts)
    st.result("tests", lines)
    st.result("tail", out[-3000:])
    if rc is None:
        st.part("pytest", "fail", error=f"timed out after {st.left():.0f} s")
    elif counts.get("failed") or counts.get("error") or counts.get("errors") or rc not in (0, 5):
        st.part("pytest", "fail", error=f"pytest exit {rc}", counts=counts)
    elif counts.get("passed"):
        st.part("pytest", "pass", counts=counts)
    else:
        st.part("pytest_selection_runs", "pass", counts=counts,
                note="pytest -m gpu ran; every GPU-marked test skipped itself")
        if st.dry:
            st.part("gpu_tests", NO_CUDA)
        else:
            st.part("gpu_tests", "fail", error="no GPU-marked test ran on a GPU run")


# ---------------------------------------------------------------- stage: Triton vs naive
def stage_kernels_vs_naive(st: Stage):
    import torch

    import kernels_gpu as kg
    from dsa_rag.kernels.indexer import indexer_logits, indexer_topk
    from dsa_rag.kernels.indexer import naive as idx_naive
    from dsa_rag.kernels.sparse_mla import naive as mla_naive
    from dsa_rag.kernels.sparse_mla import sparse_mla

    os.environ["DSA_KERNEL_BACKEND"] = "triton"
    dev = "cpu" if st.dry else "cuda"
    torch.manual_seed(0)
    if st.dry:  # tiny V3.2-like: the real head dims (576 / 512, indexer 128), few rows and keys
        shapes = dict(idx_shape=(16, 160, 8, 128), topk=32, mla_shape=(8, 16, 160, 64), D=576, V=512)
        big = dict(T=4, S=1024, H_i=8, K=64, Hm=16)
    else:  # kernels_gpu's V3.2 gate + the 128k-key paths the engine uses
        shapes = dict(idx_shape=(256, 4096, 64, 128), topk=2048, mla_shape=(64, 128, 4096, 2048), D=576, V=512)
        big = dict(T=16, S=131072, H_i=64, K=2048, Hm=128)
    st.result("shapes", {**shapes, "large_S": big, "backend": "triton" + (" (TRITON_INTERPRET=1)" if st.dry else "")})
    if st.dry:
        st.part("v32_shapes", NO_CUDA, note="the interpreter runs the same checks at tiny shapes (real head dims)")
    t = time.perf_counter()
    checks = run_part(st, "kernels_gpu.gate", kg.gate, dev, **shapes)
    if checks is not None:
        st.part("kernels_gpu.gate", "pass" if all(checks.values()) else "fail", checks=checks,
                seconds=round(time.perf_counter() - t, 1))

    def bf16_indexer():
        T, S, H, D = shapes["idx_shape"]
        q = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(S, D, device=dev, dtype=torch.bfloat16)
        w = torch.randn(T, H, device=dev) * H**-0.5
        ref = idx_naive.indexer_logits(q, k, w, start_pos=S - T)
        out = indexer_logits(q, k, w, start_pos=S - T)
        fin = torch.isfinite(ref)
        err = kg.rms_ratio(out[fin], ref[fin])
        return {"ok": bool(torch.equal(fin, torch.isfinite(out))) and err < 1e-2, "rms_ratio": err}

    def large_s():
        T, S, H, K, Hm = big["T"], big["S"], big["H_i"], big["K"], big["Hm"]
        q, k, w, ks = kg.fp8_inputs(T, S, H, 128, dev)
        ref = idx_naive.indexer_logits(q, k, w, k_scale=ks, start_pos=S - T)
        idx = indexer_topk(q, k, w, K, k_scale=ks, start_pos=S - T)
        topk_err = kg.rms_ratio(ref.gather(1, idx.long()), ref.topk(K, dim=1).values)
        del ref
        qm = torch.randn(T, Hm, 576, device=dev, dtype=torch.bfloat16)
        kv = torch.randn(S, 576, device=dev, dtype=torch.bfloat16)
        ind = torch.stack([torch.randperm(S, device=dev)[:K] for _ in range(T)]).int()  # unique per row
        o_ref, l_ref = mla_naive.sparse_mla(qm, kv, ind, v_dim=512, scale=0.135)
        o, lse = sparse_mla(qm, kv, ind, v_dim=512, scale=0.135)
        e_o, e_l = kg.rms_ratio(o.float(), o_ref.float()), kg.rms_ratio(lse, l_ref)
        return {"ok": topk_err < 1e-2 and e_o < 1e-2 and e_l < 1e-3, "indexer_topk_fp8_rms": topk_err,
                "sparse_mla_out_rms": e_o, "sparse_mla_lse_rms": e_l}

    def glm5_shapes():
        # GLM-5: a 32 x 128 FP8 indexer keeping 2048 keys, 64 MLA heads over the same 576-dim latent
        T, S, K = (8, 160, 32) if st.dry else (64, 8192, 2048)
        q, k, w, ks = kg.fp8_inputs(T, S, 32, 128, dev)
        ref = idx_naive.indexer_logits(q, k, w, k_scale=ks, start_pos=S - T)
        idx = indexer_topk(q, k, w, K, k_scale=ks, start_pos=S - T)
        topk_err = kg.rms_ratio(ref.gather(1, idx.long()), ref.topk(K, dim=1).values)
        qm = torch.randn(T, 64, 576, device=dev, dtype=torch.bfloat16)
        kv = torch.randn(S, 576, device=dev, dtype=torch.bfloat16)
        o_ref, l_ref = mla_naive.sparse_mla(qm, kv, idx, v_dim=512, scale=0.135)
        o, lse = sparse_mla(qm, kv, idx, v_dim=512, scale=0.135)
        e_o, e_l = kg.rms_ratio(o.float(), o_ref.float()), kg.rms_ratio(lse, l_ref)
        return {"ok": topk_err < 1e-2 and e_o < 1e-2 and e_l < 1e-3, "indexer_topk_fp8_rms": topk_err,
                "sparse_mla_out_rms": e_o, "sparse_mla_lse_rms": e_l, "shape": {"T": T, "S": S, "topk": K}}

    for name, fn in (("indexer_logits_bf16", bf16_indexer), (f"large_S_{big['S']}", large_s), ("glm5_shapes", glm5_shapes)):
        if st.left() < 5:
            st.part(name, "fail", error="stage budget spent before this part")
            continue
        t = time.perf_counter()
        r = run_part(st, name, fn)
        if r is not None:
            st.part(name, "pass" if r.pop("ok") else "fail", **r, seconds=round(time.perf_counter() - t, 1))


# ---------------------------------------------------------------- stage: TFLOP/s
def stage_kernels_tflops(st: Stage):
    import torch

    import kernels_gpu as kg

    os.environ["DSA_KERNEL_BACKEND"] = "triton"
    torch.manual_seed(0)
    if st.dry:
        # the same code paths once, tiny, under the interpreter, wall-clock timed: proves the
        # script; the figures are NOT performance figures
        t = time.perf_counter()
        r = run_part(st, "dry_exercise", lambda: {
            "sparse_mla": kg.bench_sparse_mla("cpu", 4, 256, H=16, K=64, timer=wall_timer),
            "sparse_mla_decode_calls": kg.bench_sparse_mla_decode_calls("cpu", 256, batches=(1, 3), H=16, K=64,
                                                                        timer=wall_timer),
            "indexer_fp8": kg.bench_indexer_fp8("cpu", 8, 256, H=8, topk=32, timer=wall_timer, topk_reps=1)})
        if r is not None:
            st.part("dry_exercise", "pass", seconds=round(time.perf_counter() - t, 1),
                    note="interpreter wall-clock, not a performance figure", figures=r)
        st.result("libraries_detected", kg.libraries.report())
        for p in ("sparse_mla_prefill", "sparse_mla_decode", "sparse_mla_decode_calls", "indexer_fp8", "libraries"):
            st.part(p, NO_CUDA)
        return
    st.result("device", torch.cuda.get_device_name())
    plan = [("sparse_mla_prefill", S, functools.partial(kg.bench_sparse_mla, "cuda", 4096, S))
            for S in (8192, 32768, 65536, 131072)]
    plan.append(("sparse_mla_decode", 32768, functools.partial(kg.bench_sparse_mla_decode, "cuda", 128, 32768)))
    plan += [("sparse_mla_decode_calls", B, lambda B=B: kg.bench_sparse_mla_decode_calls("cuda", 32768, (B,))[0])
             for B in (1, 64)]
    plan += [("indexer_fp8", S, functools.partial(kg.bench_indexer_fp8, "cuda", 2048, S)) for S in (4096, 16384, 65536)]
    st.result("libraries_detected", kg.libraries.report())
    # each installed kernel library (kernels/libraries.py) on the same shapes, after its own gate
    plan += [("libraries", lib.name, functools.partial(kg.bench_library, lib, "cuda")) for lib in kg.libraries.present()]
    rows = {"sparse_mla_prefill": [], "sparse_mla_decode": [], "sparse_mla_decode_calls": [], "indexer_fp8": [],
            "libraries": []}
    errors = {}
    for name, S, fn in plan:
        if st.left() < 3:
            errors.setdefault(name, []).append(f"S={S}: stage budget spent")
            continue
        r = run_part(st, f"{name}_S{S}", fn)
        if r is None:
            errors.setdefault(name, []).append(f"S={S}: {st.rec['parts'].pop(f'{name}_S{S}')['error']}")
            continue
        rows[name].append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
        st.result(name, rows[name])
        torch.cuda.empty_cache()
    for name in rows:
        if name in errors:
            st.part(name, "fail", error="; ".join(errors[name]), measured=len(rows[name]))
        else:
            st.part(name, "pass", measured=len(rows[name]))
    st.result("flop_counts", {"sparse_mla": "2*T*topk*H*(576+512) (FlashMLA)",
                              "indexer_logits": "2*H*D*pairs, pairs = T*start_pos + T*(T+1)/2 (causal: unmasked pairs only)"})
    st.result("anchors", kg.ANCHORS)


# ---------------------------------------------------------------- stage: engine
class NullTokenizer:
    """The engine's default ByteTokenizer decodes ids < 264 only; a V3.2 vocabulary needs a
    tokenizer that accepts every id (the text is not looked at here)."""

    eos_id = 1

    def decode(self, ids):
        return ""


def engine_config(dry: bool):
    from dsa_rag.model.config import ModelConfig, RopeScaling, preset

    if dry:
        cfg = ModelConfig(name="gpu-check-dry-tiny", vocab_size=512, hidden_size=128, intermediate_size=256,
                          moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=64,
                          kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, index_n_heads=4,
                          index_head_dim=32, index_topk=64, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                          n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=2048,
                          rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=256),
                          num_nextn_predict_layers=0, fp8_numerics=True, quant_block=32).validate()
        shrunk = "tiny dry-run model (hidden 128, 4 heads, kv_lora 64, indexer 4 x 32, top-k 64, 8 experts): not V3.2 widths"
        return cfg, shrunk
    cfg = dataclasses.replace(preset("deepseek-v3.2"), name="v3.2-shaped-2L", num_hidden_layers=2,
                              first_k_dense_replace=1, n_routed_experts=32, n_group=8, topk_group=4,
                              num_experts_per_tok=8, num_nextn_predict_layers=0, quantization_config=None,
                              fp8_numerics=True).validate()
    shrunk = ("61 layers -> 2 (layer 0 dense MLP 18432, layer 1 MoE); 256 routed experts -> 32 (8 groups of 4, "
              "top-4 groups, 8 active + 1 shared, width 2048); MTP layer dropped; random bf16 weights instead of "
              "FP8 checkpoint blocks (fp8_numerics on). Unchanged: vocab 129280, hidden 7168, 128 heads, q_lora 1536, "
              "kv_lora 512, nope/rope/v 128/64/128, indexer 64 x 128, top-k 2048, YaRN x40, 163840 positions")
    return cfg, shrunk


def random_model(cfg, device, dtype, seed=0, std=0.02):
    """Built on the device and drawn there (a CPU generator would take minutes for ~4B values)."""
    import torch

    from dsa_rag.model.load import build_model

    torch.manual_seed(seed)
    m = build_model(cfg, device=device, dtype=dtype)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
    return m.eval()


def engine_gate(model, dev, chunk: int) -> dict:
    """The engine's chunked prefill over paged caches gives the full forward's logits (bf16 +
    fp8 numerics: close, not equal), on a prompt longer than top-k (dense-equivalent chunks, then
    sparse ones); the sparse selection changes the logits; a greedy request runs end to end."""
    import torch

    from dsa_rag.model.engine.engine import Engine, SamplingParams
    from dsa_rag.model.engine.paged import PagedSequence
    from engine_bench import GREEDY, ids_of

    cfg = model.cfg
    n = cfg.index_topk + 80
    ids = ids_of(n, 1, cfg.vocab_size)
    with torch.inference_mode():
        full = model(torch.tensor([ids], device=dev), last_only=True)[0, -1].float()
        cfg.dense_attention = True
        try:
            dense = model(torch.tensor([ids], device=dev), last_only=True)[0, -1].float()
        finally:
            cfg.dense_attention = False
        eng = Engine(model, NullTokenizer(), prefill_chunk=chunk)
        seq = PagedSequence(eng.pool)
        for s in range(0, n, chunk):
            got = eng._forward_chunk(seq, ids, s, min(chunk, n - s))[0, -1].float()
        seq.free()
    rel = ((got - full).norm() / full.norm()).item()
    sparse_effect = ((dense - full).norm() / full.norm()).item()
    top5 = bool((got.topk(5).indices == full.argmax()).any())
    comp = eng.complete(ids, SamplingParams(max_tokens=4, **GREEDY))
    ok_gen = comp.error is None and len(comp.token_ids) == 4 and all(0 <= t < cfg.vocab_size for t in comp.token_ids)
    ok = rel <= 5e-2 and top5 and sparse_effect > 1e-3 and ok_gen and bool(torch.isfinite(got).all())
    return {"gate": "green" if ok else "red", "prompt_tokens": n, "chunk": chunk,
            "chunked_vs_full_rel_err": round(rel, 5), "full_argmax_in_chunked_top5": top5,
            "dense_vs_dsa_rel_diff": round(sparse_effect, 5), "greedy_request_ok": ok_gen, "greedy_error": comp.error,
            "thresholds": "rel err <= 5e-2, argmax in top-5, dense vs DSA differ > 1e-3, 4 greedy tokens"}


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def stage_engine(st: Stage):
    import torch

    import dsa_rag.model.model as model_module
    from dsa_rag.model.engine.engine import Engine, SamplingParams
    from engine_bench import GREEDY, decode_pair, ids_of, integrate

    dry = st.dry
    dev = "cpu" if dry else "cuda"
    if dry:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    def v32_config():  # the GPU run's model, built on the meta device: validates, counts, sizes it
        from dsa_rag.model.load import build_model

        cfg, shrunk = engine_config(False)
        m = build_model(cfg, dtype=torch.bfloat16, meta=True)
        n = sum(p.numel() for p in m.parameters())
        gb = sum(p.numel() * p.element_size() for p in m.parameters()) / 2**30
        return {"params_b": round(n / 1e9, 3), "weights_gb": round(gb, 2), "shrunk": shrunk}

    v = run_part(st, "v32_config", v32_config)
    if v is not None:
        st.part("v32_config", "pass", **v)
    Ls, chunk, q_len, probe = ([256, 512, 1024], 128, 8, 64) if dry else ([8192, 32768, 131072], 8192, 32, 512)
    rounds, steps, gate_chunk = (2, 3, 32) if dry else (3, 8, 512)
    dense_full_max = Ls[1]  # dense prefill always measured up to here; beyond, only if the fit says it fits
    cfg, shrunk = engine_config(dry)
    t_build, model = timed(lambda: random_model(cfg, dev, torch.bfloat16))
    n_params = sum(p.numel() for p in model.parameters())
    st.result("model", {"name": cfg.name, "shrunk": shrunk, "params_b": round(n_params / 1e9, 3), "dtype": "bfloat16",
                        "fp8_numerics": cfg.fp8_numerics, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                        "heads": cfg.num_attention_heads, "kv_lora": cfg.kv_lora_rank, "rope": cfg.qk_rope_head_dim,
                        "index_heads": cfg.index_n_heads, "index_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
                        "experts": cfg.n_routed_experts, "active_experts": cfg.num_experts_per_tok,
                        "build_s": round(t_build, 1)})
    if not dry:
        # dense baseline: query chunks sized for GPU memory, not CPU RAM (see the module docstring)
        model_module.dense_attention = functools.partial(model_module.dense_attention.func
                                                         if isinstance(model_module.dense_attention, functools.partial)
                                                         else model_module.dense_attention, max_elems=1 << 31)
        st.result("dense_attention_max_elems", 1 << 31)
    st.result("plan", {"lengths": Ls, "prefill_chunk": chunk, "question_tokens": q_len, "probe_tokens": probe,
                       "decode_rounds": rounds, "decode_steps": steps, "dense_full_max": dense_full_max})

    gate = run_part(st, "gate", engine_gate, model, dev, gate_chunk)
    if gate is None:
        st.part("measure", "fail", error="correctness gate crashed: nothing measured")
        return
    st.part("gate", "pass" if gate["gate"] == "green" else "fail", **gate)
    if gate["gate"] != "green":
        st.part("measure", "fail", error="correctness gate red: nothing reported")
        return

    V = cfg.vocab_size
    ids = ids_of(Ls[-1], 0, V)
    question = ids_of(q_len, 99, V)
    eng = Engine(model, NullTokenizer(), prefill_chunk=chunk, n_blocks=2 * -(-Ls[-1] // 64) + 64)
    first = SamplingParams(max_tokens=1, **GREEDY)

    def question_s(handle, dense):
        model.cfg.dense_attention = dense
        try:
            return timed(lambda: next(iter(eng.generate(question, first, prefix=handle))))[0]
        finally:
            model.cfg.dense_attention = False

    def probe_s(handle, L, dense):
        model.cfg.dense_attention = dense
        child = handle.seq.fork(L - probe)
        try:
            with torch.inference_mode():
                return timed(lambda: eng._forward_chunk(child, handle.tokens, L - probe, probe))[0]
        finally:
            child.free()
            model.cfg.dense_attention = False

    def dense_prefill_s(L):
        model.cfg.dense_attention = True
        try:
            e2 = Engine(model, NullTokenizer(), prefill_chunk=chunk, n_blocks=-(-L // 64) + 8)
            dt, h2 = timed(lambda: e2.prefill_prefix(ids[:L]))
            e2.release(h2)
            del e2
            return dt
        finally:
            model.cfg.dense_attention = False

    rows, h, cum = [], None, 0.0
    if not dry:
        torch.cuda.reset_peak_memory_stats()

    def dense_pts():
        return [(x["L"] - probe / 2, x["dense_probe_ms_per_tok"] / 1e3) for x in rows if "dense_probe_ms_per_tok" in x]

    for L in Ls:  # most important figures first; the record is saved after each, so a timeout keeps them
        r = {"L": L}
        rows.append(r)

        def put(**kw):
            r.update(kw)
            st.result("runs", rows)

        if st.left() < 10:
            put(skipped=f"stage budget spent ({st.budget} s)")
            continue
        done = [x for x in rows if "dsa_prefill_s" in x]
        if len(done) >= 2:  # DSA prefill cost = a L + b L^2 (indexer): predict this L before spending the budget
            (L1, y1), (L2, y2) = [(x["L"], x["dsa_prefill_s"]) for x in done[-2:]]
            b = (y2 / L2 - y1 / L1) / (L2 - L1)
            est = (y1 / L1 - b * L1) * L + b * L * L
            put(dsa_prefill_fit_estimate_s=round(est, 2))
            if est - cum > 1.5 * st.left():
                put(skipped=f"DSA prefill to L={L} predicted {est:.0f} s (fit of L={L1}, {L2}), "
                            f"{est - cum:.0f} s more, with {st.left():.0f} s of the stage budget left")
                continue
        try:
            prev = h.length if h else 0
            seg, nh = timed(lambda: eng.prefill_prefix(ids[prev:L], prefix=h))
            cum += seg
            if h is not None:
                eng.release(h)
            h = nh
            put(dsa_prefill_s=round(cum, 3), dsa_prefill_tok_s=round(L / cum, 1))
            qs = question_s(h, False)
            put(dsa_question_s=round(qs, 4), dsa_ttft_s=round(cum + qs, 3))
            dsa_ms, dense_ms = decode_pair(eng, h, rounds, steps, V)
            put(dsa_decode_ms=round(dsa_ms, 3), dense_decode_ms=round(dense_ms, 3), decode_speedup=round(dense_ms / dsa_ms, 2))
            put(dsa_probe_ms_per_tok=round(1e3 * probe_s(h, L, False) / probe, 4),
                dense_probe_ms_per_tok=round(1e3 * probe_s(h, L, True) / probe, 4),
                dense_question_s=round(question_s(h, True), 4))
            pts = dense_pts()
            integral = integrate(pts, 0, L, pts[0][1])  # the extrapolation, and a cross-check where measured
            put(dense_prefill_probe_integral_s=round(integral, 3), dense_prefill_s=round(integral, 3),
                dense_prefill_method="EXTRAPOLATED: dense probe costs integrated over positions 0..L",
                dense_ttft_s=round(integral + r["dense_question_s"], 3),
                ttft_speedup=round((integral + r["dense_question_s"]) / r["dsa_ttft_s"], 2))  # replaced if measured below
            measured = [x for x in rows if "dense_prefill_measured_s" in x]
            want_dense = L <= dense_full_max
            if not want_dense and len(measured) >= 2:  # dense cost = a L + b L^2: fit the two largest measured
                (L1, y1), (L2, y2) = [(x["L"], x["dense_prefill_measured_s"]) for x in measured[-2:]]
                b = (y2 / L2 - y1 / L1) / (L2 - L1)
                est = (y1 / L1 - b * L1) * L + b * L * L
                put(dense_prefill_fit_estimate_s=round(est, 2))
                want_dense = 1.3 * max(est, integral) + 5 < st.left()  # the larger of two independent estimates
            if want_dense:
                d_s = dense_prefill_s(L)
                put(dense_prefill_measured_s=round(d_s, 3), dense_prefill_s=round(d_s, 3), dense_prefill_method="measured")
            else:
                put(dense_prefill_method=r["dense_prefill_method"] + " (the fit of the measured lengths says a measured "
                    "dense prefill would not fit the stage budget left)")
            dense_ttft = r["dense_prefill_s"] + r["dense_question_s"]
            put(dense_ttft_s=round(dense_ttft, 3), ttft_speedup=round(dense_ttft / r["dsa_ttft_s"], 2))
            if not dry:
                put(gpu_peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        except Exception as e:  # noqa: BLE001
            put(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
    st.result("method", {
        "dsa_ttft": "one DSA prefix prefill grown through every L (prefill_prefix continuing the previous handle, "
                    "chunk by chunk: the same work as a prefill from scratch) + the first token of a "
                    f"{q_len}-token question on it (cuda-synchronized wall clock)",
        "dense_ttft": "a fresh dense prefill of L tokens (cfg.dense_attention=True: the indexer is skipped, every causal "
                      "key attended) + the question's first token in dense mode; extrapolated where stated",
        "decode": "engine_bench.decode_pair: median step time of a greedy request forked off the L-token prefix, "
                  "rounds alternating DSA and dense over the same cache",
        "probes": f"the last {probe} tokens of the context recomputed on a fork (per-token cost at position ~L)"})
    bad = [x for x in rows if "error" in x or "skipped" in x]
    st.part("measure", "fail" if bad else "pass", lengths=[x["L"] for x in rows if "dsa_ttft_s" in x],
            **({"error": "; ".join(f"L={x['L']}: {x.get('error') or x.get('skipped')}" for x in bad)} if bad else {}))
    if dry:
        st.part("gpu_figures", NO_CUDA, note="the dry run uses a tiny model at tiny lengths on the CPU")


STAGE_FNS = {"env": stage_env, "pytest_gpu": stage_pytest, "kernels_vs_naive": stage_kernels_vs_naive,
             "kernels_tflops": stage_kernels_tflops, "engine": stage_engine}


# ---------------------------------------------------------------- report
def stage_status(rec: dict | None, rc: int | None, budget) -> tuple[str, str]:
    if rc in (124, 137):
        return "fail", f"timed out after its {budget} s budget" + (" (partial results kept)" if rec else "")
    if rec is None:
        return "fail", "did not run" if rc is None else f"no record (exit {rc})"
    parts = rec.get("parts", {})
    fails = [f"{k}: {v.get('error') or 'failed'}" for k, v in parts.items() if v["status"] == "fail"]
    if fails:
        return "fail", "; ".join(fails)[:600]
    if rc not in (0, None):
        return "fail", f"exit {rc}"
    if not rec.get("finished"):
        return "fail", "stage did not finish"
    skipped = [v["status"] for v in parts.values() if v["status"].startswith("skipped")]
    if parts and len(skipped) == len(parts):
        return "skipped", skipped[0][len("skipped: "):]
    return "pass", (f"CUDA-only parts {NO_CUDA}" if skipped else "")


def report(d: Path, dry: bool, total_wall=None):
    stages, summary = {}, {"pass": 0, "fail": 0, "skipped": 0}
    for name, budget in STAGES:
        p = d / f"{name}.json"
        rec = json.loads(p.read_text()) if p.exists() else None
        rcf = d / f"{name}.rc"
        rc, wall = (None, None)
        if rcf.exists():
            a = rcf.read_text().split()
            rc, wall = int(a[0]), float(a[1])
        status, reason = stage_status(rec, rc, budget)
        summary[status] += 1
        log = d / f"{name}.log"
        stages[name] = {"status": status, "reason": reason, "budget_s": budget, "wall_s": wall, "exit": rc,
                        **({"parts": rec["parts"], "results": rec["results"]} if rec else {}),
                        **({"log_tail": log.read_text(errors="replace")[-2000:]} if status == "fail" and log.exists() else {})}
    env = stages["env"].get("results", {})
    res = {"check": "gpu_check", "mode": "dry" if dry else "gpu",
           "device": env.get("device") or ("cpu (dry run)" if dry else "unknown"),
           "command": "bash benchmarks/gpu_check.sh" + (" --dry" if dry and env.get("cuda_available") else ""),
           "budget_total_s": sum(b for _, b in STAGES), "total_wall_s": total_wall, "summary": summary,
           "stages": stages, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stem = OUT_DIR / ("gpu_check_dry" if dry else "gpu_check")
    Path(f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    Path(f"{stem}.md").write_text(markdown(res))
    print(json.dumps(res, default=str))


def _fmt(v, nd=2):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def markdown(res) -> str:
    s = res["stages"]
    dry = res["mode"] == "dry"
    L = [f"# GPU check{' (DRY RUN on CPU: tiny shapes, no GPU figures)' if dry else ''}", "",
         f"Command: `{res['command']}`  ", f"Device: {res['device']}; written {res['written']}; total "
         f"{_fmt(res['total_wall_s'], 0)} s of a {res['budget_total_s']} s stage budget. "
         f"Summary: {res['summary']['pass']} pass, {res['summary']['fail']} fail, {res['summary']['skipped']} skipped.", ""]
    env = s["env"].get("results", {})
    L += [f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
          f"python {env.get('python')}, git {env.get('git_head')}" + (f"; nvidia-smi: {env['nvidia_smi']}" if env.get("nvidia_smi") else "")
          + (f"; **{env['warning']}**" if env.get("warning") else ""), "",
          "| stage | status | budget s | wall s | notes |", "|---|---|---:|---:|---|"]
    for name, r in s.items():
        L.append(f"| {name} | **{r['status']}** | {r['budget_s']} | {_fmt(r['wall_s'], 1)} | {r['reason'] or ''} |")
    L.append("")
    for name, r in s.items():
        parts = r.get("parts", {})
        if parts:
            L.append(f"## {name}")
            L.append("")
            for pn, p in parts.items():
                extra = {k: v for k, v in p.items() if k not in ("status", "traceback")}
                L.append(f"- {pn}: **{p['status']}** {json.dumps(extra, default=str) if extra else ''}")
            L.append("")
        res_ = r.get("results", {})
        if name == "kernels_tflops" and any(res_.get(k) for k in ("sparse_mla_prefill", "indexer_fp8")):
            L += ["| kernel (backend triton unless named) | T | S | seconds | TFLOP/s |", "|---|---:|---:|---:|---:|"]
            for x in res_.get("sparse_mla_prefill", []):
                L.append(f"| sparse_mla_prefill | {x['T']} | {x['S']} | {x['seconds']:.5f} | {x['tflops']:.1f} |")
            for x in res_.get("sparse_mla_decode", []):  # B rows of T = 1: separate calls, then one batched call
                L.append(f"| sparse_mla_decode, {x['B']} separate T=1 calls | 1 | {x['S']} | "
                         f"{x['separate_seconds']:.5f} | {x['separate_tflops']:.1f} |")
                L.append(f"| sparse_mla_decode, one call of {x['B']} rows | {x['B']} | {x['S']} | "
                         f"{x['batched_seconds']:.5f} | {x['batched_tflops']:.1f} |")
            for x in res_.get("sparse_mla_decode_calls", []):  # one call of B rows: the split-K decode launch
                L.append(f"| sparse_mla_decode, one call of {x['B']} rows ({x['splits']} K-splits) | {x['B']} | "
                         f"{x['S']} | {x['seconds']:.6f} | {x['tflops']:.1f} |")
            for x in res_.get("indexer_fp8", []):
                L.append(f"| indexer_logits FP8 (top-k {x['topk_seconds']:.4f} s) | {x['T']} | {x['S']} | "
                         f"{x['logits_seconds']:.5f} | {x['logits_tflops']:.1f} |")
            for lib in res_.get("libraries", []):  # side by side: the same shapes through each library
                if lib.get("gate") != "green":
                    L.append(f"| {lib['library']} {lib.get('version')}: gate {lib.get('gate')} {lib.get('checks')} | | | | |")
                    continue
                for x in lib.get("sparse_mla", []):
                    L.append(f"| sparse_mla, {lib['library']} {lib['version']} | {x['T']} | {x['S']} | "
                             f"{x['seconds']:.6f} | {x['tflops']:.1f} |")
                for x in lib.get("indexer_fp8", []):
                    L.append(f"| indexer_logits FP8, {lib['library']} {lib['version']} | {x['T']} | {x['S']} | "
                             f"{x['logits_seconds']:.5f} | {x['logits_tflops']:.1f} |")
            L += ["", "Published anchors: " + "; ".join(f"{k} {v}" for k, v in res_.get("anchors", {}).items()), ""]
        if name == "engine" and res_.get("runs"):
            m = res_.get("model", {})
            L += [f"Model: {m.get('name')}, {m.get('params_b')} B parameters, bf16, fp8_numerics={m.get('fp8_numerics')}. "
                  f"Shrunk: {m.get('shrunk')}.", "",
                  "| L | DSA TTFT s | dense TTFT s | TTFT speedup | DSA decode ms/tok | dense decode ms/tok | decode speedup | DSA prefill tok/s | dense prefill |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            for x in res_["runs"]:
                if "dsa_ttft_s" not in x:
                    L.append(f"| {x['L']} | {x.get('error') or x.get('skipped')} | | | | | | | |")
                    continue
                L.append(f"| {x['L']} | {x['dsa_ttft_s']} | {x.get('dense_ttft_s', '-')} | {x.get('ttft_speedup', '-')}x | "
                         f"{x['dsa_decode_ms']} | {x['dense_decode_ms']} | {x['decode_speedup']}x | {x['dsa_prefill_tok_s']} | "
                         f"{(x.get('dense_prefill_method') or '-')[:60]} |")
            L += ["", "Method: " + "; ".join(f"{k}: {v}" for k, v in res_.get("method", {}).items()), ""]
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=list(STAGE_FNS))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--list-stages", action="store_true")
    ap.add_argument("--dir", default=None, help="per-stage records (the shell's temporary directory)")
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--total-wall", type=float, default=None)
    a = ap.parse_args()
    if a.list_stages:
        for n, b in STAGES:
            print(n, b)
        return
    d = Path(a.dir or Path(tempfile.gettempdir()) / "gpu_check_stages")
    d.mkdir(parents=True, exist_ok=True)
    if a.report:
        return report(d, a.dry, a.total_wall)
    import torch

    dry = a.dry or not torch.cuda.is_available()
    if dry and a.stage in ("kernels_vs_naive", "kernels_tflops"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    st = Stage(a.stage, d, dict(STAGES)[a.stage], dry)
    try:
        STAGE_FNS[a.stage](st)
    except Exception as e:  # noqa: BLE001
        st.part("stage", "fail", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
    st.finish()
    failed = any(p["status"] == "fail" for p in st.rec["parts"].values())
    print(json.dumps({"stage": a.stage, "failed": failed, "wall_s": st.rec["wall_s"]}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
