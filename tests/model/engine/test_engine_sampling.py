"""Sampling: greedy is argmax, temperature / top-p draw from the right support with a per-request
seed, log-probs are the raw model's, stop strings are held back and trimmed, parameters are
validated with messages that say what to fix.

    .venv/bin/python -m pytest tests/model/engine/test_engine_sampling.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from dsa_rag.model.engine.sampling import SamplingParams, StopMatcher, make_generator, sample


def test_greedy_is_argmax_with_raw_logprob():
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0])
    tok, lp = sample(logits, SamplingParams(), None)
    assert tok == 1 and lp == pytest.approx(float(torch.log_softmax(logits, -1)[1]))
    assert sample(logits, SamplingParams(logprobs=False), None) == (1, None)


def test_seeded_sampling_is_reproducible_and_top_p_limits_support():
    logits = torch.tensor([3.0, 2.9, 0.0, -5.0, 1.0])
    p = SamplingParams(temperature=1.0, top_p=0.8, seed=5)
    draws = [sample(logits, p, g)[0] for g in [make_generator(p)] for _ in range(200)]
    again = [sample(logits, p, g)[0] for g in [make_generator(p)] for _ in range(200)]
    assert draws == again
    assert set(draws) == {0, 1}  # 0 and 1 hold ~0.86 of the mass: the rest is cut
    hot = SamplingParams(temperature=5.0, seed=1)
    g = make_generator(hot)
    assert len({sample(logits, hot, g)[0] for _ in range(300)}) == 5
    # log-prob of the drawn token is the model's, not the tempered one
    tok, lp = sample(logits, hot, make_generator(hot))
    assert lp == pytest.approx(float(torch.log_softmax(logits, -1)[tok]))
    assert make_generator(SamplingParams()) is None


def test_stop_matcher_holds_back_partial_stops_and_trims():
    m = StopMatcher(("END", "\n\n"))
    out = [m.push(c) for c in "ab E"]
    assert "".join(o for o, _ in out) == "ab " and not any(h for _, h in out)  # "E" held back
    assert m.push("x") == ("Ex", False)  # "Ex" cannot start a stop string any more
    assert m.push("EN") == ("", False)
    assert m.push("D tail") == ("", True)  # stop found: nothing after it, nothing of it
    assert m.text == "ab ExSTART"[:0] + "ab Ex"
    m2 = StopMatcher(("\n\n",))
    assert m2.push("line\n") == ("line", False)
    assert m2.flush() == "\n"
    assert StopMatcher(()).push("abc") == ("abc", False)


@pytest.mark.parametrize("kw,msg", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"stop": [""]}, "stop strings"), ({"temperature": math.nan}, "temperature"), ({"trace_top": 0}, "trace_top"),
], ids=["max_tokens", "temperature", "top_p", "stop", "nan", "trace_top"])
def test_params_are_validated(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_single_stop_string_is_accepted():
    assert SamplingParams(stop="\n").stop == ("\n",)
