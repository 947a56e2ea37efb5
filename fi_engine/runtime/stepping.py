"""The step-by-step serving interface (:class:`StepEngine`): requests added and aborted one at a time, and one
:meth:`~StepEngine.step` after another returning each request's new tokens (:class:`StepOutput`).

It is the seam between a model engine and what serves many callers at once (the streaming service and the HTTP
server): the engine implements it on the GPU, the service drives it from one thread, and the server's CPU tests
drive the service with a stand-in that implements the same protocol without a GPU. A value module: no engine
state, nothing imported from the engine's parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, cast, runtime_checkable

from .sampling_params import SamplingParams

__all__ = ["FinishReason", "StepEngine", "StepEngineBase", "StepOutput", "TokenLogprobs"]

NewRequest = tuple[Sequence[int], int, SamplingParams | None, Sequence[int] | None]
"""One request as :meth:`StepEngine.add_request` takes it: ``(prompt, max_new_tokens, sampling, eos_token_ids)``."""

FinishReason = Literal["stop", "length", "abort"]
"""Why a request ended: ``"stop"`` (one of its end-of-sequence tokens, which is kept in its output), ``"length"``
(its ``max_new_tokens``) or ``"abort"`` (:meth:`StepEngine.abort_request`)."""


@dataclass(frozen=True)
class TokenLogprobs:
    """The log-probabilities at one position of a request (a generated token's, or a prompt token's).

    Natural logarithms (Python floats) of the model's distribution at that position: the log-softmax of its raw
    logits in float32, before ``logit_bias``, ``min_tokens``, penalties, temperature and top-k / top-p / min-p
    (vLLM's default, "raw logprobs"), so that a token's value does not depend on how it was chosen.

    ``logprob``: of the token at that position (the one generated, or the prompt's). ``top``: the N most likely
    tokens there as ``(token id, logprob)``, most likely first (ties: the lower id first), N being the request's
    :attr:`~fi_engine.runtime.sampling_params.SamplingParams.logprobs` (for generated tokens) or ``prompt_logprobs``
    (for the prompt's); ``()`` when N is 0. The token at the position may or may not be among them.
    """

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, init=False)
class StepOutput:
    """What one :meth:`StepEngine.step` produced for one request.

    ``rid``: the id :meth:`StepEngine.add_request` returned. ``token_ids``: the tokens this step generated for it
    (one per step today; a list so a step may give several). ``finish_reason``: None while it continues;
    otherwise why it ended, and its slot and KV pages are free again when the step returns.

    ``logprobs``: None unless the request's sampling asked for them (``SamplingParams.logprobs`` not None); then
    one :class:`TokenLogprobs` per token of ``token_ids``, in order. ``prompt_logprobs``: None except on the first
    output with tokens of a request whose sampling set ``prompt_logprobs``: one entry per prompt token, the first
    None (nothing precedes it: as vLLM and OpenAI's ``echo`` give it), entry ``i`` the distribution after
    ``prompt[:i]`` with ``logprob`` that of ``prompt[i]``.

    ``num_cached_tokens``: on the first output with tokens of a request, how many of its prompt tokens the engine
    found in its prefix cache (their keys and values computed for an earlier request; 0 without a hit), as vLLM
    reports it and OpenAI's usage gives ``prompt_tokens_details.cached_tokens``; None on its later outputs, with
    the cache off, and from an engine that does not say.

    ``num_draft_tokens`` / ``num_accepted_tokens``: with speculative decoding, where this step verified a draft for
    the request, the draft tokens fed and how many of them the model accepted (vLLM's ``spec_decode`` counts); None
    otherwise.

    An engine whose ``add_requests_nowait`` returns ids before the engine has seen the requests (an engine
    process's :class:`~fi_engine.serve.engine_client.EngineClient`) answers for each one through
    :meth:`StepEngine.step`:
    an output with no tokens and no finish reason once the engine took it, or, where it refused it,
    ``finish_reason="abort"`` with ``error`` the ``ValueError`` / ``TypeError`` ``add_request`` would have raised.
    """

    rid: int
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    error: Exception | None = None
    logprobs: tuple[TokenLogprobs, ...] | None = None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    num_cached_tokens: int | None = None
    num_draft_tokens: int | None = None
    num_accepted_tokens: int | None = None

    def __init__(
        self,
        rid: int,
        token_ids: tuple[int, ...],
        finish_reason: FinishReason | None = None,
        error: Exception | None = None,
        logprobs: tuple[TokenLogprobs, ...] | None = None,
        prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None,
        num_cached_tokens: int | None = None,
        num_draft_tokens: int | None = None,
        num_accepted_tokens: int | None = None,
    ) -> None:
        # The engine makes one per request per step: the fields set through the instance's dict, not a frozen
        # dataclass's object.__setattr__ per field (about 4x the time of this, measured with seven fields); the
        # value stays frozen (assignment refused) and compares and hashes by its fields.
        self.__dict__.update(
            rid=rid,
            token_ids=token_ids,
            finish_reason=finish_reason,
            error=error,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=num_cached_tokens,
            num_draft_tokens=num_draft_tokens,
            num_accepted_tokens=num_accepted_tokens,
        )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@runtime_checkable
class StepEngine(Protocol):
    """An engine served one step at a time, from one thread (its calls are not thread-safe).

    - :meth:`add_request` queues a prompt (token ids) and returns its id, or raises ``ValueError`` naming the
      argument when it can never be served (empty, ids outside the vocabulary, longer than the engine allows);
    - :meth:`step` admits queued requests into free batch slots and runs one prefill or one decode step over the
      active ones (whatever the engine's policy picks), returning a :class:`StepOutput` for every request that
      produced tokens or ended in it; with nothing queued or active it returns ``[]`` at once;
    - :meth:`abort_request` ends a queued or active request now: its slot and pages are freed before it returns,
      and the next :meth:`step` reports it once with ``finish_reason="abort"`` (an id that is unknown or already
      finished: nothing happens);
    - :attr:`has_unfinished`: whether any request is queued or active.

    Each request carries its own :class:`~fi_engine.runtime.sampling_params.SamplingParams` and end-of-sequence ids
    (None: the checkpoint's).

    An engine whose :meth:`step` may wait for outputs computed elsewhere (an engine process's
    :class:`~fi_engine.serve.engine_client.EngineClient`) may also have ``wake()``: thread-safe, it makes a waiting
    ``step()`` return at once, and :class:`~fi_engine.serve.service.GenerationService` calls it when it queues new work.
    """

    max_batch: int

    def add_request(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        sampling: SamplingParams | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> int:
        """Queue ``prompt`` (token ids) for up to ``max_new_tokens`` new tokens; returns the request's id (an int).
        ``sampling``: its own (None: greedy); ``eos_token_ids``: the tokens that end it, kept in its output (None:
        the checkpoint's; ``()``: none). Raises ValueError naming the argument when the request can never be served
        (and TypeError naming ``sampling`` for anything but :class:`~fi_engine.runtime.sampling_params.SamplingParams`
        or None); nothing is queued then.

        This body is :class:`StepEngineBase`'s (an engine of this package queues the request in its own
        ``_add_request``, by its own rules); an engine of another package writes its own."""
        return cast("StepEngineBase", self)._add_request((prompt, max_new_tokens, sampling, eos_token_ids))

    def abort_request(self, rid: int) -> None:
        """End request ``rid`` now, freeing its slot and pages; the next :meth:`step` reports it with
        ``finish_reason="abort"``. Unknown or finished ids: nothing happens."""
        ...

    def step(self) -> list[StepOutput]:
        """Admit queued requests and run one prefill or decode step; the new tokens of every request that got
        some or ended (``[]`` when nothing is queued or active)."""
        ...

    @property
    def has_unfinished(self) -> bool: ...


class StepEngineBase:
    """The engines of this package that implement :class:`StepEngine` (the GPU engine, an engine process and its
    connections) take :meth:`add_request`'s arguments here, one signature for all of them, and each queues the
    request in its own :meth:`_add_request`. (An engine of another package needs no base: the protocol is
    structural.)"""

    add_request = StepEngine.add_request  # the protocol's signature, docstring and body, written once

    def _add_request(self, request: NewRequest) -> int:
        """Queue ``request`` (``(prompt, max_new_tokens, sampling, eos_token_ids)``) and return its id, as
        :meth:`add_request` says; each engine its own."""
        raise NotImplementedError
