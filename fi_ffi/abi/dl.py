"""Thin wrappers over libc's ``dlopen``/``dlsym``/``dlerror``, called through cffi.

``ffi.dlopen`` only exposes declared names; kernel modules export one ``__tvm_ffi_<name>`` symbol per entry
point and we look those up by name at bind time, so we go to libc directly. This also gives
``RTLD_NOLOAD`` (is a library already in the process?) and the loader's exact error text.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import LibraryLoadError
from .cdefs import get_ffi

RTLD_LAZY = os.RTLD_LAZY
RTLD_NOW = os.RTLD_NOW
RTLD_GLOBAL = os.RTLD_GLOBAL
RTLD_LOCAL = os.RTLD_LOCAL
RTLD_NOLOAD = os.RTLD_NOLOAD

_libc: Any = None


def libc() -> Any:
    """The process's C library (``ffi.dlopen(None)``) with the ``dl*`` functions declared."""
    global _libc
    if _libc is None:
        _libc = get_ffi().dlopen(None)
    return _libc


def last_error() -> str:
    """The text of the dynamic loader's most recent error, or ``""``."""
    ffi = get_ffi()
    msg = libc().dlerror()
    return "" if msg == ffi.NULL else ffi.string(msg).decode(errors="replace")


def open_library(path: str, flags: int) -> Any:
    """``dlopen(path, flags)``; returns the handle (a ``void*`` cdata) or raises :class:`LibraryLoadError`.

    Libraries are never closed: kernel modules own the deleters of objects they return (see ABI.md D.12).
    """
    ffi = get_ffi()
    libc().dlerror()  # clear a stale error
    handle = libc().dlopen(os.fsencode(path), flags)
    if handle == ffi.NULL:
        raise LibraryLoadError(f"the dynamic loader refused {path}: {last_error()}")
    return handle


def find_loaded(path: str) -> Any | None:
    """The handle of ``path`` if it is already loaded in this process (``RTLD_NOLOAD``), else ``None``."""
    ffi = get_ffi()
    handle = libc().dlopen(os.fsencode(path), RTLD_NOW | RTLD_NOLOAD)
    libc().dlerror()
    return None if handle == ffi.NULL else handle


def symbol_address(handle: Any, name: str) -> int:
    """The address of exported symbol ``name`` in ``handle``, or 0 if it does not export it."""
    ffi = get_ffi()
    libc().dlerror()
    ptr = libc().dlsym(handle, name.encode())
    return 0 if ptr == ffi.NULL else int(ffi.cast("uintptr_t", ptr))


def loaded_paths(basename: str) -> list[str]:
    """Paths of mapped files named ``basename`` in this process, from ``/proc/self/maps`` (Linux)."""
    found: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").partition("/")[2]
                if path and os.path.basename("/" + path) == basename and "/" + path not in found:
                    found.append("/" + path)
    except OSError:
        pass
    return found
