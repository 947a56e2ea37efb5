"""A :class:`~fi_engine.runtime.stepping.StepEngine` whose engine runs in a process of its own: :class:`EngineProcess`.

Why: a server is two loops in one interpreter -- the engine's (launch a step, wait for the GPU, hand out its tokens)
and the HTTP event loop's (a JSON event per stream per token) -- and Python runs one thread at a time. Measured on
an H100 with the SmolLM2-135M checkpoint at 64 streams, a decode step that takes the engine 1.3 ms alone took
5.3 ms inside the server: after each GPU wait the engine thread queued for the interpreter behind the event loop.
In a child process the engine steps at its own pace, back to back, and sends each step's tokens in one message; the
server process only turns them into text and HTTP events (as vLLM splits its engine core from its API server).

The child is started with ``spawn`` (a fresh interpreter: CUDA state is never forked) and builds the engine itself
from ``factory`` (``"module:callable"``) and its arguments. It runs a step whenever it has work, handling its
connections' messages between steps. It has ``clients`` connections (default 1), one per front end
(:class:`~fi_engine.serve.engine_client.EngineClient`, ``engine.client(i)``: several API-server processes in front of
one engine): each connection names its requests itself (ids unique across the connections), the child keeps which engine
request each one is, sends each step's outputs as one message per connection holding that connection's rows only (under
its own ids), takes aborts only for a connection's own requests, and aborts every request of a connection whose process
went away (the others go on). The engine process's own StepEngine methods are those of connection 0 (``client(0)``):
with one front end, serve the engine process itself (``GenerationService(EngineProcess(...), codec)``).

``add_requests`` is a round trip (each request's id, or the engine's refusal as its ``ValueError`` /
``TypeError``); ``add_requests_nowait`` is not (the ids at once, the child's answers among the outputs: what
:class:`~fi_engine.serve.service.GenerationService` uses), nor is ``abort_request`` (its slot is freed before the
child's next step). :meth:`EngineProcess.step` returns every output the child sent since the last call, waiting for one
when there is none yet. An error in the child (or the child's death) is raised by the next call of every connection,
naming it. Only the owner (the process that made the ``EngineProcess``) ends the child, with
:meth:`~EngineProcess.close`; the child ignores SIGINT, so that a Ctrl-C to a terminal's process group leaves the owner
to shut down in order."""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import signal
import sys
from multiprocessing.connection import wait
from typing import Any

from ..runtime.stepping import NewRequest, StepEngineBase, StepOutput
from ..values import show
from .engine_client import CALLS, ERRORS, MAX_CLIENTS, EngineClient, NewRequests

__all__ = ["EngineProcess"]


