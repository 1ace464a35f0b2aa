"""Sort the recorded wrong answers of eval result files into failure kinds again, in place.

`dsa_rag.model.evals.eval` stores each wrong answer's own greedy output with its failure kind
(model/evals/failure_kinds.py). After a change to how kinds are told apart, this re-sorts the
outputs already recorded (no model is run): each record's example is drawn again from its id
(model/evals/example_sets.py) and its output sorted with the current `failure_kind`.

    .venv/bin/python -m dsa_rag.model.evals.resort_failures benchmarks/results/eval_dsa-tiny_tasks_seed41*.json
    .venv/bin/python -m pytest -q tests/model/evals/test_eval.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsa_rag.model.evals.eval_report import sample_records
from dsa_rag.model.evals.example_sets import example_of
from dsa_rag.model.evals.failure_kinds import failure_kind


def resort(res: dict) -> int:
    """Re-sort every recorded output of one eval result (in place) -> how many kinds changed."""
    changed = 0
    for _, _, _, rec in sample_records(res):
        if "output" in rec:
            kind = failure_kind(example_of(rec["example"]), rec["output"])
            changed += kind != rec.get("failure")
            rec["failure"] = kind
    return changed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="model/evals/eval.py result files (rewritten in place)")
    a = ap.parse_args(argv)
    for p in a.files:
        res = json.loads(Path(p).read_text())
        changed = resort(res)
        Path(p).write_text(json.dumps(res, indent=1))
        print(f"{p}: {changed} failure kinds changed")


if __name__ == "__main__":
    main()
