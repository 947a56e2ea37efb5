"""Tensor intake: the one module that recognises each producer type and reads it.

Two readings of a tensor argument, both here, from one decision per producer type (:func:`producer`, one cache):

- :func:`as_tensor` (and :func:`describe`, the launcher's slow path) makes a
  :class:`~fi_ffi.tensor.descriptor.Tensor` of it, every field checked (the descriptor's builders write the fields);
- :func:`read` gives what an op call needs per call, ``(layout key, data pointer)``: the key is a hashable *value*
  standing for the layout, under which the launcher (:mod:`fi_ffi.launch.launcher`) remembers what passed its
  checks. The launcher's generated code does the reads of descriptors, torch tensors and CuPy arrays inline: it
  takes their source text from :func:`read_source` and the names that text uses from :func:`read_globals`, and
  :func:`follow_classes` keeps those names in step with the classes seen here.

==========================  ==============================================================================
producer                    read per call
==========================  ==============================================================================
:class:`~fi_ffi.Tensor`     ``(t._lid, t.data_ptr)``: the descriptor's interned layout id
``torch.Tensor``            ``shape``, ``stride()``, ``dtype``, ``device``, ``data_ptr()`` (no DLPack)
CuPy ``ndarray``            ``shape``, ``strides``, ``dtype``, ``data.device_id``, ``data.ptr``
CUDA array interface        the interface's ``shape``, ``strides``, ``typestr`` and ``data`` (no descriptor),
(a type with it, no DLPack) and the pointer's device from the driver (as :func:`as_tensor` does)
JAX array                   ready, single-device, row-major: ``is_ready()``, ``shape``, ``dtype``, ``sharding``
                            and the pointer (``__cuda_array_interface__``'s, or ``unsafe_buffer_pointer()``
                            after ``format.layout``: no capsule); otherwise as below
anything else               :func:`as_tensor` (DLPack, array interface) with the call's stream as the
                            DLPack consumer stream (JAX needs a real stream)
==========================  ==============================================================================

A key stands for the layout that :func:`describe` gives the same object, so a key the launcher has seen validated
means that layout. The default stream of a call (``stream=None``) follows the first tensor argument's framework,
as flashinfer and tvm_ffi do: torch's current stream of the tensor's device, CuPy's current stream, otherwise
TVM-FFI's current stream (:attr:`Producer.stream_source`). fi_ffi never imports torch, CuPy or JAX: a type is
recognised only if its module is already imported.

:func:`as_tensor` describes, without copying, the memory of

1. a :class:`~fi_ffi.tensor.Tensor` (returned as is);
2. a ``torch.Tensor`` (exactly that class or ``torch.nn.Parameter``), read directly through ``data_ptr()``,
   ``shape``, ``stride()``, ``dtype`` and ``device``. fi_ffi never imports torch: an object is only a torch
   tensor if torch is already in ``sys.modules`` and its type is torch's;
3. any DLPack producer (``__dlpack__``/``__dlpack_device__``): numpy, CuPy, JAX, cuda.core ``Buffer`` and
   ``StridedMemoryView``, torch tensor subclasses, ...;
4. an object with ``__cuda_array_interface__`` (v2/v3: numba, ...). CAI does not say which device owns the
   pointer, so the CUDA driver is asked (``cuPointerGetAttributes``; managed memory is CUDA_MANAGED, pinned
   host memory CUDA_HOST); on a machine without a usable driver the device is taken to be ``cuda:0``;
5. an object with numpy's ``__array_interface__`` (host memory), used when DLPack refuses the dtype (numpy
   arrays of ml_dtypes' bfloat16/float8) or the object has no ``__dlpack__``.

The descriptor's ``owner`` is the producer, so the memory lives as long as the descriptor: every protocol
above exports a view of the producer's own memory (fi_ffi never asks DLPack for a copy, and refuses one
flagged ``IS_COPIED``). Strides are in elements; a byte offset is folded into ``data_ptr``. Negative strides,
byte strides that are not a multiple of the item size, device types other than CPU/CUDA/CUDA_HOST/
CUDA_MANAGED and dtypes outside :mod:`fi_ffi.dtypes` raise ``ValueError``/``TypeError`` naming the argument.

Streams. fi_ffi never synchronizes implicitly, so by default (``stream=-1``) the producer is asked for no
synchronization (DLPack's ``stream=-1``) and the caller orders its streams: the data must be ready on the
stream the kernel will run on. Pass ``stream=<handle or stream object>`` to have a DLPack producer order its
pending work before that stream (torch and CuPy record an event and make the stream wait on it), or
``stream=None`` for DLPack's legacy-default-stream meaning. A ``cudaStream_t`` value of 0 is passed as
DLPack's 1 (legacy default stream; DLPack forbids 0). Host producers are always asked with ``stream=None``,
the only value DLPack allows for them. For CAI producers whose interface names a ``stream`` (v3), an explicit
``stream`` makes that stream wait on the producer's stream through a CUDA event; the default does nothing.

Why DLPack is read here, through cffi, rather than by cuda.core's ``StridedMemoryView`` (SMV). Per-call costs
measured on the GPU host (Python 3.12, torch 2.11, CuPy 14.2, cuda-core 1.2.0; best of 5 x 50k calls):

==========================================================  =========
building the descriptor itself (``Tensor``; in every path)    2.5 us
``as_tensor(torch CUDA tensor)``, fast path                   3.5 us
``as_tensor(torch CUDA tensor)`` through DLPack               9.6-11.8 us (``__dlpack__`` alone: 2.6 us)
``as_tensor(CuPy array)`` (DLPack read here)                   6.4-9.0 us
``SMV.from_dlpack(CuPy array)`` + reading its fields           1.6 us (+ 2.5 us to build, + dtype mapping)
``as_tensor(numpy array)``                                     5.9 us
==========================================================  =========

The DLPack read (``__dlpack_device__``, ``__dlpack__``, ``PyCapsule_IsValid`` and ``PyCapsule_GetPointer``
through cffi, then the fields) costs ~2.5-3.5 us where SMV's compiled reader costs ~1.6 us, so SMV would
save 1-2 us per CuPy/numpy conversion. It is not used because it is not robust enough for this package:
its ``dtype`` is a numpy dtype, so bfloat16 and float8 tensors raise without the optional ml_dtypes (its
re-export of a bfloat16 view fails the same way); it reports only a ``device_id`` (-1 for host), losing the
DLPack device type (CUDA vs managed vs pinned host); the direct constructor is deprecated in 1.x (API churn);
importing it costs ~230 ms; and cuda-core is not a dependency. For torch, the main producer, the fast path
below already matches SMV's own torch path (~0.75 us to read the attributes). fi_ffi reads the DLPack structs
itself (``dlpack.h`` 1.x layouts; ``tests/tensor/test_interop.py`` checks them against :mod:`fi_ffi.abi.cdefs`).
The capsule is not consumed: it is never renamed, so when it is dropped (right after reading) the producer's
capsule destructor calls the deleter, as for any capsule nobody consumed; the memory stays valid through
``owner``.

The torch fast path reads ``data_ptr()``, ``shape``, ``stride()``, ``dtype`` and ``device`` instead of calling
``torch.Tensor.__dlpack__`` (a Python function with several checks, then ``torch._C._to_dlpack``): 2.7x faster
(above). It covers strided tensors on ``cuda`` and ``cpu`` (pinned ones included, as CPU: the kernels' host
checks want kDLCPU, whereas torch's DLPack says CUDA_HOST), rejects lazily negated views (``is_neg()``), and
goes through DLPack when an explicit ``stream`` asks torch to order its work.

Remembered layouts. Once a torch tensor (or a CuPy array, described through DLPack) has been described
with every field checked, its layout (shape, strides, dtype, device, layout id) is remembered under the
producer's own values (torch: ``shape``, ``stride()``, ``dtype``, ``device``; CuPy: ``shape``, ``strides``,
``dtype``, ``__dlpack_device__()``), values only. A later tensor with the same values is described by reading
them and its pointer (torch: ``data_ptr()``, after the ``is_neg()`` test; a non-strided layout has no
``stride()``, so it is described in full; CuPy: ``data.ptr``): no capsule, no re-validation. The table is
bounded (cleared when full) and cleared with :func:`fi_ffi.caches.reset`.
"""

