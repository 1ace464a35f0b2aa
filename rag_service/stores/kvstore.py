"""Prefix-KV cache store: safetensors files on disk, metadata + LRU + counters in Redis.

    kv = KVStore(redis_client, Keys("rag"), kv_dir, max_bytes=32 << 30)
    key = kv.key_for(model_fingerprint, tenant, prefix_token_ids)
    kv.put(key, engine_snapshot_tensors, {"layers": "4"}, pack_id=pid, model=fp, tokens=n)
    hit = kv.get(key)          # KVEntry(tensors, metadata, info) or None -> prefill instead
    kv.stats()                 # {"hits":..., "misses":..., "stores":..., "evictions":..., "bytes":...}

Key = sha256(model fingerprint, tenant, token ids of the pack prefix): a rebuilt pack has other
token ids, a new model another fingerprint, so a stale entry can never be returned for them.

Files: `<kv_dir>/<key[:2]>/<key>.<nonce>.safetensors`, written to a temp file, fsync'ed and
renamed (blobstore.atomic_write). Each writer uses its own nonce, then commits the metadata
with a Lua script that sets it only if the key has no entry yet (SET NX semantics, plus LRU,
byte total and counters in the same atomic step); the loser deletes its own file. So two
workers storing the same key leave exactly one valid entry and never clobber a file a reader
has open.

Redis per entry (hash `<p>:kv:<key>`): location (relative to kv_dir), tokens, bytes, pack_id,
model, created, last_use, hits. `<p>:kv:lru` (zset, last use) drives eviction when the byte
total exceeds the budget: oldest first, never the entry just stored. Removal is one Lua script
too, and only the caller that actually removed the metadata unlinks the file. Metadata whose
file is gone or unreadable is removed and reported as a miss, so the caller re-prefills.

Lua scripts touch the per-pack index key by a computed name, so this runs on standalone Redis
(embedded or external), not Redis Cluster. Tests: `.venv/bin/python -m pytest -q
tests/rag_service/test_kvstore.py`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis

from dsa_rag.rag_service.stores.blobstore import atomic_write, fsync_dir
from dsa_rag.rag_service.stores.redis_store import Keys

log = logging.getLogger(__name__)

COUNTERS = ("hits", "misses", "stores", "duplicates", "rejected", "evictions", "stale", "invalidations")

# KEYS: entry, lru, packset, bytes, stats   ARGV: key, now, nbytes, field1, value1, ...
_COMMIT = """
if redis.call('exists', KEYS[1]) == 1 then
  redis.call('hincrby', KEYS[5], 'duplicates', 1)
  return 0
end
for i = 4, #ARGV, 2 do redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('zadd', KEYS[2], ARGV[2], ARGV[1])
redis.call('sadd', KEYS[3], ARGV[1])
redis.call('incrby', KEYS[4], ARGV[3])
redis.call('hincrby', KEYS[5], 'stores', 1)
return 1
"""

# KEYS: entry, lru, bytes, stats
# ARGV: key, counter ('' = none), packset key prefix, expected location ('' = any)
_REMOVE = """
local b = redis.call('hget', KEYS[1], 'bytes')
if not b then
  redis.call('zrem', KEYS[2], ARGV[1])
  return false
end
local loc = redis.call('hget', KEYS[1], 'location')
if ARGV[4] ~= '' and loc ~= ARGV[4] then return false end
local pack = redis.call('hget', KEYS[1], 'pack_id')
redis.call('del', KEYS[1])
redis.call('zrem', KEYS[2], ARGV[1])
redis.call('decrby', KEYS[3], b)
redis.call('srem', ARGV[3] .. (pack or ''), ARGV[1])
if ARGV[2] ~= '' then redis.call('hincrby', KEYS[4], ARGV[2], 1) end
return loc
"""


# KEYS: entry, lru, stats   ARGV: key, now. Touches only a live entry (never resurrects one).
_TOUCH = """
if redis.call('exists', KEYS[1]) == 1 then
  redis.call('hset', KEYS[1], 'last_use', ARGV[2])
  redis.call('hincrby', KEYS[1], 'hits', 1)
  redis.call('zadd', KEYS[2], ARGV[2], ARGV[1])
