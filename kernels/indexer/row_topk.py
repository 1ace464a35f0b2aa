"""Exact top-k of long score rows, shared by the indexer's prefill (torch_impl) and decode
(torch_decode) paths: group maxima first (row_topk), then the sorted, -1-padded index list the
indexer ops return (sorted_topk).

Test: .venv/bin/python -m pytest -q tests/kernels/test_indexer.py -k row_topk
"""

from __future__ import annotations

import torch

TOPK_GROUP_RATIO, MAX_TOPK_GROUP = 4, 32  # row_topk: groups of G keys, G <= 32 and n / G >= 4 * k


def row_topk(x, k):
    """(values, indices) of the k largest entries of each row of x [R, n] (unsorted; all of them
    when n <= k). Rows are first cut into groups of G keys: a key in the top k lies in one of the k
    groups with the largest maxima (each of k better groups would hold a key above it), so one
    topk over n / G group maxima and one over the k * G keys of the chosen groups give the exact
    answer (ties either way). torch.topk costs ~5-8 ns per entry here; with G = 32 at 32k keys
    that is ~1/2 of one topk over the row and ~1/2-1/6 of a merge per 4096-key block."""
    R, n = x.shape
    if n <= k:
        return x, torch.arange(n, device=x.device).expand(R, n)
    G = 1
    while 2 * G <= MAX_TOPK_GROUP and n // (2 * G) >= TOPK_GROUP_RATIO * k:
        G *= 2
    if G == 1:
        return x.topk(k, dim=1, sorted=False)
    ng = n // G  # the last n - ng * G keys (fewer than G) are always candidates
    _, top_groups = x[:, : ng * G].view(R, ng, G).amax(-1).topk(k, dim=1, sorted=False)
    cols = (top_groups[:, :, None] * G + torch.arange(G, device=x.device)).view(R, k * G)
    if ng * G < n:
        cols = torch.cat([cols, torch.arange(ng * G, n, device=x.device).expand(R, -1)], 1)
    vals, pos = x.gather(1, cols).topk(k, dim=1, sorted=False)
    return vals, cols.gather(1, pos)


def sorted_topk(scores, topk):
    """int32 [R, topk]: indices of each row's best scores, descending, -1 for -inf / missing."""
    vals, idx = row_topk(scores, topk)
    vals, order = vals.sort(dim=1, descending=True)
    idx = idx.gather(1, order).masked_fill_(vals == float("-inf"), -1).to(torch.int32)
    if idx.shape[1] < topk:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], topk - idx.shape[1]), -1)], 1)
    return idx
