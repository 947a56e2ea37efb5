"""Speculative decoding by prompt lookup, on CPU: the n-gram drafts (:class:`NgramProposer`), the tokens a verifying
pass accepts (:func:`accepted_tokens`). The serving loop's speculative steps: tests/engine/test_step_api_host.py
(``test_speculation_*``); on a GPU: tests/engine/test_gpu_step_api.py (``test_speculative_*``)."""

from __future__ import annotations

import numpy as np
import pytest

from fi_engine.runtime.speculation import DraftPolicy, NgramProposer, accepted_tokens


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
    policy = DraftPolicy(prior=0.5, explore=4)
    a, b = _Request(), _Request()
    assert policy.worth([(a, 4)])  # nothing measured yet: verify
    policy.timed(False, 1.0)
    policy.timed(True, 3.0)  # a pass costs three decode steps
    assert policy.expected(a, 3) == pytest.approx(0.5 + 0.25 + 0.125)
    assert not policy.worth([(a, 4)])  # 1 + 0.94 tokens for 3 steps' time
    policy.observe(a, 4, 4)
    policy.observe(a, 4, 4)  # its rate: 0.5 -> 0.75 -> 0.875
    assert policy.rate(a) == pytest.approx(0.875) and policy.rate(b) == 0.5
    assert policy.worth([(a, 4)])  # 1 + 2.84 tokens for 3 steps' time: 1.28 per step
    assert not policy.worth([(a, 4), (b, 0), (b, 0)])  # two more rows without drafts: 5.84 / 3 < 3
    declined = [policy.worth([(b, 4)]) for _ in range(8)]
    assert declined == [False, True, False, False, False, True, False, False]  # every 4th declined one explores
    policy.timed(True, 1.0)  # the pass's time moves a fifth of the way: 2.6
    assert policy.verify_s == pytest.approx(2.6) and policy.decode_s == 1.0
    with pytest.raises(ValueError, match="prior"):
        DraftPolicy(prior=1.5)
    with pytest.raises(ValueError, match="min_rate"):
        DraftPolicy(min_rate=-0.1)


def test_a_request_whose_drafts_are_rejected_drafts_only_to_explore() -> None:
    policy = DraftPolicy(prior=0.5, explore=4, min_rate=0.3)
    a = _Request()
    assert policy.drafts(a)  # the prior: it drafts
    policy.observe(a, 4, 0)  # 0.5 -> 0.25: below min_rate
    assert [policy.drafts(a) for _ in range(8)] == [False, False, False, True] * 2  # every 4th step held back
    policy.observe(a, 4, 4)  # 0.25 -> 0.625
    assert policy.drafts(a)
