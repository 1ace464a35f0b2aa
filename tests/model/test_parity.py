"""Parity with transformers.DeepseekV32ForCausalLM: tiny random DeepSeek-V3.2 checkpoints in the
official layout (FP8 e4m3 + weight_scale_inv, sharded, YaRN rope_scaling) loaded by load_model,
compared in fp32 on sequences longer than index_topk so the sparse selection matters.

    .venv/bin/python -m pytest tests/model/test_parity.py -q
"""

import pytest
import torch

from dsa_rag.model.load import load_model, save_checkpoint
from tests.model.helpers import hf_model_from, random_model, tiny_config

CASES = [  # (seed, seq_len, overrides)
    (0, 80, {}),
    (1, 120, {"index_topk": 40, "num_hidden_layers": 2}),
    (2, 64, {"hidden_size": 96, "num_attention_heads": 6, "n_group": 1, "topk_group": 1}),
]


@pytest.mark.parametrize("seed,seq_len,overrides", CASES, ids=[f"seed{c[0]}-L{c[1]}" for c in CASES])
def test_logits_match_transformers(tmp_path, seed, seq_len, overrides):
    cfg = tiny_config(seed, **overrides)
    assert seq_len > cfg.index_topk  # the indexer really drops keys
    save_checkpoint(random_model(cfg, seed), tmp_path, fp8_weights=True, shard_bytes=40_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1  # sharded with an index
    ours = load_model(tmp_path)
    hf = hf_model_from(ours)
    ids = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-3, f"max |logit diff| = {diff}"
    assert ref.abs().max() > 0.1  # not a degenerate all-zero comparison


def test_sparse_differs_from_dense(tmp_path):
    """The comparison above is only meaningful if sparse selection changes the logits."""
    cfg = tiny_config(0)
    m = random_model(cfg, 0)
    ids = torch.randint(0, cfg.vocab_size, (1, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sparse = m(ids)
        m.cfg.dense_attention = True
        dense = m(ids)
    assert torch.allclose(sparse[:, : cfg.index_topk], dense[:, : cfg.index_topk], atol=1e-5)
    assert (sparse[:, cfg.index_topk:] - dense[:, cfg.index_topk:]).abs().max() > 1e-3
