"""The web interface in a real Chromium (Playwright, the system /usr/bin/chromium) against the live
app (uvicorn in a thread, in-process backend with the dsa-tiny engine, real Redis):
upload a PDF and see it listed, ask and watch the prefill progress and the streamed answer,
read a citation on the page it names, delete the document; bad files show their errors in
words; the API-key field when auth is on; a keyboard-only question on a phone-sized screen.

    .venv/bin/python -m pytest -q tests/service/test_ui.py
    DSA_RAG_UI_SCREENSHOTS=docs/ui .venv/bin/python -m pytest -q tests/service/test_ui.py   # refresh docs/ui/*.png

Skipped (with the reason) only when no Chromium binary is found; `.ci/run` installs Debian's.
The tiny model's answers are not checked for content; what the page shows is checked against
the API's facts (the cited text is on the page the citation names, the PDF's own text).
"""

from __future__ import annotations

import re
import time

import pytest

from dsa_rag.rag_service.ask import worker as worker_mod
from dsa_rag.rag_service.ask.local import LocalBackend
from dsa_rag.rag_service.ask.worker import PackWorker
from dsa_rag.rag_service.pipeline import RagPipeline
from dsa_rag.rag_service.serve.app import create_app
from tests.net import live_server
from tests.rag_service.pdfs import make_pdf
from tests.service.browser import chromium_path, launch_chromium, screenshot_dir

pytestmark = pytest.mark.skipif(chromium_path() is None,
                                reason="no Chromium binary (install Debian's `chromium`; .ci/run does)")

# dsa-tiny reads one planted fact per pack, in its training data's phrasing (model/training/data.py):
# the fact is on page 2, so the answer is 4471920 and its citation must say page 2.
PAGES = [
    "Annual report of the Valdor harbour authority.\nThe auditors mentioned that revenue slowed down.",
    "The harbour ships copper and grain every spring.\nNote: Valdor has 4471920 as its serial number.\n"
    "The copper comes from the northern mines.",
    "Page three lists the staff of the harbour office.\nThe office opens at eight in the morning.",
]
QUESTION, ANSWER = "What is the serial number of Valdor?", "4471920"
NOTES = b"# Notes\n\nThe lighthouse was rebuilt after a storm.\nNote: Marella has 5582013 as its flight number.\n"
WIDE, NARROW = {"width": 1360, "height": 900}, {"width": 390, "height": 844}


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # here: collecting the module (and skipping) needs no playwright

    with sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.fixture
def serve(make_settings, engine):
    """serve(**settings) -> the URL of a fresh live app (own Redis prefix and data dir)."""
    stack = []

    def start(**overrides) -> str:
        # 16 answer tokens: the 7-digit answers need ~8, and a cut-off answer is an abstention
        s = make_settings(**{"default_max_tokens": 16, **overrides})
        rag = RagPipeline(s)
        backend = LocalBackend(s, rag=rag, worker=PackWorker(rag, engine, max_new_tokens=s.max_new_tokens))
        cm = live_server(create_app(backend))
        url = cm.__enter__()
        stack.append((cm, rag))
        return url

    yield start
    for cm, rag in reversed(stack):
        cm.__exit__(None, None, None)
        rag.close()


@pytest.fixture
def shots(tmp_path):
    return screenshot_dir(tmp_path)


def _paced(fn, pause: float):
    def slow(*a, **kw):
        time.sleep(pause)
        return fn(*a, **kw)

    return slow


def _upload(page, *files):
    page.set_input_files("#file-input", [{"name": n, "mimeType": t, "buffer": b} for n, t, b in files])


