"""Cached generation for DeepSeek-V4: chunked prefill into a `V4Cache`, then one token per step.

A V4 cache is per sequence (window + compressed pools + compressor rolling state, cache.py), so
these are small free functions over (model, cache), in the gpt-fast style:

    from dsa_rag.model.v4.generate import prefill, greedy
    cache = model.new_cache()
    logits = prefill(model, prompt_ids, cache, chunk=512)     # [B, vocab] of the last token
    out = greedy(model, prompt_ids, max_new=64, chunk=512)     # [B, T + 64]

    .venv/bin/python -m pytest -q tests/model/test_deepseek_v4_cache.py -p no:cacheprovider
"""

from __future__ import annotations

import torch

from dsa_rag.model.v4.cache import V4Cache
from dsa_rag.model.v4.model import Transformer


@torch.no_grad()
def prefill(model: Transformer, tokens: torch.Tensor, cache: V4Cache, chunk: int = 512) -> torch.Tensor:
    """Feed tokens [B, T] (T >= 1) in chunks of `chunk`; -> logits [B, vocab] of the last token.
    Chunk boundaries may fall anywhere, inside compression windows included."""
    if tokens.shape[1] == 0:
        raise ValueError("prefill: no tokens")
    if chunk < 1:
        raise ValueError(f"prefill: chunk must be >= 1, got {chunk}")
    logits = None
    for s in range(0, tokens.shape[1], chunk):
        # Only the last position's logits are needed: skip the head on the rest.
        h = model.hidden(tokens[:, s: s + chunk], cache)
        logits = model.head(h[:, -1])
    return logits


@torch.no_grad()
def decode_one(model: Transformer, token: torch.Tensor, cache: V4Cache) -> torch.Tensor:
    """token [B] -> logits [B, vocab] of the next position; extends the cache by one token."""
    return model.head(model.hidden(token[:, None], cache)[:, -1])


@torch.no_grad()
def greedy(model: Transformer, tokens: torch.Tensor, max_new: int, chunk: int = 512,
           cache: V4Cache | None = None) -> torch.Tensor:
    """Greedy continuation of tokens [B, T] by `max_new` tokens -> [B, T + max_new]."""
    cache = cache if cache is not None else model.new_cache()
    logits = prefill(model, tokens, cache, chunk)
    out = [tokens]
    for i in range(max_new):
        nxt = logits.argmax(-1)
        out.append(nxt[:, None])
        if i + 1 < max_new:  # the last token needs no logits of its own
            logits = decode_one(model, nxt, cache)
    return torch.cat(out, 1)
