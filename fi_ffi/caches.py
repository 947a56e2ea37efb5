"""Every process-wide cache of fi_ffi, in one registry, with one reset.

fi_ffi remembers values, never callers' objects: interned tensor layouts, per-producer-type readers, compiled
launchers with their per-thread frames and validated frame images, bound entry points, plan settings, the
variant listing of the pinned wheels. Each module that keeps such a cache registers a function that empties
it; :func:`reset` calls them all. Tests use it to start from a known state (for instance after changing
``FI_FFI_LOCK``); a runtime never needs it (the caches are bounded), but may call it to drop everything.
"""

from __future__ import annotations

from collections.abc import Callable

_registry: dict[str, Callable[[], None]] = {}


def register(name: str, clear: Callable[[], None]) -> None:
    """Register ``clear`` (no arguments) as the way to empty the cache called ``name``."""
    _registry[name] = clear


def names() -> list[str]:
    """The registered caches."""
    return sorted(_registry)


def reset() -> None:
    """Empty every registered cache (importing nothing that is not imported yet)."""
    for clear in list(_registry.values()):
        clear()


__all__ = ["names", "register", "reset"]
