"""Hand one small byte string (the NCCL unique id) from rank 0 to every other rank, over TCP.

Rank 0 listens on ``MASTER_PORT`` (all interfaces, as torch.distributed's ``env://`` does) until every other rank
has fetched the payload; the others connect to ``MASTER_ADDR:MASTER_PORT``, retrying with backoff while rank 0 is
not listening yet. Every wait is bounded by one deadline (``timeout`` seconds, default ``FI_FFI_RENDEZVOUS_TIMEOUT``
or 300): a rank that never comes, a server that never answers, a peer of another job (world size mismatch) or a
rank that asks twice is a :class:`RendezvousError` saying which.

The wire, both directions length-prefixed:

- request:  ``b"fi_ffi-rdv1"``, world size (u32, network order), rank (u32)
- answer:   ``b"K"``, length (u32), payload; or ``b"E"``, length (u32), UTF-8 reason
"""

from __future__ import annotations

import socket
import struct
import time

from .. import variables
from ..errors import FiFFIError
from .env import DistEnv

MAGIC = b"fi_ffi-rdv1"
_REQUEST = struct.Struct("!II")
_LENGTH = struct.Struct("!I")
_MAX_PAYLOAD = 1 << 20
DEFAULT_TIMEOUT_S = 300.0


class RendezvousError(FiFFIError):
    """The rendezvous did not complete (a rank missing, a refused or malformed exchange); the text says which."""


def default_timeout() -> float:
    """``FI_FFI_RENDEZVOUS_TIMEOUT`` (seconds, > 0) or 300."""
    value = variables.seconds("FI_FFI_RENDEZVOUS_TIMEOUT")  # ValueError: not a number of seconds > 0
    return DEFAULT_TIMEOUT_S if value is None else value


def exchange(env: DistEnv, payload: bytes | None, *, timeout: float | None = None) -> bytes:
    """Rank 0 gives ``payload``; every rank returns it.

    Args:
        env: this process's place (rank, world size, ``MASTER_ADDR``/``MASTER_PORT``).
        payload: the bytes to hand out (rank 0 only; others pass None). At most 1 MiB.
        timeout: seconds for the whole exchange (default :func:`default_timeout`).

    Raises:
        RendezvousError: the deadline passed or a peer misbehaved (the text names the address and the ranks).
    """
    limit = default_timeout() if timeout is None else float(timeout)
    if not limit > 0:
        raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
    deadline = time.monotonic() + limit
    if env.rank == 0:
        if not isinstance(payload, (bytes, bytearray)):
            raise TypeError(f"payload: rank 0 must give bytes, got {type(payload).__name__}")
        if len(payload) > _MAX_PAYLOAD:
            raise ValueError(f"payload: at most {_MAX_PAYLOAD} bytes, got {len(payload)}")
        _serve(env, bytes(payload), deadline, limit)
        return bytes(payload)
    if payload is not None:
        raise ValueError(f"payload: only rank 0 gives the payload (this is rank {env.rank})")
    return _fetch(env, deadline, limit)


def _serve(env: DistEnv, payload: bytes, deadline: float, limit: float) -> None:
    waiting = set(range(1, env.world_size))
    if not waiting:
        return
    where = f"port {env.master_port} (MASTER_PORT)"
    try:
        server = socket.create_server(("", env.master_port))
    except OSError as exc:
        raise RendezvousError(
            f"rank 0 cannot listen on {where}: {exc.strerror or exc}; pick a free MASTER_PORT"
        ) from None
    with server:
        while waiting:
            server.settimeout(
                time_left(
                    deadline,
                    f"rank 0 waited {limit:g} s on {where} for ranks {sorted(waiting)} of {env.world_size}; were they "
                    f"started, with MASTER_ADDR pointing here and the same WORLD_SIZE? (FI_FFI_RENDEZVOUS_TIMEOUT)",
                )
            )
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(max(0.001, min(10.0, deadline - time.monotonic())))
                try:
                    rank = _answer(conn, env, payload, waiting)
                except (OSError, _Refused):
                    continue  # a stray or broken client: the rank it claimed, if any, still waits
                waiting.discard(rank)


class _Refused(Exception):
    pass


def _answer(conn: socket.socket, env: DistEnv, payload: bytes, waiting: set[int]) -> int:
    head = recv_exact(conn, len(MAGIC) + _REQUEST.size)
    if head[: len(MAGIC)] != MAGIC:
        raise _Refused
    world, rank = _REQUEST.unpack(head[len(MAGIC) :])
    reason = ""
    if world != env.world_size:
        reason = f"world size mismatch: rank 0 has WORLD_SIZE={env.world_size}, rank {rank} has {world}"
    elif rank not in waiting:
        reason = f"rank {rank} is not expected (ranks still waiting: {sorted(waiting)}); is a rank started twice?"
    if reason:
        text = reason.encode()
        conn.sendall(b"E" + _LENGTH.pack(len(text)) + text)
        raise _Refused
    conn.sendall(b"K" + _LENGTH.pack(len(payload)) + payload)
    return rank


def _fetch(env: DistEnv, deadline: float, limit: float) -> bytes:
    where = f"{env.master_addr}:{env.master_port} (MASTER_ADDR:MASTER_PORT)"
    pause = 0.05
    last = "no answer"
    while True:
        remaining = time_left(
            deadline,
            f"rank {env.rank} could not reach rank 0 at {where} within {limit:g} s ({last}); is rank 0 running "
            f"there? (FI_FFI_RENDEZVOUS_TIMEOUT)",
        )
        try:
            with socket.create_connection((env.master_addr, env.master_port), timeout=min(remaining, 10.0)) as conn:
                conn.settimeout(max(0.001, min(remaining, 10.0)))
                conn.sendall(MAGIC + _REQUEST.pack(env.world_size, env.rank))
                kind = recv_exact(conn, 1)
                length = _LENGTH.unpack(recv_exact(conn, _LENGTH.size))[0] if kind in (b"K", b"E") else -1
                body = recv_exact(conn, length) if 0 <= length <= _MAX_PAYLOAD else b""
        except socket.gaierror as exc:
            raise RendezvousError(f"MASTER_ADDR: cannot resolve {env.master_addr!r}: {exc.strerror or exc}") from None
        except (OSError, EOFError) as exc:  # not listening yet, reset, timed out: retry until the deadline
            last = type(exc).__name__ if not str(exc) else str(exc)
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 1.0)
            continue
        if kind == b"K" and 0 <= length <= _MAX_PAYLOAD:
            return body
        if kind == b"E" and 0 <= length <= _MAX_PAYLOAD:
            raise RendezvousError(f"rank {env.rank}: rank 0 at {where} refused: {body.decode(errors='replace')}")
        raise RendezvousError(f"rank {env.rank}: the server at {where} is not an fi_ffi rendezvous (answer {kind!r})")


def time_left(deadline: float, late: str) -> float:
    """Seconds left until ``deadline`` (``time.monotonic()`` seconds), > 0; RendezvousError with the text ``late``
    once it has passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RendezvousError(late)
    return remaining


def recv_exact(conn: socket.socket, n: int) -> bytes:
    """The next ``n`` bytes from ``conn`` (blocking, under its timeout); EOFError if the peer closes first."""
    parts = bytearray()
    while len(parts) < n:
        chunk = conn.recv(n - len(parts))
        if not chunk:
            raise EOFError("connection closed early")
        parts += chunk
    return bytes(parts)


__all__ = ["DEFAULT_TIMEOUT_S", "RendezvousError", "default_timeout", "exchange"]
