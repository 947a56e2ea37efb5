"""How every ``fi-ffi`` subcommand writes its result: JSON or text on stdout, and the exit statuses.

A subcommand returns one of the ``EXIT_*`` statuses; :func:`fi_ffi.cli.main.main` adds 130 (interrupted) and 141
(the output's reader closed the pipe, as in ``fi-ffi list | head``), which end the command without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # smoke, cache verify/clear, list matching nothing
EXIT_USAGE = 2  # a usage error or an fi_ffi error: one message on stderr, no traceback
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away


def write_json(data: Any) -> None:
    """``data`` as indented JSON on stdout, then a newline (values JSON has no type for, such as paths, as text)."""
    json.dump(data, sys.stdout, indent=2, default=str)
    print()


def emit(args: argparse.Namespace, data: Any, table: Callable[[], None]) -> None:
    """``--json``: ``data`` as JSON on stdout; else ``table()`` prints the human form."""
    if getattr(args, "json", False):
        write_json(data)
    else:
        table()


def size_text(n: int) -> str:
    """``n`` bytes for a reader: ``812 B``, ``4.0 KiB``, ``1.2 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def stdout_gone() -> bool:
    """Whether standard output is a pipe whose reading end is closed."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor to ask: stdout is the pipe we write to
        return True


class WatchedStdout:
    """Standard output that remembers whether a write to it failed (``> /dev/full``, a full disk), so that
    :func:`fi_ffi.cli.main.main` tells that failure from an ``OSError`` of the command's own work."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.error: OSError | None = None  # the first failed write (argparse's --help swallows it: kept here)

    @property
    def failed(self) -> bool:
        return self.error is not None

    def write(self, text: str) -> int:
        try:
            return int(self.stream.write(text))
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def silence_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_CHECK_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "WatchedStdout",
    "emit",
    "silence_stdout",
    "size_text",
    "stdout_gone",
    "write_json",
]
