"""The passes of the serving loop's steps, a part of the loop (:class:`Passes`; the loop holds one, ``loop.passes``): a
prefill pass or a decode step launched (the scheduler's rows staged and run by the model runner, the rows that ask
processed by the logits processor, each row's token picked by the sampler and copied out behind the pass on the
runner's stream, not waited for: :class:`LaunchedPass`, :class:`LaunchedStep`) and finished (waited for, and its
tokens recorded in the scheduler, with the log-probabilities of the rows that asked); and the decode step staged
ahead of the one in flight (``next_rows``). When a pass runs, and what runs beside it, is the loop's to say
(:class:`~fi_engine.runtime.serving.ServingLoop`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .sample.logits_processing import PendingLogprobs, PendingPromptLogprobs
from .sched.request import Request
from .sched.scheduler import Scheduler
from .worker.graph_shapes import prefill_slots

__all__: list[str] = []


@dataclass(frozen=True)
class LaunchedStep:
    """A decode step launched and not yet recorded: its rows (None: a padding row), the page-locked buffer its
    tokens are copied into and the event that marks the end of that copy (Passes.decode_launch)."""

    rows: list[Request | None]
    ids: np.ndarray
    done: Any
    logprobs: PendingLogprobs | None = None  # the log-probabilities of its rows that ask (logits_processing)


@dataclass(frozen=True)
class LaunchedPass:
    """A prefill pass launched and not yet recorded (Passes.prefill_launch): the decoding requests it carried
    (``riders``), the requests it prefilled (``admitted``), the slot of each (its token's place among the pass's
    tokens: it chooses one per slot, ModelRunner.prefill_tokens) and the event that marks the end of their copy."""

    riders: list[Request]
    admitted: list[Request]
    slots: list[int]
    done: Any
    logprobs: PendingLogprobs | None = None
    prompt_logprobs: PendingPromptLogprobs | None = None  # those of its admitted requests that ask


class Passes:
    """The passes of the serving loop ``loop`` (an engine: its ``runner``, ``processor``, ``sampler`` and
    ``speculator`` are read)."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.next_rows: list[Request | None] | None = None  # the decode step the runner staged ahead (its rows)

    def prefill(
        self, sched: Scheduler, reqs: list[Request], all_logits: bool = False, riders: Sequence[Request] = ()
    ) -> list[np.ndarray]:
        """Prefill the admitted requests ``reqs`` and, in the same pass, decode ``riders`` (active requests: one token
        row each, :attr:`ServingLoop.mixed_prefill`); wait for it and record their tokens (:meth:`prefill_launch`,
        :meth:`prefill_finish`). ``all_logits`` (without riders: ``prefill_logits``): return each request's
        logits at every row."""
        launched, full = self.prefill_launch(sched, reqs, riders, all_logits)
        self.prefill_finish(sched, launched)
        return [] if full is None else self.loop.runner.split_logits(full, len(reqs))

    def prefill_launch(
        self,
        sched: Scheduler,
        reqs: list[Request],
        riders: Sequence[Request] = (),
        all_logits: bool = False,
        behind: bool = False,
        graph_slots: int | None = None,
    ) -> tuple[LaunchedPass, Any]:
        """Launch the prefill pass of ``reqs`` with ``riders`` (:meth:`prefill`), its tokens copied behind it to the
        host (not waited for): one per slot up to the highest slot it serves, in slot order, so that the decode step
        after it can read them in place (:meth:`LaunchPolicy.rows_behind_prefill`); an empty slot's is garbage.
        ``behind``: a decode step is in flight, not recorded: the riders' last tokens are its tokens, fed one
        position on and gathered from its ``ids`` on the device (a rider it ends with an end-of-sequence token
        computes a row nobody records). ``graph_slots``: the request slots its graph is padded to (None:
        ``max_batch`` for a mixed pass, else :func:`~fi_engine.runtime.worker.graph_shapes.prefill_slots` of its
        requests; the step API's passes take ``max_batch``, so that a server replays one graph per bucket, each captured
        before it serves:
        ``warm_serving``). Returns the launched pass and, with ``all_logits``, the float32 logits of every row (on
        the device)."""
        runner, sampler = self.loop.runner, self.loop.sampler
        self.loop.speculator.untimed()
        ahead = 1 if behind else 0
        if riders:
            sched.grow_pages(riders, ahead)  # each rider's next token may open a page
        rows = [*riders, *reqs]
        self.next_rows = None  # the prefill's tokens overwrite `ids`: a step prepared before it cannot run
        padded_slots = graph_slots
        if padded_slots is None:  # a mixed pass's requests are every occupied slot: one graph per bucket
            padded_slots = runner.max_batch if riders else prefill_slots(len(rows), runner.max_batch)
        # a prompt whose logprobs are asked takes every row's logits (from the pass's own LM head over all rows)
        asking = [(r, j) for j, r in enumerate(reqs) if r.asks is not None and r.asks.prompt_logprobs is not None]
        view, width, full = runner.run_prefill(
            rows, len(riders) if behind else 0, padded_slots, ahead, all_logits or bool(asking)
        )
        prompts = None
        if asking:
            qo = runner.prefill_arrays["qo_indptr"]  # each request's first row (riders first)
            prompts = self.loop.processor.prompt_logprobs(full, [(r, int(qo[len(riders) + j])) for r, j in asking])
        by_slot: list[Request | None] = [None] * width
        for r in rows:
            if r.decoding:  # (a prompt's chunk short of its end chooses no token: its row is garbage, as a padding one)
                by_slot[r.slot] = r
        pending = self.loop.processor.apply(by_slot, width)[0] if sched.processed else None
        sampler.share_ids(sampler.pick(view, width, by_slot if sched.sampled else None))
        if pending is not None:
            self.loop.processor.chosen(pending, runner.buffers.ids)
        done = runner.send_prefill_tokens(width)
        launched = LaunchedPass(list(riders), reqs, [r.slot for r in rows], done, pending, prompts)
        return launched, full if all_logits else None

    def prefill_finish(self, sched: Scheduler, launched: LaunchedPass, behind: bool = False) -> None:
        """Wait for the prefill pass ``launched`` and record its tokens: the riders' next, the admitted requests'
        first. ``behind``: a decode step was launched after it (:meth:`LaunchPolicy.rows_behind_prefill`): only its
        token copy is waited for; otherwise the whole stream, so that the host staging buffers may be written next."""
        if behind:
            launched.done.synchronize()
        else:
            self.loop.runner.stream.synchronize()
        tokens = self.loop.runner.prefill_tokens(launched.slots)
        self.loop.speculator.prefill_recorded()  # (no step's time is measured across a prefill pass)
        k = len(launched.riders)
        if launched.logprobs is not None:
            self._keep_logprobs(launched.logprobs, [*launched.riders, *launched.admitted])
        if launched.prompt_logprobs is not None:
            launched.prompt_logprobs.resolve()
        if k:
            sched.record(launched.riders, tokens[:k])
        sched.record(launched.admitted, tokens[k:], prefill=True)

    def decode_step(self, sched: Scheduler) -> tuple[float, list[Request | None]]:
        """One decode step for every active request, launched (:meth:`decode_launch`), waited for and recorded;
        returns its host time in microseconds (with a graph, the next step's preparation included, which runs while
        the GPU computes this step) and its rows (None: a padding row)."""
        t0 = time.perf_counter()
        launched = self.decode_launch(sched)
        t2 = time.perf_counter()
        self.loop.runner.stream.synchronize()
        t3 = time.perf_counter()
        self.record(sched, launched.rows, launched.ids[: len(launched.rows)].tolist(), launched.logprobs)
        return ((t2 - t0) + (time.perf_counter() - t3)) * 1e6, launched.rows

    def decode_finish(self, sched: Scheduler, launched: LaunchedStep, behind: bool = False) -> list[Request]:
        """Wait for the decode step ``launched`` and record its tokens; returns the requests that took one (those
        still active: a request that ended since the launch, aborted or at the step before it, takes none).
        ``behind``: another step was launched after it (:meth:`LaunchPolicy.launches_ahead`): only its token copy is
        waited for; otherwise the whole stream, so that the host staging buffers may be written next."""
        live = [r for r in launched.rows if r is not None and r.finish_reason is None]
        if behind:
            launched.done.synchronize()
        else:
            self.loop.runner.stream.synchronize()
        self.record(sched, launched.rows, launched.ids[: len(launched.rows)].tolist(), launched.logprobs)
        return live

    def decode_launch(self, sched: Scheduler, depth: int = 1) -> LaunchedStep:
        """Launch one decode step for every active request: the scheduler's rows, staged and run by the runner, each
        row's token picked by the sampler, the tokens copied out behind it on the stream (not waited for).
        ``depth``: the steps then in flight, this one included (2: launched before the last one's tokens were read,
        :meth:`LaunchPolicy.launches_ahead`); the step after them is staged for that many steps ahead.

        A step staged during the previous one (:meth:`Scheduler.peek_rows`) runs only if the slots are still its rows
        (:meth:`Scheduler.same_rows`): a request that ended with an end-of-sequence token, was aborted or admitted
        since (a prefill also drops it) makes it be staged again here."""
        runner, sampler = self.loop.runner, self.loop.sampler
        graph = runner.graph
        prepared, self.next_rows = self.next_rows, None
        if prepared is not None and sched.same_rows(prepared):
            # staged during the previous step (index arrays and plan enqueued behind it); its input tokens are that
            # step's output, still on the device in slot order
            rows = prepared
            runner.feed_staged_decode(len(rows))
        else:
            rows = sched.decode_rows(padded=graph is not None)
            if graph is not None:  # the first slots, as many as the smallest graph holding every request
                rows = rows[: sched.graph_rows(rows, runner.decode_graph_batches)]
            runner.stage_decode(rows)
        n = len(rows)
        view, argmax_done = runner.run_decode(n)
        pending = None
        if sched.processed:  # logprobs and controls of the rows that ask; a control: every argmax taken again
            pending, changed = self.loop.processor.apply(rows, n)
            argmax_done = argmax_done and not changed
        draw_rows = rows if sched.sampled else None  # None: every row greedy (one counter read, no row scan)
        if argmax_done:  # the graph's argmax is every greedy row's token
            sampled = draw_rows is not None and sampler.pick(view, n, draw_rows, argmax_done=True)
        else:
            sampled = sampler.pick(view, n, draw_rows)
        sampler.share_ids(sampled)
        if pending is not None:
            self.loop.processor.chosen(pending, runner.buffers.ids)
        ids, done = runner.send_decode_tokens(n)
        if graph is not None and runner.prepare_ahead:
            # the next step, as it will be unless a request ends with an end-of-sequence token or a prefill comes
            # first (then it is dropped and staged again): staged and planned while the GPU runs this one
            ahead = sched.peek_rows(depth)
            ahead = ahead[: sched.graph_rows(ahead, runner.decode_graph_batches)]
            runner.stage_decode_ahead(ahead, depth)
            self.next_rows = ahead
        return LaunchedStep(rows, ids, done, pending)

    def record(
        self, sched: Scheduler, rows: Sequence[Request | None], tokens: list[int], pending: PendingLogprobs | None
    ) -> None:
        """A decode step's tokens recorded (``Scheduler.record``), with the log-probabilities of its rows that asked
        kept on their requests first."""
        if pending is not None:
            self._keep_logprobs(pending, [r for r in rows if r is not None])
        sched.record(rows, tokens)
        self.loop.speculator.recorded(verify=False)

    @staticmethod
    def _keep_logprobs(pending: PendingLogprobs, taking: Sequence[Request]) -> None:
        """Append each asking request's :class:`~fi_engine.runtime.stepping.TokenLogprobs` of this pass to its
        ``logprobs``, where it takes the pass's token (a request that ended since the launch takes none)."""
        live = {id(r) for r in taking if r.finish_reason is None}
        for r, entry in zip(pending.requests, pending.resolve(), strict=True):
            if id(r) in live:
                r.logprobs.append(entry)
