"""The loaded TVM-FFI runtime (``libtvm_ffi.so``) as a cffi library object.

:func:`api` returns it, loading it on first use through :mod:`fi_ffi.loader` (which decides which copy:
one already in the process, the installed ``apache-tvm-ffi`` package's, or the one pinned in the lock).
The layers go one way: :mod:`fi_ffi.abi` uses the loader; the loader knows nothing of TVM-FFI's C API.
"""

from __future__ import annotations

import threading
from typing import Any

from .. import loader
from .cdefs import get_ffi

_lock = threading.Lock()
_api: Any = None
_path: str | None = None


def api() -> Any:
    """The TVM-FFI C API (cffi lib), loaded RTLD_GLOBAL on first use."""
    if _api is None:
        _load()
    return _api


def library_path() -> str:
    """Path of the ``libtvm_ffi.so`` in use (loads it if needed)."""
    if _api is None:
        _load()
    assert _path is not None
    return _path


def version() -> tuple[int, int, int]:
    """``TVMFFIGetVersion()`` of the loaded runtime as (major, minor, patch)."""
    ffi = get_ffi()
    out = ffi.new("TVMFFIVersion*")
    api().TVMFFIGetVersion(out)
    return (out.major, out.minor, out.patch)


def _load() -> None:
    global _api, _path
    with _lock:
        if _api is not None:
            return
        path = loader.runtime_library()
        ffi = get_ffi()
        # The loader has dlopen'ed the file RTLD_GLOBAL already; this only binds the declared names to it.
        _api = ffi.dlopen(path, ffi.RTLD_NOW | ffi.RTLD_GLOBAL)
        _path = path
