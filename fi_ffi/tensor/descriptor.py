"""Tensor descriptors: a pointer, a shape, strides in elements, a dtype and a device.

A :class:`Tensor` describes memory that someone else owns; it never allocates or copies the data, and it
allocates no C memory itself: a kernel call copies its fields into a ``DLTensor`` record the call owns
(:mod:`fi_ffi.launch.launcher`). Its layout (shape, strides, dtype, device) is interned as a small int, the key
under which the ops remember what they validated. Build one from a raw pointer with
:meth:`Tensor.from_pointer` (and move it with :meth:`Tensor.rebind`), or from any DLPack /
CUDA-array-interface producer with :func:`fi_ffi.as_tensor`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence, Set
from typing import Any

from .. import caches
from .. import dtypes as _dt
from ..dtypes import Device, DType

# DLTensor: data u64 @0, device {i32,i32} @8, ndim i32 @16, dtype {u8,u8,u16} @20, shape* @24, strides* @32,
# byte_offset u64 @40 (48 bytes); shape and strides (int64 each) follow the record in the same block.
_DLTENSOR = struct.Struct("<QiiiBBHQQQ")
MAX_NDIM = 16  # the most dimensions a descriptor (and a producer read by fi_ffi.tensor.intake) may have
# The kernels accept exactly kDLCUDA for device memory and kDLCPU for host memory. Managed memory is
# device-addressable and page-locked host memory is host memory, so the record we pass carries the kind the
# kernels check for; the descriptor keeps the true device for our own checks and messages.
WIRE_DEVICE_TYPE = {_dt.CUDA_MANAGED: _dt.CUDA, _dt.CUDA_HOST: _dt.CPU}
_INT64_END = 1 << 63
_PTR_END = 1 << 64
_DEVICE_END = 1 << 31  # DLDevice.device_id is an int32
_new = object.__new__  # a descriptor made without __init__ (the builders below, from_pointer's cached case)
# A bare cffi.FFI (no declarations: the record is packed with _DLTENSOR) for the DLTensor blocks, made on the
# first one; fi_ffi.abi builds on this module, so the record's memory does not come from there.
_ffi: Any = None


def _device(value: Any) -> Device:
    if isinstance(value, Device):
        if value.device_type in _dt._DEVICE_NAMES and 0 <= value.device_id < _DEVICE_END:
            return value
        raise ValueError(
            f"device: unsupported device {value!r} (type one of {sorted(_dt._DEVICE_NAMES)}, ordinal in [0, 2**31))"
        )
    if isinstance(value, bool):
        raise TypeError(f"device: expected an int ordinal, 'cuda:N', 'cpu' or a Device, got {value!r}")
    if isinstance(value, int) and 0 <= value < _DEVICE_END:
        return _dt.cuda(value)
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and value[0] in _dt._DEVICE_NAMES
        and 0 <= value[1] < _DEVICE_END
    ):
        return Device(int(value[0]), int(value[1]))
    if isinstance(value, str):
        kind, _, ordinal = value.partition(":")
        if kind == "cpu" and not ordinal:
            return _dt.cpu()
        if kind == "cuda" and (not ordinal or (ordinal.isdigit() and int(ordinal) < _DEVICE_END)):
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
    """A descriptor of a strided tensor in memory owned elsewhere (immutable by convention).

    Attributes:
        data_ptr: address of element ``[0, ..., 0]`` (int; any offset already folded in).
        shape: sizes per dimension, in elements.
        strides: steps per dimension, in elements (not bytes).
        dtype: the element :class:`~fi_ffi.dtypes.DType`.
        device: the :class:`~fi_ffi.dtypes.Device` that owns the memory.
        owner: an object kept alive as long as the descriptor (the producer of the memory), or None.

    A kernel call copies the descriptor's fields into a record the call owns, so a descriptor allocates no
    C memory; the layout (shape, strides, dtype, device) is interned as a small int (``_lid``) so the ops can
    remember what they validated by value, cheaply.
    """

    __slots__ = ("__weakref__", "_block", "_lid", "data_ptr", "device", "dtype", "ndim", "owner", "shape", "strides")

    data_ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: DType
    device: Device
    ndim: int
    owner: Any
    _lid: int  # interned layout id (see layout_id)
    _block: Any  # the DLTensor record made on demand by _dl_addr (generic calls, tests)

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
        if data_ptr.__class__ is not int or not 0 <= data_ptr < _PTR_END:
            _check_pointer(data_ptr)
        parsed = None
        if (
            shape.__class__ is tuple
            and strides is None
            and (dtype.__class__ is str or dtype.__class__ is DType)
            and (device.__class__ is int or device.__class__ is str)
        ):
            # The cache compares by value, so only the plain types _parse stores may look it up (False == 0,
            # 1.0 == 1, and an unhashable dict or list must reach _parse to be named).
            for v in shape:
                if v.__class__ is not int:
                    break
            else:
                parsed = _PARSED.get((shape, dtype, device))
        if parsed is None:
            parsed = _parse(shape, dtype, device, strides)
        self.data_ptr = data_ptr
        self.shape, self.strides, self.dtype, self.device, self.ndim, self._lid = parsed
        self.owner = owner
        self._block = None

    # a static method, not a class method: no bound method is made per descriptor (Tensor has no subclasses)
    @staticmethod
    def from_pointer(
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
        # A layout met before (the hot case: a runtime describing its buffers every step) is filled in here from
        # the parsed-layout cache, without the extra call into __init__ (about 15 % of this function's time);
        # everything else, and any argument that is not a plain int / tuple / str, goes through __init__, which
        # validates it and names what is wrong.
        if (
            data_ptr.__class__ is int
            and 0 <= data_ptr < _PTR_END
            and shape.__class__ is tuple
            and strides is None
            and (dtype.__class__ is str or dtype.__class__ is DType)
            and (device.__class__ is int or device.__class__ is str)
        ):
            for v in shape:
                if v.__class__ is not int:
                    break
            else:
                parsed = _PARSED.get((shape, dtype, device))
                if parsed is not None:  # (from_layout's lines inline)
                    t = _new(Tensor)
                    t.data_ptr = data_ptr
                    t.shape, t.strides, t.dtype, t.device, t.ndim, t._lid = parsed
                    t.owner = owner
                    t._block = None
                    return t
        return Tensor(data_ptr, shape, dtype, device, strides, owner)

    def rebind(self, data_ptr: int | None = None, *, leading: int | None = None, owner: Any = None) -> Tensor:
        """The same layout at another address and/or with another leading dimension (cheap: no re-parsing).

        For runtimes whose buffers move or whose batch size changes every step: ``out.rebind(ptr)``,
        ``q.rebind(leading=batch)``. ``leading`` keeps the strides (a contiguous tensor stays contiguous).
        ``owner`` replaces the owner (default: keep it).
        """
        t = _new(Tensor)
        ptr = self.data_ptr if data_ptr is None else data_ptr
        if ptr.__class__ is not int or not 0 <= ptr < _PTR_END:
            _check_pointer(ptr)
        shape = self.shape
        if leading is not None:
            if leading.__class__ is not int or not 0 <= leading < _INT64_END or not shape:
                if not shape:
                    raise ValueError("leading: a 0-D tensor has no leading dimension")
                raise ValueError(f"leading: expected an int in [0, 2**63), got {leading!r}")
            shape = (leading, *shape[1:])
        t.data_ptr = ptr
        t.shape = shape
        t.strides = self.strides
        t.dtype = self.dtype
        t.device = self.device
        t.ndim = self.ndim
        t.owner = self.owner if owner is None else owner
        t._block = None
        t._lid = self._lid if shape is self.shape else layout_id(shape, self.strides, self.dtype, self.device)
        return t

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

    @property
    def _dl_addr(self) -> int:
        """Address of a ``DLTensor`` record describing this tensor (made on first use, owned by the descriptor).

        Ops do not use it (they write records of their own); generic calls and tests do.
        """
        if self._block is None:
            self._block = _make_dltensor(self)
        return int(self._block[1])

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
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"offset: expected an int (elements), got {type(offset).__name__}")
        if offset < 0:
            raise ValueError(f"offset: expected >= 0 elements, got {offset}")
        return Tensor(
            self.data_ptr + offset * self.dtype.itemsize,
            shape,
            self.dtype,
            self.device,
            strides,
            self.owner if self.owner is not None else self,
        )

    def __repr__(self) -> str:
        return (
            f"Tensor(data_ptr=0x{self.data_ptr:x}, shape={self.shape}, strides={self.strides}, "
            f"dtype={self.dtype.name}, device={self.device})"
        )


def _parse(shape: Any, dtype: Any, device: Any, strides: Any) -> tuple[Any, ...]:
    """Validate a descriptor's layout arguments: (shape, strides, dtype, device, ndim, layout id)."""
    shape_t = shape if shape.__class__ is tuple and _small_ints(shape) else _sizes("shape", shape)
    if len(shape_t) > MAX_NDIM:
        raise ValueError(f"shape: at most {MAX_NDIM} dimensions, got {len(shape_t)}")
    if strides is None:
        strides_t = _CONTIGUOUS.get(shape_t) or _remember_contiguous(shape_t)
    else:
        strides_t = strides if strides.__class__ is tuple and _small_ints(strides) else _sizes("strides", strides)
        if len(strides_t) != len(shape_t):
            raise ValueError(f"strides: expected {len(shape_t)} entries to match shape {shape_t}, got {strides_t}")
    dt = _DTYPES.get(dtype) if dtype.__class__ is str or dtype.__class__ is DType else None
    if dt is None:
        try:
            dt = _dt.dtype(dtype)
        except TypeError as exc:
            raise TypeError(f"dtype: {exc}") from None
    dev = _DEVICES.get(device) if device.__class__ is int else None
    if dev is None:
        dev = _device(device)
    parsed = (shape_t, strides_t, dt, dev, len(shape_t), layout_id(shape_t, strides_t, dt, dev))
    if (
        strides is None
        and shape.__class__ is tuple
        and (dtype.__class__ is str or dtype.__class__ is DType)
        and (device.__class__ is int or device.__class__ is str)
    ):
        if len(_PARSED) >= 4096:
            _PARSED.clear()
        _PARSED[(shape, dtype, device)] = parsed
    return parsed


