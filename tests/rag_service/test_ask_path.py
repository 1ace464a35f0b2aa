"""The one ask path (fan-out, merge, citations, retries) and the PackWorker over the engine
interface, with a small fake engine that implements `EngineProtocol` (no weights, no torch
model): it "reads" the pack by attending to where the answer word sits in the prefix, so the
citations must come back through the pack layout; real Redis, real pipeline, real KV store.

    .venv/bin/python -m pytest -q tests/rag_service/test_ask_path.py
"""

from __future__ import annotations

import asyncio
import pickle
from dataclasses import dataclass, field

import pytest
import torch

from dsa_rag.model.engine.protocol import EngineProtocol
from dsa_rag.model.engine.sampling import SamplingParams
from dsa_rag.rag_service.ask.fanout import ask, ask_events, ask_sync
from dsa_rag.rag_service.ask.local import LocalBackend
from dsa_rag.rag_service.ask.merge import PackResult, merge
from dsa_rag.rag_service.ask.params import AskParams
from dsa_rag.rag_service.ask.worker import TRACE_TOP, PackWorker
from dsa_rag.rag_service.errors import EngineError, NoDocuments
from dsa_rag.rag_service.schemas import Citation

ROME = "The treaty was signed in Rome in 1957. The ceremony was long. " * 3
PARIS = "The capital of France is Paris. The Seine crosses the city. " * 3


@dataclass(eq=False)
class FakeHandle:
    tokens: list[int]
    released: bool = False


@dataclass
class FakeSnapshot:
    tensors: dict
    metadata: dict


@dataclass
class FakeTrace:
    positions: list[int]
    mass: list[float]


@dataclass
class FakeEvent:
    token_id: int
    text: str
    logprob: float | None
    finished: bool = False
    finish_reason: str | None = None
    trace: FakeTrace | None = None
    error: str | None = None


@dataclass
class FakeEngine:
    """Answers `word` one character per token and attends to the word's occurrences in the
    prefix. `fail_next`: requests that end with an engine error before their first token."""

    tok: object
    word: str = "Rome"
    fingerprint: str = "fake-model-1"
    fail_next: int = 0
    prefills: int = 0
    restores: int = 0
    calls: list[SamplingParams] = field(default_factory=list)
    released: list[FakeHandle] = field(default_factory=list)
    closed: bool = False

    async def prefill_prefix(self, ids, prefix=None):
        self.prefills += 1
        return FakeHandle(list(prefix.tokens if prefix is not None else []) + list(ids))

    async def restore(self, tensors, metadata):
        if metadata.get("model") != self.fingerprint:
            raise ValueError("another model's cache")
        self.restores += 1
        return FakeHandle(tensors["tokens"].tolist())

    async def snapshot(self, handle):
        return FakeSnapshot({"tokens": torch.tensor(handle.tokens, dtype=torch.int64)}, {"model": self.fingerprint})

    async def release(self, handle):
        assert not handle.released, "released twice"
        handle.released = True
        self.released.append(handle)

    async def generate(self, prompt_ids, params, prefix=None):
        assert prefix is not None and not prefix.released, "a question must fork a live prefix"
        self.calls.append(params)
        await asyncio.sleep(0)
        if self.fail_next:
            self.fail_next -= 1
            yield FakeEvent(-1, "", None, True, "error", error="injected failure")
            return
        w = self.tok.encode(self.word)
        ctx = prefix.tokens
        hits = [i + j for i in range(len(ctx) - len(w) + 1) if ctx[i:i + len(w)] == w for j in range(len(w))]
        n = min(len(self.word), params.max_tokens)
        for k, ch in enumerate(self.word[:n]):
            last = k == n - 1
            reason = ("stop" if n == len(self.word) else "length") if last else None
            yield FakeEvent(w[k], ch, -0.5, last, reason, FakeTrace(hits[:params.trace_top], [1.0] * len(hits[:params.trace_top])))

    def close(self):
        self.closed = True


def _backend(rag, engine, **kw) -> LocalBackend:
    # The fake engine answers whatever is asked ("q0?" -> "Rome"): abstention off here; it is
    # tested in test_support.py and test_grounded_answers.py.
    rag.settings.abstain_threshold = 0.0
    return LocalBackend(rag=rag, worker=PackWorker(rag, engine, **kw))


def test_the_fake_engine_implements_the_protocol(rag):
    assert isinstance(FakeEngine(rag.tok), EngineProtocol)
    assert not isinstance(object(), EngineProtocol)


