"""The one packer of Python values: what each wire type accepts, one rule per Python type.

Every path that turns a Python value into a TVM-FFI argument goes through here, so a value is accepted, converted
or refused the same way whichever path it takes: the launcher's slow path (:mod:`fi_ffi.launch.validation`; its
generated fast path inlines only the common case, ``value.__class__ is int`` within int64, and leaves every other
value to the slow path, which calls :func:`to_scalar`), the setup calls of :mod:`fi_ffi.comm.control` and the
generic call of :class:`fi_ffi.abi.call.Callee` (:func:`pack_value`).

The rules, per wire type:

================  =====================================================================================
``int``           an ``int`` or anything with ``__index__`` (numpy integers), not a ``bool``; within int64
``float``         an ``int`` or ``float`` or anything with ``__float__``, not a ``bool``; finite unless given
                  as an infinite float
``bool``          ``True``/``False``, or the ints 0 and 1
``std::string``   a ``str`` without NUL characters
``Optional<T>``   ``None``, or a value of ``T``
================  =====================================================================================

A value of the wrong type raises :class:`~fi_ffi.errors.ArgumentTypeError` (a ``TypeError``), one out of range
:class:`~fi_ffi.errors.ArgumentRangeError` (a ``ValueError``), both naming the argument; never a bare
``OverflowError`` or ``struct.error``.
"""

from __future__ import annotations

import inspect
import math
import struct
import sys
from typing import Any

from ..dtypes import Device, DType
from ..errors import ArgumentRangeError, ArgumentTypeError
from ..tensor.descriptor import Tensor
from . import wire
from .cdefs import get_ffi
from .objects import (
    BOOL,
    BYTE_ARRAY_PTR,
    DATA_TYPE,
    DEVICE,
    DLTENSOR_PTR,
    FLOAT,
    INT,
    NONE,
    OPAQUE_PTR,
    RAW_STR,
    ObjectRef,
)

INT64_MIN = -(1 << 63)
INT64_END = 1 << 63  # one past the largest int64


def int64_range_error(name: str, value: int) -> ArgumentRangeError:
    """The error of an int outside int64 (the same text on every path)."""
    return ArgumentRangeError(
        f"{name}: {value} does not fit in int64 (-2**63 <= value < 2**63); pass a value in that range"
    )


def scalar_type_error(name: str, expected: str, value: Any, given: str | None = None) -> ArgumentTypeError:
    """The error of scalar ``name`` given ``value``, which is not ``expected`` (``"a float"``); ``given``: how the
    text names a value that is not a tensor (default: its type's name).

    A tensor in a scalar's place is most often one given by position one place early (``rmsnorm(x, w, out)``
    puts ``out`` where flashinfer's order has ``eps``): for a tensor (a descriptor, or anything with
    ``__dlpack__``, ``__cuda_array_interface__`` or ``data_ptr``) the text says so, gives the positional order of
    the public op being called and which of its tensors to pass by keyword. Only ever built on the error path.
    """
    kind = type(value).__name__
    if not (isinstance(value, Tensor) or any(hasattr(value, a) for a in _TENSOR_ATTRIBUTES)):
        return ArgumentTypeError(f"{name}: expected {expected}, got {kind if given is None else given}")
    fix = f"pass the tensors after {name} by keyword"
    called = _public_op_taking(name)
    if called is not None:
        function, arguments = called
        params = [p for p in inspect.signature(function).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        names = [p.name for p in params]
        # the tensors after `name` that the call left out: the one meant for `name`'s place is one of them
        missing = [
            p.name
            for p in params[names.index(name) + 1 :]
            if "Tensor" in str(p.annotation) and arguments.get(p.name) is None
        ]
        fix = f"{function.__name__}'s positional order is ({', '.join(names)})"
        if missing:
            fix += f": pass {' or '.join(f'{n}=' for n in missing)} by keyword"
    return ArgumentTypeError(f"{name}: expected {expected}, got {kind} (a tensor); {fix}")


_TENSOR_ATTRIBUTES = ("__dlpack__", "__cuda_array_interface__", "data_ptr")


def _public_op_taking(name: str) -> tuple[Any, dict[str, Any]] | None:
    """The outermost public function of ``fi_ffi.ops`` on the calling stack with positional parameter ``name`` (the
    op the user called) and its arguments, or None."""
    found = None
    frame = sys._getframe(1)
    while frame is not None:
        function: Any = frame.f_globals.get(frame.f_code.co_name)
        if (
            getattr(function, "__code__", None) is frame.f_code
            and frame.f_globals.get("__name__", "").startswith("fi_ffi.ops.")
            and function.__name__ in frame.f_globals.get("__all__", ())
        ):
            parameter = inspect.signature(function).parameters.get(name)
            if parameter is not None and parameter.kind is parameter.POSITIONAL_OR_KEYWORD:
                found = function, dict(frame.f_locals)
        frame = frame.f_back  # type: ignore[assignment]
    return found


def to_index(name: str, value: Any) -> int:
    """``value`` as a Python int (an int, or anything with ``__index__``, not a bool), unbounded: the type rule of
    every int fi_ffi takes (:func:`to_int` adds int64's bounds; an op's own check adds its tighter ones).

    Raises:
        ArgumentTypeError: not an integer, naming ``name``.
    """
    if value.__class__ is int:
        return value  # type: ignore[no-any-return]
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise scalar_type_error(name, "an int", value)
    try:
        return int(value.__index__())
    except (TypeError, ValueError):  # numpy arrays of more than one element have an __index__ that refuses
        raise scalar_type_error(name, "an int", value) from None


def to_int(name: str, value: Any) -> int:
    """``value`` as an int64 (an int, or anything with ``__index__``, not a bool).

    Raises:
        ArgumentTypeError: not an integer; ArgumentRangeError: outside int64. Both name ``name``.
    """
    if value.__class__ is not int:
        value = to_index(name, value)
    if not INT64_MIN <= value < INT64_END:
        raise int64_range_error(name, value)
    return value  # type: ignore[no-any-return]


def to_float(name: str, value: Any) -> float:
    """``value`` as a float64 (an int, a float or anything with ``__float__``, not a bool).

    Raises:
        ArgumentTypeError: not a number; ArgumentRangeError: an int or number that is infinite as a float64.
    """
    if isinstance(value, bool) or (not isinstance(value, (int, float)) and not hasattr(value, "__float__")):
        raise scalar_type_error(name, "a float", value)
    try:
        out = float(value)
    except OverflowError:
        raise ArgumentRangeError(f"{name}: {value!r} does not fit in a float64") from None
    except (TypeError, ValueError):  # numpy arrays of more than one element have a __float__ that refuses
        raise scalar_type_error(name, "a float", value) from None
    if math.isinf(out) and not (isinstance(value, float) and math.isinf(value)):
        raise ArgumentRangeError(f"{name}: {value!r} does not fit in a float64")
    return out


def to_bool(name: str, value: Any) -> bool:
    """``value`` as a bool (``True``/``False`` or the ints 0 and 1); else ArgumentTypeError naming ``name``."""
    if value is True or value is False:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    raise scalar_type_error(name, "a bool", value, repr(value))


def to_text(name: str, value: Any) -> str:
    """``value`` as a C string's text (a str without NUL); else the error naming ``name``."""
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name}: expected a str, got {type(value).__name__}")
    if "\0" in value:
        raise ArgumentRangeError(f"{name}: text must not contain NUL characters")
    return value