_PARSED: dict[tuple[Any, ...], tuple[Any, ...]] = {}
caches.register("descriptor layouts (parsed arguments, layout ids, row-major strides)", lambda: clear_layouts())


# ---- interned layouts ----------------------------------------------------------------------------------------

_layout_ids: dict[tuple[Any, ...], int] = {}
_next_layout_id = [1]
_MAX_LAYOUTS = 1 << 16


def layout_id(shape: tuple[int, ...], strides: tuple[int, ...], dtype: DType, device: Device) -> int:
    """A small int naming this layout; equal layouts get equal ids (until :func:`clear_layouts`)."""
    key = (shape, strides, dtype, device)
    found = _layout_ids.get(key)
    if found is None:
        if len(_layout_ids) >= _MAX_LAYOUTS:  # ids are never reused, so forgetting only costs re-validation
            _layout_ids.clear()
        found = _layout_ids[key] = _next_layout_id[0]
        _next_layout_id[0] += 1
    return found


# ---- the builders: the only code outside Tensor's own methods that makes a Tensor or writes its fields -------------
# (tests/package/test_structure.py holds every other module to that). A slot added to Tensor is set in __init__,
# from_pointer's cached case, rebind, and the three functions below.


def from_layout(layout: tuple[Any, ...], data_ptr: int, owner: Any) -> Tensor:
    """A descriptor at ``data_ptr`` owned by ``owner``, of a layout validated before: ``(shape, strides, dtype,
    device, ndim, layout id)``, as the parsed-layout caches here and in :mod:`fi_ffi.tensor.intake` hold it. No
    checks. (:meth:`Tensor.from_pointer`'s cached case fills the same slots inline.)"""
    t = _new(Tensor)
    t.data_ptr = data_ptr
    t.shape, t.strides, t.dtype, t.device, t.ndim, t._lid = layout
    t.owner = owner
    t._block = None
    return t


