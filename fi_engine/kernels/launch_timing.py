"""Which of a few launches that compute the same thing runs fastest on this device, timed once: what a
:class:`~fi_engine.kernels.dense.Dense` asks of each shape a GPU-bound step meets (its GEMV, the skinny GEMM's
plans, cuBLASLt or a quantized weight's own path). Each run reads its weight from HBM, as a decode step does: 64 MiB
written before every run flush the L2.

A launch timed alone is not the launch in its step: there it follows the step's last kernel, overlaps its tail
(programmatic dependent launch) and shares the GPU with the next one. Launches within a few percent of each other
alone can differ by more in the step (on an H200, an 8B decode step of 8 rows took 4.8 or 5.2 ms by which of two
gate/up launches timed 68.2 and 68.3 us alone won). :func:`close_choices` names, of a step's timed shapes, the launches
close enough to the fastest to be worth timing in the captured step itself (``StepGraphs``, its decode graphs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["LaunchTimer", "close_choices"]

FLUSH_BYTES = 64 << 20  # written between timed runs: more than an H100's 50 MiB of L2


class LaunchTimer:
    """Times launches on ``stream`` (a ``CUstream`` as an int); the flush buffer is allocated at the first timing."""

    def __init__(self, stream: int) -> None:
        self._stream = stream
        self._flush: Any = None

    def times(self, runs: Mapping[int, Callable[[], object]]) -> dict[int, float]:
        """Each of ``runs``' time in ms (each a call that launches on the stream): best of 3 after a first run
        (which loads code and picks cuBLASLt's algorithm), the L2 flushed before every run; 0.0 for the only one,
        which is not run."""
        if len(runs) == 1:
            return dict.fromkeys(runs, 0.0)
        import cupy

        if self._flush is None:
            self._flush = cupy.empty(FLUSH_BYTES, cupy.uint8)
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        record = cupy.cuda.runtime.eventRecord
        best: dict[int, float] = {}
        for label, run in runs.items():
            times = []
            for _ in range(4):
                cupy.cuda.runtime.memsetAsync(self._flush.data.ptr, 0, self._flush.nbytes, self._stream)
                record(start.ptr, self._stream)
                run()
                record(end.ptr, self._stream)
                end.synchronize()
                times.append(cupy.cuda.get_elapsed_time(start, end))
            best[label] = min(times[1:])  # the first run loads code and picks cuBLASLt's algorithm
        return best

    def close(self) -> None:
        """Free the flush buffer."""
        self._flush = None


def close_choices(
    timings: Mapping[tuple[int, ...], Mapping[int, float]], rows: int, within: float, most: int
) -> list[tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]]:
    """The timed shapes of ``rows`` rows whose launches are close to the fastest: ``[(keys, labels)]``, one entry a
    shape (the keys of ``timings`` whose values but the sixth, ``(rows, n, k, ab_type, c_type)`` and any after the
    quantized weight's address, are equal: a 16-bit weight's one key, or a quantized weight's one a layer; a form
    such as the gate/up GEMM with its SiLU, whose key ends in a value of its own, apart from the plain GEMM's),
    ``labels`` the launches timed within ``within`` (a fraction) of the shape's fastest, fastest first, at most
    ``most`` + 1 of them; shapes of one launch left out.
    ``timings``: each key's launches and times as :meth:`LaunchTimer.times` gave them; a quantized shape's launches
    are those every layer's key has, each timed as the sum over the layers."""
    shapes: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for key in timings:
        if key[0] == rows:
            shapes.setdefault((*key[:5], *key[6:]), []).append(key)
    out = []
    for keys in shapes.values():
        common = set.intersection(*(set(timings[k]) for k in keys))
        if len(common) < 2:
            continue
        total = {label: sum(timings[k][label] for k in keys) for label in common}
        ranked = sorted(common, key=lambda label: (total[label], label))
        fastest = total[ranked[0]]
        close = [label for label in ranked if total[label] <= fastest * (1 + within)][: most + 1]
        if len(close) > 1:
            out.append((tuple(keys), tuple(close)))
    return out
