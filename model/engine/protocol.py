"""The engine interface the RAG service depends on: an async engine that prefills or restores a
prompt prefix, snapshots it for the KV store, forks it for a question and streams the answer's
tokens with their log-probs and attention traces. `dsa_rag.model.engine.engine.AsyncEngine` is
one implementation (`dsa_rag.model.engine.factory.load_engine` builds it); another backend (e.g.
an OpenAI-compatible vLLM / SGLang upstream) implements these Protocols and the service stays as
it is.

    from dsa_rag.model.engine.factory import load_engine
    from dsa_rag.model.engine.protocol import EngineProtocol
    from dsa_rag.model.engine.sampling import SamplingParams
    engine: EngineProtocol = load_engine("dsa-tiny", device="cpu")
    pack = await engine.prefill_prefix(prompt_ids)              # or: await engine.restore(tensors, metadata)
    snap = await engine.snapshot(pack)                          # snap.tensors, snap.metadata -> KV store
    async for ev in engine.generate(question_ids, SamplingParams(max_tokens=32, trace=True), prefix=pack):
        ev.text, ev.logprob, ev.trace.positions if ev.trace else None
    await engine.release(pack); engine.close()

Runtime-checkable, so `isinstance(x, EngineProtocol)` checks the members are there (not their
signatures). Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_engine_protocol.py`.
"""

from __future__ import annotations

import inspect
from typing import Any, AsyncIterator, Mapping, Protocol, Sequence, runtime_checkable

from dsa_rag.model.engine.sampling import SamplingParams

__all__ = ["EngineProtocol", "PrefixHandleProtocol", "SnapshotProtocol", "TokenEventProtocol", "TraceProtocol",
           "accepts_progress"]


@runtime_checkable
class PrefixHandleProtocol(Protocol):
    """A cached, read-only prompt prefix the engine can fork for many questions."""

    @property
    def tokens(self) -> list[int]:
        """The prefix's token ids (what its cache holds)."""
        ...


@runtime_checkable
class SnapshotProtocol(Protocol):
    """A prefix cache as flat tensors plus str -> str metadata (what a safetensors file holds)."""

    @property
    def tensors(self) -> Mapping[str, Any]: ...

    @property
    def metadata(self) -> Mapping[str, str]: ...


@runtime_checkable
class TraceProtocol(Protocol):
    """What the attention read for one generated token: context positions, most mass first."""

    @property
    def positions(self) -> Sequence[int]: ...

    @property
    def mass(self) -> Sequence[float]: ...


@runtime_checkable
class TokenEventProtocol(Protocol):
    """One generated token. token_id < 0: the request ended without a token (finish_reason
    "abort", or "error" with `error` saying why). text may be "" (an incomplete UTF-8 character
    or a possible stop string held back). finish_reason: "stop" | "length" | "abort" | "error".

    Optional, read with getattr (an upstream backend, model/engine/upstream.py, sets them):
    `usage` on the last event ({prompt_tokens, completion_tokens, cached_tokens}: the engine's own
    count of what its prefix cache held), `error_code` / `retry_after` on an "error" event (which
    kind of failure: rag_service/ask/upstream_errors.py maps it to an HTTP status)."""

    @property
    def token_id(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def logprob(self) -> float | None: ...

    @property
    def finished(self) -> bool: ...

    @property
    def finish_reason(self) -> str | None: ...

    @property
    def trace(self) -> TraceProtocol | None: ...

    @property
    def error(self) -> str | None: ...


@runtime_checkable
class EngineProtocol(Protocol):
    """The async engine a model replica drives (one per replica; many concurrent questions)."""

    @property
    def fingerprint(self) -> str:
        """Identifies the model weights: prefix caches are keyed by it and only restore on it."""
        ...

    async def prefill_prefix(self, ids: list[int], prefix: PrefixHandleProtocol | None = None
                             ) -> PrefixHandleProtocol:
        """Prefill `ids` (after `prefix`, when given: an older prefix they extend) as a new prefix.

        Optional extension: an engine may also take `progress=callable(done_tokens, total_tokens)`,
        called on the caller's event loop as chunks land (AsyncEngine does). It is not part of
        the required signature, so older engines still conform; callers check with
        `accepts_progress(engine)` before passing it."""
        ...

    async def restore(self, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> PrefixHandleProtocol:
        """A prefix from a snapshot's tensors and metadata. ValueError: not restorable here
        (another model's cache, a broken file); the caller prefills instead."""
        ...

    async def snapshot(self, handle: PrefixHandleProtocol) -> SnapshotProtocol:
        """The prefix's cache as tensors + metadata, for the KV store."""
        ...

    async def release(self, handle: PrefixHandleProtocol) -> None:
        """No new question needs the prefix: free it (running questions keep what they share)."""
        ...

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 prefix: PrefixHandleProtocol | None = None) -> AsyncIterator[TokenEventProtocol]:
        """Stream the tokens generated after prefix + prompt_ids (an async generator); the last
        event has finished=True. Closing the iterator early aborts the request."""
        ...

    def close(self) -> None:
        """Stop the engine's worker (the owner calls it once, when the replica shuts down)."""
        ...


def accepts_progress(engine) -> bool:
    """Whether `engine.prefill_prefix` takes the optional `progress=` keyword (see above)."""
    try:
        params = inspect.signature(engine.prefill_prefix).parameters
    except (TypeError, ValueError):  # a builtin or an odd callable: assume the plain signature
        return False
    return "progress" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
