"""The ask path, FastAPI- and Ray-free: a question's parameters (params.py: AskParams), the
fan-out to its selected packs (fanout.py: ask_events, ask, ask_sync), the merge of their answers
(merge.py), the per-replica pack worker over an engine and cached prefixes (worker.py), the
Backend interface (backend.py) and its in-process implementation (local.py: LocalBackend).

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_ask_path.py tests/rag_service/test_engine_protocol.py`.
"""
