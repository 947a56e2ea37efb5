"""``fi-ffi launch --nproc N -- cmd ...``: start N ranks of ``cmd`` on this host, one process per GPU.

Each rank gets the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``; so :func:`fi_ffi.comm.Communicator.from_env` and torch's ``env://`` both work)
plus the three that keep NVLink multicast off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
``NVSHMEM_DISABLE_NVLS=1``). Without ``--master-port`` a free port of this host is picked.

Every rank runs in a process group of its own. SIGINT, SIGTERM and SIGHUP sent to the launcher are forwarded to
every rank, once (ranks still running ``--grace`` seconds later get SIGKILL). When a rank fails (non-zero exit or a
signal), the others are sent SIGTERM, then SIGKILL after ``--grace`` seconds. The exit status is the worst one among
the ranks that ended by themselves (a signal ``s`` counts as ``128 + s``); ranks the launcher stopped do not count. 0
only when every rank exited 0.

The launcher says on stderr which rank failed first and how (``fi-ffi launch: rank 1 (pid 4242) was killed by
signal 9 (SIGKILL); stopping the other ranks``). Ranks that exited with
:data:`~fi_ffi.comm.watchdog.PEER_LOST_EXIT_CODE` only learnt of that failure (their communicator's watchdog) and
are named as such, never as the cause, and their status counts only when no rank failed by itself.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from types import FrameType

from .watchdog import PEER_LOST_EXIT_CODE

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_CAUSE_WAIT_S = 3.0  # how long ranks that only lost a peer wait for that peer's own end to show


# Where free_port looks first: the ports below the system's ephemeral range from here up
_FIRST_PICKED_PORT = 20000
_PORT_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port that nothing on this host listens on right now, for rank 0 to listen on at every address.

    Where the system says which ports it hands out itself (Linux: ``/proc/sys/net/ipv4/ip_local_port_range``, to
    outgoing connections and binds of port 0), the port is one below that range, picked at random: only a program
    that asks for such a port by number can take it before rank 0 listens on it. A port of that range can be taken
    by any connection made in between (on two H200s, once: rank 0 then failed with "Address already in use").
    Each pick is checked as rank 0 binds it, on every address of the host. Elsewhere, or when none of 32 picks is
    free, the system's choice of port 0 on ``addr`` (an IPv4 address of this host).

    Raises:
        TypeError: ``addr`` is no string.
        ValueError: ``addr`` cannot be bound here (the text names it and the system's reason).
    """
    if not isinstance(addr, str):
        raise TypeError(f"addr: expected an IPv4 address of this host such as '127.0.0.1', got {type(addr).__name__}")
    floor = _ephemeral_floor(_PORT_RANGE_FILE)
    if floor > _FIRST_PICKED_PORT:
        pick = random.SystemRandom()
        for _ in range(32):
            port = pick.randrange(_FIRST_PICKED_PORT, floor)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("", port))  # as rank 0 listens (rendezvous): a listener on any one address counts
                except OSError:
                    continue  # in use (or not ours to bind): another
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, 0))
        except (OSError, TypeError, ValueError, UnicodeError) as exc:  # (a NUL: TypeError; an unencodable name)
            why = getattr(exc, "strerror", None) or exc
            raise ValueError(
                f"addr: cannot bind {addr!r} here ({why}); give an address of this host such as 127.0.0.1"
            ) from None
        return int(s.getsockname()[1])


def _ephemeral_floor(path: str) -> int:
    """The first port of the system's ephemeral range as ``path`` states it (two numbers); 0 where it cannot be
    read or is no such range."""
    try:
        with open(path, encoding="ascii") as f:
            first, last = (int(word) for word in f.read().split())
    except (OSError, ValueError, UnicodeDecodeError):
        return 0
    return first if 0 < first <= last <= 65535 else 0


def rank_env(base: Mapping[str, str], rank: int, nproc: int, master_addr: str, master_port: int) -> dict[str, str]:
    """The environment of rank ``rank`` of ``nproc`` on this host (see the module docstring)."""
    env = dict(base)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        **MULTICAST_OFF,
    )
    return env


def _status(code: int) -> int:
    return 128 - code if code < 0 else code  # Popen: -s for a signal s


def describe_exit(code: int) -> str:
    """A rank's end in words, from a Popen return code (``-s``: signal ``s``)."""
    if isinstance(code, bool) or not isinstance(code, int):
        raise TypeError(f"code: expected a process return code (an int), got {type(code).__name__}")
    if not -(1 << 31) <= code < 1 << 32:
        raise ValueError(f"code: expected a process return code in [-2**31, 2**32), got {str(code)[:40]}")
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {-code} ({name})"
    if code == PEER_LOST_EXIT_CODE:
        return f"exited with status {code} (it lost a peer rank)"
    return f"exited with status {code}"


