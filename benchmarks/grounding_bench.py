"""Grounded answers on generated PDFs: citation precision@1 (raw vs evidence ranking, one run),
abstention on answerable vs unanswerable questions with a threshold calibrated on a separate
split, and exact match before / after abstention.

    .venv/bin/python benchmarks/grounding_bench.py                        # 50 + 100 documents, ~30 min
    .venv/bin/python benchmarks/grounding_bench.py --cal-docs 4 --docs 6 --out /tmp/g.json   # smoke

Documents (tests/rag_service/planted.py): 1-4-page PDFs, a title line, filler in dsa-tiny's
register, ONE planted fact on a random page; `--image-share` of them have one image-only page
(rendered text, no text layer) that the parse sandbox OCRs (tesseract). Per document one
answerable question (the planted fact) and one unanswerable (an entity the document never
names, or another attribute of the planted entity). Each document is its own tenant, so a
question sees exactly its document (one pack). Everything goes through the service's one ask
path (`ask_sync` over a `LocalBackend`: selection, the pack worker, grounding, merge).

1. Calibration split (`--cal-docs`, its own seeds): both questions with abstention off; the
   support scores give the threshold: the largest share of unanswerable questions abstained
   while at most `--max-false` of the answerable ones are (the middle of the best plateau).
2. Report split (`--docs`, other seeds), with that threshold:
   - precision@1: the top citation's span contains the planted sentence (quotes / whitespace
     normalized), "raw" (the most-attended positions, the ranking before) vs "evidence"
     (ask/evidence.py), the same answers (greedy) ranked both ways;
   - abstention through the service (AskParams.abstain=True): false-abstention rate on the
     answerable, abstention rate on the unanswerable;
   - exact match on the answerable with abstention off (before) and on (after).
Last stdout line: JSON; also writes benchmarks/results/grounding_bench.json and .md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsa_rag.model.engine.factory import load_engine  # noqa: E402
from dsa_rag.rag_service.ask.fanout import ask_sync  # noqa: E402
from dsa_rag.rag_service.ask.local import LocalBackend  # noqa: E402
from dsa_rag.rag_service.ask.params import AskParams  # noqa: E402
from dsa_rag.rag_service.ask.support import ABSTAIN_TEXT  # noqa: E402
from dsa_rag.rag_service.ask.worker import PackWorker  # noqa: E402
from dsa_rag.rag_service.pipeline import RagPipeline  # noqa: E402
from dsa_rag.rag_service.settings import RagSettings  # noqa: E402
from tests.rag_service.planted import make_planted  # noqa: E402


def norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.replace("’", "'")).strip()


def cites_fact(rag, citation, fact: str) -> bool:
    return norm(fact) in norm(rag.document_text(citation.document_id)[citation.char_start:citation.char_end])


def run_split(rag, backend, name: str, n: int, seed: int, image_share: float, report: bool) -> list[dict]:
    rows = []
    for i in range(n):
        rng = random.Random(f"{seed}-{name}-{i}")
        pages = rng.randint(1, 4)
        image = (rng.randint(1, pages),) if rng.random() < image_share else ()
        d = make_planted(rng, pages, image_pages=image)
        tenant = f"{name}{i}"
        t0 = time.perf_counter()
        info = rag.ingest(d.name, d.pdf, tenant=tenant)
        ingest_s = time.perf_counter() - t0

        def ask(q, abstain=False, ranking="evidence"):
            rag.settings.citation_ranking = ranking
            return ask_sync(backend, AskParams.of(q, tenant=tenant, max_tokens=32, abstain=abstain))

        ev = ask(d.question)
        row = {"doc": i, "pages": pages, "image_pages": list(image), "ocr_pages": info.ocr_pages,
               "answer_page": d.answer_page, "answer_on_ocr_page": d.answer_page in image, "want": d.answer,
               "kind": d.unanswerable_kind, "ingest_s": round(ingest_s, 3), "answer": ev["answer"],
               "em": ev["answer"].strip() == d.answer, "support": ev["support"],
               "unans_answer": None, "unans_support": None}
        if not report:  # calibration: the unanswerable question's support, abstention off
            un = ask(d.unanswerable)
            row.update(unans_answer=un["answer"], unans_support=un["support"])
        else:
            raw = ask(d.question, ranking="raw")
            assert raw["answer"] == ev["answer"]  # greedy: the same answer, ranked two ways
            top_raw, top_ev = (raw["citations"] or [None])[0], (ev["citations"] or [None])[0]
            row.update(
                p1_raw=bool(top_raw and cites_fact(rag, top_raw, d.fact)),
                p1_evidence=bool(top_ev and cites_fact(rag, top_ev, d.fact)),
                page_evidence=bool(top_ev and top_ev.page == d.answer_page),
                top_raw=[top_raw.char_start, top_raw.char_end] if top_raw else None,
                top_evidence=[top_ev.char_start, top_ev.char_end, top_ev.share] if top_ev else None,
                n_cites_raw=len(raw["citations"]), n_cites_evidence=len(ev["citations"]))
            served = ask(d.question, abstain=True)
            served_un = ask(d.unanswerable, abstain=True)
            row.update(served_answer=served["answer"], served_abstained=served["abstained"],
                       served_em=served["answer"].strip() == d.answer, unans_support=served_un["support"],
                       served_un_answer=served_un["answer"], served_un_abstained=served_un["abstained"],
                       served_un_leaks_value=d.answer in served_un["answer"])
        rows.append(row)
        print(name, json.dumps(row), flush=True)
    return rows


def calibrate(rows: list[dict], max_false: float) -> dict:
    """The threshold that abstains on the most unanswerable questions while abstaining on at most
    `max_false` of the answerable; the middle of the best plateau of a 0.01 grid."""
    ans = [r["support"] for r in rows]
    un = [r["unans_support"] for r in rows]
    best, plateau = -1.0, []
    for k in range(0, 101):
        t = k / 100
        false = sum(s < t for s in ans) / len(ans)
        caught = sum(s < t for s in un) / len(un)
        if false <= max_false:
            if caught > best + 1e-12:
                best, plateau = caught, [t]
            elif abs(caught - best) <= 1e-12:
                plateau.append(t)
    t = plateau[len(plateau) // 2]
    return {"threshold": t, "cal_false_abstention": sum(s < t for s in ans) / len(ans),
            "cal_correct_abstention": best, "plateau": [plateau[0], plateau[-1]]}


def rate(xs) -> float:
    xs = list(xs)
    return round(sum(xs) / len(xs), 4) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cal-docs", type=int, default=50)
    ap.add_argument("--docs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=26)
    ap.add_argument("--image-share", type=float, default=0.2, help="documents with one image-only (OCR'd) page")
    ap.add_argument("--max-false", type=float, default=0.02, help="false-abstention budget on the calibration split")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/grounding_bench.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        settings = RagSettings(data_dir=Path(tmp) / "data", max_context=8192, pack_reserve_tokens=256,
                               pack_overlap=512, parse_workers=1)
        default_threshold = settings.abstain_threshold
        with RagPipeline(settings) as rag:
            worker = PackWorker(rag, load_engine("dsa-tiny", device="cpu", threads=args.threads), warm_packs=2)
            backend = LocalBackend(rag=rag, worker=worker)
            try:
                cal_rows = run_split(rag, backend, "cal", args.cal_docs, args.seed, args.image_share, report=False)
                cal = calibrate(cal_rows, args.max_false)
                rag.settings.abstain_threshold = cal["threshold"]
                rows = run_split(rag, backend, "report", args.docs, args.seed, args.image_share, report=True)
            finally:
                worker.close()
    ocr_rows = [r for r in rows if r["answer_on_ocr_page"]]
    result = {
        "bench": "grounding", "command": "benchmarks/grounding_bench.py " + " ".join(sys.argv[1:]),
        "model": "dsa-tiny", "docs_calibration": args.cal_docs, "docs_report": args.docs,
        "questions_report": {"answerable": len(rows), "unanswerable": len(rows)},
        "calibration": cal, "threshold_used": cal["threshold"], "settings_default_threshold": default_threshold,
        "precision_at_1": {"raw": rate(r["p1_raw"] for r in rows), "evidence": rate(r["p1_evidence"] for r in rows),
                           "evidence_right_page": rate(r["page_evidence"] for r in rows),
                           "evidence_fact_on_ocr_page": rate(r["p1_evidence"] for r in ocr_rows),
                           "facts_on_ocr_pages": len(ocr_rows)},
        "citations_per_answer": {"raw": rate(r["n_cites_raw"] for r in rows),
                                 "evidence": rate(r["n_cites_evidence"] for r in rows)},
        "abstention": {
            "false_abstention_answerable": rate(r["served_abstained"] for r in rows),
            "correct_abstention_unanswerable": rate(r["served_un_abstained"] for r in rows),
            "by_kind": {k: rate(r["served_un_abstained"] for r in rows if r["kind"] == k)
                        for k in ("entity", "attribute")},
            "unanswerable_value_leaked": rate(r["served_un_leaks_value"] for r in rows),
            "abstain_text": ABSTAIN_TEXT,
        },
        "exact_match": {"before": rate(r["em"] for r in rows), "after": rate(r["served_em"] for r in rows)},
        "ocr_pages_report": sum(len(r["ocr_pages"]) for r in rows),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "rows": rows, "calibration_rows": cal_rows}, indent=1) + "\n")
    p, a, e = result["precision_at_1"], result["abstention"], result["exact_match"]
    out.with_suffix(".md").write_text("\n".join([
        f"# Grounded answers (`{result['command'].strip()}`)", "",
        f"dsa-tiny, {args.docs} report documents (1-4 pages, {p['facts_on_ocr_pages']} facts on OCR'd image-only "
        f"pages), threshold {cal['threshold']} calibrated on {args.cal_docs} other documents.", "",
        "| metric | before | after |", "|---|---:|---:|",
        f"| citation precision@1 (top citation holds the fact's sentence) | {p['raw']:.2f} | {p['evidence']:.2f} |",
        f"| exact match, answerable | {e['before']:.2f} | {e['after']:.2f} |",
        f"| false 'not in the documents', answerable | 0.00 | {a['false_abstention_answerable']:.2f} |",
        f"| correct abstention, unanswerable | 0.00 | {a['correct_abstention_unanswerable']:.2f} |", ""]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
