"""`engine: openai`: the EngineProtocol over one or more OpenAI-compatible `/v1/completions`
upstreams (vLLM, SGLang, or this project's own `dsa-rag engine-server`), for teams that already
serve DeepSeek-V3.2 / V4 / GLM-5 there and want this service's document side, not a second copy
of the model.

    from dsa_rag.model.engine.factory import load_engine
    engine = load_engine("/ckpt/DeepSeek-V3.2", tokenizer=tok, backend="openai",
                         upstream_urls=["http://vllm-0:8000", "http://vllm-1:8000"])
    pack = await engine.prefill_prefix(pack_ids)          # warms the upstream's prefix cache (1 token)
    async for ev in engine.generate(question_ids, SamplingParams(max_tokens=64), prefix=pack):
        ev.text, ev.logprob, ev.usage     # usage on the last event: the upstream's, cached tokens included

What is kept where:
- The prefix KV lives in the upstream's own prefix cache (vLLM APC / SGLang radix cache), keyed
  by the prompt's token ids. A prefix handle here is only the pack's token ids; every request
  sends the whole prompt (pack ids + question ids, tokenized locally with the checkpoint's
  tokenizer.json, the same ids every time), so the upstream finds the pack's blocks and computes
  only the question. `snapshot` stores just the ids (the service's KV store then knows the pack
  was warmed); no KV bytes come back from an upstream.
- Pack affinity: a pack's requests always go to the same endpoint (rendezvous hashing of its
  token ids over the endpoints), so its prefix stays warm in one upstream's cache. An endpoint
  that refuses connections is skipped for `down_s` seconds (its packs move to their next-ranked
  endpoint, and come back when it does); one that answers 429 / 503 (back-pressure) is skipped for
  this request only.
- Usage: the upstream's `usage` (prompt, completion and `prompt_tokens_details.cached_tokens`) is
  on the last event (`ev.usage`), asked for with `stream_options.include_usage`.
- No attention traces: events have `trace=None`, and the service cites by lexical overlap
  (rag_service/ask/lexical_citations.py). Log-probs: `logprobs: 1` (the sampled token's), so
  the service can still score pack answers against each other.

Failures end the stream with an event of finish_reason "error", `error` (what happened, which
endpoint, what to do) and `error_code`, which the service maps to its error hierarchy
(rag_service/ask/upstream_errors.py): "upstream_busy" (every endpoint answered 429 / 503;
`retry_after` s), "upstream_unavailable" (none reachable), "upstream_timeout" (no byte for
`timeout_s`), "upstream_error" (an error status, a broken or cut stream).

Tests: `.venv/bin/python -m pytest -q tests/service/test_upstream.py` (a real engine-server process).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Sequence

import httpx
import torch

from dsa_rag.model.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "openai-upstream/1"
AFFINITY_TOKENS = 1 << 20  # tokens of the prompt hashed for affinity (the whole pack in practice)


@dataclass(eq=False)
class UpstreamPrefix:
    """A pack prompt the upstream has (probably) cached: its token ids and their affinity key."""

    tokens: list[int]
    key: bytes = b""

    def __post_init__(self):
        if not self.key:
            self.key = affinity_key(self.tokens)


@dataclass
class UpstreamSnapshot:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


@dataclass
class UpstreamEvent:
    """A TokenEventProtocol event, plus what only an upstream says: usage, error_code, endpoint."""

    token_id: int
    text: str
    logprob: float | None
    finished: bool = False
    finish_reason: str | None = None
    trace: None = None  # upstreams return no attention
    error: str | None = None
    error_code: str | None = None
    retry_after: float | None = None
    usage: dict | None = None
    endpoint: str | None = None


def affinity_key(tokens: Sequence[int]) -> bytes:
    return hashlib.sha256(json.dumps(list(tokens[:AFFINITY_TOKENS])).encode()).digest()


def rank_endpoints(key: bytes, urls: Sequence[str]) -> list[str]:
    """Rendezvous (highest random weight) order: stable per key, and removing an endpoint moves
    only the keys it owned."""
    return sorted(urls, key=lambda u: hashlib.sha256(key + u.encode()).digest(), reverse=True)


class _Failure(Exception):
    def __init__(self, code: str, message: str, *, retry_after: float | None = None, next_endpoint: bool = False,
                 down: bool = False):
        super().__init__(message)
        self.code, self.retry_after, self.next_endpoint, self.down = code, retry_after, next_endpoint, down


def _token_id(tok_str: str | None, text: str, tokenizer) -> int:
    """The sampled token's id: vLLM's "token_id:N" (return_tokens_as_token_ids), else the local
    tokenizer's single id for the token's text, else 0 (a placeholder: only its sign is used)."""
    if tok_str and tok_str.startswith("token_id:"):
        try:
            return int(tok_str[9:])
        except ValueError:
            pass
    if tokenizer is not None and (tok_str or text):
        ids = tokenizer.encode(tok_str or text)
        if len(ids) == 1:
            return ids[0]
    return 0


class OpenAIUpstreamEngine:
    """EngineProtocol over OpenAI-compatible completions endpoints (see the module docstring).

    urls: base URLs ("http://host:8000" or ".../v1"). model: the upstream's served model name
    (None: the first id of the first reachable endpoint's /v1/models). tokenizer: the local one
    (token ids of streamed tokens when the upstream does not give them). timeout_s: the longest
    wait for the next byte of a response (a prefill of a cold 128k pack included: set it above
    that). connect_timeout_s: to open a connection. down_s: how long an endpoint that refused
    connections is skipped. warm_prefill: prefill_prefix sends the pack (max_tokens 1) so its
    first question finds it cached."""

    def __init__(self, urls: Sequence[str], *, model: str | None = None, tokenizer=None, timeout_s: float = 120.0,
                 connect_timeout_s: float = 5.0, api_key: str | None = None, down_s: float = 30.0,
                 warm_prefill: bool = True):
        urls = [u.strip().rstrip("/") for u in urls if u and u.strip()]
        if not urls:
            raise ValueError("engine `openai` needs at least one upstream URL (DSA_RAG_UPSTREAM_URLS="
                             "http://host:8000[,http://host2:8000])")
        self.urls = [u[:-3] if u.endswith("/v1") else u for u in urls]
        self.model, self.tokenizer = model, tokenizer
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.down_s, self.warm_prefill = down_s, warm_prefill
        self._down_until: dict[str, float] = {}
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = {}
        ident = model or ",".join(sorted(self.urls))
        self._fingerprint = hashlib.sha256(f"{SNAPSHOT_FORMAT}:{ident}".encode()).hexdigest()[:32]

    # --- protocol: identity and prefixes -------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """The upstream's model name (or its URLs): the service's KV store keys packs by it."""
        return self._fingerprint

    async def prefill_prefix(self, ids: list[int], prefix: UpstreamPrefix | None = None) -> UpstreamPrefix:
        handle = UpstreamPrefix((list(prefix.tokens) if prefix is not None else []) + [int(t) for t in ids])
        if not handle.tokens:
            raise ValueError("empty prefix: give at least one token")
        if self.warm_prefill:  # best effort: the question itself reports any upstream failure
            async for ev in self._complete(handle.tokens, SamplingParams(max_tokens=1, logprobs=False), handle.key):
                if ev.finish_reason == "error":
                    log.warning("warming pack prefix upstream failed (%s); its first question prefills it", ev.error)
        return handle

    async def restore(self, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> UpstreamPrefix:
        if metadata.get("format") != SNAPSHOT_FORMAT or metadata.get("fingerprint") != self.fingerprint:
            raise ValueError(f"not an {SNAPSHOT_FORMAT} snapshot of this upstream model "
                             f"(format {metadata.get('format')!r})")
        return UpstreamPrefix([int(t) for t in tensors["tokens"].tolist()])

    async def snapshot(self, handle: UpstreamPrefix) -> UpstreamSnapshot:
        return UpstreamSnapshot({"tokens": torch.tensor(handle.tokens, dtype=torch.int64)},
                                {"format": SNAPSHOT_FORMAT, "fingerprint": self.fingerprint,
                                 "tokens": str(len(handle.tokens))})

    async def release(self, handle: UpstreamPrefix) -> None:
        return None  # the upstream's cache evicts on its own

    def close(self) -> None:
        clients, self._clients = self._clients, {}
        for loop, c in clients.values():  # close on their own loops when those still run
            if not loop.is_closed() and loop.is_running():
                loop.call_soon_threadsafe(lambda c=c: asyncio.ensure_future(c.aclose()))

    # --- protocol: generation ------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       prefix: UpstreamPrefix | None = None) -> AsyncIterator[UpstreamEvent]:
        tokens = (list(prefix.tokens) if prefix is not None else []) + [int(t) for t in prompt_ids]
        key = prefix.key if prefix is not None else affinity_key(tokens)
        async for ev in self._complete(tokens, params, key):
            yield ev

    # --- the HTTP side -------------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        """One client per event loop (ask_sync runs each question in a fresh loop)."""
        loop = asyncio.get_running_loop()
        hit = self._clients.get(id(loop))
        if hit is None or hit[0] is not loop:
            for k, (lp, _) in list(self._clients.items()):
                if lp.is_closed():
                    del self._clients[k]
            hit = self._clients[id(loop)] = (loop, httpx.AsyncClient(timeout=self.timeout, headers=self.headers))
        return hit[1]

    def endpoints(self, key: bytes) -> list[str]:
        """The endpoints to try for a pack, its own first; endpoints marked down go last."""
        now = time.monotonic()
        ranked = rank_endpoints(key, self.urls)
        return [u for u in ranked if self._down_until.get(u, 0) <= now] + \
               [u for u in ranked if self._down_until.get(u, 0) > now]

    async def _model_name(self, client: httpx.AsyncClient, url: str) -> str:
        if self.model is None:
            r = await client.get(f"{url}/v1/models")
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]
        return self.model

    def _body(self, model: str, tokens: list[int], p: SamplingParams) -> dict:
        body = {"model": model, "prompt": tokens, "max_tokens": p.max_tokens, "temperature": p.temperature,
                "top_p": p.top_p, "stream": True, "stream_options": {"include_usage": True},
                # vLLM: logprobs.tokens as "token_id:N", so streamed tokens keep their ids
                "return_tokens_as_token_ids": True}
        if p.logprobs:
            body["logprobs"] = 1
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if p.stop_token_ids is not None:
            body["stop_token_ids"] = list(p.stop_token_ids)
        return body

    async def _complete(self, tokens: list[int], params: SamplingParams, key: bytes) -> AsyncIterator[UpstreamEvent]:
        client = self._client()
        failures: list[_Failure] = []
        for url in self.endpoints(key):
            produced = False
            try:
                async for ev in self._stream(client, url, tokens, params):
                    produced = True
                    yield ev
                return
            except _Failure as f:
                failures.append(f)
                if f.down:
                    self._down_until[url] = time.monotonic() + self.down_s
                if produced or not f.next_endpoint:
                    yield self._error(f, url)
                    return
                log.warning("%s; trying the next endpoint", f)
        # every endpoint failed before a token: busy if any was busy, else unreachable
        busy = [f for f in failures if f.code == "upstream_busy"]
        last = busy[-1] if busy else failures[-1]
        code = "upstream_busy" if busy else last.code
        msg = (f"all {len(self.urls)} upstream endpoint(s) failed; last: {last}")
        yield self._error(_Failure(code, msg, retry_after=last.retry_after), None)

    def _error(self, f: _Failure, url: str | None) -> UpstreamEvent:
        return UpstreamEvent(-1, "", None, True, "error", error=str(f), error_code=f.code, retry_after=f.retry_after,
                             endpoint=url)

    async def _stream(self, client: httpx.AsyncClient, url: str, tokens: list[int], params: SamplingParams
                      ) -> AsyncIterator[UpstreamEvent]:
        """One upstream request; raises _Failure (next_endpoint=True when nothing was received)."""
        n_out = 0
        try:
            model = await self._model_name(client, url)
            async with client.stream("POST", f"{url}/v1/completions", json=self._body(model, tokens, params)) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")[:500]
                    retry = r.headers.get("retry-after")
                    retry_s = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
                    if r.status_code in (429, 503):
                        raise _Failure("upstream_busy", f"upstream {url} is busy ({r.status_code}): {text}",
                                       retry_after=retry_s, next_endpoint=True)
                    raise _Failure("upstream_error", f"upstream {url} answered {r.status_code}: {text}",
                                   next_endpoint=r.status_code >= 500)
                final: UpstreamEvent | None = None
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        if final is None:
                            raise _Failure("upstream_error", f"upstream {url} ended the stream after {n_out} tokens "
                                           f"without a finish_reason")
                        yield final
                        return
                    obj = json.loads(data)
                    if "error" in obj:
                        err = obj["error"]
                        raise _Failure("upstream_error", f"upstream {url} failed mid-stream after {n_out} tokens: "
                                       f"{err.get('message', err) if isinstance(err, dict) else err}")
                    if obj.get("usage") and final is not None:
                        final.usage = _usage(obj["usage"])
                    for ch in obj.get("choices") or ():
                        lp = ch.get("logprobs") or {}
                        toks = lp.get("tokens") or [None]
                        lps = lp.get("token_logprobs") or [None] * len(toks)
                        for i, (t, l) in enumerate(zip(toks, lps)):
                            last = i == len(toks) - 1
                            text = ch.get("text", "") if last else ""
                            if t is None and not text and not ch.get("finish_reason"):
                                continue  # an empty keep-alive chunk
                            n_out += 1
                            ev = UpstreamEvent(_token_id(t, text, self.tokenizer), text, l, endpoint=url)
                            if last and ch.get("finish_reason"):
                                ev.finished, ev.finish_reason = True, ("length" if ch["finish_reason"] == "length"
                                                                       else "stop")
                                final = ev  # held until the usage chunk and [DONE]
                            else:
                                yield ev
                raise _Failure("upstream_error", f"upstream {url} closed the stream after {n_out} tokens "
                               f"without [DONE]")
        except _Failure as f:
            f.next_endpoint = f.next_endpoint and n_out == 0
            raise
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise _Failure("upstream_unavailable", f"upstream {url} is unreachable ({type(e).__name__}: {e}); "
                           f"check that it runs and DSA_RAG_UPSTREAM_URLS", next_endpoint=True, down=True) from None
        except (httpx.ReadTimeout, httpx.PoolTimeout, httpx.WriteTimeout) as e:
            raise _Failure("upstream_timeout", f"upstream {url} sent nothing for {self.timeout_s:g}s after "
                           f"{n_out} tokens ({type(e).__name__}); raise DSA_RAG_UPSTREAM_TIMEOUT_S for cold "
                           f"long packs, or check the upstream's load") from None
        except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError) as e:
            raise _Failure("upstream_error", f"upstream {url} broke the stream after {n_out} tokens "
                           f"({type(e).__name__}: {e})", next_endpoint=n_out == 0, down=n_out == 0) from None


def _usage(u: dict) -> dict:
    details = u.get("prompt_tokens_details") or {}
    return {"prompt_tokens": int(u.get("prompt_tokens") or 0),
            "completion_tokens": int(u.get("completion_tokens") or 0),
            "cached_tokens": int(details.get("cached_tokens") or 0)}
