"""Prefix-KV cache store: round trip, LRU under a byte budget, stale metadata, concurrent puts.

    .venv/bin/python -m pytest -q tests/rag_service/test_kvstore.py
"""

from __future__ import annotations

import threading

import pytest
import torch

from dsa_rag.rag_service.stores.kvstore import KVStore
from dsa_rag.rag_service.stores.redis_store import Keys


@pytest.fixture
def kv(settings, rag):
    return rag.kv


def snapshot(n_tokens: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.kv": torch.randn(1, n_tokens, 576, generator=g).to(torch.bfloat16),
        "layers.0.index_k": torch.randn(1, n_tokens, 128, generator=g).to(torch.float8_e4m3fn),
        "layers.0.index_scale": torch.rand(1, n_tokens, generator=g),
        "positions": torch.arange(n_tokens, dtype=torch.int64),
    }


def small_store(rag, max_bytes: int, name: str = "small") -> KVStore:
    """A store with its own keys and directory (its own LRU and byte total)."""
    return KVStore(rag.r, Keys(f"{rag.settings.redis_prefix}-{name}"), rag.settings.kv_dir / name, max_bytes)


def test_key_depends_on_model_tenant_and_tokens():
    k = KVStore.key_for("dsa-tiny@abc", "default", [1, 2, 3])
    assert k == KVStore.key_for("dsa-tiny@abc", "default", torch.tensor([1, 2, 3]))
    assert len({k, KVStore.key_for("dsa-tiny@abd", "default", [1, 2, 3]),
                KVStore.key_for("dsa-tiny@abc", "acme", [1, 2, 3]),
                KVStore.key_for("dsa-tiny@abc", "default", [1, 2, 4]),
                KVStore.key_for("dsa-tiny@abc", "default", [1, 2, 3, 0])}) == 5


def test_round_trip_tensors_and_metadata(kv):
    snap = snapshot()
    key = kv.key_for("m", "default", range(64))
    assert kv.get(key) is None  # miss
    assert kv.put(key, snap, {"layers": "1", "dtype": "bf16"}, pack_id="pk_1", model="m", tokens=64)
    hit = kv.get(key)
    assert hit is not None and set(hit.tensors) == set(snap)
    for name, t in snap.items():
        assert hit.tensors[name].dtype == t.dtype and torch.equal(hit.tensors[name].view(torch.uint8),
                                                                  t.view(torch.uint8))
    assert hit.metadata == {"layers": "1", "dtype": "bf16"}
    assert hit.info["pack_id"] == "pk_1" and int(hit.info["tokens"]) == 64 and hit.info["hits"] == 1
    kv.get(key)
    assert int(kv.r.hget(kv.k.kv_entry(key), "hits")) == 2
    st = kv.stats()
    assert (st["hits"], st["misses"], st["stores"], st["entries"]) == (2, 1, 1, 1)
    assert st["bytes"] == int(hit.info["bytes"]) == (kv.root / hit.info["location"]).stat().st_size


def test_lru_eviction_under_byte_budget(rag):
    probe = small_store(rag, 1 << 30, "probe")
    probe.put("probe", snapshot(seed=9))
    size = probe.stats()["bytes"]
    kv = small_store(rag, int(size * 2.5))  # room for two entries
    keys = [kv.key_for("m", "default", [i]) for i in range(3)]
    assert kv.put(keys[0], snapshot(seed=0)) and kv.put(keys[1], snapshot(seed=1))
    assert kv.get(keys[0]) is not None  # keys[0] is now the most recently used
    assert kv.put(keys[2], snapshot(seed=2))
    assert kv.contains(keys[0]) and not kv.contains(keys[1]) and kv.contains(keys[2])
    st = kv.stats()
    assert st["evictions"] == 1 and st["entries"] == 2 and st["bytes"] <= kv.max_bytes
    files = sorted(p.name.split(".")[0] for p in kv.root.rglob("*.safetensors"))
    assert keys[1] not in files and keys[0] in files
    tiny = small_store(rag, size // 2, "tiny")  # an entry bigger than the whole budget is refused
    assert not tiny.put(tiny.key_for("m", "t", [1]), snapshot()) and tiny.stats()["rejected"] == 1


def test_missing_or_corrupt_file_is_a_miss_and_metadata_is_cleaned(kv):
    a, b = kv.key_for("m", "default", [1]), kv.key_for("m", "default", [2])
    kv.put(a, snapshot(seed=1), pack_id="pk_a")
    kv.put(b, snapshot(seed=2))
    (kv.root / kv.r.hget(kv.k.kv_entry(a), "location")).unlink()
    path_b = kv.root / kv.r.hget(kv.k.kv_entry(b), "location")
    path_b.write_bytes(path_b.read_bytes()[:100])  # truncated
    assert kv.get(a) is None and kv.get(b) is None
    assert not kv.contains(a) and not kv.contains(b)
    assert kv.r.smembers(kv.k.kv_pack("pk_a")) == set()
    st = kv.stats()
    assert st["stale"] == 2 and st["misses"] == 2 and st["bytes"] == 0 and st["entries"] == 0
    assert kv.put(a, snapshot(seed=1)) and kv.get(a) is not None  # re-prefilled and stored again


def test_concurrent_put_of_same_key_leaves_one_valid_entry(kv):
    key = kv.key_for("m", "default", list(range(100)))
    snaps = [snapshot(seed=i) for i in range(4)]  # different bytes per writer: we can tell who won
    barrier = threading.Barrier(4)
    results = [None] * 4

    def worker(i):
        store = KVStore(kv.r.__class__(connection_pool=kv.r.connection_pool), kv.k, kv.root, kv.max_bytes)
        barrier.wait()
        results[i] = store.put(key, snaps[i], {"writer": str(i)})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    winner = results.index(True)
    files = list(kv.root.rglob(f"{key}.*.safetensors"))
    assert len(files) == 1  # losers removed their own files
    hit = kv.get(key)
    assert hit.metadata == {"writer": str(winner)}
    assert torch.equal(hit.tensors["layers.0.index_scale"], snaps[winner]["layers.0.index_scale"])
    st = kv.stats()
    assert st["stores"] == 1 and st["duplicates"] == 3 and st["entries"] == 1
    assert st["bytes"] == files[0].stat().st_size


def test_invalidate_pack_and_sweep_orphans(kv):
    k1, k2, k3 = (kv.key_for("m", "default", [i]) for i in range(3))
    kv.put(k1, snapshot(seed=1), pack_id="pk_x")
    kv.put(k2, snapshot(seed=2), pack_id="pk_x")
    kv.put(k3, snapshot(seed=3), pack_id="pk_y")
    assert kv.keys_for_pack("pk_x") == {k1, k2}
    assert kv.invalidate_pack("pk_x") == 2
    assert not kv.contains(k1) and not kv.contains(k2) and kv.contains(k3)
    orphan = kv.root / "ab" / ("ab" + "0" * 62 + ".deadbeef.safetensors")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x")
    assert kv.sweep_orphans(min_age_s=3600) == 0  # too young: might be an in-flight put
    assert kv.sweep_orphans(min_age_s=0) == 1 and not orphan.exists() and kv.get(k3) is not None
