"""How a request's tokens are chosen (:class:`SamplingParams`): a value, with no engine state, so that the engine's
parts (:mod:`fi_engine.runtime.worker.state`, :mod:`fi_engine.runtime.sample.sampler`) and its callers share it without
importing each other."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["MAX_LOGPROBS", "SamplingParams", "sampling_arg"]

MAX_LOGPROBS = 20  # the most top log-probabilities a request may ask for (OpenAI's top_logprobs bound, vLLM's default)
MAX_LOGIT_BIAS = 100.0  # |bias| bound, OpenAI's


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. ``temperature == 0`` (default): greedy argmax. Otherwise softmax of
    ``logits / temperature`` restricted to the ``top_k`` most likely tokens (0: all) and the smallest set of
    probability ``top_p``, drawn with a Philox generator.

    ``seed`` (an int in ``[0, 2**64)``, or None): where the draws come from.

    - ``Engine.generate``: one Philox stream per call, seeded with ``seed`` (None: 0) at offset 0 and shared by
      the call's prompts (each batch row its own subsequence): the same call reproduces its tokens.
    - ``Engine.add_request``: with a seed, the request draws from a stream of its own (that seed, subsequence 0,
      advanced by each of its tokens), independent of the other requests, the batch and the CUDA graph: it
      reproduces its tokens whenever its logits are the same (exactly when it runs alone; in a batch the logits may
      differ in their last bits, which can change a draw). None: the engine's shared stream (seeded at random
      once per engine), like an unseeded request of an OpenAI-style server.

    The controls below have vLLM's meanings; each default changes nothing. In the order they act on a step's
    logits: ``logit_bias`` ((token id, bias) pairs, bias in ``[-100, 100]`` added to that token's logit; a mapping
    is accepted and stored as pairs sorted by id, so the value stays hashable); ``min_tokens`` (>= 0: the request's
    end-of-sequence ids are masked out until it has that many tokens); ``repetition_penalty`` (> 0, 1: none; a
    token seen in the prompt or the output has a positive logit divided by it, a negative one multiplied);
    ``frequency_penalty`` and ``presence_penalty`` (in ``[-2, 2]``: subtracted from a token's logit once per time /
    once if it occurs in the output so far); then greedy argmax, or for sampling ``temperature``, ``min_p`` (in
    ``[0, 1]``: tokens of probability below ``min_p`` times the most likely one's are dropped), ``top_k``,
    ``top_p``.

    ``logprobs`` (None, or 0 to :data:`MAX_LOGPROBS`): each new token comes with its log-probability and the
    ``logprobs`` most likely tokens' (0: its own only); ``prompt_logprobs`` (likewise): the prompt's tokens, on
    the request's first output (:class:`~fi_engine.runtime.stepping.TokenLogprobs` says what they are).

    ``grammar`` (None, or a grammar's serialized text: :func:`fi_engine.text.grammar.response_format_grammar`
    makes one from the OpenAI API's ``response_format``): each step allows only the tokens the grammar allows next
    (the others' logits are masked before the controls), and once the grammar is complete only end-of-sequence ids,
    the first of which ends the request (even one whose ``eos_token_ids`` are ``()``). It is checked here as a
    non-empty str only; the engine compiles it against its checkpoint's tokenizer when the request is added
    (:class:`fi_engine.text.grammar.GrammarTokenizer`).

    ``speculative_decoding`` (default True): False keeps the request out of speculative decoding where the engine
    speculates (``Engine.speculative_tokens``): it is never drafted for, and decodes one token a step.

    ``lora`` (None, or an adapter's name): the LoRA adapter the request is served with, one the engine has loaded
    (``Engine.load_lora``, or its ``lora`` settings' modules); None: the base model. Checked here as a name only;
    the engine refuses a name it does not serve when the request is added.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    grammar: str | None = None
    speculative_decoding: bool = True
    lora: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature: expected a float >= 0 (0: greedy), got {type(self.temperature).__name__}")
        if not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature: expected a finite value >= 0 (0: greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: expected an integer >= 0 (0: no limit), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise TypeError(f"top_p: expected a probability in (0, 1], got {type(self.top_p).__name__}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a probability in (0, 1], got {self.top_p!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed: expected None or an int in [0, 2**64), got {type(seed).__name__}")
        if seed is not None and not 0 <= seed < 1 << 64:  # a huge int shown by its size, not its digits
            shown = repr(seed) if seed.bit_length() <= 80 else f"an int of {seed.bit_length()} bits"
            raise ValueError(f"seed: expected None or an int in [0, 2**64), got {shown}")
        _number("min_p", self.min_p, lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1] (0: off)")
        for name in ("presence_penalty", "frequency_penalty"):
            _number(name, getattr(self, name), lambda v: -2.0 <= v <= 2.0, "a number in [-2, 2] (0: off)")
        _number(
            "repetition_penalty", self.repetition_penalty, lambda v: 0.0 < v < math.inf, "a finite number > 0 (1: off)"
        )
        _count("min_tokens", self.min_tokens, (1 << 31) - 1)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _count(name, getattr(self, name), MAX_LOGPROBS, "None or ")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise TypeError(f"grammar: expected None or a grammar's text (a str), got {type(self.grammar).__name__}")
        if not isinstance(self.speculative_decoding, bool):
            raise TypeError(
                f"speculative_decoding: expected True or False, got {type(self.speculative_decoding).__name__}"
            )
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora):
            raise TypeError(f"lora: expected None or an adapter's name (a non-empty str), got {self.lora!r:.80}")
        if self.grammar == "":
            raise ValueError("grammar: expected None or a grammar's text (fi_engine.text.grammar), got ''")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _number(name: str, value: object, in_range: Callable[[float], bool], expected: str) -> None:
    """TypeError naming ``name`` unless ``value`` is a real number (not a bool); ValueError unless ``in_range`` of it
    (never for NaN: every comparison with it is False)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    if not in_range(value):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _count(name: str, value: object, hi: int, none: str = "") -> None:
    """ValueError naming ``name`` unless ``value`` is an int in ``[0, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise ValueError(f"{name}: expected {none}an integer in [0, {hi}], got {value!r:.80}")


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as (token id, bias) pairs sorted by id: from a mapping or a sequence of pairs."""
    items = list(value.items()) if isinstance(value, Mapping) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)):
        raise TypeError(f"logit_bias: expected a mapping or pairs of token id -> bias, got {type(value).__name__}")
    out: dict[int, float] = {}
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise TypeError(f"logit_bias: expected (token id, bias) pairs, got {item!r:.80}")
        token, bias = item
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias: expected token ids (ints >= 0), got {token!r:.80}")
        _number(f"logit_bias[{token}]", bias, lambda v: abs(v) <= MAX_LOGIT_BIAS, "a bias in [-100, 100]")
        if token in out:
            raise ValueError(f"logit_bias: token id {token} is given twice")
        out[token] = float(bias)
    return tuple(sorted(out.items()))


