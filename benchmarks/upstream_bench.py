"""Latency of `engine: openai` against the in-process engine on the same pack: first token and total
time of a question, direct (AsyncEngine in this process) vs through the backend
(model/engine/upstream.py -> HTTP -> `dsa-rag engine-server`, a subprocess running the same
engine with automatic prefix caching), cold pack (prefill + question) and warm pack (question
only), in one run: `--repeats` packs of the same size, each answered cold then warm by both
sides (their caches are separate processes), the order of the sides alternating, medians
reported with every run's figures in the JSON. Each side first answers a throwaway question over a small other pack, so
one-time costs (first forward, cache pool growth) stay out of the timings.

    .venv/bin/python benchmarks/upstream_bench.py                         # 8k-token pack, ~2 min on 2 cores
    .venv/bin/python benchmarks/upstream_bench.py --pack-tokens 1024 --repeats 1 --out /tmp/u.json   # smoke

Correctness gate first: the backend must return the same greedy tokens as the direct engine for
the same prompt ids (the upstream's prefix reuse is exact), and its warm question must report the
pack as cached by the upstream; otherwise nothing is reported (exit 1).
Both sides use one torch thread and run one after the other, so they share the machine the same
way; times are wall-clock (perf_counter) and noisy on a shared machine: compare the ratios.
"direct" has no HTTP, no JSON, no SSE; "backend" pays for all of them plus the warm-up request
(`upstream_warm_prefill`, 1 token) on a cold pack.
Last stdout line: JSON; also writes benchmarks/results/upstream_bench.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsa_rag.model.engine.factory import load_engine  # noqa: E402
from dsa_rag.model.engine.sampling import SamplingParams  # noqa: E402
from dsa_rag.model.tokenizer import ByteTokenizer  # noqa: E402

FACT = "The access code of the Porto warehouse is 7351902."
FILLER = ["The board noted that the shipping schedule improved during the winter.",
          "According to the survey, customer feedback grew while supply costs fell.",
          "The engineers observed that energy prices rose sharply this year.",
          "In short, the auditors agreed clearly about the audit."]
QUESTIONS = ["What is the access code of the Porto warehouse?", "Which code opens the Porto warehouse?"]


def pack_text(tokens: int) -> str:
    """About `tokens` byte tokens of filler with the fact in the middle."""
    out, i = [], 0
    while sum(len(s) + 1 for s in out) < tokens - len(FACT) - 64:
        out.append(FILLER[i % len(FILLER)])
        i += 1
    out.insert(len(out) // 2, FACT)
    return " ".join(out)


def start_server(threads: int) -> tuple[subprocess.Popen, str, Path]:
    log = Path(tempfile.mkdtemp(prefix="upstream-bench-")) / "engine-server.log"
    proc = subprocess.Popen([sys.executable, "-m", "dsa_rag.rag_service.cli", "engine-server", "--model", "dsa-tiny",
                             "--port", "0", "--threads", str(threads), "--prefix-cache-entries", "4"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = re.search(r"engine-server on (http://\S+)", log.read_text())
        if proc.poll() is not None:
            raise SystemExit(f"engine-server exited: {log.read_text()[-2000:]}")
        if m:
            try:
                if httpx.get(m.group(1) + "/health", timeout=5).status_code == 200:
                    return proc, m.group(1), log
            except httpx.HTTPError:
                pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("engine-server did not start")


async def timed(engine, pack_ids, q_ids, params, handle=None):
    """-> (handle, tokens, first_token_s, total_s, cached tokens the engine reported or None)."""
    t0 = time.perf_counter()
    if handle is None:
        handle = await engine.prefill_prefix(pack_ids)
    first, toks, usage = None, [], None
    async for ev in engine.generate(q_ids, params, prefix=handle):
        if ev.token_id < 0:
            raise RuntimeError(f"request failed: {ev.error}")
        first = first or time.perf_counter()
        toks.append(ev.token_id)
        usage = getattr(ev, "usage", None) or usage
    t1 = time.perf_counter()
    return handle, toks, first - t0, t1 - t0, (usage or {}).get("cached_tokens")


async def measure_once(engine, tok, pack_ids, params) -> dict:
    """A cold question (prefill + answer) and then a warm one (another question, the pack cached)."""
    q = [tok.question_ids(x) for x in QUESTIONS]
    handle, cold_toks, cold_ft, cold_total, cold_cached = await timed(engine, pack_ids, q[0], params)
    _, warm_toks, warm_ft, warm_total, warm_cached = await timed(engine, pack_ids, q[1], params, handle)
    await engine.release(handle)
    return {"cold": (cold_ft, cold_total, cold_cached), "warm": (warm_ft, warm_total, warm_cached),
            "tokens": (cold_toks, warm_toks)}


def summarize(runs: list[dict]) -> dict:
    out = {}
    for phase in ("cold", "warm"):
        out[phase] = {"first_token_s": statistics.median(r[phase][0] for r in runs),
                      "total_s": statistics.median(r[phase][1] for r in runs),
                      "cached_tokens": runs[-1][phase][2],
                      "runs_first_token_s": [round(r[phase][0], 4) for r in runs],
                      "runs_total_s": [round(r[phase][1], 4) for r in runs]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack-tokens", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3,
                    help="packs per side, each cold then warm (medians; the order of the sides alternates)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "upstream_bench.json"))
    a = ap.parse_args()
    tok = ByteTokenizer()
    pack_ids = tok.prompt_ids([("report-0.txt", pack_text(a.pack_tokens))])  # every repeat's pack has its size
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0)

    proc, url, log = start_server(a.threads)
    try:
        direct_engine = load_engine("dsa-tiny", device="cpu", tokenizer=tok, threads=a.threads)
        backend = load_engine("dsa-tiny", tokenizer=tok, backend="openai",
                              upstream={"urls": [url], "timeout_s": 600})

        async def run():
            # one-time costs (first forward, pool growth, the server's first request) out of the
            # timings: a throwaway question over another, small pack on each side first
            small = tok.prompt_ids([("warmup.txt", pack_text(512))])
            for eng in (direct_engine, backend):
                await measure_once(eng, tok, small, params)
            d, b = [], []
            for r in range(a.repeats):  # repeat r: pack r, cold on both sides (separate caches), order alternating
                ids = tok.prompt_ids([(f"report-{r}.txt", pack_text(a.pack_tokens))])
                sides = [(direct_engine, d), (backend, b)]
                for eng, acc in (sides if r % 2 == 0 else sides[::-1]):
                    acc.append(await measure_once(eng, tok, ids, params))
            return d, b

        d_runs, b_runs = asyncio.run(run())
        direct_engine.close()
        backend.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    direct, via = summarize(d_runs), summarize(b_runs)
    direct["tokens"] = [r["tokens"] for r in d_runs]
    via["tokens"] = [r["tokens"] for r in b_runs]

    # correctness gate: same greedy tokens; the upstream reports the pack cached on a warm question
    same = direct["tokens"] == via["tokens"]
    cached_ok = all((r["warm"][2] or 0) >= len(pack_ids) - 1 for r in b_runs)
    answer = tok.decode(d_runs[0]["tokens"][0])
    result = {"bench": "upstream_bench", "pack_tokens": len(pack_ids), "max_tokens": a.max_tokens,
              "repeats": a.repeats, "threads": a.threads, "gate": {"same_tokens": same, "upstream_cached": cached_ok},
              "answer": answer, "answer_has_fact_value": "7351902" in answer}
    if not (same and cached_ok):
        print(json.dumps({**result, "error": "correctness gate failed: no timings reported",
                          "direct_tokens": direct["tokens"], "backend_tokens": via["tokens"],
                          "backend_cached": via["warm"]["cached_tokens"]}))
        return 1
    for side in (direct, via):
        side.pop("tokens")
    result.update({"direct": direct, "backend": via,
                   "ratio_backend_over_direct": {
                       f"{phase}_{k}": via[phase][k] / direct[phase][k]
                       for phase in ("cold", "warm") for k in ("first_token_s", "total_s")},
                   "command": "python benchmarks/upstream_bench.py " + " ".join(sys.argv[1:]),
                   "machine": f"{os.cpu_count()} CPUs (shared), torch threads {a.threads}"})
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    rows = ["| pack | path | first token (s) | total (s) | cached tokens |", "|---|---|---|---|---|"]
    for phase in ("cold", "warm"):
        for name, side in (("direct engine", direct), ("engine: openai -> engine-server", via)):
            s = side[phase]
            rows.append(f"| {phase} | {name} | {s['first_token_s']:.3f} | {s['total_s']:.3f} | "
                        f"{'-' if s['cached_tokens'] is None else s['cached_tokens']} |")
    r = result["ratio_backend_over_direct"]
    md = (f"# upstream_bench: direct engine vs `engine: openai` on one pack\n\n"
          f"`{result['command']}` ({result['machine']}); pack {len(pack_ids)} tokens (dsa-tiny, byte tokenizer), "
          f"{a.max_tokens} new tokens greedy, medians of {a.repeats} packs per side (sides alternating). Gate: identical tokens "
          f"({same}), upstream reports the pack cached ({cached_ok}). Answer: {answer!r}.\n\n" + "\n".join(rows) +
          f"\n\nBackend / direct: cold first token x{r['cold_first_token_s']:.2f}, cold total x{r['cold_total_s']:.2f}, "
          f"warm first token x{r['warm_first_token_s']:.2f}, warm total x{r['warm_total_s']:.2f}. "
          f"Direct = the in-process engine (no HTTP); the direct engine reports no cached count "
          f"(its prefix handle is the cache).\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
