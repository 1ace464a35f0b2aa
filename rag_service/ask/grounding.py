"""One pack answer's grounding: its attention trace -> citations (evidence.py) and a support score
(support.py) -> whether the service says "not in the documents" instead.

    from dsa_rag.rag_service.ask.grounding import ground
    g = ground(layout, mass, question, answer, max_citations=5, ranking="evidence", threshold=0.88)
    g.citations, g.support, g.supported

The worker (worker.py) calls it once per pack answer with the mass it summed over the answer's
tokens; the merge (merge.py) abstains when the answer it would return is not supported and the
question asked for abstention (`AskParams.abstain`, on by default).
Tests: `.venv/bin/python -m pytest -q tests/rag_service/test_evidence.py tests/rag_service/test_support.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsa_rag.rag_service.ask.evidence import rank_evidence
from dsa_rag.rag_service.ask.support import support_score
from dsa_rag.rag_service.packing.layout import PackLayout
from dsa_rag.rag_service.schemas import Citation

RAW_POSITIONS = 64  # "raw" ranking: the most-attended positions grouped into spans (PackLayout.cite)
SUPPORT_CITATIONS = 3  # the support score reads the sentences of this many top citations


@dataclass
class Grounding:
    citations: list[Citation] = field(default_factory=list)
    support: float = 0.0
    supported: bool = False


def ground(layout: PackLayout, mass: dict[int, float], question: str, answer: str, *, max_citations: int = 5,
           ranking: str = "evidence", threshold: float = 0.0) -> Grounding:
    """Citations in the chosen ranking and the support of `answer` by the evidence its attention
    read (always the evidence ranking's sentences: the raw spans cut sentences in pieces)."""
    evidence = rank_evidence(layout, mass, max_citations=max(max_citations, SUPPORT_CITATIONS))
    units = [u for ev in evidence[:SUPPORT_CITATIONS] for u in ev.unit_texts]
    support = round(support_score(question, answer, units), 4) if answer.strip() else 0.0
    if ranking == "raw":
        top = sorted(mass, key=mass.get, reverse=True)[:RAW_POSITIONS]
        cites = layout.cite(top, max_citations=max_citations) if max_citations and top else []
    else:
        cites = [ev.citation for ev in evidence[:max_citations]]
    return Grounding(cites, support, support >= threshold)
