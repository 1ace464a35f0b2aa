"""Paged cache: allocator refcounts, pool growth, block-table translation, copy-on-write, the
contiguous fast path of index_k vs the gather path, and the paged cache inside the model equal to
the contiguous reference cache.

    .venv/bin/python -m pytest tests/model/engine/test_engine_paged.py -q
"""

from __future__ import annotations

import pytest
import torch

from dsa_rag.model.cache import new_sequence_cache
from dsa_rag.model.engine.paged import BlockAllocator, BlockPool, PagedSequence
from tests.model.helpers import random_model, tiny_config


def pool(n_blocks=2, bs=4, layers=2, fp8=False, max_blocks=None):
    p = BlockPool(layers, 6, 3, block_size=bs, n_blocks=n_blocks, max_blocks=max_blocks)
    p.ensure_storage(torch.float32, torch.float8_e4m3fn if fp8 else torch.float32, fp8)
    return p


def fill(seq, start, n, base=0.0, fp8=False):
    """Write n tokens whose values encode their position (pos + base) in every layer."""
    for i, layer in enumerate(seq.layers):
        v = torch.arange(start, start + n, dtype=torch.float32)[:, None] + base + 100 * i
        ik = v.expand(n, 3)
        layer.write(start, v.expand(n, 6).clone(), ik.to(torch.float8_e4m3fn) if fp8 else ik.clone(),
                    torch.full((n,), 0.5) if fp8 else None)


def test_allocator_refcounts_and_preference():
    a = BlockAllocator(4)
    assert [a.alloc(), a.alloc(prefer=3), a.alloc(prefer=3)] == [0, 3, 1]
    a.incref(3)
    a.decref(3)
    assert a.n_free == 1 and a.ref[3] == 1
    a.decref(3)
    assert a.n_free == 2
    with pytest.raises(RuntimeError, match="freed twice"):
        a.decref(3)
    assert a.alloc() == 2 and a.alloc() == 3 and a.alloc() is None


def test_pool_grows_and_keeps_data_and_translates_positions():
    p = pool(n_blocks=1)
    s = PagedSequence(p)
    fill(s, 0, 3)
    fill(s, 3, 10)  # grows 1 -> 2 -> 4 blocks
    assert s.length == 13 and p.alloc.n_blocks == 4 and s.blocks == [0, 1, 2, 3]
    assert torch.equal(s.layers[1].kv(13)[:, 0], torch.arange(13.0) + 100)
    idx = torch.tensor([[12, -1, 0, 5]], dtype=torch.int32)
    rows = s.layers[0].physical(idx)
    assert rows.tolist() == [[12, -1, 0, 5]]
    assert torch.equal(s.layers[0].kv_pool()[rows[0, [0, 2, 3]], 0], torch.tensor([12.0, 0.0, 5.0]))
    with pytest.raises(ValueError, match="hole"):
        fill(s, 20, 1)
    capped = pool(n_blocks=1, max_blocks=2)
    with pytest.raises(MemoryError, match="max_blocks"):
        fill(PagedSequence(capped), 0, 9)


def test_fork_shares_blocks_and_copies_on_write():
    p = pool(n_blocks=8)
    parent = PagedSequence(p)
    fill(parent, 0, 10)  # blocks 0,1 full, block 2 holds 2 tokens
    child = parent.fork()
    assert child.blocks == parent.blocks and [p.alloc.ref[b] for b in parent.blocks] == [2, 2, 2]
    fill(child, 10, 3, base=1000)  # writes into the shared partial block -> copied first
    assert child.blocks[:2] == parent.blocks[:2] and child.blocks[2] != parent.blocks[2]
    assert p.alloc.ref[parent.blocks[2]] == 1
    assert torch.equal(parent.layers[0].kv(10)[:, 0], torch.arange(10.0))  # parent untouched
    got = child.layers[0].kv(13)[:, 0]
    assert torch.equal(got[:10], torch.arange(10.0)) and torch.equal(got[10:], torch.arange(10.0, 13) + 1000)
    # overwrite inside a shared full block (an empty-question fork rewrites the last prefix token)
    c2 = parent.fork(upto=6)
    fill(c2, 5, 1, base=500)
    assert c2.blocks[0] == parent.blocks[0] and c2.blocks[1] != parent.blocks[1]
    assert parent.layers[1].kv(10)[5, 0] == 105.0 and c2.layers[1].kv(6)[5, 0] == 605.0
    for s in (child, c2, parent):
        s.free()
    assert p.used_blocks() == 0


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_index_keys_view_when_consecutive_gather_otherwise(fp8):
    p = pool(n_blocks=8, fp8=fp8)
    a = PagedSequence(p)
    fill(a, 0, 9, fp8=fp8)
    assert a.contiguous_upto() == 12
    view = a.layers[0].index_k(9)
    assert view.dtype == (torch.float8_e4m3fn if fp8 else torch.float32)
    assert view.view(torch.uint8).data_ptr() == p.ik[0].data_ptr()  # no copy
    other = PagedSequence(p)
    fill(other, 0, 1, fp8=fp8)  # takes block 3: a's next block is no longer free
    fill(a, 9, 8, fp8=fp8)
    assert a.blocks == [0, 1, 2, 4, 5] and a.contiguous_upto() == 12
    got = a.layers[1].index_k(17).float()[:, 0]
    assert torch.equal(got, (torch.arange(17.0) + 100).to(got.dtype) if not fp8 else
                       (torch.arange(17.0) + 100).to(torch.float8_e4m3fn).float())
    if fp8:
        assert torch.equal(a.layers[1].index_scale(17), torch.full((17,), 0.5))
    else:
        assert a.layers[1].index_scale(17) is None


def test_paged_cache_in_the_model_equals_contiguous_cache():
    cfg = tiny_config(3)
    m = random_model(cfg, 3)
    ids = torch.randint(8, cfg.vocab_size, (1, 70), generator=torch.Generator().manual_seed(3))
    p = BlockPool(cfg.num_hidden_layers, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.index_head_dim, block_size=8)
    seq = PagedSequence(p)
    ref = new_sequence_cache(cfg.num_hidden_layers)
    with torch.no_grad():
        for s, e in [(0, 29), (29, 50)] + [(t, t + 1) for t in range(50, 70)]:
            a = m(ids[:, s:e], s, [seq.layers])
            b = m(ids[:, s:e], s, [ref])
            assert torch.equal(a, b), (s, e)
            if s == 0:  # someone else's block right after ours: the rest is not consecutive
                PagedSequence(p).reserve(0, 1)
    assert seq.contiguous_upto() < 70
    assert torch.equal(seq.layers[2].kv(70), ref[2].kv(70))
