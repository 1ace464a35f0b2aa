"""Build the engine a model replica runs: the one place that picks a backend, a device and a
serving dtype, and loads weights. The service calls only this and the `EngineProtocol`
(model/engine/protocol.py); `backend="openai"` picks the OpenAI-compatible upstream one (model/engine/upstream.py).

    from dsa_rag.model.engine.factory import load_engine
    engine = load_engine("dsa-tiny", device="cpu", tokenizer=rag.tok, threads=1)   # an EngineProtocol
    engine = load_engine("/ckpt/DeepSeek-V3.2", dtype="bfloat16", fp8_numerics=True)
    engine = load_engine("/ckpt/tiny-v4")   # config.json model_type deepseek_v4 -> model/v4/engine.py
    engine = load_parallel_engine(ckpt, rank=r, world=8, tensor_parallel_size=8, expert_parallel_size=8,
                                  init_method="tcp://10.0.0.5:29500")  # every rank; None on ranks > 0
    ...
    engine.close()

Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_engine_protocol.py tests/model/engine/test_engine_dtype.py`.
"""

from __future__ import annotations

import torch

from dsa_rag.model.engine.engine import AsyncEngine, Engine
from dsa_rag.model.engine.protocol import EngineProtocol
from dsa_rag.model.load import as_dtype, checkpoint_dtype, load_model
from dsa_rag.model.v4.engine import V4Engine
from dsa_rag.model.v4.load import is_v4_checkpoint, load_v4_model
from dsa_rag.model.parallel.engine import AsyncLeaderEngine
from dsa_rag.model.parallel.launch import start_rank
from dsa_rag.model.engine.upstream import OpenAIUpstreamEngine

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str | None = None) -> str:
    """None = cuda when available, else cpu."""
    return str(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype = "auto", model: str = "dsa-tiny", device: str | None = None) -> torch.dtype:
    """The serving dtype. "auto": on CUDA the checkpoint's own (`torch_dtype` of its config.json:
    bfloat16 for DeepSeek-V3.2, float32 when the config names none); on CPU float32 (dsa-tiny is
    small, and fp32 keeps its shipped answers). Anything else: that dtype, wherever it runs."""
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        if resolve_device(device).startswith("cuda"):
            return checkpoint_dtype(model)
        return torch.float32
    return as_dtype(dtype)


def load_engine(model: str = "dsa-tiny", device: str | None = None, tokenizer=None, *,
                threads: int | None = None, dtype: str | torch.dtype = "auto",
                fp8_numerics: bool | None = None, index_every: int | None = None,
                backend: str = "dsa", upstream: dict | None = None) -> EngineProtocol:
    """Load `model` (a preset name or a checkpoint dir) into the DSA engine, wrapped for async use.
    device: None = cuda when available, else cpu. tokenizer: what decodes the generated text (the
    pipeline's; None = the engine's byte tokenizer). threads: torch intra-op threads for this
    process (None or 0 = torch's default). dtype: "auto" | "float32" | "bfloat16" | "float16" (or
    a torch dtype), see `resolve_dtype`; the model, its caches and snapshots all run in it.
    fp8_numerics: None = the model config's own setting; True / False override it (V3.2's
    simulated FP8 indexer keys and latent cache). index_every: None = the checkpoint's indexer plan;
    N = run the indexer on layers 0, N, 2N, ... and reuse its top-k in between (ModelConfig.indexer_types).
    backend: "dsa" (this engine, in process) | "openai" (OpenAI-compatible upstreams, e.g. vLLM /
    SGLang: model/engine/upstream.py; no weights load here, `model` only names the tokenizer's
    checkpoint). upstream: OpenAIUpstreamEngine's keywords (urls, model, timeout_s, ...)."""
    if backend == "openai":
        return OpenAIUpstreamEngine(tokenizer=tokenizer, **(upstream or {}))
    if backend != "dsa":
        raise ValueError(f"unknown engine backend {backend!r}: use 'dsa' (in process) or 'openai' (an upstream)")
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    if is_v4_checkpoint(model):  # DeepSeek-V4: its own network, per-sequence caches and engine (model/v4/)
        if fp8_numerics or index_every is not None:
            raise ValueError("fp8_numerics and index_every are DeepSeek-V3.2 / GLM-5 options; "
                             f"{model} is a DeepSeek-V4 checkpoint")
        return AsyncEngine(V4Engine(load_v4_model(model, device, resolve_dtype(dtype, model, device)), tokenizer))
    overrides = {} if fp8_numerics is None else {"fp8_numerics": bool(fp8_numerics)}
    if index_every is not None:
        overrides["index_every"] = int(index_every)
    m = load_model(model, device=device, dtype=resolve_dtype(dtype, model, device), **overrides)
    return AsyncEngine(Engine(m, tokenizer))


def load_parallel_engine(model: str, *, rank: int, world: int, tensor_parallel_size: int, expert_parallel_size: int = 1,
                         init_method: str, device: str | None = None, tokenizer=None, threads: int | None = None,
                         dtype: str | torch.dtype = "auto", fp8_numerics: bool | None = None,
                         index_every: int | None = None) -> EngineProtocol | None:
    """One rank of a replica that spans `world` devices (tensor / expert parallel, see
    dsa_rag.model.parallel). Every rank calls it with the same arguments but its own `rank`;
    `init_method` (e.g. "tcp://<rank 0's address>:<port>") is where they meet. Rank 0 -> the
    leader's engine, wrapped for async use like load_engine's (its close() releases the others).
    Other ranks -> follow the leader's commands and return None once it closes (or raise when a
    peer dies). `device`: None = this rank's GPU when CUDA is there, else cpu."""
    if threads:
        torch.set_num_threads(threads)
    overrides = {} if fp8_numerics is None else {"fp8_numerics": bool(fp8_numerics)}
    if index_every is not None:
        overrides["index_every"] = int(index_every)
    dt = resolve_dtype(dtype, model, resolve_device(device))
    eng = start_rank(rank, world, model, tp=tensor_parallel_size, ep=expert_parallel_size, init_method=init_method,
                     device=device, dtype=dt, tokenizer=tokenizer, **overrides)
    return None if eng is None else AsyncLeaderEngine(eng)
