"""Position probe: does a model's retrieval survive query-key distances it was not trained on?

Single-needle examples of --len tokens are answered (teacher-forced greedy exact match, the
training attention of model/training/train.py) with plain positions and with the positions after one random
cut in the documents shifted by each --shifts value. RoPE sees only distances, so a shift of s
shows the model the question-to-needle distances of a context s tokens longer, at the cost of a
short example. A model that fails here fails on long contexts for positional reasons, whatever
its indexer does (MODEL_CARD.md uses it on dsa-tiny's long-context accuracy).

    .venv/bin/python -m dsa_rag.model.evals.position_probe --model dsa-tiny --samples 12 --stage 0
    .venv/bin/python -m dsa_rag.model.evals.position_probe --model tmp/run/s0 --shifts 0,2048,8192,16384,28000
    .venv/bin/python -m pytest -q tests/model/evals/test_probes.py
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from dsa_rag.model.load import load_any
from dsa_rag.model.tokenizer import ByteTokenizer
from dsa_rag.model.training import data
from dsa_rag.model.training.train import losses, question_start


@torch.no_grad()
def probe(model, n_tokens: int, samples: int, shifts: list[int], stage: int, seed: int = 5) -> dict[int, float]:
    """-> {shift: share of examples answered exactly}. The same examples and cuts for every shift."""
    tok = ByteTokenizer()
    rng = random.Random(seed)
    hits = {s: 0 for s in shifts}
    for _ in range(samples):
        x, y, w = data.batch(rng, n_tokens, 1, ["niah_single"], None, tok, doc_weight=0.5)
        q0 = question_start(x[0], tok.special("<question>"))
        cut = rng.randint(100, q0 - 50)
        for s in shifts:
            pos = torch.arange(x.shape[1])[None].clone()
            pos[0, cut:] += s
            hits[s] += int(float(losses(model, x, y, w, stage, 0.5, positions=pos)["ans_acc"]))
    return {s: h / samples for s, h in hits.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dsa-tiny", help="preset, weights dir or training run dir")
    ap.add_argument("--len", type=int, default=3000, help="example length in tokens")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--shifts", default="0,2048,8192,16384,28000")
    ap.add_argument("--stage", type=int, choices=(0, 2), default=0, help="0: dense attention, 2: DSA top-k")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = probe(load_any(a.model), a.len, a.samples, [int(v) for v in a.shifts.split(",")], a.stage)
    print(json.dumps({"model": a.model, "len": a.len, "samples": a.samples, "stage": a.stage, "exact_match": res}))


if __name__ == "__main__":
    main()
