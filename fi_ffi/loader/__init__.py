"""Finding, fetching, verifying, extracting and loading the prebuilt libraries fi_ffi calls.

The wheels are pinned in a lock file (format: :mod:`fi_ffi.loader.lockfile`); the cache layout is described
in :mod:`fi_ffi.loader.cache`, the sources of a wheel in :mod:`fi_ffi.loader.wheels`, the load order in
:mod:`fi_ffi.loader.libraries` and the environment variables in :mod:`fi_ffi.loader.settings`.

Importing this package loads nothing and imports no heavy module (``cuda.*``, ``tqdm``, ``zipfile``,
``urllib``); each function below imports what it needs on first call.

Typical use::

    from fi_ffi import loader
    handle = loader.load_module("norm")        # libtvm_ffi.so, libcudart, then norm.so
    print(loader.selection().reason)           # which wheel was chosen, and why
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .libraries import RuntimeInfo
    from .lockfile import Kind, Lock, Selection, WheelPin
    from .maintenance import CacheEntry, ClearReport, VerifyReport
    from .symbols import SymbolCheck

__all__ = [
    "CacheEntry",
    "ClearReport",
    "Lock",
    "RuntimeInfo",
    "Selection",
    "SymbolCheck",
    "VerifyReport",
    "WheelPin",
    "active_lock",
    "available_uris",
    "cache_root",
    "clear_cache",
    "dump_lock",
    "ensure_cudart",
    "fetch",
    "list_cache",
    "listing_without_download",
    "load_module",
    "loaded_modules",
    "lock_entries",
    "lock_entry",
    "module_path",
    "module_release",
    "module_source",
    "module_sources",
    "runtime_info",
    "runtime_library",
    "selection",
    "symbol_checks",
    "verify_cache",
]

_LAZY_TYPES = {
    "CacheEntry": "maintenance",
    "ClearReport": "maintenance",
    "VerifyReport": "maintenance",
    "RuntimeInfo": "libraries",
    "Lock": "lockfile",
    "Selection": "lockfile",
    "WheelPin": "lockfile",
    "SymbolCheck": "symbols",
}


def __getattr__(name: str) -> Any:
    module = _LAZY_TYPES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def runtime_library() -> str:
    """Path of the ``libtvm_ffi.so`` in use; loads it (RTLD_NOW | RTLD_GLOBAL) on the first call."""
    from .libraries import runtime_library as impl

    return impl()


def runtime_info() -> RuntimeInfo:
    """The ``libtvm_ffi.so`` in use: path, source (loaded/package/lock/env), version, reason; loads it."""
    from .libraries import runtime_info as impl

    return impl()


def ensure_cudart() -> str:
    """Load the CUDA runtime library (via cuda-pathfinder) once; returns its path."""
    from .libraries import ensure_cudart as impl

    return impl()


def load_module(uri: str) -> Any:
    """Handle (``void*`` cdata) of kernel module ``uri``, loaded once (RTLD_LAZY | RTLD_LOCAL, as TVM-FFI does)
    after the runtime and libcudart."""
    from .modules import load_module as impl

    return impl(uri)


def module_path(uri: str) -> Path:
    """Path of the extracted, verified ``.so`` of module ``uri`` (fetches/extracts on demand; loads nothing)."""
    from .modules import module_path as impl

    return impl(uri)


def available_uris() -> list[str]:
    """Sorted URIs of every module the selected kernel wheels serve."""
    from .modules import available_uris as impl

    return impl()


def module_source(uri: str) -> WheelPin:
    """The lock entry serving module ``uri`` (several releases in one lock: see :mod:`fi_ffi.loader.lockfile`)."""
    from .modules import module_source as impl

    return impl(uri)


def module_release(uri: str) -> str:
    """The FlashInfer release module ``uri`` comes from (``"0.7.2.post1"``); ``""`` if its entry records none."""
    from .modules import module_release as impl

    return impl(uri)


def module_sources() -> dict[str, WheelPin]:
    """Every module the selected wheels serve → the lock entry serving it (``.release``, ``.filename``)."""
    from .modules import module_sources as impl

    return impl()


def listing_without_download() -> contextlib.AbstractContextManager[None]:
    """A block in which wheels that are neither cached nor local are listed from their URL's zip central directory
    (HTTP range requests) instead of downloaded, where the server allows it (``fi-ffi list``)."""
    from .modules import listing_without_download as impl

    return impl()


def loaded_modules() -> dict[str, str]:
    """Modules loaded in this process so far: URI → file path."""
    from .modules import loaded_modules as impl

    return impl()


def symbol_checks(*, on_disk: bool = True) -> dict[str, SymbolCheck]:
    """URI → :class:`SymbolCheck` (``.unresolved``: the undefined symbols nothing in this process provides) for
    every module loaded here and, with ``on_disk``, every module of the selected wheels already on disk; fetches
    and extracts nothing. A module loads although such symbols exist (lazy binding); calling code that needs
    one aborts the process."""
    from .modules import symbol_checks as impl

    return impl(on_disk=on_disk)


def selection(*, cuda: str | None = None, arch: str | None = None) -> Selection:
    """The wheels chosen for this machine (or for ``cuda``/``arch`` if given), with a ``reason``."""
    from .modules import selection as impl

    return impl(cuda=cuda, arch=arch)


def active_lock() -> Lock:
    """The lock in force (``FI_FFI_LOCK`` over the packaged ``wheels.lock``), parsed."""
    from .lockfile import active_lock as impl

    return impl()


def fetch(wheel: str | os.PathLike[str] | None = None, *, all_entries: bool = False) -> list[Path]:
    """Make wheels available offline; returns their verified paths.

    ``wheel``: copy that local file into the cache (it must be pinned by the lock, name and sha256).
    Otherwise fetch the wheels this machine selects (kernels, plus the runtime wheel when no installed
    apache-tvm-ffi provides ``libtvm_ffi.so``); ``all_entries``: every wheel in the lock, all arches. A kernel
    wheel served by an installed distribution (:mod:`fi_ffi.loader.installed`) is not fetched: its folder is
    returned instead.
    """
    from . import installed, libraries, lockfile, modules, wheels

    lock = lockfile.active_lock()
    if wheel is not None:
        return [wheels.import_wheel(Path(wheel), lock)]
    if all_entries:
        pins = list({(p.filename, p.sha256): p for p in lock.all_pins()}.values())
    else:
        chosen = modules.selection()
        pins = list(chosen.kernels)
        if chosen.runtime is not None and libraries.runtime_plan()[0] == "lock":
            pins.append(chosen.runtime)
    out = []
    for pin in pins:
        found = installed.find(pin)
        out.append(found.root if found is not None else wheels.ensure_wheel(pin))
    return out


def lock_entry(
    wheel: str | os.PathLike[str],
    *,
    kind: Kind | None = None,
    cuda: str | None = None,
    arch: str | None = None,
    sm: Iterable[str] | None = None,
    url: str = "",
    pip: str = "",
    path: str = "",
    hash_members: bool = False,
    release: str | None = None,
) -> WheelPin:
    """A lock entry for a local wheel: file name, sha256, size; for kernel wheels CUDA/arch/sm and the
    FlashInfer release from its name."""
    from .lockfile import lock_entry as impl

    return impl(
        wheel,
        kind=kind,
        cuda=cuda,
        arch=arch,
        sm=sm,
        url=url,
        pip=pip,
        path=path,
        hash_members=hash_members,
        release=release,
    )


def lock_entries(
    wheels: Iterable[str | os.PathLike[str]], *, kind: Kind | None = None, url: str = ""
) -> tuple[list[WheelPin], list[str]]:
    """Entries for a set of wheels, and notes on those left out (a metadata-only wheel has nothing to load)."""
    from .lockfile import lock_entries as impl

    return impl(wheels, kind=kind, url=url)


def dump_lock(pins: Iterable[WheelPin], *, header: str = "") -> str:
    """Lock file text (format version 1) for ``pins``, e.g. from :func:`lock_entry`."""
    from .lockfile import dump_lock as impl

    return impl(pins, header=header)


def cache_root() -> Path:
    """The cache folder (``FI_FFI_CACHE_DIR`` or the user cache dir)."""
    from .cache import cache_root as impl

    return impl()


def verify_cache(full: bool = False) -> VerifyReport:
    """Check cached wheels, listings and extracted files (``full``: re-hash them, and stamped wheelhouse files);
    damaged files fi_ffi wrote are removed, everything found is reported. Never raises for what it finds."""
    from .maintenance import verify_cache as impl

    return impl(full)


def clear_cache() -> ClearReport:
    """Remove what fi_ffi created in the cache (and nothing else); the report lists what went and what stayed."""
    from .maintenance import clear_cache as impl

    return impl()


def list_cache() -> list[CacheEntry]:
    """Wheels, extracted folders, wheelhouse stamps and anything else (``"other"``) in the cache."""
    from .maintenance import list_cache as impl

    return impl()
