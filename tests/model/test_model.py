"""Model behaviour beyond parity: the two MLA forms agree, chunked prefill and cached decode equal a
full forward, rows of a batch at different positions equal each alone, dense mode == no indexer.

    .venv/bin/python -m pytest tests/model/test_model.py -q
"""

import torch

from dsa_rag.model.cache import new_sequence_cache
from dsa_rag.model.model import causal_indices
from tests.model.helpers import random_model, tiny_config


def ids_of(cfg, B, T, seed=0):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_mha_and_absorbed_forms_agree():
    cfg = tiny_config(0)
    m = random_model(cfg, 0)
    ids = ids_of(cfg, 1, 70)
    with torch.no_grad():
        a, b = m(ids, mode="mha"), m(ids, mode="absorb")
    assert (a - b).abs().max() < 1e-4


def test_chunked_prefill_and_cached_decode_equal_full_forward():
    cfg = tiny_config(0)
    m = random_model(cfg, 0)
    ids = ids_of(cfg, 1, 90)
    with torch.no_grad():
        full = m(ids)
        cache = [new_sequence_cache(cfg.num_hidden_layers, capacity=8)]  # forces regrowth
        parts = [m(ids[:, :30], 0, cache), m(ids[:, 30:61], 30, cache)]
        parts += [m(ids[:, t: t + 1], t, cache) for t in range(61, 90)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-4


def test_batch_rows_at_different_positions_equal_each_alone():
    cfg = tiny_config(2)
    m = random_model(cfg, 2)
    a, b = ids_of(cfg, 1, 50, 1), ids_of(cfg, 1, 80, 2)
    with torch.no_grad():
        ca, cb = new_sequence_cache(cfg.num_hidden_layers), new_sequence_cache(cfg.num_hidden_layers)
        m(a[:, :49], 0, [ca])
        m(b[:, :79], 0, [cb])
        step = torch.cat([a[:, 49:], b[:, 79:]], 0)
        batched = m(step, [49, 79], [ca, cb])
        alone_a, alone_b = m(a)[:, -1], m(b)[:, -1]
    assert (batched[0, 0] - alone_a[0]).abs().max() < 1e-4
    assert (batched[1, 0] - alone_b[0]).abs().max() < 1e-4


def test_trace_reports_selected_keys_and_their_mass():
    cfg = tiny_config(0)
    m = random_model(cfg, 0)
    ids = ids_of(cfg, 1, 60)
    seen = []
    with torch.no_grad():
        cache = [new_sequence_cache(cfg.num_hidden_layers)]
        m(ids[:, :59], 0, cache)
        m(ids[:, 59:], 59, cache, trace=lambda layer, row, idx, mass: seen.append((layer, idx, mass)))
    assert [s[0] for s in seen] == list(range(cfg.num_hidden_layers))
    for _, idx, mass in seen:
        valid = idx >= 0
        assert valid.sum() == cfg.index_topk  # 60 keys, top-24 kept
        assert torch.allclose(mass.sum(), torch.tensor(float(cfg.num_attention_heads)), atol=1e-4)  # sums to 1 per head
        assert (mass[~valid] == 0).all()


def test_dense_mode_ignores_the_indexer():
    cfg = tiny_config(0, dense_attention=True)
    m = random_model(cfg, 0)
    ids = ids_of(cfg, 1, 70)
    with torch.no_grad():
        out = m(ids)
        for layer in m.layers:  # the indexer's weights must not matter in dense mode
            layer.attn.indexer.wq_b.weight.mul_(-3)
        assert torch.equal(out, m(ids))


def test_causal_indices():
    idx = causal_indices(3, 5, 2, "cpu")
    assert idx.tolist() == [[0, 1, 2, -1, -1], [0, 1, 2, 3, -1], [0, 1, 2, 3, 4]]


def test_training_backward_reaches_every_trained_weight():
    cfg = tiny_config(0)
    m = random_model(cfg, 0).train()
    ids = ids_of(cfg, 2, 40)
    logits = m(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert m.layers[1].attn.wkv_a.weight.grad.abs().sum() > 0
    assert m.layers[1].attn.wq_b.weight.grad.abs().sum() > 0
    assert m.embed.weight.grad.abs().sum() > 0
