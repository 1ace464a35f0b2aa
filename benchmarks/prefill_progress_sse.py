"""The SSE transcript of the first question on a cold pack of >= 30k tokens: what a user's stream
shows while the pack's prefix is prefilled (progress events), then the answer and citations.

    .venv/bin/python benchmarks/prefill_progress_sse.py                      # ~2-5 min on 2 shared CPU cores
    .venv/bin/python benchmarks/prefill_progress_sse.py --tokens 4000 --out /tmp/sse.txt   # smoke

Starts the real service (`dsa-rag serve --no-ray`, dsa-tiny, embedded Redis, API keys on; see
service_proc.py) with a 128k context, uploads PDFs and text files written from the training
data's filler (one planted fact each) until one pack holds >= --tokens tokens, then streams
`POST /v1/ask` and writes every SSE line with its arrival time (seconds since the request) to
benchmarks/results/prefill_progress_sse.txt. The last stdout line is JSON: pack tokens, the
number of progress events, the gaps between them, time to first progress event and to first
token. Not a speed claim (the CPU is shared); it shows the cadence of the progress events.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rag_bench import corpus  # noqa: E402
from benchmarks.service_proc import Service  # noqa: E402

KEY = "bench-key-0001"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=30_000, help="fill one pack to at least this many tokens")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/prefill_progress_sse.txt"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)

    env = dict(max_context=131072, pack_reserve_tokens=512, chunk_tokens=256, chunk_overlap=32, max_new_tokens=16,
               default_max_tokens=12, torch_threads=a.threads, parse_timeout_s=120)
    rng = random.Random(7)
    with Service(keys={KEY: "default"}, **env) as svc, httpx.Client(base_url=svc.url, timeout=600,
                                                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
        tokens, facts, pack = 0, [], None
        while tokens < a.tokens:
            files, fs = corpus(rng, n_pdfs=1, pages=4, page_sentences=40)
            r = c.post("/v1/documents", files=[("files", f) for f in files])
            r.raise_for_status()
            facts += fs
            packs = c.get("/v1/packs").json()["data"]
            pack = max(packs, key=lambda p: p["tokens"])
            tokens = pack["tokens"]
        assert len(packs) == 1 and pack["state"] == "cold", packs
        question, answer, name = facts[0]
        lines, t0 = [], time.perf_counter()
        with c.stream("POST", "/v1/ask", json={"question": question, "stream": True}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line:
                    lines.append((time.perf_counter() - t0, line))
        again = c.post("/v1/ask", json={"question": question}).json()

    events = [(t, json.loads(ln[5:])) for t, ln in lines if ln.startswith("data: {")]
    prog = [t for t, e in events if e["type"] == "progress"]
    first_token = next((t for t, e in events if e["type"] == "token"), None)
    gaps = [b - a_ for a_, b in zip(prog, prog[1:])]
    summary = {
        "pack_tokens": tokens, "documents": len(facts), "progress_events": len(prog),
        "first_progress_s": round(prog[0], 2) if prog else None,
        "progress_gap_s": {"min": round(min(gaps), 2), "median": round(statistics.median(gaps), 2),
                           "max": round(max(gaps), 2)} if gaps else None,
        "first_token_s": round(first_token, 2) if first_token else None,
        "second_ask_first_token_s": round(again["timings"]["first_token_s"], 3),
        "second_ask_cached_tokens": again["usage"]["cached_tokens"],
        "threads": a.threads,
    }
    cmd = "python benchmarks/prefill_progress_sse.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    head = [f"# {cmd}", f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, dsa-tiny on CPU (shared 2-core machine), "
            f"dsa-rag serve --no-ray; question: {question!r} (planted answer {answer!r} in {name})",
            f"# summary: {json.dumps(summary)}",
            "# seconds since the request | SSE line as received"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(head + [f"{t:9.3f}  {ln}" for t, ln in lines]) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
