"""PDF parsing in sandbox processes: a hard per-document time budget and a memory cap.

    from dsa_rag.rag_service.parsing.sandbox import parse_pdf_isolated
    text, pages = parse_pdf_isolated("report.pdf", data, settings)   # same contract as pdf.parse_pdf

pypdf runs in pure Python: a crafted page can make `extract_text` run for minutes (or grow
memory) inside one call, where a between-pages deadline check never gets control back. So PDFs
are parsed in long-lived worker processes (`python -m dsa_rag.rag_service.parsing.sandbox`, started once,
`parse_workers` of them, shared by all threads of this process); the caller waits at most `parse_timeout_s`, then kills the worker
(a fresh one is spawned for the next document) and raises ParseTimeout. Each worker runs under
RLIMIT_AS = `parse_memory_bytes`: a decompression bomb that slips past pypdf's own caps ends in
MemoryError -> DocumentTooLarge, not in the service being OOM-killed. A worker that dies
(segfault, kill) gives CorruptDocument; the next document gets a new worker.

OCR of scanned pages (ocr.py) runs in the same worker after the text pass, with its own budget
`ocr_timeout_s`: the worker sends a {"phase": "ocr"} frame when it starts OCR, and the caller then
waits that long again (the text pass alone still gets only `parse_timeout_s`).

Protocol over the worker's stdin/stdout: length-prefixed frames, a JSON header then the raw
PDF bytes; the reply (after that optional phase frame) is JSON (text + page spans, or an error class name + message, re-raised
as the same `dsa_rag.rag_service.errors` class here). Nothing is pickled in either direction.

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_hostile.py`.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import queue
import select
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass

from dsa_rag.rag_service import errors
from dsa_rag.rag_service.parsing.pdf import parse_pdf
from dsa_rag.rag_service.schemas import PageSpan

log = logging.getLogger(__name__)
START_TIMEOUT_S = 120.0  # starting a worker (imports) is not part of a document's budget
_LEN = struct.Struct("<Q")


@dataclass(frozen=True)
class _Limits:  # what parse_pdf reads from the settings
    parse_timeout_s: float
    max_pages: int
    pdf_max_decompressed_bytes: int
    ocr_engine: str = "off"
    ocr_timeout_s: float = 0.0
    ocr_max_pages: int = 0


# ------------------------------------------------------------------ framing (no pickle either way)
def _write_frame(f, payload: bytes) -> None:
    f.write(_LEN.pack(len(payload)))
    f.write(payload)
    f.flush()


def _read_exact(f, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            raise EOFError("sandbox pipe closed")
        buf += chunk
    return bytes(buf)


def _read_frame(f) -> bytes:
    (n,) = _LEN.unpack(_read_exact(f, _LEN.size))
    return _read_exact(f, n)


# ------------------------------------------------------------------ the worker (child process)
def _serve(mem_bytes: int) -> None:
    import resource  # POSIX only, and only the worker needs it

    try:
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    except (ValueError, OSError):  # pragma: no cover - not permitted here: run without the cap
        pass
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the reply pipe
    _write_frame(out, b'{"ready": true}')
    while True:
        try:
            head = json.loads(_read_frame(inp))
            data = _read_frame(inp)
        except EOFError:
            return
        name = head["name"]
        try:
            text, pages = parse_pdf(name, data, _Limits(*head["limits"]),
                                    on_ocr=lambda: _write_frame(out, b'{"phase": "ocr"}'))
            reply = {"ok": True, "text": text, "pages": [(p.page, p.char_start, p.char_end, p.ocr) for p in pages]}
        except errors.RagError as e:
            reply = {"ok": False, "error": type(e).__name__, "message": e.message, "filename": e.filename}
        except MemoryError:
            reply = {"ok": False, "error": "DocumentTooLarge", "filename": name,
                     "message": f"parsing needed more than the {mem_bytes >> 20} MiB memory cap "
                                "(DSA_RAG_PARSE_MEMORY_BYTES); the PDF may be a decompression bomb"}
        except BaseException as e:  # noqa: BLE001 - anything else is a damaged file, never a crash
            reply = {"ok": False, "error": "CorruptDocument", "filename": name,
                     "message": f"the PDF could not be parsed ({type(e).__name__}: {e})"}
        _write_frame(out, json.dumps(reply, ensure_ascii=False).encode("utf-8", "surrogatepass"))


# ------------------------------------------------------------------ the caller's side
class _Sandbox:
    def __init__(self, mem_bytes: int):
        self.mem_bytes = mem_bytes
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsa_rag.rag_service.parsing.sandbox", str(self.mem_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        # Frames are read unbuffered: a buffered reader could pull the reply in together with the
        # OCR phase frame, and select() would then wait for bytes already read.
        self.rx = io.FileIO(self.proc.stdout.fileno(), "rb", closefd=False)
        if not self._wait(START_TIMEOUT_S):
            self.kill()
            raise errors.StorageError("the PDF parser process did not start; see the server log")
        _read_frame(self.rx)

    def _wait(self, timeout: float) -> bool:
        r, _, _ = select.select([self.proc.stdout], [], [], max(0.0, timeout))
        return bool(r)

    def kill(self) -> None:
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):  # pragma: no cover
                pass
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        self.proc = None

    def run(self, name: str, data: bytes, limits: _Limits) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.kill()
            self._start()
        try:
            head = {"name": name, "limits": [limits.parse_timeout_s, limits.max_pages,
                                             limits.pdf_max_decompressed_bytes, limits.ocr_engine,
                                             limits.ocr_timeout_s, limits.ocr_max_pages]}
            _write_frame(self.proc.stdin, json.dumps(head).encode("utf-8", "surrogatepass"))
            _write_frame(self.proc.stdin, data)
            if not self._wait(limits.parse_timeout_s):
                self.kill()
                raise errors.ParseTimeout(
                    f"text extraction did not finish within the {limits.parse_timeout_s:g} s budget "
                    "(DSA_RAG_PARSE_TIMEOUT_S): a page is too slow to extract or the PDF is very large; "
                    "split the PDF or raise the budget", filename=name)
            msg = json.loads(_read_frame(self.rx))
            if msg.get("phase") == "ocr":  # text pass done, scanned pages next: their own budget
                if not self._wait(limits.ocr_timeout_s):
                    self.kill()
                    raise errors.ParseTimeout(
                        f"OCR of the scanned pages did not finish within its {limits.ocr_timeout_s:g} s budget "
                        "(DSA_RAG_OCR_TIMEOUT_S); split the PDF or raise the budget", filename=name)
                msg = json.loads(_read_frame(self.rx))
            return msg
        except (EOFError, OSError, ValueError):
            code = self.proc.poll() if self.proc is not None else None
            self.kill()
            raise errors.CorruptDocument(
                f"the PDF parser process died on this file (exit code {code}); the file is malformed or "
                "needs more memory than DSA_RAG_PARSE_MEMORY_BYTES", filename=name) from None


class _Pool:
    def __init__(self, workers: int, mem_bytes: int):
        self.free: queue.Queue[_Sandbox] = queue.Queue()
        self.all = [_Sandbox(mem_bytes) for _ in range(workers)]
        for sb in self.all:
            self.free.put(sb)

    def run(self, name: str, data: bytes, limits: _Limits):
        sb = self.free.get()
        try:
            return sb.run(name, data, limits)
        finally:
            self.free.put(sb)

    def close(self) -> None:
        for sb in self.all:
            sb.kill()


_pools: dict[tuple[int, int], _Pool] = {}
_pools_lock = threading.Lock()


def _pool(workers: int, mem_bytes: int) -> _Pool:
    with _pools_lock:
        p = _pools.get((workers, mem_bytes))
        if p is None:
            p = _pools[(workers, mem_bytes)] = _Pool(workers, mem_bytes)
        return p


@atexit.register
def shutdown() -> None:
    """Kill every sandbox worker (also run at interpreter exit)."""
    with _pools_lock:
        for p in _pools.values():
            p.close()
        _pools.clear()


def parse_pdf_isolated(name: str, data: bytes, settings) -> tuple[str, list[PageSpan]]:
    """pdf.parse_pdf in a sandbox process (see the module docstring)."""
    limits = _Limits(float(settings.parse_timeout_s), int(settings.max_pages), int(settings.pdf_max_decompressed_bytes),
                     str(getattr(settings, "ocr_engine", "off")), float(getattr(settings, "ocr_timeout_s", 0.0)),
                     int(getattr(settings, "ocr_max_pages", 0)))
    msg = _pool(settings.parse_workers, settings.parse_memory_bytes).run(name, data, limits)
    if msg["ok"]:
        return msg["text"], [PageSpan(page=p, char_start=a, char_end=b, ocr=bool(o)) for p, a, b, o in msg["pages"]]
    message, filename = msg["message"], msg.get("filename")
    cls = getattr(errors, msg["error"], None)
    if not (isinstance(cls, type) and issubclass(cls, errors.DocumentError)):
        cls = errors.CorruptDocument
    raise cls(message, filename=filename)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
