"""Sampling: request parameters, next-token choice (greedy / temperature / top-p with a per-request
seeded generator), per-token log-probs, and stop-string handling for streamed text.

    p = SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, seed=1, stop=["\\n\\n"])
    tok, logprob = sample(logits_row, p, generator)
    stops = StopMatcher(p.stop); piece, hit = stops.push(text_piece)   # hides a partial stop string

    .venv/bin/python -m pytest tests/model/engine/test_engine_sampling.py -q
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What to generate. temperature 0 = greedy (deterministic). stop: strings that end the output
    (trimmed from it); stop_token_ids: None = the model's EOS. logprobs: report the model's
    log-probability (log_softmax of the raw logits, before temperature / top-p) of each token.
    trace: report, per generated token, the context positions the sparse attention read and their
    attention mass (top `trace_top` positions aggregated over layers; per layer too with
    trace_layers)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: list[int] | tuple[int, ...] | None = None
    logprobs: bool = True
    trace: bool = False
    trace_top: int = 16
    trace_layers: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if not isinstance(self.trace_top, int) or self.trace_top < 1:
            raise ValueError(f"trace_top must be an int >= 1, got {self.trace_top!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A per-request CPU generator (None for greedy): seeded requests are reproducible whatever
    else runs in the batch; unseeded ones draw their seed from torch's global RNG."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[int, float | None]:
    """logits [V] fp32 -> (token id, its model log-prob or None when params.logprobs is off)."""
    logits = logits.float()
    if params.greedy:
        tok = int(torch.argmax(logits))
    else:
        probs = torch.softmax(logits / params.temperature, -1)
        if params.top_p < 1:
            sp, si = probs.sort(descending=True)
            keep = (sp.cumsum(-1) - sp) < params.top_p  # the smallest set whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
        tok = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    lp = float(torch.log_softmax(logits, -1)[tok]) if params.logprobs else None
    return tok, lp


class StopMatcher:
    """Streams text through stop strings: `push(piece)` returns (text safe to emit, stopped).
    Text that could still be the start of a stop string is held back until it cannot."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = tuple(stop)
        self.text = ""  # everything decoded so far
        self.emitted = 0  # chars of self.text already released
        self.longest = max((len(s) for s in self.stop), default=0)

    def push(self, piece: str) -> tuple[str, bool]:
        self.text += piece
        if not self.stop:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out, False
        scan = max(0, self.emitted - self.longest)
        hits = [i for i in (self.text.find(s, scan) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self.emitted: cut]
            self.text, self.emitted = self.text[:cut], cut
            return out, True
        safe = len(self.text)
        for s in self.stop:  # hold back a tail that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    safe = min(safe, len(self.text) - n)
                    break
        safe = max(safe, self.emitted)
        out, self.emitted = self.text[self.emitted: safe], safe
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out
