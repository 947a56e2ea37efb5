"""Turning a raised TVM-FFI error into a Python :class:`~fi_ffi.errors.KernelError`.

After a call returns non-zero, the error sits in a thread-local slot of the runtime.
:func:`take_raised` moves it out (``TVMFFIErrorMoveFromRaised``; same thread, right after the call), reads
the error cell (kind, message, backtrace: ``TVMFFIByteArray`` each, at object + 24) and releases it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import KernelError
from .cdefs import get_ffi
from .cells import _HEADER, get_ffi_api_decref, read_byte_array
from .runtime import api


def error_from_handle(handle: int, function: str, arguments: Sequence[str] = ()) -> KernelError:
    """Read the Error object ``handle`` into a :class:`KernelError` and release the handle."""
    try:
        cell = handle + _HEADER
        kind = read_byte_array(cell).decode(errors="replace")
        message = read_byte_array(cell + 16).decode(errors="replace")
        backtrace = read_byte_array(cell + 32).decode(errors="replace")
    finally:
        get_ffi_api_decref(handle)
    return KernelError(kind, message, backtrace, function, tuple(arguments))


def take_raised(function: str, arguments: Sequence[str] = ()) -> KernelError:
    """Move the calling thread's raised error out of the runtime and return it as a :class:`KernelError`."""
    ffi = get_ffi()
    out = ffi.new("void**")
    api().TVMFFIErrorMoveFromRaised(out)
    handle = int(ffi.cast("uintptr_t", out[0]))
    if not handle:
        return KernelError("UnknownError", "the call failed but raised no error object", "", function, tuple(arguments))
    return error_from_handle(handle, function, arguments)
