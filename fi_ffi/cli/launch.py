"""``fi-ffi launch --nproc N [--master-addr A] [--master-port P] [--grace S] [--allow-oversubscribe] -- cmd ...``:
start N ranks of ``cmd`` on this host with the torchrun variables and NVLink multicast off
(:mod:`fi_ffi.comm.launch`); exits with the worst rank's status. Before any rank starts, ``--master-addr`` must
resolve and ``--nproc`` be at most the GPUs visible (4 per CPU core without a GPU) unless ``--allow-oversubscribe``."""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys

from .arguments import Argument, Subcommand, positive_int
from .output import EXIT_USAGE


def port(text: str) -> int:
    """argparse type of ``--master-port``: a TCP port, 1..65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1..65535), got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1..65535), got {value}")
    return value


def grace(text: str) -> float:
    """argparse type of ``--grace``: seconds >= 0 (``inf``: never SIGKILL)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0 (e.g. 10), got {text!r}") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0 (e.g. 10), got {text}")
    return value


def resolve(addr: str) -> str | None:
    """Why ``--master-addr`` ``addr`` cannot be used (its name does not resolve), or None if it can."""
    try:
        socket.getaddrinfo(addr, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        return str(exc)
    return None


def rank_limit() -> tuple[int, str]:
    """The most ranks ``--nproc`` may ask for without ``--allow-oversubscribe``, and where that number comes from:
    the GPUs visible (one rank per GPU), or, where none is seen (no driver, no GPU), 4 per CPU core."""
    from ..comm.cuda import device_count

    gpus = device_count()
    if gpus > 0:
        return gpus, f"the {gpus} GPU{'s' if gpus != 1 else ''} visible (one rank per GPU)"
    cores = os.cpu_count() or 1
    return 4 * cores, f"4 per CPU core on this machine without a visible GPU ({cores} cores)"


def run(args: argparse.Namespace) -> int:
    from ..comm import launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print(
            "fi-ffi launch: expected a command after `--` (fi-ffi launch --nproc 2 -- python app.py)", file=sys.stderr
        )
        return EXIT_USAGE
    problem = resolve(args.master_addr)
    if problem is not None:  # before any rank starts: free_port and every rank's rendezvous would fail on it
        print(
            f"fi-ffi launch: --master-addr {args.master_addr!r}: expected a host name or address of this host "
            f"that resolves ({problem}); use an IP address such as 127.0.0.1",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not args.allow_oversubscribe:
        limit, source = rank_limit()
        if args.nproc > limit:
            print(
                f"fi-ffi launch: --nproc {args.nproc}: expected at most {limit}, {source}; ask for fewer ranks, "
                f"or pass --allow-oversubscribe to start them anyway",
                file=sys.stderr,
            )
            return EXIT_USAGE
    return launch.main(args.nproc, command, args.master_addr, args.master_port, args.grace)


COMMAND = Subcommand(
    name="launch",
    summary="start N ranks of a command on this host (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set)",
    description="Start N ranks of a command on this host, one per GPU, with the variables torchrun sets and NVLink "
    "multicast off. When a rank fails the others are stopped; the failing rank is named and its status returned.",
    examples="fi-ffi launch --nproc 2 -- python my_tp_app.py\nfi-ffi launch --nproc 4 --master-port 29500 -- "
    "fi-engine generate --model ./m --prompt-ids 1,2 --tp 4",
    arguments=(
        Argument("--nproc", type=positive_int, required=True, help="number of ranks (one per GPU)"),
        Argument("--master-addr", default="127.0.0.1", help="rendezvous address (default 127.0.0.1)"),
        Argument("--master-port", type=port, help="rendezvous port (default: a free one)"),
        Argument("--grace", type=grace, default=10.0, help="seconds between SIGTERM and SIGKILL (default 10)"),
        Argument(
            "--allow-oversubscribe",
            action="store_true",
            help="start --nproc ranks even when that is more than the GPUs visible (or, without a GPU, 4 per CPU core)",
        ),
        Argument("command", nargs=argparse.REMAINDER, help="-- then the command each rank runs"),
    ),
    run=run,
)


__all__ = ["COMMAND", "grace", "port", "rank_limit", "resolve", "run"]