def _report(procs: Sequence[subprocess.Popen[bytes]], codes: Sequence[int | None], stopped: set[int]) -> None:
    """Name the failed ranks: those that failed by themselves, not those that only lost a peer (if any did)."""
    failed = [i for i, c in enumerate(codes) if c not in (None, 0) and i not in stopped]
    causes = [i for i in failed if codes[i] != PEER_LOST_EXIT_CODE] or failed
    for i in causes:
        code = codes[i]
        assert code is not None
        print(
            f"fi-ffi launch: rank {i} (pid {procs[i].pid}) {describe_exit(code)}; stopping the other ranks",
            file=sys.stderr,
            flush=True,
        )


def launch(
    command: Sequence[str],
    nproc: int,
    *,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    grace: float = 10.0,
    poll: float = 0.05,
) -> int:
    """Run ``command`` as ``nproc`` ranks; returns the exit status described in the module docstring.

    Raises:
        ValueError: ``nproc`` < 1, an empty command or a bad port.
        FileNotFoundError: the command does not exist (nothing was started).
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc: expected an int >= 1, got {nproc!r}")
    if not command:
        raise ValueError("command: expected a command after `--` (e.g. fi-ffi launch --nproc 2 -- python app.py)")
    port = free_port(master_addr) if master_port is None else master_port
    if not 1 <= port <= 65535:
        raise ValueError(f"master_port: expected 1..65535, got {port}")
    procs: list[subprocess.Popen[bytes]] = []
    stopped: set[int] = set()  # ranks the launcher signalled (their status is a consequence, not a cause)
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        for i, p in enumerate(procs):
            if p.poll() is None:
                stopped.add(i)
                _signal_group(p, signum)

    previous = {s: signal.signal(s, forward) for s in _FORWARDED}
    try:
        try:
            for rank in range(nproc):
                procs.append(
                    subprocess.Popen(
                        list(command), env=rank_env(os.environ, rank, nproc, master_addr, port), start_new_session=True
                    )
                )
        except OSError:
            _stop(procs, stopped, grace, poll)
            raise
        failed_at: float | None = None
        killed: set[int] = set()
        reported = False
        lost_since: float | None = None
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0) and i not in stopped]
            own_failure = bool(failed)
            if failed and all(codes[i] == PEER_LOST_EXIT_CODE for i in failed) and None in codes:
                # only ranks that lost a peer so far: the peer is ending too; give it a moment to be seen as the
                # cause (its status and name) before the others are stopped
                lost_since = time.monotonic() if lost_since is None else lost_since
                own_failure = time.monotonic() - lost_since > min(grace, _CAUSE_WAIT_S)
            if own_failure and not reported:  # even when every rank is already gone
                reported = True
                _report(procs, codes, stopped)
            if all(c is not None for c in codes):
                break
            if (own_failure or received) and failed_at is None:
                failed_at = time.monotonic()
                # a received signal reached every rank already (forward): a SIGTERM after it would interrupt a rank's
                # own handling of it (a rank saving its state on SIGINT, or still in its SIGTERM handler)
                for i, p in enumerate(procs):
                    if p.poll() is None and not received:
                        stopped.add(i)
                        _signal_group(p, signal.SIGTERM)
            if failed_at is not None and time.monotonic() - failed_at > grace:
                for i, p in enumerate(procs):
                    if p.poll() is None and i not in killed:
                        killed.add(i)
                        print(
                            f"fi-ffi launch: rank {i} (pid {p.pid}) did not stop within --grace {grace:g} s; SIGKILL",
                            file=sys.stderr,
                            flush=True,
                        )
                        _signal_group(p, signal.SIGKILL)
            time.sleep(poll)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    own = [_status(p.returncode) for i, p in enumerate(procs) if i not in stopped]
    causes = [c for c in own if c not in (0, PEER_LOST_EXIT_CODE)]  # a survivor's 75 is a consequence
    worst = max(causes or own, default=0)
    if worst == 0 and received:
        return 128 + received[0]
    if worst == 0 and any(p.returncode for p in procs):
        return max(_status(p.returncode) for p in procs)
    return worst


def _signal_group(p: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(p.pid, signum)  # the rank and whatever it started (its own process group)


def _stop(procs: list[subprocess.Popen[bytes]], stopped: set[int], grace: float, poll: float) -> None:
    for i, p in enumerate(procs):
        stopped.add(i)
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(poll)
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def main(nproc: int, command: Sequence[str], master_addr: str, master_port: int | None, grace: float) -> int:
    """The CLI's entry (see :mod:`fi_ffi.cli`)."""
    try:
        return launch(command, nproc, master_addr=master_addr, master_port=master_port, grace=grace)
    except FileNotFoundError as exc:
        print(f"fi-ffi launch: {exc.filename or command[0]}: command not found", file=sys.stderr)
        return 127
    except PermissionError as exc:
        print(f"fi-ffi launch: {exc.filename or command[0]}: not executable", file=sys.stderr)
        return 126
    except OSError as exc:  # no more processes (fork), an address of another host: nothing is left running
        print(
            f"fi-ffi launch: could not start the ranks: {exc}; ask for fewer ranks or check --master-addr",
            file=sys.stderr,
        )
        return 2


__all__ = ["MULTICAST_OFF", "describe_exit", "free_port", "launch", "main", "rank_env"]
