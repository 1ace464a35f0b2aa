"""Fuzz the HTTP API from its OpenAPI schema with schemathesis (every route, every phase:
examples, coverage, fuzzing, stateful) against the real service on loopback, API keys on, a few
documents uploaded first. Gate: zero 5xx (check `not_a_server_error`) and no crash of the
server. Prints JSON as its last line: cases tried, failures, 5xx count from the server log.

    .venv/bin/python benchmarks/fuzz_api.py --max-examples 100        # ~10 min on 2 busy cores
    .venv/bin/python benchmarks/fuzz_api.py --max-examples 5          # smoke
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.service_proc import Service  # noqa: E402

KEY = "fuzz-key-000001"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-examples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fuzz_api.json"))
    a = ap.parse_args()
    t0 = time.time()
    with Service(keys={KEY: "tenantA", "fuzz-key-000002": "tenantB"}) as svc:
        h = {"Authorization": f"Bearer {KEY}"}
        files = [("files", ("rome.txt", b"The treaty was signed in Rome in 1957. " * 20, "text/plain")),
                 ("files", ("paris.md", b"# Paris\n\nThe capital of France is Paris.\n" * 10, "text/markdown"))]
        assert httpx.post(svc.url + "/v1/documents", files=files, headers=h, timeout=120).status_code == 200
        report = Path(svc.tmp.name) / "report.ndjson"
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", svc.url + "/openapi.json", "-H",
               f"Authorization: Bearer {KEY}", "--checks", "not_a_server_error", "--max-examples",
               str(a.max_examples), "--workers", "1", "--seed", str(a.seed), "--request-timeout", "120",
               "--report", "ndjson", "--report-ndjson-path", str(report), "--no-color"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        print(out[-6000:])
        alive = svc.proc.poll() is None and httpx.get(svc.url + "/healthz", timeout=10).status_code == 200
        metrics = httpx.get(svc.url + "/metrics", timeout=10).text
    statuses: dict[int, int] = {}  # every request the server answered, by status (its own counter)
    for st, n in re.findall(r'^dsa_rag_http_requests_total\{[^}]*status="(\d+)"[^}]*\} ([0-9.e+]+)$', metrics, re.M):
        statuses[int(st)] = statuses.get(int(st), 0) + int(float(n))
    cases = re.search(r"Test cases:\s*\n?\s*(\d+) generated", out) or re.search(r"(\d+) generated", out)
    result = {
        "bench": "fuzz_api", "tool": "schemathesis", "max_examples": a.max_examples, "seed": a.seed,
        "cases": int(cases.group(1)) if cases else None, "requests_served": sum(statuses.values()),
        "server_5xx": sum(n for s, n in statuses.items() if s >= 500),
        "status_counts": {str(k): statuses[k] for k in sorted(statuses)},
        "schemathesis_exit": proc.returncode, "server_alive_after": alive, "seconds": round(time.time() - t0, 1),
    }
    result["ok"] = result["server_5xx"] == 0 and proc.returncode == 0 and alive
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
