"""The engine's logits processing (fi_engine.runtime.sample.logits_processing) on CPU: LogitsProcessor runs on numpy in
place of CuPy (the calls it makes are the same in both), over logits of the tests' stand-in model, against the
stand-in's own reference (tests/helpers/fake_engine.py: ``next_token``, ``position_logprobs``), an implementation of
vLLM's order written independently. Float32 logits against the reference's float64: log-probabilities within 1e-5. The
same on the GPU, with the engine's own logits: tests/engine/test_gpu_step_api.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers.fake_engine import fake_logits, next_token, position_logprobs

from fi_engine.runtime.sample.logits_processing import LogitsProcessor
from fi_engine.runtime.sampling_params import SamplingParams, asks_processing, sets_controls
from fi_engine.runtime.sched.request import Request

V = 96
POOL = list(range(10, 90))
EOS = 3


def request(prompt, output, sp: SamplingParams, eos=None) -> Request:
    r = Request(0, tuple(prompt), 50, 4, output=list(output), sampling=None if sp.greedy else sp, eos=eos)
    r.asks = sp if asks_processing(sp) else None
    return r


def logits_of(*keys: int) -> np.ndarray:
    """Rows of the stand-in's logits, float32, favouring token EOS in the first row (min_tokens has work)."""
    return np.stack([fake_logits(V, POOL, (k, 1), EOS if i == 0 else 20 + k) for i, k in enumerate(keys)]).astype(
        np.float32
    )


CONTROLS = [
    SamplingParams(logit_bias={40: 30.0, 41: -100.0}),
    SamplingParams(min_tokens=5),
    SamplingParams(repetition_penalty=1.7),
    SamplingParams(repetition_penalty=0.6),
    SamplingParams(frequency_penalty=1.5, presence_penalty=0.5),
    SamplingParams(presence_penalty=-2.0),
    SamplingParams(logit_bias={12: 5.0}, min_tokens=2, repetition_penalty=1.3, frequency_penalty=0.4),
]


@pytest.mark.parametrize("sp", CONTROLS, ids=lambda sp: ",".join(f"{k}" for k, v in vars(sp).items() if v))
def test_each_greedy_control_chooses_the_references_token(sp: SamplingParams) -> None:
    prompt, output = [EOS + 20, 25, 26, 27, 40], [26, 26, 30, 41]
    raw = logits_of(1, 2, 3)
    logits = raw.copy()
    rows = [request(prompt, output, sp, eos=frozenset({EOS})), None, request(prompt[:2], output[:1], sp)]
    pending, changed = LogitsProcessor(np, logits, V, frozenset({EOS})).apply(rows, 3)
    assert changed and pending is None
    for i in (0, 2):
        r = rows[i]
        want = next_token(raw[i].astype(np.float64), sp, r.prompt, r.output, [EOS])
        assert int(np.argmax(logits[i])) == want, i
    assert np.array_equal(logits[1], raw[1])  # a padding row is left alone


def test_rows_that_ask_nothing_are_left_bit_for_bit_and_min_tokens_expires():
    raw = logits_of(4, 5)
    logits = raw.copy()
    asking = request([20, 21], [22] * 5, SamplingParams(min_tokens=5), eos=frozenset({EOS}))  # has 5: no mask
    plain = request([20, 21], [], SamplingParams())
    LogitsProcessor(np, logits, V, frozenset({EOS})).apply([asking, plain], 2)
    assert np.array_equal(logits, raw)
    assert not sets_controls(SamplingParams()) and not asks_processing(SamplingParams())


@pytest.mark.parametrize("n", [0, 1, 5, 20])
def test_logprobs_are_the_raw_log_softmax_with_the_top_n_ties_to_the_lower_id(n: int) -> None:
    raw = logits_of(6, 7, 8)
    raw[1, 50] = raw[1, 51] = raw[1].max() + 1.0  # a tie at the top: the lower id first
    logits = raw.copy()
    sp = SamplingParams(logprobs=n, logit_bias={60: 50.0})  # the bias changes the choice, not the logprobs
    rows = [request([20], [], sp), request([21], [], SamplingParams()), request([22], [30], sp)]
    proc = LogitsProcessor(np, logits, V, frozenset({EOS}))
    pending, changed = proc.apply(rows, 3)
    assert changed and pending is not None and pending.rows == [0, 2]
    ids = np.argmax(logits, axis=1).astype(np.int32)  # the greedy choice after the controls: token 60
    assert ids[0] == ids[2] == 60
    proc.chosen(pending, ids)
    got = pending.resolve()
    for entry, i in zip(got, (0, 2), strict=True):
        want = position_logprobs(raw[i].astype(np.float64), 60, n)
        assert entry.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [t for t, _ in entry.top] == [t for t, _ in want.top]
        assert np.allclose([v for _, v in entry.top], [v for _, v in want.top], atol=1e-5)
    if n:
        assert got[0].top[0][0] != 60  # the top N are the raw distribution's, not the biased one's


def test_a_row_asking_fewer_than_another_gets_its_own_n():
    logits = logits_of(9, 10)
    rows = [request([20], [], SamplingParams(logprobs=2)), request([21], [], SamplingParams(logprobs=7))]
    proc = LogitsProcessor(np, logits, V, frozenset())
    pending, changed = proc.apply(rows, 2)
    assert not changed and pending is not None
    proc.chosen(pending, np.argmax(logits, axis=1))
    assert [len(e.top) for e in pending.resolve()] == [2, 7]


@pytest.mark.parametrize(("temperature", "min_p"), [(1.0, 0.05), (0.5, 0.2), (2.0, 0.01)])
def test_min_p_keeps_exactly_the_tokens_the_reference_keeps(temperature: float, min_p: float) -> None:
    raw = logits_of(11)
    logits = raw.copy()
    sp = SamplingParams(temperature=temperature, min_p=min_p, seed=1)
    LogitsProcessor(np, logits, V, frozenset()).apply([request([20], [], sp)], 1)
    x = raw[0].astype(np.float64)
    probs = np.exp((x - x.max()) / temperature)
    kept_ref = probs >= min_p * probs.max()
    kept = np.isfinite(logits[0])
    margin = np.abs(probs / probs.max() - min_p) > 1e-5  # away from the cut, float32 and float64 agree
    assert np.array_equal(kept[margin], kept_ref[margin]) and kept.sum() >= 1
    assert np.array_equal(logits[0][kept], raw[0][kept])  # kept tokens keep their logits
    assert math.isinf(float(logits[0][~kept].max(initial=-np.inf)))


@pytest.mark.parametrize("n", [0, 3])
def test_prompt_logprobs_are_each_token_under_the_row_before_it(n: int) -> None:
    rows = np.stack([fake_logits(V, POOL, (k, 2), 20 + k) for k in range(9)]).astype(np.float32)  # a pass's rows
    prompt = [30, 31, 32, 33, 34]
    r = request(prompt, [], SamplingParams(prompt_logprobs=n))
    other = request([40, 41, 42, 43], [], SamplingParams(prompt_logprobs=1))
    pending = LogitsProcessor(np, rows, V, frozenset()).prompt_logprobs(rows, [(other, 0), (r, 4)])
    pending.resolve()
    assert r.prompt_logprobs is not None and r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        want = position_logprobs(rows[4 + i - 1].astype(np.float64), prompt[i], n)
        got = r.prompt_logprobs[i]
        assert got is not None and got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]
    assert other.prompt_logprobs is not None and len(other.prompt_logprobs) == 4
    assert asks_processing(SamplingParams(prompt_logprobs=0))
