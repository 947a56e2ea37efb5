"""A rank that dies does not hang the others: every rank keeps a TCP connection to rank 0 for the job's lifetime.

Why: a collective whose peer died never completes (the GPU kernel waits for data that never comes), so the other
ranks would block in their next synchronization forever. A process's sockets are closed by the operating system
when it dies however it dies (SIGKILL included), so the connection is how the survivors learn it at once, without
polling the GPU:

- rank 0 listens on a port the OS picks and hands its number out with the NCCL unique id (:func:`bootstrap`);
  every other rank connects and says its rank;
- a background thread per rank watches the connections. Rank 0 seeing one close without a goodbye, or a rank
  telling it that it failed (:meth:`Watchdog.fail`), tells every other rank which rank was lost; a rank seeing
  rank 0's connection close without a goodbye knows rank 0 was lost;
- a rank that learns a peer was lost prints ``fi_ffi: rank R of N: lost rank K (why); exiting`` to stderr and
  ends the process with status :data:`PEER_LOST_EXIT_CODE` (``os._exit``: its main thread may be blocked in a
  CUDA synchronization that will never return, so no exception could reach it).

:meth:`Watchdog.close` says goodbye (a rank that finishes normally is not a lost rank). The watch thread only
needs the GIL for a moment; the calls a rank blocks in (stream synchronization, NCCL) release it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

from .env import DistEnv
from .rendezvous import RendezvousError, default_timeout, exchange, recv_exact, time_left

__all__ = ["PEER_LOST_EXIT_CODE", "Watchdog", "bootstrap"]

PEER_LOST_EXIT_CODE = 75  # EX_TEMPFAIL: this rank was fine, a peer was not
_PORT = struct.Struct("!H")
_HELLO = struct.Struct("!4sI")  # b"fiwd", rank
_BYE, _FAIL, _LOST = b"B", b"F", b"L"  # a message: kind (1 byte), length (u32), UTF-8 text
_HEAD = struct.Struct("!cI")


def _exit_now(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
    os._exit(PEER_LOST_EXIT_CODE)


class Watchdog:
    """This rank's end of the liveness connections (see the module docstring). Made by :func:`bootstrap`.

    ``on_lost(text)`` is what happens when a peer is lost (default: print ``text`` and ``os._exit``); tests and
    embedders may pass their own.
    """

    def __init__(self, env: DistEnv, on_lost: Callable[[str], None] | None = None) -> None:
        if not isinstance(env, DistEnv):
            raise TypeError(f"env: expected a DistEnv (fi_ffi.comm.env.read_env), got {type(env).__name__}")
        if on_lost is not None and not callable(on_lost):
            raise TypeError(f"on_lost: expected None or a callable taking the text, got {type(on_lost).__name__}")
        self.env = env
        self.on_lost = on_lost or _exit_now
        self.lost: str | None = None  # the text, once a peer was lost
        self._peers: dict[socket.socket, int] = {}  # rank 0: the others' connections; others: {rank 0's: 0}
        self._server: socket.socket | None = None
        self._closing = False  # set first thing by fail() and close(): the watch thread then acts on nothing
        self._closed = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- set-up ----------------------------------------------------------------------------------------------

    def listen(self) -> int:
        """Rank 0: open the listening socket; returns its port (handed out by :func:`bootstrap`)."""
        self._server = socket.create_server(("", 0))
        return int(self._server.getsockname()[1])

    def accept_all(self, deadline: float) -> None:
        """Rank 0: take every other rank's connection (each says its rank) by ``deadline`` (monotonic seconds)."""
        assert self._server is not None
        waiting = set(range(1, self.env.world_size))
        with self._server:
            while waiting:
                self._server.settimeout(
                    time_left(
                        deadline,
                        f"rank 0: ranks {sorted(waiting)} did not open their liveness connection within the "
                        f"rendezvous timeout (FI_FFI_RENDEZVOUS_TIMEOUT); did they die during start-up?",
                    )
                )
                try:
                    conn, _ = self._server.accept()
                    conn.settimeout(max(0.001, min(10.0, deadline - time.monotonic())))
                    tag, rank = _HELLO.unpack(recv_exact(conn, _HELLO.size))
                except (OSError, EOFError, struct.error):
                    continue  # a stray client or a timeout: the loop checks the deadline
                if tag != b"fiwd" or rank not in waiting:
                    conn.close()
                    continue
                waiting.discard(rank)
                self._peers[conn] = rank
        self._server = None

    def connect(self, port: int, deadline: float) -> None:
        """A rank other than 0: connect to rank 0's liveness port and say which rank this is."""
        remaining = max(0.001, deadline - time.monotonic())
        try:
            conn = socket.create_connection((self.env.master_addr, port), timeout=min(remaining, 30.0))
            conn.sendall(_HELLO.pack(b"fiwd", self.env.rank))
        except OSError as exc:
            raise RendezvousError(
                f"rank {self.env.rank}: cannot open the liveness connection to rank 0 at {self.env.master_addr}:"
                f"{port}: {exc.strerror or exc}"
            ) from None
        self._peers[conn] = 0

    def start(self) -> None:
        """Start watching (a daemon thread). An exception that ends the program (``sys.excepthook``) counts as this
        rank failing; a normal interpreter exit says goodbye (``atexit``); ``os._exit`` and signals close the
        connection without one."""
        previous = sys.excepthook

        def hook(kind: type[BaseException], value: BaseException, tb: object) -> None:
            previous(kind, value, tb)  # type: ignore[arg-type]  # the traceback first: a launcher reads it
            with contextlib.suppress(Exception):
                self.fail(f"{kind.__name__}: {value}")

        sys.excepthook = hook
        atexit.register(self.close)
        for conn in self._peers:
            conn.settimeout(None)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._thread = threading.Thread(target=self._watch, name=f"fi_ffi-watchdog-{self.env.rank}", daemon=True)
        self._thread.start()

    # ---- the watch -------------------------------------------------------------------------------------------

    def _watch(self) -> None:
        while True:
            with self._lock:
                conns = list(self._peers)
            if not conns or self._closing:
                return
            try:
                readable, _, _ = select.select(conns, [], [], 0.5)
            except (OSError, ValueError):  # a socket closed by close(): the loop re-reads the set
                continue
            for conn in readable:
                rank = self._peers.get(conn)
                if rank is None:
                    continue
                kind, text = _read_message(conn)
                if self._closing:
                    return
                if kind == _BYE:  # that rank (or rank 0) finished normally: stop watching it
                    self._drop(conn)
                    continue
                if kind == _LOST:  # rank 0 relays another rank's loss
                    why = text
                elif kind == _FAIL:
                    why = f"rank {rank} failed: {text}"
                else:  # closed without a goodbye (killed, crashed)
                    why = f"rank {rank} died (its connection closed without a goodbye; killed or crashed)"
                self._lost(why)
                return

    def _lost(self, why: str) -> None:
        if self.env.rank == 0:  # tell the others which rank it was
            self._send_all(_LOST, why)
        self.lost = f"fi_ffi: rank {self.env.rank} of {self.env.world_size}: lost {why}; exiting"
        self.on_lost(self.lost)

    def _drop(self, conn: socket.socket) -> None:
        with self._lock:
            self._peers.pop(conn, None)
        with contextlib.suppress(OSError):
            conn.close()

    def _send_all(self, kind: bytes, text: str) -> None:
        data = text.encode()
        with self._lock:
            conns = list(self._peers)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.sendall(_HEAD.pack(kind, len(data)) + data)

    # ---- endings ---------------------------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """This rank failed (an exception it will not survive): tell rank 0, which tells the others (rank 0 tells
        them itself). The caller then ends without collectives; its peers exit instead of waiting for it."""
        self._closing = True  # before sending: rank 0's relay of this very failure must not end this rank
        if self.env.rank == 0:
            self._send_all(_LOST, f"rank 0 failed: {reason}")
        else:
            self._send_all(_FAIL, reason)
        self.close(goodbye=False)

    def close(self, goodbye: bool = True) -> None:
        """Stop watching; with ``goodbye`` tell the peers this rank ended normally. Idempotent."""
        if self._closed:
            return
        self._closed = self._closing = True
        if goodbye:
            self._send_all(_BYE, "")
        with self._lock:
            conns, self._peers = list(self._peers), {}
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.close()
        if self._server is not None:
            self._server.close()


def bootstrap(
    env: DistEnv, payload: bytes | None, *, timeout: float | None = None, on_lost: Callable[[str], None] | None = None
) -> tuple[bytes, Watchdog | None]:
    """:func:`~fi_ffi.comm.rendezvous.exchange` of ``payload`` (rank 0's), plus every rank's :class:`Watchdog`,
    watching once this returns (None for a world of one). Returns ``(payload, watchdog)``."""
    if env.world_size == 1:
        return exchange(env, payload, timeout=timeout), None
    limit = default_timeout() if timeout is None else float(timeout)
    deadline = time.monotonic() + limit
    dog = Watchdog(env, on_lost)
    if env.rank == 0:
        assert payload is not None
        port = dog.listen()
        try:
            exchange(env, _PORT.pack(port) + payload, timeout=limit)
            dog.accept_all(deadline)
        except BaseException:
            dog.close(goodbye=False)
            raise
        data = payload
    else:
        got = exchange(env, None, timeout=limit)
        (port,) = _PORT.unpack(got[: _PORT.size])
        data = got[_PORT.size :]
        dog.connect(port, deadline)
    dog.start()
    return data, dog


def _read_message(conn: socket.socket) -> tuple[bytes, str]:
    """One message, or ``(b"", "")`` for a connection that closed (or broke) before a whole one arrived."""
    try:
        kind, length = _HEAD.unpack(recv_exact(conn, _HEAD.size))
        text = recv_exact(conn, min(length, 1 << 16)).decode(errors="replace")
    except (OSError, EOFError, struct.error):
        return b"", ""
    return kind, text
