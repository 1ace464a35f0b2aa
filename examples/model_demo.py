"""Demo: load dsa-tiny (or any checkpoint), prefill a long synthetic document, and greedily
generate through the latent + indexer caches, printing speed and the tokens the indexer picked.

    .venv/bin/python examples/model_demo.py                         # dsa-tiny, 4k-token context
    .venv/bin/python examples/model_demo.py --context 16384 --new 32
    .venv/bin/python examples/model_demo.py --model /path/to/DeepSeek-V3.2 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from dsa_rag.model.cache import new_sequence_cache
from dsa_rag.model.load import WEIGHTS_DIR, load_model
from dsa_rag.model.tokenizer import IncrementalDecoder, load_tokenizer


def synthetic_document(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    cities = ["Lisbon", "Oslo", "Quito", "Hanoi", "Perth", "Accra", "Lima", "Riga"]
    words = "the report notes that quarterly revenue grew while costs in the northern region fell".split()
    parts = []
    while sum(map(len, parts)) < n_chars:
        parts.append(" ".join(rng.choice(words) for _ in range(12)).capitalize() + ". ")
        if rng.random() < 0.05:
            parts.append(f"The access code of {rng.choice(cities)} is {rng.randint(1000, 9999)}. ")
    return "".join(parts)[:n_chars]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dsa-tiny")
    ap.add_argument("--context", type=int, default=4096, help="context tokens to prefill")
    ap.add_argument("--new", type=int, default=48, help="tokens to generate")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()

    t0 = time.perf_counter()
    model = load_model(a.model, device=a.device, dtype=getattr(torch, a.dtype))
    tok = load_tokenizer(None if a.model == "dsa-tiny" else a.model)
    cfg = model.cfg
    print(f"loaded {cfg.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{cfg.num_hidden_layers} layers, index_topk={cfg.index_topk} ({time.perf_counter() - t0:.1f}s)")
    doc = synthetic_document(a.context)
    ids = tok.prompt_ids([("report.txt", doc)], "What is the access code of Oslo?")[: a.context]
    x = torch.tensor([ids], device=a.device)
    cache = [new_sequence_cache(cfg.num_hidden_layers, capacity=len(ids) + a.new)]
    picked = []
    with torch.no_grad():
        t0 = time.perf_counter()
        for s in range(0, len(ids), a.chunk):
            logits = model(x[:, s: s + a.chunk], s, cache, last_only=True)
        t_prefill = time.perf_counter() - t0
        print(f"prefill: {len(ids)} tokens in {t_prefill:.2f}s ({len(ids) / t_prefill:.0f} tok/s)")
        dec = IncrementalDecoder(tok)
        out, pos = [], len(ids)
        t0 = time.perf_counter()
        for _ in range(a.new):
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            out.append(dec.push(nxt))
            trace = (lambda layer, row, idx, mass: picked.append(idx[0][mass[0].argmax()].item())
                     if layer == cfg.num_hidden_layers - 1 else None)
            logits = model(torch.tensor([[nxt]], device=a.device), pos, cache, trace=trace)
            pos += 1
        t_dec = time.perf_counter() - t0
    n = max(1, len(out))
    print(f"decode: {n} tokens, {1000 * t_dec / n:.1f} ms/token")
    print("generated:", repr("".join(out) + dec.flush()))
    print("most-attended context positions (last layer, per token):", picked[:16])
    if a.model == "dsa-tiny" and not (WEIGHTS_DIR / "dsa-tiny" / "config.json").exists():
        print("(dsa-tiny without shipped trained weights is randomly initialized: the text is noise;"
              " speed and cache behaviour are real)")


if __name__ == "__main__":
    main()
