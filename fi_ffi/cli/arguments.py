"""How ``fi-ffi``'s subcommands are declared: :class:`Commands` adds one with its help, examples and the common
``-q``/``-v`` options; the value types shared by several subcommands turn a bad value into a usage error (exit 2)
that names what was expected."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence


class Commands:
    """The subcommands of one ``fi-ffi`` parser: each subcommand module adds its own with :meth:`add`.

    ``common`` is the parser of the options every subcommand takes (``-q``/``-v``, before or after its name).
    """

    def __init__(
        self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
    ):
        self.subparsers = subparsers
        self.common = common

    def add(self, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
        """A subcommand ``name``: ``summary`` in ``fi-ffi --help``; ``description`` (wrapped at 100 columns) and
        ``examples`` (one command a line) in ``fi-ffi NAME --help``."""
        parser = self.subparsers.add_parser(
            name,
            help=summary,
            description=textwrap.fill(description, 100),
            epilog="examples:\n" + "\n".join(f"  {line}" for line in examples.strip().splitlines()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[self.common],
        )
        parser.set_defaults(subparser=parser)  # its usage, not fi-ffi's, for an argument it does not know (parse)
        return parser

    def add_passthrough(self, name: str, summary: str) -> argparse.ArgumentParser:
        """A subcommand ``name`` that parses nothing itself: every argument after its name, options and ``--help``
        included, lands in ``args.arguments`` as given (for a command that another program answers)."""
        # No prefix character can start an argument (argv holds no NUL), so argparse reads every word as
        # positional and none as an option it must know: a REMAINDER alone still stops at a first word like --model.
        parser = self.subparsers.add_parser(name, help=summary, add_help=False, prefix_chars="\0")
        parser.add_argument("arguments", nargs=argparse.REMAINDER)
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


__all__ = ["Commands", "int_at_least", "ordinal", "parse", "positive_int"]
