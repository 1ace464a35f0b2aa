"""Answering: pack prompt -> prefix KV (replica memory, else the KV store, else prefill) ->
question -> streamed answer with a model score and citations from the sparse attention trace.

    from rag_service.answer import PackWorker, answer
    worker = PackWorker(rag, "dsa-tiny")                # one per model replica (heavy: loads weights)
    out = answer(rag, worker, "What was the revenue?")  # {"answer", "citations", "usage", "timings", ...}
    for ev in worker.stream(pack_id, "question", max_tokens=32):   # the per-pack stream
        ...  # {"event": "start"|"token"|"end", ...}

Per pack (`PackWorker.stream`):
  1. key = KVStore.key_for(model fingerprint, tenant, pack prompt ids);
  2. the prefix cache comes from the replica's memory (LRU of `warm_packs`), else from the KV store
     (safetensors in the blob dir, metadata in Redis: another replica or node prefilled it), else
     it is prefilled here, snapshotted and stored for everyone;
  3. a private copy (fork) of the prefix gets the question tokens, then decode: greedy at
     temperature 0, seeded sampling otherwise; stops at <eos> or max_tokens;
  4. score = mean log-prob of the answer tokens under the model (untempered);
     citations = prompt positions with the most attention mass (summed over layers, heads and
     answer tokens, from the indexer-selected keys the sparse attention read), mapped through the
     pack layout to (document, name, page, char span, snippet).
`merge` picks the best pack answer by score, keeps every pack's citations (best pack's first)
and sums usage {prompt_tokens, cached_tokens, completion_tokens}.

The engine behind `PackWorker` is `_TorchPrefixEngine`, a minimal prefill / snapshot / restore /
fork / decode loop over `model.model.Transformer` and `model.cache`; it imports neither FastAPI
nor Ray. Tests: `.venv/bin/python -m pytest -q tests/service`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

import torch

from model.tokenizer import IncrementalDecoder
from rag_service.layout import PackLayout
from rag_service.schemas import Citation

log = logging.getLogger(__name__)

PREFILL_CHUNK = 4096  # tokens per prefill forward: bounds the [T, S] indexer logits


# ------------------------------------------------------------------ engine
class _TorchPrefixEngine:
    """Prefill / snapshot / restore / fork / decode of one sequence at a time over the model's
    contiguous per-layer caches. Thread-safe: every forward runs under `lock`."""

    def __init__(self, model_name: str = "dsa-tiny", device: str = "cpu"):
        from model.load import load_model

        self.model = load_model(model_name, device=device)
        self.cfg = self.model.cfg
        self.device = device
        self.lock = threading.RLock()
        self.fingerprint = _fingerprint(model_name, self.model)

    def _new_caches(self):
        from model.cache import new_sequence_cache

        return new_sequence_cache(self.cfg.num_hidden_layers)

    @torch.no_grad()
    def forward(self, ids: list[int], start: int, caches, trace=None) -> torch.Tensor:
        """Append `ids` at `start` to `caches` -> logits of the last token [vocab] (fp32)."""
        logits = None
        for i in range(0, len(ids), PREFILL_CHUNK):
            part = torch.tensor([ids[i:i + PREFILL_CHUNK]], device=self.device)
            with self.lock:
                logits = self.model(part, start + i, [caches], trace=trace, last_only=True)
        return logits[0, -1]

    def prefill(self, ids: list[int]):
        caches = self._new_caches()
        self.forward(ids, 0, caches)
        return caches

    @staticmethod
    def snapshot(caches, n: int) -> dict[str, torch.Tensor]:
        out = {}
        for i, c in enumerate(caches):
            out[f"layers.{i}.kv"] = c.kv(n).contiguous().clone()
            out[f"layers.{i}.index_k"] = c.index_k(n).contiguous().clone()
            s = c.index_scale(n)
            if s is not None:
                out[f"layers.{i}.index_scale"] = s.contiguous().clone()
        return out

    def restore(self, tensors: dict[str, torch.Tensor]):
        caches = self._new_caches()
        for i, c in enumerate(caches):
            kv = tensors[f"layers.{i}.kv"].to(self.device)
            c.write(0, kv, tensors[f"layers.{i}.index_k"].to(self.device),
                    None if f"layers.{i}.index_scale" not in tensors else tensors[f"layers.{i}.index_scale"].to(self.device))
        return caches

    def fork(self, caches, n: int):
        new = self._new_caches()
        for src, dst in zip(caches, new):
            dst.write(0, src.kv(n), src.index_k(n), src.index_scale(n))
        return new


def _fingerprint(name: str, model) -> str:
    """Model identity for prefix-cache keys: config + a sample of every weight tensor."""
    import dataclasses

    h = hashlib.sha256(name.encode())
    h.update(json.dumps(dataclasses.asdict(model.cfg), sort_keys=True, default=str).encode())
    for k, t in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(t.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


# ------------------------------------------------------------------ per-pack answers
@dataclass
class PackResult:
    pack_id: str
    text: str = ""
    score: float = float("-inf")
    cache: str = "prefill"
    replica: str = ""
    finish_reason: str = "stop"
    citations: list[Citation] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_end_event(cls, ev: dict) -> "PackResult":
        return cls(
            pack_id=ev["pack_id"], text=ev["text"], score=ev["score"], cache=ev["cache"],
            replica=ev.get("replica", ""), finish_reason=ev["finish_reason"],
            citations=[Citation(**c) for c in ev["citations"]], prompt_tokens=ev["usage"]["prompt_tokens"],
            cached_tokens=ev["usage"]["cached_tokens"], completion_tokens=ev["usage"]["completion_tokens"],
            timings=ev.get("timings", {}),
        )


class PackWorker:
    """The model side of one replica: engine, warm prefix caches (memory LRU), the KV store."""

    def __init__(self, rag, model: str = "dsa-tiny", *, replica_id: str = "local", warm_packs: int = 8,
                 citations: int = 5, max_new_tokens: int = 512, engine=None):
        self.rag = rag
        self.engine = engine or _TorchPrefixEngine(model)
        self.replica_id = replica_id
        self.warm_limit = warm_packs
        self.citations = citations
        self.max_new_tokens = max_new_tokens
        self._warm: OrderedDict[str, tuple] = OrderedDict()  # cache key -> (caches, n tokens)
        self._prompts: OrderedDict[str, tuple] = OrderedDict()  # pack id -> (ids, layout, key)
        self._lock = threading.Lock()
        self.counters = {"memory": 0, "store": 0, "prefill": 0, "requests": 0}

    @property
    def fingerprint(self) -> str:
        return self.engine.fingerprint

    # --- prompts and prefix caches -----------------------------------------------------------------
    def _prompt(self, pack_id: str) -> tuple[list[int], PackLayout, str]:
        with self._lock:
            hit = self._prompts.get(pack_id)
            if hit is not None:
                self._prompts.move_to_end(pack_id)
                return hit
        ids, layout = self.rag.pack_prompt(pack_id)  # pack ids are immutable: a rebuild gets a new id
        key = self.rag.kv.key_for(self.fingerprint, self.rag.get_pack(pack_id).tenant, ids)
        with self._lock:
            self._prompts[pack_id] = (ids, layout, key)
            while len(self._prompts) > max(4 * self.warm_limit, 16):
                self._prompts.popitem(last=False)
        return ids, layout, key

    def prefix(self, pack_id: str) -> tuple[object, list[int], PackLayout, str]:
        """-> (prefix caches, ids, layout, source) with source memory | store | prefill."""
        ids, layout, key = self._prompt(pack_id)
        with self._lock:
            warm = self._warm.get(key)
            if warm is not None:
                self._warm.move_to_end(key)
                self.counters["memory"] += 1
                return warm[0], ids, layout, "memory"
        entry = self.rag.kv.get(key)
        if entry is not None and int(entry.metadata.get("tokens", -1)) == len(ids):
            caches, source = self.engine.restore(entry.tensors), "store"
        else:
            caches, source = self.engine.prefill(ids), "prefill"
            try:
                self.rag.kv.put(key, self.engine.snapshot(caches, len(ids)),
                                {"tokens": str(len(ids)), "model": self.fingerprint},
                                pack_id=pack_id, model=self.fingerprint, tokens=len(ids))
            except Exception:  # the answer does not depend on the store; the next replica re-prefills
                log.exception("storing the prefix cache of pack %s failed", pack_id)
        with self._lock:
            self.counters[source] += 1
            if self.warm_limit:
                self._warm[key] = (caches, len(ids))
                while len(self._warm) > self.warm_limit:
                    self._warm.popitem(last=False)
        return caches, ids, layout, source

    def warm(self, pack_id: str) -> str:
        """Make the pack's prefix warm in this replica (background prefill). -> cache source."""
        return self.prefix(pack_id)[3]

    def warm_pack_ids(self) -> list[str]:
        with self._lock:
            keys = set(self._warm)
            return [p for p, (_, _, k) in self._prompts.items() if k in keys]

    def stats(self) -> dict:
        with self._lock:
            return {"replica": self.replica_id, "warm_packs": len(self._warm), **self.counters}

    # --- one pack, streamed ---------------------------------------------------------------------
    def stream(self, pack_id: str, question: str, max_tokens: int = 64, temperature: float = 0.0,
               seed: int | None = None) -> Iterator[dict]:
        """Events: start {pack_id, cache, prompt_tokens, cached_tokens, replica}; token {text,
        token_id, logprob} per generated token; end {text, score, citations, usage, timings}."""
        t0 = time.perf_counter()
        self.counters["requests"] += 1
        max_tokens = max(1, min(int(max_tokens), self.max_new_tokens))
        prefix, ids, layout, source = self.prefix(pack_id)
        n = len(ids)
        t_prefix = time.perf_counter()
        tok = self.rag.tok
        q_ids = tok.question_ids(question)
        cached = n if source != "prefill" else 0
        yield {"event": "start", "pack_id": pack_id, "cache": source, "prompt_tokens": n + len(q_ids),
               "cached_tokens": cached, "replica": self.replica_id}

        caches = self.engine.fork(prefix, n)
        mass = torch.zeros(n, dtype=torch.float32)

        def trace(layer, row, idx, m):  # idx [T, k] prompt positions (-1 = none), m [T, k]
            sel = (idx >= 0) & (idx < n)
            if sel.any():
                mass.index_add_(0, idx[sel].long().cpu(), m[sel].float().cpu())

        gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        dec = IncrementalDecoder(tok)
        logits = self.engine.forward(q_ids, n, caches, trace=trace)
        pos, logps, out_ids, text, finish = n + len(q_ids), [], [], [], "length"
        t_first = None
        for _ in range(max_tokens):
            lp = torch.log_softmax(logits.float(), -1)
            if temperature <= 0:
                t = int(torch.argmax(lp))
            else:
                t = int(torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=gen))
            if t == tok.eos_id:
                finish = "stop"
                break
            out_ids.append(t)
            logps.append(float(lp[t]))
            piece = dec.push(t)
            text.append(piece)
            if t_first is None:
                t_first = time.perf_counter()
            yield {"event": "token", "pack_id": pack_id, "text": piece, "token_id": t, "logprob": logps[-1]}
            if len(out_ids) == max_tokens:
                break
            logits = self.engine.forward([t], pos, caches, trace=trace)
            pos += 1
        tail = dec.flush()
        if tail:
            text.append(tail)
            yield {"event": "token", "pack_id": pack_id, "text": tail, "token_id": -1, "logprob": 0.0}
        t_end = time.perf_counter()
        top = torch.topk(mass, min(64, n)).indices.tolist() if mass.sum() > 0 else []
        citations = layout.cite(top, max_citations=self.citations) if self.citations else []
        decode_s = t_end - (t_first or t_end)
        yield {
            "event": "end", "pack_id": pack_id, "text": "".join(text),
            "score": sum(logps) / len(logps) if logps else float("-inf"), "cache": source,
            "replica": self.replica_id, "finish_reason": finish,
            "citations": [c.model_dump() for c in citations],
            "usage": {"prompt_tokens": n + len(q_ids), "cached_tokens": cached, "completion_tokens": len(out_ids)},
            "timings": {
                "prefix_s": t_prefix - t0, "first_token_s": (t_first or t_end) - t0, "total_s": t_end - t0,
                "tokens_per_s": (len(out_ids) - 1) / decode_s if len(out_ids) > 1 and decode_s > 0 else 0.0,
            },
        }


