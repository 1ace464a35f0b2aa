"""The DSA training recipe: dense stage, indexer warm-up by KL, sparse stage, and the synthetic
long-document data it trains on. Imports the network, never evaluation code.

Tests: `.venv/bin/pytest -q tests/model/training`.
"""
