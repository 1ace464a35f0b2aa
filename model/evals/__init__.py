"""Evaluation and research probes: the long-context QA eval (eval.py) and the example sets it
draws (example_sets.py), its report (eval_report.py), the failure kinds of wrong answers
(failure_kinds.py, re-sorted in place by resort_failures.py), and the needle / position probes.
May use the network and the training data generators; training never imports this package.

Tests: `TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/model/evals`.
"""
