"""`DSARagLLM` (/v1/completions) against the live service (live.py): invoke, generate with
citations / usage / model name in the generation info, streaming (sync and async), async
invoke and batch, stop sequences, the document filter, `streaming=True`, an LCEL chain.

    .venv/bin/python -m pytest -q tests/langchain/test_llm.py
"""

from __future__ import annotations

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate

from dsa_rag.rag_service.langchain import DSARagLLM
from tests.langchain.live import MAX_TOKENS
from tests.langchain.test_chat import Q, check_citations


@pytest.fixture
def llm(live_service) -> DSARagLLM:
    return DSARagLLM(base_url=live_service.base_url, max_tokens=MAX_TOKENS, temperature=0.0, timeout=120)


def check_info(info: dict, documents: dict, only: str | None = None):
    assert info["model_name"] == "dsa-tiny" and info["finish_reason"] in ("stop", "length")
    check_citations(info["citations"], documents, only)
    u = info["usage_metadata"]
    assert u["input_tokens"] > 0 and u["output_tokens"] > 0 and u["total_tokens"] == u["input_tokens"] + u["output_tokens"]


def test_invoke_and_generate(llm, live_service):
    text = llm.invoke(Q)
    assert isinstance(text, str) and text
    res = llm.generate([Q, "What did the treaty create?"])
    assert len(res.generations) == 2
    assert res.generations[0][0].text == text
    for gens in res.generations:
        check_info(gens[0].generation_info, live_service.documents)
    usage = res.llm_output["token_usage"]
    assert res.llm_output["model_name"] == "dsa-tiny"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert usage["cached_tokens"] > 0  # the second question reads the pack prefix the first one cached


def test_stream(llm, live_service):
    text = llm.invoke(Q)
    pieces = list(llm.stream(Q))
    assert len([p for p in pieces if p]) >= 1 and "".join(pieces) == text
    # streaming=True: generate() streams from the service, the last chunk's info survives
    res = DSARagLLM(base_url=live_service.base_url, max_tokens=MAX_TOKENS, streaming=True).generate([Q])
    assert res.generations[0][0].text == text
    check_info(res.generations[0][0].generation_info, live_service.documents)


@pytest.mark.asyncio
async def test_async(llm, live_service):
    text = await llm.ainvoke(Q)
    pieces = [p async for p in llm.astream(Q)]
    assert "".join(pieces) == text
    res = await llm.agenerate([Q])
    check_info(res.generations[0][0].generation_info, live_service.documents)
    assert await llm.abatch([Q, Q]) == [text, text]


def test_stop_and_document_filter(llm, live_service):
    text = llm.invoke(Q)
    stop = text[len(text) // 2:][:1]
    assert llm.invoke(Q, stop=[stop]) == text[:text.index(stop)]
    pdf = live_service.documents["report.pdf"]
    res = DSARagLLM(base_url=live_service.base_url, max_tokens=MAX_TOKENS, document_ids=[pdf]).generate(
        ["How much did revenue grow?"])
    check_info(res.generations[0][0].generation_info, live_service.documents, only=pdf)


def test_lcel_chain(llm):
    chain = PromptTemplate.from_template("Question: {q}") | llm | StrOutputParser()
    assert isinstance(chain.invoke({"q": Q}), str)
    assert isinstance("".join(chain.stream({"q": Q})), str)