def from_checked(
    data_ptr: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype: DType, device: Device, owner: Any
) -> Tensor:
    """A descriptor from fields its caller has checked (a producer read by :mod:`fi_ffi.tensor.intake`): sizes and
    strides in elements, each in [0, 2**63), at most :data:`MAX_NDIM` of them; no check here, the layout id interned."""
    t = _new(Tensor)
    t.data_ptr = data_ptr
    t.shape = shape
    t.strides = strides
    t.dtype = dtype
    t.device = device
    t.ndim = len(shape)
    t.owner = owner
    t._block = None
    t._lid = layout_id(shape, strides, dtype, device)
    return t


def relocated(t: Tensor, data_ptr: Any, owner: Any = None) -> Tensor:
    """A copy of ``t`` (same layout, same layout id) with ``data_ptr`` and ``owner`` replaced, unchecked: ``data_ptr``
    may be a stand-in that is not an address (what :func:`fi_ffi.launch.pointer_rules.without_address` gives an op's
    check). For a real address use :meth:`Tensor.rebind`, which checks it."""
    v = _new(Tensor)
    v.data_ptr = data_ptr
    v.shape, v.strides, v.dtype, v.device, v.ndim = t.shape, t.strides, t.dtype, t.device, t.ndim
    v.owner = owner
    v._block = None
    v._lid = t._lid
    return v


