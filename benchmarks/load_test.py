"""Bounded load test on loopback: many clients (several API keys / tenants) mixing uploads and
questions (JSON and SSE) against the real service (`serve --no-ray`, dsa-tiny, small packs),
for a fixed time. Reports throughput, p50/p99 latency per kind, errors (gate: 0), and the
server's RSS over the run (gate: stable, i.e. the second half grows < 10%).

    .venv/bin/python benchmarks/load_test.py --clients 8 --seconds 120      # the committed run
    .venv/bin/python benchmarks/load_test.py --clients 2 --seconds 10       # smoke

Correctness gate first: a warm-up round (upload + ask per tenant) must succeed, else nothing is
reported. JSON is the last line and goes to benchmarks/results/load_test.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.service_proc import Service  # noqa: E402

WORDS = ("alpha beta gamma delta treaty rome paris revenue contract clause page report seine signed "
         "nineteen fifty seven capital river market profit audit").split()


def doc_text(rng: random.Random, n: int = 250) -> bytes:
    return (" ".join(rng.choice(WORDS) for _ in range(n)) + ".").encode()


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--upload-share", type=float, default=0.3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "load_test.json"))
    a = ap.parse_args()
    keys = {f"load-key-{i:04d}": f"tenant{i}" for i in range(a.tenants)}
    with Service(keys=keys, max_streams_per_key=max(4, a.clients)) as svc:
        server = psutil.Process(svc.proc.pid)
        # --- correctness gate: every tenant uploads and gets an answer with citations
        for i, k in enumerate(keys):
            h = {"Authorization": f"Bearer {k}"}
            r = httpx.post(svc.url + "/v1/documents", headers=h, timeout=300,
                           files=[("files", (f"seed{i}.txt", doc_text(random.Random(i)), "text/plain"))])
            assert r.status_code == 200, r.text
            r = httpx.post(svc.url + "/v1/ask", headers=h, json={"question": "treaty rome?", "max_tokens": 2},
                           timeout=300)
            assert r.status_code == 200 and r.json()["answer"] is not None, r.text
        lat: dict[str, list[float]] = {"upload": [], "ask": [], "ask_stream": []}
        errors: list[str] = []
        rss: list[tuple[float, float]] = []
        stop = threading.Event()
        lock = threading.Lock()
        t_start = time.time()

        def client(ci: int) -> None:
            rng = random.Random(1000 + ci)
            key = list(keys)[ci % len(keys)]
            h = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=svc.url, headers=h, timeout=300) as c:
                n = 0
                while not stop.is_set():
                    n += 1
                    t0 = time.perf_counter()
                    try:
                        if rng.random() < a.upload_share:
                            kind = "upload"
                            r = c.post("/v1/documents", files=[("files", (f"c{ci}-{n}.txt", doc_text(rng),
                                                                          "text/plain"))])
                            ok = r.status_code == 200 and r.json()["ids"]
                        elif rng.random() < 0.5:
                            kind = "ask"
                            r = c.post("/v1/ask", json={"question": " ".join(rng.sample(WORDS, 3)) + "?",
                                                        "max_tokens": 4})
                            ok = r.status_code == 200
                        else:
                            kind = "ask_stream"
                            r = c.post("/v1/ask", json={"question": " ".join(rng.sample(WORDS, 3)) + "?",
                                                        "max_tokens": 4, "stream": True})
                            ok = r.status_code == 200 and r.text.rstrip().endswith("[DONE]") and '"error"' not in r.text
                        dt = time.perf_counter() - t0
                        with lock:
                            if ok:
                                lat[kind].append(dt)
                            else:
                                errors.append(f"{kind} {r.status_code} {r.text[:200]}")
                    except Exception as e:  # noqa: BLE001
                        with lock:
                            errors.append(f"{type(e).__name__}: {e}"[:200])

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
        for t in threads:
            t.start()
        while time.time() - t_start < a.seconds:
            rss.append((time.time() - t_start, server.memory_info().rss / 2**20))
            time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(600)
        wall = time.time() - t_start
        rss.append((wall, server.memory_info().rss / 2**20))
        docs = sum(len(httpx.get(svc.url + "/v1/documents", headers={"Authorization": f"Bearer {k}"},
                                 timeout=60).json()["data"]) for k in keys)
    half = [m for t, m in rss if t >= wall / 2]
    total = sum(len(v) for v in lat.values())
    result = {
        "bench": "load_test", "clients": a.clients, "tenants": a.tenants, "seconds": round(wall, 1),
        "requests_ok": total, "errors": len(errors), "throughput_rps": round(total / wall, 2),
        "by_kind": {k: {"n": len(v), "p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99),
                        "mean_ms": round(statistics.mean(v) * 1000, 1) if v else None} for k, v in lat.items()},
        "all": {"p50_ms": pct([x for v in lat.values() for x in v], 0.5),
                "p99_ms": pct([x for v in lat.values() for x in v], 0.99)},
        "documents_acknowledged": len(lat["upload"]) + a.tenants, "documents_listed_after": docs,
        "rss_mb": {"start": round(rss[0][1], 1), "mid": round(half[0], 1), "end": round(rss[-1][1], 1),
                   "max": round(max(m for _, m in rss), 1)},
        "rss_growth_second_half_pct": round(100 * (rss[-1][1] - half[0]) / half[0], 2),
        "error_examples": errors[:5],
    }
    result["ok"] = (result["errors"] == 0 and result["rss_growth_second_half_pct"] < 10
                    and docs == result["documents_acknowledged"])
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
