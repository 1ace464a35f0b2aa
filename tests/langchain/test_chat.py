"""`DSARagChatModel` against the live service (live.py), beyond the standard suites: citations
and usage in the response metadata (invoke, stream, async), the document filter, stop
sequences, service errors, the API key, an LCEL chain. Answers of the tiny model are not checked.

    .venv/bin/python -m pytest -q tests/langchain/test_chat.py
"""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessageChunk
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from dsa_rag.rag_service.langchain import DSARagAPIError, DSARagChatModel
from tests.langchain.live import MAX_TOKENS

Q = "When was the treaty signed?"


@pytest.fixture
def chat(live_service) -> DSARagChatModel:
    return DSARagChatModel(base_url=live_service.base_url, max_tokens=MAX_TOKENS, temperature=0.0, timeout=120,
                           api_key="sk-not-enforced-yet")


def check_citations(cites: list[dict], documents: dict[str, str], only: str | None = None):
    assert cites, "no citations"
    ids = set(documents.values())
    for c in cites:
        assert c["document_id"] in ids and (only is None or c["document_id"] == only)
        assert 0 <= c["char_start"] < c["char_end"] and c["snippet"]
        if c["name"] == "report.pdf":
            assert c["page"] in (1, 2)
        else:
            assert c["page"] is None


def check_usage(u: dict):
    assert u["input_tokens"] > 0 and u["output_tokens"] > 0
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
    assert 0 <= u["input_token_details"]["cache_read"] <= u["input_tokens"]


def test_invoke_carries_citations_usage_and_model(chat, live_service):
    msg = chat.invoke(Q)
    meta = msg.response_metadata
    assert meta["model_name"] == "dsa-tiny" and meta["finish_reason"] in ("stop", "length")
    assert meta["id"].startswith("chatcmpl-")
    check_citations(meta["citations"], live_service.documents)
    check_usage(msg.usage_metadata)
    assert msg.usage_metadata["output_tokens"] <= MAX_TOKENS


def test_stream_tokens_then_metadata_and_same_text_as_invoke(chat, live_service):
    whole = chat.invoke(Q)
    chunks = list(chat.stream(Q))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert len(chunks) >= 2 and all(c.content for c in chunks[:-1])  # tokens, then the closing chunk
    last = chunks[-1]
    assert last.chunk_position == "last" and last.content == ""
    full = sum(chunks[1:], chunks[0])
    assert full.content == whole.content  # greedy: the same answer either way
    check_citations(full.response_metadata["citations"], live_service.documents)
    check_usage(full.usage_metadata)
    assert full.response_metadata["model_name"] == "dsa-tiny"


@pytest.mark.asyncio
async def test_async_invoke_and_stream(chat, live_service):
    msg = await chat.ainvoke(Q)
    check_citations(msg.response_metadata["citations"], live_service.documents)
    chunks = [c async for c in chat.astream(Q)]
    full = sum(chunks[1:], chunks[0])
    assert full.content == msg.content and chunks[-1].chunk_position == "last"
    check_usage(full.usage_metadata)
    msgs = await chat.abatch([Q, "What did the treaty create?"])
    assert len(msgs) == 2 and all(m.response_metadata["citations"] for m in msgs)


def test_document_filter(live_service):
    pdf = live_service.documents["report.pdf"]
    chat = DSARagChatModel(base_url=live_service.base_url, max_tokens=MAX_TOKENS, document_ids=[pdf])
    check_citations(chat.invoke("How much did revenue grow?").response_metadata["citations"],
                    live_service.documents, only=pdf)
    md = live_service.documents["treaty.md"]
    full = None
    for c in chat.stream(Q, document_ids=[md]):  # a per-call filter overrides the model's
        full = c if full is None else full + c
    check_citations(full.response_metadata["citations"], live_service.documents, only=md)


def test_stop_sequence_cuts_the_answer(chat):
    text = chat.invoke(Q).content
    assert len(text) >= 2
    stop = text[len(text) // 2:][:1]
    cut = chat.invoke(Q, stop=[stop]).content
    assert cut == text[:text.index(stop)]
    streamed = "".join(c.content for c in chat.stream(Q, stop=[stop]))
    assert streamed == cut


def test_service_errors_are_raised(chat, live_service):
    with pytest.raises(DSARagAPIError) as e:
        chat.invoke(Q, model="gpt-4o")
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(DSARagAPIError) as e:
        chat.invoke(Q, document_ids=["doc_does_not_exist"])
    assert e.value.status_code == 404 and e.value.code == "not_found" and "doc_does_not_exist" in str(e.value)
    with pytest.raises(DSARagAPIError) as e:
        list(chat.stream(Q, document_ids=["doc_does_not_exist"]))
    assert e.value.code == "not_found"


def test_lcel_chain(chat, live_service):
    prompt = ChatPromptTemplate.from_messages([("system", "Answer from the documents."), ("human", "{question}")])
    chain = prompt | chat | StrOutputParser()
    assert isinstance(chain.invoke({"question": Q}), str)
    pieces = list(chain.stream({"question": Q}))
    assert len(pieces) >= 2 and all(isinstance(p, str) for p in pieces)
