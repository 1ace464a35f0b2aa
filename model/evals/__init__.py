"""Evaluation and research probes: the long-context QA eval, its report, failure kinds, and the
needle / position probes. May use the network and the training data generators.

Tests: `.venv/bin/pytest -q tests/model/evals`.
"""
