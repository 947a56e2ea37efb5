"""Raw reads of TVM-FFI object memory, and dropping a reference: what objects and errors share.

Objects start with a 24-byte header (``TVMFFIObject``); the cells of strings, arrays, errors and tensors
follow it. A ``TVMFFIByteArray`` is ``{data, size}`` (16 bytes, not NUL-terminated).
"""

from __future__ import annotations

import struct
from typing import Any

from .cdefs import get_ffi
from .runtime import api

_HEADER = 24  # sizeof(TVMFFIObject): cells of String/Array/Error/Tensor start here
_BYTE_ARRAY = struct.Struct("<QQ")  # TVMFFIByteArray {data, size}


def _view(addr: int, size: int) -> Any:
    ffi = get_ffi()
    return ffi.buffer(ffi.cast("char*", addr), size)


def read_bytes(addr: int, size: int) -> bytes:
    """Copy ``size`` bytes at ``addr``."""
    return bytes(_view(addr, size)) if size else b""


def read_byte_array(addr: int) -> bytes:
    """The bytes a ``TVMFFIByteArray`` at ``addr`` points to (length from ``size``, not NUL-terminated)."""
    data, size = _BYTE_ARRAY.unpack_from(_view(addr, 16))
    return read_bytes(data, size)


_decref: Any = None


def get_ffi_api_decref(handle: int) -> None:
    """``TVMFFIObjectDecRef`` of the object at address ``handle`` (an int)."""
    global _decref
    if _decref is None:
        # The same C function, typed to take the address as an integer: a pointer and a uintptr_t are passed
        # alike by every ABI fi_ffi runs on, and this saves a cffi cast per release (plans release one per step).
        _decref = get_ffi().cast("int(*)(uintptr_t)", api().TVMFFIObjectDecRef)
    _decref(handle)
