"""A stand-in :class:`~fi_engine.runtime.stepping.StepEngine` for the serving tests on CPU (no GPU, no model).

:class:`FakeStepEngine` keeps the protocol's contract the way the GPU engine does: requests queued FIFO and
admitted into ``max_batch`` slots, one token per active request per step (the admitting step is the prefill and
gives the first token), a request ends on one of its EOS ids (kept in its output) or at ``max_new_tokens``,
:meth:`~FakeStepEngine.abort_request` frees the slot at once and the next step reports it with ``"abort"``.
Its tokens follow a rule (:func:`expected_tokens`) so that a test knows every request's exact output; a
``scripts`` table gives chosen prompts chosen outputs (text for the stop-string tests).

It records what a test asserts: the rids aborted, the most slots used at once, the threads that called it (the
service must call it from one), and it can be slow (``step_delay_s``) or fail at a step (``fail_at_step``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from fi_engine.runtime.sampling_params import SamplingParams
from fi_engine.runtime.stepping import FinishReason, StepOutput


def expected_tokens(
    prompt: Sequence[int], max_new_tokens: int, pool: Sequence[int], seed: int = 0, eos: Sequence[int] = ()
) -> list[int]:
    """What :class:`FakeStepEngine` generates for ``prompt`` (without a script): token ``k`` is
    ``pool[(sum(prompt) * 7 + seed * 13 + k * 5) % len(pool)]``, up to ``max_new_tokens`` or the first EOS id."""
    out = []
    base = sum(prompt) * 7 + seed * 13
    for k in range(max_new_tokens):
        token = pool[(base + k * 5) % len(pool)]
        out.append(token)
        if token in eos:
            break
    return out


@dataclass
class FakeRequest:
    rid: int
    prompt: list[int]
    max_new_tokens: int
    seed: int
    eos: tuple[int, ...]
    script: list[int] | None  # the tokens to give, else the rule of expected_tokens
    generated: list[int] = field(default_factory=list)


class FakeStepEngine:
    """A deterministic :class:`~fi_engine.runtime.stepping.StepEngine` over a vocabulary of ``vocab_size`` ids.

    Args:
        vocab_size: ids of prompts lie in ``[0, vocab_size)``.
        pool: the ids it generates from (default: ``range(vocab_size)``; a tokenizer's plain tokens in the text
            tests, so the text is readable and no special token appears by chance).
        max_batch: slots. max_seq_len: the most prompt + generated tokens of a request (a longer one is refused).
        eos_token_ids: the default EOS ids (``add_request(eos_token_ids=None)``).
        scripts: prompt (a tuple of ids) -> the tokens to generate for it (then the limits and EOS apply).
        step_delay_s: seconds each step sleeps (a slow engine). fail_at_step: raise RuntimeError at that step.
        step_s: seconds each step takes in all, its own work included (it sleeps what is left): a GPU's step of a
            fixed time, for benchmarks/bench_serve.py's stand-in server.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        pool: Sequence[int] | None = None,
        max_batch: int = 4,
        max_seq_len: int = 1 << 20,
        eos_token_ids: Sequence[int] = (),
        scripts: dict[tuple[int, ...], list[int]] | None = None,
        step_delay_s: float = 0.0,
        fail_at_step: int | None = None,
        step_s: float = 0.0,
    ) -> None:
        self.vocab_size = vocab_size
        self.pool = list(pool) if pool is not None else list(range(vocab_size))
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.eos_token_ids = tuple(eos_token_ids)
        self.scripts = dict(scripts or {})
        self.step_delay_s = step_delay_s
        self.step_s = step_s
        self.fail_at_step = fail_at_step
        self._next_rid = 0
        self._queue: deque[FakeRequest] = deque()
        self._active: dict[int, FakeRequest] = {}
        self._aborted_pending: list[int] = []
        self.aborted: list[int] = []  # every rid aborted while queued or active
        self.added: list[tuple[int, tuple[int, ...], int, SamplingParams | None]] = []
        self.most_active = 0
        self.steps = 0
        self.threads: set[int] = set()

    def _called(self) -> None:
        self.threads.add(threading.get_ident())

    def plan(self, prompt: Sequence[int], max_new_tokens: int, seed: int = 0, eos: Sequence[int] = ()) -> list[int]:
        """The tokens a request of ``prompt`` gets (what :meth:`step` will emit for it)."""
        script = self.scripts.get(tuple(prompt))
        if script is None:
            return expected_tokens(prompt, max_new_tokens, self.pool, seed, eos)
        out = []
        for token in script[:max_new_tokens]:
            out.append(token)
            if token in eos:
                break
        return out

    def add_request(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        sampling: SamplingParams | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> int:
        self._called()
        prompt = list(prompt)
        if not prompt:
            raise ValueError("prompt: expected at least one token id")
        for i, t in enumerate(prompt):
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"prompt[{i}]: token id {t} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt: {len(prompt)} tokens + max_new_tokens {max_new_tokens} exceed max_seq_len {self.max_seq_len}"
            )
        eos = self.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
        seed = 0 if sampling is None or sampling.greedy else sampling.seed
        rid = self._next_rid
        self._next_rid += 1
        script = self.scripts.get(tuple(prompt))
        self._queue.append(FakeRequest(rid, prompt, max_new_tokens, seed, eos, script))
        self.added.append((rid, tuple(prompt), max_new_tokens, sampling))
        return rid

    def abort_request(self, rid: int) -> None:
        self._called()
        if rid in self._active:
            del self._active[rid]
        else:
            found = next((r for r in self._queue if r.rid == rid), None)
            if found is None:
                return
            self._queue.remove(found)
        self.aborted.append(rid)
        self._aborted_pending.append(rid)

    def step(self) -> list[StepOutput]:
        self._called()
        if not self.has_unfinished:
            return []
        started = time.perf_counter()
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError(f"the fake engine fails at step {self.steps}")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        outputs = [StepOutput(rid, (), "abort") for rid in self._aborted_pending]
        self._aborted_pending.clear()
        while self._queue and len(self._active) < self.max_batch:
            request = self._queue.popleft()
            self._active[request.rid] = request
        self.most_active = max(self.most_active, len(self._active))
        for rid, request in list(self._active.items()):
            k = len(request.generated)
            if request.script is not None:
                token = request.script[k]
                last = k + 1 == min(len(request.script), request.max_new_tokens)
            else:
                token = self.pool[(sum(request.prompt) * 7 + request.seed * 13 + k * 5) % len(self.pool)]
                last = k + 1 == request.max_new_tokens
            request.generated.append(token)
            finish: FinishReason | None = None
            if token in request.eos:
                finish = "stop"
            elif last:
                finish = "length"
            if finish is not None:
                del self._active[rid]
            outputs.append(StepOutput(rid, (token,), finish))
        if self.step_s:
            left = started + self.step_s - time.perf_counter()
            if left > 0:
                time.sleep(left)
        return outputs

    @property
    def has_unfinished(self) -> bool:
        return bool(self._queue or self._active or self._aborted_pending)

    @property
    def active(self) -> int:
        return len(self._active)
