"""GPU benchmark of the Triton DSA kernels: TFLOP/s of sparse_mla and FP8 indexer_logits.

    .venv/bin/python benchmarks/kernels_gpu.py          # needs CUDA; exits 0 with a skip JSON otherwise

Shapes follow the published anchors (reference/dsa-spec.md section 6):
* sparse_mla prefill (FlashMLA template): T = 4096, H = 128, D = 576, v = 512, topk = 2048,
  S = 8k, 32k, 64k, 128k; FLOPs = 2 * T * topk * H * (D + v). FlashMLA: ~640 TFLOP/s on H800.
* sparse_mla decode, engine-shaped (the engine calls the op once per sequence per step, T = 1):
  B = 128 rows, H = 128, topk = 2048, S = 32k, as B separate T = 1 calls ("separate") and as one
  call of B rows ("batched", what a batched decode step would do); same FLOP count. Plus one call
  of B = 1 and B = 64 rows (the split-K decode launch, kernels/sparse_mla/decode.py) with the
  split count it used. FlashMLA's published sparse decode: ~410 TFLOP/s (FP8 cache) on H800.
* Kernel libraries (kernels/libraries.py; rows only for those installed, `pip install -e
  '.[kernels-sm90]'`): the same shapes through each library's adapter, after its own
  correctness gate vs naive.py, side by side with the Triton rows and the published anchors.
* indexer_logits FP8 (DeepGEMM fp8_mqa_logits template): T = 2048, H = 64, D = 128,
  S = 4k..64k, start_pos = S - T. FLOPs count only the causal (unmasked) pairs:
  2 * H * D * pairs, pairs = sum_t (start_pos + t + 1) = T * start_pos + T * (T + 1) / 2
  (= T*S - T*(T-1)/2); the kernel skips tiles entirely in the future, so the dense 2*T*S*H*D
  overstated TFLOP/s by S*T / pairs (1.33x at S = 4k, T = 2k). `logits_tflops_dense_count` keeps
  the old figure for comparison. DeepGEMM community figure: ~1000 TFLOP/s on H200.
* indexer_topk at the same shapes (logits kernel + streaming torch.topk merge): seconds.
Correctness gate first: every op vs naive.py on a medium shape; red gate -> no timings.
Timing: CUDA events, median of 10 runs after 3 warm-ups; before every warm-up and timed run a
256 MiB buffer is written (more than any GPU's L2: H100 50 MB, H200 60 MB, B200 126 MB) so no
run reads inputs left in L2 by the previous one (flush outside the timed events). JSON is the last stdout line and is
written to benchmarks/results/kernels_gpu.json.
NOT RUN YET: no GPU was available when this was written (nor for the finding-5 changes).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from dsa_rag.kernels import libraries
from dsa_rag.kernels.indexer import indexer_logits, indexer_topk
from dsa_rag.kernels.indexer import naive as idx_naive
from dsa_rag.kernels.sparse_mla import naive as mla_naive
from dsa_rag.kernels.sparse_mla import sparse_mla

ROOT = Path(__file__).resolve().parents[1]


def rms_ratio(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


L2_FLUSH_BYTES = 256 << 20
_flush_buf = {}


def flush_l2():
    """Write a 256 MiB buffer (> L2) on the current CUDA device: evicts the previous run's data."""
    dev = torch.cuda.current_device()
    if dev not in _flush_buf:
        _flush_buf[dev] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=f"cuda:{dev}")
    _flush_buf[dev].zero_()


def cuda_time(fn, warmup=3, reps=10, flush=True):
    for _ in range(warmup):
        if flush:
            flush_l2()
        fn()
    times = []
    for _ in range(reps):
        if flush:
            flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def fp8_inputs(T, S, H, D, dev):
    q = torch.randn(T, H, D, device=dev)
    k = torch.randn(S, D, device=dev)
    ks = k.abs().amax(1).clamp_min(1e-4) / 448
    w = torch.randn(T, H, device=dev) * H**-0.5
    return ((q / q.abs().amax() * 448).to(torch.float8_e4m3fn), (k / ks[:, None]).to(torch.float8_e4m3fn), w, ks)


