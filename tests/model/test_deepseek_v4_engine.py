"""The DeepSeek-V4 engine (model/v4/engine.py) behind the EngineProtocol: chunked prefill with
chunk boundaries inside compression windows, then 64 greedy tokens, equal to recomputing the whole
sequence; snapshot -> restore (through a safetensors file) -> identical continuation; load_engine
routes a deepseek_v4 checkpoint dir to it; traces point at real context positions.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/model/test_deepseek_v4_engine.py -p no:cacheprovider
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from dsa_rag.model.engine.engine import AsyncEngine, Snapshot
from dsa_rag.model.engine.factory import load_engine
from dsa_rag.model.engine.protocol import EngineProtocol
from dsa_rag.model.engine.sampling import SamplingParams
from dsa_rag.model.v4.engine import V4Engine
from dsa_rag.model.v4.load import save_v4_checkpoint
from tests.model.v4_helpers import random_v4, tiny_v4_config, v4_ids


@pytest.fixture(scope="module")
def model():
    return random_v4(tiny_v4_config(), seed=21)


_ids = v4_ids


def _recompute_greedy(model, ids, n):
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, len(ids):].tolist()


GREEDY = SamplingParams(max_tokens=64, stop_token_ids=[], trace=True)


def test_prefix_question_64_greedy_tokens_equal_recomputation(model):
    eng = V4Engine(model, prefill_chunk=7)  # 7: chunk boundaries inside CSA (4) and HCA (8) windows
    pack, question = _ids(45, 1), _ids(6, 2)
    handle = eng.prefill_prefix(pack)
    evs = list(eng.generate(question, GREEDY, prefix=handle))
    got = [e.token_id for e in evs]
    assert len(got) == 64 and evs[-1].finish_reason == "length"
    assert got == _recompute_greedy(model, pack + question, 64)
    # Traces: positions the attention read, inside the context, mass in (0, 1].
    for e in evs:
        n_ctx = e.position  # the token at `position` was produced from positions < position
        assert e.trace is not None and all(0 <= p < n_ctx for p in e.trace.positions)
        assert 0 < sum(e.trace.mass) <= 1 + 1e-5
    # A second question on the same prefix sees the prefix unchanged.
    again = [e.token_id for e in eng.generate(question, GREEDY, prefix=handle)]
    assert again == got


def test_snapshot_restore_continue(model, tmp_path):
    eng = V4Engine(model, prefill_chunk=5)
    pack, question = _ids(38, 3), _ids(5, 4)
    handle = eng.prefill_prefix(pack)
    want = [(e.token_id, e.logprob) for e in eng.generate(question, SamplingParams(max_tokens=20, stop_token_ids=[]),
                                                           prefix=handle)]
    snap = eng.snapshot(handle)
    snap.save(tmp_path / "pack.safetensors")
    other = V4Engine(model)
    restored = other.restore(Snapshot.load(tmp_path / "pack.safetensors"))
    got = [(e.token_id, e.logprob) for e in other.generate(question, SamplingParams(max_tokens=20, stop_token_ids=[]),
                                                            prefix=restored)]
    assert got == want
    foreign = V4Engine(random_v4(tiny_v4_config(), seed=22))
    with pytest.raises(ValueError, match="fingerprint"):
        foreign.restore(snap)


def test_load_engine_routes_a_v4_checkpoint(model, tmp_path):
    d = save_v4_checkpoint(model, tmp_path / "tiny-v4")
    engine = load_engine(str(d), device="cpu", threads=1)
    try:
        assert isinstance(engine, EngineProtocol) and isinstance(engine, AsyncEngine)
        assert isinstance(engine.engine, V4Engine)

        async def ask():
            pack = await engine.prefill_prefix(_ids(30, 5))
            out = [ev async for ev in engine.generate(_ids(4, 6), SamplingParams(max_tokens=8, stop_token_ids=[]),
                                                      prefix=pack)]
            snap = await engine.snapshot(pack)
            again = await engine.restore(snap.tensors, snap.metadata)
            out2 = [ev async for ev in engine.generate(_ids(4, 6), SamplingParams(max_tokens=8, stop_token_ids=[]),
                                                       prefix=again)]
            return out, out2

        out, out2 = asyncio.run(ask())
        assert [e.token_id for e in out] == [e.token_id for e in out2] and len(out) == 8
        with pytest.raises(ValueError, match="DeepSeek-V4"):
            load_engine(str(d), device="cpu", index_every=2)
    finally:
        engine.close()
