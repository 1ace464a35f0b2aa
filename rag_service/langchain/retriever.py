"""`DSARagRetriever`: the passages the service's sparse attention read while answering a question,
as LangChain `Document`s (POST /v1/ask; the answer itself is a by-product, kept short).

    from dsa_rag.rag_service.langchain import DSARagRetriever
    retriever = DSARagRetriever(base_url="http://127.0.0.1:8000", k=4, document_ids=["doc_..."])
    docs = retriever.invoke("When was the treaty signed?")
    docs[0].page_content         # the cited passage (the chunk's text)
    docs[0].metadata             # {"document_id", "name", "source", "page", "char_start", "char_end",
                                 #  "span": [start, end], "pack_id", "rank"}

Citations come best pack first, most-attended first; identical spans (a document seen in two
windows) are returned once. `k` (constructor or `invoke(..., k=3)`) caps how many come back; the
service returns `citations_per_pack` per answering pack, so fewer than `k` may exist.
Offsets index the document's extracted text (end exclusive); `page` is 1-based, None for
unpaginated text. Tests: `.venv/bin/python -m pytest -q tests/langchain/test_retriever.py`.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import Field

from dsa_rag.rag_service.langchain.params import DSARagParams


def citations_to_documents(data: dict, k: int | None) -> list[Document]:
    """An /v1/ask response -> Documents, deduplicated by (document, span), at most `k`."""
    pack_of: dict[tuple, str] = {}
    for pack in data.get("packs") or []:
        for c in pack.get("citations") or []:
            pack_of.setdefault((c["document_id"], c["char_start"], c["char_end"]), pack["pack_id"])
    docs, seen = [], set()
    for c in data.get("citations") or []:
        key = (c["document_id"], c["char_start"], c["char_end"])
        if key in seen:
            continue
        seen.add(key)
        meta = {"document_id": c["document_id"], "name": c.get("name"), "source": c.get("name"),
                "page": c.get("page"), "char_start": c["char_start"], "char_end": c["char_end"],
                "span": [c["char_start"], c["char_end"]], "pack_id": pack_of.get(key, data.get("pack_id")),
                "rank": len(docs)}
        docs.append(Document(page_content=c.get("snippet", ""), metadata=meta,
                             id=f"{c['document_id']}:{c['char_start']}-{c['char_end']}"))
        if k is not None and len(docs) >= k:
            break
    return docs


class DSARagRetriever(BaseRetriever, DSARagParams):
    """Retriever on the DSA long-document RAG service: the cited passages of an answer.

    Options besides the connection ones of `DSARagParams` (`document_ids` is the document filter):
    `k` (most documents returned), `max_tokens` (answer tokens generated to find them; more tokens
    spread the attention over more passages), `temperature`, `seed`."""

    k: int = Field(4, ge=1, description="most documents returned")
    max_tokens: int = Field(16, ge=1, description="answer tokens generated to locate the passages")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int | None = Field(None, ge=0)

    def _options(self, **kwargs: Any) -> dict:
        """The /v1/ask options: per-call kwargs override the instance's (None = left out)."""
        ids = kwargs.get("document_ids", self.document_ids)
        return {"max_tokens": kwargs.get("max_tokens") or self.max_tokens,
                "temperature": kwargs.get("temperature", self.temperature),
                "document_ids": list(ids) if ids is not None else None, "seed": kwargs.get("seed", self.seed)}

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                **kwargs: Any) -> list[Document]:
        data = self.client().ask(query, **self._options(**kwargs))
        return citations_to_documents(data, kwargs.get("k") or self.k)

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       **kwargs: Any) -> list[Document]:
        data = await self.client().aask(query, **self._options(**kwargs))
        return citations_to_documents(data, kwargs.get("k") or self.k)
