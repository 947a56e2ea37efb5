"""The random state of the sampling ops: a Philox ``(seed, offset)`` pair that advances after each call.

FlashInfer's sampling kernels draw their random numbers from cuRAND's Philox4x32-10, initialised per output
row ``b`` as ``curand_init(seed, subsequence=b, offset)``. The kernels keep no state: whoever calls them
chooses ``(seed, offset)``. flashinfer-python takes them from a ``torch.Generator`` and, before each call,
advances that generator's offset by the number of random values the op may consume, rounded up to a
multiple of 4 (one Philox round yields 4 values), then passes the **advanced** offset to the kernel.
:class:`Generator` does exactly that, without torch, so:

- successive calls with one generator draw new, independent samples;
- ``Generator(seed, offset)`` reproduces exactly, call for call (and draws what flashinfer-python draws
  with a CUDA ``torch.Generator`` whose state is ``(seed, offset)``, for the same op sequence).

How far each op advances (``increment``, before rounding up to a multiple of 4; ``B`` = output rows):

=====================================================================  ==========================
``sampling_from_probs``, ``min_p_sampling_from_probs``                 ``B``
``sampling_from_logits``                                               ``B * vocab_size``
``top_p_``/``top_k_``/``top_k_top_p_sampling_from_probs``              ``B * 32``
``chain_speculative_sampling``                                         ``B * (num_speculative + 1)``
=====================================================================  ==========================

CUDA graphs: an op called with a generator (or with int ``seed``/``offset``) passes the two values as
kernel arguments, so a captured graph **bakes them in**: every replay draws the same numbers, and the
generator advanced once, at capture. To draw new samples per replay, FlashInfer >= 0.7 reads ``seed`` and
``offset`` from device tensors (int64, one value or one per output row) when given as tensors; the graph
then advances them itself (capture an ``offset += increment`` on that tensor after the sampling call, e.g.
with torch). FlashInfer 0.6.3 modules take ints only: a tensor there is a clear error.

The generator is thread-safe (a lock around each advance); values are unsigned 64-bit, wrapping like
cuRAND's.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable

_U64 = 1 << 64


def _u64(name: str, value: object) -> int:
    """``value`` as a Python int in ``[0, 2**64)`` (numpy integers included), else TypeError/ValueError naming it."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    try:
        out = int(value.__index__())  # type: ignore[attr-defined]
    except (TypeError, ValueError):  # numpy arrays of more than one element have an __index__ that refuses
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None
    if not 0 <= out < _U64:
        raise ValueError(f"{name}: expected an int in [0, 2**64), got {out}")
    return out


def round_up4(increment: int) -> int:
    """``increment`` rounded up to a multiple of 4 (random values per Philox round), as flashinfer does."""
    return (increment + 3) // 4 * 4


class Generator:
    """A Philox ``(seed, offset)`` pair owned by the caller; the sampling ops advance it (see the module doc).

    Args:
        seed: the Philox key, an int in ``[0, 2**64)``.
        offset: the starting offset (in random values), an int in ``[0, 2**64)``.
    """

    __slots__ = ("_lock", "_offset", "_seed")

    def __init__(self, seed: int, offset: int = 0) -> None:
        self._seed = _u64("seed", seed)
        self._offset = _u64("offset", offset)
        self._lock = threading.Lock()

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def offset(self) -> int:
        return self._offset

    def get_state(self) -> tuple[int, int]:
        """``(seed, offset)`` now."""
        with self._lock:
            return self._seed, self._offset

    def set_state(self, seed: int, offset: int = 0) -> None:
        """Start again from ``(seed, offset)``."""
        seed, offset = _u64("seed", seed), _u64("offset", offset)
        with self._lock:
            self._seed, self._offset = seed, offset

    def advance(self, increment: int) -> tuple[int, int]:
        """Advance the offset by ``increment`` (an int in ``[0, 2**64)``, random values) rounded up to a multiple
        of 4; return ``(seed, new offset)``, the values the op passes to its kernel (flashinfer-python's order:
        advance, then use)."""
        step = round_up4(_u64("increment", increment))
        with self._lock:
            self._offset = (self._offset + step) % _U64
            return self._seed, self._offset

    def __repr__(self) -> str:
        return f"Generator(seed={self._seed}, offset={self._offset})"


_default: list[Generator] = []
_default_lock = threading.Lock()


def draw(generator: Generator, increment: int, use: Callable[[int, int], object]) -> None:
    """Call ``use(seed, offset)`` with ``generator``'s offset advanced by ``increment`` (random values, rounded up to
    a multiple of 4), holding its lock; the advance is kept only if ``use`` returns. The sampling ops launch in
    ``use``, so a call refused by its checks draws nothing, and two threads never launch with one offset."""
    step = round_up4(increment)
    with generator._lock:
        new = (generator._offset + step) % _U64
        use(generator._seed, new)
        generator._offset = new


def default_generator() -> Generator:
    """The process-wide generator the sampling ops use when given neither ``generator`` nor ``seed``/``offset``:
    seeded from the OS's randomness on first use (so runs differ); pass a :class:`Generator` to reproduce."""
    if not _default:
        with _default_lock:
            if not _default:
                _default.append(Generator(secrets.randbits(63)))
    return _default[0]


__all__ = ["Generator", "default_generator", "draw", "round_up4"]
