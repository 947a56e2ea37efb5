"""Reading a tensor argument at call time: its layout key and data pointer, fast for every producer.

An op call needs two things from each tensor argument: what to check (its layout: shape, strides, dtype,
device) and where it is (the data pointer). :func:`reader` returns, per producer type, a function
``read(obj, stream) -> (key, data_ptr)`` where ``key`` is a hashable *value* standing for the layout: the
launcher (:mod:`fi_ffi.launch.launcher`) remembers which layout combinations passed the checks, keyed by these
values, and never keeps the objects themselves.

==========================  ==============================================================================
producer                    read per call
==========================  ==============================================================================
:class:`~fi_ffi.Tensor`     ``(t._lid, t.data_ptr)``: the descriptor's interned layout id
``torch.Tensor``            ``shape``, ``stride()``, ``dtype``, ``device``, ``data_ptr()`` (no DLPack)
CuPy ``ndarray``            ``shape``, ``strides``, ``dtype``, ``data.device_id``, ``data.ptr``
CUDA array interface        the interface's ``shape``, ``strides``, ``typestr`` and ``data`` (no descriptor),
(a type with it, no DLPack) and the pointer's device from the driver (as :func:`fi_ffi.as_tensor` does)
JAX array                   ready, single-device, row-major: ``is_ready()``, ``shape``, ``dtype``, ``sharding``
                            and the pointer (``__cuda_array_interface__``'s, or ``unsafe_buffer_pointer()``
                            after ``format.layout``: no capsule); otherwise as below
anything else               :func:`fi_ffi.as_tensor` (DLPack, array interface) with the call's stream as the
                            DLPack consumer stream (JAX needs a real stream)
==========================  ==============================================================================

The launcher's generated code does the torch and CuPy reads of this table itself (no reader call per argument;
the same keys), for ``torch.Tensor`` and ``cupy.ndarray`` exactly (:data:`torch_tensor`, :data:`cupy_ndarray`,
set when the first object of each is read); a lazily negated torch view goes to :func:`_read_torch`, which
refuses it. A key stands for the layout that :func:`describe` (the launcher's slow path) gives the same object,
so a key the launcher has seen validated means that layout. Describing goes one way: the launcher asks this module (a
reader per call, :func:`describe` on the slow path), this module asks :mod:`fi_ffi.tensor.interop` (the protocols).

The default stream of a call (``stream=None``) follows the first tensor argument's framework, as flashinfer
and tvm_ffi do: torch's current stream of the tensor's device, CuPy's current stream, otherwise TVM-FFI's
current stream (:func:`stream_source`).

fi_ffi never imports torch, CuPy or JAX: a type is recognised only if its module is already imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable
from typing import Any

from .. import caches
from . import interop
from .descriptor import Tensor

Reader = Callable[[Any, Any], tuple[Hashable, int]]
StreamSource = Callable[[int], int]

# The reader found per producer type (filled by :func:`reader`): ``readers.get(tp) or reader(tp)`` is reader(tp)
# without a call when the type was seen, as the generated launchers read it.
readers: dict[type, Reader] = {}
_stream_sources: dict[type, StreamSource | None] = {}


class _NotSeen:
    """Stands for a framework's class until its first object is read (no object is of this class)."""


# The classes whose reads the launcher's generated code does inline (the reads of read_torch / read_cupy, the same
# keys); set when the first object of each is read, so fi_ffi never imports torch or CuPy itself.
torch_tensor: type = _NotSeen
cupy_ndarray: type = _NotSeen
# Called after either class changes (seen, or forgotten by reset): the launchers copy both into their generated
# code's namespace, so each tensor argument's test is one global read instead of a module attribute read.
_class_listeners: list[Callable[[], None]] = []


def on_classes_changed(listener: Callable[[], None]) -> None:
    """Call ``listener()`` whenever :data:`torch_tensor` or :data:`cupy_ndarray` changes."""
    _class_listeners.append(listener)


def _classes_changed() -> None:
    for listener in _class_listeners:
        listener()


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
    device = interop.pointer_device(ptr, "tensor")
    return (iface["shape"], iface.get("strides"), typestr, iface.get("mask"), device), ptr


def _read_jax(a: Any, stream: Any) -> tuple[Hashable, int]:
    """A JAX array: a ready, single-device, row-major one by JAX's own values (as ``as_tensor``'s fast path reads
    it: no DLPack capsule); any other as :func:`_read_any` reads it (DLPack with the call's stream, which JAX
    orders its pending work before). The key (shape, dtype, sharding) stands for one layout because
    :func:`fi_ffi.tensor.interop.jax_row_major_pointer` holds only for row-major single-device arrays."""
    if a.is_ready():
        try:
            ptr = interop.jax_row_major_pointer(a)
        except Exception:  # sharded, not row-major, deleted
            return _read_any(a, stream)
        return (a.shape, a.dtype, a.sharding), ptr
    return _read_any(a, stream)


