"""The RAG core as one object a route, a Ray deployment, a notebook or a test can call.

    from dsa_rag.rag_service.pipeline import RagPipeline
    from dsa_rag.rag_service.settings import RagSettings
    with RagPipeline(RagSettings(data_dir="/tmp/rag")) as rag:      # embedded Redis under data_dir
        doc = rag.ingest("report.pdf", open("report.pdf", "rb").read())
        sel = rag.select_packs("What was the 2023 revenue?")         # ranked packs + best chunks
        ids, layout = rag.pack_prompt(sel[0].pack_id)                # prompt prefix + citation map

Ingest = parse (ingest.py) -> token count and limits -> chunks (chunk.py) -> pack plan
(pack.py) -> blobs (raw bytes + extracted text, content-addressed, durable) -> one Redis
transaction that writes the document, its chunks, its blob references and its pack
assignment together. The document id is derived from (tenant, sha256 of the bytes), so the
same upload twice returns the same document without parsing again, even when two processes
race. Delete removes the document from Redis, rebuilds its packs under new ids, drops the KV
cache entries of the old packs and deletes blobs nobody references any more.

Blob files and their references are guarded by a short Redis lock per digest, so a delete
never unlinks a blob that a concurrent upload of the same bytes is committing.

Durability and faults: a document is acknowledged (ingest returns) only after its blobs are
fsync'ed (blobstore.atomic_write) and its metadata transaction was answered by Redis (which
runs with `appendfsync always` in embedded mode). Redis unreachable (restart) during an
upload: the Redis part is retried for `redis_retry_s` (idempotent: the document id is derived
from the bytes, the lock is re-entrant for the same upload), then StorageError (503) and
nothing is acknowledged. No space left on the disk: DiskFull (507), the blobs this upload wrote
are removed, no metadata is written.

Answering (the engine over `pack_prompt`, fanned out over `select_packs`) is the ask path:
`dsa_rag.rag_service.ask` (LocalBackend + ask_sync in a script). This module imports neither
FastAPI nor Ray. Tests: `.venv/bin/python -m pytest -q tests/rag_service`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext

import redis

from dsa_rag.model.tokenizer import doc_cost, load_tokenizer
from dsa_rag.rag_service.stores.blobstore import BlobStore
from dsa_rag.rag_service.parsing.chunk import Chunk, TextTokens, chunk_text
from dsa_rag.rag_service.errors import (
    BadRequest, ConflictError, DocumentTooLarge, NotFound, OtherTenant, RagError, StorageError,
)
from dsa_rag.rag_service.parsing.ingest import clean_name, parse_document
from dsa_rag.rag_service.stores.kvstore import KVStore
from dsa_rag.rag_service.packing.layout import PackLayout, build_layout
from dsa_rag.rag_service.packing.pack import PackStore, plan_members
from dsa_rag.rag_service.stores.redis_store import Keys, RedisHandle, open_redis
from dsa_rag.rag_service.schemas import (
    Citation, DocumentInfo, IngestResult, PackInfo, PackSelection, PageSpan, ScoredChunk,
)
from dsa_rag.rag_service.packing.search import Bm25Index, rank_packs
from dsa_rag.rag_service.settings import RagSettings

log = logging.getLogger(__name__)

_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
SNIPPET_CHARS = 300
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)  # BusyLoadingError (AOF replay) is a ConnectionError
LOCK_TTL_MS, LOCK_WAIT_S = 120_000, 60.0
# Re-entrant for the same token: an upload retried after a lost reply gets its own lock back.
_LOCK_ACQUIRE = """
local v = redis.call('get', KEYS[1])
if v == false or v == ARGV[1] then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""
_LOCK_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def document_id(tenant: str, sha256: str) -> str:
    return "doc_" + hashlib.sha256(f"{tenant}\0{sha256}".encode()).hexdigest()[:24]


class _TenantIndex:
    """BM25 index of one tenant plus what selection needs per document, at a corpus version."""

    def __init__(self, k1: float, b: float):
        self.version: str | None = None
        self.bm25 = Bm25Index(k1, b)
        self.spans: dict[str, list[tuple[int, int]]] = {}
        self.pages: dict[str, list[int | None]] = {}


