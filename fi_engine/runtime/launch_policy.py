"""When the serving loop's passes launch, a part of the loop (:class:`LaunchPolicy`; the loop holds one,
``loop.launch_policy``): whether a decode step goes ahead of the one in flight (pipelined decode), whether queued
requests' prefill pass goes behind it (pipelined prefill) and the decode step after a prefill pass right behind that
pass, whether queued requests are admitted now or held a while (the scheduler delay), and whether the decoding requests
ride in a prefill pass (mixed prefill). It decides; the loop (:class:`~fi_engine.runtime.serving.ServingLoop`) launches
and waits. The switches it reads stay the loop's settings (``pipelined_decode``, ``tp_pipelined_decode``,
``pipelined_prefill``, ``mixed_prefill``, ``scheduler_delay_factor``), set on the engine or its class.
"""

from __future__ import annotations

from typing import Any

from .sched.request import Request
from .sched.scheduler import Scheduler

__all__: list[str] = []


class LaunchPolicy:
    """The launch decisions of the serving loop ``loop`` (an engine: its switches, ``runner``, ``passes`` and
    ``speculator`` are read)."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.last_prefill_s = 0.0  # the host time of the loop's last prefill pass, in seconds (admit's delay)

    def launches_ahead(self, sched: Scheduler, delay: bool) -> bool:
        """Whether the next decode step may be launched now, before the tokens of the one in flight are read
        (:attr:`ServingLoop.pipelined_decode`): it was prepared during that step (:meth:`pipelines_decode`) for the
        rows the slots still hold (:meth:`Scheduler.same_rows`: no request reaches its token limit in the step in
        flight, none was aborted), and no queued request would be admitted first (:meth:`would_admit`). (Sampled
        rows stage their parameters in the other of two host buffers than the step in flight's.)"""
        prepared = self.loop.passes.next_rows
        return (
            self.pipelines_decode()
            and prepared is not None
            and any(r is not None for r in prepared)  # (all padding: every request ended; nothing to step)
            and sched.same_rows(prepared)
            and not sched.processed  # its controls and logprobs read each request's recorded tokens
            and not self.would_admit(sched, delay)
        )

    def prefills_ahead(self, sched: Scheduler) -> bool:
        """Whether the prefill pass of queued requests may be launched now, behind the decode step in flight
        (:meth:`ServingLoop._serve_step`, :attr:`ServingLoop.pipelined_prefill`): a queued request would be admitted
        (:meth:`would_admit`), on one GPU with the decode graph where steps are prepared ahead
        (:meth:`prepares_ahead`)."""
        return (
            self.loop.pipelined_prefill
            and self.prepares_ahead()
            and not sched.processed  # a rider's controls and logprobs read its recorded tokens
            and self.would_admit(sched, delay=True)
        )

    def pipelines_decode(self) -> bool:
        """Whether decode steps may be launched before the tokens of the one in flight are read
        (:attr:`ServingLoop.pipelined_decode`, the decode graph): on one GPU; under tensor parallelism with
        :attr:`ServingLoop.tp_pipelined_decode`, steps staged ahead (``ModelRunner.prepare_ahead``) and no speculation
        (its policy weighs this rank's own host times, which differ between ranks: the ranks' steps could part)."""
        loop = self.loop
        runner = loop.runner
        if not loop.pipelined_decode or runner.graph is None:
            return False
        if runner.comm is None:
            return True
        return loop.tp_pipelined_decode and runner.prepare_ahead and loop.speculator.proposer is None

    def prepares_ahead(self) -> bool:
        """Whether decode steps are prepared while the one before runs and launched with their input tokens copied
        on the device (:attr:`ServingLoop.pipelined_decode`, the decode graph, one GPU,
        ``ModelRunner.prepare_ahead``)."""
        runner = self.loop.runner
        return self.loop.pipelined_decode and runner.graph is not None and runner.comm is None and runner.prepare_ahead

    def rows_behind_prefill(self, sched: Scheduler) -> list[Request | None] | None:
        """The rows of the decode step to launch right behind the prefill pass just launched, which gives every active
        request a token (the caller checks): those the slots will hold after it (:meth:`Scheduler.peek_rows` of one
        pass ahead: each admitted request at its prompt's end, each rider one position on), cut to the decode graph's
        rows; None where steps are not prepared ahead (:meth:`prepares_ahead`) or a request reaches its token limit in
        the pass (the rows will change). The loop stages them (``ModelRunner.stage_decode_ahead``); the step's input
        tokens are then the pass's, which it chose one per slot: copied on the device at launch."""
        if not self.prepares_ahead() or sched.processed:  # (controls and logprobs read the recorded tokens)
            return None
        rows = sched.peek_rows(1)
        rows = rows[: sched.graph_rows(rows, self.loop.runner.decode_graph_batches)]
        return rows if sched.same_rows(rows) else None

    def would_admit(self, sched: Scheduler, delay: bool) -> bool:
        """Whether :meth:`admit` would admit a queued request now (:meth:`Scheduler.can_admit`), without admitting
        it. ``delay`` (the step API): the queue is held by :attr:`ServingLoop.scheduler_delay_factor` times the last
        prefill's time."""
        return sched.can_admit(self.loop.scheduler_delay_factor * self.last_prefill_s if delay else 0.0)

    def admit(
        self, sched: Scheduler, delay: bool, riders: list[Request] | None = None, behind: bool = False
    ) -> list[Request]:
        """The scheduler's admission (:meth:`Scheduler.admit`), or none yet: with ``delay`` (the step API) and
        :attr:`ServingLoop.scheduler_delay_factor` > 0, queued requests wait while others decode, until the oldest has
        waited that many times the last prefill's time or they would fill every free slot (vLLM's scheduler delay): a
        burst of arrivals is prefilled in a few larger passes instead of one small pass per step, each of which costs
        the batch a step.

        ``riders`` (the step API): with :attr:`ServingLoop.mixed_prefill` where it applies (:meth:`mixes`), the
        requests already active are appended to it when some are admitted (they ride in the prefill pass, each one
        token row of the pass's ``max_prefill_tokens``); where the first queued prompt does not fit beside them, it is
        admitted alone and ``riders`` stays empty. ``behind``: the pass goes behind a decode step in flight, not
        recorded: a request that step gives its last token (its limit) rides no more."""
        if not self.would_admit(sched, delay):
            return []
        if riders is not None and self.mixes():
            admitted, riding = sched.admit_beside_active(behind)
            riders.extend(riding)
            return admitted
        return sched.admit()

    def mixes(self) -> bool:
        """Whether the step API's prefill passes take the decoding requests along (:attr:`ServingLoop.mixed_prefill`):
        one GPU, and the Llama pass, whose prefill attention reads every request's KV from the paged cache."""
        runner = self.loop.runner
        return self.loop.mixed_prefill and runner.comm is None and runner.family.llama_pass
