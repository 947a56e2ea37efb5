"""One connection to an engine process, served as a :class:`~fi_engine.runtime.stepping.StepEngine`:
:class:`EngineClient`.

An :class:`~fi_engine.serve.engine_process.EngineProcess` has one connection per front end (``clients=N``); each is an
``EngineClient`` (``engine.client(i)``). A client adds requests, aborts them and takes their outputs exactly as the
engine process itself does for one front end: ``add_requests`` is a round trip (each request's id, or the engine's
refusal as its ``ValueError`` / ``TypeError``), ``add_requests_nowait`` is not (the ids at once; the engine's
answers come among the outputs), nor is ``abort_request`` (the slot is freed before the engine's next step),
:meth:`EngineClient.step` returns every output the engine sent this connection since the last call (only the
requests it added), waiting for one when there is none yet. The client names its requests itself, so an id is
known before the engine has seen the request. An error of the engine (or its process's end) is
raised by the next call, naming it.

A client is handed to another process by passing it to a ``spawn``-started process's arguments (its connection is
duplicated into that process, as ``multiprocessing`` passes connections); the process that handed it over then
:meth:`~EngineClient.close` s its own copy. When every copy of a connection is closed (its process exited, or
died), the engine process aborts the requests that connection added; the other connections go on.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any

from ..runtime.sampling_params import SamplingParams
from ..runtime.stepping import NewRequest, StepEngineBase, StepOutput

MAX_CLIENTS = 64  # connections of one engine process (each is a pipe its child watches); a client's ids step by it

NewRequests = Sequence[tuple[Sequence[int], int, SamplingParams | None, Any]]
"""Requests to add: ``(prompt, max_new_tokens, sampling, eos_token_ids)`` each."""

__all__ = ["EngineClient"]

# the engine's methods a client may call in the engine process (a round trip each, between its steps): the LoRA
# adapters it serves, changed at run time (fi_engine.runtime.engine.Engine's load_lora / unload_lora / lora_names)
CALLS: dict[str, Callable[..., Any]] = {
    "load_lora": lambda engine, name, path: engine.load_lora(name, path),
    "unload_lora": lambda engine, name: engine.unload_lora(name),
    "lora_names": lambda engine: list(getattr(engine, "lora_names", [])),
}

# what the engine raises for a bad argument or checkpoint, raised again as itself on the client's side (its message
# names the argument); anything else from the engine process is a RuntimeError naming its type
ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "ImportError": ImportError,
    "ModuleNotFoundError": ModuleNotFoundError,
}


class EngineClient(StepEngineBase):
    """A :class:`~fi_engine.runtime.stepping.StepEngine` over one connection to an engine process; made by
    :meth:`fi_engine.serve.engine_process.EngineProcess.client` (not built directly).

    Attributes:
        index: which of the engine process's connections it is (0 to ``clients - 1``).
        max_batch: the engine's batch slots (shared by every client of the engine).
        max_seq_len: the engine's longest request in tokens, where it has one (a server's ``max_model_len``).
    """

    def __init__(
        self, conn: Any, index: int, max_batch: int, max_seq_len: int | None, exitcode: Callable[[], Any] | None = None
    ) -> None:
        self._conn = conn
        self.index = index
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        # the owner's clients read the child's exit status for their errors; a handed-over copy has none
        self._exitcode = exitcode
        self._live: set[int] = set()  # the requests added here that have not reported their end
        self._outputs: list[StepOutput] = []  # outputs received while waiting for a reply, for step()
        self._closed = False
        # this connection names its requests itself, index + MAX_CLIENTS * k (unique across the engine's
        # connections), so that an add needs no answer before its id is known (add_requests_nowait)
        self._next = index
        self._calls = 0  # the calls made (_call's tags)
        # wake(): a byte here makes a step() waiting for outputs return (this process's own pipe, never handed over)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_lock = threading.Lock()  # a wake() never writes to a descriptor close() has given back

    # -- handed to another process -----------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        if self._closed:
            raise ValueError(f"engine client {self.index}: closed; hand a client over before closing it")
        if self._live or self._outputs:
            raise ValueError(
                f"engine client {self.index}: has requests in flight; hand a client over before it is used"
            )
        # the connection pickles only while a process is being spawned (multiprocessing duplicates its descriptor)
        return {"conn": self._conn, "index": self.index, "max_batch": self.max_batch, "max_seq_len": self.max_seq_len}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["conn"], state["index"], state["max_batch"], state["max_seq_len"])  # type: ignore[misc]

    # -- the StepEngine protocol -------------------------------------------------------------------------------

    def add_requests(self, requests: NewRequests) -> list[Any]:
        """Queue several ``(prompt, max_new_tokens, sampling, eos_token_ids)`` at once (one round trip); each
        one's request id, or the ``ValueError`` / ``TypeError`` the engine refused it with."""
        if not requests:
            return []
        ids = self._send_add(requests)
        while True:  # outputs (and the answers to add_requests_nowait) that come first are kept for step()
            msg = self._receive()
            if msg[0] == "added" and msg[1] and msg[1][0][0] == ids[0]:
                break
            self._take(msg)
        results: list[Any] = []
        for rid, kind, text in msg[1]:
            if kind is None:
                results.append(rid)
            else:
                self._live.discard(rid)
                results.append(ERRORS.get(kind, ValueError)(text))
        return results

    def add_requests_nowait(self, requests: NewRequests) -> list[int]:
        """Queue several ``(prompt, max_new_tokens, sampling, eos_token_ids)`` and return their ids at once, without
        waiting for the engine process to answer (it takes them before its next step). A service's thread adds so
        and goes back to delivering tokens, where a round trip had held it, and every request arriving
        meanwhile, for most of an engine step (3.6 ms on average at 64 streams on an H100). The answer comes from
        :meth:`step`: a :class:`~fi_engine.runtime.stepping.StepOutput` with no tokens and no finish reason when the
        engine took the request, or one with ``finish_reason="abort"`` and ``error`` set (the ``ValueError`` /
        ``TypeError`` :meth:`add_request` would have raised) when it refused it."""
        return self._send_add(requests)

    def _add_request(self, request: NewRequest) -> int:
        """:meth:`add_request`: one request (see :meth:`add_requests`): its id, or the engine's ValueError /
        TypeError raised."""
        (result,) = self.add_requests([request])
        if isinstance(result, Exception):
            raise result
        return int(result)

    def abort_request(self, rid: int) -> None:
        """End request ``rid`` (the engine aborts it before its next step; its ``"abort"`` output follows). An id
        this client did not add, or one already ended: nothing happens."""
        self._check_open()
        self._send(("abort", rid))

    @property
    def has_unfinished(self) -> bool:
        """Whether a request added here has not yet reported its end."""
        return bool(self._live)

    def step(self) -> list[StepOutput]:
        """The outputs of this client's requests from every step the engine ran since the last call (waiting for
        the next one when none has come yet and a request is unfinished, unless :meth:`wake` is called meanwhile:
        then what has come, possibly nothing)."""
        self._check_open()
        if not self._outputs and self._live:
            ready = wait([self._conn, self._wake_r])
            if self._wake_r in ready:
                self._drain_wake()
            if self._conn in ready:
                self._take(self._receive())
        while self._conn.poll(0):
            self._take(self._receive())
        outs, self._outputs = self._outputs, []
        return outs

    def load_lora(self, name: str, path: str) -> None:
        """Serve the PEFT adapter of folder ``path`` as ``name`` (the engine's ``load_lora``, a round trip; its
        ValueError / TypeError raised here). Call it from the thread that steps this client (a service's:
        :meth:`GenerationService.call <fi_engine.serve.service.GenerationService.call>`)."""
        self._call("load_lora", name, path)

    def unload_lora(self, name: str) -> None:
        """Stop serving adapter ``name`` (the engine's ``unload_lora``, as :meth:`load_lora`)."""
        self._call("unload_lora", name)

    @property
    def lora_names(self) -> list[str]:
        """The adapters the engine serves ([] where it serves none; a round trip, as :meth:`load_lora`)."""
        return list(self._call("lora_names"))

    def _call(self, method: str, *args: Any) -> Any:
        """The engine's ``method(*args)`` (one of :data:`CALLS`) run in the engine process: its result, or its
        ValueError / TypeError raised; the outputs that come first are kept for :meth:`step`."""
        self._check_open()
        self._calls += 1
        tag = self._calls
        self._send(("call", tag, method, args))
        while True:
            msg = self._receive()
            if msg[0] == "called" and msg[1] == tag:
                break
            self._take(msg)
        _, _, result, kind, text = msg
        if kind is not None:
            raise ERRORS.get(kind, ValueError)(text)
        return result

    def wake(self) -> None:
        """Make a :meth:`step` that waits for outputs in another thread return now, with what has come (possibly
        nothing), or the next one if none waits. Thread-safe, never blocks. A service calls it when it has new
        requests or cancellations: a front end's one thread waits in ``step()`` while its requests run, and would
        otherwise hold new ones back until the engine's next output for this connection (a prefill's 5-20 ms
        when every request of its own is still queued)."""
        with self._wake_lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # the pipe is full: a wake is pending already
                os.write(self._wake_w, b"w")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 64):
                pass

    def close(self) -> None:
        """Close this copy of the connection (idempotent). Once every copy is closed, the engine process aborts the
        requests this connection added; the engine process itself runs on until its owner closes it."""
        with self._wake_lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self._conn.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _send(self, msg: tuple[Any, ...]) -> None:
        try:
            self._conn.send(msg)
        except (BrokenPipeError, ConnectionResetError):
            # the child is gone: the error it sent before it ended (still unread here) says why
            with contextlib.suppress(EOFError, OSError):
                while self._conn.poll(0):
                    pending = self._conn.recv()
                    if pending[0] == "error":
                        raise RuntimeError(f"engine process: {pending[1]}: {pending[2]}") from None
            raise RuntimeError(f"engine process: the child exited{self._status()}") from None

    def _receive(self) -> Any:
        try:
            msg = self._conn.recv()
        except (EOFError, ConnectionResetError):
            raise RuntimeError(f"engine process: the child exited{self._status()}") from None
        if msg[0] == "error":
            raise RuntimeError(f"engine process: {msg[1]}: {msg[2]}")
        return msg

    def _status(self) -> str:
        return "" if self._exitcode is None else f" (status {self._exitcode()})"

    def _send_add(self, requests: NewRequests) -> list[int]:
        """Name ``requests`` and send them to the engine process (no answer awaited); their ids."""
        self._check_open()
        ids = list(range(self._next, self._next + MAX_CLIENTS * len(requests), MAX_CLIENTS))
        rows = [
            (i, list(p), m, s, None if e is None else list(e)) for i, (p, m, s, e) in zip(ids, requests, strict=True)
        ]
        self._send(("add", rows))
        self._next += MAX_CLIENTS * len(rows)
        self._live.update(ids)
        return ids

    def _take(self, msg: Any) -> None:
        """A message from the engine process, for :meth:`step`: a step's outputs, or the answer to an add that
        nobody waits for (:meth:`add_requests_nowait`): an output without tokens for each request taken, an
        ``"abort"`` with the error for each one refused."""
        outputs, live = self._outputs, self._live
        if msg[0] == "out":
            for rid, tokens, finish, logprobs, prompts, cached, drafted, accepted, error in msg[1]:
                failed = None if error is None else ERRORS.get(error[0], ValueError)(error[1])
                outputs.append(StepOutput(rid, tokens, finish, failed, logprobs, prompts, cached, drafted, accepted))
                if finish is not None:
                    live.discard(rid)
        elif msg[0] == "added":
            for rid, kind, text in msg[1]:
                if kind is None:
                    outputs.append(StepOutput(rid, ()))
                else:
                    outputs.append(StepOutput(rid, (), "abort", error=ERRORS.get(kind, ValueError)(text)))
                    live.discard(rid)
        else:
            raise RuntimeError(f"engine process: unexpected message {msg[0]!r}")

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("engine: closed")
