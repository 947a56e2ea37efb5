"""Which of a few launches that compute the same thing runs fastest on this device, timed once: what a
:class:`~fi_engine.kernels.dense.Dense` asks of each shape a GPU-bound step meets (its GEMV, the skinny GEMM's
plans, cuBLASLt or a quantized weight's own path). Each run reads its weight from HBM, as a decode step does: 64 MiB
written before every run flush the L2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["LaunchTimer"]

FLUSH_BYTES = 64 << 20  # written between timed runs: more than an H100's 50 MiB of L2


class LaunchTimer:
    """Times launches on ``stream`` (a ``CUstream`` as an int); the flush buffer is allocated at the first timing."""

    def __init__(self, stream: int) -> None:
        self._stream = stream
        self._flush: Any = None

    def fastest(self, runs: Mapping[int, Callable[[], object]]) -> int:
        """The key of the fastest of ``runs`` (each a call that launches on the stream): best of 3 each after a first
        run (which loads code and picks cuBLASLt's algorithm), the L2 flushed before every run; the only one without
        timing."""
        if len(runs) == 1:
            return next(iter(runs))
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
        return min(best, key=best.__getitem__)

    def close(self) -> None:
        """Free the flush buffer."""
        self._flush = None