def test_upload_ask_cite_delete(browser, serve, shots, engine, monkeypatch):
    # Prefill in 64-token chunks, each held 0.15 s, so the progress bar is on screen long enough
    # to be seen and photographed (a real cold pack takes minutes; this one would take 1 s), and
    # each decode step 0.1 s, so the tokens reach the page one by one instead of in one packet.
    monkeypatch.setattr(engine.engine, "prefill_chunk", 64)
    monkeypatch.setattr(worker_mod, "PROGRESS_POLL_S", 0.05)
    for name, pause in (("_forward_chunk", 0.15), ("_decode", 0.1)):
        monkeypatch.setattr(engine.engine, name, _paced(getattr(engine.engine, name), pause))
    url = serve()
    page = browser.new_page(viewport=WIDE)
    page.goto(url)
    page.wait_for_selector("#library-empty:visible")
    assert page.inner_text("#model-name") == "dsa-tiny"
    assert page.is_hidden("#key-form")  # auth is off
    page.screenshot(path=str(shots / "empty.png"))

    _upload(page, ("valdor-report.pdf", "application/pdf", make_pdf(PAGES)),
            ("notes.md", "text/markdown", NOTES))
    doc = page.locator(".doc", has_text="valdor-report.pdf")
    doc.wait_for()
    page.locator(".doc", has_text="notes.md").wait_for()
    assert "PDF · 3 pages" in doc.inner_text() and "tokens" in doc.inner_text()
    assert "not read yet" in doc.locator(".pack").inner_text()  # cold: the first question reads it
    page.wait_for_selector(".upload", state="detached", timeout=15_000)  # the upload rows clear themselves
    page.screenshot(path=str(shots / "library.png"))

    # count what the page shows while the answer streams in
    page.evaluate("""() => {
        window.__seen = {progress: 0, streamed: 0};
        new MutationObserver(() => window.__seen.progress++).observe(
            document.getElementById('progress-label'), {childList: true, characterData: true, subtree: true});
        // answer text on screen while the final event (stats) has not come yet: streamed tokens
        new MutationObserver(() => {
            if (document.getElementById('answer').textContent && document.getElementById('stats').hidden)
                window.__seen.streamed++;
        }).observe(document.getElementById('answer'), {childList: true, characterData: true, subtree: true});
    }""")
    page.fill("#question", QUESTION)
    page.click("#ask-btn")
    page.wait_for_function("() => parseFloat(document.getElementById('progress-bar').getAttribute('aria-valuenow')) >= 25",
                           timeout=30_000)
    label = page.inner_text("#progress-label")
    assert re.search(r"Reading the documents once: [\d,]+ of [\d,]+ tokens \(\d+(\.\d)?%\)", label), label
    assert "reading now" in doc.locator(".pack").inner_text()  # the library shows it too
    page.screenshot(path=str(shots / "ask-progress.png"))

    page.wait_for_selector("#stats:visible", timeout=60_000)
    page.wait_for_selector(".citation .context mark")
    seen = page.evaluate("window.__seen")
    assert seen["progress"] >= 3, seen  # the bar moved several times before the answer
    assert ANSWER in page.inner_text("#answer")
    assert seen["streamed"] >= 1, seen  # tokens showed before the final answer event
    stats = page.inner_text("#stats")
    assert "Time to first token" in stats and "read now (first question)" in stats

    # every citation names a page whose text holds the highlighted span (the PDF's own page text)
    cards = page.locator(".citation")
    assert cards.count() >= 1
    first = page.locator(".citation", has_text="valdor-report.pdf").first
    assert first.get_attribute("data-page") == "2" and ANSWER in first.locator("mark").inner_text()
    for i in range(cards.count()):
        card = cards.nth(i)
        if "valdor-report.pdf" not in card.inner_text():
            continue
        n = int(card.get_attribute("data-page"))
        assert f"page {n}" in card.locator(".cite-head").inner_text()
        span = _norm(card.locator(".context mark").inner_text())
        assert span and span in _norm(PAGES[n - 1]), (n, span)
        assert _norm(card.locator(".context").inner_text()) != span  # shown inside its surrounding text
    page.wait_for_timeout(300)  # let the last context fetches land before the picture
    page.screenshot(path=str(shots / "answer.png"))

    # the second question reuses the cache: no progress, and the stats say so
    page.fill("#question", "Who opens the harbour office?")
    page.press("#question", "Enter")
    page.wait_for_selector("#stats:visible", timeout=60_000)
    assert "in memory" in page.inner_text("#stats") and page.is_hidden("#progress")
    assert "ready (in memory)" in doc.locator(".pack").inner_text()

    # delete: two presses (a stray Enter never deletes)
    delete = doc.get_by_role("button", name="Delete valdor-report.pdf")
    delete.click()
    assert delete.inner_text() == "Confirm delete"
    delete.click()
    page.locator(".doc", has_text="valdor-report.pdf").wait_for(state="detached")
    assert page.locator(".doc").count() == 1  # notes.md stays
    page.close()


