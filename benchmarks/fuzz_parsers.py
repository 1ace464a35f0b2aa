"""Long property-based fuzz of the parsers (hypothesis): text/binary bytes through
`parse_document` (thread mode), mutated PDFs through the PDF sandbox, and filenames through
`clean_name`. Gate: every input parses or raises a DocumentError naming the file; zero other
exceptions, zero crashes. Same strategies as tests/rag_service/test_hostile.py, more examples.
Prints JSON as its last line (cases tried per target, outcomes).

    .venv/bin/python benchmarks/fuzz_parsers.py --examples 3000     # a few minutes
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.rag_service

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from dsa_rag.rag_service import errors  # noqa: E402
from dsa_rag.rag_service.parsing.ingest import clean_name, parse_document  # noqa: E402
from tests.rag_service import test_hostile as T  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=3000, help="per target (PDF: a third of it)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fuzz_parsers.json"))
    a = ap.parse_args()
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad: list[str] = []

    def run(target: str, name: str, data: bytes, s) -> None:
        counts[target]["cases"] += 1
        try:
            parse_document(name, data, s)
            counts[target]["parsed"] += 1
        except errors.DocumentError as e:
            counts[target][e.code] += 1
            if e.filename != clean_name(name):
                bad.append(f"{target}: error does not name the file: {e!r}")
        except Exception as e:  # noqa: BLE001 - the gate
            counts[target]["UNEXPECTED"] += 1
            bad.append(f"{target}: {type(e).__name__}: {e}"[:300])

    hs = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)
    t0 = time.time()
    given(data=T.TEXTISH, name=st.text(max_size=60))(settings(max_examples=a.examples, **hs)(
        lambda data, name: run("text", name, data, T.S_THREAD)))()
    given(data=T._pdf_mutations())(settings(max_examples=max(1, a.examples // 3), **hs)(  # noqa: SLF001
        lambda data: run("pdf_sandbox", "fuzz.pdf", data, T.S)))()

    def name_case(n: str) -> None:
        counts["filename"]["cases"] += 1
        try:
            T.test_fuzz_clean_name.hypothesis.inner_test(n)
        except Exception as e:  # noqa: BLE001
            counts["filename"]["UNEXPECTED"] += 1
            bad.append(f"filename {n!r}: {e}"[:300])

    given(st.text(max_size=2000))(settings(max_examples=a.examples, **hs)(name_case))()
    result = {"bench": "fuzz_parsers", "tool": "hypothesis", "seconds": round(time.time() - t0, 1),
              "cases": {k: dict(v) for k, v in counts.items()},
              "total_cases": sum(v["cases"] for v in counts.values()),
              "unexpected": len(bad), "examples_of_unexpected": bad[:10]}
    result["ok"] = not bad
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
