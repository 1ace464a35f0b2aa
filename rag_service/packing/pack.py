"""Packing: whole documents into packs of at most `pack_capacity` prompt tokens, in Redis.

    store = PackStore(redis_client, Keys("rag"), settings)
    plans = plan_members(tokenizer, tt, name, settings.pack_capacity, settings.pack_overlap)
    pack_ids = store.add_document("default", doc_id, name, plans, check=..., write=...)

Rules (DESIGN.md "packs"):
- A pack's prompt prefix is `<bos> (doc_head(name) text doc_tail)*` (`<doc> name\\n text </doc>`
  for the byte tokenizer); a document costs `dsa_rag.model.tokenizer.doc_cost` tokens (its markers plus
  len(encode(text)), each encoded alone). A pack holds <= capacity tokens, <bos> included.
- A new document goes into the fullest open pack of its tenant that has room (best fit), else
  into a new open pack. A pack with less than `pack_seal_free_tokens` room is sealed; beyond
  `max_open_packs` open packs the fullest is sealed. A sealed pack never changes, so a KV cache
  computed for it stays valid. (Appending to an open pack only extends its prompt.)
- A document longer than one pack becomes consecutive windows overlapping by `pack_overlap`
  tokens, each window a sealed pack of its own that records its character range.
- Deleting a document rebuilds each pack it was in under a NEW pack id (version + 1,
  `previous` = old id) without it; the caller invalidates the old id's KV cache entries.

Concurrency: every pack mutation of a tenant runs as an optimistic transaction that WATCHes
the tenant's `packstate` counter (and the document key), reads, computes, then MULTI/EXEC
with the counter incremented; a concurrent mutation makes EXEC fail and the work is redone.
So two processes ingesting at once can neither overfill a pack nor lose an assignment.

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_chunk_pack.py`.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import redis

from dsa_rag.model.tokenizer import doc_cost
from dsa_rag.rag_service.parsing.chunk import TextTokens, spans
from dsa_rag.rag_service.errors import BadRequest, ConflictError, NotFound
from dsa_rag.rag_service.stores.redis_store import Keys
from dsa_rag.rag_service.schemas import PackInfo, PackMember
from dsa_rag.rag_service.settings import RagSettings


@dataclass(frozen=True)
class MemberPlan:
    """A document (window) to place: text[char_start:char_end] costing `tokens` in a prompt."""

    char_start: int
    char_end: int
    tokens: int
    window: int = 0
    windows: int = 1


def plan_members(tokenizer, tt: TextTokens, name: str, capacity: int, overlap: int) -> list[MemberPlan]:
    """One plan for a document that fits a pack, else its windows (each fits alone)."""
    markers = doc_cost(tokenizer, name, 0)
    whole = markers + tt.total
    if 1 + whole <= capacity:
        return [MemberPlan(0, tt.n, whole)]
    budget = capacity - 1 - markers
    if budget < 16:
        raise BadRequest(
            f"the name leaves {budget} tokens per window of {capacity}; upload it under a shorter name",
            filename=name,
        )
    overlap = min(overlap, budget // 4)
    cuts = spans(tt, 0, tt.n, budget, overlap)
    return [
        MemberPlan(a, b, markers + tt.tokens(a, b), i, len(cuts))
        for i, (a, b) in enumerate(cuts)
    ]


def new_pack_id() -> str:
    return "pk_" + uuid.uuid4().hex[:20]


def _pack_from_hash(h: dict) -> PackInfo:
    return PackInfo(
        id=h["id"],
        tenant=h["tenant"],
        version=int(h["version"]),
        previous=h.get("previous") or None,
        state=h["state"],
        tokens=int(h["tokens"]),
        capacity=int(h["capacity"]),
        created=float(h["created"]),
        documents=[PackMember(**m) for m in json.loads(h["documents"])],
    )


def _pack_to_hash(p: PackInfo) -> dict:
    return {
        "id": p.id,
        "tenant": p.tenant,
        "version": p.version,
        "previous": p.previous or "",
        "state": p.state,
        "tokens": p.tokens,
        "capacity": p.capacity,
        "created": repr(p.created),
        "documents": json.dumps([m.model_dump() for m in p.documents]),
    }


class PackStore:
    def __init__(self, client: redis.Redis, keys: Keys, settings: RagSettings):
        self.r, self.k, self.s = client, keys, settings
        self.conflicts = 0  # transactions redone because another writer got there first

    # --- reads ---------------------------------------------------------------------------------
    def get(self, pack_id: str, conn=None) -> PackInfo:
        h = (conn or self.r).hgetall(self.k.pack(pack_id))
        if not h:
            raise NotFound(
                f"pack {pack_id} does not exist (it may have been rebuilt after a delete: "
                "list the document's packs again)"
            )
        return _pack_from_hash(h)

    def get_many(self, pack_ids: list[str]) -> list[PackInfo]:
        """The packs that still exist, in the given order (one round trip)."""
        with self.r.pipeline(transaction=False) as p:
            for pid in pack_ids:
                p.hgetall(self.k.pack(pid))
            return [_pack_from_hash(h) for h in p.execute() if h]

    def list(self, tenant: str = "default") -> list[PackInfo]:
        """All packs of a tenant in creation order."""
        return self.get_many(self.r.zrange(self.k.packs(tenant), 0, -1))

    # --- transactions --------------------------------------------------------------------------
    def transact(self, tenant: str, body: Callable[[Any], Any], watch: tuple[str, ...] = ()) -> Any:
        """Run `body(pipe)` as an optimistic transaction on the tenant's pack state. `body` reads
        in immediate mode, then calls pipe.multi() and queues writes (or returns early)."""
        state = self.k.pack_state(tenant)
        for attempt in range(self.s.transaction_retries):
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(state, *watch)
                    result = body(pipe)
                    if pipe.explicit_transaction:
                        pipe.incr(state)
                        pipe.incr(self.k.corpus_version(tenant))
                        pipe.execute()
                    return result
                except redis.WatchError:
                    self.conflicts += 1
                    time.sleep(random.uniform(0, min(0.05, 0.0005 * 2**attempt)))
        raise ConflictError(
            f"gave up after {self.s.transaction_retries} attempts to update the packs of tenant "
            f"{tenant!r} (heavy concurrent ingestion); retry the request"
        )

    def add_document(
        self,
        tenant: str,
        doc_id: str,
        name: str,
        plans: list[MemberPlan],
        *,
        check: Callable[[Any], Any],
        write: Callable[[Any, list[str]], None],
        watch: tuple[str, ...] = (),
    ) -> tuple[bool, Any]:
        """Place a document. `check(pipe)` runs first inside the transaction: a non-None result
        aborts (e.g. the document already exists) and is returned as (False, result). Otherwise
        `write(pipe, pack_ids)` queues the caller's own writes in the same MULTI and
        (True, pack_ids) is returned."""
        cap = self.s.pack_capacity

        def body(pipe):
            found = check(pipe)
            if found is not None:
                return False, found
            now = time.time()
            opens = self._open_packs(pipe, tenant)
            changed: list[PackInfo] = []
            created: list[PackInfo] = []
            if len(plans) == 1 and plans[0].windows == 1:
                plan = plans[0]
                member = PackMember(
                    document_id=doc_id, name=name, char_start=plan.char_start,
                    char_end=plan.char_end, tokens=plan.tokens,
                )
                fits = [p for p in opens if p.tokens + plan.tokens <= cap]
                if fits:
                    target = max(fits, key=lambda p: (p.tokens, -p.created))
                    target.documents.append(member)
                    target.tokens += plan.tokens
                    changed.append(target)
                else:
                    target = PackInfo(
                        id=new_pack_id(), tenant=tenant, state="open", tokens=1 + plan.tokens,
                        capacity=cap, created=now, documents=[member],
                    )
                    created.append(target)
                    opens.append(target)
                self._seal_rules(opens, changed)
                pack_ids = [target.id]
            else:
                for plan in plans:
                    created.append(PackInfo(
                        id=new_pack_id(), tenant=tenant, state="sealed", tokens=1 + plan.tokens,
                        capacity=cap, created=now, documents=[PackMember(
                            document_id=doc_id, name=name, char_start=plan.char_start,
                            char_end=plan.char_end, tokens=plan.tokens,
                            window=plan.window, windows=plan.windows,
                        )],
                    ))
                pack_ids = [p.id for p in created]
            seqs = self._draw_seqs(pipe, len(created))
            pipe.multi()
            self._queue_writes(pipe, tenant, changed + created, created, seqs)
            write(pipe, pack_ids)
            return True, pack_ids

        return self.transact(tenant, body, watch)

    def remove_document(
        self,
        tenant: str,
        doc_id: str,
        doc_key: str,
        *,
        write: Callable[[Any, dict], None],
    ) -> tuple[list[str], list[str]]:
        """Remove a document from its packs: each pack it was in is deleted and, when other
        documents remain, rebuilt under a new id. `write(pipe, doc_hash)` queues the caller's
        deletes in the same MULTI. Returns (removed pack ids, rebuilt pack ids)."""

        def body(pipe):
            doc = pipe.hgetall(doc_key)
            if not doc:
                raise NotFound(f"document {doc_id} does not exist (already deleted?)")
            removed, rebuilt = [], []
            renames: dict[str, str] = {}
            for pid in json.loads(doc.get("packs") or "[]"):
                try:
                    old = self.get(pid, pipe)
                except NotFound:
                    continue
                removed.append(old)
                rest = [m for m in old.documents if m.document_id != doc_id]
                if rest:
                    new = PackInfo(
                        id=new_pack_id(), tenant=tenant, version=old.version + 1, previous=old.id,
                        state="open", tokens=1 + sum(m.tokens for m in rest), capacity=old.capacity,
                        created=time.time(), documents=rest,
                    )
                    rebuilt.append(new)
                    renames[old.id] = new.id
            # other documents that shared a rebuilt pack must point at its new id
            others = {m.document_id for p in rebuilt for m in p.documents}
            other_packs = {}
            for other in others:
                ids = json.loads(pipe.hget(self.k.doc(other), "packs") or "[]")
                other_packs[other] = [renames.get(i, i) for i in ids]
            opens = self._open_packs(pipe, tenant)
            opens = [p for p in opens if p.id not in renames and p.id not in {r.id for r in removed}]
            opens += rebuilt
            changed: list[PackInfo] = []
            self._seal_rules(opens, changed)
            seqs = self._draw_seqs(pipe, len(rebuilt))
            pipe.multi()
            for old in removed:
                pipe.delete(self.k.pack(old.id))
                pipe.zrem(self.k.packs(tenant), old.id)
                pipe.srem(self.k.open_packs(tenant), old.id)
            self._queue_writes(pipe, tenant, changed + rebuilt, rebuilt, seqs)
            for other, ids in other_packs.items():
                pipe.hset(self.k.doc(other), "packs", json.dumps(ids))
            write(pipe, doc)
            return [p.id for p in removed], [p.id for p in rebuilt]

        return self.transact(tenant, body, (doc_key,))

    # --- helpers -------------------------------------------------------------------------------
    def _open_packs(self, pipe, tenant: str) -> list[PackInfo]:
        """The tenant's open packs, read inside the WATCHed transaction (ids whose hash is gone
        are skipped rather than failing every later upload)."""
        out = []
        for pid in sorted(pipe.smembers(self.k.open_packs(tenant))):
            h = pipe.hgetall(self.k.pack(pid))
            if h:
                out.append(_pack_from_hash(h))
        return out

    def _draw_seqs(self, pipe, n: int) -> list[int]:
        """Reserve n creation sequence numbers (immediate mode, before MULTI; a retried
        transaction just leaves gaps), so creation order is total even within one instant."""
        top = pipe.incrby(self.k.pack_seq(), n) if n else 0
        return list(range(top - n + 1, top + 1))

    def _seal_rules(self, opens: list[PackInfo], changed: list[PackInfo]) -> None:
        """Seal open packs that are (nearly) full, then the fullest beyond max_open_packs."""
        for p in opens:
            if p.state == "open" and p.capacity - p.tokens < max(1, self.s.pack_seal_free_tokens):
                p.state = "sealed"
                if all(q is not p for q in changed):
                    changed.append(p)
        still = sorted((p for p in opens if p.state == "open"), key=lambda p: (-p.tokens, p.created))
        for p in still[: max(0, len(still) - self.s.max_open_packs)]:
            p.state = "sealed"
            if all(q is not p for q in changed):
                changed.append(p)

    def _queue_writes(
        self, pipe, tenant: str, packs: list[PackInfo], created: list[PackInfo], seqs: list[int]
    ) -> None:
        """Queue pack writes (after pipe.multi()); `seqs` order the created packs."""
        seen = set()
        for p in packs:
            if p.id in seen:
                continue
            seen.add(p.id)
            pipe.hset(self.k.pack(p.id), mapping=_pack_to_hash(p))
            if p.state == "open":
                pipe.sadd(self.k.open_packs(tenant), p.id)
            else:
                pipe.srem(self.k.open_packs(tenant), p.id)
        for p, seq in zip(created, seqs):
            pipe.zadd(self.k.packs(tenant), {p.id: seq})
