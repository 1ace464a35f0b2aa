"""The inference runtime: paged latent + indexer caches, chunked prefill, continuous batching,
sampling, snapshots and attention traces (engine.py, paged.py, sampling.py), behind the small
`EngineProtocol` the service uses (protocol.py), built by `factory.load_engine`.

Tests: `.venv/bin/pytest -q tests/model/engine`.
"""
