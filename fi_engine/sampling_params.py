"""How a request's tokens are chosen (:class:`SamplingParams`): a value, with no engine state, so that the engine's
parts (:mod:`fi_engine.state`, :mod:`fi_engine.sampling`) and its callers share it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SamplingParams"]


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. ``temperature == 0`` (default): greedy argmax. Otherwise softmax of
    ``logits / temperature`` restricted to the ``top_k`` most likely tokens (0: all) and the smallest set of
    probability ``top_p``, drawn with a Philox generator seeded with ``seed``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
