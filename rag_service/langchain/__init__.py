"""LangChain integration of the DSA long-document RAG service (a client: httpx + langchain-core).

    from dsa_rag.rag_service.langchain import DSARagChatModel, DSARagLLM, DSARagRetriever
    chat = DSARagChatModel(base_url="http://127.0.0.1:8000", api_key="...")   # /v1/chat/completions
    llm = DSARagLLM(base_url="http://127.0.0.1:8000")                         # /v1/completions
    retriever = DSARagRetriever(base_url="http://127.0.0.1:8000", k=4)        # /v1/ask citations

Shared options (params.py): base_url (env DSA_RAG_BASE_URL), api_key (env DSA_RAG_API_KEY),
tenant, document_ids (the document filter), timeout, max_retries, retry_backoff_s,
default_headers. HTTP, SSE and retries: the service client, rag_service/client.py (whose
`DSARagAPIError` this re-exports). Examples: docs/langchain.md. Tests: `.venv/bin/python -m pytest -q tests/langchain`.
"""

from dsa_rag.rag_service.langchain.chat import DSARagChatModel
from dsa_rag.rag_service.client import DSARagAPIError
from dsa_rag.rag_service.langchain.llm import DSARagLLM
from dsa_rag.rag_service.langchain.params import DSARagParams
from dsa_rag.rag_service.langchain.retriever import DSARagRetriever

__all__ = ["DSARagAPIError", "DSARagChatModel", "DSARagLLM", "DSARagParams", "DSARagRetriever"]