def to_scalar(name: str, kind: str, value: Any) -> Any:
    """``value`` checked and converted for scalar wire type ``kind`` (see the table in the module docstring)."""
    if kind == wire.INT:
        return to_int(name, value)
    if kind == wire.FLOAT:
        return to_float(name, value)
    if kind == wire.BOOL:
        return to_bool(name, value)
    if kind == wire.OPT_INT:
        return None if value is None else to_int(name, value)
    if kind == wire.OPT_FLOAT:
        return None if value is None else to_float(name, value)
    if kind == wire.STRING:
        return to_text(name, value)
    raise ArgumentTypeError(f"{name}: wire type {kind} is not a scalar")


class OpaquePtr(int):
    """An int to be passed as an opaque ``void*`` (type index 4) rather than as an integer."""


def pack_value(value: Any, keep: list[Any], callee: str = "", index: int = 0) -> tuple[int, Any]:
    """The (type_index, payload) of a Python value for a generic call; ``keep`` holds temporaries alive.

    None -> None; bool -> Bool; int -> Int (:func:`to_int`'s rule); float -> Float; :class:`OpaquePtr` -> opaque
    pointer; :class:`~fi_ffi.dtypes.DType` -> DataType; :class:`~fi_ffi.dtypes.Device` -> Device;
    :class:`~fi_ffi.tensor.Tensor` -> DLTensor*; str -> raw C string (borrowed); bytes -> byte array;
    :class:`ObjectRef` -> the object (borrowed). Anything else is an ArgumentTypeError naming the argument
    (``{callee} argument {index}``: the name is made only for the error, not per call).
    """
    if value is None:
        return NONE, 0
    if isinstance(value, bool):
        return BOOL, int(value)
    if isinstance(value, OpaquePtr):
        return OPAQUE_PTR, int(value)
    if isinstance(value, int):
        if INT64_MIN <= value < INT64_END:  # the common case inline; to_int raises the error of the rest
            return INT, value
        return INT, to_int(_argument(callee, index), value)
    if isinstance(value, float):
        return FLOAT, value
    if isinstance(value, Tensor):
        return DLTENSOR_PTR, value._dl_addr
    if isinstance(value, ObjectRef):
        if not value.handle:
            raise ValueError(f"{_argument(callee, index)}: {value!r} has been released and cannot be passed")
        return value.type_index, value.handle
    if isinstance(value, DType):
        (payload,) = struct.unpack("<q", struct.pack("<BBHi", value.code, value.bits, value.lanes, 0))
        return DATA_TYPE, payload
    if isinstance(value, Device):
        (payload,) = struct.unpack("<q", struct.pack("<ii", value.device_type, value.device_id))
        return DEVICE, payload
    ffi = get_ffi()
    if isinstance(value, (bytes, bytearray)):
        data = ffi.new("char[]", bytes(value))
        arr = ffi.new("TVMFFIByteArray*", (data, len(value)))
        keep += (data, arr)
        return BYTE_ARRAY_PTR, int(ffi.cast("uintptr_t", arr))
    if isinstance(value, str):
        data = ffi.new("char[]", value.encode())
        keep.append(data)
        return RAW_STR, int(ffi.cast("uintptr_t", data))
    raise ArgumentTypeError(f"{_argument(callee, index)}: cannot pass a {type(value).__name__} to a TVM-FFI function")


def _argument(callee: str, index: int) -> str:
    """How an error of :func:`pack_value` names the argument."""
    return f"{callee} argument {index}" if callee else f"argument {index}"


__all__ = [
    "INT64_END",
    "INT64_MIN",
    "OpaquePtr",
    "int64_range_error",
    "pack_value",
    "scalar_type_error",
    "to_bool",
    "to_float",
    "to_index",
    "to_int",
    "to_scalar",
    "to_text",
]