def test_bad_files_show_their_errors(browser, serve, shots):
    page = browser.new_page(viewport=WIDE)
    page.goto(serve())
    page.wait_for_selector("#library-empty:visible")
    _upload(page, ("locked.pdf", "application/pdf", make_pdf(["secret"], password="pw")),
            ("scan.pdf", "application/pdf", make_pdf([None, None], image_pages=(0, 1))))
    # the third by drag and drop onto the drop zone (a DataTransfer, as a file manager would send)
    page.evaluate("""() => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array([0, 1, 2, 0, 1, 2])], 'data.bin', {type: 'application/octet-stream'}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }""")
    failed = page.locator(".upload.failed")
    failed.nth(2).wait_for(timeout=30_000)
    text = {n: page.locator(".upload", has_text=n).inner_text() for n in ("locked.pdf", "scan.pdf", "data.bin")}
    assert "Encrypted PDF." in text["locked.pdf"] and "locked.pdf" in text["locked.pdf"].split("Encrypted PDF.")[1]
    assert "Scanned pages without a text layer." in text["scan.pdf"]
    assert "Not a PDF, text or Markdown file." in text["data.bin"]
    assert page.locator(".doc").count() == 0 and page.is_visible("#library-empty")
    page.screenshot(path=str(shots / "upload-errors.png"))
    page.get_by_role("button", name="Dismiss").first.click()
    assert page.locator(".upload.failed").count() == 2
    page.close()


def test_api_key_field_when_auth_is_on(browser, serve, shots):
    url = serve(api_keys={"ui-key-tenant-a": "tenantA"})
    page = browser.new_page(viewport=WIDE)
    page.goto(url)
    page.wait_for_selector("#key-form:visible")
    assert "Enter your API key" in page.inner_text("#key-status")
    assert "Enter your API key above" in page.inner_text("#library-empty")  # not "no documents"
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.fill("#api-key", "wrong-key")
    page.press("#api-key", "Enter")
    page.wait_for_function("() => document.getElementById('key-status').textContent.includes('Key refused')")
    assert "invalid API key" in page.inner_text("#key-status")
    page.screenshot(path=str(shots / "api-key.png"))

    page.fill("#api-key", "ui-key-tenant-a")
    page.click("#key-form button")
    page.wait_for_function("() => document.getElementById('key-status').textContent === 'Key accepted.'")
    page.check("#warm")  # read it right away: the library follows the background prefill to "ready"
    _upload(page, ("notes.md", "text/markdown", NOTES))
    page.locator(".doc", has_text="notes.md").locator(".pack.memory").wait_for(timeout=30_000)
    # the key is kept for this tab only; a reload still has it
    page.reload()
    page.locator(".doc", has_text="notes.md").wait_for()
    page.close()


def test_keyboard_only_on_a_narrow_screen(browser, serve, shots):
    page = browser.new_page(viewport=NARROW)
    page.goto(serve())
    page.wait_for_selector("#library-empty:visible")
    _upload(page, ("notes.md", "text/markdown", NOTES))
    page.locator(".doc", has_text="notes.md").wait_for()
    # Tab from the top: the skip link first, and it leads to the question
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to the question"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "question"
    page.keyboard.type("What is Marella's flight number?")
    page.keyboard.press("Enter")
    page.wait_for_selector("#stats:visible", timeout=60_000)
    page.wait_for_selector(".citation mark")
    assert "5582013" in page.inner_text("#answer")
    # the file chooser is reachable by keyboard (a focusable input inside the drop zone)
    page.focus("#file-input")
    assert page.evaluate("getComputedStyle(document.getElementById('drop')).outlineStyle") != "none"
    # readable: nothing wider than the screen, the three panels stacked
    assert page.evaluate("document.documentElement.scrollWidth") <= NARROW["width"]
    boxes = [page.locator(s).bounding_box() for s in (".library", ".ask", ".cites")]
    assert boxes[0]["y"] < boxes[1]["y"] < boxes[2]["y"] and all(b["width"] <= NARROW["width"] for b in boxes)
    page.evaluate("document.activeElement.blur()")  # no focus ring in the picture
    page.screenshot(path=str(shots / "narrow.png"), full_page=True)
    page.close()
