"""How a request's tokens are chosen (:class:`SamplingParams`): a value, with no engine state, so that the engine's
parts (:mod:`fi_engine.runtime.state`, :mod:`fi_engine.runtime.sampling`) and its callers share it without importing
each other."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SamplingParams", "sampling_arg"]


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
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sampling_arg(sampling: object) -> SamplingParams | None:
    """``sampling`` if it is a :class:`SamplingParams` or None (greedy), else TypeError naming it."""
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise TypeError(
            f"sampling: expected a fi_engine.runtime.sampling_params.SamplingParams or None (greedy), got "
            f"{type(sampling).__name__}"
        )
    return sampling
