"""``fi-ffi generate ...``: the old spelling of ``fi-engine generate``, which now owns the command.

Serving a checkpoint is the engine's job (:mod:`fi_engine`, beside this package; fi_ffi never imports it), so this
subcommand parses nothing itself: it says once on stderr that the command moved, runs ``python -m fi_engine
generate`` with every argument as given (``--help`` included) in a child process that reads this process's
stdin and writes to its stdout and stderr, and exits with the child's status. Where the engine is not installed,
it says how to install it and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any

from .arguments import Passthrough
from .output import EXIT_USAGE

ENGINE_MODULE = "fi_engine"
NOTICE = "fi-ffi generate is deprecated: run `fi-engine generate` (python -m fi_engine generate), the same options"
NOT_INSTALLED = (
    "fi-ffi generate: the engine (fi_engine) is not installed; install it with `python -m pip install '.[engine]'` "
    "in the fi_ffi checkout, then run `fi-engine generate`"
)


def engine_command(arguments: list[str]) -> list[str]:
    """The command line that answers ``fi-ffi generate ARGUMENTS``: this interpreter, ``-m fi_engine generate``."""
    return [sys.executable, "-m", ENGINE_MODULE, "generate", *arguments]


def _descriptor(stream: IO[str]) -> int | None:
    """The file descriptor behind ``stream``, or None where it has none (an ``io.StringIO``, pytest's capture)."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def run(args: argparse.Namespace) -> int:
    import importlib.util
    import subprocess

    if importlib.util.find_spec(ENGINE_MODULE) is None:  # looks on sys.path; imports nothing
        print(NOT_INSTALLED, file=sys.stderr)
        return EXIT_USAGE
    print(NOTICE, file=sys.stderr)
    sys.stdout.flush()  # what this process wrote comes before what the child writes
    sys.stderr.flush()
    # The child writes straight to our stdout/stderr (progress lines stay live); a stream with no descriptor gets
    # the child's output once it has ended, so that in-process callers that replaced sys.stdout still see it.
    out, err = _descriptor(sys.stdout), _descriptor(sys.stderr)
    done: subprocess.CompletedProcess[Any] = subprocess.run(
        engine_command(list(args.arguments)),
        stdout=subprocess.PIPE if out is None else out,
        stderr=subprocess.PIPE if err is None else err,
    )
    if out is None:
        sys.stdout.write(done.stdout.decode(errors="replace"))
    if err is None:
        sys.stderr.write(done.stderr.decode(errors="replace"))
    # a child ended by a signal (returncode -N) exits as a shell reports it: 128 + N
    return 128 - done.returncode if done.returncode < 0 else done.returncode


COMMAND = Passthrough(name="generate", summary="serve token-id prompts (moved: `fi-engine generate`)", run=run)


__all__ = ["COMMAND", "NOTICE", "NOT_INSTALLED", "engine_command", "run"]
