"""DeepSeek-V4 cached inference: chunked prefill (chunk boundaries inside compression windows)
and token-by-token decode through a V4Cache equal one full forward; snapshots restore; the
cache's bytes per token are what cache.py's accounting says.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/model/test_deepseek_v4_cache.py -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

from dsa_rag.model.v4.cache import bytes_per_token, fixed_bytes, report, table
from dsa_rag.model.v4.generate import decode_one, greedy, prefill
from dsa_rag.model.v4.load import cast_v4
from tests.model.v4_helpers import hf_from, random_v4, tiny_v4_config


@pytest.fixture(scope="module")
def model():
    return random_v4(tiny_v4_config(), seed=7)


def _tokens(length, batch=2, seed=3):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_chunked_prefill_then_decode_equals_full_forward(model):
    tok = _tokens(90)
    full = model(tok)
    cache = model.new_cache()
    got, s = [], 0
    for n in (5, 11, 3, 17, 1, 9):  # 46 tokens; no boundary on a multiple of 4 or 8 after the first
        got.append(model(tok[:, s: s + n], cache))
        s += n
    while s < tok.shape[1]:
        got.append(model(tok[:, s: s + 1], cache))
        s += 1
    diff = (torch.cat(got, 1) - full).abs().max().item()
    assert diff <= 1e-4, diff
    assert cache.length == 90
    assert cache.layers[1].compressor.count == 90 // 4 and cache.layers[0].compressor.count == 90 // 8
    assert cache.layers[1].compressor.buffer_kv.shape[1] == 90 % 4  # the open window, carried over


@torch.no_grad()
def test_cached_greedy_equals_recomputation(model):
    prompt = _tokens(21, batch=1, seed=11)
    cached = greedy(model, prompt, max_new=40, chunk=7)
    seq = prompt
    for _ in range(40):  # recompute the whole sequence for every new token
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq)
    assert len(set(cached[0, 21:].tolist())) > 3  # not a degenerate repetition


@torch.no_grad()
def test_snapshot_restore_continue(model):
    tok = _tokens(30, batch=1, seed=5)
    cache = model.new_cache()
    prefill(model, tok, cache, chunk=13)
    snap = cache.snapshot()
    nxt = torch.tensor([17])
    a = [decode_one(model, nxt, cache) for _ in range(3)]
    b = [decode_one(model, nxt, snap) for _ in range(3)]  # the snapshot did not move with the cache
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert cache.length == snap.length == 33


@torch.no_grad()
def test_cache_bytes_follow_the_layout(model):
    """Past the first windows, the cache grows by exactly bytes_per_token per token (fp32 here)."""
    cfg = model.cfg
    cache = model.new_cache()
    prefill(model, _tokens(64, batch=1), cache, chunk=64)
    before = cache.nbytes()
    prefill(model, _tokens(32, batch=1, seed=9), cache, chunk=5)
    assert cache.nbytes() - before == bytes_per_token(cfg, elem_bytes=4) * 32
    assert cache.nbytes() <= bytes_per_token(cfg, 4) * 96 + fixed_bytes(cfg, 4, 4)


def test_flash_cache_is_smaller_than_a_v32_stack():
    r = report(1 << 20)
    print(r)
    assert r["v4_flash_layers"] == {"sliding_attention": 0, "compressed_sparse_attention": 20,
                                    "heavily_compressed_attention": 23}
    assert r["v4_flash_bytes_per_token_bf16"] == 20 * (512 + 128) / 4 * 2 + 23 * 512 / 128 * 2
    assert r["v32_61_layers_gib"] == pytest.approx(83.9, abs=0.05)  # the V3.2-style figure
    assert r["v4_flash_gib"] < r["v32_style_same_depth_gib"] / 5
    t = table(1 << 20)  # the README table, from the configs
    assert "| deepseek-v3.2 | 85,888 | 83.88 |" in t and "| deepseek-v4-flash | 6,584 | 6.45 |" in t


@torch.no_grad()
def test_transformers_own_cached_path_agrees(model, tmp_path):
    """transformers' DynamicCache path (prefill 41 tokens, then one token at a time) gives our
    full-forward logits: the two implementations agree on the rolling compressor state too."""
    from transformers import DynamicCache  # the oracle, a test dependency

    hf = hf_from(model, tmp_path)
    tok = _tokens(60, batch=1, seed=13)
    full = model(tok)
    c = DynamicCache(config=hf.config)
    logits = [hf(tok[:, :41], cache=c, use_cache=True).logits]
    logits += [hf(tok[:, t: t + 1], cache=c, use_cache=True).logits for t in range(41, 60)]
    assert (torch.cat(logits, 1) - full).abs().max().item() <= 1e-3


@torch.no_grad()
def test_bf16_serving_dtype_chunked_equals_full():
    """In bf16 (fp32 where the reference keeps it: norms, sinks, ape, hyper-connections, router
    bias), chunked prefill + decode still reproduces the full forward and its greedy tokens."""
    m = cast_v4(random_v4(tiny_v4_config(), seed=7), "bfloat16")
    assert m.layers[1].attn.wq_b.weight.dtype == torch.bfloat16 and m.layers[1].attn.attn_sink.dtype == torch.float32
    tok = _tokens(80, batch=1, seed=3)
    full = m(tok)
    cache = m.new_cache()
    chunked = torch.cat([m(tok[:, s: s + 7], cache) for s in range(0, 80, 7)], 1)
    assert full.dtype == torch.bfloat16 and (chunked.float() - full.float()).abs().max().item() <= 1e-2
    prompt = tok[:, :21]
    seq = prompt
    for _ in range(40):
        seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy(m, prompt, max_new=40, chunk=7), seq)
