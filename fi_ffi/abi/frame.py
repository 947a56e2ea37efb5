"""The argument frame of a TVM-FFI call and the one way to call through it.

Every callee (a kernel's entry point, an ``ffi.Function``) takes ``int f(self, const TVMFFIAny* args, int n,
TVMFFIAny* result)``. A :class:`Frame` is the memory of one such call: ``nargs`` argument slots of 16 bytes, the
result slot, then room for ``ntensors`` ``DLTensor`` records (48 bytes and up to 16 shape and 16 stride words each)
that tensor slots point at. It also holds the callee (``call``, ``this``), so calling needs nothing else.

- :func:`call`: call on TVM-FFI's current stream.
- :func:`call_on`: call with a given stream as TVM-FFI's current stream of the device (sticky and thread-local in
  TVM-FFI), restored afterwards, on success and on error.
- :func:`fail`: raise the error the failed call left, with :func:`describe_frame`'s text of its arguments.
- :func:`result`: the result slot as a Python value.
- :func:`stream_call`: how to call a frame on a stream, decided once (prepared calls keep the answer).
- :func:`write_image`, :func:`write_record`, :func:`write_pointers`: a frame's bytes for a declaration's checked
  arguments (type words, scalar payloads, one ``DLTensor`` record per tensor parameter), then its data pointers.
  This module owns the byte layout: nothing else knows where a record's words are.

The generated launchers of :mod:`fi_ffi.launch.launcher` copy an image made here over their frame, write the data
pointers' words directly and call ``f.call(*f.cargs)`` inline on their fast path; everything else goes through here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

from ..dtypes import CUDA, Device
from ..tensor.descriptor import WIRE_DEVICE_TYPE, Tensor
from . import wire
from .cdefs import get_ffi
from .objects import (
    ARRAY,
    BOOL,
    DLTENSOR_PTR,
    FLOAT,
    INT,
    NONE,
    RAW_STR,
    STATIC_OBJECT_BEGIN,
    TENSOR,
    TYPE_NAMES,
    Array,
    take_result,
)
from .raised import take_raised
from .runtime import api

SLOT = 16  # bytes per TVMFFIAny
MAX_NDIM = 16
RECORD = 48 + 16 * MAX_NDIM  # one DLTensor (48 bytes) + its shape and strides (int64 each)


class Frame:
    """One call's argument block: ``nargs + 1`` slots (the last is the result), then ``ntensors`` DLTensor records.

    Attributes:
        q, d: the block as int64 / float64 words; slot ``i`` is words ``2*i`` (type index; writing a small int sets
            the type and zeroes the padding) and ``2*i + 1`` (the payload).
        mv, buf: the block as bytes (a memoryview, a cffi buffer).
        args, result: ``TVMFFIAny*`` to the first argument slot and to the result slot.
        records: the address of the first DLTensor record.
        call, this: the callee's safe-call function and its ``self`` (NULL for an entry point).
        cargs: ``(this, args, nargs, result)``, the arguments of ``call``.
        stream_out: scratch for the previous stream of :func:`call_on`.
    """

    __slots__ = (
        "args",
        "block",
        "buf",
        "call",
        "cargs",
        "d",
        "mv",
        "nargs",
        "q",
        "records",
        "result",
        "stream_out",
        "this",
    )

    def __init__(self, nargs: int, ntensors: int, call: Any, this: Any = None) -> None:
        ffi = get_ffi()
        self.nargs = nargs
        self.block = ffi.new("char[]", (nargs + 1) * SLOT + ntensors * RECORD)
        self.buf = ffi.buffer(self.block)
        self.mv = memoryview(self.buf).cast("B")
        self.q = self.mv.cast("q")
        self.d = self.mv.cast("d")
        self.args = ffi.cast("TVMFFIAny*", self.block)
        self.result = self.args + nargs
        self.records = int(ffi.cast("uintptr_t", self.block)) + (nargs + 1) * SLOT
        self.stream_out = ffi.new("uintptr_t*")
        self.call = call
        self.this = ffi.NULL if this is None else this
        # call's arguments as one tuple: ``f.call(*f.cargs)`` (the launchers' fast path) skips four attribute reads
        self.cargs = (self.this, self.args, nargs, self.result)


def call(name: str, f: Frame) -> None:
    """Call ``f``'s callee with the arguments packed in ``f``, on TVM-FFI's current stream.

    Raises:
        KernelError: the callee failed (see :func:`fail`).
    """
    if f.call(*f.cargs):
        fail(name, f)


_set_stream: Any = None
_get_stream: Any = None


def call_on(name: str, f: Frame, device_id: int, stream: int) -> None:
    """Call with ``stream`` as TVM-FFI's current stream of CUDA device ``device_id``, restored afterwards (also on
    error). When ``stream`` is the current one already, one FFI call compares instead of two to set and restore."""
    global _set_stream, _get_stream
    if _set_stream is None:
        _set_stream = api().TVMFFIEnvSetStream
        _get_stream = api().TVMFFIEnvGetStream
    if _get_stream(CUDA, device_id) == stream:
        if f.call(*f.cargs):
            fail(name, f)
        return
    out = f.stream_out
    if _set_stream(CUDA, device_id, stream, out) != 0:
        raise take_raised("TVMFFIEnvSetStream", (str(device_id), hex(stream)))
    previous = out[0]
    try:
        rc = f.call(*f.cargs)
    finally:
        if previous != stream:
            _set_stream(CUDA, device_id, previous, out)
    if rc:
        fail(name, f)


def stream_call(name: str, f: Frame, device_id: int, stream: int | None) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """How to call ``f`` on ``stream`` (None: TVM-FFI's current stream of the device), as ``(function, arguments)``:
    ``function(*arguments)`` returns non-zero when the callee failed and the caller raises with :func:`fail`
    (:func:`call_on` raises itself and returns None). The one place that decides between calling the callee
    directly and :func:`call_on`; a prepared call asks once and keeps the answer, so its call is one branch-free
    line."""
    if stream is None:
        return f.call, f.cargs
    return call_on, (name, f, device_id, stream)


def fail(name: str, f: Frame) -> None:
    """Raise the error of the call that just failed on this thread, describing the packed arguments."""
    raise take_raised(name, describe_frame(f))


def result(f: Frame) -> Any:
    """Take the result slot of ``f`` (after a successful call)."""
    word = 2 * f.nargs
    if f.q[word] == ARRAY:  # a plan's schedule (type index 71, zero padding): read in place, no slot copy
        return Array(f.q[word + 1], ARRAY)
    off = f.nargs * SLOT
    return take_result(f.buf[off : off + SLOT])


# ---- frame images ----------------------------------------------------------------------------------------------

HEADER = 48  # bytes of a DLTensor before its shape: data, device, ndim + dtype, shape*, strides*, byte_offset


def write_image(
    f: Frame, decl: wire.Declaration, record_of: Mapping[int, int], checked: Mapping[str, Any], keep: list[Any]
) -> None:
    """Write every slot and record of ``f`` for ``decl``'s checked arguments, data pointers and per-call values
    left zero (the launch writes them per call).

    ``checked``: parameter name -> its value as validated (a :class:`~fi_ffi.tensor.Tensor` or None for tensor
    parameters, scalars converted by :func:`fi_ffi.abi.values.to_scalar`); ``record_of``: parameter index -> the
    index of its ``DLTensor`` record (tensor parameters only); ``keep`` receives what the image points to (the
    C strings of text arguments), which must outlive every call made with the image.
    """
    ffi = get_ffi()
    q, d = f.q, f.d
    f.mv[:] = bytes(len(f.mv))
    for i, p in enumerate(decl.params):
        value = checked[p.name]
        type_word, payload = 2 * i, 2 * i + 1
        kind = p.wire
        if kind in wire.TENSOR_TYPES:
            if value is None:
                q[type_word] = NONE
                continue
            record = f.records + record_of[i] * RECORD
            q[type_word] = DLTENSOR_PTR
            q[payload] = record
            write_record(f, record, value)
        elif kind in wire.OBJECT_TENSOR_TYPES:
            q[type_word] = NONE if value is None else TENSOR
        elif kind == wire.ARRAY:
            q[type_word] = ARRAY
        elif kind in (wire.INT, wire.OPT_INT):
            q[type_word] = NONE if value is None else INT
            q[payload] = 0 if value is None or p.per_call else value
        elif kind == wire.FLOAT:
            q[type_word] = FLOAT
            d[payload] = 0.0 if p.per_call else value
        elif kind == wire.OPT_FLOAT:
            q[type_word] = NONE if value is None else FLOAT
            d[payload] = 0.0 if value is None else value
        elif kind == wire.BOOL:
            q[type_word] = BOOL
            q[payload] = int(value)
        elif kind == wire.STRING:
            text = ffi.new("char[]", value.encode())
            keep.append(text)
            q[type_word] = RAW_STR
            q[payload] = int(ffi.cast("uintptr_t", text))
    q[2 * len(decl.params)] = NONE


def write_record(f: Frame, record: int, t: Tensor) -> None:
    """Write the ``DLTensor`` record at address ``record`` (inside ``f``) for ``t``: data left zero (written per
    call), device, ndim and dtype, shape and strides in the record's own words (``MAX_NDIM`` each at most)."""
    base = (record - f.records) + (f.nargs + 1) * SLOT  # byte offset of the record in the frame
    q = f.q
    word = base // 8
    n = t.ndim
    device_type = WIRE_DEVICE_TYPE.get(t.device.device_type, t.device.device_type)
    q[word] = 0  # data: written per call
    q[word + 1] = device_type | (t.device.device_id << 32)
    dt = t.dtype
    # ndim (int32) then dtype {u8 code, u8 bits, u16 lanes} share one word
    q[word + 2] = n | (dt.code << 32) | (dt.bits << 40) | (dt.lanes << 48)
    q[word + 3] = record + HEADER
    q[word + 4] = record + HEADER + 8 * n
    q[word + 5] = 0  # byte_offset
    for k in range(n):
        q[word + 6 + k] = t.shape[k]
        q[word + 6 + n + k] = t.strides[k]


def pointer_word(nargs: int, record: int) -> int:
    """The int64 word index, in a frame of ``nargs`` arguments, of record ``record``'s data pointer (what the
    generated launch writes per call)."""
    return ((nargs + 1) * SLOT + record * RECORD) // 8


def write_pointers(f: Frame, ptrs: list[int]) -> None:
    """Write the data pointers of ``f``'s records, one per record in order (int64 words: two's complement)."""
    q = f.q
    for j, ptr in enumerate(ptrs):
        q[pointer_word(f.nargs, j)] = ptr


def describe_frame(frame: Frame) -> tuple[str, ...]:
    """A short text per packed argument (type, and dtype/shape/device of tensors), for error messages."""
    out = []
    for i in range(frame.nargs):
        type_index, _pad, raw = struct.unpack_from("<iIq", frame.buf, i * SLOT)
        if type_index == DLTENSOR_PTR and raw:
            out.append("DLTensor*(" + _describe_dltensor(raw) + ")")
        elif type_index == INT:
            out.append(str(raw))
        elif type_index == BOOL:
            out.append(str(bool(raw)))
        elif type_index == FLOAT:
            out.append(repr(struct.unpack_from("<d", frame.buf, i * SLOT + 8)[0]))
        elif type_index == NONE:
            out.append("None")
        elif type_index >= STATIC_OBJECT_BEGIN:
            out.append(TYPE_NAMES.get(type_index, f"Object[{type_index}]"))
        else:
            out.append(TYPE_NAMES.get(type_index, f"type {type_index}"))
    return tuple(out)


def _describe_dltensor(addr: int) -> str:
    from ..dtypes import from_dlpack

    ffi = get_ffi()
    t = ffi.cast("DLTensor*", addr)
    shape = [t.shape[i] for i in range(t.ndim)] if t.shape != ffi.NULL else []
    try:
        name = from_dlpack(t.dtype.code, t.dtype.bits, t.dtype.lanes).name
    except TypeError:
        name = f"dtype({t.dtype.code},{t.dtype.bits},{t.dtype.lanes})"
    dev = Device(t.device.device_type, t.device.device_id)
    return f"{name}{shape} {dev}"


__all__ = [
    "HEADER",
    "MAX_NDIM",
    "RECORD",
    "SLOT",
    "Frame",
    "call",
    "call_on",
    "describe_frame",
    "fail",
    "pointer_word",
    "result",
    "stream_call",
    "write_image",
    "write_pointers",
    "write_record",
]
