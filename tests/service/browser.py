"""Helpers for the browser tests (test_ui.py): the system Chromium driven by Playwright, and
where screenshots go. The app itself is served by tests/net.py's `live_server`.

    with live_server(create_app(backend)) as url: page.goto(url)    # tests.net
    browser = launch_chromium(playwright)          # /usr/bin/chromium (or $CHROMIUM)

Playwright's own browser download needs the internet; these machines have Debian's `chromium`
package instead (`.ci/run` installs it), so Playwright is pointed at it with `executable_path`.
Screenshots go to $DSA_RAG_UI_SCREENSHOTS when set (`docs/ui` refreshes the README's images),
else to a temp dir: a test run must not rewrite tracked files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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


def screenshot_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("DSA_RAG_UI_SCREENSHOTS") or tmp_path / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d
