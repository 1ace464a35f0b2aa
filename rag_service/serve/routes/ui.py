"""The web interface: `/` is the page, `/ui/<file>` its script and style sheet, `/ui/config.json`
what the page needs to know about this server (auth on?, model, upload limits). Open routes (see
guard.py's OPEN_PREFIXES): they hold no data, and every API call the page makes carries the key
typed into its API-key field.

The files live in rag_service/web/ (package data) and are read once, at import: a fixed set, so
no path from the URL ever reaches the filesystem.

Tests: `.venv/bin/python -m pytest -q tests/service/test_ui_api.py tests/service/test_ui.py`.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from dsa_rag.rag_service.errors import NotFound
from dsa_rag.rag_service.serve.deps import SettingsDep
from dsa_rag.rag_service.web import WEB_DIR

router = APIRouter(tags=["ui"], include_in_schema=False)

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_FILES = {p.name: (p.read_bytes(), _TYPES[p.suffix]) for p in WEB_DIR.iterdir() if p.suffix in _TYPES}
# no-cache: revalidated on each load, so an upgraded server never runs with yesterday's script
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


@router.get("/", response_class=HTMLResponse)
async def index():
    body, ctype = _FILES["index.html"]
    return Response(body, media_type=ctype, headers=_HEADERS)


@router.get("/ui/config.json")
async def config(settings: SettingsDep):
    return {"auth": bool(settings.api_keys), "model": settings.model_id,
            "max_upload_bytes": settings.upload_max_bytes, "max_files": settings.max_files_per_upload,
            "warm_on_upload": settings.warm_on_upload}


@router.get("/ui/{name}")
async def static_file(name: str):
    if name not in _FILES:
        raise NotFound(f"no such file: /ui/{name}")
    body, ctype = _FILES[name]
    return Response(body, media_type=ctype, headers=_HEADERS)
