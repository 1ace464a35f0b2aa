"""Why a wrong answer was wrong: sort a model's free-running output on a model/training/data.py example
into one failure kind, so the eval can say whether a task fails at finding the needle, at telling
similar needles apart, or at copying what it found.

Kinds, in the order they are tried (the first that fits):
- "order": the answer's items, all of them, in another order (multi-query, multi-value, vt);
- "distractor": the output, or one of its items, is a value planted in the documents for another
  key (another entity's or attribute's value, another table row, the other variable chain);
- "near copy": within 2 edits (or a tenth of the answer's length) of the answer: found and
  mis-copied, such as a digit dropped from a run of zeros;
- "near distractor": a near copy (as above) of a distractor value: the wrong needle, mis-copied;
- "partial": some of the answer's items, not all;
- "other": none of these (not found, or made up).

    from dsa_rag.model.evals.failure_kinds import failure_kind
    failure_kind(example, "4120000")  # -> "near copy" when the answer is "41200000"

To sort the outputs recorded in eval files again after a change here, in place:

    .venv/bin/python -m dsa_rag.model.evals.resort_failures benchmarks/results/eval_dsa-tiny_tasks_seed41*.json
    .venv/bin/python -m pytest -q tests/model/evals/test_failure_kinds.py
"""

from __future__ import annotations

KINDS = ("order", "distractor", "near copy", "near distractor", "partial", "other")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), O(len(a) len(b))."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _near(a: str, b: str) -> bool:
    return edit_distance(a, b) <= max(2, len(b) // 10)


def _items(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def failure_kind(example, output: str) -> str:
    """The kind (one of KINDS) of a wrong `output` to `example` (a dsa_rag.model.training.data.Example)."""
    out, ans = output.strip(), example.answer.strip()
    got, want = _items(out), _items(ans)
    if len(want) > 1 and sorted(got) == sorted(want):
        return "order"
    planted = {d.strip() for d in example.distractors} | {i for d in example.distractors for i in _items(d)}
    if out in planted or any(g in planted and g not in want for g in got):
        return "distractor"
    if _near(out, ans):
        return "near copy"
    if any(_near(out, d) for d in planted):
        return "near distractor"
    if set(got) & set(want):
        return "partial"
    return "other"
