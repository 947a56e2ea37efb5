"""``fi-ffi --help`` and every subcommand's ``--help`` stay the text recorded in ``tests/cli/help/NAME.txt``
(``fi-ffi.txt``: the top level), rendered at 100 columns: the argument tables of the subcommand modules are turned
into argparse calls by one shared function, and a change to it, or to a table, must not change what users read
without the recording changing with it in the same commit.

argparse's layout differs between Python releases, so the text is compared on the release it was recorded with
(:data:`RECORDED_ON`). After changing a help text on purpose, record it again with
``COLUMNS=100 python -m fi_ffi NAME --help > tests/cli/help/NAME.txt`` (no NAME for ``fi-ffi.txt``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from fi_ffi.cli.main import build_parser

HELP = Path(__file__).parent / "help"
RECORDED_ON = (3, 11)
# `generate` parses nothing: its --help is fi-engine's (tests/cli/test_generate_forwarder.py)
RECORDED = ("fi-ffi", "doctor", "fetch", "cache", "lock", "list", "smoke", "launch")


def help_text(name: str) -> str:
    """What ``fi-ffi NAME --help`` prints (``fi-ffi --help`` for ``name == "fi-ffi"``)."""
    parser = build_parser()
    if name == "fi-ffi":
        return parser.format_help()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices[name].format_help()


@pytest.mark.skipif(
    sys.version_info[:2] != RECORDED_ON,
    reason=f"the help texts were recorded with Python {RECORDED_ON[0]}.{RECORDED_ON[1]}, whose argparse layout "
    "other releases do not keep",
)
@pytest.mark.parametrize("name", RECORDED)
def test_help_is_the_recorded_text(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps at the terminal's width, read from COLUMNS first
    assert help_text(name) == (HELP / f"{name}.txt").read_text()


def test_every_subcommand_with_help_of_its_own_is_recorded() -> None:
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    own_help = {name for name, parser in subparsers.choices.items() if parser.add_help}
    assert own_help == set(RECORDED) - {"fi-ffi"}
    assert {p.stem for p in HELP.glob("*.txt")} == set(RECORDED)