def sampling_arg(sampling: object) -> SamplingParams | None:
    """``sampling`` if it is a :class:`SamplingParams` or None (greedy), else TypeError naming it (the engine's
    ``add_request`` and ``generate`` check their ``sampling`` here)."""
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise TypeError(
            f"sampling: expected a fi_engine.runtime.sampling_params.SamplingParams or None (greedy), got "
            f"{type(sampling).__name__}"
        )
    return sampling


_DEFAULTS = {f.name: f.default for f in fields(SamplingParams)}

_CONTROLS = (
    "grammar",
    "logit_bias",
    "min_tokens",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "min_p",
)


def sets_controls(sampling: SamplingParams | None) -> bool:
    """Whether ``sampling`` sets a control that changes the logits (``grammar``, ``logit_bias``, ``min_tokens``, the
    penalties, ``min_p``): the engine processes its rows' logits before choosing
    (:mod:`~fi_engine.runtime.sample.logits_processing`)."""
    return sampling is not None and any(getattr(sampling, n) != _DEFAULTS[n] for n in _CONTROLS)


def asks_processing(sampling: SamplingParams | None) -> bool:
    """Whether a request of ``sampling`` needs its logits processed: a control (:func:`sets_controls`),
    ``logprobs`` or ``prompt_logprobs``."""
    return sampling is not None and (
        sampling.logprobs is not None or sampling.prompt_logprobs is not None or sets_controls(sampling)
    )
