"""The ``fi-ffi`` parser, built from one module per subcommand, and :func:`main`, which runs a command line and
turns what can go wrong into an exit status and one line on stderr."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from . import cache, doctor, fetch, generate, launch, listing, lock, smoke_command
from .arguments import Commands, parse
from .output import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, WatchedStdout, silence_stdout, stdout_gone

# in the order `fi-ffi --help` lists them
SUBCOMMANDS = tuple(module.COMMAND for module in (doctor, fetch, cache, lock, listing, smoke_command, generate, launch))


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # -q/-v before or after the subcommand
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or progress lines"
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log what the loader does to stderr (-vv: debug detail)",
    )
    parser = argparse.ArgumentParser(
        prog="fi-ffi",
        description="FlashInfer kernels over TVM-FFI, from Python: set up, inspect and check them.",
        epilog="Run `fi-ffi COMMAND --help` for a command's options and examples. Exit status: 0 success, 1 a check "
        "failed, 2 a usage or fi_ffi error.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"fi-ffi {__version__}")
    commands = Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), common)
    for subcommand in SUBCOMMANDS:
        commands.add(subcommand)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit status (0 ok, 1 check failed, 2 usage or fi_ffi error).

    Output piped into a reader that stops early (``fi-ffi list | head``) ends the command quietly with status
    141, as for other Unix tools; Ctrl-C ends it with 130, without a traceback. Output that cannot be written
    (``fi-ffi doctor > /dev/full``) ends it with one line on stderr and 2.
    """
    watched = WatchedStdout(sys.stdout)
    sys.stdout = watched  # type: ignore[assignment]  # a write error on it is told from the command's own
    try:
        return _main(argv, watched)
    finally:
        if sys.stdout is watched:
            sys.stdout = watched.stream


def _main(argv: Sequence[str] | None, watched: WatchedStdout) -> int:
    from ..errors import FiFFIError

    command = "fi-ffi"
    try:
        try:
            args = parse(build_parser(), argv)
        except SystemExit as exc:  # --help, --version, usage errors: argparse printed and asked to exit
            sys.stdout.flush()
            if watched.error is not None:  # argparse swallows a failed write of --help: raise it again here
                raise watched.error from None
            return EXIT_OK if exc.code is None else exc.code if isinstance(exc.code, int) else EXIT_USAGE
        command = f"fi-ffi {args.command}"
        apply_verbosity(getattr(args, "quiet", False), getattr(args, "verbose", 0))
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return status
    except FiFFIError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        if not stdout_gone():
            raise  # a pipe of our own (a download, pip): a real error, not the reader of our output leaving
        silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if not watched.failed:
            raise  # not our output: a real error of the command's own
        silence_stdout()
        print(
            f"{command}: cannot write the output to stdout: {exc.strerror or exc}; send it to a file or device "
            f"with room (is the disk full?)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def apply_verbosity(quiet: bool, verbose: int) -> None:
    """``-q``: no progress bars or ``fi_ffi:`` progress lines (``FI_FFI_QUIET=1`` for this process and the ranks
    or children it starts); ``-v``/``-vv``: the loader's log at INFO/DEBUG on stderr."""
    import logging
    import os

    if quiet:
        os.environ["FI_FFI_QUIET"] = "1"
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fi_ffi: %(message)s"))
        logger = logging.getLogger("fi_ffi")
        logger.addHandler(handler)  # a handler of our own: announce() then prints nothing twice
        logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


__all__ = ["SUBCOMMANDS", "apply_verbosity", "build_parser", "main"]


if __name__ == "__main__":
    sys.exit(main())
