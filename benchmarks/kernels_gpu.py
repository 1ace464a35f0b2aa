"""GPU benchmark of the Triton DSA kernels: TFLOP/s of sparse_mla and FP8 indexer_logits.

    .venv/bin/python benchmarks/kernels_gpu.py          # needs CUDA; exits 0 with a skip JSON otherwise

Shapes follow the published anchors (reference/dsa-spec.md section 6):
* sparse_mla prefill (FlashMLA template): T = 4096, H = 128, D = 576, v = 512, topk = 2048,
  S = 8k, 32k, 64k, 128k; FLOPs = 2 * T * topk * H * (D + v). FlashMLA: ~640 TFLOP/s on H800.
* sparse_mla decode: T = 128 sequences x 2 query tokens flattened (256 rows, one shared cache
  here), H = 128, topk = 2048, S = 32k.
* indexer_logits FP8 (DeepGEMM fp8_mqa_logits template): T = 2048, H = 64, D = 128,
  S = 4k..64k; FLOPs = 2 * T * S * H * D (causal masking ignored: start_pos = S - T keeps all
  but the last T x T triangle). DeepGEMM community figure: ~1000 TFLOP/s on H200.
* indexer_topk at the same shapes (logits kernel + streaming torch.topk merge): seconds.
Correctness gate first: every op vs naive.py on a medium shape; red gate -> no timings.
Timing: CUDA events, median of 10 runs after 3 warm-ups. JSON is the last stdout line and is
written to benchmarks/results/kernels_gpu.json.
NOT RUN YET: no GPU was available when this was written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from dsa_rag.kernels.indexer import indexer_logits, indexer_topk
from dsa_rag.kernels.indexer import naive as idx_naive
from dsa_rag.kernels.sparse_mla import naive as mla_naive
from dsa_rag.kernels.sparse_mla import sparse_mla

ROOT = Path(__file__).resolve().parents[1]


def rms_ratio(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def cuda_time(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
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


def indexer_flops(T, S, H=64, D=128):
    """DeepGEMM fp8_mqa_logits' count: 2 * T * S * H * D (causal masking ignored)."""
    return 2 * T * S * H * D


def bench_sparse_mla(dev, T, S, H=128, D=576, V=512, K=2048, timer=cuda_time):
    q = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(S, D, device=dev, dtype=torch.bfloat16)
    ind = random_indices(T, S, K, dev)
    t = timer(lambda: sparse_mla(q, kv, ind, v_dim=V, scale=0.135))
    return dict(T=T, S=S, seconds=t, tflops=sparse_mla_flops(T, K, H, D, V) / t / 1e12)


def bench_indexer_fp8(dev, T, S, H=64, D=128, topk=2048, timer=cuda_time, topk_reps=3):
    q, k, w, ks = fp8_inputs(T, S, H, D, dev)
    t = timer(lambda: indexer_logits(q, k, w, k_scale=ks, start_pos=S - T))
    t_topk = timer(lambda: indexer_topk(q, k, w, topk, k_scale=ks, start_pos=S - T), reps=topk_reps)
    return dict(T=T, S=S, logits_seconds=t, logits_tflops=indexer_flops(T, S, H, D) / t / 1e12, topk_seconds=t_topk)


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
    res = {"gate": "green", "checks": checks, "device": torch.cuda.get_device_name(), "sparse_mla_prefill": [],
           "sparse_mla_decode": [], "indexer_fp8": []}
    for S in (8192, 32768, 65536, 131072):
        res["sparse_mla_prefill"].append(bench_sparse_mla(dev, 4096, S))
    res["sparse_mla_decode"].append(bench_sparse_mla(dev, 256, 32768))
    for S in (4096, 16384, 65536):
        res["indexer_fp8"].append(bench_indexer_fp8(dev, 2048, S))
    out = ROOT / "benchmarks" / "results" / "kernels_gpu.json"
    out.write_text(json.dumps(res) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
