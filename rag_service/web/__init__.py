"""The web interface's static files (index.html, app.js, style.css), shipped in the package and
served by `dsa_rag.rag_service.serve.routes.ui` at `/` and `/ui/<file>`. Vanilla JS, no build
step, no CDN: the page talks to the same REST API as every other client (/v1/documents,
/v1/packs, /v1/ask with SSE), sending the API key from its key field when auth is on.

    dsa-rag serve  # then open http://127.0.0.1:8000/
    .venv/bin/python -m pytest -q tests/service/test_ui.py   # drives it in a real Chromium (Playwright)
"""

from pathlib import Path

WEB_DIR = Path(__file__).resolve().parent