class RagPipeline:
    def __init__(self, settings: RagSettings | None = None, *, tokenizer=None, redis: RedisHandle | None = None):
        self.settings = s = settings or RagSettings()
        self.tok = tokenizer or load_tokenizer(s.tokenizer_dir)
        self._own_redis = redis is None
        self.redis = redis or open_redis(s)
        self.r = self.redis.client
        self.keys = Keys(s.redis_prefix)
        self.blobs = BlobStore(s.blob_dir)
        self.packs = PackStore(self.r, self.keys, s)
        self.kv = KVStore(self.r, self.keys, s.kv_dir, s.kv_cache_max_bytes)
        self._indexes: dict[str, _TenantIndex] = {}
        self._index_lock = threading.Lock()
        self._lock_acquire = self.r.register_script(_LOCK_ACQUIRE)
        self._lock_release = self.r.register_script(_LOCK_RELEASE)

    def close(self) -> None:
        """Close Redis (stopping the embedded server when this was its last client)."""
        if self._own_redis:
            self.redis.close()

    def __enter__(self) -> "RagPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- ingest ----------------------------------------------------------------------------------
    def ingest(self, name: str, data: bytes, tenant: str = "default") -> DocumentInfo:
        """Parse, chunk, store and pack one document; idempotent on identical bytes. Raises a
        DocumentError subclass (with an HTTP status hint) for bad input."""
        _check_tenant(tenant)
        name = clean_name(name)
        s = self.settings
        digest = hashlib.sha256(data).hexdigest()
        doc_id = document_id(tenant, digest)
        existing = self._retry_redis(lambda: self.r.hgetall(self.keys.doc(doc_id)), name)
        if existing:
            return _doc_from_hash(existing)

        parsed = parse_document(name, data, s)
        tt = TextTokens(self.tok, parsed.text)
        if tt.total > s.max_tokens_per_document:
            raise DocumentTooLarge(
                f"{tt.total} tokens of text is over the limit of {s.max_tokens_per_document} "
                "(DSA_RAG_MAX_TOKENS_PER_DOCUMENT); split the document",
                filename=name,
            )
        chunks = chunk_text(tt, parsed.pages, s.chunk_tokens, s.chunk_overlap)
        plans = plan_members(self.tok, tt, name, s.pack_capacity, s.pack_overlap)
        text_bytes = parsed.text.encode("utf-8")
        text_digest = hashlib.sha256(text_bytes).hexdigest()
        now = time.time()
        record = {
            "id": doc_id, "name": name, "tenant": tenant, "media_type": parsed.media_type,
            "sha256": digest, "text_sha256": text_digest, "size_bytes": len(data),
            "chars": len(parsed.text), "tokens": doc_cost(self.tok, name, tt.total),
            "pages": len(parsed.pages), "chunks": len(chunks), "created": repr(now),
            "page_spans": json.dumps([[p.page, p.char_start, p.char_end] for p in parsed.pages]),
            "ocr_pages": json.dumps([p.page for p in parsed.pages if p.ocr]),
        }
        doc_key = self.keys.doc(doc_id)

        def check(pipe):
            return pipe.hgetall(doc_key) or None

        def write(pipe, pack_ids):
            pipe.hset(doc_key, mapping={**record, "packs": json.dumps(pack_ids)})
            pipe.set(self.keys.doc_chunks(doc_id), json.dumps([c.to_list() for c in chunks]))
            pipe.zadd(self.keys.docs(tenant), {doc_id: now})
            pipe.sadd(self.keys.blob_refs(digest), doc_id)
            pipe.sadd(self.keys.blob_refs(text_digest), doc_id)

        token = uuid.uuid4().hex  # one per upload, kept across retries (re-entrant blob locks)

        def commit():
            with self._blob_locks({digest, text_digest}, token):
                try:
                    self.blobs.put(data)
                    self.blobs.put(text_bytes)
                    return self.packs.add_document(
                        tenant, doc_id, name, plans, check=check, write=write, watch=(doc_key,)
                    )
                except BaseException:  # not committed (or committed with the reply lost: refs kept)
                    try:
                        self._collect_blobs({digest, text_digest}, locked=True)
                    except Exception as e:  # noqa: BLE001 - Redis down: orphan blobs are harmless
                        log.warning("could not clean up the blobs of %s (%s); they are unreferenced", name, e)
                    raise

        added, result = self._retry_redis(commit, name)
        if not added:  # a concurrent upload of the same bytes (or this one, reply lost) committed first
            return _doc_from_hash(result)
        return _doc_from_hash({**record, "packs": json.dumps(result)})

    def _retry_redis(self, fn, name: str):
        """fn() retried while Redis is unreachable, for `redis_retry_s`; then StorageError (503)."""
        deadline = time.monotonic() + self.settings.redis_retry_s
        delay = 0.05
        while True:
            try:
                return fn()
            except REDIS_DOWN as e:
                if time.monotonic() + delay > deadline:
                    raise StorageError(
                        f"Redis is unreachable ({type(e).__name__}: {e}); the upload was not stored, retry it",
                        filename=name,
                    ) from e
                log.warning("Redis unreachable during the upload of %s (%s); retrying", name, e)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def ingest_many(self, files: list[tuple[str, bytes]], tenant: str = "default") -> list[IngestResult]:
        """Batch form: one result per file, in order; a bad file does not fail the others."""
        if not files:
            raise BadRequest("no files given; send at least one (name, bytes) pair")
        out = []
        for name, data in files:
            try:
                out.append(IngestResult(name=name, ok=True, document=self.ingest(name, data, tenant)))
            except RagError as e:
                out.append(IngestResult(name=name, ok=False, error=e.code, message=str(e), status_code=e.status_code))
            except Exception as e:  # a bug must not sink the whole batch; it is logged loudly
                log.exception("ingest of %r failed unexpectedly", name)
                out.append(IngestResult(
                    name=name, ok=False, error="internal_error", status_code=500,
                    message=f"{name}: internal error ({type(e).__name__}: {e}); please report it",
                ))
        return out

    # --- documents -------------------------------------------------------------------------------
    def get_document(self, doc_id: str, tenant: str | None = None) -> DocumentInfo:
        h = self.r.hgetall(self.keys.doc(doc_id))
        missing = f"document {doc_id} not found; list documents to see the ids"
        if not h:
            raise NotFound(missing)
        if tenant is not None and h["tenant"] != tenant:
            raise OtherTenant(f"document {doc_id} belongs to another tenant; this API key cannot access it",
                              not_found=missing)
        return _doc_from_hash(h)

    def list_documents(self, tenant: str = "default") -> list[DocumentInfo]:
        """All documents of a tenant, oldest first (one round trip for the metadata)."""
        with self.r.pipeline(transaction=False) as p:
            for doc_id in self.r.zrange(self.keys.docs(tenant), 0, -1):
                p.hgetall(self.keys.doc(doc_id))
            return [_doc_from_hash(h) for h in p.execute() if h]

    def document_text(self, doc_id: str) -> str:
        info = self.get_document(doc_id)
        return self.blobs.get(info.text_sha256).decode("utf-8")

    def document_pages(self, doc_id: str) -> list[PageSpan]:
        raw, ocr = self.r.hmget(self.keys.doc(doc_id), ["page_spans", "ocr_pages"])
        if raw is None:
            raise NotFound(f"document {doc_id} not found")
        ocr = set(json.loads(ocr or "[]"))
        return [PageSpan(page=p, char_start=a, char_end=b, ocr=p in ocr) for p, a, b in json.loads(raw)]

    def document_chunks(self, doc_id: str) -> list[Chunk]:
        raw = self.r.get(self.keys.doc_chunks(doc_id))
        if raw is None:
            raise NotFound(f"chunks of document {doc_id} not found")
        return [Chunk.from_list(c) for c in json.loads(raw)]

    def delete_document(self, doc_id: str, tenant: str | None = None) -> dict:
        """Remove the document everywhere. Returns {"removed_packs": [...], "rebuilt_packs": [...]}."""
        info = self.get_document(doc_id, tenant)
        k = self.keys

        def write(pipe, doc):
            pipe.delete(k.doc(doc_id), k.doc_chunks(doc_id))
            pipe.zrem(k.docs(info.tenant), doc_id)
            pipe.srem(k.blob_refs(doc["sha256"]), doc_id)
            pipe.srem(k.blob_refs(doc["text_sha256"]), doc_id)

        removed, rebuilt = self.packs.remove_document(info.tenant, doc_id, k.doc(doc_id), write=write)
        for pid in removed:
            self.kv.invalidate_pack(pid)
        self._collect_blobs({info.sha256, info.text_sha256})
        return {"removed_packs": removed, "rebuilt_packs": rebuilt}

    def _collect_blobs(self, digests: set[str], locked: bool = False) -> None:
        """Delete the blobs among `digests` that no document references (under their locks)."""
        with nullcontext() if locked else self._blob_locks(digests, uuid.uuid4().hex):
            for d in digests:
                if not self.r.scard(self.keys.blob_refs(d)):
                    self.blobs.delete(d)

    # --- packs -----------------------------------------------------------------------------------
    def list_packs(self, tenant: str = "default") -> list[PackInfo]:
        return self.packs.list(tenant)

    def get_pack(self, pack_id: str) -> PackInfo:
        return self.packs.get(pack_id)

    def pack_prompt(self, pack_id: str) -> tuple[list[int], PackLayout]:
        """The pack's prompt prefix token ids (what its KV cache holds) and its layout."""
        pack = self.packs.get(pack_id)
        members, texts = [], {}
        for m in pack.documents:
            if m.document_id not in texts:
                texts[m.document_id] = (self.document_text(m.document_id), self.document_pages(m.document_id))
            text, pages = texts[m.document_id]
            members.append((m.document_id, m.name, m.char_start, m.char_end, text, pages))
        ids = self.tok.prompt_ids([(name, text[cs:ce]) for _, name, cs, ce, text, _ in members])
        if len(ids) != pack.tokens:
            raise StorageError(
                f"pack {pack_id} should be {pack.tokens} tokens but its prompt has {len(ids)}; the "
                "tokenizer differs from the one used at ingest (check DSA_RAG_TOKENIZER_DIR)"
            )
        return ids, build_layout(self.tok, pack.id, pack.version, members, len(ids))

    def cache_key(self, pack_id: str, model_fingerprint: str) -> str:
        """The prefix-KV cache key of a pack for a model (see kvstore.KVStore.key_for)."""
        ids, _ = self.pack_prompt(pack_id)
        return self.kv.key_for(model_fingerprint, self.packs.get(pack_id).tenant, ids)

    # --- question-time selection -----------------------------------------------------------------
    def select_packs(
        self, question: str, document_ids: list[str] | None = None, tenant: str = "default"
    ) -> list[PackSelection]:
        """Packs to answer `question` from, best first, each with its best chunks. Every pack
        when there are at most `fanout_max_packs`; else the best by BM25 over chunks.
        `document_ids` restricts the search to those documents (and the packs holding them)."""
        _check_tenant(tenant)
        s = self.settings
        idx = self._sync_index(tenant)
        if document_ids is not None:
            wanted = set(document_ids)
            infos = [self.get_document(d, tenant) for d in sorted(wanted)]
            candidates = list(dict.fromkeys(p for i in infos for p in i.packs))
        else:
            wanted = None
            candidates = self.r.zrange(self.keys.packs(tenant), 0, -1)
        doc_windows: dict[str, list[tuple[str, int, int]]] = {}
        names: dict[str, str] = {}
        packs = self.packs.get_many(candidates)  # a pack rebuilt since we listed it is skipped
        for pack in packs:
            for m in pack.documents:
                doc_windows.setdefault(m.document_id, []).append((pack.id, m.char_start, m.char_end))
                names[m.document_id] = m.name
        candidates = [p.id for p in packs]
        with self._index_lock:
            hits = idx.bm25.search(question, wanted)
            spans = {d: idx.spans[d] for _, d, _ in hits}
            pages = {d: idx.pages[d] for _, d, _ in hits}
        ranked = rank_packs(hits, spans, doc_windows, candidates, s.fanout_max_packs, s.select_top_chunks)
        texts: dict[str, str] = {}
        out = []
        for pid, score, best in ranked:
            chunks = []
            for sc, d, c in best:
                if d not in texts:
                    try:
                        texts[d] = self.document_text(d)
                    except NotFound:
                        continue
                cs, ce = spans[d][c]
                chunks.append(ScoredChunk(score=sc, citation=Citation(
                    document_id=d, name=names.get(d, d), page=pages[d][c], char_start=cs, char_end=ce,
                    snippet=texts[d][cs:ce][:SNIPPET_CHARS],
                )))
            out.append(PackSelection(pack_id=pid, score=score, chunks=chunks))
        return out

    def _sync_index(self, tenant: str) -> _TenantIndex:
        """Bring the tenant's in-memory BM25 index up to the corpus version in Redis."""
        version = self.r.get(self.keys.corpus_version(tenant)) or "0"
        with self._index_lock:
            idx = self._indexes.setdefault(tenant, _TenantIndex(self.settings.bm25_k1, self.settings.bm25_b))
            if idx.version == version:
                return idx
            current = set(self.r.zrange(self.keys.docs(tenant), 0, -1))
            for gone in idx.bm25.doc_ids - current:
                idx.bm25.remove(gone)
                idx.spans.pop(gone, None)
                idx.pages.pop(gone, None)
            for d in current - idx.bm25.doc_ids:
                try:
                    text = self.document_text(d)
                    chunks = self.document_chunks(d)
                except NotFound:  # deleted meanwhile
                    continue
                idx.bm25.add(d, [text[c.char_start:c.char_end] for c in chunks])
                idx.spans[d] = [(c.char_start, c.char_end) for c in chunks]
                idx.pages[d] = [c.page for c in chunks]
            idx.version = version
            return idx

    # --- helpers ---------------------------------------------------------------------------------
    @contextmanager
    def _blob_locks(self, digests: set[str], token: str):
        """Redis locks on the digests (fixed order: no deadlock between two uploads), owned by
        `token`; re-acquiring with the same token succeeds (a retried upload)."""
        held = []
        try:
            for d in sorted(digests):
                key = self.keys.blob_lock(d)
                deadline = time.monotonic() + LOCK_WAIT_S
                while not self._lock_acquire(keys=[key], args=[token, LOCK_TTL_MS]):
                    if time.monotonic() > deadline:
                        raise ConflictError(f"blob {d[:12]} is locked by another upload or delete for over "
                                            f"{LOCK_WAIT_S:g} s; retry")
                    time.sleep(0.02)
                held.append(key)
            yield
        finally:
            for key in reversed(held):
                try:
                    self._retry_redis(lambda k=key: self._lock_release(keys=[k], args=[token]), "blob lock")
                except StorageError:  # expires after LOCK_TTL_MS; a retry with `token` re-takes it
                    log.warning("could not release %s (Redis unreachable)", key)


def _check_tenant(tenant: str) -> None:
    if not _TENANT.match(tenant or ""):
        raise BadRequest(f"tenant {tenant!r} is not valid: use 1-128 letters, digits, '_', '.', '-'")


def _doc_from_hash(h: dict) -> DocumentInfo:
    return DocumentInfo(
        id=h["id"], name=h["name"], tenant=h["tenant"], media_type=h["media_type"], sha256=h["sha256"],
        text_sha256=h["text_sha256"], size_bytes=int(h["size_bytes"]), chars=int(h["chars"]),
        tokens=int(h["tokens"]), pages=int(h["pages"]), chunks=int(h["chunks"]),
        created=float(h["created"]), packs=json.loads(h.get("packs") or "[]"),
        ocr_pages=json.loads(h.get("ocr_pages") or "[]"),
    )