def clear_layouts() -> None:
    """Forget the interned layouts (descriptors made later get new ids; see :mod:`fi_ffi.caches`)."""
    _layout_ids.clear()
    _PARSED.clear()
    _CONTIGUOUS.clear()


def _small_ints(values: tuple[Any, ...]) -> bool:
    """Every entry is a plain int in [0, 2**63) (the common case, checked without building anything)."""
    for v in values:  # noqa: SIM110 (a plain loop: all() with a generator costs ~0.3 us more per descriptor)
        if v.__class__ is not int or not 0 <= v < _INT64_END:
            return False
    return True


def _sizes(name: str, values: Any) -> tuple[int, ...]:
    out = _int_tuple(name, values)
    if any(not 0 <= s < _INT64_END for s in out):
        if name == "strides" and any(s < 0 for s in out):
            raise ValueError(f"strides: negative strides are not supported, got {out}")
        raise ValueError(f"{name}: sizes must be in [0, 2**63), got {out}")
    return out


def _remember_contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = contiguous_strides(shape)
    if strides and max(strides) >= _INT64_END:
        raise ValueError(f"strides: the row-major strides of shape {shape} exceed 2**63 elements")
    if len(_CONTIGUOUS) < 4096:
        _CONTIGUOUS[shape] = strides
    return strides


def _check_pointer(data_ptr: Any) -> None:
    if isinstance(data_ptr, bool) or not isinstance(data_ptr, int):
        raise TypeError(f"data_ptr: expected an int address, got {type(data_ptr).__name__}")
    if not 0 <= data_ptr < _PTR_END:
        raise ValueError(f"data_ptr: expected an address in [0, 2**64), got {data_ptr}")


def _int_tuple(name: str, values: Sequence[int]) -> tuple[int, ...]:
    if isinstance(values, (Mapping, Set, str, bytes)):  # iterable, but not a sequence of sizes (a dict's keys)
        raise TypeError(f"{name}: expected a sequence of ints, got {type(values).__name__}")
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
        import cffi

        ffi = _ffi = cffi.FFI()
    n = t.ndim
    block = ffi.new("char[]", _DLTENSOR.size + 16 * n)
    addr = int(ffi.cast("uintptr_t", block))
    buf = ffi.buffer(block)
    shape_addr = addr + _DLTENSOR.size
    strides_addr = shape_addr + 8 * n
    device_type = WIRE_DEVICE_TYPE.get(t.device.device_type, t.device.device_type)
    _DLTENSOR.pack_into(
        buf,
        0,
        t.data_ptr,
        device_type,
        t.device.device_id,
        n,
        t.dtype.code,
        t.dtype.bits,
        t.dtype.lanes,
        shape_addr,
        strides_addr,
        0,
    )
    struct.pack_into(f"<{2 * n}q", buf, _DLTENSOR.size, *t.shape, *t.strides)
    return block, addr


_DTYPES: dict[Any, DType] = {d: d for d in _dt.ALL}
_DTYPES.update({d.name: d for d in _dt.ALL})
_DEVICES: dict[int, Device] = {i: _dt.cuda(i) for i in range(64)}
_CONTIGUOUS: dict[tuple[int, ...], tuple[int, ...]] = {}
