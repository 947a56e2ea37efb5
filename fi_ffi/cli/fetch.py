"""``fi-ffi fetch [--wheel PATH ...] [--all] [--json]``: fill the cache from the lock (wheelhouse, the lock's path,
download) or from local wheels the lock pins; prints each path."""

from __future__ import annotations

import argparse

from .arguments import Argument, Subcommand
from .output import EXIT_OK, write_json


def run(args: argparse.Namespace) -> int:
    from .. import loader

    paths = []
    if args.wheel:
        for wheel in args.wheel:
            paths += loader.fetch(wheel)
    else:
        paths = loader.fetch(all_entries=args.all)
    if args.json:
        write_json([str(p) for p in paths])
        return EXIT_OK
    for path in paths:
        print(path)
    return EXIT_OK


COMMAND = Subcommand(
    name="fetch",
    summary="fill the cache from the lock, the wheelhouse or local wheels",
    description="Put the wheels the lock selects for this machine into the cache (from FI_FFI_WHEELHOUSE, the "
    "lock's path, or a download), sha256-verified; or copy local wheels the lock pins (--wheel). Prints each path.",
    examples="fi-ffi fetch\nfi-ffi fetch --all\nfi-ffi fetch --wheel ./flashinfer_jit_cache-0.6.3+cu130-cp39-abi3-"
    "manylinux_2_28_x86_64.whl",
    arguments=(
        Argument("--wheel", action="append", help="a local wheel pinned by the lock (repeatable)"),
        Argument("--all", action="store_true", help="every wheel in the lock, all architectures"),
        Argument("--json", action="store_true", help="the paths as a JSON list"),
    ),
    run=run,
)


__all__ = ["COMMAND", "run"]