def _child(
    control: Any, conns: list[Any], factory: str, args: tuple[Any, ...], kwargs: dict[str, Any], path: list[str]
) -> None:
    """The child's main: build the engine, then step while there is work and serve the connections."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the owner ends the child (close, or its own exit)
    sys.path[:] = path
    try:
        module, _, name = factory.partition(":")
        engine = getattr(importlib.import_module(module), name)(*args, **kwargs)
        max_batch = int(engine.max_batch)
        max_seq_len = getattr(engine, "max_seq_len", None)
        caching = getattr(engine, "prefix_caching", False) is True  # False where the engine has no such switch
        chunks = engine.max_num_batched_tokens if getattr(engine, "chunked_prefill", False) is True else 0
        drafts = getattr(engine, "speculative_tokens", 0)
    except BaseException as exc:  # the owner raises it from its constructor
        from ..kernels.system import FiFFIError

        # fi_ffi's errors (no GPU, a driver too old, ...) are worded for the user: passed on as they are
        control.send(("error", "FiFFIError" if isinstance(exc, FiFFIError) else type(exc).__name__, str(exc)))
        return
    control.send(("ready", max_batch, max_seq_len if isinstance(max_seq_len, int) else None, caching, chunks, drafts))
    try:
        _Router(engine, control, conns).run()
    finally:
        close = getattr(engine, "close", None)
        if callable(close):
            close()


class _Router:
    """The child's loop: the engine's steps and the connections' messages, each step's outputs routed to the
    connections whose requests they are."""

    def __init__(self, engine: Any, control: Any, conns: list[Any]) -> None:
        self.engine = engine
        self.control = control
        self.conns: dict[Any, int] = {conn: i for i, conn in enumerate(conns)}  # the connections still open
        self.by_index: dict[int, Any] = dict(enumerate(conns))
        # the connections name their requests themselves (EngineClient's ids): each engine rid's connection and id
        # there, and per connection its unfinished requests' ids -> engine rids (until they end)
        self.owner: dict[int, tuple[int, int]] = {}
        self.rids: list[dict[int, int]] = [{} for _ in conns]
        self.waitables: list[Any] = [control, *conns]
        self.aborted = False  # a request was aborted since the last step

    def run(self) -> None:
        engine, waitables = self.engine, self.waitables
        # an abort's output comes from the next step, which runs even with nothing else left
        self.aborted = False
        try:
            while True:
                while True:  # every message that has come; block for one while idle
                    busy = self.aborted or engine.has_unfinished
                    ready = wait(waitables, 0 if busy else None)
                    if not ready:
                        break
                    for conn in ready:
                        if conn is self.control:
                            if self._control_message():
                                return
                        else:
                            self._client_message(conn)
                outs = engine.step()
                self.aborted = False
                if outs:
                    self._route(outs)
        except BaseException as exc:  # every connection, and the owner, learn why the child ends
            msg = ("error", type(exc).__name__, str(exc))
            for conn in [*self.conns, self.control]:
                with contextlib.suppress(OSError, ValueError):
                    conn.send(msg)
            if not isinstance(exc, Exception):
                raise

    def _control_message(self) -> bool:
        """The owner's message; True to end the child (``close``, or the owner is gone)."""
        try:
            msg = self.control.recv()
        except (EOFError, OSError):
            return True
        return bool(msg[0] == "close")

    def _client_message(self, conn: Any) -> None:
        index = self.conns[conn]
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # every copy of this connection closed: its process exited or died
            self._drop(index)
            return
        engine = self.engine
        if msg[0] == "abort":
            rid = self.rids[index].get(msg[1])  # a connection names (and so aborts) its own requests only
            if rid is not None:
                engine.abort_request(rid)
                self.aborted = True
        elif msg[0] == "add":
            # each request under the id its connection gave it; the reply says which were taken and which refused
            replies: list[tuple[int, str | None, str]] = []
            owner, mine = self.owner, self.rids[index]
            for tag, prompt, max_new, sampling, eos in msg[1]:
                try:
                    rid = engine.add_request(prompt, max_new, sampling=sampling, eos_token_ids=eos)
                except (ValueError, TypeError) as exc:
                    replies.append((tag, type(exc).__name__, str(exc)))
                    continue
                owner[rid] = (index, tag)
                mine[tag] = rid
                replies.append((tag, None, ""))
            self._send(index, ("added", replies))
        elif msg[0] == "call":  # the adapters served (LoRA): an engine method of CALLS, answered on this connection
            _, tag, method, args = msg
            try:
                if method not in CALLS:
                    raise ValueError(f"call: {method!r} is not one of {', '.join(CALLS)}")
                result, kind, text = CALLS[method](engine, *args), None, ""
            except (ValueError, TypeError) as exc:
                result, kind, text = None, type(exc).__name__, str(exc)
            self._send(index, ("called", tag, result, kind, text))

    def _route(self, outs: list[StepOutput]) -> None:
        """One message per connection with rows in this step: ``(id, token_ids, finish_reason, logprobs,
        prompt_logprobs, num_cached_tokens, num_draft_tokens, num_accepted_tokens, error)`` of its own requests
        (``error``: None, or the type name and text of why the engine ended it), under the ids it gave them (the
        rows of a connection already gone are dropped)."""
        owner, rids = self.owner, self.rids
        per: dict[int, list[tuple[Any, ...]]] = {}
        for o in outs:
            named = owner.get(o.rid)
            if named is None:  # a request of a connection already dropped (its abort reported)
                continue
            index, tag = named
            rows = per.get(index)
            if rows is None:
                rows = per[index] = []
            rows.append(
                (
                    tag, tuple(o.token_ids), o.finish_reason, o.logprobs, o.prompt_logprobs, o.num_cached_tokens,
                    o.num_draft_tokens, o.num_accepted_tokens,
                    None if o.error is None else (type(o.error).__name__, str(o.error)),
                )
            )  # fmt: skip
            if o.finish_reason is not None:
                del owner[o.rid]
                del rids[index][tag]
        for index, rows in per.items():
            self._send(index, ("out", rows))

    def _send(self, index: int, msg: tuple[Any, ...]) -> None:
        conn = self.by_index.get(index)
        if conn is None:
            return
        try:
            conn.send(msg)
        except OSError:  # its process is gone (BrokenPipeError, ConnectionResetError)
            self._drop(index)

    def _drop(self, index: int) -> None:
        """A connection whose process went away: abort its requests (their slots freed for the others)."""
        conn = self.by_index.pop(index, None)
        if conn is None:
            return
        del self.conns[conn]
        self.waitables.remove(conn)
        with contextlib.suppress(OSError):
            conn.close()
        for rid in self.rids[index].values():
            self.engine.abort_request(rid)
            self.owner.pop(rid, None)
            self.aborted = True
        self.rids[index].clear()


