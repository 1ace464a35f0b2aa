"""The DSA training recipe: dense stage, indexer warm-up by KL, sparse stage (train.py), the
training-time attention they share (attention.py), stage 2's gathered sparse attention
(sparse_train.py), the cached indexer fit (indexer_fit.py), and the synthetic long-document data
it all trains on (data.py). Imports the network, never evaluation code.

Tests: `.venv/bin/python -m pytest -q tests/model/training`.
"""
