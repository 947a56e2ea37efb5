"""Owned TVM-FFI objects: reference release, strings, arrays, errors and Tensor objects.

Ownership rules (ABI.md A.7): arguments are borrowed; an object handed back in a result slot is owned by
the receiver and must be ``DecRef``'d exactly once. :class:`ObjectRef` is that one owner: it releases its
handle on :meth:`ObjectRef.release` or when garbage-collected, whichever comes first, and never twice.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from typing import Any

from ..tensor.descriptor import Tensor
from .cdefs import get_ffi
from .cells import _HEADER, _view, get_ffi_api_decref, read_byte_array
from .raised import error_from_handle, take_raised
from .runtime import api

# Type indices (c_api.h TVMFFITypeIndex).
NONE, INT, BOOL, FLOAT, OPAQUE_PTR, DATA_TYPE, DEVICE, DLTENSOR_PTR, RAW_STR, BYTE_ARRAY_PTR = range(10)
OBJECT_RVALUE_REF, SMALL_STR, SMALL_BYTES = 10, 11, 12
STATIC_OBJECT_BEGIN = 64
STR, BYTES, ERROR, FUNCTION, SHAPE, TENSOR, ARRAY, MAP, MODULE = range(65, 74)

TYPE_NAMES = {
    NONE: "None",
    INT: "int",
    BOOL: "bool",
    FLOAT: "float",
    OPAQUE_PTR: "void*",
    DATA_TYPE: "DataType",
    DEVICE: "Device",
    DLTENSOR_PTR: "DLTensor*",
    RAW_STR: "const char*",
    BYTE_ARRAY_PTR: "ByteArray*",
    OBJECT_RVALUE_REF: "ObjectRValueRef",
    SMALL_STR: "SmallStr",
    SMALL_BYTES: "SmallBytes",
    STR: "Str",
    BYTES: "Bytes",
    ERROR: "Error",
    FUNCTION: "Function",
    SHAPE: "Shape",
    TENSOR: "Tensor",
    ARRAY: "Array",
    MAP: "Map",
    MODULE: "Module",
}

_SEQ_CELL = struct.Struct("<Qqq")  # TVMFFISeqCell {data, size, capacity}
_ANY = struct.Struct("<iIq")


class ObjectRef:
    """Sole owner of one strong reference to a TVM-FFI object.

    ``handle`` is the object's address (int), 0 once released. ``type_index`` is the object's type.
    """

    __slots__ = ("__weakref__", "handle", "type_index")

    def __init__(self, handle: int, type_index: int) -> None:
        self.handle = handle
        self.type_index = type_index

    def release(self) -> None:
        """Drop the reference now (idempotent: the second call does nothing)."""
        handle, self.handle = self.handle, 0
        if handle:
            get_ffi_api_decref(handle)

    def __del__(self) -> None:
        if self.handle:  # an object released explicitly (the common case) costs nothing more here
            with contextlib.suppress(Exception):  # at interpreter shutdown there is nothing sensible left to do
                self.release()

    @property
    def refcount(self) -> int:
        """The object's current strong reference count (diagnostics and tests)."""
        if not self.handle:
            return 0
        (combined,) = struct.unpack_from("<Q", _view(self.handle, 8))
        return combined & 0xFFFFFFFF

    def __enter__(self) -> ObjectRef:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        name = TYPE_NAMES.get(self.type_index, f"type {self.type_index}")
        state = f"0x{self.handle:x}" if self.handle else "released"
        return f"<{type(self).__name__} {name} {state}>"


class Array(ObjectRef):
    """An owned ``ffi.Array`` (type 71). Supports ``len`` and indexing.

    Plan functions return one; it is passed back unchanged to ``run``. A ``Tuple<...>`` result is an Array at
    run time too (TVM-FFI's ``Tuple`` is backed by an ``ArrayObj``): its elements are read by index.
    """

    __slots__ = ()

    def _cell(self) -> tuple[int, int]:
        if not self.handle:
            raise ValueError("the Array has been released")
        data, size, _cap = _SEQ_CELL.unpack_from(_view(self.handle + _HEADER, _SEQ_CELL.size))
        return data, size

    def __len__(self) -> int:
        return self._cell()[1]

    def __getitem__(self, index: int) -> Any:
        """Element ``index``: a POD value, or a new owning wrapper of an object element (see take_result)."""
        data, size = self._cell()
        if not -size <= index < size:
            raise IndexError(f"Array index {index} out of range for length {size}")
        index %= size
        slot = _view(data + 16 * index, 16)
        type_index, _pad, raw = _ANY.unpack_from(slot)
        if type_index < STATIC_OBJECT_BEGIN:
            return _pod(type_index, raw, slot)
        # An object element (a nested Array, a Tensor, a string): the Array keeps its own reference, so take a
        # new one for the caller, which the returned wrapper owns (take_result's ownership rule).
        api().TVMFFIObjectIncRef(get_ffi().cast("void*", raw))
        return take_result(bytes(slot))

    def to_list(self) -> list[Any]:
        """The elements as Python values."""
        return [self[i] for i in range(len(self))]


