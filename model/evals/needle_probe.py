"""Needle probe: at the rows that write the answer, does each layer's indexer select the needle?

For single-needle examples of --len tokens, the prompt is prefilled through the inference path
(DSA, the model's own cache) and the answer rows are run teacher-forced with a trace of the keys
each layer's indexer selected. Answer row r predicts the value's byte r; an induction/copy head
reads it at the needle's byte r, so that key must be among the row's top-k in the layers that copy.
Per layer: the share of answer rows whose top-k holds that byte, and the attention mass (mean over
heads) on the needle's value, split by examples answered right and wrong: it tells a failure of
the indexer's selection (the needle's byte not selected) from one of the attention over the
selected keys (MODEL_CARD.md traces dsa-tiny's 16k-32k failures to layers 2-3 with it).

    .venv/bin/python -m dsa_rag.model.evals.needle_probe --len 32768 --samples 4
    .venv/bin/python -m pytest -q tests/model/evals/test_probes.py
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from dsa_rag.model.cache import new_sequence_cache
from dsa_rag.model.load import load_any
from dsa_rag.model.tokenizer import ByteTokenizer
from dsa_rag.model.training import data


@torch.no_grad()
def probe_example(model, ids: list[int], a0: int, chunk: int = 4096) -> dict | None:
    """-> {"ok": exact match, "hit": [L] share of answer rows selecting their source byte,
    "mass": [L] mean attention mass on the needle's value}; None if the value is not in the prompt
    exactly once."""
    val = ids[a0:-1]
    prompt = ids[:a0]
    locs = [j for j in range(len(prompt) - len(val) + 1) if prompt[j: j + len(val)] == val]
    if len(locs) != 1 or model.cfg.dense_attention:
        return None
    loc = locs[0]
    x = torch.tensor([ids[:-1]])
    cache = [new_sequence_cache(model.cfg.num_hidden_layers, capacity=len(ids))]
    pre = a0 - 1
    for s in range(0, pre, chunk):
        model(x[:, s: min(pre, s + chunk)], s, cache)
    seen: dict[int, tuple] = {}
    logits = model(x[:, pre:], pre, cache, trace=lambda layer, row, idx, mass: seen.__setitem__(layer, (idx, mass)))
    ok = logits[0].argmax(-1).tolist() == ids[a0:]
    span = torch.arange(loc, loc + len(val))
    hit, mass = [], []
    H = model.cfg.num_attention_heads
    for layer in range(model.cfg.num_hidden_layers):
        idx, m = seen[layer]  # [rows, k]: the answer rows' selected keys and their mass
        idx, m = idx[: len(val)], m[: len(val)]
        src = span[: idx.shape[0], None]
        hit.append(float((idx == src).any(-1).float().mean()))
        mass.append(float((m * torch.isin(idx, span)).sum(-1).mean() / H))
    return {"ok": ok, "hit": hit, "mass": mass}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dsa-tiny", help="preset, weights dir or training run dir")
    ap.add_argument("--len", type=int, default=16384)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_any(a.model)
    tok = ByteTokenizer()
    rng = random.Random(f"{a.seed}-niah_single-{a.len}")  # the eval's draw (example_sets.cell_examples)
    rows = []
    for i in range(a.samples):
        ex = data.make_example(rng, "niah_single", a.len, tok, depth=(i + 0.5) / a.samples)
        r = probe_example(model, *data.encode(ex, tok))
        if r is not None:
            rows.append(r)
            print(json.dumps({"sample": i, **r}), flush=True)
    L = model.cfg.num_hidden_layers
    summary = {}
    for name, group in (("right", [r for r in rows if r["ok"]]), ("wrong", [r for r in rows if not r["ok"]])):
        if group:
            summary[name] = {"n": len(group),
                             "hit_per_layer": [round(sum(r["hit"][i] for r in group) / len(group), 3) for i in range(L)],
                             "mass_per_layer": [round(sum(r["mass"][i] for r in group) / len(group), 3) for i in range(L)]}
    print(json.dumps({"model": a.model, "len": a.len, "samples": len(rows), **summary}))


if __name__ == "__main__":
    main()
