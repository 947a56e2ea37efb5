"""Tensor descriptors: a pointer, a shape, strides in elements, a dtype and a device.

A :class:`Tensor` describes memory that someone else owns; it never allocates or copies the data. It
owns one ``DLTensor`` record (with its shape and strides arrays) that lives as long as the descriptor, so a
kernel call only has to write the record's address into an argument slot. Build one from a raw pointer
with :meth:`Tensor.from_pointer`, or from any DLPack / CUDA-array-interface producer with
:func:`fi_ffi.as_tensor`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from . import dtypes as _dt
from .dtypes import Device, DType

# DLTensor: data u64 @0, device {i32,i32} @8, ndim i32 @16, dtype {u8,u8,u16} @20, shape* @24, strides* @32,
# byte_offset u64 @40 (48 bytes); shape and strides (int64 each) follow the record in the same block.
_DLTENSOR = struct.Struct("<QiiiBBHQQQ")
_MAX_NDIM = 16
# The kernels accept exactly kDLCUDA for device memory and kDLCPU for host memory. Managed memory is
# device-addressable and page-locked host memory is host memory, so the record we pass carries the kind the
# kernels check for; the descriptor keeps the true device for our own checks and messages.
_WIRE_DEVICE_TYPE = {_dt.CUDA_MANAGED: _dt.CUDA, _dt.CUDA_HOST: _dt.CPU}
_INT64_END = 1 << 63
_ffi: Any = None  # fi_ffi.abi.cdefs.get_ffi(), looked up on the first descriptor (an import per call costs ~2 us)


def _device(value: Any) -> Device:
    if isinstance(value, Device):
        return value
    if isinstance(value, bool):
        raise TypeError(f"device: expected an int ordinal, 'cuda:N', 'cpu' or a Device, got {value!r}")
    if isinstance(value, int) and value >= 0:
        return _dt.cuda(value)
    if (isinstance(value, tuple) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and value[0] in _dt._DEVICE_NAMES and value[1] >= 0):
        return Device(int(value[0]), int(value[1]))
    if isinstance(value, str):
        kind, _, ordinal = value.partition(":")
        if kind == "cpu" and not ordinal:
            return _dt.cpu()
        if kind == "cuda" and (not ordinal or ordinal.isdigit()):
            return _dt.cuda(int(ordinal or 0))
    raise TypeError(f"device: expected an int ordinal, 'cuda:N', 'cpu' or a Device, got {value!r}")


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides, in elements, of a tensor of ``shape``."""
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(strides))


