"""The inference runtime: paged latent + indexer caches, chunked prefill, continuous batching,
sampling, snapshots and attention traces, behind the small `EngineProtocol` the service uses.

Tests: `.venv/bin/pytest -q tests/model/engine`.
"""
