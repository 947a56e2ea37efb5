"""``fi-ffi cache {path,list [--full],verify [--full],clear} [--json]``: inspect and repair the cache.

Every action refuses a loader variable set to a value fi_ffi would refuse (``FI_FFI_CACHE_DIR`` naming what cannot
be a cache) with the message ``fetch`` and ``list`` give, before it looks at the cache.

``verify`` removes damaged files of fi_ffi's and reports others (exit 1 if any is bad); ``clear`` removes what
fi_ffi created (exit 1 if some of it could not be removed).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .arguments import Argument, Subcommand
from .output import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, emit, size_text

if TYPE_CHECKING:  # the loader is imported when a command runs, not when the parser is built
    from ..loader import ClearReport, VerifyReport


def run(args: argparse.Namespace) -> int:
    from .. import loader

    if args.full and args.action in ("path", "clear"):  # accepted by the parser for list/verify only: say so
        print(
            f"fi-ffi cache {args.action}: --full applies to list and verify only (clear already removes everything "
            f"fi_ffi created, downloaded wheels included)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.action == "path":
        from ..loader import settings

        settings.snapshot()  # a value that cannot be a cache is refused here too, as by the other actions
        emit(args, {"path": str(loader.cache_root())}, lambda: print(loader.cache_root()))
    elif args.action == "list":
        entries = loader.list_cache()
        rows = [{"kind": e.kind, "path": str(e.path), "size": e.size, "detail": e.detail} for e in entries]
        contents = [_files(e.path) if args.full else [] for e in entries]
        if args.full:  # every file of each entry, with its size in bytes
            for row, files in zip(rows, contents, strict=True):
                row["files"] = _path_rows(files, "size")

        def table() -> None:
            if not entries:
                print(f"the cache {loader.cache_root()} is empty")
                return
            print(f"{'KIND':9s} {'SIZE':>10s}  PATH  DETAIL")
            for entry, files in zip(entries, contents, strict=True):
                size = f"{entry.size} B" if args.full else size_text(entry.size)
                print(f"{entry.kind:9s} {size:>10s}  {entry.path}  {entry.detail}")
                for path, n in files:
                    print(f"{'':9s} {f'{n} B':>10s}    {path}")

        emit(args, rows, table)
    elif args.action == "verify":
        try:
            report = loader.verify_cache(full=args.full)
        except OSError as exc:  # verify reports what it finds; this is the cache root itself failing
            print(f"fi-ffi cache verify: cannot read the cache {loader.cache_root()}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        kept = dict(report.kept)
        data = {
            "checked": report.checked,
            "bad": [{"path": str(p), "problem": why, "removed": p not in kept} for p, why in report.bad],
            "kept": _path_rows(report.kept, "why"),
            "removed_tmp": report.removed_tmp,
            "read_only": report.read_only,
        }
        emit(args, data, lambda: _print_verified(report))
        return EXIT_OK if report.ok else EXIT_CHECK_FAILED
    elif args.action == "clear":
        cleared = loader.clear_cache()
        data = {
            "removed": _path_rows(cleared.removed, "size"),
            "kept": _path_rows(cleared.kept, "why"),
            "failed": _path_rows(cleared.failed, "why"),
            "freed": cleared.freed,
        }
        emit(args, data, lambda: _print_cleared(cleared))
        return EXIT_CHECK_FAILED if cleared.failed else EXIT_OK
    return EXIT_OK


def _path_rows(pairs: Iterable[tuple[Path, object]], key: str) -> list[dict[str, object]]:
    """``--json``: each (path, value) pair of a report as ``{"path": "...", key: value}``."""
    return [{"path": str(path), key: value} for path, value in pairs]


def _print_verified(report: VerifyReport) -> None:
    """``verify`` for a reader: each bad file, removed or left in place, and a summary line."""
    kept = dict(report.kept)
    for path, problem in report.bad:
        print(f"{'kept' if path in kept else 'removed'} {path}: {problem}")
    for path, why in report.kept:
        print(f"  left in place: {path}: {why}")
    left = sum(path in kept for path, _ in report.bad)
    if report.read_only:
        action = "found, nothing changed: the cache is read-only"
    elif left:
        action = f"{len(report.bad) - left} removed (fetched or extracted again on next use), {left} left in place"
    else:
        action = "removed; fetched or extracted again on next use"
    print(
        f"checked {report.checked} files, {len(report.bad)} bad ({action}), {report.removed_tmp} "
        f"temporary files of dead processes removed"
    )


def _print_cleared(cleared: ClearReport) -> None:
    """``clear`` for a reader: each entry removed or kept and a summary line; on stderr, what could not be
    removed."""
    from .. import loader

    for path, size in cleared.removed:
        print(f"removed {path} ({size / 2**20:.1f} MiB)")
    for path, why in cleared.kept:
        print(f"kept    {path}: {why}")
    if cleared.removed:
        summary = (
            f"freed {cleared.freed / 2**20:.1f} MiB in {loader.cache_root()}; removed {len(cleared.removed)} "
            f"entries fi_ffi created"
        )
    else:
        summary = f"nothing removed from {loader.cache_root()}"
    print(f"{summary}, kept {len(cleared.kept)}")
    if cleared.failed:
        print(
            f"fi-ffi cache clear: could not remove {len(cleared.failed)} of fi_ffi's files (listed above as "
            f"'could not remove it'); is the cache read-only, or another user's?",
            file=sys.stderr,
        )


def _files(path: Path) -> list[tuple[Path, int]]:
    """``list --full``: the files under the folder ``path`` (none for a file), with their sizes in bytes."""
    if not path.is_dir():
        return []
    out: list[tuple[Path, int]] = []
    for f in sorted(path.rglob("*")):
        with contextlib.suppress(OSError):  # gone or unreadable since the listing: left out
            if f.is_file():
                out.append((f, f.stat().st_size))
    return out


COMMAND = Subcommand(
    name="cache",
    summary="path, list, verify or clear the cache",
    description="path: print the cache folder. list: what it holds (--full: every file of each entry, sizes in "
    "bytes). verify: check every file (--full: re-hash all, and the wheels the lock pins outside the cache); damaged "
    "files of fi_ffi's are removed, others reported; exit 1 if any is bad. clear: remove what fi_ffi created "
    "(downloaded wheels, extracted modules, listings, stamps, free locks; anything else in the folder is kept "
    "and named); exit 1 if some of it could not be removed.",
    examples="fi-ffi cache path\nfi-ffi cache list --json\nfi-ffi cache verify --full\nfi-ffi cache clear",
    arguments=(
        Argument("action", choices=["path", "list", "verify", "clear"], help="what to do"),
        Argument(
            "--full",
            action="store_true",
            help="verify: re-hash every file; list: every file of each entry, sizes in bytes",
        ),
        Argument("--json", action="store_true", help="machine-readable output"),
    ),
    run=run,
)


__all__ = ["COMMAND", "run"]
