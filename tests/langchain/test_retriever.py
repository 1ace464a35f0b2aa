"""`DSARagRetriever` (/v1/ask citations) against the live service (live.py): the langchain-tests
standard retriever suite (k in the constructor and per call, sync and async), then the metadata
of the returned passages (document, page, span), the document filter, async, and the retriever
inside an LCEL chain with the chat model.

    .venv/bin/python -m pytest -q tests/langchain/test_retriever.py
"""

from __future__ import annotations

import pytest
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_tests.integration_tests import RetrieversIntegrationTests

from dsa_rag.rag_service.langchain import DSARagChatModel, DSARagRetriever
from tests.langchain.live import LIVE, MAX_TOKENS
from tests.langchain.test_chat import Q

pytestmark = [pytest.mark.asyncio, pytest.mark.filterwarnings(
    "ignore:.*is marked with '@pytest.mark.asyncio' but it is not an async function")]


@pytest.mark.usefixtures("live_service")
class TestDSARagRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[DSARagRetriever]:
        return DSARagRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"base_url": LIVE.base_url, "max_tokens": MAX_TOKENS, "timeout": 120}

    @property
    def retriever_query_example(self) -> str:
        return Q


@pytest.fixture
def retriever(live_service) -> DSARagRetriever:
    return DSARagRetriever(base_url=live_service.base_url, k=10, max_tokens=MAX_TOKENS, timeout=120)


def check_documents(docs: list[Document], live_service, only: str | None = None):
    assert docs and all(isinstance(d, Document) for d in docs)
    names = {v: k for k, v in live_service.documents.items()}
    spans = set()
    for rank, d in enumerate(docs):
        m = d.metadata
        assert m["document_id"] in names and (only is None or m["document_id"] == only)
        assert m["name"] == m["source"] == names[m["document_id"]]
        assert m["span"] == [m["char_start"], m["char_end"]] and 0 <= m["char_start"] < m["char_end"]
        assert m["page"] in ((1, 2) if m["name"] == "report.pdf" else (None,))
        assert m["pack_id"].startswith("pk_") and m["rank"] == rank
        assert d.page_content and d.id == f"{m['document_id']}:{m['char_start']}-{m['char_end']}"
        spans.add((m["document_id"], m["char_start"], m["char_end"]))
    assert len(spans) == len(docs)  # no passage twice


def test_documents_with_document_page_and_span(retriever, live_service):
    check_documents(retriever.invoke(Q), live_service)
    pdf = live_service.documents["report.pdf"]
    docs = retriever.invoke("How much did revenue grow?", document_ids=[pdf])
    check_documents(docs, live_service, only=pdf)
    assert all(d.metadata["page"] is not None for d in docs)  # PDF passages know their page


async def test_async_and_filter_option(live_service):
    md = live_service.documents["treaty.md"]
    r = DSARagRetriever(base_url=live_service.base_url, k=2, max_tokens=MAX_TOKENS, document_ids=[md])
    docs = await r.ainvoke(Q)
    assert len(docs) <= 2
    check_documents(docs, live_service, only=md)
    assert len(await r.ainvoke(Q, k=1)) == 1


def test_retriever_in_a_chain(retriever, live_service):
    chat = DSARagChatModel(base_url=live_service.base_url, max_tokens=MAX_TOKENS)
    prompt = ChatPromptTemplate.from_template("Context:\n{context}\n\nQuestion: {question}")

    def join(docs: list[Document]) -> str:
        return "\n\n".join(f"[{d.metadata['source']} p.{d.metadata['page']}] {d.page_content}" for d in docs)

    chain = {"context": retriever | join, "question": RunnablePassthrough()} | prompt | chat | StrOutputParser()
    assert isinstance(chain.invoke(Q), str)
    # a retriever result feeds the chat model's own document filter
    ids = sorted({d.metadata["document_id"] for d in retriever.invoke(Q)})
    msg = chat.invoke(Q, document_ids=ids)
    assert {c["document_id"] for c in msg.response_metadata["citations"]} <= set(ids)