from __future__ import annotations

import operator
import sys
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import cffi

from .. import caches
from .. import dtypes as _dt
from ..cuda import driver
from ..dtypes import CPU, CUDA, CUDA_HOST, CUDA_MANAGED, Device, DType
from .descriptor import MAX_NDIM, Tensor, contiguous_strides, from_checked, from_layout
from .protocols import StreamLike, TensorLike
from .streams import stream_handle

__all__ = [
    "Producer",
    "Reader",
    "StreamSource",
    "as_tensor",
    "default_stream",
    "describe",
    "dlpack_stream",
    "follow_classes",
    "is_jax_array_type",
    "jax_row_major_pointer",
    "pointer_device",
    "producer",
    "producers",
    "read",
    "read_globals",
    "read_source",
    "stream_source",
]

_INT64_END = 1 << 63
_MAX_VERSION = (1, 3)  # the newest dlpack.h this reader follows; every 1.x shares the struct layouts
_VERSIONED = b"dltensor_versioned"
_LEGACY = b"dltensor"
_FLAG_IS_COPIED = 1 << 1
_DEVICE_TYPES = frozenset((CPU, CUDA, CUDA_HOST, CUDA_MANAGED))
_STREAMLESS = frozenset((CPU, CUDA_HOST))  # DLPack allows only stream=None for these

# The DLPack structs with ``data`` as an integer (no pointer cdata to convert) and the two CPython capsule
# calls, with the capsule passed as its address (``id()``) so no cdata is built per call. cffi releases the
# GIL around calls; both functions only read the capsule (never set an exception: GetPointer is called only
# after IsValid accepted the same name), and our reference keeps it alive meanwhile.
_CDEFS = """
typedef struct {
    uint64_t data; int32_t device_type; int32_t device_id; int32_t ndim;
    uint8_t code; uint8_t bits; uint16_t lanes;
    int64_t* shape; int64_t* strides; uint64_t byte_offset;
} DLTensor;
typedef struct {
    uint32_t major; uint32_t minor; void* manager_ctx; void* deleter; uint64_t flags; DLTensor dl_tensor;
} DLManagedTensorVersioned;
int PyCapsule_IsValid(uintptr_t capsule, const char* name);
DLManagedTensorVersioned* PyCapsule_GetPointer(uintptr_t capsule, const char* name);
"""
_ffi: Any = None
_py: Any = None

Describer = Callable[[Any, str, Any], Tensor]  # (obj, argument name, DLPack consumer stream) -> descriptor
Reader = Callable[[Any, Any], tuple[Hashable, int]]  # (obj, the call's stream) -> (layout key, data pointer)
StreamSource = Callable[[int], int]  # device ordinal -> the framework's current cudaStream_t


class Producer:
    """How objects of one producer type are read: found once per type by :func:`producer` (the one class cache).

    Attributes:
        describe: ``(obj, name, stream) -> Tensor``, every field checked (:func:`as_tensor`'s reading).
        read: ``(obj, stream) -> (layout key, data pointer)``, what an op call reads (:func:`read`).
        stream_source: where a call whose first tensor argument is of this type takes its default stream from:
            a function of the device ordinal returning the framework's current ``cudaStream_t`` (torch, CuPy), or
            None for TVM-FFI's current stream of the device (nothing to set).
    """

    __slots__ = ("describe", "read", "stream_source")

    def __init__(self, describe: Describer, read: Reader, stream_source: StreamSource | None) -> None:
        self.describe = describe
        self.read = read
        self.stream_source = stream_source

    def __repr__(self) -> str:
        return f"Producer({self.describe.__name__}, {self.read.__name__})"