class EngineProcess(StepEngineBase):
    """The engine ``factory(*args, **kwargs)`` (``factory`` a ``"module:callable"`` string, e.g.
    ``"fi_engine.models.registry:open_engine"``) built and stepped in a child process; serve it like the engine itself
    (``GenerationService(EngineProcess(...), codec)``). ``start_timeout``: seconds the child may take to build
    the engine (loading a checkpoint onto the GPU). ``clients``: the child's connections, one per front end (1 to
    64; :meth:`client`); the engine process's own StepEngine methods are connection 0's. Close it (or use it as a
    context manager) to end the child. ``max_batch``, ``max_seq_len`` (None where the engine has none) and
    ``prefix_caching``, ``chunked_prefill`` (False where the engine has none), ``max_num_batched_tokens`` and
    ``speculative_tokens`` (0 where it has none) are the engine's, read once it is built.

    Raises the engine's ValueError / TypeError / ImportError when it refuses its arguments or checkpoint, and
    RuntimeError naming the child's error otherwise. As with any ``spawn``-started process, a script that makes
    one must do it under ``if __name__ == "__main__":`` (the child imports the script's main module).
    """

    def __init__(self, factory: str, *args: Any, clients: int = 1, start_timeout: float = 900.0, **kwargs: Any) -> None:
        if not isinstance(factory, str) or ":" not in factory:
            raise TypeError(f"factory: expected 'module:callable', got {factory!r:.60}")
        if isinstance(clients, bool) or not isinstance(clients, int) or not 1 <= clients <= MAX_CLIENTS:
            raise ValueError(
                f"clients: expected an int in [1, {MAX_CLIENTS}] (front-end connections), got {show(clients)}"
            )
        ctx = mp.get_context("spawn")
        self._control, control_child = ctx.Pipe()
        pipes = [ctx.Pipe() for _ in range(clients)]
        self._proc = ctx.Process(
            target=_child,
            args=(control_child, [child for _, child in pipes], factory, args, kwargs, list(sys.path)),
            daemon=True,
        )
        self._proc.start()
        control_child.close()  # the child holds its ends: a connection whose other side goes away reads EOF
        for _, child in pipes:
            child.close()
        self._closed = False
        self._clients: list[EngineClient] = []
        try:
            msg = self._ready(start_timeout)
        except BaseException:
            for parent, _ in pipes:
                parent.close()
            self.close()
            raise
        self.max_batch: int = msg[1]
        self.max_seq_len: int | None = msg[2]  # the engine's, where it has one (a server's max_model_len)
        self.prefix_caching: bool = msg[3]  # the engine's prefix_caching (False where it has none)
        self.chunked_prefill: bool = msg[4] > 0  # the engine's chunked_prefill (False where it has none)
        self.max_num_batched_tokens: int = msg[4]  # with chunked_prefill, its token rows a pass (else 0)
        self.speculative_tokens: int = msg[5]  # the engine's speculative_tokens (0: off, or where it has none)
        exitcode = self._exitcode
        self._clients = [
            EngineClient(p, i, self.max_batch, self.max_seq_len, exitcode) for i, (p, _) in enumerate(pipes)
        ]

    def _exitcode(self) -> int | None:
        return self._proc.exitcode

    def _ready(self, timeout: float) -> Any:
        if not self._control.poll(timeout):
            raise RuntimeError(f"engine process: no answer within {timeout} s")
        try:
            msg = self._control.recv()
        except EOFError:
            raise RuntimeError(f"engine process: the child exited (status {self._proc.exitcode})") from None
        if msg[0] == "error":
            kind, text = msg[1], msg[2]
            if kind in ERRORS:  # a bad argument or checkpoint: the engine's own words
                raise ERRORS[kind](text)
            if kind == "FiFFIError":  # no GPU, a driver too old, ...: fi_ffi's own words
                raise RuntimeError(text)
            raise RuntimeError(f"engine process: {kind}: {text}")
        return msg

    @property
    def clients(self) -> int:
        """The child's connections (front ends)."""
        return len(self._clients)

    @property
    def alive(self) -> bool:
        """Whether the child is running (False once it exited: closed, failed or killed)."""
        return self._proc.is_alive()

    @property
    def sentinel(self) -> int:
        """The child's process sentinel, for :func:`multiprocessing.connection.wait` (ready once it exited)."""
        return int(self._proc.sentinel)

    def client(self, index: int = 0) -> EngineClient:
        """Connection ``index`` (0 to ``clients - 1``) as a :class:`~fi_engine.serve.engine_client.EngineClient`: pass
        it to a ``spawn``-started process's arguments (the front end steps it there), then :meth:`EngineClient.close
        <fi_engine.serve.engine_client.EngineClient.close>` this copy, so that the front end's exit aborts its requests.
        """
        self._check_open()
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self._clients):
            raise ValueError(f"index: expected an int in [0, {len(self._clients)}) (clients), got {show(index)}")
        return self._clients[index]

    # -- connection 0's StepEngine protocol (one front end) ----------------------------------------------------

    def add_requests(self, requests: NewRequests) -> list[Any]:
        """Queue several ``(prompt, max_new_tokens, sampling, eos_token_ids)`` at once (one round trip); each
        one's request id, or the ``ValueError`` / ``TypeError`` the engine refused it with."""
        return self._first().add_requests(requests)

    def add_requests_nowait(self, requests: NewRequests) -> list[int]:
        """Queue several requests without waiting for the child: their ids at once, the child's answers from
        :meth:`step` (:meth:`fi_engine.serve.engine_client.EngineClient.add_requests_nowait`)."""
        return self._first().add_requests_nowait(requests)

    def _add_request(self, request: NewRequest) -> int:
        """:meth:`add_request`: one request (see :meth:`add_requests`): its id, or the engine's ValueError /
        TypeError raised."""
        return self._first()._add_request(request)

    def abort_request(self, rid: int) -> None:
        """End request ``rid`` (the child aborts it before its next step; its ``"abort"`` output follows)."""
        self._first().abort_request(rid)

    @property
    def has_unfinished(self) -> bool:
        """Whether a request added here has not yet reported its end."""
        return bool(self._clients) and self._clients[0].has_unfinished

    def step(self) -> list[StepOutput]:
        """The outputs of every step the child ran since the last call (waiting for the next one when none has
        come yet and a request is unfinished, unless :meth:`wake` is called meanwhile)."""
        return self._first().step()

    def load_lora(self, name: str, path: str) -> None:
        """Serve the PEFT adapter of folder ``path`` as ``name`` in the child (:meth:`EngineClient.load_lora`)."""
        self._first().load_lora(name, path)

    def unload_lora(self, name: str) -> None:
        """Stop serving adapter ``name`` in the child (:meth:`EngineClient.unload_lora`)."""
        self._first().unload_lora(name)

    @property
    def lora_names(self) -> list[str]:
        """The adapters the child's engine serves (:attr:`EngineClient.lora_names`)."""
        return self._first().lora_names

    def wake(self) -> None:
        """Make a :meth:`step` waiting in another thread return now (:meth:`EngineClient.wake`)."""
        if not self._closed and self._clients:
            self._clients[0].wake()

    def _first(self) -> EngineClient:
        self._check_open()
        return self._clients[0]

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("engine: closed")

    def close(self) -> None:
        """Stop the child (its engine closed there) and wait for it; this process's copies of the connections are
        closed too. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(BrokenPipeError, OSError):  # a child already gone
            self._control.send(("close",))
        self._proc.join(60)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)
        self._control.close()
        for client in self._clients:
            client.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