class Tensor:
    """A descriptor of a strided tensor in memory owned elsewhere.

    Attributes (read-only by convention):
        data_ptr: address of element ``[0, ..., 0]`` (int; any offset already folded in).
        shape: sizes per dimension, in elements.
        strides: steps per dimension, in elements (not bytes).
        dtype: the element :class:`~fi_ffi.dtypes.DType`.
        device: the :class:`~fi_ffi.dtypes.Device` that owns the memory.
        owner: an object kept alive as long as the descriptor (the producer of the memory), or None.
    """

    __slots__ = ("__weakref__", "_block", "_dl_addr", "_ffi_object", "data_ptr", "device", "dtype", "ndim",
                 "owner", "shape", "strides")

    data_ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: DType
    device: Device
    ndim: int
    owner: Any
    _ffi_object: Any  # the cached ffi.Tensor object (fi_ffi.abi.objects.tensor_object), made on demand

    def __init__(
        self,
        data_ptr: int,
        shape: Sequence[int],
        dtype: Any,
        device: Any = 0,
        strides: Sequence[int] | None = None,
        owner: Any = None,
    ) -> None:
        """See :meth:`from_pointer`."""
        if isinstance(data_ptr, bool) or not isinstance(data_ptr, int):
            raise TypeError(f"data_ptr: expected an int address, got {type(data_ptr).__name__}")
        if not 0 <= data_ptr < 1 << 64:
            raise ValueError(f"data_ptr: expected an address in [0, 2**64), got {data_ptr}")
        shape_t = _int_tuple("shape", shape)
        if len(shape_t) > _MAX_NDIM:
            raise ValueError(f"shape: at most {_MAX_NDIM} dimensions, got {len(shape_t)}")
        if any(not 0 <= s < _INT64_END for s in shape_t):
            raise ValueError(f"shape: sizes must be in [0, 2**63), got {shape_t}")
        if strides is None:
            strides_t = contiguous_strides(shape_t)
        else:
            strides_t = _int_tuple("strides", strides)
            if len(strides_t) != len(shape_t):
                raise ValueError(f"strides: expected {len(shape_t)} entries to match shape {shape_t}, "
                                 f"got {strides_t}")
            if any(s < 0 for s in strides_t):
                raise ValueError(f"strides: negative strides are not supported, got {strides_t}")
        if strides_t and max(strides_t) >= _INT64_END:
            raise ValueError(f"strides: steps must be < 2**63, got {strides_t}")
        self.data_ptr = data_ptr
        self.shape = shape_t
        self.strides = strides_t
        try:
            self.dtype = _dt.dtype(dtype)
        except TypeError as exc:
            raise TypeError(f"dtype: {exc}") from None
        self.device = _device(device)
        self.ndim = len(shape_t)
        self.owner = owner
        self._ffi_object = None
        self._block, self._dl_addr = _make_dltensor(self)

    @classmethod
    def from_pointer(
        cls,
        data_ptr: int,
        shape: Sequence[int],
        dtype: Any,
        device: Any = 0,
        strides: Sequence[int] | None = None,
        owner: Any = None,
    ) -> Tensor:
        """Describe memory at ``data_ptr``.

        Args:
            data_ptr: address of the first element (an int, e.g. from ``cuda.bindings`` ``cuMemAlloc``).
            shape: sizes in elements.
            dtype: a :class:`~fi_ffi.dtypes.DType` or a name such as ``"float16"`` / ``"bfloat16"``.
            device: CUDA ordinal (int), ``"cuda:N"``, ``"cpu"`` or a :class:`~fi_ffi.dtypes.Device`.
            strides: steps in elements; row-major contiguous when omitted.
            owner: any object to keep alive as long as this descriptor.
        """
        return cls(data_ptr, shape, dtype, device, strides, owner)

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Bytes spanned by the elements if the tensor were contiguous (``numel * itemsize``)."""
        return self.numel * self.dtype.itemsize

    def is_contiguous(self) -> bool:
        """True if the strides are row-major contiguous (size-1 dimensions may have any stride; an empty
        tensor is contiguous)."""
        if 0 in self.shape:
            return True
        step = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides), strict=True):
            if size != 1 and stride != step:
                return False
            step *= size
        return True

    def view(self, shape: Sequence[int], strides: Sequence[int] | None = None, offset: int = 0) -> Tensor:
        """A descriptor of the same memory with another shape/strides, starting ``offset`` elements in."""
        if offset < 0:
            raise ValueError(f"offset: expected >= 0 elements, got {offset}")
        return Tensor(self.data_ptr + offset * self.dtype.itemsize, shape, self.dtype, self.device,
                      strides, self.owner if self.owner is not None else self)

    def __repr__(self) -> str:
        return (f"Tensor(data_ptr=0x{self.data_ptr:x}, shape={self.shape}, strides={self.strides}, "
                f"dtype={self.dtype.name}, device={self.device})")


def _int_tuple(name: str, values: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(values)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of ints, got {type(values).__name__}") from None
    for v in out:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise TypeError(f"{name}: expected ints, got {out!r}")
    return tuple(int(v) for v in out)


def _make_dltensor(t: Tensor) -> tuple[Any, int]:
    """Allocate and fill the DLTensor record of ``t``; returns (owning cdata, address)."""
    global _ffi
    ffi = _ffi
    if ffi is None:
        from .abi.cdefs import get_ffi

        ffi = _ffi = get_ffi()
    n = t.ndim
    block = ffi.new("char[]", _DLTENSOR.size + 16 * n)
    addr = int(ffi.cast("uintptr_t", block))
    buf = ffi.buffer(block)
    shape_addr = addr + _DLTENSOR.size
    strides_addr = shape_addr + 8 * n
    device_type = _WIRE_DEVICE_TYPE.get(t.device.device_type, t.device.device_type)
    _DLTENSOR.pack_into(buf, 0, t.data_ptr, device_type, t.device.device_id, n,
                        t.dtype.code, t.dtype.bits, t.dtype.lanes, shape_addr, strides_addr, 0)
    struct.pack_into(f"<{2 * n}q", buf, _DLTENSOR.size, *t.shape, *t.strides)
    return block, addr
