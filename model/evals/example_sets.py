"""The examples an eval cell holds, and the example an id names.

An eval cell is one (task, context length) of `dsa_rag.model.evals.eval`; its `count` examples are
drawn from a generator seeded by (seed, task, length), with needle depths spread evenly over the
context, so the same arguments always draw the same examples. Each per-sample record names its
example "seed-task-length-count-i"; `example_of` draws that example again (the failure re-sort
and the tests use it).

    from dsa_rag.model.evals.example_sets import cell_examples, example_of
    cell_examples(1234, "niah_single", 1024, 20, 131072)[3] == example_of("1234-niah_single-1024-20-3")

    .venv/bin/python -m pytest -q tests/model/evals/test_eval.py
"""

from __future__ import annotations

import random

from dsa_rag.model.training import data


def cell_examples(seed: int, task: str, n: int, count: int, max_positions: int, tok=None) -> list:
    """The `count` examples of one (task, length) cell, needle depths spread evenly over the
    context; example i of them is the one named f"{seed}-{task}-{n}-{count}-{i}"."""
    rng = random.Random(f"{seed}-{task}-{n}")
    # The generator lands within ~0.3% of n (paragraph breaks): keep 128k prompts inside the
    # model's positions.
    gen_n = min(n, max_positions - 1024)
    return [data.make_example(rng, task, gen_n, tok, depth=(i + 0.5) / count) for i in range(count)]


def example_of(example_id: str, max_positions: int = 131072):
    """The model/training/data.py example that model/evals/eval.py named `example_id` ("seed-task-length-count-i")."""
    seed, rest = example_id.split("-", 1)
    task, n, count, i = rest.rsplit("-", 3)
    return cell_examples(int(seed), task, int(n), int(count), max_positions)[int(i)]
