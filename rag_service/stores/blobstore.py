"""Content-addressed blob store on a local (or shared) filesystem, with atomic, durable writes.

    from dsa_rag.rag_service.stores.blobstore import BlobStore
    store = BlobStore("/srv/rag/blobs")
    digest = store.put(b"raw bytes")          # sha256 hex; a second put of the same bytes is a no-op
    assert store.get(digest) == b"raw bytes"

Layout: `<root>/<sha[:2]>/<sha>`. A write goes to a unique temp file in the same directory,
is fsync'ed, `os.replace`d onto its final name and the directory is fsync'ed: once `put`
returns, the blob survives a crash, and a reader never sees half a file. `atomic_write` is the
same recipe for files that are not content-addressed (the KV cache's safetensors files).
No space left (ENOSPC, EDQUOT, EFBIG) raises DiskFull (507) and leaves no temp file behind;
any other OSError is a StorageError (503). Blobs are plain bytes (and the KV cache
safetensors): nothing read back from disk is ever unpickled.

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_storage.py`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import uuid
from pathlib import Path
from typing import Callable

from dsa_rag.rag_service.errors import DiskFull, NotFound, StorageError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def fsync_dir(path: Path) -> None:
    """Make a rename/unlink inside `path` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A unique sibling name (same filesystem, so os.replace is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp_path)` fills a temp file; it is then fsync'ed and atomically renamed to `path`."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        if not path.parent.exists():  # a new fan-out directory must itself survive a crash
            path.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(path.parent.parent)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise DiskFull(f"no space left to write {path.name} under {path.parent.parent} ({e.strerror}); "
                           "free disk space (or raise the quota) and retry; nothing was stored") from e
        raise StorageError(f"could not write {path}: {e}; check free disk space and permissions") from e
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # pragma: no cover
            pass
    fsync_dir(path.parent)


def write_file(tmp: Path, data: bytes) -> None:
    """The one place blob bytes hit the disk (tests inject ENOSPC here)."""
    with open(tmp, "wb") as f:
        f.write(data)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: write_file(tmp, data))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """sha256-addressed immutable blobs under `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store `data`; returns its sha256. Durable on return. Existing blobs are not rewritten
        unless their size is wrong (a torn file from a crash on a filesystem without atomic
        rename would be repaired here)."""
        digest = sha256_hex(data)
        p = self.path(digest)
        try:
            if p.exists() and p.stat().st_size == len(data):
                return digest
        except OSError:
            pass
        atomic_write_bytes(p, data)
        return digest

    def get(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(
                f"blob {digest} is missing from {self.root}; the document must be uploaded again"
            ) from None
        except OSError as e:
            raise StorageError(f"could not read blob {digest} under {self.root}: {e}") from e

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def delete(self, digest: str) -> bool:
        p = self.path(digest)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(p.parent)
        return True

    def digests(self) -> list[str]:
        """Every stored digest (for audits and tests; temp files are skipped)."""
        out = []
        for sub in sorted(self.root.iterdir()) if self.root.exists() else []:
            if sub.is_dir() and len(sub.name) == 2:
                out += [p.name for p in sorted(sub.iterdir()) if not p.name.startswith(".")]
        return out
