"""How ``fi-ffi``'s subcommands are declared: each subcommand module states its command as data (a
:class:`Subcommand`: name, help, examples, a table of :class:`Argument` rows, the function that runs it) and
:class:`Commands` turns every declaration into argparse calls, adding the common ``-q``/``-v`` options; the value
types shared by several subcommands turn a bad value into a usage error (exit 2) that names what was expected."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Run = Callable[[argparse.Namespace], int]
"""What runs a parsed subcommand: its arguments in, its exit status out."""


@dataclass(frozen=True)
class Argument:
    """One row of a subcommand's argument table: what ``parser.add_argument`` is given for it.

    ``name`` is a positional's name (``"wheels"``) or an option's flag (``"--json"``); every other field left at
    ``None`` is not passed, so argparse's own default for it holds (``store_true`` defaults to False).
    """

    name: str
    help: str
    action: str | None = None
    type: Callable[[str], Any] | None = None
    default: Any = None
    choices: Sequence[str] | None = None
    metavar: str | None = None
    nargs: str | None = None
    required: bool | None = None

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """``parser.add_argument`` of this row."""
        fields = ("action", "type", "default", "choices", "metavar", "nargs", "required")
        given = {field: getattr(self, field) for field in fields if getattr(self, field) is not None}
        parser.add_argument(self.name, help=self.help, **given)


@dataclass(frozen=True)
class Subcommand:
    """A subcommand as data: ``summary`` in ``fi-ffi --help``; ``description`` (wrapped at 100 columns),
    ``arguments`` (in the order ``--help`` lists them) and ``examples`` (one command a line) in
    ``fi-ffi NAME --help``; ``run`` answers it."""

    name: str
    summary: str
    description: str
    examples: str
    arguments: tuple[Argument, ...]
    run: Run


@dataclass(frozen=True)
class Passthrough:
    """A subcommand that parses nothing itself: every argument after its name, options and ``--help`` included,
    reaches ``run`` in ``args.arguments`` as given (for a command that another program answers)."""

    name: str
    summary: str
    run: Run


class Commands:
    """The subcommands of one ``fi-ffi`` parser: each subcommand module adds its own with :meth:`add`.

    ``common`` is the parser of the options every subcommand takes (``-q``/``-v``, before or after its name).
    """

    def __init__(
        self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
    ):
        self.subparsers = subparsers
        self.common = common

    def add(self, command: Subcommand | Passthrough) -> argparse.ArgumentParser:
        """Add the subcommand ``command`` declares; returns its parser."""
        if isinstance(command, Passthrough):
            return self._add_passthrough(command)
        parser = self.subparsers.add_parser(
            command.name,
            help=command.summary,
            description=textwrap.fill(command.description, 100),
            epilog="examples:\n" + "\n".join(f"  {line}" for line in command.examples.strip().splitlines()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[self.common],
        )
        for argument in command.arguments:
            argument.add_to(parser)
        # subparser: its usage, not fi-ffi's, for an argument it does not know (parse)
        parser.set_defaults(func=command.run, subparser=parser)
        return parser

    def _add_passthrough(self, command: Passthrough) -> argparse.ArgumentParser:
        # No prefix character can start an argument (argv holds no NUL), so argparse reads every word as
        # positional and none as an option it must know: a REMAINDER alone still stops at a first word like --model.
        parser = self.subparsers.add_parser(command.name, help=command.summary, add_help=False, prefix_chars="\0")
        parser.add_argument("arguments", nargs=argparse.REMAINDER)
        parser.set_defaults(func=command.run)
        return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that an argument the subcommand given does not know is refused with that
    subcommand's usage (``fi-ffi fetch --bogus``), not the top-level one, which names none of its options (argparse
    hands a subcommand's unknown arguments back to the top-level parser)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        getattr(args, "subparser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def int_at_least(text: str, lowest: int, what: str) -> int:
    """``text`` as an int >= ``lowest`` for argparse; ``what`` describes it in the error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type of a count >= 1 (``--nproc``, ``--head-dim``)."""
    return int_at_least(text, 1, "a positive integer")


def ordinal(text: str) -> int:
    """argparse type of ``--device``: a CUDA device ordinal >= 0 (whether the GPU exists is checked later)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a CUDA device ordinal (0, 1, ...), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a CUDA device ordinal (0, 1, ...), got {value}")
    return value


__all__ = [
    "Argument",
    "Commands",
    "Passthrough",
    "Run",
    "Subcommand",
    "int_at_least",
    "ordinal",
    "parse",
    "positive_int",
]
