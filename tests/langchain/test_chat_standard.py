"""The langchain-tests standard suites for `DSARagChatModel`: unit (no server) and integration
(against the live service of live.py), with the capability flags set to what the service does:

- text in, text out, streamed; usage with `cache_read` (the prefix KV cache) on invoke and stream;
- no tool calling, no structured output / JSON mode, no image / audio / video / PDF inputs;
- no model override: the service serves one model (`model_override_value` stays None);
- not lc-serializable (`test_serdes` skips), no VCR cassettes (`test_stream_time` skips).

    .venv/bin/python -m pytest -q tests/langchain/test_chat_standard.py
"""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from dsa_rag.rag_service.langchain import DSARagChatModel
from tests.langchain.live import LIVE, MAX_TOKENS

# The suites hold unmarked `async def` tests: mark the module for pytest-asyncio (strict mode),
# and silence its note on the sync tests that the module mark reaches too.
pytestmark = [pytest.mark.asyncio, pytest.mark.filterwarnings(
    "ignore:.*is marked with '@pytest.mark.asyncio' but it is not an async function")]


class _Flags:
    @property
    def chat_model_class(self) -> type[DSARagChatModel]:
        return DSARagChatModel

    @property
    def chat_model_params(self) -> dict:
        return {"base_url": LIVE.base_url, "model": "dsa-tiny", "timeout": 120}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    @property
    def supports_model_override(self) -> bool:
        return False  # one model per service


class TestDSARagChatModelUnit(_Flags, ChatModelUnitTests):
    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return ({"DSA_RAG_BASE_URL": "http://rag.example:8000", "DSA_RAG_API_KEY": "key-from-env"}, {},
                {"base_url": "http://rag.example:8000", "api_key": "key-from-env"})


@pytest.mark.usefixtures("live_service")
class TestDSARagChatModelIntegration(_Flags, ChatModelIntegrationTests):
    @property
    def standard_chat_model_params(self) -> dict:
        # short answers keep the suite fast on a shared CPU (the text is not what is tested)
        return {**super().standard_chat_model_params, "max_tokens": MAX_TOKENS}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        # Every question over a pack whose prefix is already cached reads the cache: ask twice.
        model = DSARagChatModel(**self.chat_model_params)
        model.invoke("What did the treaty create?")
        if stream:
            full = None
            for chunk in model.stream("What did the treaty create?"):
                full = chunk if full is None else full + chunk
            return full
        return model.invoke("What did the treaty create?")