def test_an_answer_through_the_one_path_then_memory_then_another_replica_from_the_store(rag):
    rome = rag.ingest("rome.txt", ROME.encode())
    rag.ingest("paris.txt", PARIS.encode())
    eng = FakeEngine(rag.tok)
    b = _backend(rag, eng, max_new_tokens=3, citations=3)
    p = AskParams.of("Where was the treaty signed?", max_tokens=8, temperature=0.5, seed=7, stop=["\n"])
    a = ask_sync(b, p)
    (pack,) = a["packs"]
    assert a["answer"] == "Rom" and a["finish_reason"] == "length"  # max_tokens capped at max_new_tokens
    assert pack["cache"] == "prefill" and a["usage"]["cached_tokens"] == 0 and a["usage"]["completion_tokens"] == 3
    assert a["score"] == pytest.approx(-0.5)
    assert a["usage"]["prompt_tokens"] == rag.get_pack(pack["pack_id"]).tokens + len(rag.tok.question_ids(p.question))
    assert a["citations"] and {c.document_id for c in a["citations"]} == {rome.id}
    assert all("Rom" in c.snippet for c in a["citations"])
    # the question's sampling reached the engine whole, with what the worker needs added
    sp = eng.calls[-1]
    assert (sp.temperature, sp.seed, sp.stop, sp.top_p) == (0.5, 7, ("\n",), 1.0)
    assert (sp.max_tokens, sp.trace, sp.trace_top, sp.logprobs) == (3, True, TRACE_TOP, True)

    again = ask_sync(b, p)
    assert again["packs"][0]["cache"] == "memory" and again["usage"]["cached_tokens"] > 0 and eng.prefills == 1

    other = FakeEngine(rag.tok)  # another replica: the prefix comes from the KV store
    b2 = _backend(rag, other, replica_id="r2", max_new_tokens=3, citations=3)
    c = ask_sync(b2, p)
    assert c["packs"][0]["cache"] == "store" and other.prefills == 0 and other.restores == 1
    assert c["packs"][0]["replica"] == "r2" and c["answer"] == a["answer"] and c["citations"] == a["citations"]

    b.worker.close()
    assert eng.closed  # the worker owns its engine


def test_document_ids_restrict_the_citations(rag):
    rome = rag.ingest("rome.txt", ROME.encode())
    paris = rag.ingest("paris.txt", PARIS.encode())
    assert rome.packs == paris.packs  # one pack holds both
    b = _backend(rag, FakeEngine(rag.tok))  # attends to "Rome", in rome.txt only
    everything = ask_sync(b, AskParams.of("Where?", max_tokens=4))
    assert {c.document_id for c in everything["citations"]} == {rome.id}
    only_paris = ask_sync(b, AskParams.of("Where?", [paris.id], max_tokens=4))
    assert only_paris["answer"] == "Rome" and only_paris["citations"] == []


def test_events_retries_and_errors(rag):
    rag.ingest("rome.txt", ROME.encode())
    eng = FakeEngine(rag.tok)
    b = _backend(rag, eng)
    p = AskParams.of("Where?", max_tokens=4)

    async def run(retries):
        return [ev async for ev in ask_events(b, None, p, retries=retries)]

    evs = asyncio.run(run(0))
    assert [e["event"] for e in evs] == ["selected"] + ["token"] * 4 + ["done"]
    assert "".join(e["text"] for e in evs if e["event"] == "token") == evs[-1]["answer"] == "Rome"
    assert evs[-1]["primary_pack_id"] == evs[0]["packs"][0]

    eng.fail_next = 1  # fails before its first token: retried transparently
    assert asyncio.run(ask(b, None, p, retries=1))["answer"] == "Rome"
    eng.fail_next = 1
    with pytest.raises(EngineError, match="injected failure"):
        asyncio.run(ask(b, None, p, retries=0))


def test_no_documents(rag):
    with pytest.raises(NoDocuments):
        ask_sync(_backend(rag, FakeEngine(rag.tok)), AskParams("anything?"))


def test_concurrent_questions_over_a_cold_pack_prefill_it_once(rag):
    rag.ingest("rome.txt", ROME.encode())
    eng = FakeEngine(rag.tok)
    b = _backend(rag, eng, warm_packs=1)

    async def many():
        await b.start()
        return await asyncio.gather(*(ask(b, None, AskParams.of(f"q{i}?", max_tokens=2)) for i in range(4)))

    outs = asyncio.run(many())
    assert eng.prefills == 1 and all(o["answer"] == "Ro" for o in outs)
    assert sorted(o["packs"][0]["cache"] for o in outs) == ["memory"] * 3 + ["prefill"]


def test_ask_params():
    p = AskParams.of("q?", ["d1"], "acme", max_tokens=5, temperature=2e-66, stop="\n")
    assert p.document_ids == ("d1",) and p.sampling.temperature == 0.0 and p.sampling.stop == ("\n",)
    assert pickle.loads(pickle.dumps(p)) == p  # crosses Ray handles whole
    with pytest.raises(ValueError):
        AskParams("  ")
    with pytest.raises(ValueError):
        AskParams.of("q?", max_tokens=0)


def test_merge_picks_the_best_and_keeps_all_citations():
    c = lambda d, s: Citation(document_id=d, name=d, page=None, char_start=s, char_end=s + 5, snippet="x")  # noqa: E731
    a = PackResult("pa", "A", -2.0, citations=[c("d1", 0)], prompt_tokens=10, cached_tokens=4, completion_tokens=2)
    b = PackResult("pb", "B", -0.5, citations=[c("d2", 0), c("d1", 0)], prompt_tokens=7, completion_tokens=3)
    out = merge([a, b])
    assert out["answer"] == "B" and out["pack_id"] == "pb" and out["score"] == -0.5
    assert [(x.document_id, x.char_start) for x in out["citations"]] == [("d2", 0), ("d1", 0)]
    assert out["usage"] == {"prompt_tokens": 17, "cached_tokens": 4, "completion_tokens": 5}
    assert merge([])["answer"] == "" and merge([PackResult("p")])["score"] is None
