"""The real engine behind the service's engine interface: `load_engine` gives an object that is
an `EngineProtocol` (members present, async where the protocol is async), and the protocol's
calls work end to end on dsa-tiny: prefill, snapshot, restore (and refusal of a foreign
snapshot), a traced greedy generation that is the same on the restored prefix, release, close.
(That the service imports only the protocol and the factory: tests/test_layout.py.)

    .venv/bin/python -m pytest -q tests/rag_service/test_engine_protocol.py
"""

from __future__ import annotations

import asyncio
import inspect

import pytest

from dsa_rag.model.engine.factory import load_engine
from dsa_rag.model.engine.protocol import (EngineProtocol, PrefixHandleProtocol, SnapshotProtocol,
                                           TokenEventProtocol, TraceProtocol)
from dsa_rag.model.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine():
    eng = load_engine("dsa-tiny", device="cpu", threads=1)
    yield eng
    eng.close()


def test_the_real_engine_conforms_structurally(engine):
    assert isinstance(engine, EngineProtocol)
    for name in ("prefill_prefix", "restore", "snapshot", "release"):
        assert inspect.iscoroutinefunction(getattr(engine, name)), name
        assert inspect.iscoroutinefunction(getattr(EngineProtocol, name)), name
    assert inspect.isasyncgenfunction(engine.generate)
    proto = inspect.signature(EngineProtocol.generate).parameters
    real = inspect.signature(type(engine).generate).parameters
    assert list(proto)[:3] == list(real)[:3] and "prefix" in real
    assert isinstance(engine.fingerprint, str) and engine.fingerprint


def test_the_protocol_calls_round_trip_on_dsa_tiny(engine):
    ids = list(range(20, 120))
    q = [5, 6, 7]
    p = SamplingParams(max_tokens=4, trace=True, trace_top=8)

    async def run():
        h = await engine.prefill_prefix(ids)
        assert isinstance(h, PrefixHandleProtocol) and list(h.tokens) == ids
        snap = await engine.snapshot(h)
        assert isinstance(snap, SnapshotProtocol) and snap.tensors and all(isinstance(v, str) for v in snap.metadata.values())
        evs = [ev async for ev in engine.generate(q, p, prefix=h)]
        h2 = await engine.restore(snap.tensors, snap.metadata)
        evs2 = [ev async for ev in engine.generate(q, p, prefix=h2)]
        with pytest.raises(ValueError):
            await engine.restore(snap.tensors, {**snap.metadata, "fingerprint": "another-model"})
        await engine.release(h)
        await engine.release(h2)
        return evs, evs2

    evs, evs2 = asyncio.run(run())
    assert 1 <= len(evs) <= 4 and evs[-1].finished and evs[-1].finish_reason in ("stop", "length")
    for ev in evs:
        assert isinstance(ev, TokenEventProtocol) and isinstance(ev.trace, TraceProtocol)
        assert ev.logprob is not None and len(ev.trace.positions) <= 8
    assert [e.token_id for e in evs2] == [e.token_id for e in evs]  # greedy: restored prefix, same tokens


def test_a_second_event_loop_can_drive_the_same_engine(engine):
    """One `asyncio.run` per question (scripts, `ask_sync`): the engine follows the loop."""

    async def one():
        h = await engine.prefill_prefix(list(range(30, 60)))
        out = [ev.token_id async for ev in engine.generate([5], SamplingParams(max_tokens=2), prefix=h)]
        await engine.release(h)
        return out

    assert asyncio.run(one()) == asyncio.run(one())