# The producer found per type (filled by producer(); the one class cache): ``producers.get(tp) or producer(tp)`` is
# producer(tp) without a call when the type was seen, as as_tensor, the ops and the launchers' generated code read it.
producers: dict[type, Producer] = {}
_legacy_exporters: set[type] = set()  # types whose __dlpack__ does not take max_version
_devices: dict[tuple[int, int], Device] = {}
_torch_dtypes: dict[Any, DType] = {}
_torch_strided: Any = None

# The layout of a descriptor, remembered under the producer's own description of it (torch: shape, stride(), dtype,
# device; CuPy: shape, strides, dtype, __dlpack_device__()): a producer seen before is described by reading those
# values and its pointer, without DLPack or re-validation. Values only, never the producer.
Layout = tuple[tuple[int, ...], tuple[int, ...], DType, Device, int, int]  # shape, strides, dtype, device, ndim, lid
_layouts: dict[Any, Layout] = {}
_MAX_LAYOUTS = 4096  # cleared when full (forgetting only costs one slow description)


class _NotSeen:
    """Stands for a framework's class until its first object is read (no object is of this class)."""


# torch.Tensor, torch.nn.Parameter and cupy.ndarray once an object of each was read (fi_ffi never imports torch or
# CuPy itself): as_tensor's inline fast path tests the first two, the launchers' generated code the first and third
# (as _TT and _CP of its namespace: follow_classes keeps them in step).
_torch_tensor: type = _NotSeen
_torch_parameter: type = _NotSeen
_cupy_ndarray: type = _NotSeen


def as_tensor(obj: TensorLike, *, name: str = "tensor", stream: StreamLike = -1) -> Tensor:
    """A :class:`~fi_ffi.tensor.Tensor` describing ``obj``'s memory (no copy); ``obj`` becomes its ``owner``.

    Args:
        obj: a Tensor, a torch tensor, a DLPack producer, or an object with ``__cuda_array_interface__`` or
            ``__array_interface__`` (see the module docstring for the order).
        name: the argument name used in error messages.
        stream: the consumer stream for DLPack's synchronization: ``-1`` (default) asks for none, ``None``
            means the legacy default stream, otherwise an int ``cudaStream_t`` or a stream object (see
            :func:`fi_ffi.tensor.streams.stream_handle`).

    Raises:
        TypeError: ``obj`` speaks none of the protocols, its dtype is not in :mod:`fi_ffi.dtypes`, or its
            producer refused to export it.
        ValueError: negative or fractional strides, an unsupported device type, more than 16 dimensions.
    """
    if type(obj) is Tensor:
        return obj
    tp = type(obj)
    if (tp is _torch_tensor or tp is _torch_parameter) and stream.__class__ is int and stream == -1:
        # a torch tensor of a layout described before (_from_torch remembers them), inline: a call into a handler
        # costs ~10 % of this path. The neg bit is not part of the layout, so it is asked
        src: Any = obj  # (a torch tensor)
        try:
            found = _layouts.get((src.shape, src.stride(), src.dtype, src.device))
        except Exception:
            found = None
        if found is not None and not src.is_neg():
            return from_layout(found, src.data_ptr(), src)
    # ``stream`` itself stays referenced until the export is done: a stream object made for this call (say
    # ``stream=cupy.cuda.Stream()``) would otherwise be destroyed before the producer waits on its handle.
    handle = stream if type(stream) is int and stream == -1 else _dlpack_stream(stream)
    return (producers.get(tp) or producer(tp)).describe(obj, name, handle)


def producer(tp: type) -> Producer:
    """How objects of type ``tp`` are read (decided once per type: the only place a producer type is recognised)."""
    found = producers.get(tp)
    if found is None:
        found = producers[tp] = _producer_for(tp)
    return found


def _producer_for(tp: type) -> Producer:
    global _torch_tensor, _torch_parameter, _cupy_ndarray
    if tp is Tensor:
        return Producer(_same, _read_descriptor, None)
    module = tp.__module__ or ""
    torch = sys.modules.get("torch") if module.startswith("torch") else None
    cupy = sys.modules.get("cupy") if module.startswith("cupy") else None
    source = _stream_source(tp, torch, cupy)
    if torch is not None and (tp is torch.Tensor or tp is torch.nn.Parameter):
        _torch_tensor, _torch_parameter = torch.Tensor, torch.nn.Parameter
        _classes_changed()
        return Producer(_from_torch, _read_torch, source)
    if cupy is not None and tp is cupy.ndarray:
        _cupy_ndarray = cupy.ndarray
        _classes_changed()
        return Producer(_from_cupy, _read_cupy, source)
    if is_jax_array_type(tp):
        return Producer(_from_jax, _read_jax, source)
    if hasattr(tp, "__dlpack__"):
        return Producer(_from_dlpack, _read_any, source)
    if hasattr(tp, "__cuda_array_interface__"):
        return Producer(_from_cai, _read_cai, source)
    if hasattr(tp, "__array_interface__"):
        return Producer(_from_array_interface, _read_any, source)
    return Producer(_from_instance_interface, _read_any, source)


def _same(obj: Tensor, name: str, stream: Any) -> Tensor:
    return obj


def _from_instance_interface(obj: Any, name: str, stream: Any) -> Tensor:
    """A type with no protocol of its own: an interface set on the instance (not a property of the type), or none."""
    if hasattr(obj, "__cuda_array_interface__"):
        return _from_cai(obj, name, stream)
    if hasattr(obj, "__array_interface__"):
        return _from_array_interface(obj, name, stream)
    raise TypeError(
        f"{name}: expected a fi_ffi.Tensor, a torch tensor, a DLPack producer (__dlpack__) or an "
        f"object with __cuda_array_interface__ / __array_interface__, got {type(obj).__name__}"
    )


def is_jax_array_type(tp: type) -> bool:
    """Whether ``tp`` is JAX's array class (``jaxlib``'s ``ArrayImpl``) with what :func:`_from_jax` reads."""
    return (tp.__module__ or "").startswith("jaxlib") and all(
        hasattr(tp, a) for a in ("__dlpack__", "is_ready", "sharding", "format", "unsafe_buffer_pointer")
    )


