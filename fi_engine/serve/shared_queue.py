"""The queue limit of several API-server processes in front of one engine: :class:`SharedQueue`.

One :class:`~fi_engine.serve.service.GenerationService` refuses a request
(:class:`~fi_engine.serve.service.QueueFullError`,
an HTTP server's 429) when ``max_batch + max_queue`` of its requests are unfinished. With several services over
one engine (``fi-engine serve --api-servers N``, one per process) the engine's slots and queue are shared, so the
limit must be too: each service counts its unfinished requests in its own cell of one block of shared memory, and
a submission is taken only when the sum over every cell stays within the limit, checked and counted under one lock
between the processes (so two front ends never both take the last place). The limit is then exactly what one
server has: ``max_batch + max_queue`` requests over all the front ends, whichever front end a client reaches.
The lock is taken once per submission and once per request end, never per token.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

from ..values import show

__all__ = ["SharedQueue"]

MAX_SERVICES = 64  # services sharing one queue (fi_engine.serve.engine_process.MAX_CLIENTS front ends)


class SharedQueue:
    """Service ``index``'s part of the unfinished-request count of several services; made by :meth:`create`.

    Give each service its own (``GenerationService(engine, codec, shared_queue=queues[i])``) and pass them to
    ``spawn``-started processes in their arguments (the block and the lock are shared, not copied).
    """

    def __init__(self, counts: Any, lock: Any, index: int) -> None:
        self._counts = counts  # a multiprocessing RawArray of int64, one cell per service
        self._lock = lock  # a multiprocessing Lock: the check and the count of a submission are one step
        self.index = index

    @classmethod
    def create(cls, count: int) -> list[SharedQueue]:
        """``count`` parts (1 to 64) of one shared count, part ``i`` for service ``i``."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SERVICES:
            raise ValueError(f"count: expected an int in [1, {MAX_SERVICES}] (services), got {show(count)}")
        ctx = mp.get_context("spawn")
        counts, lock = ctx.RawArray("q", count), ctx.Lock()
        return [cls(counts, lock, i) for i in range(count)]

    def __getstate__(self) -> dict[str, Any]:  # pickles while a process is being spawned only
        return {"counts": self._counts, "lock": self._lock, "index": self.index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["counts"], state["lock"], state["index"])  # type: ignore[misc]

    @property
    def services(self) -> int:
        """How many services share the count."""
        return len(self._counts)

    @property
    def total(self) -> int:
        """The unfinished requests of every service now."""
        with self._lock:
            return sum(self._counts)

    def try_add(self, count: int, limit: int) -> int | None:
        """Count ``count`` more unfinished requests of this service if the total over every service stays within
        ``limit``: None when counted; otherwise the total now (nothing counted)."""
        with self._lock:
            total = sum(self._counts)
            if total + count > limit:
                return int(total)
            self._counts[self.index] += count
            return None

    def remove(self, count: int) -> None:
        """``count`` of this service's requests ended."""
        if count:
            with self._lock:
                self._counts[self.index] -= count
