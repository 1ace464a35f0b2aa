"""One question's parameters, passed whole from the route (or CLI, benchmark, notebook) through
the fan-out and the Ray handles to the pack worker, which hands `sampling` to the engine.

    from dsa_rag.model.engine.sampling import SamplingParams
    from dsa_rag.rag_service.ask.params import AskParams
    p = AskParams("What was the revenue?", document_ids=("d1",), tenant="acme",
                  sampling=SamplingParams(max_tokens=64, temperature=0.0, seed=1, stop=("\\n\\n",)))
    p = AskParams.of("What was the revenue?", ["d1"], "acme", max_tokens=64, seed=1)   # flat keywords

A frozen dataclass: picklable for Ray, validated once here (the
sampling fields by `SamplingParams` itself), so nothing below re-checks loose arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from dsa_rag.model.engine.sampling import SamplingParams

# Below this a temperature is greedy: logits / 2e-66 overflow to inf (found by the API fuzz).
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class AskParams:
    """question: the user's question. document_ids: restrict packs and citations to these
    documents (None = the tenant's whole library). tenant: whose documents. sampling: what to
    generate per pack (max_tokens, temperature, top_p, seed, stop). abstain: replace an unsupported
    answer by "Not in the documents." (False: the model's answer as it is, its support reported)."""

    question: str
    document_ids: tuple[str, ...] | None = None
    tenant: str = "default"
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Say "Not in the documents." instead of an answer the cited evidence does not support
    # (ask/support.py). Streams then hold the primary pack's tokens until its answer is scored.
    abstain: bool = True

    def __post_init__(self):
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError("question must be a non-empty string")
        if self.document_ids is not None:
            object.__setattr__(self, "document_ids", tuple(self.document_ids))
        if self.sampling.temperature < MIN_TEMPERATURE and self.sampling.temperature != 0.0:
            object.__setattr__(self, "sampling", replace(self.sampling, temperature=0.0))

    @classmethod
    def of(cls, question: str, document_ids=None, tenant: str = "default", *, abstain: bool = True,
           **sampling) -> "AskParams":
        """Flat keywords for scripts and benchmarks: `sampling` are `SamplingParams` fields
        (max_tokens, temperature, top_p, seed, stop)."""
        return cls(question, document_ids, tenant, SamplingParams(**sampling), abstain)
