"""Helpers for the browser tests (test_ui.py): the real app served by uvicorn on a free loopback
port in a thread (so a real Chromium can load it), and the system Chromium driven by Playwright.

    with live_server(create_app(backend)) as url: page.goto(url)
    browser = launch_chromium(playwright)          # /usr/bin/chromium (or $CHROMIUM)

Playwright's own browser download needs the internet; these machines have Debian's `chromium`
package instead (`.ci/run` installs it), so Playwright is pointed at it with `executable_path`.
Screenshots go to $DSA_RAG_UI_SCREENSHOTS when set (`docs/ui` refreshes the README's images),
else to a temp dir: a test run must not rewrite tracked files.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn


def chromium_path() -> str | None:
    """The Chromium binary to drive: $CHROMIUM, else the first of chromium / chromium-browser on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def launch_chromium(playwright):
    # --no-sandbox: CI runs as root in a container, where Chromium's sandbox cannot start.
    return playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app):
    """Serve `app` (lifespan included) on 127.0.0.1:<free port> until the block ends; yields the URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="ui-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def screenshot_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("DSA_RAG_UI_SCREENSHOTS") or tmp_path / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d