def _dlpack_stream(stream: Any) -> int | None:
    """The ``stream`` value to hand to ``__dlpack__`` for a CUDA producer."""
    if stream is None:
        return None
    handle = stream_handle(stream)
    if handle is None:
        return None
    if handle < -1:
        raise ValueError(f"stream: expected -1, None or a stream handle >= 0, got {handle}")
    return 1 if handle == 0 else handle  # cudaStream_t 0 is the legacy default stream: DLPack's 1


def _remember(key: Any, t: Tensor) -> None:
    if len(_layouts) >= _MAX_LAYOUTS:
        _layouts.clear()
    _layouts[key] = (t.shape, t.strides, t.dtype, t.device, t.ndim, t._lid)


def _device(device_type: int, device_id: int, name: str) -> Device:
    device = _devices.get((device_type, device_id))
    if device is None:
        if not 0 <= device_id < 1 << 31 and not (device_type in (CPU, CUDA_HOST) and device_id == -1):
            raise ValueError(f"{name}: device ordinal {device_id} is outside [0, 2**31)")
        if device_type not in _DEVICE_TYPES:
            raise ValueError(
                f"{name}: device type {int(device_type)} is not supported (expected CPU=1, CUDA=2, "
                f"CUDA_HOST=3 or CUDA_MANAGED=13)"
            )
        device = _devices[(int(device_type), int(device_id))] = Device(int(device_type), int(device_id))
    return device


