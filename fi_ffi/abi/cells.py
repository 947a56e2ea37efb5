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


def get_ffi_api_decref(handle: int) -> None:
    ffi = get_ffi()
    api().TVMFFIObjectDecRef(ffi.cast("void*", handle))
