"""Build the engine a model replica runs: the one place that picks a backend and loads weights.
The service calls only this and the `EngineProtocol` (model/engine/protocol.py); a second backend
(e.g. an OpenAI-compatible upstream) would be chosen here.

    from dsa_rag.model.engine.factory import load_engine
    engine = load_engine("dsa-tiny", device="cpu", tokenizer=rag.tok, threads=1)   # an EngineProtocol
    ...
    engine.close()

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_engine_protocol.py`.
"""

from __future__ import annotations

import torch

from dsa_rag.model.engine.engine import AsyncEngine, Engine
from dsa_rag.model.engine.protocol import EngineProtocol
from dsa_rag.model.load import load_model


def load_engine(model: str = "dsa-tiny", device: str | None = None, tokenizer=None, *,
                threads: int | None = None) -> EngineProtocol:
    """Load `model` (a preset name or a checkpoint dir) into the DSA engine, wrapped for async use.
    device: None = cuda when available, else cpu (bf16 on GPUs, what real checkpoints need to
    fit; fp32 on CPU, where dsa-tiny is small). tokenizer: what decodes the generated text (the
    pipeline's; None = the engine's byte tokenizer). threads: torch intra-op threads for this
    process (None or 0 = torch's default)."""
    if threads:
        torch.set_num_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return AsyncEngine(Engine(load_model(model, device=device, dtype=dtype), tokenizer))
