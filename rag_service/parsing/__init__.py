"""Parsing uploads: type detection and dispatch (ingest.py), text and Markdown decoding (text.py),
PDF text with page offsets (pdf.py, run in sandbox processes by sandbox.py), and token-aware
chunks that keep those offsets (chunk.py).

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_ingest.py tests/rag_service/test_hostile.py`.
"""
