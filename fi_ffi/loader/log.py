"""The loader's log: what it fetches (from where, how big), waits on locks, repairs it makes in the cache.

Messages go to the ``fi_ffi.loader`` logger, a child of ``fi_ffi``. An application that configured
:mod:`logging` sees them through its own handlers (INFO for progress, WARNING for repairs). When nothing is
configured (no handler between this logger and the root), :func:`announce` also writes its INFO messages to
stderr, prefixed ``fi_ffi:``: a start that downloads 1-2 GB or waits on another process must say so in a CI
log too, where stderr is not a terminal and no progress bar is drawn. ``FI_FFI_QUIET`` mutes that fallback
(WARNING and above still reach stderr through :data:`logging.lastResort`, as for any library).
"""

from __future__ import annotations

import logging
import sys

from . import settings

logger = logging.getLogger("fi_ffi.loader")


def announce(message: str, level: int = logging.INFO) -> None:
    """Log ``message`` at ``level``; with no logging configured, also print an INFO message to stderr."""
    logger.log(level, message)
    if level < logging.WARNING and not logger.hasHandlers() and not settings.quiet():
        try:
            bars = sys.modules.get("tqdm")  # a progress bar on screen: write above it, not into its line
            if bars is not None and getattr(bars.tqdm, "_instances", None):
                bars.tqdm.write(f"fi_ffi: {message}", file=sys.stderr)
            else:
                sys.stderr.write(f"fi_ffi: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not stop a start
            pass


def warn(message: str) -> None:
    """Log ``message`` at WARNING (a repair, or a file fi_ffi will not use)."""
    logger.warning(message)
