"""DeepSeek-V4 engine benchmark on this CPU: what a question forked off a cached pack costs with
copied caches (V4Cache.snapshot, the engine before paging) vs paged ones (PagedV4Cache.fork),
and the decode step time with requests fed one forward each vs one forward for all.

    .venv/bin/python benchmarks/v4_engine_bench.py                 # ~2 min on a shared 2-core box
    .venv/bin/python benchmarks/v4_engine_bench.py --quick         # smaller prefixes, fewer steps

The model: a tiny random V4 checkpoint built as tests/model/v4_helpers.py builds them (HCA, CSA
and sliding layers, hash and routed MoE; max_position_embeddings raised to fit the prefixes),
saved and loaded back with load_v4_model. Timings are process CPU seconds (time.process_time,
torch.set_num_threads(1): the machine is shared, wall time would measure the neighbours).

1. Correctness gate (nothing is reported when red): a question decoded on a paged fork gives the
   logits of the same question on a copied cache, and the engine's batched decode gives the
   sequential decode's greedy tokens for every request of the step benchmark.
2. Fork cost at each prefix length L: time of the fork (median of --reps), bytes it takes at once
   (copy: the whole cache; paged: windows + rolling state), and once the fork has written its
   first token (paged: + the shared partial last block per ratio, copied on write).
3. Decode step time for 1 / 4 / 8 requests forked off one pack (each with its own question, so
   the rows sit at different positions): median engine.step() seconds, batched vs sequential,
   alternating the two modes each round.
Writes benchmarks/results/v4_engine_bench.json; the JSON is also the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsa_rag.model.engine.sampling import SamplingParams  # noqa: E402
from dsa_rag.model.v4.cache import bytes_per_token, fixed_bytes  # noqa: E402
from dsa_rag.model.v4.config import CSA, preset  # noqa: E402
from dsa_rag.model.v4.engine import V4Engine  # noqa: E402
from dsa_rag.model.v4.load import load_v4_model, save_v4_checkpoint  # noqa: E402
from dsa_rag.model.v4.paged import V4BlockPool  # noqa: E402
from tests.model.v4_helpers import random_v4, tiny_v4_config  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "v4_engine_bench.json"


def build_model(max_len: int):
    cfg = tiny_v4_config(max_position_embeddings=max_len)
    with tempfile.TemporaryDirectory() as d:
        return load_v4_model(save_v4_checkpoint(random_v4(cfg, seed=0), Path(d) / "tiny-v4"))


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def cpu_time(fn) -> tuple[float, object]:
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


@torch.inference_mode()
def fork_costs(model, lengths: list[int], reps: int, chunk: int) -> tuple[list[dict], bool]:
    """Per prefix length: copy vs paged fork time and bytes; the gate: same first-token logits."""
    rows, ok = [], True
    for L in lengths:
        prompt = ids(L, L)
        dense, pool = model.new_cache(), V4BlockPool(model.cfg, model.embed.weight.dtype)
        paged = pool.new_cache()
        for s in range(0, L, chunk):
            model.hidden(prompt[:, s: s + chunk], dense)
            model.hidden(prompt[:, s: s + chunk], paged)
        copy_s, paged_s = [], []
        for _ in range(reps):
            t, c = cpu_time(dense.snapshot)
            copy_s.append(t)
            t, f = cpu_time(paged.fork)
            paged_s.append(t)
            f.free()
        copy = dense.snapshot()
        fork = paged.fork()
        used = pool.used_blocks()
        at_fork = fork.private_nbytes()
        q = ids(5, L + 1)
        a, b = model(q, copy)[0, -1], model(q, fork)[0, -1]
        ok &= (a - b).abs().max().item() <= 1e-4
        # What the fork owns after its first tokens: the blocks it took (the copied partial last
        # block of each ratio, any new one), at its ratio's block bytes, + its own window / state.
        shared = {r: set(paged.seqs[r].blocks) for r in fork.seqs}
        own = {r: sum(1 for x in s.blocks if x not in shared[r]) for r, s in fork.seqs.items()}
        block = pool.block_bytes()
        after = fork.private_nbytes() + sum(block[r] * n for r, n in own.items())
        rows.append({"prefix_tokens": L, "copy_ms": 1e3 * statistics.median(copy_s),
                     "paged_ms": 1e3 * statistics.median(paged_s), "copy_bytes": copy.nbytes(),
                     "paged_bytes_at_fork": at_fork, "paged_bytes_after_first_tokens": after,
                     "paged_blocks_owned_after_first_tokens": sum(own.values()), "pool_blocks_used_by_prefix": used,
                     "first_token_logit_diff": (a - b).abs().max().item()})
        fork.free()
        paged.free()
    return rows, ok


def decode_steps(model, batches: list[int], prefix_len: int, steps: int, rounds: int) -> tuple[list[dict], bool]:
    """Median engine.step() time with B requests decoding, batched vs sequential."""
    rows, ok = [], True
    for B in batches:
        engines = {mode: V4Engine(model, prefill_chunk=4096, batched=mode == "batched")
                   for mode in ("batched", "sequential")}
        reqs, times = {}, {m: [] for m in engines}
        for mode, eng in engines.items():
            pack = eng.prefill_prefix(ids(prefix_len, 7)[0])
            params = SamplingParams(max_tokens=10 ** 6, stop_token_ids=[])
            reqs[mode] = [eng.add_request(ids(3 + 5 * i, 100 + i)[0], params, pack) for i in range(B)]
            eng.step()  # the questions' prefill + the first decode step: not timed
        for _ in range(rounds):
            for mode, eng in engines.items():
                for _ in range(steps):
                    t, _evs = cpu_time(eng.step)
                    times[mode].append(t)
        toks = {m: [eng.running[r].out_ids for r in reqs[m]] for m, eng in engines.items()}
        ok &= toks["batched"] == toks["sequential"]
        b, s = statistics.median(times["batched"]), statistics.median(times["sequential"])
        rows.append({"requests": B, "batched_step_ms": 1e3 * b, "sequential_step_ms": 1e3 * s,
                     "speedup": s / b, "tokens_per_request": len(toks["batched"][0])})
        for m, eng in engines.items():
            for r in reqs[m]:
                eng.abort(r)
    return rows, ok


def flash_derived(lengths: list[int], block: int = 64) -> dict:
    """Not measured: V4-Flash's fork bytes in bf16 from cache.py's accounting, for scale (the
    tiny model's pools are small next to its windows; the real model's are not)."""
    c = preset("deepseek-v4-flash")
    fixed = fixed_bytes(c)
    blocks: dict[int, int] = {}  # one block per ratio: `block` entries of each of its layers
    for i, t in enumerate(c.layer_types):
        r = c.ratio(i)
        if r:
            blocks[r] = blocks.get(r, 0) + block * 2 * (c.head_dim + (c.index_head_dim if t == CSA else 0))
    return {"note": "derived from model/v4/cache.py, not measured", "block_entries": block,
            "copy_bytes": {L: int(bytes_per_token(c) * L + fixed) for L in lengths + [131072]},
            "paged_bytes_at_fork": fixed, "paged_bytes_after_first_tokens_at_most": fixed + sum(blocks.values()),
            "block_bytes_per_ratio": blocks}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lengths", default=None, help="prefix lengths (comma-separated)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    lengths = [int(x) for x in (a.lengths or ("256,1024" if a.quick else "512,2048,8192")).split(",")]
    model = build_model(max(lengths) + 64)
    forks, ok_f = fork_costs(model, lengths, a.reps, chunk=512)
    steps, ok_d = decode_steps(model, [1, 4, 8], prefix_len=256 if a.quick else 1024,
                               steps=4 if a.quick else 8, rounds=2 if a.quick else 3)
    if not (ok_f and ok_d):
        res = {"correct": False, "fork_gate": ok_f, "batched_gate": ok_d}
        print(json.dumps(res))
        raise SystemExit("correctness gate red: no figures reported")
    res = {"correct": True, "clock": "time.process_time", "threads": torch.get_num_threads(),
           "model": {"config": "tests/model/v4_helpers.tiny_v4_config", "layer_types": model.cfg.layer_types,
                     "head_dim": model.cfg.head_dim, "compress_rates": model.cfg.compress_rates,
                     "sliding_window": model.cfg.sliding_window, "dtype": str(model.embed.weight.dtype)},
           "block_size_entries": V4BlockPool(model.cfg).block_size, "argv": sys.argv[1:],
           "fork": forks, "decode": steps, "v4_flash_fork_bytes": flash_derived(lengths)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    for r in forks:
        print(f"fork @ {r['prefix_tokens']:>5} tokens: copy {r['copy_ms']:.3f} ms / {r['copy_bytes']:,} B, "
              f"paged {r['paged_ms']:.3f} ms / {r['paged_bytes_at_fork']:,} B "
              f"({r['paged_bytes_after_first_tokens']:,} B after its first tokens)")
    for r in steps:
        print(f"decode step, {r['requests']} requests: sequential {r['sequential_step_ms']:.2f} ms, "
              f"batched {r['batched_step_ms']:.2f} ms ({r['speedup']:.2f}x)")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
