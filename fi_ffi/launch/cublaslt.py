"""cuBLASLt handles for the kernels that take one (``bmm_fp8``): one per CUDA device, made on first use, kept.

flashinfer-python passes torch's current cuBLAS handle; fi_ffi, without torch, creates its own with
``cublasLtCreate`` (cffi in ABI mode on the ``libcublasLt.so.13`` the ``gemm`` module links: the one copy
:func:`fi_ffi.loader.nvidia_library` finds and loads for the whole process, the engine's included).
A failing status is a :class:`~fi_ffi.errors.CublasError`, as for the engine's cuBLAS calls.
A handle is a host object of the library, valid for the device that was current when it was made and usable from
any stream; it is created with that device current and never destroyed (one per device for the process).
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import CublasError

_lock = threading.Lock()
_lib: Any = None
_ffi: Any = None
_handles: dict[int, int] = {}


def _load() -> tuple[Any, Any]:
    global _lib, _ffi
    if _lib is None:
        import cffi

        from ..loader import libraries

        ffi = cffi.FFI()
        ffi.cdef("int cublasLtCreate(void** handle); const char* cublasLtGetStatusName(int status);")
        path = libraries.nvidia_library("cublasLt")
        _lib, _ffi = ffi.dlopen(path), ffi
    return _lib, _ffi


def handle(device_id: int) -> int:
    """The cuBLASLt handle of CUDA device ``device_id`` (as an int), created with that device current.

    Raises:
        LibraryLoadError: libcublasLt was not found (the text names the pip package).
        CublasError: ``cublasLtCreate`` failed.
    """
    found = _handles.get(device_id)
    if found is not None:
        return found
    with _lock:
        found = _handles.get(device_id)
        if found is None:
            from ..cuda import device
            from .kernels import require_driver

            require_driver("cublasLtCreate")  # "no NVIDIA driver found" before a missing library is looked for
            lib, ffi = _load()
            previous = device.make_current(device_id)
            try:
                out = ffi.new("void**")
                status = lib.cublasLtCreate(out)
            finally:
                device.restore(previous)
            if status:
                name = ffi.string(lib.cublasLtGetStatusName(status)).decode()
                raise CublasError("cublasLtCreate", status, name)
            found = _handles[device_id] = int(ffi.cast("uintptr_t", out[0]))
    return found


__all__ = ["handle"]
