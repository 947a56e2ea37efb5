"""Streaming generation for many callers at once: :class:`GenerationService` drives one
:class:`~fi_engine.runtime.stepping.StepEngine` from one background thread and hands each request's tokens and text to
its caller as they come (:class:`RequestStream`, an iterator and an async iterator of :class:`StreamDelta`).

>>> with GenerationService(engine, TextCodec.from_dir(model_dir)) as service:
...     stream = service.submit("Once upon a time", max_new_tokens=32, stop=["\\n\\n"])
...     for delta in stream:                    # or `async for` in an event loop
...         print(delta.text, end="", flush=True)

Threads. The engine (a CUDA context, its buffers and scheduler) is not thread-safe, so exactly one thread, the
service's, ever calls it: callers' :meth:`GenerationService.submit` and :meth:`RequestStream.cancel` only queue
work under a lock and wake that thread, which at each turn of its loop adds the new requests, aborts the
cancelled ones, runs one :meth:`~fi_engine.runtime.stepping.StepEngine.step` and delivers what it produced. Every
connected caller's requests are therefore batched together (the engine's continuous batching). An engine whose
``step()`` waits for another process's outputs (an :class:`~fi_engine.serve.engine_client.EngineClient`) has a
``wake()`` method, which they call too, so new work does not wait for that step's outputs.

Text. Each request's tokens go through its own :class:`~fi_engine.text.detokenize.IncrementalDetokenizer` in the
engine thread (no delta ends inside a UTF-8 character); a stop string ends the request at once (the engine
aborts it, the text stops before the stop string, ``finish_reason`` is ``"stop"``, as OpenAI's API and vLLM do).

Limits and failure. At most ``max_batch + max_queue`` requests are unfinished at once; one more is refused with
:class:`QueueFullError` (an HTTP server's 429); several services over one engine (one per API-server process)
share the limit through a :class:`~fi_engine.serve.shared_queue.SharedQueue`. An error in the engine thread reaches
every waiting stream as a :class:`ServiceError` (never a hang), and later submissions are refused.
:meth:`GenerationService.close` stops taking requests, lets the running ones finish for a grace period, cancels
the rest and joins the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..runtime.sampling_params import SamplingParams
from ..runtime.stepping import FinishReason, StepEngine, StepOutput, TokenLogprobs
from ..text.detokenize import IncrementalDetokenizer, StopStrings
from ..values import MAX_SIZE, show
from .metrics import ServingMetrics
from .shared_queue import SharedQueue

__all__ = [
    "GenerationService",
    "QueueFullError",
    "RequestResult",
    "RequestStream",
    "ServiceClosedError",
    "ServiceError",
    "StreamDelta",
]


class ServiceError(RuntimeError):
    """The engine thread failed (the cause is chained): every unfinished request ends with this error."""


class ServiceClosedError(RuntimeError):
    """The service is closed (or broken by an engine error) and takes no more requests."""


class QueueFullError(RuntimeError):
    """Refused: ``max_batch + max_queue`` requests are already unfinished (an HTTP server answers 429)."""


@dataclass(frozen=True)
class StreamDelta:
    """What a request produced since the previous delta.

    ``token_ids``: the new tokens (an end-of-sequence token included; after a stop string, none past the token
    that completed it). ``text``: their new text (may be ``""`` while a character or a possible stop string is
    pending). ``finish_reason``: None, or on the last delta ``"stop"`` (EOS or a stop string), ``"length"``
    (``max_new_tokens``) or ``"abort"`` (cancelled). ``prompt_tokens``, ``completion_tokens``: the usage so far.
    ``logprobs``: one :class:`~fi_engine.runtime.stepping.TokenLogprobs` per token of ``token_ids`` where the
    request's sampling asked for them, else None; ``prompt_logprobs``: the prompt's (its first entry None), on the
    first delta with tokens of a request that asked for them, else None. ``num_cached_tokens``: on the first delta
    with tokens, the prompt tokens the engine found in its prefix cache, where it says
    (:attr:`StepOutput.num_cached_tokens <fi_engine.runtime.stepping.StepOutput.num_cached_tokens>`), else None.
    """

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprobs, ...] | None = None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    num_cached_tokens: int | None = None


@dataclass(frozen=True)
class _PendingDelta(StreamDelta):
    """A delta whose text is decoded when the caller takes it (a stream without stop strings): the engine thread
    hands over token ids only (``text`` empty until then). ``flush``: the stream ended, so the detokenizer's
    held-back text follows."""

    flush: bool = False

    def decoded(self, text: str) -> StreamDelta:
        """The delta the caller takes: this one with its ``text``."""
        return StreamDelta(**{f.name: getattr(self, f.name) for f in fields(StreamDelta)} | {"text": text})


@dataclass(frozen=True)
class RequestResult:
    """A whole request: every generated token, its text (cut before a stop string), why it ended, the stop
    string that ended it (or None), the usage counts (``num_cached_tokens``: the prompt tokens found in the
    engine's prefix cache, None where the engine does not say), and the log-probabilities where the request asked
    for them (as :class:`StreamDelta` has them, for every token)."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    stop_string: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprobs, ...] | None = None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    num_cached_tokens: int | None = None


class RequestStream:
    """One request's output as it comes, made by :meth:`GenerationService.submit`.

    Iterate it (``for`` in a thread, ``async for`` in an event loop) for :class:`StreamDelta` s: deltas that
    arrived while the caller was busy come merged into one; the last has ``finish_reason`` set. Or wait for the
    whole output: :meth:`result` / :meth:`aresult`. :meth:`cancel` ends it early. An engine error is raised
    from the iteration (:class:`ServiceError`); a prompt the engine refuses, as its ``ValueError``.

    Attributes:
        prompt_ids: the prompt's token ids. ``stop_string``: the stop string that ended it, once ended.
    """

    def __init__(self, service: GenerationService, prompt_ids: list[int], detokenizer: IncrementalDetokenizer | None):
        self._service = service
        self.prompt_ids = prompt_ids
        self._detok = detokenizer
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        # what the caller has yet to take: indices into _history (its deltas, in order) or the error
        self._events: deque[int | BaseException] = deque()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._ended = False  # the last event is queued
        self._consumed = False  # the last event was handed out
        self._accepted: bool | BaseException = False  # True once the engine took it; the error if refused
        self._history: list[StreamDelta | _PendingDelta] = []  # every delta delivered (for result())
        self._decoded = 0  # _history[:_decoded] are StreamDeltas (text decoded); the rest wait for a taker
        # Without stop strings nothing in the engine thread needs the text: it is decoded by whoever takes the
        # deltas, once for all the tokens taken together (a server's event loop, busy with many streams, takes
        # several steps' tokens at a time, so its cost per token falls as the load grows). With stop strings the
        # engine thread decodes each token as it comes, to end the request at the stop string.
        self.deferred = detokenizer is not None and not detokenizer.has_stops
        self._error: BaseException | None = None
        self.stop_string: str | None = None
        # the engine thread's own fields (only it reads and writes them)
        self.rid: int | None = None
        self.cancelled = False
        self.completion_tokens = 0
        self.submitted_at = time.perf_counter()
        self.last_token_at: float | None = None

    # -- the caller's side ------------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the request: the engine aborts it at its next loop turn (its batch slot and KV pages freed) and
        the stream ends with ``finish_reason="abort"``. Nothing happens once it has ended."""
        self._service._cancel(self)

    @property
    def done(self) -> bool:
        """Whether the last delta (or the error) has been delivered to the stream."""
        with self._lock:
            return self._ended

    def __iter__(self) -> Iterator[StreamDelta]:
        return self

    def __next__(self) -> StreamDelta:
        with self._ready:
            while not self._events and not self._consumed:
                self._ready.wait()
            return self._take()

    def __aiter__(self) -> AsyncIterator[StreamDelta]:
        return self

    async def __anext__(self) -> StreamDelta:
        while True:
            with self._lock:
                if self._events or self._consumed:
                    try:
                        return self._take()
                    except StopIteration:
                        raise StopAsyncIteration from None
                loop = asyncio.get_running_loop()
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, future))
            await future

    def accepted(self, timeout: float | None = None) -> bool:
        """Wait until the engine has taken the request (True) or ``timeout`` seconds pass (False); raise the
        engine's ``ValueError`` when it refused the prompt (too long, ids outside its vocabulary), or the
        :class:`ServiceError` when the engine failed first."""
        if not self._wait(lambda: self._accepted is not False, timeout):
            return False
        if isinstance(self._accepted, BaseException):
            raise self._accepted
        return True

    async def aaccepted(self) -> None:
        """:meth:`accepted` for an event loop (no thread blocked)."""
        await self._await(lambda: self._accepted is not False)
        if isinstance(self._accepted, BaseException):
            raise self._accepted

    def result(self, timeout: float | None = None) -> RequestResult:
        """Wait for the end and return the whole request (whether or not it was also iterated). Raises what
        iteration would raise; TimeoutError after ``timeout`` seconds (the request goes on; :meth:`cancel`
        stops it)."""
        if not self._wait(lambda: self._ended, timeout):
            raise TimeoutError(f"timeout: the request did not end within {timeout} s")
        return self._whole()

    async def aresult(self) -> RequestResult:
        """:meth:`result` for an event loop."""
        await self._await(lambda: self._ended)
        return self._whole()

    def _wait(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while not ready():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._ready.wait(left)
        return True

    async def _await(self, ready: Callable[[], bool]) -> None:
        while True:
            with self._lock:
                if ready():
                    return
                loop = asyncio.get_running_loop()
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, future))
            await future

    def _whole(self) -> RequestResult:
        with self._lock:
            self._decode(len(self._history))
            parts, error = list(self._history), self._error
        if error is not None:
            raise error
        last = parts[-1]
        assert last.finish_reason is not None
        return RequestResult(
            token_ids=tuple(t for d in parts for t in d.token_ids),
            text="".join(d.text for d in parts if isinstance(d, StreamDelta)),
            finish_reason=last.finish_reason,
            stop_string=self.stop_string,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            logprobs=_joined_logprobs(parts),
            **_first_only(parts),
        )

    def _take(self) -> StreamDelta:
        """Under the lock: the next event, with the deltas queued behind it merged in (an error is raised after
        the deltas before it)."""
        if not self._events:
            raise StopIteration
        first = self._events.popleft()
        if isinstance(first, BaseException):
            self._consumed = True
            self._events.clear()
            raise first
        last = first
        while self._events and not isinstance(self._events[0], BaseException):
            last = self._events.popleft()  # type: ignore[assignment]
        self._decode(last + 1)
        merged: list[StreamDelta] = self._history[first : last + 1]  # type: ignore[assignment]
        end = merged[-1]
        if end.finish_reason is not None:
            self._consumed = True
        if len(merged) == 1:
            return end
        return StreamDelta(
            token_ids=tuple(t for d in merged for t in d.token_ids),
            text="".join(d.text for d in merged),
            finish_reason=end.finish_reason,
            prompt_tokens=end.prompt_tokens,
            completion_tokens=end.completion_tokens,
            logprobs=_joined_logprobs(merged),
            **_first_only(merged),
        )

    def _decode(self, upto: int) -> None:
        """Under the lock: decode the text of the pending deltas in ``_history[:upto]``, in order (one decode of
        the window for each delta's tokens together)."""
        history, detok = self._history, self._detok
        for i in range(self._decoded, upto):
            d = history[i]
            if isinstance(d, _PendingDelta):
                assert detok is not None
                text = detok.push_many(d.token_ids)
                if d.flush:
                    text += detok.finish()
                history[i] = d.decoded(text)
        self._decoded = max(self._decoded, upto)

    # -- the engine thread's side -----------------------------------------------------------------------------

    def _put(self, event: StreamDelta | _PendingDelta | BaseException) -> None:
        with self._ready:
            if self._ended:
                return
            if isinstance(event, BaseException):
                self._error = event
                self._events.append(event)
            else:
                self._history.append(event)
                self._events.append(len(self._history) - 1)
            if isinstance(event, BaseException) or event.finish_reason is not None:
                self._ended = True
                if self._accepted is False:  # ended before the engine took it (refused, cancelled, failed)
                    self._accepted = event if isinstance(event, BaseException) else True
            self._wake()

    def _accept(self, outcome: bool | BaseException) -> None:
        with self._ready:
            if self._accepted is False:
                self._accepted = outcome
                self._wake()

    def _wake(self) -> None:
        """Under the lock: wake the threads and event loops waiting on this stream. In the engine thread the
        event loops' wakeups wait for the end of the loop turn (GenerationService._flush_wakeups): one call into
        each loop per turn instead of one per stream (each costs the loop a wakeup of its selector)."""
        self._ready.notify_all()
        waiters, self._waiters = self._waiters, []
        if not waiters:
            return
        batch = self._service._turn_wakeups
        if batch is not None and threading.get_ident() == self._service._thread.ident:
            batch.extend(waiters)
            return
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there any more
                loop.call_soon_threadsafe(_resolve, future)


def _joined_logprobs(deltas: Sequence[StreamDelta | _PendingDelta]) -> tuple[TokenLogprobs, ...] | None:
    """The logprobs of several deltas in order, or None where none has any (the request did not ask)."""
    if all(d.logprobs is None for d in deltas):
        return None
    return tuple(entry for d in deltas for entry in d.logprobs or ())


def _first_only(deltas: Sequence[StreamDelta | _PendingDelta]) -> dict[str, Any]:
    """The fields a request's first delta with tokens carries alone (``prompt_logprobs``, ``num_cached_tokens``),
    of several deltas together: each one's first value that is not None."""
    return {
        name: next((v for d in deltas if (v := getattr(d, name)) is not None), None)
        for name in ("prompt_logprobs", "num_cached_tokens")
    }


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _resolve_all(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


@dataclass
class _Submission:
    stream: RequestStream
    max_new_tokens: int
    sampling: SamplingParams | None
    eos_token_ids: tuple[int, ...] | None


class GenerationService:
    """One :class:`~fi_engine.runtime.stepping.StepEngine` served to any number of callers (see the module docstring).

    Args:
        engine: the engine (its ``max_batch`` slots are the requests generated together). The service's thread
            is the only one that calls it from now on; :meth:`close` does not close it (its owner does).
        codec: a :class:`~fi_engine.text.codec.TextCodec` for text prompts, text output and stop strings; None: token
            ids only.
        max_queue: requests accepted beyond the engine's ``max_batch`` before :meth:`submit` refuses with
            :class:`QueueFullError` (>= 0).
        metrics: where counts and latencies go (default: a new :class:`~fi_engine.serve.metrics.ServingMetrics`).
        shared_queue: with several services over one engine (one per API-server process), this service's part
            of their shared count (:class:`~fi_engine.serve.shared_queue.SharedQueue`): the limit ``max_batch +
            max_queue`` then holds over all of them. None: this service's requests only.
    """

    def __init__(
        self,
        engine: StepEngine,
        codec: Any = None,
        *,
        max_queue: int = 256,
        metrics: ServingMetrics | None = None,
        shared_queue: SharedQueue | None = None,
    ) -> None:
        from ..text.codec import TextCodec

        if not isinstance(engine, StepEngine):
            raise TypeError(
                f"engine: expected a fi_engine.runtime.stepping.StepEngine (add_request, abort_request, step, "
                f"has_unfinished, max_batch), got {type(engine).__name__}"
            )
        max_batch = engine.max_batch
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"engine: its max_batch must be a positive int, got {show(max_batch)}")
        if codec is not None and not isinstance(codec, TextCodec):
            raise TypeError(f"codec: expected a fi_engine.text.codec.TextCodec or None, got {type(codec).__name__}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or not 0 <= max_queue <= MAX_SIZE:
            raise ValueError(f"max_queue: expected an int in [0, {MAX_SIZE}] (requests waiting), got {show(max_queue)}")
        if metrics is not None and not isinstance(metrics, ServingMetrics):
            raise TypeError(
                f"metrics: expected a fi_engine.serve.metrics.ServingMetrics or None, got {type(metrics).__name__}"
            )
        if shared_queue is not None and not isinstance(shared_queue, SharedQueue):
            what = type(shared_queue).__name__
            raise TypeError(f"shared_queue: expected a fi_engine.serve.shared_queue.SharedQueue or None, got {what}")
        self.engine = engine
        # an engine whose step() waits for outputs (an engine process's client) wakes it for new work this way;
        # an engine that steps in this thread needs none
        self._wake_engine: Callable[[], object] | None = getattr(engine, "wake", None)
        # an engine in another process takes new requests without a round trip (EngineClient.add_requests_nowait):
        # this thread goes on delivering tokens and the engine's answer comes with its outputs
        self._add_nowait: Callable[[list[Any]], list[int]] | None = getattr(engine, "add_requests_nowait", None)
        self.codec = codec
        self._shared_queue = shared_queue
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._inbox: list[_Submission] = []
        self._cancels: list[RequestStream] = []
        self._calls: list[tuple[Callable[[Any], Any], concurrent.futures.Future[Any]]] = []  # call()'s, in order
        self._unfinished = 0  # accepted and not ended (inbox, engine queue, running)
        self._closing = False
        self._close_deadline: float | None = None
        self.error: BaseException | None = None  # what broke the engine thread
        # the engine thread's own: rid -> stream of the requests in the engine
        self._live: dict[int, RequestStream] = {}
        self._running = 0
        # the event loops' wakeups of one loop turn, sent together at its end (RequestStream._wake)
        self._turn_wakeups: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] | None = None
        self._thread = threading.Thread(target=self._run, name="fi-engine-service", daemon=True)
        self._thread.start()

    # -- callers -----------------------------------------------------------------------------------------------

    @property
    def unfinished(self) -> int:
        """Requests accepted and not yet ended."""
        with self._lock:
            return self._unfinished

    @property
    def healthy(self) -> bool:
        """Open and its engine thread alive."""
        return not self._closing and self.error is None and self._thread.is_alive()

    def submit(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        *,
        stop: str | Sequence[str] = (),
        eos_token_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        add_special_tokens: bool = True,
        keep_special_tokens: Sequence[str] = (),
    ) -> RequestStream:
        """Queue one request and return its stream at once.

        Args:
            prompt: token ids, or a text (encoded by the codec, with its special tokens when
                ``add_special_tokens``; for a chat, encode it with ``codec.encode_chat`` and pass the ids).
            max_new_tokens: the most tokens to generate (>= 1).
            sampling: its :class:`~fi_engine.runtime.sampling_params.SamplingParams` (None: greedy).
            stop: stop strings (one, or a list); they need a codec.
            eos_token_ids: the ids that end it (None: the engine's, i.e. the checkpoint's; ``()``: none).
            skip_special_tokens: leave special tokens out of the text.
            keep_special_tokens: special tokens (texts) kept in the text all the same (a harmony reply's markers,
                :data:`fi_engine.text.harmony.MARKERS`, which the server reads the reply by).

        Raises:
            TypeError/ValueError naming the argument; :class:`QueueFullError`; :class:`ServiceClosedError`.
        """
        return self.submit_many(
            [prompt],
            max_new_tokens,
            [sampling],
            stop=stop,
            eos_token_ids=eos_token_ids,
            skip_special_tokens=skip_special_tokens,
            add_special_tokens=add_special_tokens,
            keep_special_tokens=keep_special_tokens,
        )[0]

    def submit_many(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int | Sequence[int],
        samplings: Sequence[SamplingParams | None] | None = None,
        *,
        stop: str | Sequence[str] = (),
        eos_token_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        add_special_tokens: bool = True,
        keep_special_tokens: Sequence[str] = (),
    ) -> list[RequestStream]:
        """Queue several requests all or none (an API request with ``n > 1`` or a list of prompts): the same
        arguments as :meth:`submit`, one prompt, limit and sampling per request; :class:`QueueFullError` when
        they do not all fit."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise TypeError(
                f"prompts: expected a non-empty list of prompts (texts or token-id lists), got {show(prompts)}"
            )
        count = len(prompts)
        limits = self._limits(max_new_tokens, count)
        if samplings is None:
            samplings = [None] * count
        if not isinstance(samplings, Sequence) or len(samplings) != count:
            raise ValueError(
                f"samplings: expected one SamplingParams (or None) per prompt ({count}), got {show(samplings)}"
            )
        for i, s in enumerate(samplings):
            if s is not None and not isinstance(s, SamplingParams):
                raise TypeError(
                    f"sampling: expected a fi_engine.runtime.sampling_params.SamplingParams or None, got "
                    f"{type(s).__name__}" + ("" if count == 1 else f" (request {i})")
                )
        if not isinstance(skip_special_tokens, bool):
            raise TypeError(f"skip_special_tokens: expected True or False, got {show(skip_special_tokens)}")
        if not isinstance(add_special_tokens, bool):
            raise TypeError(f"add_special_tokens: expected True or False, got {show(add_special_tokens)}")
        stops = StopStrings(stop).stops  # checks `stop`
        if stops and self.codec is None:
            raise ValueError("stop: stop strings are matched on the text; give the service a codec (TextCodec)")
        eos = (
            None if eos_token_ids is None else tuple(self._token_ids("eos_token_ids", eos_token_ids, allow_empty=True))
        )
        streams = []
        for i, prompt in enumerate(prompts):
            ids = self._prompt_ids(prompt, add_special_tokens, "prompt" if count == 1 else f"prompts[{i}]")
            detok = None
            if self.codec is not None:
                sampling = samplings[i]  # its min_tokens hold back the stop strings too
                least = 0 if sampling is None else sampling.min_tokens
                detok = self.codec.detokenizer(ids, stops, skip_special_tokens, least, keep_special_tokens)
            streams.append(RequestStream(self, ids, detok))
        with self._wakeup:
            if self._closing or self.error is not None:
                raise ServiceClosedError(self._closed_reason())
            limit, shared = self.max_batch + self.max_queue, self._shared_queue
            if shared is None:
                full = self._unfinished if self._unfinished + count > limit else None
            else:
                full = shared.try_add(count, limit)  # counted there when it fits
            if full is not None:
                self.metrics.request_rejected()
                where = "" if shared is None else f" over the {shared.services} API servers"
                raise QueueFullError(
                    f"the queue is full: {full} requests are unfinished{where}, at most max_batch + max_queue "
                    f"= {self.max_batch} + {self.max_queue} are taken; retry later"
                )
            self._unfinished += count
            for stream, limit, sampling in zip(streams, limits, samplings, strict=True):
                self._inbox.append(_Submission(stream, limit, sampling, eos))
            self._wakeup.notify()
        self._wake_step()
        return streams

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn(engine)`` in the engine thread between two steps (the engine is that thread's alone): a change of
        what it serves, such as ``engine.load_lora(name, path)``. Returns at once a future of its result or its
        exception (``asyncio.wrap_future`` awaits it); :class:`ServiceClosedError` in it once the service is
        closed or broken. TypeError naming ``fn`` for anything but a callable."""
        if not callable(fn):
            raise TypeError(f"fn: expected a callable taking the engine, got {type(fn).__name__}")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._wakeup:
            if self._closing or self.error is not None:
                future.set_exception(ServiceClosedError(self._closed_reason()))
                return future
            self._calls.append((fn, future))
            self._wakeup.notify()
        self._wake_step()
        return future

    def close(self, timeout: float = 30.0) -> None:
        """Take no more requests; let the unfinished ones run for up to ``timeout`` seconds, then cancel what is
        left (those streams end with ``"abort"``) and join the engine thread. Idempotent."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"timeout: expected seconds >= 0, got {show(timeout)}")
        with self._wakeup:
            if not self._closing:
                self._closing = True
                self._close_deadline = time.monotonic() + timeout
            self._wakeup.notify()
        self._wake_step()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> GenerationService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cancel(self, stream: RequestStream) -> None:
        with self._wakeup:
            if stream._ended:
                return
            self._cancels.append(stream)
            self._wakeup.notify()
        self._wake_step()

    def _wake_step(self) -> None:
        """Wake the engine thread where it waits in the engine's ``step()`` (not on this service's condition), so
        that new requests and cancellations reach the engine at once, not after its next output."""
        if self._wake_engine is not None:
            self._wake_engine()

    def _closed_reason(self) -> str:
        if self.error is not None:
            return f"the service stopped after an engine error: {self.error!r}"
        return "the service is closed"

    def _limits(self, max_new_tokens: int | Sequence[int], count: int) -> list[int]:
        values = list(max_new_tokens) if isinstance(max_new_tokens, Sequence) else [max_new_tokens] * count
        if len(values) != count:
            raise ValueError(f"max_new_tokens: expected one limit per prompt ({count}), got {len(values)}")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
                raise ValueError(f"max_new_tokens: expected an int in [1, {MAX_SIZE}], got {show(value)}")
        return values

    def _token_ids(self, name: str, value: Any, allow_empty: bool = False) -> list[int]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"{name}: expected a list of token ids (ints), got {type(value).__name__}")
        top = self.codec.tokenizer.vocab_size if self.codec is not None else MAX_SIZE + 1
        out = []
        for i, token in enumerate(value):
            if isinstance(token, bool) or not isinstance(token, int):
                raise TypeError(f"{name}[{i}]: expected an int token id, got {type(token).__name__}")
            if not 0 <= token < top:
                raise ValueError(f"{name}[{i}]: token id {show(token)} is outside the vocabulary [0, {top})")
            out.append(token)
        if not out and not allow_empty:
            raise ValueError(f"{name}: expected at least one token")
        return out

    def _prompt_ids(self, prompt: Any, add_special_tokens: bool, name: str) -> list[int]:
        if isinstance(prompt, str):
            if self.codec is None:
                raise TypeError(f"{name}: a text prompt needs a codec (TextCodec); give token ids or a codec")
            ids = self.codec.encode(prompt, add_special_tokens)
            if not ids:
                raise ValueError(f"{name}: the text encodes to no token; give a non-empty prompt")
            return ids
        return self._token_ids(name, prompt)

    # -- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        self._turn_wakeups = []
        try:
            while True:
                more = self._turn()
                self._flush_wakeups()
                if not more:
                    break
        except BaseException as exc:  # every waiting stream gets it; nothing waits forever
            self._flush_wakeups()
            self._turn_wakeups = None
            self._fail(exc)
        self._turn_wakeups = None

    def _flush_wakeups(self) -> None:
        """Wake the event loops waiting on streams this turn delivered to: one call per loop."""
        batch = self._turn_wakeups
        if not batch:
            return
        self._turn_wakeups = []
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for loop, future in batch:
            by_loop.setdefault(loop, []).append(future)
        for loop, futures in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there any more
                loop.call_soon_threadsafe(_resolve_all, futures)

    def _turn(self) -> bool:
        """One turn of the loop: take new work, run one step, deliver; False when the thread should end."""
        engine = self.engine
        with self._wakeup:
            while (
                not self._inbox and not self._cancels and not self._calls and not engine.has_unfinished
                and not self._closing
            ):  # fmt: skip
                self._wakeup.wait()
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
            calls, self._calls = self._calls, []
            closing, deadline = self._closing, self._close_deadline
        for fn, future in calls:  # before the new requests: one naming an adapter just loaded finds it
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(engine))
                except Exception as exc:  # the caller's to read (a refused adapter, ...)
                    future.set_exception(exc)
        self._add(inbox)
        for stream in cancels:
            self._abort(stream, "abort")
        if closing and deadline is not None and time.monotonic() >= deadline:
            for stream in list(self._live.values()):
                self._abort(stream, "abort")
        if engine.has_unfinished:
            now_outputs = engine.step()
            now = time.perf_counter()
            for out in now_outputs:
                self._deliver(out, now)
        elif closing and not self._live:
            with self._wakeup:
                if not self._inbox:
                    return False
        elif closing and deadline is not None:  # requests left but the engine idle: cannot happen with a sane engine
            time.sleep(0.001)
        self._publish_queue()
        return True

    def _add(self, subs: list[_Submission]) -> None:
        """Hand the new submissions to the engine: in one call where it takes several at once (an
        :class:`~fi_engine.serve.engine_process.EngineProcess`: one round trip), else one by one."""
        subs = [sub for sub in subs if not sub.stream._ended]
        if not subs:
            return
        engine = self.engine
        requests = [(s.stream.prompt_ids, s.max_new_tokens, s.sampling, s.eos_token_ids) for s in subs]
        if self._add_nowait is not None:  # taken (or refused) with the engine's outputs: _deliver
            for sub, rid in zip(subs, self._add_nowait(requests), strict=True):
                sub.stream.rid = rid
                self._live[rid] = sub.stream
            return
        add_many = getattr(engine, "add_requests", None)
        if add_many is not None:
            results = add_many(requests)
        else:
            results = []
            for sub in subs:
                try:
                    results.append(
                        engine.add_request(
                            sub.stream.prompt_ids, sub.max_new_tokens, sampling=sub.sampling,
                            eos_token_ids=sub.eos_token_ids,
                        )
                    )  # fmt: skip
                except (ValueError, TypeError) as exc:  # this prompt only: the engine refuses it (too long, ...)
                    results.append(exc)
        for sub, result in zip(subs, results, strict=True):
            stream = sub.stream
            if isinstance(result, Exception):
                stream._put(result)
                self._count_end()
                continue
            stream.rid = result
            self._live[result] = stream
            self.metrics.tokens(prompt=len(stream.prompt_ids))
            stream._accept(True)

    def _abort(self, stream: RequestStream, reason: FinishReason) -> None:
        if stream._ended or stream.cancelled:
            return
        stream.cancelled = True
        if stream.rid is not None and stream.rid in self._live:
            self.engine.abort_request(stream.rid)  # slot and pages freed now; its "abort" output is ignored
            del self._live[stream.rid]
            self._end(stream, reason)
        elif stream.rid is None:  # still in the inbox of a later turn, or never added
            self._end(stream, reason)

    def _deliver(self, out: StepOutput, now: float) -> None:
        rid, token_ids, finish, error = out.rid, out.token_ids, out.finish_reason, out.error
        stream = self._live.get(rid)
        if stream is None:  # a request this service already ended (a stop string, a cancel)
            return
        if not token_ids and finish is None:  # the engine took a request added without waiting (_add_nowait)
            self.metrics.tokens(prompt=len(stream.prompt_ids))
            stream._accept(True)
            return
        if error is not None:  # ... or refused it: the stream raises the engine's ValueError / TypeError
            del self._live[rid]
            stream._put(error)
            self._count_end()
            return
        detok = stream._detok
        taken: list[int] = []
        text = []
        stopped = False
        try:
            if stream.deferred:  # the text is decoded by the taker; only check that the tokenizer knows the ids
                assert detok is not None
                taken = [int(t) for t in token_ids]
                vocab = detok.vocab_size
                for t in taken:
                    if not 0 <= t < vocab:
                        raise ValueError(f"token_id: {t} is outside the vocabulary [0, {vocab})")
            else:
                for token in token_ids:
                    taken.append(int(token))
                    if detok is not None:
                        text.append(detok.push(token))
                        if detok.stopped is not None:
                            stopped = True
                            break
            if stopped:
                self.engine.abort_request(rid)
                finish = "stop"
                stream.stop_string = detok.stopped if detok is not None else None
            elif finish is not None and detok is not None and not stream.deferred:
                text.append(detok.finish())
        except ValueError as exc:  # a token the tokenizer does not know (an engine vocabulary padded past it)
            self.engine.abort_request(rid)
            del self._live[rid]
            stream._put(exc)
            self._count_end()
            return
        if taken:
            if stream.last_token_at is None:
                self.metrics.first_token(now - stream.submitted_at)
            else:
                self.metrics.inter_token(now - stream.last_token_at, len(taken))
            stream.last_token_at = now
            stream.completion_tokens += len(taken)
            self.metrics.tokens(generated=len(taken))
        if finish is not None:
            del self._live[rid]
        prompt_tokens, completion = len(stream.prompt_ids), stream.completion_tokens
        logprobs = None if out.logprobs is None else tuple(out.logprobs[: len(taken)])  # none past a stop string
        prompt_logprobs, cached = out.prompt_logprobs, out.num_cached_tokens
        if cached is not None:  # the engine's prefix cache looked the prompt up (with its first tokens)
            self.metrics.prefix_cache(queries=prompt_tokens, hits=cached)
        if out.num_draft_tokens:  # the engine verified a draft of this request (speculative decoding)
            self.metrics.speculation(out.num_draft_tokens, out.num_accepted_tokens or 0)
        if stream.deferred:
            stream._put(
                _PendingDelta(
                    tuple(taken), "", finish, prompt_tokens, completion, logprobs, prompt_logprobs, cached,
                    flush=finish is not None,
                )
            )  # fmt: skip
        else:
            stream._put(
                StreamDelta(
                    tuple(taken), "".join(text), finish, prompt_tokens, completion, logprobs, prompt_logprobs, cached
                )
            )
        if finish is not None:
            self.metrics.request_finished(finish, now - stream.submitted_at)
            self._count_end()

    def _end(self, stream: RequestStream, reason: FinishReason) -> None:
        """End a stream the engine no longer has (or never had): its last delta, with what text it held."""
        prompt_tokens, completion = len(stream.prompt_ids), stream.completion_tokens
        if stream.deferred:  # the taker decodes what the detokenizer still holds
            stream._put(_PendingDelta((), "", reason, prompt_tokens, completion, flush=completion > 0))
        else:
            text = ""
            if stream._detok is not None and completion:
                text = stream._detok.finish()
            stream._put(StreamDelta((), text, reason, prompt_tokens, completion))
        self.metrics.request_finished(reason, time.perf_counter() - stream.submitted_at)
        self._count_end()

    def _count_end(self) -> None:
        with self._lock:
            self._unfinished -= 1
            if self._shared_queue is not None:
                self._shared_queue.remove(1)

    def _publish_queue(self) -> None:
        running = sum(1 for s in self._live.values() if s.last_token_at is not None)
        with self._lock:
            waiting = self._unfinished - running
        self.metrics.queue(max(waiting, 0), running)

    def _fail(self, exc: BaseException) -> None:
        """The engine thread failed: every unfinished stream (in the engine, queued, or submitted meanwhile) ends
        with a :class:`ServiceError` naming the cause; submissions are refused from now on."""
        error = ServiceError(f"the engine thread failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        with self._wakeup:
            self.error = exc
            pending = [sub.stream for sub in self._inbox] + list(self._live.values())
            self._inbox.clear()
            calls, self._calls = self._calls, []
            for _, future in calls:
                if future.set_running_or_notify_cancel():
                    future.set_exception(ServiceClosedError(self._closed_reason()))
            self._live.clear()
            if self._shared_queue is not None:
                self._shared_queue.remove(self._unfinished)
            self._unfinished = 0
        for stream in pending:
            stream._put(error)
