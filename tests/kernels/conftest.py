"""Shared fixtures for the kernel tests (tests/kernels).

* Without CUDA, TRITON_INTERPRET=1 is set here, before anything imports triton, so the Triton
  backends run in the interpreter on CPU (small shapes only).
* `backend`: parametrizes a test over the torch and triton backends through DSA_KERNEL_BACKEND.
* `nan_empty` (autouse): torch.empty / empty_like return NaN-filled floats (ints: a sentinel),
  so a kernel that leaves part of an output unwritten fails the comparison with naive.
* `small_blocks`: shrinks the torch backends' block/chunk sizes so tiny shapes cross many blocks.

Run: .venv/bin/python -m pytest -q tests/kernels
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dsa_rag.kernels.indexer import cpu_dots, row_topk  # noqa: E402
from dsa_rag.kernels.indexer import torch_decode as indexer_decode  # noqa: E402
from dsa_rag.kernels.indexer import torch_impl as indexer_torch  # noqa: E402
from dsa_rag.kernels.sparse_mla import torch_impl as sparse_mla_torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INT_SENTINEL = -123456789


def rms_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """rms(a - b) / rms(b), in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(INT_SENTINEL if t.dtype in (torch.int32, torch.int64) else 0)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("DSA_KERNEL_BACKEND", request.param)
    return request.param


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(indexer_torch, "S_BLOCK", 48)
    monkeypatch.setattr(indexer_torch, "PAIR_BUDGET", 48 * 16 * 4)
    monkeypatch.setattr(indexer_torch, "ROW_BUDGET", 16 * 150)  # several query chunks per call
    monkeypatch.setattr(row_topk, "TOPK_GROUP_RATIO", 1)  # the grouped row top-k on small rows too
    monkeypatch.setattr(indexer_decode, "ROW_BUDGET", 2 * 8 * 150)  # decode: several row chunks per call
    monkeypatch.setattr(indexer_decode, "UPCAST_BLOCK", 40)  # decode: upcast keys block by block
    monkeypatch.setattr(cpu_dots, "MIN_KEYS", 0)  # decode: the AVX2 extension on tiny caches too
    monkeypatch.setattr(sparse_mla_torch, "CHUNK_BYTES", 1)  # one query row per chunk
