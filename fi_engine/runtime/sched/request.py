"""A request being served (:class:`Request`): its prompt, its tokens so far, its pages and slot, and what it asked
for (sampling, log-probabilities, a grammar, speculation); the scheduler makes and moves it
(:class:`~fi_engine.runtime.sched.scheduler.Scheduler`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...text.grammar import GrammarMatcher
from ..sampling_params import SamplingParams

__all__ = ["Request"]


@dataclass(eq=False)
class Request:
    """One prompt being served. ``output`` holds the generated tokens (the first comes from the prefill).

    ``sampling``: how its tokens are chosen (None: greedy argmax); ``draws``: the random stream its sampled tokens
    draw from (the engine's :class:`~fi_engine.runtime.sample.sampler.Draws`; None when greedy); ``eos``: the tokens
    that end it (None: the scheduler's); ``grammar``: where its ``sampling.grammar`` is set, the matcher of its output
    so far (the tokens allowed next: :class:`~fi_engine.runtime.sample.logits_processing.LogitsProcessor`)."""

    rid: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    budget_pages: int
    output: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V are in the cache
    # chunked prefill: where the prompt's pass in flight (or the last recorded) ends, short of the prompt's end; None
    # once its last chunk is admitted (or its prompt was prefilled whole). A request whose chunk is set takes no
    # token from its pass and is no decode row (Scheduler.admit; Scheduler.chunk_tokens)
    chunk_end: int | None = None
    draft: tuple[int, ...] = ()  # speculative decoding: the tokens fed after its last one in the pass being staged
    speculative: bool = True  # speculative decoding may draft for it (its sampling's speculative_decoding)
    drafted: int = 0  # speculative decoding: draft tokens verified since its last output (the step API's), and ...
    accepted: int = 0  # ... how many of them were accepted
    hit: int = 0  # prompt tokens found in the prefix cache at admission (their K/V computed by an earlier request)
    asks: SamplingParams | None = None  # its sampling where it sets logprobs or a control (asks_processing)
    logprobs: list[Any] = field(default_factory=list)  # a TokenLogprobs per output token, where asks.logprobs is set
    prompt_logprobs: tuple[Any, ...] | None = None  # None, then a TokenLogprobs per prompt token (asks.prompt_logprobs)
    slot: int = -1  # row in the batch while active
    finish_reason: str | None = None  # "eos", "length" or "abort" once finished
    sampling: SamplingParams | None = None
    draws: Any = None
    eos: frozenset[int] | None = None
    queued_at: float = 0.0  # time.perf_counter() when it was submitted
    grammar: GrammarMatcher | None = None  # its place in its sampling's grammar (None: no grammar)
    # its LoRA adapter (fi_engine.lora): the name asked for (None: the base model), the adapter's key (also its
    # prefix-cache key: a cached prefix of one adapter serves no other), and its GPU slot while active (-1: none)
    lora: str | None = None
    lora_key: Any = None
    lora_slot: int = -1
    error: Exception | None = None  # why it was aborted at admission (its adapter could not be read again), if so

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def decoding(self) -> bool:
        """Whether it is a decode row: its prompt's prefill is, or will be once the pass in flight ends, complete
        (not cut short by chunked prefill)."""
        return self.chunk_end is None

    def position(self, ahead: int = 0) -> int:
        """The position of the token it is fed next: its last token's (``cached`` once its tokens are recorded),
        or ``ahead`` positions further where that many passes giving it a token are in flight, not recorded."""
        return len(self.prompt) + len(self.output) - 1 + ahead