def _check_layout(name: str, shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
    if len(shape) > MAX_NDIM:
        raise ValueError(f"{name}: at most {MAX_NDIM} dimensions are supported, got {len(shape)}")
    if strides and min(strides) < 0:
        raise ValueError(f"{name}: negative strides are not supported, got strides {strides} (in elements)")
    if (shape and max(shape) >= _INT64_END) or (strides and max(strides) >= _INT64_END):
        raise ValueError(f"{name}: sizes and strides must be below 2**63, got shape {shape}, strides {strides}")


# ---- torch -------------------------------------------------------------------------------------------------


def _from_torch(obj: Any, name: str, stream: Any) -> Tensor:
    """A torch tensor whose layout :func:`as_tensor`'s inline fast path did not find: described, every field
    checked, and remembered (only strided tensors are: ``stride()`` raises for every other layout, sparse or
    mkldnn, so such a tensor is always described here, and refused)."""
    t = _describe_torch(obj, name, stream)
    if t.owner is obj and stream == -1:  # (not through DLPack)
        _remember((obj.shape, obj.stride(), obj.dtype, obj.device), t)
    return t


def _describe_torch(obj: Any, name: str, stream: Any) -> Tensor:
    """A torch tensor described from its attributes, every field checked (or through DLPack for a stream)."""
    if obj.is_cuda:
        if stream != -1:
            return _from_dlpack(obj, name, stream)  # torch orders its pending work before ``stream``
        device = _devices.get((CUDA, obj.get_device())) or _device(CUDA, obj.get_device(), name)
    elif obj.device.type == "cpu":
        device = _device(CPU, 0, name)
    else:
        raise ValueError(f"{name}: torch tensors on {obj.device} are not supported (expected cuda or cpu)")
    dtype = _torch_dtypes.get(obj.dtype) or _torch_dtype(obj.dtype, name)
    if obj.layout is not _torch_strided:
        raise TypeError(f"{name}: expected a strided (dense) torch tensor, got layout {obj.layout}")
    if obj.is_neg():
        raise ValueError(f"{name}: the tensor is a lazily negated view (is_neg()); call .resolve_neg() first")
    shape = tuple(obj.shape)
    if len(shape) > MAX_NDIM:
        raise ValueError(f"{name}: at most {MAX_NDIM} dimensions are supported, got {len(shape)}")
    return from_checked(obj.data_ptr(), shape, obj.stride(), dtype, device, obj)


def _from_cupy(obj: Any, name: str, stream: Any) -> Tensor:
    """A CuPy array: its first description of a layout goes through DLPack (every field checked); after that the
    layout is remembered under CuPy's own values and the pointer is read from ``data.ptr`` (no capsule)."""
    if stream == -1:
        found = _layouts.get((obj.shape, obj.strides, obj.dtype, obj.__dlpack_device__()))
        if found is not None:
            return from_layout(found, obj.data.ptr, obj)
    t = _from_dlpack(obj, name, stream)
    if stream == -1 and t.data_ptr == obj.data.ptr:  # (DLPack's data + byte_offset is CuPy's pointer)
        _remember((obj.shape, obj.strides, obj.dtype, obj.__dlpack_device__()), t)
    return t


# (dtype, sharding) of JAX arrays whose array interface JAX refused though they are row-major (bfloat16, float8,
# CPU arrays): their order is asked through ``format`` directly (JAX's refusal is an exception: ~7 us). Values only.
_jax_without_interface: set[Any] = set()


def jax_row_major_pointer(a: Any) -> int:
    """The data pointer of JAX array ``a`` if it is a single-device array in row-major order; raises otherwise.

    JAX places arrays in other layouts too, on GPUs as well (``jax.experimental.layout``), so the order is asked
    every time: through ``__cuda_array_interface__`` (0.8 us on the GPU machine), which JAX gives only for a
    single-device GPU array in row-major order, or, for the dtypes and devices it gives none for (bfloat16,
    float8, CPU arrays), through ``a.format.layout`` (1.5 us): dimension 0 most major, then 1, ..., and no
    tiling, with ``a.unsafe_buffer_pointer()``, which JAX gives only for a single-device array.
    """
    kind = (a.dtype, a.sharding)
    refused = False
    if kind not in _jax_without_interface:
        try:
            return a.__cuda_array_interface__["data"][0]  # type: ignore[no-any-return]
        except Exception:
            refused = True
    layout = a.format.layout
    if tuple(layout.major_to_minor) != tuple(range(a.ndim)) or layout.tiling:  # row-major: (0, 1, ...)
        raise ValueError("not in row-major order")
    ptr = a.unsafe_buffer_pointer()
    if refused:  # row-major, yet no interface: its dtype or device has none
        if len(_jax_without_interface) >= 256:
            _jax_without_interface.clear()
        _jax_without_interface.add(kind)
    return ptr  # type: ignore[no-any-return]


def _from_jax(obj: Any, name: str, stream: Any) -> Tensor:
    """A JAX array: a ready, single-device, row-major one of a layout met before is described from JAX's own
    values, with no DLPack capsule (2-3 us against 10-13 us); every other through DLPack.

    ``is_ready()``: its data is computed, so no work needs ordering before any stream (the DLPack path would hand
    JAX the stream to wait on). :func:`jax_row_major_pointer` holds only for a single-device array in row-major
    order, so a layout remembered under (shape, dtype, sharding) is only ever used for a row-major array. The
    first description of a layout goes through DLPack, every field checked.
    """
    try:
        found = _layouts.get((obj.shape, obj.dtype, obj.sharding)) if obj.is_ready() else None
        if found is not None:
            ptr = jax_row_major_pointer(obj)
    except Exception:  # deleted, sharded, not row-major: DLPack describes it (or names what is wrong)
        found = None
    if found is not None:
        return from_layout(found, ptr, obj)
    t = _from_dlpack(obj, name, stream)
    try:
        ready = obj.is_ready() and jax_row_major_pointer(obj) == t.data_ptr
    except Exception:
        ready = False
    if ready and t.strides == contiguous_strides(t.shape):
        _remember((obj.shape, obj.dtype, obj.sharding), t)
    return t


def _torch_dtype(value: Any, name: str) -> DType:
    global _torch_strided
    _torch_strided = sys.modules["torch"].strided
    try:
        found = _dt.dtype(value)
    except TypeError as exc:
        raise TypeError(f"{name}: {exc}") from None
    _torch_dtypes[value] = found
    return found


# ---- DLPack -------------------------------------------------------------------------------------------------


def _capsule_api() -> tuple[Any, Any]:
    global _ffi, _py
    if _py is None:
        ffi = cffi.FFI()
        ffi.cdef(_CDEFS)
        _ffi, _py = ffi, ffi.dlopen(None)
    return _ffi, _py


def _from_dlpack(obj: Any, name: str, stream: Any) -> Tensor:
    ffi, py = _ffi, _py
    if py is None:
        ffi, py = _capsule_api()
    tp = type(obj)
    try:
        device_type = obj.__dlpack_device__()[0]
    except AttributeError:
        device_type = None
    except Exception as exc:  # a producer whose device query fails: named, not a stray error
        raise TypeError(f"{name}: {tp.__name__}.__dlpack_device__() failed: {type(exc).__name__}: {exc}") from exc
    host = device_type in _STREAMLESS or device_type is None
    try:
        if host:
            stream = None
        elif stream == -1 and (tp.__module__ or "").startswith(("jax", "jaxlib")):
            # JAX takes a DLPack stream as a CUDA stream handle to order its work before, and fails on -1
            # (CUDA_ERROR_INVALID_HANDLE); None makes it wait until the array is ready. Ops pass their real stream.
            stream = None
        if tp in _legacy_exporters:
            capsule = obj.__dlpack__(stream=stream)
        else:
            try:
                capsule = obj.__dlpack__(stream=stream, max_version=_MAX_VERSION)
            except TypeError:  # a pre-1.0 producer: no max_version keyword
                capsule = obj.__dlpack__(stream=stream)
                _legacy_exporters.add(tp)
    except Exception as exc:
        # a host array DLPack cannot carry (numpy arrays of ml_dtypes' bfloat16, packed record fields): the
        # array interface describes it; device producers never fall back (their refusal may be about streams)
        if host and hasattr(obj, "__array_interface__"):
            return _from_array_interface(obj, name, stream)
        raise TypeError(f"{name}: {tp.__name__}.__dlpack__ refused to export it: {exc}") from exc

    address = id(capsule)
    if py.PyCapsule_IsValid(address, _VERSIONED):
        managed = py.PyCapsule_GetPointer(address, _VERSIONED)
        if managed.major != 1:
            raise TypeError(f"{name}: {tp.__name__} exported DLPack {managed.major}.{managed.minor}; fi_ffi reads 1.x")
        if managed.flags & _FLAG_IS_COPIED:
            raise ValueError(
                f"{name}: {tp.__name__} exported a copy (DLPack flag IS_COPIED); fi_ffi describes "
                f"memory in place and never asks for a copy"
            )
        t = managed.dl_tensor
    elif py.PyCapsule_IsValid(address, _LEGACY):
        t = ffi.cast("DLTensor*", py.PyCapsule_GetPointer(address, _LEGACY))  # DLManagedTensor starts with it
    else:
        raise TypeError(
            f"{name}: {tp.__name__}.__dlpack__ returned {type(capsule).__name__}, not an unconsumed DLPack capsule"
        )

    device = _devices.get((t.device_type, t.device_id)) or _device(t.device_type, t.device_id, name)
    try:
        dtype = _dt.from_dlpack(t.code, t.bits, t.lanes)
    except TypeError as exc:
        raise TypeError(f"{name}: {exc}") from None
    n = t.ndim
    shape = tuple(ffi.unpack(t.shape, n)) if n else ()
    if n and t.strides != ffi.NULL:
        strides = tuple(ffi.unpack(t.strides, n))
        _check_layout(name, shape, strides)
    else:  # DLPack < 1.2 allowed NULL strides for compact row-major tensors
        strides = contiguous_strides(shape)
        _check_layout(name, shape, strides)
    return from_checked(t.data + t.byte_offset, shape, strides, dtype, device, obj)


# ---- __cuda_array_interface__ / __array_interface__ ---------------------------------------------------------

# typestr without the byte-order character -> dtype (little-endian or byte-order-free only).
_TYPESTR = {
    "f2": _dt.float16,
    "f4": _dt.float32,
    "i1": _dt.int8,
    "i4": _dt.int32,
    "i8": _dt.int64,
    "u1": _dt.uint8,
    "u2": _dt.uint16,
    "u4": _dt.uint32,
    "b1": _dt.bool_,
}


def _interface_dtype(obj: Any, typestr: Any, name: str, what: str) -> DType:
    if isinstance(typestr, str) and len(typestr) >= 3 and typestr[0] in "<|=":
        found = _TYPESTR.get(typestr[1:])
        if found is not None and (typestr[0] != "=" or sys.byteorder == "little"):
            return found
    if isinstance(typestr, str) and (typestr[:1] == ">" or (typestr[:1] == "=" and sys.byteorder == "big")):
        raise TypeError(
            f"{name}: big-endian data (typestr {typestr!r} in {what}) is not supported: the kernels read "
            f"little-endian values; convert it first (e.g. numpy's .astype('<f2'))"
        )
    # a dtype the typestr cannot spell (ml_dtypes' bfloat16 and float8 are '|V2' / '|V1'): ask the object,
    # and accept its answer when the sizes agree
    value = getattr(obj, "dtype", None)
    if value is not None and isinstance(typestr, str) and typestr[2:].isdigit():
        try:
            found = _dt.dtype(value)
        except TypeError:
            found = None
        if found is not None and found.itemsize == int(typestr[2:]):
            return found
    known = ", ".join(d.name for d in _dt.ALL)
    raise TypeError(f"{name}: unsupported dtype (typestr {typestr!r} in {what}): expected one of {known}")


def _interface_fields(
    obj: Any, iface: Any, name: str, what: str
) -> tuple[int, tuple[int, ...], tuple[int, ...], DType]:
    """(data_ptr, shape, strides in elements, dtype) from an array-interface dict."""
    if not isinstance(iface, dict):
        raise TypeError(f"{name}: {what} must be a dict, got {type(iface).__name__}")
    try:
        shape_v, typestr, data = iface["shape"], iface["typestr"], iface["data"]
    except KeyError as exc:
        raise TypeError(f"{name}: {what} has no {exc.args[0]!r} entry") from None
    if iface.get("mask") is not None:
        raise ValueError(f"{name}: masked arrays ({what} with a 'mask') are not supported")
    if not (isinstance(data, tuple) and len(data) == 2 and _is_int(data[0])):
        raise TypeError(f"{name}: {what} 'data' must be an (address, read_only) pair, got {data!r}")
    ptr = int(data[0])
    if not 0 <= ptr < 1 << 64:
        raise ValueError(f"{name}: {what} address {ptr} is out of range")
    shape = _ints(shape_v, name, what, "shape")
    if min(shape, default=0) < 0:
        raise ValueError(f"{name}: {what} 'shape' has a negative size: {shape}")
    dtype = _interface_dtype(obj, typestr, name, what)
    byte_strides = iface.get("strides")
    if byte_strides is None:
        strides = contiguous_strides(shape)
    else:
        byte_strides = _ints(byte_strides, name, what, "strides")
        if len(byte_strides) != len(shape):
            raise ValueError(f"{name}: {what} has {len(byte_strides)} strides for shape {shape}")
        item = dtype.itemsize
        if any(s % item for s in byte_strides):
            raise ValueError(
                f"{name}: strides {byte_strides} (bytes) are not multiples of the item size {item} of {dtype.name}"
            )
        strides = tuple(s // item for s in byte_strides)
    _check_layout(name, shape, strides)
    return ptr, shape, strides, dtype


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and hasattr(v, "__index__")


def _ints(values: Any, name: str, what: str, key: str) -> tuple[int, ...]:
    try:
        return tuple(map(operator.index, values))
    except TypeError:
        raise TypeError(f"{name}: {what} {key!r} must be a tuple of ints, got {values!r}") from None


def _from_array_interface(obj: Any, name: str, stream: Any) -> Tensor:
    ptr, shape, strides, dtype = _interface_fields(obj, obj.__array_interface__, name, "__array_interface__")
    return from_checked(ptr, shape, strides, dtype, _device(CPU, 0, name), obj)


def _from_cai(obj: Any, name: str, stream: Any) -> Tensor:
    iface = obj.__cuda_array_interface__
    ptr, shape, strides, dtype = _interface_fields(obj, iface, name, "__cuda_array_interface__")
    device = pointer_device(ptr, name)
    producer = iface.get("stream")
    if stream != -1 and producer is not None:
        _wait(producer, stream, device, name)
    return from_checked(ptr, shape, strides, dtype, device, obj)


# The CUDA driver calls of the CUDA array interface (the pointer's device, the producer-stream wait) go through
# fi_ffi.cuda.driver (see there why not cuda-bindings).
_ATTRIBUTES = (2, 9, 8)  # CU_POINTER_ATTRIBUTE_MEMORY_TYPE, _DEVICE_ORDINAL, _IS_MANAGED
_MEMORYTYPE_HOST, _MEMORYTYPE_DEVICE = 1, 2
_EVENT_DISABLE_TIMING = 2


class _Query(threading.local):
    """This thread's argument buffers of ``cuPointerGetAttributes`` (made once, not per call)."""

    def __init__(self) -> None:
        ffi = driver.ffi()
        self.values = ffi.new("int64_t[3]")
        self.data = ffi.new("void*[3]", [self.values + i for i in range(3)])
        self.attributes = ffi.new("int[3]", _ATTRIBUTES)


_query: _Query | None = None


def pointer_device(ptr: int, name: str) -> Device:
    """The device owning CAI pointer ``ptr``; ``cuda:0`` when no CUDA driver can be asked."""
    global _query
    lib = driver.load()
    if lib is None:
        return _device(CUDA, 0, name)
    ffi = driver.ffi()
    if ptr == 0:  # empty arrays may carry NULL: take the current device
        current = ffi.new("int*")
        return _device(CUDA, current[0] if lib.cuCtxGetDevice(current) == 0 else 0, name)
    query = _query
    if query is None:
        query = _query = _Query()
    values, data = query.values, query.data
    values[0] = values[1] = values[2] = 0  # each attribute writes at most 4 bytes
    err = lib.cuPointerGetAttributes(3, query.attributes, data, ptr)
    if err:
        raise ValueError(f"{name}: the CUDA driver cannot describe pointer 0x{ptr:x} ({driver.error_name(err)})")
    mem_type, managed = values[0] & 0xFFFFFFFF, values[2] & 0xFF
    ordinal = values[1] & 0xFFFFFFFF
    ordinal -= (ordinal >> 31) << 32  # an int32 (-2 for host memory)
    if managed:
        return _device(CUDA_MANAGED, ordinal, name)
    if mem_type == _MEMORYTYPE_DEVICE:
        return _device(CUDA, ordinal, name)
    if mem_type == _MEMORYTYPE_HOST:
        return _device(CUDA_HOST, max(ordinal, 0), name)
    raise ValueError(
        f"{name}: __cuda_array_interface__ pointer 0x{ptr:x} is not memory allocated, mapped or registered through CUDA"
    )


def _wait(producer: Any, consumer: int | None, device: Device, name: str) -> None:
    """Make ``consumer`` wait for the work queued so far on the CAI ``producer`` stream (an event, no sync)."""
    if not _is_int(producer) or int(producer) <= 0:
        raise ValueError(f"{name}: __cuda_array_interface__ 'stream' must be None or a handle > 0, got {producer!r}")
    producer = int(producer)
    consumer = 1 if consumer is None else consumer  # CAI/DLPack 1: the legacy default stream
    if producer == consumer:
        return
    lib = driver.load()
    if lib is None:
        raise ValueError(
            f"{name}: cannot order stream {consumer} after the producer's stream {producer}: no usable CUDA driver"
        )
    ffi = driver.ffi()
    handle, context, event = ffi.new("int*"), ffi.new("void**"), ffi.new("uintptr_t*")
    # the event lives in the primary context of the array's device, made current for these calls only
    err = lib.cuDeviceGet(handle, device.device_id) or lib.cuDevicePrimaryCtxRetain(context, handle[0])
    if err:
        raise ValueError(f"{name}: no CUDA context for {device} ({driver.error_name(err)})")
    try:
        err = lib.cuCtxPushCurrent_v2(context[0])
        if err:
            raise ValueError(f"{name}: cannot make the context of {device} current ({driver.error_name(err)})")
        try:
            err = lib.cuEventCreate(event, _EVENT_DISABLE_TIMING)
            if not err:
                err = lib.cuEventRecord(event[0], producer) or lib.cuStreamWaitEvent(consumer, event[0], 0)
                lib.cuEventDestroy_v2(event[0])  # released once the wait is done
            if err:
                raise ValueError(
                    f"{name}: ordering stream {consumer} after the producer's stream {producer} failed "
                    f"({driver.error_name(err)})"
                )
        finally:
            lib.cuCtxPopCurrent_v2(ffi.new("void**"))
    finally:
        lib.cuDevicePrimaryCtxRelease_v2(handle[0])


# ---- per-call reads -------------------------------------------------------------------------------------------


def _read_descriptor(t: Tensor, stream: Any) -> tuple[Hashable, int]:
    return t._lid, t.data_ptr


def _read_torch(t: Any, stream: Any) -> tuple[Hashable, int]:
    if t.is_neg():  # (conjugate views are complex: their dtype is refused on the slow path)
        raise ValueError("lazily negated view")  # the slow path names the argument
    return (t.shape, t.stride(), t.dtype, t.device), t.data_ptr()


def _read_cupy(a: Any, stream: Any) -> tuple[Hashable, int]:
    memory = a.data
    return (a.shape, a.strides, a.dtype, memory.device_id), memory.ptr


# typestrs whose dtype the interface spells alone (a '|V2' needs the object's dtype: such calls are not keyed)
_PLAIN_TYPESTRS = frozenset(
    f"{order}{code}" for order in "<|" for code in ("f2", "f4", "i1", "i4", "i8", "u1", "u2", "u4", "b1")
)


def _read_cai(obj: Any, stream: Any) -> tuple[Hashable, int]:
    """A ``__cuda_array_interface__`` producer: the interface's own values are the key (no descriptor).

    A malformed interface raises here (a KeyError, ...): the launcher then takes the slow path, which names it.
    """
    iface = obj.__cuda_array_interface__
    typestr = iface["typestr"]
    if typestr not in _PLAIN_TYPESTRS:
        raise ValueError("typestr needs the object's dtype")
    ptr = iface["data"][0]
    device = pointer_device(ptr, "tensor")
    return (iface["shape"], iface.get("strides"), typestr, iface.get("mask"), device), ptr


def _read_jax(a: Any, stream: Any) -> tuple[Hashable, int]:
    """A JAX array: a ready, single-device, row-major one by JAX's own values (as ``as_tensor``'s fast path reads
    it: no DLPack capsule); any other as :func:`_read_any` reads it (DLPack with the call's stream, which JAX
    orders its pending work before). The key (shape, dtype, sharding) stands for one layout because
    :func:`jax_row_major_pointer` holds only for row-major single-device arrays."""
    if a.is_ready():
        try:
            ptr = jax_row_major_pointer(a)
        except Exception:  # sharded, not row-major, deleted
            return _read_any(a, stream)
        return (a.shape, a.dtype, a.sharding), ptr
    return _read_any(a, stream)


def _read_any(obj: Any, stream: Any) -> tuple[Hashable, int]:
    """Any other producer, through :func:`fi_ffi.as_tensor` (a descriptor per call)."""
    t = as_tensor(obj, stream=dlpack_stream(obj, stream))
    return t._lid, t.data_ptr


def read(obj: Any, stream: Any) -> tuple[Hashable, int]:
    """``(layout key, data pointer)`` of ``obj`` (any producer)."""
    return (producers.get(type(obj)) or producer(type(obj))).read(obj, stream)


def describe(obj: Any, name: str, stream: Any) -> Tensor:
    """The descriptor of tensor argument ``name`` for a call on ``stream`` (the launcher's slow path).

    Producers with a reader of their own are described without synchronization (as their reader reads them);
    the others are handed the call's stream as their DLPack consumer stream (:func:`dlpack_stream`).
    """
    found = (producers.get(type(obj)) or producer(type(obj))).read
    fast = found is not _read_any and found is not _read_jax  # (a pending JAX array must order its work)
    return as_tensor(obj, name=name, stream=-1 if fast else dlpack_stream(obj, stream))


# ---- the launcher's inline reads --------------------------------------------------------------------------------


def read_source(arg: str, key: str, ptr: str, absent: int | None = None) -> list[str]:
    """Lines of generated Python that set local ``key`` to the layout key and ``ptr`` to the data pointer of tensor
    argument ``arg`` (a local name), as :func:`read` would with the call's ``stream`` (a local of the generated
    function too): descriptors, torch tensors and CuPy arrays inline (no call: the same keys as
    :func:`_read_descriptor`, :func:`_read_torch` and :func:`_read_cupy`), other producers through their reader.
    ``absent``: for an optional argument, the pointer that stands for None (its key is None). The lines use the
    names of :func:`read_globals` and the scratch local ``_m``; they raise for a producer that cannot be read
    (a lazily negated torch view goes to its reader, which refuses it), and the generated code then takes its
    slow path, which names the argument.
    """
    lines = [] if absent is None else [f"if {arg} is None: {key} = None; {ptr} = {absent}"]
    lines += [
        f"{'if' if absent is None else 'elif'} {arg}.__class__ is _Tensor: {key} = {arg}._lid; {ptr} = {arg}.data_ptr",
        f"elif {arg}.__class__ is _TT and not {arg}.is_neg(): "
        f"{key} = ({arg}.shape, {arg}.stride(), {arg}.dtype, {arg}.device); {ptr} = {arg}.data_ptr()",
        f"elif {arg}.__class__ is _CP: "
        f"_m = {arg}.data; {key} = ({arg}.shape, {arg}.strides, {arg}.dtype, _m.device_id); {ptr} = _m.ptr",
        f"else: {key}, {ptr} = (_PRODUCERS.get({arg}.__class__) or _producer({arg}.__class__)).read({arg}, stream)",
    ]
    return lines


def read_globals() -> dict[str, Any]:
    """The global names the lines of :func:`read_source` use, for the generated code's namespace."""
    return {
        "_PRODUCERS": producers,
        "_producer": producer,
        "_Tensor": Tensor,
        "_TT": _torch_tensor,
        "_CP": _cupy_ndarray,
    }


# The generated functions whose namespaces hold _TT / _CP: each tensor argument's class test is one global read
# there, so when a class is first seen (or forgotten) the new value is written into each namespace.
_followers: weakref.WeakSet[Any] = weakref.WeakSet()


def follow_classes(function: Any) -> None:
    """Keep ``_TT`` and ``_CP`` of ``function``'s globals (generated with :func:`read_source` and
    :func:`read_globals`) equal to the torch tensor and CuPy array classes seen so far, from now on."""
    _followers.add(function)
    namespace = function.__globals__
    # a class seen while the namespace was built: set now, so this write or _classes_changed' has it
    namespace["_TT"], namespace["_CP"] = _torch_tensor, _cupy_ndarray


def _classes_changed() -> None:
    for function in list(_followers):
        function.__globals__["_TT"], function.__globals__["_CP"] = _torch_tensor, _cupy_ndarray


# ---- default streams --------------------------------------------------------------------------------------------

_torch_raw_stream: Callable[[int], int] | None = None  # torch._C._cuda_getCurrentRawStream, found once


def _torch_stream(device_id: int) -> int:
    global _torch_raw_stream
    if _torch_raw_stream is None:
        _torch_raw_stream = sys.modules["torch"]._C._cuda_getCurrentRawStream
    return _torch_raw_stream(device_id)  # (an int already)


def _stream_source(tp: type, torch: Any, cupy: Any) -> StreamSource | None:
    """Where a call whose first tensor argument is of type ``tp`` takes its default stream from (see
    :class:`Producer`); ``torch`` / ``cupy``: the framework's module when ``tp`` is of it."""
    if torch is not None and hasattr(tp, "is_cuda"):
        # torch's own function (an int per device ordinal) when this build has it: no Python frame per call
        found: StreamSource = getattr(torch._C, "_cuda_getCurrentRawStream", None) or _torch_stream
        return found
    if cupy is not None:
        get_current = cupy.cuda.get_current_stream  # found once, not per call

        def cupy_current(device_id: int) -> int:
            return get_current(device_id).ptr  # type: ignore[no-any-return]

        return cupy_current
    return None


def stream_source(obj: Any) -> StreamSource | None:
    """Where a call whose first tensor argument is ``obj`` takes its default stream from (:class:`Producer`)."""
    return (producers.get(type(obj)) or producer(type(obj))).stream_source


def default_stream(obj: Any, device_id: int) -> int | None:
    """The stream a call with ``stream=None`` runs on when ``obj`` is its first tensor argument (None: TVM-FFI's
    current stream, left as it is)."""
    source = stream_source(obj)
    if source is None or not getattr(obj, "is_cuda", True):
        return None
    return source(device_id)


def dlpack_stream(obj: Any, stream: Any) -> Any:
    """The consumer stream to hand to ``obj.__dlpack__`` for a call on ``stream`` (an int handle or None).

    ``None`` (the call uses TVM-FFI's current stream) is resolved to that stream, so a producer that orders its
    work on the consumer's stream (JAX must) gets a real handle; host producers get DLPack's None.
    """
    try:
        device_type, device_id = obj.__dlpack_device__()
    except Exception:
        return -1
    if device_type not in (2, 13):  # kDLCUDA, kDLCUDAManaged
        return -1
    if stream is None:
        from ..abi.streams import current_stream

        stream = current_stream(int(device_id))
    return stream


def _forget() -> None:
    """Forget every per-type decision and remembered layout (for tests that import a framework late)."""
    global _torch_tensor, _torch_parameter, _cupy_ndarray, _torch_raw_stream
    _layouts.clear()
    producers.clear()
    _legacy_exporters.clear()
    _jax_without_interface.clear()
    _torch_raw_stream = None
    _torch_tensor = _torch_parameter = _cupy_ndarray = _NotSeen
    _classes_changed()


caches.register("producers (per type) and the layouts as_tensor remembered (torch, CuPy, JAX)", _forget)
