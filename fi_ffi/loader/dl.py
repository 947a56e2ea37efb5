"""Thin wrappers over libc's ``dlopen``/``dlsym``/``dlerror``, called through cffi (ABI mode).

``ffi.dlopen`` only exposes declared names; kernel modules export one ``__tvm_ffi_<name>`` symbol per entry
point and we look those up by name at bind time, so we go to libc directly. This also gives explicit flags
(``RTLD_LAZY`` for kernel modules), ``RTLD_NOLOAD`` (is a library already in the process?), ``dlsym`` of any
name in a library's scope or the process's global scope (:func:`global_scope`), and the loader's exact error text.

The declarations here are libc's only, in an ``FFI`` of their own (:func:`get_ffi`): the loader needs no
TVM-FFI type, and :mod:`fi_ffi.abi` (which declares those) builds on the loader, never the reverse.
"""

from __future__ import annotations

import os
from typing import Any

import cffi

from ..cdecl import Declarations
from ..errors import LibraryLoadError

RTLD_LAZY = os.RTLD_LAZY
RTLD_NOW = os.RTLD_NOW
RTLD_GLOBAL = os.RTLD_GLOBAL
RTLD_LOCAL = os.RTLD_LOCAL
RTLD_NOLOAD = os.RTLD_NOLOAD

# libc's dynamic-loader entry points: explicit flags, RTLD_NOLOAD probes, dlsym of any exported name
# (kernel entry points are looked up by name, not declared one by one) and dlerror's exact text.
LIBC_CDEFS = r"""
void* dlopen(const char* filename, int flags);
void* dlsym(void* handle, const char* symbol);
char* dlerror(void);
int dlclose(void* handle);
"""

_DECLARATIONS = Declarations(LIBC_CDEFS)
_libc: Any = None


def get_ffi() -> cffi.FFI:
    """The ``cffi.FFI`` holding libc's ``dl*`` declarations (parsed once, thread-safe)."""
    return _DECLARATIONS.ffi()


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
    handle = libc().dlopen(os.fsencode(path), RTLD_LAZY | RTLD_NOLOAD)
    libc().dlerror()
    return None if handle == ffi.NULL else handle


def global_scope() -> Any:
    """glibc's ``RTLD_DEFAULT`` (``(void*)0``): as a handle for :func:`symbol_address`, the global scope."""
    return get_ffi().NULL


def symbol_address(handle: Any, name: str) -> int:
    """The address of exported symbol ``name`` in ``handle``, or 0 if it does not export it.

    ``handle`` is a library's handle (the library and the libraries it needs are searched, in load order) or
    :func:`global_scope` (the process's global scope: the program, its libraries and RTLD_GLOBAL ones).
    """
    ffi = get_ffi()
    libc().dlerror()
    ptr = libc().dlsym(handle, name.encode("utf-8", "surrogateescape"))
    return 0 if ptr == ffi.NULL else int(ffi.cast("uintptr_t", ptr))


def loaded_paths(basename: str, *, versioned: bool = False) -> list[str]:
    """Paths of mapped files named ``basename`` in this process, from ``/proc/self/maps`` (Linux); with
    ``versioned``, also ``basename.<more>`` (a soname ``libcudart.so.12`` mapped from ``libcudart.so.12.4.127``)."""
    found: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").partition("/")[2]
                name = os.path.basename("/" + path) if path else ""
                matches = name == basename or (versioned and name.startswith(basename + "."))
                if matches and "/" + path not in found:
                    found.append("/" + path)
    except OSError:
        pass
    return found
