"""Tensor / expert-parallel engine vs one rank, same run: greedy tokens must match (the gate),
then prefill seconds and decode ms/token of both. On CPU (gloo, one thread per rank) this shows
the collectives' overhead, not a speed-up; on a multi-GPU node (NCCL) it is the TP/EP check.

    .venv/bin/python benchmarks/parallel_bench.py --model dsa-tiny --world 2 --tp 2 --ep 2 --prompt 512 --new 32
    .venv/bin/python benchmarks/parallel_bench.py --model /ckpt/dir --world 8 --tp 8 --ep 8 --device cuda --dtype bfloat16

Prints JSON as its last line ({"ok": false, ...} and exit status 1 when the tokens differ, with
no timings); --out writes it to a file too (benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsa_rag.model.engine.engine import Engine
from dsa_rag.model.engine.sampling import SamplingParams
from dsa_rag.model.load import load_model
from dsa_rag.model.parallel.launch import checkpoint_dir, spawn, start_rank


def _prompt(vocab: int, n: int) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def _timed(engine, ids: list[int], new: int) -> dict:
    """Prefill a prefix, then decode `new` greedy tokens off it: -> tokens and timings."""
    params = SamplingParams(max_tokens=new, temperature=0.0, stop_token_ids=[])
    t0 = time.perf_counter()
    h = engine.prefill_prefix(ids[:-1])
    t1 = time.perf_counter()
    out = engine.complete(ids[-1:], params, prefix=h)
    t2 = time.perf_counter()
    engine.release(h)
    return {"tokens": out.token_ids, "prefill_s": t1 - t0, "decode_ms_per_token": 1e3 * (t2 - t1) / len(out.token_ids)}


def _rank(rank: int, world: int, init_method: str, a: dict, out: str) -> None:
    dev = None if a["device"] == "cuda" else "cpu"
    eng = start_rank(rank, world, a["model"], tp=a["tp"], ep=a["ep"], init_method=init_method, device=dev,
                     dtype=a["dtype"], engine_kw={"n_blocks": 64})
    if eng is None:
        return  # a follower: ran until the leader shut it down
    res = _timed(eng, _prompt(eng.cfg.vocab_size, a["prompt"]), a["new"])
    eng.shutdown_followers()
    torch.save(res, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dsa-tiny")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (and for the 1-rank run)")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_model(checkpoint_dir(a.model), device="cuda" if a.device == "cuda" else "cpu", dtype=a.dtype)
    one = _timed(Engine(model, n_blocks=64), _prompt(model.cfg.vocab_size, a.prompt), a.new)
    del model
    if a.device == "cuda":
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as d:
        res = Path(d) / "leader.pt"
        spawn(_rank, a.world, vars(a), str(res), threads=a.threads)
        many = torch.load(res)
    report = {"bench": "parallel", "model": a.model, "device": a.device, "dtype": a.dtype, "world": a.world,
              "tp": a.tp, "ep": a.ep, "prompt": a.prompt, "new": a.new, "threads_per_rank": a.threads,
              "ok": many["tokens"] == one["tokens"]}
    if report["ok"]:
        report.update({
            "prefill_s_1rank": round(one["prefill_s"], 3), "prefill_s_nrank": round(many["prefill_s"], 3),
            "decode_ms_1rank": round(one["decode_ms_per_token"], 2),
            "decode_ms_nrank": round(many["decode_ms_per_token"], 2),
            "decode_ratio_nrank_over_1rank": round(many["decode_ms_per_token"] / one["decode_ms_per_token"], 3)})
    line = json.dumps(report)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(line + "\n")
    print(line)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