end
redis.call('hincrby', KEYS[3], 'hits', 1)
return 1
"""


@dataclass
class KVEntry:
    tensors: dict  # name -> torch.Tensor, as the engine's snapshot() produced them
    metadata: dict[str, str]  # the str->str metadata stored with them
    info: dict = field(default_factory=dict)  # Redis metadata: tokens, bytes, pack_id, model, hits, ...


class KVStore:
    def __init__(self, client: redis.Redis, keys: Keys, root: str | Path, max_bytes: int):
        self.r, self.k = client, keys
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._commit = client.register_script(_COMMIT)
        self._remove = client.register_script(_REMOVE)
        self._touch = client.register_script(_TOUCH)

    @staticmethod
    def key_for(model_fingerprint: str, tenant: str, token_ids) -> str:
        """sha256 over the model fingerprint, the tenant and the prefix token ids (int64 LE)."""
        ids = np.asarray(token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids), dtype="<i8")
        h = hashlib.sha256()
        for part in (model_fingerprint.encode(), b"\0", tenant.encode(), b"\0"):
            h.update(part)
        h.update(ids.tobytes())
        return h.hexdigest()

    # --- write -----------------------------------------------------------------------------------
    def put(
        self,
        key: str,
        tensors: dict,
        metadata: dict[str, str] | None = None,
        *,
        pack_id: str = "",
        model: str = "",
        tokens: int = 0,
    ) -> bool:
        """Store a prefix cache. True when this call created the entry; False when an entry for
        `key` already exists (another worker won) or the entry alone exceeds the byte budget."""
        from safetensors.torch import save_file

        if self.r.exists(self.k.kv_entry(key)):
            self.r.hincrby(self.k.kv_stats(), "duplicates", 1)
            return False
        meta = {str(a): str(b) for a, b in (metadata or {}).items()}
        rel = Path(key[:2]) / f"{key}.{uuid.uuid4().hex[:12]}.safetensors"
        path = self.root / rel
        try:
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(
                f"cannot save KV snapshot for key {key[:12]}: {e}; tensors must be a dict[str, Tensor] "
                "of contiguous tensors that do not share memory"
            ) from e
        nbytes = path.stat().st_size
        if nbytes > self.max_bytes:
            self._unlink(path)
            self.r.hincrby(self.k.kv_stats(), "rejected", 1)
            log.warning("KV entry %s (%d bytes) exceeds the whole cache budget of %d bytes; not stored "
                        "(raise DSA_RAG_KV_CACHE_MAX_BYTES)", key[:12], nbytes, self.max_bytes)
            return False
        now = time.time()
        fields = {
            "location": rel.as_posix(), "tokens": int(tokens), "bytes": nbytes, "pack_id": pack_id,
            "model": model, "created": repr(now), "last_use": repr(now), "hits": 0,
        }
        argv = [key, repr(now), nbytes] + [x for kv in fields.items() for x in kv]
        won = self._commit(
            keys=[self.k.kv_entry(key), self.k.kv_lru(), self.k.kv_pack(pack_id), self.k.kv_bytes(), self.k.kv_stats()],
            args=argv,
        )
        if not won:
            self._unlink(path)
            return False
        self.evict(keep=key)
        return True

    # --- read ------------------------------------------------------------------------------------
    def get(self, key: str, device: str = "cpu") -> KVEntry | None:
        """The entry's tensors and metadata, or None (a miss: prefill and `put`)."""
        from safetensors import safe_open

        info = self.r.hgetall(self.k.kv_entry(key))
        if not info:
            self.r.hincrby(self.k.kv_stats(), "misses", 1)
            return None
        path = self.root / info["location"]
        try:
            with safe_open(str(path), framework="pt", device=device) as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # missing file, truncated / corrupt file
            log.warning("KV entry %s unreadable at %s (%s); dropping its metadata", key[:12], path, e)
            self.remove(key, counter="stale", location=info["location"])
            self.r.hincrby(self.k.kv_stats(), "misses", 1)
            return None
        self._touch(
            keys=[self.k.kv_entry(key), self.k.kv_lru(), self.k.kv_stats()], args=[key, repr(time.time())]
        )
        info["hits"] = int(info.get("hits", 0)) + 1
        return KVEntry(tensors=tensors, metadata=dict(meta), info=info)

    def contains(self, key: str) -> bool:
        return bool(self.r.exists(self.k.kv_entry(key)))

    # --- removal ---------------------------------------------------------------------------------
    def remove(self, key: str, counter: str = "", location: str = "") -> bool:
        """Drop one entry (metadata atomically, then its file). True if this call removed it.
        With `location`, only when the entry still points at that file (not a newer put's)."""
        loc = self._remove(
            keys=[self.k.kv_entry(key), self.k.kv_lru(), self.k.kv_bytes(), self.k.kv_stats()],
            args=[key, counter, self.k.kv_pack(""), location],
        )
        if loc is None:
            return False
        self._unlink(self.root / loc)
        return True

    def evict(self, keep: str | None = None) -> int:
        """Evict least-recently-used entries until the byte total is within budget."""
        n = 0
        while int(self.r.get(self.k.kv_bytes()) or 0) > self.max_bytes:
            victims = [v for v in self.r.zrange(self.k.kv_lru(), 0, 1) if v != keep]
            if not victims:
                break
            if self.remove(victims[0], counter="evictions"):
                n += 1
        return n

    def invalidate_pack(self, pack_id: str) -> int:
        """Drop every entry recorded for `pack_id` (its prompt changed or it was deleted)."""
        n = 0
        for key in self.r.smembers(self.k.kv_pack(pack_id)):
            n += self.remove(key, counter="invalidations")
        self.r.delete(self.k.kv_pack(pack_id))
        return n

    def keys_for_pack(self, pack_id: str) -> set[str]:
        return set(self.r.smembers(self.k.kv_pack(pack_id)))

    # --- metrics / maintenance -------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        raw = self.r.hgetall(self.k.kv_stats())
        out = {c: int(raw.get(c, 0)) for c in COUNTERS}
        out["bytes"] = int(self.r.get(self.k.kv_bytes()) or 0)
        out["entries"] = int(self.r.zcard(self.k.kv_lru()))
        out["max_bytes"] = self.max_bytes
        return out

    def sweep_orphans(self, min_age_s: float = 3600.0) -> int:
        """Delete files no entry points at (a crash between rename and commit leaves them),
        older than `min_age_s` so in-flight puts are never touched."""
        n, now = 0, time.time()
        for sub in (p for p in self.root.iterdir() if p.is_dir()):
            for f in sub.glob("*.safetensors"):
                if now - f.stat().st_mtime < min_age_s:
                    continue
                key = f.name.split(".", 1)[0]
                if self.r.hget(self.k.kv_entry(key), "location") != f"{sub.name}/{f.name}":
                    self._unlink(f)
                    n += 1
        return n

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            os.unlink(path)
            fsync_dir(path.parent)
        except FileNotFoundError:
            pass
