"""Cheaper indexer selection, measured on dsa-tiny's own keys: how much of the exact top-k each
option keeps (recall) and what it would cost, for prefill and decode queries.

Options (issue 27), each against the exact softmax-mixture top-k of the same query:
  * key precision: indexer keys rounded to bf16, or to FP8 e4m3 with a per-key absmax scale (V3.2's
    cache format; half the bytes of bf16);
  * blocked pre-filter: keys in blocks of G; a block summary is scored first, then exact scores
    only inside the best blocks (candidates = r x top-k keys). Summaries: "bound" (Quest-style:
    each dimension's min and max over the block, an upper bound of every key's dot),
    "mean" (the block's mean key). The heads' normalizers are taken over the candidates only;
  * reuse across layers: measured in benchmarks/index_reuse_bench.py (accuracy collapses).

Queries: one needle example (model/training/data.py, niah_single) prefilled in 4096-token chunks
through the model's cache; "prefill" = the queries of the last chunk of >= 2048 tokens (every 16th
row), "decode" = the
answer's tokens fed one at a time (T = 1). JSON is the last line; --out writes it.

    .venv/bin/python benchmarks/selection_options.py --length 32768 --out benchmarks/results/selection_options.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dsa_rag.kernels.indexer.torch_impl as indexer_torch  # noqa: E402
from dsa_rag.kernels.indexer import naive  # noqa: E402
from dsa_rag.model import fp8  # noqa: E402
from dsa_rag.model.cache import new_sequence_cache  # noqa: E402
from dsa_rag.model.load import load_model  # noqa: E402
from dsa_rag.model.tokenizer import ByteTokenizer  # noqa: E402
from dsa_rag.model.training import data  # noqa: E402

RATIOS = (2, 4, 8, 16)
GROUPS = (16, 64)


def capture(model, ids: list[int], a0: int, chunk: int = 4096, prefill_rows: int = 16):
    """Indexer inputs (q [T, H, D], k [S, D], w [T, H], start_pos, phase) seen by every layer:
    the last prefill chunk (every `prefill_rows`-th query) and each answer token decoded alone."""
    seen, real_topk, real_decode = [], indexer_torch.indexer_topk, indexer_torch.indexer_decode_topk
    phase = {"name": "prefill", "last": False}

    def spy_topk(q, k, w, topk, *, k_scale=None, start_pos=0, s_block=None, score="relu"):
        if phase["name"] == "prefill" and phase["last"] and q.shape[0] > 1:
            rows = torch.arange(q.shape[0] - 1, -1, -prefill_rows).flip(0)
            for t in rows.tolist():
                seen.append(("prefill", q[t].clone(), k[: start_pos + t + 1].clone(), w[t].clone()))
        return real_topk(q, k, w, topk, k_scale=k_scale, start_pos=start_pos, s_block=s_block, score=score)

    def spy_decode(q, k, w, topk, **kw):
        if phase["name"] == "decode":
            seen.append(("decode", q[0].clone(), k.clone(), w[0].clone()))
        return real_decode(q, k, w, topk, **kw)

    indexer_torch.indexer_topk, indexer_torch.indexer_decode_topk = spy_topk, spy_decode
    try:
        cache = [new_sequence_cache(model.cfg.num_hidden_layers, capacity=len(ids))]
        with torch.no_grad():
            starts = list(range(0, a0, chunk))
            # the last chunk of at least chunk / 2 queries (a short final chunk would give few rows)
            sampled = max(s for s in starts if min(s + chunk, a0) - s >= chunk // 2) if a0 >= chunk // 2 else 0
            for s in starts:
                phase["last"] = s == sampled
                model(torch.tensor([ids[s: min(s + chunk, a0)]]), s, cache)
            phase["name"] = "decode"
            for p in range(a0, len(ids) - 1):
                model(torch.tensor([[ids[p]]]), p, cache)
    finally:
        indexer_torch.indexer_topk, indexer_torch.indexer_decode_topk = real_topk, real_decode
    return seen


def exact_topk(q, k, w, topk):
    return naive.indexer_topk(q[None], k, w[None], topk, start_pos=k.shape[0] - 1, score="softmax_mixture")[0]


def recall(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want[want >= 0]
    return float(torch.isin(want, got[got >= 0]).float().mean())


def fp8_keys(k):
    """V3.2's indexer cache format: the key Hadamard-rotated, then FP8 e4m3 with one ue8m0 scale per
    key, read back as fp32 and rotated back (the rotation is orthonormal, so this equals rotating q)."""
    k8, ks = fp8.act_quant(fp8.rotate(k), k.shape[-1])
    return fp8.rotate(k8.float() * ks)  # the Sylvester Hadamard is symmetric: H H / d = I


def prefilter_topk(q, k, w, topk, G: int, ratio: int, summary: str):
    """Score block summaries, keep the best blocks (ratio * topk keys), exact scores inside them
    (normalizers over the candidates only), top-k of those."""
    S, D = k.shape
    nb = -(-S // G)
    pad = nb * G - S
    kp = torch.cat([k, k[-1:].expand(pad, D)]) if pad else k  # the last key repeated: bounds unchanged
    blocks = kp.view(nb, G, D)
    qf = q.float()
    if summary == "bound":
        hi, lo = blocks.amax(1), blocks.amin(1)
        ub = qf.clamp_min(0) @ hi.t() + qf.clamp_max(0) @ lo.t()  # [H, nb] >= every key's dot in the block
    else:
        ub = qf @ blocks.mean(1).t()
    # block score: the mixture over heads of each head's softmax over the block summaries
    bs = (w.float()[:, None] + ub.log_softmax(-1)).logsumexp(0)
    n_blocks = min(nb, max(1, ratio * topk // G))
    chosen = bs.topk(n_blocks).indices
    cand = (chosen[:, None] * G + torch.arange(G)).flatten()
    cand = cand[cand < S]
    sub = exact_topk(q, k[cand], w, topk)
    return torch.where(sub >= 0, cand[sub.clamp_min(0).long()], sub)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_model("dsa-tiny")
    topk = model.cfg.index_topk
    tok = ByteTokenizer()
    ex = data.make_example(random.Random(f"{a.seed}-niah_single-{a.length}"), "niah_single", a.length, tok, depth=0.37)
    ids = ex.ids(tok)
    a0 = len(ids) - len(tok.encode(ex.answer)) - 1
    t0 = time.process_time()
    seen = capture(model, ids, a0)
    t_capture = time.process_time() - t0
    rows = {}
    for phase, q, k, w in seen:
        if k.shape[0] <= topk:
            continue
        want = exact_topk(q, k, w, topk)
        r = rows.setdefault(phase, {})
        r.setdefault("keys_bf16", []).append(recall(exact_topk(q, k.bfloat16().float(), w, topk), want))
        r.setdefault("keys_fp8_e4m3", []).append(recall(exact_topk(q, fp8_keys(k), w, topk), want))
        for G in GROUPS:
            for summary in ("bound", "mean"):
                for ratio in RATIOS:
                    got = prefilter_topk(q, k, w, topk, G, ratio, summary)
                    r.setdefault(f"prefilter_{summary}_G{G}_x{ratio}", []).append(recall(got, want))
    out = {"benchmark": "selection_options", "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
           "model": "dsa-tiny", "score": model.cfg.index_score, "context": len(ids), "index_topk": topk,
           "queries": {p: len(next(iter(r.values()))) for p, r in rows.items()},
           "capture_cpu_s": round(t_capture, 1),
           "recall_mean": {p: {k: round(sum(v) / len(v), 4) for k, v in r.items()} for p, r in rows.items()},
           "recall_min": {p: {k: round(min(v), 4) for k, v in r.items()} for p, r in rows.items()},
           "exact_key_fraction_scored": {f"G{G}_x{ratio}": round(ratio * topk / len(ids) + 2 / G, 4)
                                         for G in GROUPS for ratio in RATIOS}}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
