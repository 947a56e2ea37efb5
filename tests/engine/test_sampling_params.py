"""fi_engine.runtime.sampling_params: the per-request controls (vLLM's ranges, refused by name otherwise; a hashable
value whatever form ``logit_bias`` came in), every one of them taken by the engine's check of ``sampling``."""

from __future__ import annotations

import math

import pytest

from fi_engine.runtime.sampling_params import SamplingParams, asks_processing, sampling_arg, sets_controls


def test_the_defaults_change_nothing_and_greedy_stays_greedy() -> None:
    p = SamplingParams()
    assert (p.min_p, p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_tokens) == (0, 0, 0, 1, 0)
    assert (p.logit_bias, p.logprobs, p.prompt_logprobs) == ((), None, None)
    assert p.greedy and SamplingParams(0.7, 5, 0.9, 1) == SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=1)


def test_logit_bias_is_stored_as_sorted_pairs_and_the_value_hashes() -> None:
    a = SamplingParams(logit_bias={9: -1, 3: 2.5})  # type: ignore[arg-type]  # a mapping is accepted too
    b = SamplingParams(logit_bias=((3, 2.5), (9, -1.0)))
    assert a.logit_bias == ((3, 2.5), (9, -1.0)) and a == b and hash(a) == hash(b)
    assert isinstance(a.logit_bias[1][1], float)
    assert len({a, b, SamplingParams()}) == 2


GOOD = [
    {"min_p": 0.0},
    {"min_p": 1},
    {"presence_penalty": -2.0},
    {"frequency_penalty": 2},
    {"repetition_penalty": 1e-6},
    {"repetition_penalty": 50.0},
    {"min_tokens": 0},
    {"min_tokens": 2**31 - 1},
    {"logit_bias": ((0, -100), (5, 100.0))},
    {"logprobs": 0},
    {"logprobs": 20},
    {"prompt_logprobs": 0},
    {"prompt_logprobs": 20},
]


@pytest.mark.parametrize("kw", GOOD)
def test_values_at_the_bounds_are_taken(kw) -> None:  # type: ignore[no-untyped-def]
    p = SamplingParams(**kw)
    name, value = next(iter(kw.items()))
    assert getattr(p, name) == (tuple((t, float(b)) for t, b in value) if name == "logit_bias" else value)


BAD = [
    ({"min_p": -0.1}, ValueError, r"^min_p: expected a probability in \[0, 1\]"),
    ({"min_p": 1.5}, ValueError, "^min_p: "),
    ({"min_p": math.nan}, ValueError, "^min_p: .*got nan"),
    ({"min_p": "0.1"}, TypeError, "^min_p: .*got str"),
    ({"presence_penalty": 2.5}, ValueError, r"^presence_penalty: expected a number in \[-2, 2\]"),
    ({"presence_penalty": True}, TypeError, "^presence_penalty: .*got bool"),
    ({"frequency_penalty": -math.inf}, ValueError, "^frequency_penalty: "),
    ({"repetition_penalty": 0}, ValueError, "^repetition_penalty: expected a finite number > 0"),
    ({"repetition_penalty": math.inf}, ValueError, "^repetition_penalty: "),
    ({"repetition_penalty": None}, TypeError, "^repetition_penalty: .*NoneType"),
    ({"min_tokens": -1}, ValueError, r"^min_tokens: expected an integer in \[0, 2147483647\]"),
    ({"min_tokens": 1.0}, ValueError, "^min_tokens: "),
    ({"min_tokens": 2**31}, ValueError, "^min_tokens: "),
    ({"logprobs": 21}, ValueError, r"^logprobs: expected None or an integer in \[0, 20\], got 21"),
    ({"logprobs": -1}, ValueError, "^logprobs: "),
    ({"logprobs": True}, ValueError, "^logprobs: .*True"),
    ({"prompt_logprobs": 2.0}, ValueError, "^prompt_logprobs: "),
    ({"logit_bias": 5}, TypeError, "^logit_bias: expected a mapping or pairs"),
    ({"logit_bias": "ab"}, TypeError, "^logit_bias: "),
    ({"logit_bias": [(1, 2, 3)]}, TypeError, r"^logit_bias: expected \(token id, bias\) pairs"),
    ({"logit_bias": [(-1, 2)]}, ValueError, "^logit_bias: expected token ids"),
    ({"logit_bias": [("5", 2)]}, ValueError, "^logit_bias: expected token ids"),
    ({"logit_bias": [(True, 2)]}, ValueError, "^logit_bias: expected token ids"),
    ({"logit_bias": [(5, 100.5)]}, ValueError, r"^logit_bias\[5\]: expected a bias in \[-100, 100\]"),
    ({"logit_bias": [(5, math.nan)]}, ValueError, r"^logit_bias\[5\]: "),
    ({"logit_bias": [(5, "1")]}, TypeError, r"^logit_bias\[5\]: .*str"),
    ({"logit_bias": [(5, 1), (5, 2)]}, ValueError, "^logit_bias: token id 5 is given twice"),
]


@pytest.mark.parametrize(("kw", "error", "match"), BAD)
def test_a_bad_control_is_refused_by_name(kw, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        SamplingParams(**kw)


ALL_SET = [
    {"min_p": 0.1},
    {"presence_penalty": 0.5},
    {"frequency_penalty": -0.5},
    {"repetition_penalty": 1.1},
    {"min_tokens": 1},
    {"logit_bias": ((1, 0.0),)},  # a bias of 0 is still a field set
    {"logprobs": 0},
    {"prompt_logprobs": 0},
    {"grammar": '{"grammars": []}'},  # (checked as a str here; the engine compiles it when the request is added)
]


@pytest.mark.parametrize("kw", ALL_SET)
def test_the_engines_check_takes_every_field(kw) -> None:  # type: ignore[no-untyped-def]
    p = SamplingParams(**kw)
    assert sampling_arg(p) is p and asks_processing(p)


def test_a_grammar_is_a_str_and_keeps_the_value_hashable() -> None:
    p = SamplingParams(grammar='{"grammars": []}')
    assert hash(p) == hash(SamplingParams(grammar='{"grammars": []}')) and p != SamplingParams()
    assert sets_controls(p) and asks_processing(p) and not sets_controls(SamplingParams())
    with pytest.raises(TypeError, match=r"^grammar: expected None or a grammar's text \(a str\), got dict$"):
        SamplingParams(grammar={"type": "object"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^grammar: expected None or a grammar's text"):
        SamplingParams(grammar="")