def _read_any(obj: Any, stream: Any) -> tuple[Hashable, int]:
    """Any other producer, through :func:`fi_ffi.as_tensor` (a descriptor per call)."""
    t = interop.as_tensor(obj, stream=dlpack_stream(obj, stream))
    return t._lid, t.data_ptr


def reader(tp: type) -> Reader:
    """The reader of producer type ``tp`` (found once per type)."""
    found = readers.get(tp)
    if found is None:
        found = readers[tp] = _reader_for(tp)
    return found


def _reader_for(tp: type) -> Reader:
    if tp is Tensor:
        return _read_descriptor
    module = tp.__module__ or ""
    torch = sys.modules.get("torch") if module.startswith("torch") else None
    global torch_tensor, cupy_ndarray
    if torch is not None and (tp is torch.Tensor or tp is torch.nn.Parameter):
        torch_tensor = torch.Tensor
        _classes_changed()
        return _read_torch
    cupy = sys.modules.get("cupy") if module.startswith("cupy") else None
    if cupy is not None and tp is cupy.ndarray:
        cupy_ndarray = cupy.ndarray
        _classes_changed()
        return _read_cupy
    if interop.is_jax_array_type(tp):
        return _read_jax
    if hasattr(tp, "__cuda_array_interface__") and not hasattr(tp, "__dlpack__"):  # as as_tensor chooses
        return _read_cai
    return _read_any


def read(obj: Any, stream: Any) -> tuple[Hashable, int]:
    """``(layout key, data pointer)`` of ``obj`` (any producer)."""
    return reader(type(obj))(obj, stream)


def describe(obj: Any, name: str, stream: Any) -> Tensor:
    """The descriptor of tensor argument ``name`` for a call on ``stream`` (the launcher's slow path).

    Producers with a reader of their own are described without synchronization (as their reader reads them);
    the others are handed the call's stream as their DLPack consumer stream (:func:`dlpack_stream`).
    """
    found = reader(type(obj))
    fast = found is not _read_any and found is not _read_jax  # (a pending JAX array must order its work)
    return interop.as_tensor(obj, name=name, stream=-1 if fast else dlpack_stream(obj, stream))


# ---- streams ------------------------------------------------------------------------------------------------

_torch_raw_stream: Callable[[int], int] | None = None  # torch._C._cuda_getCurrentRawStream, found once


def _torch_stream(device_id: int) -> int:
    global _torch_raw_stream
    if _torch_raw_stream is None:
        _torch_raw_stream = sys.modules["torch"]._C._cuda_getCurrentRawStream
    return _torch_raw_stream(device_id)  # (an int already)


def stream_source(obj: Any) -> StreamSource | None:
    """Where a call whose first tensor argument is ``obj`` takes its default stream from.

    None means TVM-FFI's current stream of the device (nothing to set); otherwise a function of the device
    ordinal returning the framework's current ``cudaStream_t`` (torch, CuPy).
    """
    tp = type(obj)
    if tp in _stream_sources:
        return _stream_sources[tp]
    found: StreamSource | None = None
    module = tp.__module__ or ""
    if module.startswith("torch") and "torch" in sys.modules and hasattr(obj, "is_cuda"):
        # torch's own function (an int per device ordinal) when this build has it: no Python frame per call
        found = getattr(sys.modules["torch"]._C, "_cuda_getCurrentRawStream", None) or _torch_stream
    elif module.startswith("cupy") and "cupy" in sys.modules:
        get_current = sys.modules["cupy"].cuda.get_current_stream  # found once, not per call

        def cupy_current(device_id: int) -> int:
            return get_current(device_id).ptr  # type: ignore[no-any-return]

        found = cupy_current
    _stream_sources[tp] = found
    return found


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
        from .streams import current_stream

        stream = current_stream(int(device_id))
    return stream


def reset() -> None:
    """Forget the per-type choices (for tests that import a framework late)."""
    global _torch_raw_stream, torch_tensor, cupy_ndarray
    readers.clear()
    _stream_sources.clear()
    _torch_raw_stream = None
    torch_tensor = cupy_ndarray = _NotSeen
    _classes_changed()


caches.register("producer readers and stream sources (per producer type)", reset)

__all__ = [
    "Reader",
    "default_stream",
    "describe",
    "dlpack_stream",
    "on_classes_changed",
    "read",
    "reader",
    "readers",
    "reset",
    "stream_source",
]
