"""Speculative decoding's host side, on CPU: the n-gram drafts (:class:`NgramProposer`), a draft model's calls
(:class:`DraftModelProposer`), the tokens a verifying pass accepts (:func:`accepted_tokens`), the policy, the config
and the tokenizer check. The serving loop's speculative steps: tests/engine/test_step_api_host.py
(``test_speculation_*``); on a GPU: tests/engine/test_gpu_step_api.py (``test_speculative_*``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from fi_engine.runtime.sample.speculation import (
    DraftModelProposer,
    DraftPolicy,
    NgramProposer,
    SpeculativeConfig,
    accepted_tokens,
    same_directory,
    speculative_config_arg,
    tokenizer_difference,
)


def test_the_draft_follows_the_latest_earlier_occurrence_of_the_longest_suffix() -> None:
    p = NgramProposer(3, prompt_lookup_max=3)
    #            0  1  2  3  4  5  6  7  8  9 10
    tokens = [5, 6, 7, 8, 9, 6, 7, 1, 2, 6, 7]
    # "6 7" occurred at 1 and 5: the latest (5) is followed by 1, 2, 6
    assert p.propose(tokens) == (1, 2, 6)
    assert p.propose(tokens, limit=2) == (1, 2) and p.propose(tokens, limit=0) == ()
    # the longest suffix wins over a later shorter one: "8 9 6" at 3 beats the "6" at 9
    assert NgramProposer(2, prompt_lookup_max=3).propose([8, 9, 6, 4, 4, 6, 5, 8, 9, 6]) == (4, 4)
    assert p.propose([1, 2, 3, 4]) == ()  # nothing occurred before
    assert p.propose([3, 3]) == (3,) and p.propose([3]) == ()
    assert NgramProposer(2, prompt_lookup_max=2, prompt_lookup_min=2).propose([4, 1, 2, 9, 1]) == ()
    assert p.propose(np.array([7, 8, 7], dtype=np.int64)) == (8, 7)


@pytest.mark.parametrize(
    ("args", "name"), [((0,), "k"), ((65,), "k"), ((2, 0), "prompt_lookup_max"), ((2, 2, 3), "prompt_lookup_min")]
)
def test_sizes_are_checked_by_name(args, name) -> None:
    with pytest.raises(ValueError, match=name):
        NgramProposer(*args)
    with pytest.raises(TypeError, match="k: expected an int"):
        NgramProposer(1.5)  # type: ignore[arg-type]


def test_a_pass_gives_the_accepted_draft_and_one_more() -> None:
    assert accepted_tokens((4, 5, 6), (4, 5, 6, 7)) == [4, 5, 6, 7]  # all accepted, and the bonus choice
    assert accepted_tokens((4, 5, 6), (4, 9, 6, 7)) == [4, 9]  # up to the first choice that differs
    assert accepted_tokens((4,), (8, 3)) == [8]
    assert accepted_tokens((), (8,)) == [8]
    with pytest.raises(ValueError, match="choices: expected 3"):
        accepted_tokens((4, 5), (4,))
    with pytest.raises(TypeError, match="draft: expected a sequence of token ids"):
        accepted_tokens(None, (4,))  # type: ignore[arg-type]


class _Request:
    """A request as the policy sees it: any object it can key weakly."""


def test_the_policy_verifies_where_the_expected_tokens_pay_for_the_pass() -> None:
    policy = DraftPolicy(prior=0.5, explore=4, explore_budget=1.0)
    a, b = _Request(), _Request()
    assert policy.worth([(a, 4)])  # nothing measured yet: verify
    policy.timed(False, 1.0)
    policy.timed(True, 3.0)  # a pass costs three decode steps
    # exploring every 4th step loses (3 - 1) / 4 = 50 % of the decode time: within a budget of 100 %; within 4 %,
    # only every (3 - 1) / 0.04 = 50th step
    assert policy.interval() == 4 and DraftPolicy(explore=4, explore_budget=0.04).interval() == 4  # (nothing timed)
    policy.explore_budget = 0.04
    assert policy.interval() == 50
    policy.explore_budget = 1.0
    assert policy.expected(a, 3) == pytest.approx(0.5 + 0.25 + 0.125)
    assert policy.worth([(a, 4)])  # a's first draft: verified (a probe)
    policy.observe(a, 4, 2)  # its rate: 0.5 -> 0.5
    assert not policy.worth([(a, 4)])  # 1 + 0.94 tokens for 3 steps' time
    policy.observe(a, 4, 4)
    policy.observe(a, 4, 4)  # its rate: 0.5 -> 0.75 -> 0.875
    assert policy.rate(a) == pytest.approx(0.875) and policy.rate(b) == 0.5
    assert policy.worth([(a, 4)])  # 1 + 2.84 tokens for 3 steps' time: 1.28 per step
    assert not policy.worth([(a, 4), (b, 0), (b, 0)])  # two more rows without drafts: 5.84 / 3 < 3
    assert policy.worth([(b, 4)])  # b's first draft: a probe
    policy.observe(b, 4, 2)
    declined = [policy.worth([(b, 4)]) for _ in range(8)]
    assert declined == [False, True, False, False, False, True, False, False]  # every 4th declined one explores
    policy.timed(True, 1.0)  # the pass's time moves a fifth of the way: 2.6
    assert policy.verify_s == pytest.approx(2.6) and policy.decode_s == 1.0
    with pytest.raises(ValueError, match="prior"):
        DraftPolicy(prior=1.5)
    with pytest.raises(ValueError, match="min_rate"):
        DraftPolicy(min_rate=-0.1)
    fresh = DraftPolicy()
    fresh.timed(True, 2.0)  # a pass timed, no decode step yet: the next step decodes (and is timed)
    assert not fresh.worth([(a, 4)])
    fresh.timed(False, 1.0)
    assert fresh.worth([(a, 4)])  # (a probe: this policy has no rate of a's)
    fresh.observe(a, 4, 2)
    assert not fresh.worth([(a, 4)])  # 1 + 0.94 tokens for 2 steps' time
    fresh.observe(a, 4, 4)
    fresh.observe(a, 4, 4)
    assert fresh.worth([(a, 4)])  # 1 + 2.84 tokens for 2 steps' time
    with pytest.raises(ValueError, match="explore_budget"):
        DraftPolicy(explore_budget=0.0)


def test_a_request_whose_drafts_are_rejected_drafts_only_to_explore() -> None:
    policy = DraftPolicy(prior=0.5, explore=4, min_rate=0.3)
    a = _Request()
    assert policy.drafts(a)  # the prior: it drafts
    policy.observe(a, 4, 0)  # 0.5 -> 0.25: below min_rate
    seen = []
    for _ in range(6):  # a step: asked twice (to decide, then to draft), the same answer; then recorded
        seen.append(policy.drafts(a))
        assert policy.drafts(a) == seen[-1]
        policy.stepped()
    assert seen == [False, False, False, False, True, True]  # held back until 4 steps passed since its last draft
    policy.observe(a, 4, 0)  # verified again, rejected again: 0.25 -> 0.125
    assert [policy.drafts(a) for _ in range(3)] == [False] * 3  # held back again, from this step
    for _ in range(4):
        policy.stepped()
    assert policy.drafts(a)
    policy.observe(a, 4, 4)  # 0.125 -> 0.5625
    assert policy.drafts(a)


class _DraftEngine:
    """What :class:`DraftModelProposer` calls of a draft engine: ``max_seq_len`` and ``generate`` (it continues each
    text with its last token + 1, ..., as many as asked), recording its calls."""

    max_seq_len = 12

    def __init__(self) -> None:
        self.calls: list[tuple[list[list[int]], list[int]]] = []

    def generate(self, prompts, max_new_tokens):
        self.calls.append((prompts, list(max_new_tokens)))
        return SimpleNamespace(
            tokens=[[p[-1] + i + 1 for i in range(n)] for p, n in zip(prompts, max_new_tokens, strict=True)]
        )


def test_a_draft_model_drafts_in_one_call_within_each_limit_and_its_context() -> None:
    engine = _DraftEngine()
    proposer = DraftModelProposer(engine, 4)
    histories = [np.arange(5), np.arange(3), np.arange(10), np.arange(12)]
    drafts = proposer.propose_many(histories, [9, 0, 9, 9])
    # the second may draft nothing; the third only 2 (its 10 tokens and the draft within max_seq_len 12); the last
    # fills the draft engine's context: no draft
    assert drafts == [(5, 6, 7, 8), (), (10, 11), ()]
    assert engine.calls == [([[0, 1, 2, 3, 4], list(range(10))], [4, 2])]  # one generate call for the step
    assert proposer.propose_many([np.arange(2)], [0]) == [()] and len(engine.calls) == 1  # nothing asked: no call
    with pytest.raises(ValueError, match="k: expected an int in"):
        DraftModelProposer(engine, 0)


def test_the_speculative_config_arg_reads_both_methods() -> None:
    assert speculative_config_arg(None) is None
    assert speculative_config_arg({"num_speculative_tokens": 3}) == SpeculativeConfig("ngram", 3, 4, 1)
    assert speculative_config_arg({"model": "/ckpt", "num_speculative_tokens": 5}) == SpeculativeConfig(
        "draft_model", 5, model="/ckpt"
    )
    with pytest.raises(ValueError, match=r"\['model'\]: a draft model's directory; the 'ngram' method takes none"):
        speculative_config_arg({"method": "ngram", "model": "/ckpt", "num_speculative_tokens": 5})


def test_a_tokenizer_difference_names_the_first_token_that_differs(tmp_path) -> None:
    def write(name: str, data: object) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(data))
        return str(tmp_path / name)

    bpe = write("bpe", {"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 2, "content": "<eos>"}]})
    same = write("same", {"model": {"vocab": {"b": 1, "a": 0}}, "added_tokens": [{"id": 2, "content": "<eos>"}]})
    other_eos = write(
        "other_eos", {"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 3, "content": "<eos>"}]}
    )
    unigram = write("unigram", {"model": {"vocab": [["a", -1.0], ["b", -2.0], ["c", -3.0]]}})
    assert tokenizer_difference(bpe, same) is None
    assert tokenizer_difference(bpe, other_eos) == "the draft tokenizer's '<eos>' is token 3, the target's 2"
    assert tokenizer_difference(unigram, bpe) == "the draft tokenizer's '<eos>' is token 2, the target's None"
    assert tokenizer_difference(bpe, unigram) == "the draft tokenizer's 'c' is token 2, the target's None"
    assert tokenizer_difference(bpe, tmp_path / "nowhere") is None  # (no tokenizer.json: not compared here)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    assert tokenizer_difference(bpe, tmp_path / "broken") is None
    assert same_directory(bpe, tmp_path / "bpe" / ".." / "bpe") and not same_directory(bpe, same)
