"""Speculative decoding by prompt lookup, on CPU: the n-gram drafts (:class:`NgramProposer`), the tokens a verifying
pass accepts (:func:`accepted_tokens`), and the serving loop's speculative steps over the real scheduler with the
device work stood in for by a rule (tests/engine/test_step_api_host.py's ``bare_engine``): the same tokens as
without speculation, in fewer steps. On a GPU: tests/engine/test_gpu_step_api.py (``test_speculative_*``)."""

from __future__ import annotations

import numpy as np
import pytest
from test_step_api_host import EOS, PS, bare_engine

from fi_engine.runtime import serving
from fi_engine.runtime.paging import fill_prefill, prefill_layout
from fi_engine.runtime.speculation import NgramProposer, accepted_tokens


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


def repeating(history) -> int:
    """The stand-in model: it repeats its text with a period of 7 tokens (its first token while shorter; prompt
    lookup predicts it all) and ends (EOS) once the text holds 50 tokens."""
    return EOS if len(history) >= 50 else int(history[-7] if len(history) >= 7 else history[0])


class _Choices:
    """What a verifying pass's ``full.argmax(axis=1).astype(...).get(stream=...)`` reads: each row's choice."""

    def __init__(self, choices):
        self.choices = np.array(choices, dtype=np.int32)

    def argmax(self, axis):
        return self

    def astype(self, dtype):
        return self

    def get(self, stream=None):
        return self.choices


def speculating_engine(model, k: int):
    e = bare_engine(max_batch=3, num_pages=1 + 24, token_of=lambda r: model([*r.prompt, *r.output]))
    layout = prefill_layout(e.max_prefill_tokens, 3, 64, padded=True)
    e.runner.prefill_arrays = layout.views(np.zeros(layout.total, np.int32))
    passes = []

    def run_prefill(rows, riders_behind, slots, ahead, all_logits=False, last_head=True):
        assert all_logits and not last_head and riders_behind == 0 and ahead == 0
        fill_prefill(rows, PS, e.runner.prefill_arrays)  # (AssertionError for a draft position without its page)
        choices = []
        for r in rows:
            history = [*r.prompt, *r.output]
            choices.append(model(history))
            for d in r.draft:  # the row of each draft token: the choice after it
                history.append(d)
                choices.append(model(history))
        passes.append([len(r.draft) for r in rows])
        return None, 0, _Choices(choices)

    e.runner.run_prefill = run_prefill
    e.speculative_tokens = k
    return e, passes


@pytest.mark.parametrize("overlap", [False, True])
def test_speculation_gives_the_same_tokens_in_fewer_steps(overlap) -> None:
    prompts = [[1, 2, 3, 4, 5, 6, 7] * 2, [9, 8, 7, 6, 5, 4, 3, 2], [11, 12, 13]]

    def run(k: int):
        e, passes = speculating_engine(repeating, k)
        e.overlap_steps = overlap
        rids = [e.add_request(p, 40) for p in prompts]
        got: dict[int, list[int]] = {r: [] for r in rids}
        steps = 0
        while e.has_unfinished:
            for o in e.step():
                got[o.rid] += o.token_ids
            steps += 1
        return [got[r] for r in rids], steps, passes, e

    plain, plain_steps, none, _ = run(0)
    fast, fast_steps, passes, e = run(4)
    assert fast == plain and not none
    assert plain[0][-1] == EOS and len(plain[1]) == 40  # one ends by its end-of-sequence token, one by its limit
    stats = e.speculation_stats
    assert stats.passes == len(passes) > 0 and stats.drafted == sum(map(sum, passes))
    # the texts repeat: the drafts are accepted, but the short prompt's first ones (its text repeats its first token
    # until it holds 7) and the drafts past the end-of-sequence token (this run: 81 of 107)
    assert stats.acceptance_rate > 0.7 and stats.tokens == stats.accepted + sum(map(len, passes))
    assert fast_steps < plain_steps / 2
    assert e.scheduler.allocator.num_free == e.scheduler.allocator.capacity  # every page back


def test_a_draft_stops_at_the_request_limit_and_speculation_is_checked(monkeypatch) -> None:
    e, passes = speculating_engine(repeating, 8)
    rid = e.add_request([1, 2, 3, 4, 5, 6, 7] * 2, 5)
    out: list[int] = []
    while e.has_unfinished:
        out += [t for o in e.step() if o.rid == rid for t in o.token_ids]
    assert out == [1, 2, 3, 4, 5] and all(n <= 3 for p in passes for n in p)  # at most 5 - 1 - len(output) drafted
    with pytest.raises(ValueError, match="speculative_tokens: expected an int in"):
        e.speculative_tokens = 17
    e.runner.family.llama_pass = False
    with pytest.raises(ValueError, match="speculative_tokens: .*Llama family's reads the paged cache"):
        e.speculative_tokens = 2
    assert serving.ServingLoop.speculative_tokens.__doc__