class TensorObject(ObjectRef):
    """An owned ``ffi.Tensor`` (type 70).

    Needed for parameters typed ``ffi.Tensor`` / ``Optional<ffi.Tensor>``, which reject a bare DLTensor*.
    ``shape`` is the described shape (a value; empty for objects received from a callee).
    """

    __slots__ = ("shape",)

    def __init__(self, handle: int, type_index: int = 70, shape: tuple[int, ...] = ()) -> None:
        super().__init__(handle, type_index)
        self.shape = shape


class _ManagedTensors:
    """The ``DLManagedTensorVersioned`` records we hand to TVM-FFI, kept until its deleter runs.

    Only fi_ffi's own allocations are kept (the record and its shape/strides array), never the caller's
    tensor: the memory the object describes must stay valid while the object is alive, which for a kernel
    argument is the duration of the call (the launcher releases the object right after it).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.alive: dict[int, tuple[Any, Any]] = {}
        self.deleter: Any = None

    def on_delete(self, managed: Any) -> None:
        addr = int(get_ffi().cast("uintptr_t", managed))
        with self.lock:
            self.alive.pop(addr, None)


_managed = _ManagedTensors()


def tensor_object(t: Tensor) -> TensorObject:
    """A new ``ffi.Tensor`` object describing ``t``'s memory; the caller owns it and releases it.

    The object borrows the memory: keep ``t``'s producer alive until the object is released.
    """
    from ..tensor.descriptor import WIRE_DEVICE_TYPE

    ffi = get_ffi()
    if _managed.deleter is None:
        _managed.deleter = ffi.callback("void(DLManagedTensorVersioned*)", _managed.on_delete)
    managed = ffi.new("DLManagedTensorVersioned*")
    n = t.ndim
    dims = ffi.new("int64_t[]", [*t.shape, *t.strides] or [0])
    managed.version.major = 1
    managed.version.minor = 1
    managed.deleter = _managed.deleter
    dl = managed.dl_tensor
    dl.data = ffi.cast("void*", t.data_ptr)
    dl.device.device_type = WIRE_DEVICE_TYPE.get(t.device.device_type, t.device.device_type)
    dl.device.device_id = t.device.device_id
    dl.ndim = n
    dl.dtype.code, dl.dtype.bits, dl.dtype.lanes = t.dtype.code, t.dtype.bits, t.dtype.lanes
    dl.shape = dims
    dl.strides = dims + n
    dl.byte_offset = 0
    addr = int(ffi.cast("uintptr_t", managed))
    with _managed.lock:
        _managed.alive[addr] = (managed, dims)
    out = ffi.new("void**")
    rc = api().TVMFFITensorFromDLPackVersioned(managed, 1, 0, out)
    if rc != 0:
        with _managed.lock:
            _managed.alive.pop(addr, None)
        raise take_raised("TVMFFITensorFromDLPackVersioned", (repr(t),))
    return TensorObject(int(ffi.cast("uintptr_t", out[0])), TENSOR, t.shape)


def _pod(type_index: int, raw: int, slot: Any) -> Any:
    if type_index == NONE:
        return None
    if type_index == INT:
        return raw
    if type_index == BOOL:
        return bool(raw)
    if type_index == FLOAT:
        return struct.unpack_from("<d", slot, 8)[0]
    if type_index == OPAQUE_PTR:
        return raw & 0xFFFFFFFFFFFFFFFF
    if type_index == SMALL_STR:
        (length,) = struct.unpack_from("<I", slot, 4)
        return bytes(slot[8 : 8 + length]).decode()
    if type_index == SMALL_BYTES:
        (length,) = struct.unpack_from("<I", slot, 4)
        return bytes(slot[8 : 8 + length])
    if type_index == DATA_TYPE:
        from ..dtypes import from_dlpack

        code, bits, lanes = struct.unpack_from("<BBH", slot, 8)
        return from_dlpack(code, bits, lanes)
    if type_index == DEVICE:
        from ..dtypes import Device

        return Device(*struct.unpack_from("<ii", slot, 8))
    raise TypeError(f"cannot decode a value of type {TYPE_NAMES.get(type_index, type_index)} here")


def take_result(slot: Any) -> Any:
    """Decode the 16-byte result slot (a buffer) into a Python value, taking ownership of any object.

    Strings and bytes are copied out and their object released at once; arrays, tensors, functions and
    other objects come back as owning wrappers (:class:`Array`, :class:`TensorObject`, :class:`ObjectRef`).
    """
    type_index, _pad, raw = _ANY.unpack_from(slot)
    if type_index < STATIC_OBJECT_BEGIN:
        return _pod(type_index, raw, slot)
    if type_index in (STR, BYTES):
        try:
            data = read_byte_array(raw + _HEADER)
        finally:
            get_ffi_api_decref(raw)
        return data.decode() if type_index == STR else data
    if type_index == ARRAY:
        return Array(raw, ARRAY)
    if type_index == TENSOR:
        return TensorObject(raw, TENSOR)
    if type_index == ERROR:
        return error_from_handle(raw, "")
    return ObjectRef(raw, type_index)
