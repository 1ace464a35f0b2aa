"""Sparse attention with a per-head attention sink over two K=V sources in one call: DeepSeek-V4's
core attention (its sliding-window rows plus the compressed entries it reads).

    sparse_sink_attention(q, kv, indices, sink, *, scale, extra_kv=None, extra_indices=None) -> [T, H, D]

A sink is a per-head logit that joins the softmax but carries no value. Backends (kernels/dispatch.py,
same signature in each module):
* naive.py     : dense fp32 reference (both sources concatenated, the sink in the softmax).
* torch_impl.py: two torch sparse MLA calls (out, lse) merged with the sink; autograd; the CPU path.
* triton.py    : ONE kernel that streams the selected rows of both sources with one online
                 softmax and folds the sink into the final normalizer (GPU / interpreter,
                 forward only). A Triton compile failure falls back to torch (dispatch.call).
Neither source is copied: V4's compressed pool is read where the cache keeps it.
Not done: a split-K (flash-decoding) launch for decode; a T = 1 call runs H / 64 (x2 on sm_90)
programs of the Triton kernel (kernels/sparse_mla/decode.py has the split for sparse MLA).

Test: .venv/bin/python -m pytest -q tests/kernels/test_sink_attention.py
"""

from __future__ import annotations

import torch

from dsa_rag.kernels import dispatch
from dsa_rag.kernels.checks import FLOAT_DTYPES, check_tensor

__all__ = ["sparse_sink_attention"]
INDEX_DTYPES = (torch.int32, torch.int64)


def _check_source(kv_name, kv, idx_name, idx, T, D, device):
    check_tensor(kv_name, kv, ("S", D), FLOAT_DTYPES, device)
    check_tensor(idx_name, idx, (T, "K"), INDEX_DTYPES, device)
    # (on CUDA this check would sync; the kernel masks out-of-range rows there instead)
    if not kv.is_cuda and idx.numel() and int(idx.max()) >= kv.shape[0]:
        raise ValueError(f"{idx_name}: expected values in [-1, {kv.shape[0]}) (rows of {kv_name}), "
                         f"got max {int(idx.max())}")


def sparse_sink_attention(q, kv, indices, sink, *, scale, extra_kv=None, extra_indices=None):
    """Sparse MQA over selected rows of one shared K=V head (one or two sources), with a sink.

    Args:
        q: [T, H, D] bf16/fp16/fp32 queries.
        kv: [S, D] same dtype family; each row is both key and value (V4: the window rows).
        indices: [T, K] int32/int64 rows of kv per query, -1 = none; valid entries unique, < S.
        sink: [H] fp32 sink logits.
        scale: softmax scale applied to q . kv.
        extra_kv: [S2, D] or None, a second source (V4: the compressed entries).
        extra_indices: [T, K2] rows of extra_kv per query (-1 = none); given iff extra_kv is.
    Returns:
        out [T, H, D] in q.dtype = sum over selected rows r of p[r] row_r, p = softmax over all
        selected logits and the sink. A row that selects nothing gives 0 (all mass on the sink).
    """
    check_tensor("q", q, ("T", "H", "D"), FLOAT_DTYPES)
    T, H, D = q.shape
    check_tensor("sink", sink, (H,), FLOAT_DTYPES, q.device)
    if (extra_kv is None) != (extra_indices is None):
        raise ValueError("extra_kv and extra_indices: give both or neither")
    _check_source("kv", kv, "indices", indices, T, D, q.device)
    if extra_kv is not None:
        _check_source("extra_kv", extra_kv, "extra_indices", extra_indices, T, D, q.device)
    return dispatch.call("sink_attention", "sparse_sink_attention", q, kv, indices, sink, scale=float(scale),
                         extra_kv=extra_kv, extra_indices=extra_indices)
