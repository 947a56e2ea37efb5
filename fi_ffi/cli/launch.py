"""``fi-ffi launch --nproc N [--master-addr A] [--master-port P] [--grace S] -- cmd ...``: start N ranks of ``cmd``
on this host with the torchrun variables and NVLink multicast off (:mod:`fi_ffi.comm.launch`); exits with the
worst rank's status."""

from __future__ import annotations

import argparse
import sys

from .arguments import Commands, positive_int
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


def run(args: argparse.Namespace) -> int:
    from ..comm import launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print(
            "fi-ffi launch: expected a command after `--` (fi-ffi launch --nproc 2 -- python app.py)", file=sys.stderr
        )
        return EXIT_USAGE
    return launch.main(args.nproc, command, args.master_addr, args.master_port, args.grace)


def register(commands: Commands) -> None:
    p = commands.add(
        "launch",
        "start N ranks of a command on this host (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set)",
        "Start N ranks of a command on this host, one per GPU, with the variables torchrun sets and NVLink "
        "multicast off. When a rank fails the others are stopped; the failing rank is named and its status "
        "returned.",
        "fi-ffi launch --nproc 2 -- python my_tp_app.py\nfi-ffi launch --nproc 4 --master-port 29500 -- fi-ffi "
        "generate --model ./m --prompt-ids 1,2 --tp 4",
    )
    p.add_argument("--nproc", type=positive_int, required=True, help="number of ranks (one per GPU)")
    p.add_argument("--master-addr", default="127.0.0.1", help="rendezvous address (default 127.0.0.1)")
    p.add_argument("--master-port", type=port, default=None, help="rendezvous port (default: a free one)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL (default 10)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each rank runs")
    p.set_defaults(func=run)


__all__ = ["port", "register", "run"]
