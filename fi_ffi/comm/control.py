"""Setup calls of the communication modules: entry points called once per communicator or per CUDA graph (make
the all-reduce object, register buffers, initialise Lamport buffers), not per step.

They take wire types the per-step launcher does not (:data:`fi_ffi.abi.wire.SETUP_ONLY_TYPES`: lists of lists
of ints, dtypes) and return values (an int handle, a tuple of int arrays), so they are packed here, value by
value, from the same :class:`~fi_ffi.abi.wire.Declaration` data, after the module's own signature is checked
against it (:func:`fi_ffi.launch.binding.bound_entry`). Integer lists become ``ffi.Array`` objects made for the call
and released right after it; results come back as Python ints and lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..abi import wire
from ..abi.values import to_int, to_scalar
from ..errors import ArgumentTypeError


def _ints(name: str, values: Any) -> list[int]:
    """A list of int64 (each item by :func:`fi_ffi.abi.values.to_int`, the one rule for ints)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ArgumentTypeError(f"{name}: expected a sequence of ints, got {type(values).__name__}")
    return [to_int(f"{name}[{i}]", v) for i, v in enumerate(values)]


def _array(values: list[Any], keep: list[Any]) -> Any:
    from ..abi.call import Function

    array = Function.global_function("ffi.Array")(*values)
    keep.append(array)
    return array


def pack(decl: wire.Declaration, values: Sequence[Any], keep: list[Any]) -> list[Any]:
    """``values`` converted for ``decl``'s wire types (arrays made as objects, held in ``keep``).

    Raises:
        TypeError / ValueError: naming the parameter, for a value of the wrong type or range (scalars and ints
            by :mod:`fi_ffi.abi.values`, the one packer of Python values: ArgumentTypeError / ArgumentRangeError).
    """
    from ..dtypes import dtype as to_dtype
    from ..tensor.intake import as_tensor

    if len(values) != len(decl.params):
        raise TypeError(f"{decl.entry}: expected {len(decl.params)} arguments, got {len(values)}")
    out: list[Any] = []
    for p, v in zip(decl.params, values, strict=True):
        if p.wire in wire.TENSOR_TYPES:
            if v is None and p.wire == wire.OPT_TENSOR:
                out.append(None)
                continue
            t = as_tensor(v, name=p.name)
            keep.append(t)
            out.append(t)
        elif p.wire == wire.ARRAY:
            out.append(_array(_ints(p.name, v), keep))
        elif p.wire == wire.ARRAY_OF_ARRAYS:
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
                raise ArgumentTypeError(f"{p.name}: expected a sequence of sequences of ints, got {type(v).__name__}")
            out.append(_array([_array(_ints(f"{p.name}[{i}]", row), keep) for i, row in enumerate(v)], keep))
        elif p.wire == wire.DATA_TYPE:
            out.append(to_dtype(v))
        else:
            out.append(to_scalar(p.name, p.wire, v))
    return out


def call(uri: str, decl: wire.Declaration, *values: Any) -> Any:
    """Call entry point ``decl`` of module ``uri`` with ``values``; returns its result as Python values.

    The module's signature is checked against ``decl`` first (a zero-argument entry point states none: its
    call is its own answer). ``Array`` results become lists (nested for a ``Tuple`` of arrays).
    """
    from ..abi.objects import Array, ObjectRef
    from ..launch.binding import bound_entry
    from ..launch.kernels import entry_point

    entry = bound_entry(uri, decl) if decl.params else entry_point(uri, decl.entry)
    keep: list[Any] = []
    try:
        result = entry(*pack(decl, values, keep))
    finally:
        for obj in keep:  # the arrays made for this call (tensor descriptors are only borrowed)
            if isinstance(obj, ObjectRef):
                obj.release()
    if isinstance(result, Array):
        with result:
            return [item.to_list() if isinstance(item, Array) else item for item in result.to_list()]
    return result


__all__ = ["call", "pack"]