# ------------------------------------------------------------------ merging
def merge(results: list[PackResult]) -> dict:
    """Best answer by score; every pack's citations kept (best pack's first, duplicates dropped);
    usage summed over packs."""
    if not results:
        return {"answer": "", "pack_id": None, "score": None, "finish_reason": "stop", "citations": [],
                "packs": [], "usage": {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0}}
    best = max(results, key=lambda r: r.score)
    ordered = [best] + [r for r in results if r is not best]
    seen, cites = set(), []
    for r in ordered:
        for c in r.citations:
            k = (c.document_id, c.char_start, c.char_end)
            if k not in seen:
                seen.add(k)
                cites.append(c)
    return {
        "answer": best.text, "pack_id": best.pack_id, "score": best.score if best.score > float("-inf") else None,
        "finish_reason": best.finish_reason, "citations": cites,
        "packs": [{"pack_id": r.pack_id, "answer": r.text, "score": r.score if r.score > float("-inf") else -1e9,
                   "cache": r.cache, "replica": r.replica, "finish_reason": r.finish_reason,
                   "citations": r.citations} for r in results],
        "usage": {
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "cached_tokens": sum(r.cached_tokens for r in results),
            "completion_tokens": sum(r.completion_tokens for r in results),
        },
    }


def answer(rag, worker: PackWorker, question: str, document_ids: list[str] | None = None, *,
           max_tokens: int = 64, temperature: float = 0.0, tenant: str = "default", seed: int | None = None) -> dict:
    """The whole question path in one process (no Ray, no HTTP): select packs, answer each, merge."""
    t0 = time.perf_counter()
    selections = rag.select_packs(question, document_ids, tenant)
    t_sel = time.perf_counter()
    results, first = [], None
    for sel in selections:
        for ev in worker.stream(sel.pack_id, question, max_tokens, temperature, seed):
            if ev["event"] == "token" and first is None:
                first = time.perf_counter()
            if ev["event"] == "end":
                results.append(PackResult.from_end_event(ev))
    out = merge(results)
    t_end = time.perf_counter()
    out["timings"] = {"select_s": t_sel - t0, "first_token_s": (first or t_end) - t0, "total_s": t_end - t0}
    return out