def random_indices(T, S, K, dev):
    return torch.rand(T, S, device=dev).argsort(dim=1)[:, :K].int() if S <= 65536 else \
        torch.randint(0, S, (T, K), device=dev, dtype=torch.int32)  # (dups only affect timing)


def gate(dev, idx_shape=(256, 4096, 64, 128), topk=2048, mla_shape=(64, 128, 4096, 2048), D=576, V=512):
    """Every op vs naive.py: indexer (T, S, H, D_i) FP8 logits + top-k, sparse_mla (T, H, S, K) bf16.
    Defaults: the V3.2 shapes (gpu_check.py passes tiny ones for its interpreter dry run)."""
    checks = {}
    T, S, H_i, D_i = idx_shape
    q, k, w, ks = fp8_inputs(T, S, H_i, D_i, dev)
    ref = idx_naive.indexer_logits(q, k, w, k_scale=ks, start_pos=S - T)
    out = indexer_logits(q, k, w, k_scale=ks, start_pos=S - T)
    fin = torch.isfinite(ref)
    checks["indexer_logits_fp8"] = bool(torch.equal(fin, torch.isfinite(out))) and rms_ratio(out[fin], ref[fin]) < 1e-2
    idx = indexer_topk(q, k, w, topk, k_scale=ks, start_pos=S - T)
    got, want = ref.gather(1, idx.long()), ref.topk(topk, dim=1).values
    checks["indexer_topk_fp8"] = rms_ratio(got, want) < 1e-2
    Tm, Hm, Sm, Km = mla_shape
    qm = torch.randn(Tm, Hm, D, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(Sm, D, device=dev, dtype=torch.bfloat16)
    ind = random_indices(Tm, Sm, Km, dev)
    ind[::7, min(1000, Km // 2):] = -1
    o_ref, l_ref = mla_naive.sparse_mla(qm, kv, ind, v_dim=V, scale=0.135)
    o, lse = sparse_mla(qm, kv, ind, v_dim=V, scale=0.135)
    checks["sparse_mla_bf16"] = rms_ratio(o.float(), o_ref.float()) < 1e-2 and rms_ratio(lse, l_ref) < 1e-3
    return checks


def sparse_mla_flops(T, K, H=128, D=576, V=512):
    """FlashMLA's count for sparse MQA attention: 2 * T * topk * H * (D + v)."""
    return 2 * T * K * H * (D + V)


def indexer_flops(T, S, H=64, D=128, start_pos=None, causal=True):
    """FLOPs of the unmasked (query, key) pairs: 2 * H * D * pairs, pairs = sum over the T queries
    of the keys s <= start_pos + t (capped at S) = T * start_pos + T * (T + 1) / 2 for start_pos =
    S - T (the default, a prefill chunk at the end of the context). causal=False: DeepGEMM
    fp8_mqa_logits' dense count 2 * T * S * H * D."""
    if not causal:
        return 2 * T * S * H * D
    sp = S - T if start_pos is None else start_pos
    pairs = sum(min(S, sp + t + 1) for t in range(T)) if sp + T > S else T * sp + T * (T + 1) // 2
    return 2 * pairs * H * D


def bench_sparse_mla(dev, T, S, H=128, D=576, V=512, K=2048, timer=cuda_time):
    q = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(S, D, device=dev, dtype=torch.bfloat16)
    ind = random_indices(T, S, K, dev)
    t = timer(lambda: sparse_mla(q, kv, ind, v_dim=V, scale=0.135))
    return dict(T=T, S=S, seconds=t, tflops=sparse_mla_flops(T, K, H, D, V) / t / 1e12)


def bench_sparse_mla_decode(dev, B, S, H=128, D=576, V=512, K=2048, timer=cuda_time):
    """Engine-shaped decode: B sequences x 1 query token, as B separate T = 1 calls (what the
    engine does per step today) and as one call of B rows (a batched step)."""
    q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(S, D, device=dev, dtype=torch.bfloat16)
    ind = random_indices(B, S, K, dev)
    rows = [(q[b: b + 1], ind[b: b + 1]) for b in range(B)]

    def separate():
        for qb, ib in rows:
            sparse_mla(qb, kv, ib, v_dim=V, scale=0.135)

    t_sep = timer(separate)
    t_bat = timer(lambda: sparse_mla(q, kv, ind, v_dim=V, scale=0.135))
    flops = sparse_mla_flops(B, K, H, D, V)
    return dict(B=B, S=S, separate_seconds=t_sep, separate_tflops=flops / t_sep / 1e12,
                separate_us_per_call=t_sep / B * 1e6, batched_seconds=t_bat, batched_tflops=flops / t_bat / 1e12)


def bench_sparse_mla_decode_calls(dev, S, batches=(1, 64), H=128, D=576, V=512, K=2048, timer=cuda_time):
    """One call of B decode rows for each B (the split-K launch when the grid is small): seconds,
    TFLOP/s, and the split count the launcher chose (decode.split_plan)."""
    import triton as _triton

    from dsa_rag.kernels.dispatch import target_of
    from dsa_rag.kernels.sparse_mla import decode
    from dsa_rag.kernels.sparse_mla import triton as mla_triton

    kv = torch.randn(S, D, device=dev, dtype=torch.bfloat16)
    rows = []
    for B in batches:
        q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
        ind = random_indices(B, S, K, dev)
        t = timer(lambda: sparse_mla(q, kv, ind, v_dim=V, scale=0.135))
        cfg = mla_triton.launch_config(H, V, D, q.dtype, target_of(q.device))
        programs = B * _triton.cdiv(H, cfg["BLOCK_H"]) * cfg["DV_SPLIT"]
        splits, _ = decode.split_plan(programs, K, cfg["BLOCK_K"], target_of(q.device))
        rows.append(dict(B=B, S=S, seconds=t, tflops=sparse_mla_flops(B, K, H, D, V) / t / 1e12, splits=splits,
                         us_per_call=t * 1e6))
    return rows


def library_gate(lib, dev):
    """One present library vs naive.py at the V3.2 gate shapes (what it provides only)."""
    checks = {}
    if lib.sparse_mla is not None:
        T, H, S, K = 64, 128, 4096, 2048
        q = torch.randn(T, H, 576, device=dev, dtype=torch.bfloat16)
        kv = torch.randn(S, 576, device=dev, dtype=torch.bfloat16)
        ind = random_indices(T, S, K, dev)
        ind[::7, 1000:] = -1
        o, lse = libraries.sparse_mla_forward(lib, q, kv, ind, 512, 0.135)
        o_ref, l_ref = mla_naive.sparse_mla(q, kv, ind, v_dim=512, scale=0.135)
        checks["sparse_mla_bf16"] = rms_ratio(o.float(), o_ref.float()) < 1e-2 and rms_ratio(lse, l_ref) < 1e-3
    if lib.mqa_logits is not None:
        T, S = 256, 4096
        q, k, w, ks = fp8_inputs(T, S, 64, 128, dev)
        ref = idx_naive.indexer_logits(q, k, w, k_scale=ks, start_pos=S - T)
        out = libraries.mqa_logits_forward(lib, q, k, w, ks, S - T)
        fin = torch.isfinite(ref)
        checks["indexer_logits_fp8"] = bool(torch.equal(fin, torch.isfinite(out))) and rms_ratio(out[fin], ref[fin]) < 1e-2
    return checks


def bench_library(lib, dev, timer=cuda_time):
    """The Triton rows' shapes through `lib` (green gate first): prefill S 32k / 128k, decode B 1 / 64 /
    128 at S 32k, FP8 logits S 16k / 64k."""
    checks = library_gate(lib, dev)
    res = {"library": lib.name, "package": lib.package, "version": lib.version, "checks": checks}
    if not all(checks.values()):
        return dict(res, gate="red")
    res.update(gate="green", sparse_mla=[], indexer_fp8=[])
    if lib.sparse_mla is not None:
        for T, S in ((4096, 32768), (4096, 131072), (1, 32768), (64, 32768), (128, 32768)):
            q = torch.randn(T, 128, 576, device=dev, dtype=torch.bfloat16)
            kv = torch.randn(S, 576, device=dev, dtype=torch.bfloat16)
            ind = random_indices(T, S, 2048, dev)
            t = timer(lambda: libraries.sparse_mla_forward(lib, q, kv, ind, 512, 0.135))
            res["sparse_mla"].append(dict(T=T, S=S, seconds=t, tflops=sparse_mla_flops(T, 2048) / t / 1e12))
    if lib.mqa_logits is not None:
        for S in (16384, 65536):
            q, k, w, ks = fp8_inputs(2048, S, 64, 128, dev)
            t = timer(lambda: libraries.mqa_logits_forward(lib, q, k, w, ks, S - 2048))
            res["indexer_fp8"].append(dict(T=2048, S=S, logits_seconds=t, logits_tflops=indexer_flops(2048, S) / t / 1e12))
    return res


ANCHORS = {"FlashMLA sparse prefill, H800": "~640 TFLOP/s", "FlashMLA sparse decode (FP8 cache), H800": "~410 TFLOP/s",
           "DeepGEMM fp8_mqa_logits (community, H200)": "~1000 TFLOP/s"}


def bench_indexer_fp8(dev, T, S, H=64, D=128, topk=2048, timer=cuda_time, topk_reps=3):
    q, k, w, ks = fp8_inputs(T, S, H, D, dev)
    t = timer(lambda: indexer_logits(q, k, w, k_scale=ks, start_pos=S - T))
    t_topk = timer(lambda: indexer_topk(q, k, w, topk, k_scale=ks, start_pos=S - T), reps=topk_reps)
    return dict(T=T, S=S, logits_seconds=t, logits_tflops=indexer_flops(T, S, H, D) / t / 1e12,
                logits_tflops_dense_count=indexer_flops(T, S, H, D, causal=False) / t / 1e12, topk_seconds=t_topk)


def main():
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    os.environ["DSA_KERNEL_BACKEND"] = "triton"
    dev = "cuda"
    checks = gate(dev)
    if not all(checks.values()):
        print(json.dumps({"gate": "red", "checks": checks}))
        sys.exit(1)
    res = {"gate": "green", "checks": checks, "device": torch.cuda.get_device_name(),
           "flop_counts": {"sparse_mla": "2*T*topk*H*(576+512) (FlashMLA)",
                           "indexer_logits": "2*H*D*pairs, pairs = T*start_pos + T*(T+1)/2 (causal, unmasked only)"},
           "l2_flush_bytes": L2_FLUSH_BYTES, "sparse_mla_prefill": [],
           "sparse_mla_decode": [], "indexer_fp8": []}
    for S in (8192, 32768, 65536, 131072):
        res["sparse_mla_prefill"].append(bench_sparse_mla(dev, 4096, S))
    res["sparse_mla_decode"].append(bench_sparse_mla_decode(dev, 128, 32768))
    res["sparse_mla_decode_calls"] = bench_sparse_mla_decode_calls(dev, 32768)
    for S in (4096, 16384, 65536):
        res["indexer_fp8"].append(bench_indexer_fp8(dev, 2048, S))
    res["anchors"] = ANCHORS
    res["libraries_detected"] = libraries.report()
    res["libraries"] = [bench_library(lib, dev) for lib in libraries.present()]
    out = ROOT / "benchmarks" / "results" / "kernels_gpu.json"
    out.write_text(json.dumps(res) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
