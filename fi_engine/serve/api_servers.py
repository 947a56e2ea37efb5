"""Several API-server processes in front of one engine process: ``fi-engine serve --api-servers N``
(:func:`serve_api_servers`), as vLLM's ``--api-server-count``.

Why: one server process has one interpreter for the service thread (per engine step: a delivery per request, its
locks and metrics) and the HTTP event loop (parsing, tokenizing and templating new requests, detokenizing, JSON and
SSE writes). Measured on an H100 with SmolLM2-135M at 64 streaming clients, that one interpreter delivered 0.59x
the engine's own tokens/s: a finished request's slot waited for the client's next request to get through it. With
N front ends each has an interpreter of its own, and the engine child serves them all.

How: the calling process (the owner) holds an :class:`~fi_engine.serve.engine_process.EngineProcess` made with
``clients=N`` and binds the listening sockets once, before anything starts (a port in use is named at once). It
then starts N front-end processes (``spawn``): front end ``i`` gets connection ``i`` of the engine process
(:class:`~fi_engine.serve.engine_client.EngineClient`), its socket, and its slot of the shared metrics and queue count;
it loads the checkpoint's tokenizer itself (its own :class:`~fi_engine.text.codec.TextCodec`), runs a
:class:`~fi_engine.serve.service.GenerationService` over its connection and uvicorn over that socket
(``Server.run(sockets=[sock])``), and tells the owner when it is listening.

- Sockets: where the platform has ``SO_REUSEPORT`` (Linux), each front end listens on a socket of its own bound to
  the same address, and the kernel spreads new connections evenly over them by their addresses; one socket shared
  by every front end would hand a burst of connections to whichever process wakes first (asyncio accepts up to
  100 at a time), and a client's keep-alive connection stays where it landed. Without ``SO_REUSEPORT``, the front
  ends share one socket.
- Limits and metrics: the queue limit ``max_batch + max_queue`` holds over all the front ends together
  (:class:`~fi_engine.serve.shared_queue.SharedQueue`: a request is refused with 429 when that many are unfinished in
  all of them, whichever front end it reaches); every front end's ``/metrics`` is the sum over all of them
  (:meth:`~fi_engine.serve.metrics.ServingMetrics.shared`), with one more family,
  ``fi_engine_api_server_http_responses_total{api_server="i"}``, showing how the load is spread.
- LoRA adapters (``lora_modules``): the engine process is the one record of which adapters exist. A front end
  keeps the names it has seen, so a request naming one goes straight to the engine, and asks the engine for its
  names (one round trip) where a request names a model it does not know (loaded through another front end), where
  the engine refused a request's adapter (unloaded through another: 404 ``model_not_found``, as with one server),
  for ``/v1/models``, and before a load or an unload (two loads of one name at once: the engine takes the first,
  the other is answered 400). Where run-time loading is off, the adapters loaded at start are all there ever are:
  no front end asks.
- Signals: the front ends leave the terminal's process group, so a Ctrl-C reaches the owner only (and the engine
  child ignores SIGINT). On SIGINT/SIGTERM the owner tells every front end to stop: each stops accepting, lets
  open requests finish for ``graceful_s`` seconds and cancels the rest (as one server does); a second signal
  cuts the grace short. The owner then returns, and its caller closes the engine process.
- Failures: a front end that fails to start or exits while serving is named in the :class:`RuntimeError` raised
  once the others are stopped (never a hang). A front end whose owner dies stops by itself (its lifeline pipe
  reads EOF), and the engine child ends when its owner's connection closes.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from ..values import show
from .engine_process import EngineProcess
from .lora_api import ServedAdapters, check_runtime_lora_updating

__all__ = ["serve_api_servers"]

BACKLOG = 2048  # pending connections per listening socket (uvicorn's default)
POLL_S = 0.1  # how often the owner looks at its stop signal while it waits for its front ends
STOP_MARGIN_S = 10.0  # beyond the grace periods, what a front end may take to exit before it is killed


@dataclass(frozen=True)
class _Settings:
    """What every front end needs beside its own connection, socket and slots (picklable)."""

    model_dir: str
    names: tuple[str, ...]
    max_model_len: int | None
    max_queue: int
    graceful_s: float
    log_level: str
    quantization: str | None
    allowed_origins: tuple[str, ...]
    max_request_bytes: int
    api_key: str | None = field(default=None, repr=False)  # through the spawn pipe: never on a command line
    lora_modules: tuple[str, ...] | None = None  # the adapters loaded at start (None: the engine serves none)
    allow_runtime_lora_updating: bool = False


def _ignore(sig: int, frame: Any) -> None:
    """A front end's handler of SIGINT/SIGTERM outside uvicorn's run: the owner stops it through its lifeline."""


def _front_end(
    index: int, settings: _Settings, client: Any, lifeline: Any, sock: socket.socket, metrics: Any, queue: Any
) -> None:
    """A front-end process's main: a GenerationService over ``client`` and uvicorn on ``sock`` until the owner
    says stop (or goes away). Exit status 0 after a stop, 2 when it could not start."""
    os.setpgrp()  # out of the terminal's process group: a Ctrl-C goes to the owner, which stops us in order
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises what it caught once it stopped: nothing to do
        signal.signal(sig, _ignore)
    try:
        from ..text.codec import TextCodec
        from .openai_server import SWITCH_INTERVAL_S, _require, build_app, uvicorn_config
        from .service import GenerationService

        uvicorn = _require("uvicorn")
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        codec = TextCodec.from_dir(settings.model_dir)
        service = GenerationService(client, codec, max_queue=settings.max_queue, metrics=metrics, shared_queue=queue)
    except Exception as exc:  # the owner names it and stops the others
        with contextlib.suppress(OSError):
            lifeline.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(2) from None
    try:
        app = build_app(
            service,
            settings.names,
            max_model_len=settings.max_model_len,
            close_timeout=settings.graceful_s,
            quantization=settings.quantization,
            api_key=settings.api_key,
            allowed_origins=settings.allowed_origins,
            max_request_bytes=settings.max_request_bytes,
            lora_modules=settings.lora_modules,
            allow_runtime_lora_updating=settings.allow_runtime_lora_updating,
            shared_engine=True,  # the others load and unload adapters too: the engine says which it serves
        )
        config = uvicorn_config(app, log_level=settings.log_level, graceful_s=settings.graceful_s)
        server = uvicorn.Server(config)
        threading.Thread(
            target=_listen_to_owner, args=(server, lifeline), name="fi-engine-lifeline", daemon=True
        ).start()
        server.run(sockets=[sock])
        if not server.started:
            with contextlib.suppress(OSError):
                lifeline.send(("failed", "uvicorn did not start (see its log above)"))
            raise SystemExit(2)
    finally:
        service.close(timeout=settings.graceful_s)  # the app's lifespan closed it already, unless it never ran
        client.close()


def _listen_to_owner(server: Any, lifeline: Any) -> None:
    """A front end's thread: tell the owner once uvicorn listens, then stop uvicorn when the owner says so
    (``"stop"``: gracefully; ``"force"``: now) or goes away."""
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.01)
    try:
        lifeline.send(("ready", os.getpid()))
        while True:
            msg = lifeline.recv()
            server.should_exit = True
            if msg[0] == "force":
                server.force_exit = True
    except (EOFError, OSError):  # the owner is gone: stop gracefully
        server.should_exit = True


def _listen(host: str, port: int, count: int) -> list[socket.socket]:
    """The listening sockets: ``count`` bound to one address with SO_REUSEPORT where the platform has it (the
    kernel spreads connections over them), else one that every front end shares."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ValueError(
            f"host: cannot listen on {host!r}: {exc.strerror}; give an address such as 127.0.0.1"
        ) from None
    reuse_port = count > 1 and hasattr(socket, "SO_REUSEPORT")
    socks: list[socket.socket] = []
    try:
        for _ in range(count if reuse_port else 1):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if len(socks) > 1:  # the same port as the first (port 0: the one the first was given)
                address = (address[0], socks[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(BACKLOG)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise ValueError(
            f"port: cannot listen on {host}:{port}: {exc.strerror or exc}; pick a free port or stop what holds it"
        ) from None
    return socks


class _Signals:
    """SIGINT/SIGTERM counted while the owner serves (its previous handlers restored by :meth:`restore`)."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # handlers can be set from the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, sig: int, frame: Any) -> None:
        self.count += 1

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def serve_api_servers(
    engine: EngineProcess,
    model_dir: str | os.PathLike[str],
    model_names: str | Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_queue: int = 256,
    max_model_len: int | None = None,
    graceful_s: float = 30.0,
    log_level: str = "info",
    ready: Callable[[int, list[int]], None] | None = None,
    quantization: str | None = None,
    api_key: str | None = None,
    allowed_origins: Sequence[str] = ("*",),
    max_request_bytes: int | None = None,
    lora_modules: Sequence[str] | None = None,
    allow_runtime_lora_updating: bool | None = None,
) -> None:
    """Serve ``engine`` through ``engine.clients`` API-server processes (see the module docstring) until
    SIGINT/SIGTERM; the engine process stays open (its owner, the caller, closes it).

    Args:
        engine: the engine process, made with ``clients=N`` (N front ends), its connections not yet used.
        model_dir: the checkpoint folder whose ``tokenizer.json`` (and chat template) each front end loads.
        model_names: the name(s) the model answers to (``model`` of a request; the first is the default).
        host, port: the address to listen on (port 0: one the system picks, given to ``ready``).
        max_queue: requests accepted beyond the engine's ``max_batch``, over all the front ends together, before
            the next is answered 429.
        max_model_len: the engine's longest request in tokens (``/v1/models``); None: unknown.
        graceful_s: seconds open requests get to finish on SIGINT/SIGTERM before they are cancelled.
        log_level: uvicorn's log level in each front end.
        ready: called once every front end listens, with the port and the front ends' process ids.
        quantization: the ``quant_method`` of the weights served (``/v1/models``); None: 16-bit weights.
        api_key, allowed_origins, max_request_bytes: as :func:`~fi_engine.serve.openai_server.build_app` takes them,
            in every front end (the key reaches them through their start-up pipe, not their command lines;
            ``max_request_bytes`` None: its default).
        lora_modules, allow_runtime_lora_updating: as :func:`~fi_engine.serve.openai_server.build_app` takes them, in
            every front end: each answers to the adapters the engine serves, and one loaded or unloaded through any
            front end is served or refused by all of them (``build_app``'s ``shared_engine``: the engine process is
            the one record of which adapters exist).

    Raises:
        TypeError/ValueError naming the argument (``port``/``host`` also when the address cannot be bound);
        RuntimeError when a front end fails to start or exits while serving (the others are stopped first).
    """
    if not isinstance(engine, EngineProcess):
        raise TypeError(f"engine: expected a fi_engine.serve.engine_process.EngineProcess, got {type(engine).__name__}")
    names = (model_names,) if isinstance(model_names, str) else tuple(model_names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"model_names: expected a non-empty name or list of names, got {show(model_names)}")
    if not isinstance(model_dir, (str, os.PathLike)) or not Path(model_dir).is_dir():
        raise ValueError(f"model_dir: expected the checkpoint's folder (its tokenizer.json), got {show(model_dir)}")
    if not isinstance(host, str) or not host:
        raise TypeError(f"host: expected an address such as 127.0.0.1, got {show(host)}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port: expected a TCP port in [0, 65535], got {show(port)}")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"max_queue: expected an int >= 0 (requests waiting), got {show(max_queue)}")
    if isinstance(graceful_s, bool) or not isinstance(graceful_s, (int, float)) or not 0 <= graceful_s < 1e6:
        raise ValueError(f"graceful_s: expected seconds >= 0, got {show(graceful_s)}")
    if ready is not None and not callable(ready):
        raise TypeError(f"ready: expected a callable(port, pids) or None, got {type(ready).__name__}")
    from .openai_server import (
        MAX_REQUEST_BYTES,
        check_api_key,
        check_max_request_bytes,
        check_origins,
        check_quantization,
    )

    check_quantization(quantization)
    body_limit = check_max_request_bytes(MAX_REQUEST_BYTES if max_request_bytes is None else max_request_bytes)
    origins = check_origins(allowed_origins)
    check_api_key(api_key)
    runtime_lora = check_runtime_lora_updating(allow_runtime_lora_updating)
    adapters = ServedAdapters(lora_modules, names, runtime_lora)  # its names checked here, before any process starts
    from .metrics import ServingMetrics
    from .shared_queue import SharedQueue

    count = engine.clients
    settings = _Settings(
        str(model_dir),
        names,
        max_model_len,
        max_queue,
        float(graceful_s),
        log_level,
        quantization,
        origins,
        body_limit,
        api_key,
        None if lora_modules is None else tuple(adapters.names),
        runtime_lora,
    )
    socks = _listen(host, port, count)
    bound = socks[0].getsockname()[1]
    metrics, queues = ServingMetrics.shared(count), SharedQueue.create(count)
    ctx = mp.get_context("spawn")
    signals = _Signals()
    procs: list[Any] = []
    lifelines: list[Any] = []
    try:
        for i in range(count):
            mine, theirs = ctx.Pipe()
            sock = socks[i % len(socks)]
            proc = ctx.Process(
                target=_front_end,
                args=(i, settings, engine.client(i), theirs, sock, metrics[i], queues[i]),
                name=f"fi-engine-api-server-{i}",
                daemon=True,
            )
            proc.start()
            procs.append(proc)
            lifelines.append(mine)
            theirs.close()
            engine.client(i).close()  # the front end holds the connection now: its exit aborts its requests
        for sock in socks:  # the front ends hold the sockets now: once they close them, connections are refused
            sock.close()
        failure = _wait_ready(procs, lifelines, signals)
        if failure is None and not signals.count:
            if ready is not None:
                ready(bound, [int(p.pid) for p in procs])
            failure = _watch(procs, signals)
    finally:
        for sock in socks:
            sock.close()
        _stop(procs, lifelines, signals, 2 * float(graceful_s) + STOP_MARGIN_S)
        signals.restore()
        for lifeline in lifelines:
            lifeline.close()
    if failure is not None:
        raise RuntimeError(f"{failure}; the other API servers were stopped")


def _wait_ready(procs: list[Any], lifelines: list[Any], signals: _Signals) -> str | None:
    """Wait until every front end listens; what went wrong (a front end that failed or exited), or None."""
    pending = set(range(len(procs)))
    while pending and not signals.count:
        waiting = {lifelines[i]: i for i in pending} | {procs[i].sentinel: i for i in pending}
        for obj in wait(list(waiting), POLL_S):
            i = waiting[obj]
            if i not in pending:  # its lifeline and its sentinel both came: handled
                continue
            msg = _read(lifelines[i])  # a process that exited may have said why first
            if msg is None and procs[i].is_alive():
                continue
            if msg is not None and msg[0] == "ready":
                pending.discard(i)
                continue
            if msg is not None and msg[0] == "failed":
                return f"API server {i} failed to start: {msg[1]}"
            procs[i].join(1.0)
            return f"API server {i} exited (status {procs[i].exitcode}) before it listened"
    return None


def _read(lifeline: Any) -> Any:
    """The front end's message waiting on ``lifeline``; None when there is none, ``("gone",)`` at its end."""
    try:
        return lifeline.recv() if lifeline.poll(0) else None
    except (EOFError, OSError):
        return ("gone",)


def _watch(procs: list[Any], signals: _Signals) -> str | None:
    """Serve until a signal (None) or a front end's exit (what happened to it)."""
    sentinels = {p.sentinel: i for i, p in enumerate(procs)}
    while not signals.count:
        done = wait(list(sentinels), POLL_S)
        if done and not signals.count:
            i = sentinels[done[0]]
            procs[i].join(1.0)
            return f"API server {i} exited (status {procs[i].exitcode}) while serving"
    return None


def _stop(procs: list[Any], lifelines: list[Any], signals: _Signals, timeout: float) -> None:
    """Tell every front end to stop (gracefully; at once after one more signal), wait up to ``timeout`` seconds,
    then end those left."""
    seen = signals.count
    for lifeline in lifelines:
        with contextlib.suppress(OSError):
            lifeline.send(("stop",))
    forced = False
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if signals.count > seen and not forced:  # asked again: cut the grace short
            forced = True
            for lifeline in lifelines:
                with contextlib.suppress(OSError):
                    lifeline.send(("force",))
        wait([p.sentinel for p in procs if p.is_alive()], POLL_S)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
        proc.join(5)
