"""Calling TVM-FFI functions: packed argument frames, the safe-call, stream scoping and error decoding.

Two kinds of callee share one calling convention (``int f(self, const TVMFFIAny* args, int n, TVMFFIAny*
result)``):

- :class:`EntryPoint`: a kernel module's exported ``__tvm_ffi_<name>`` symbol, bound once by address
  and called directly (``self`` = NULL), with no dispatcher in between.
- :class:`Function`: a ``ffi.Function`` object (for example a global such as ``testing.echo``), called
  through ``TVMFFIFunctionCall``.

The hot path: a :class:`Signature` compiles the argument list into one ``struct.Struct`` that writes every
16-byte ``TVMFFIAny`` slot (and the result slot, reset to None) with a single ``pack_into`` into a
per-thread :class:`Frame` allocated once. Nothing is allocated through cffi per call.

TVM-FFI's current-stream table is thread-local and sticky; :meth:`Callee.invoke` sets the caller's stream
for the device of the call and restores the previous one afterwards, on success and on error.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from typing import Any

from ..dtypes import CUDA, Device, DType
from ..loader import dl
from ..tensor import Tensor
from .cdefs import get_ffi
from .objects import (
    ARRAY,
    BOOL,
    BYTE_ARRAY_PTR,
    DATA_TYPE,
    DEVICE,
    DLTENSOR_PTR,
    FLOAT,
    FUNCTION,
    INT,
    NONE,
    OPAQUE_PTR,
    RAW_STR,
    STATIC_OBJECT_BEGIN,
    TYPE_NAMES,
    ObjectRef,
    take_result,
)
from .raised import take_raised
from .runtime import api

_SLOT = 16

# Wire kinds of a Signature. "tensor"/"tensor?" take a Tensor descriptor (DLTensor*), "object?" an
# ffi.Tensor / any ObjectRef or None, "int"/"float"/"bool" scalars, "object" an ObjectRef (plan Arrays).
WIRE_KINDS = ("tensor", "tensor?", "object", "object?", "int", "float", "bool")


class Signature:
    """The wire layout of one callee: its name, parameter names and wire kinds.

    ``pack`` is a ``struct.Struct`` over ``len(params) + 1`` slots (the last one is the result slot). Each
    argument contributes three values: ``(type_index, 0, payload)``; see :meth:`Callee.invoke`.
    """

    __slots__ = ("kinds", "name", "nargs", "pack", "params")

    def __init__(self, name: str, params: Sequence[tuple[str, str]]) -> None:
        for pname, kind in params:
            if kind not in WIRE_KINDS:
                raise ValueError(f"{name}: parameter {pname!r} has unknown wire kind {kind!r}")
        self.name = name
        self.params = tuple(p for p, _ in params)
        self.kinds = tuple(k for _, k in params)
        self.nargs = len(params)
        fmt = "".join("iId" if k == "float" else "iIq" for k in self.kinds) + "iIq"
        self.pack = struct.Struct("<" + fmt)


# Type index written once into the slots of parameters whose kind fixes it (see Frame).
_FIXED_TYPE = {"tensor": DLTENSOR_PTR, "int": INT, "float": FLOAT, "bool": BOOL}


class Frame:
    """Per-thread scratch for one callee: the argument slots, the result slot and a stream out-parameter.

    ``q`` and ``d`` view the slots as int64 / float64 words: slot ``i`` is words ``2*i`` (type index and
    padding; writing a small int sets the type and zeroes the padding) and ``2*i + 1`` (the payload). A frame
    made for a :class:`Signature` has the type words of its tensor/int/float/bool parameters filled in once,
    so a call only writes payloads (``q[2*i + 1] = ...``, ``d[2*i + 1] = ...`` for floats), the type words of
    optional parameters, and resets the result's type word (``q[2*nargs] = 0``).
    """

    __slots__ = ("args", "block", "buf", "d", "nargs", "q", "result", "result_offset", "stream_out")

    def __init__(self, nargs: int, kinds: Sequence[str] = ()) -> None:
        ffi = get_ffi()
        self.nargs = nargs
        self.block = ffi.new("TVMFFIAny[]", nargs + 1)
        self.buf = ffi.buffer(self.block)
        self.args = self.block
        self.result = self.block + nargs
        self.result_offset = nargs * _SLOT
        self.stream_out = ffi.new("uintptr_t*")
        raw = memoryview(self.buf).cast("B")
        self.q = raw.cast("q")
        self.d = raw.cast("d")
        for i, kind in enumerate(kinds):
            self.q[2 * i] = _FIXED_TYPE.get(kind, NONE)


class Callee:
    """Common calling logic of :class:`EntryPoint` and :class:`Function`."""

    name: str
    _tls: threading.local
    _call: Any
    _self: Any

    def _init_callee(self, name: str) -> None:
        self.name = name
        self._tls = threading.local()
        lib = api()
        self._set_stream = lib.TVMFFIEnvSetStream

    def frame(self, nargs: int) -> Frame:
        """This thread's untyped frame for calls with ``nargs`` arguments (allocated on first use)."""
        try:
            untyped: dict[int, Frame] = self._tls.untyped
        except AttributeError:
            untyped = self._tls.untyped = {}
        frame = untyped.get(nargs)
        if frame is None:
            frame = untyped[nargs] = Frame(nargs)
        return frame

    def frame_for(self, sig: Signature) -> Frame:
        """This thread's frame for ``sig``, with the fixed type words filled in (allocated on first use)."""
        try:
            return self._tls.frames[sig]  # type: ignore[no-any-return]
        except AttributeError:
            self._tls.frames = {}
        except KeyError:
            pass
        frame = self._tls.frames[sig] = Frame(sig.nargs, sig.kinds)
        return frame

    def invoke(self, frame: Frame, device_id: int = -1, stream: int | None = None) -> None:
        """Call with the arguments already packed in ``frame``; raise :class:`KernelError` on failure.

        If ``stream`` is not None, it becomes TVM-FFI's current stream of CUDA device ``device_id`` on this
        thread for the duration of the call and the previous stream is restored afterwards.
        """
        if stream is None:
            rc = self._call(self._self, frame.args, frame.nargs, frame.result)
        else:
            out = frame.stream_out
            if self._set_stream(CUDA, device_id, stream, out) != 0:
                raise take_raised("TVMFFIEnvSetStream", (str(device_id), hex(stream)))
            previous = out[0]
            try:
                rc = self._call(self._self, frame.args, frame.nargs, frame.result)
            finally:
                if previous != stream:
                    self._set_stream(CUDA, device_id, previous, out)
        if rc != 0:
            self.raise_error(frame)

    def raise_error(self, frame: Frame) -> None:
        """Raise the error of the call that just failed on this thread, describing ``frame``'s arguments."""
        raise take_raised(self.name, describe_frame(frame))

    def call_packed(self, sig: Signature, values: Sequence[Any], device_id: int = -1, stream: int | None = None) -> Any:
        """Pack ``values`` (triples, as :meth:`Signature.pack` wants) into this thread's frame, call, decode."""
        frame = self.frame(sig.nargs)
        sig.pack.pack_into(frame.buf, 0, *values, NONE, 0, 0)
        self.invoke(frame, device_id, stream)
        return take_result(frame.buf[frame.result_offset : frame.result_offset + _SLOT])

    def __call__(self, *args: Any) -> Any:
        """Generic call: pack Python values by their type (see :func:`pack_value`), call, decode the result.

        For tests and tools; ops use prepared signatures instead.
        """
        keep: list[Any] = []
        triples: list[Any] = []
        fmt = ["<"]
        for a in args:
            type_index, payload = pack_value(a, keep)
            fmt.append("iId" if type_index == FLOAT else "iIq")
            triples += (type_index, 0, payload)
        fmt.append("iIq")
        frame = self.frame(len(args))
        struct.pack_into("".join(fmt), frame.buf, 0, *triples, NONE, 0, 0)
        self.invoke(frame)
        return take_result(frame.buf[frame.result_offset : frame.result_offset + _SLOT])


class EntryPoint(Callee):
    """An exported safe-call symbol ``__tvm_ffi_<name>`` of a loaded kernel module, bound by address."""

    def __init__(self, module_handle: Any, name: str, module_name: str = "") -> None:
        from ..errors import KernelNotFoundError

        symbol = "__tvm_ffi_" + name
        addr = dl.symbol_address(module_handle, symbol)
        if not addr:
            where = f"module {module_name!r}" if module_name else "the module"
            raise KernelNotFoundError(f"{where} exports no entry point {name!r} (symbol {symbol})")
        ffi = get_ffi()
        self._init_callee(f"{module_name}.{name}" if module_name else name)
        self._call = ffi.cast("TVMFFISafeCallType", addr)
        self._self = ffi.NULL
        self.address = addr

    def signature_text(self) -> str:
        """The callee's own signature, as printed in the TypeError raised by a zero-argument call."""
        return signature_text(self)


class Function(Callee):
    """A ``ffi.Function`` object, owned (released when this wrapper is)."""

    def __init__(self, ref: ObjectRef, name: str = "") -> None:
        if ref.type_index != FUNCTION:
            raise TypeError(f"expected a Function object, got {TYPE_NAMES.get(ref.type_index)}")
        lib = api()
        self._ref = ref
        self._init_callee(name or "<function>")
        self._call = lib.TVMFFIFunctionCall
        self._self = get_ffi().cast("void*", ref.handle)

    @classmethod
    def global_function(cls, name: str) -> Function:
        """Look up the global function ``name`` (``TVMFFIFunctionGetGlobal``); LookupError if unknown."""
        ffi = get_ffi()
        raw = name.encode()
        arr = ffi.new("TVMFFIByteArray*")
        keep = ffi.new("char[]", raw)
        arr.data = keep
        arr.size = len(raw)
        out = ffi.new("void**")
        if api().TVMFFIFunctionGetGlobal(arr, out) != 0:
            raise take_raised("TVMFFIFunctionGetGlobal", (repr(name),))
        handle = int(ffi.cast("uintptr_t", out[0]))
        if not handle:
            raise LookupError(f"no global TVM-FFI function named {name!r}")
        return cls(ObjectRef(handle, FUNCTION), name)


class PreparedCall:
    """One kernel call with all its arguments packed once, in a frame of its own.

    Calling it launches the kernel again with the same arguments: one FFI call, plus the stream set/restore
    when it was prepared with a stream. Safe to call from several threads at once (kernels only read their
    arguments and these return nothing). ``keep`` holds the descriptors whose memory the frame points at.
    """

    __slots__ = ("_args", "_call", "_callee", "_frame", "_nargs", "_result", "_self", "device_id", "keep", "stream")

    def __init__(self, callee: Callee, frame: Frame, keep: tuple[Any, ...], device_id: int, stream: int | None) -> None:
        self._callee = callee
        self._frame = frame
        self._call = callee._call
        self._self = callee._self
        self._args = frame.args
        self._result = frame.result
        self._nargs = frame.nargs
        self.keep = keep
        self.device_id = device_id
        self.stream = stream

    def __call__(self) -> None:
        if self.stream is None:
            if self._call(self._self, self._args, self._nargs, self._result):
                self._callee.raise_error(self._frame)
        else:
            self._callee.invoke(self._frame, self.device_id, self.stream)

    def __repr__(self) -> str:
        return f"<PreparedCall {self._callee.name}({', '.join(describe_frame(self._frame))})>"


class OpaquePtr(int):
    """An int to be passed as an opaque ``void*`` (type index 4) rather than as an integer."""


def pack_value(value: Any, keep: list[Any]) -> tuple[int, Any]:
    """The (type_index, payload) of a Python value for a generic call; ``keep`` holds temporaries alive.

    None -> None; bool -> Bool; int -> Int; float -> Float; :class:`OpaquePtr` -> opaque pointer;
    :class:`~fi_ffi.dtypes.DType` -> DataType; :class:`~fi_ffi.dtypes.Device` -> Device;
    :class:`~fi_ffi.tensor.Tensor` -> DLTensor*; str -> raw C string (borrowed); bytes -> byte array;
    :class:`ObjectRef` -> the object (borrowed). Anything else is a TypeError.
    """
    if value is None:
        return NONE, 0
    if isinstance(value, bool):
        return BOOL, int(value)
    if isinstance(value, OpaquePtr):
        return OPAQUE_PTR, int(value)
    if isinstance(value, int):
        if not -(1 << 63) <= value < 1 << 63:
            raise OverflowError(f"int argument {value} does not fit in int64")
        return INT, value
    if isinstance(value, float):
        return FLOAT, value
    if isinstance(value, Tensor):
        return DLTENSOR_PTR, value._dl_addr
    if isinstance(value, ObjectRef):
        if not value.handle:
            raise ValueError(f"{value!r} has been released and cannot be passed")
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
    raise TypeError(f"cannot pass a {type(value).__name__} to a TVM-FFI function")


def describe_frame(frame: Frame) -> tuple[str, ...]:
    """A short text per packed argument (type, and dtype/shape/device of tensors), for error messages."""
    out = []
    for i in range(frame.nargs):
        type_index, _pad, raw = struct.unpack_from("<iIq", frame.buf, i * _SLOT)
        if type_index == DLTENSOR_PTR and raw:
            out.append("DLTensor*(" + _describe_dltensor(raw) + ")")
        elif type_index == INT:
            out.append(str(raw))
        elif type_index == BOOL:
            out.append(str(bool(raw)))
        elif type_index == FLOAT:
            out.append(repr(struct.unpack_from("<d", frame.buf, i * _SLOT + 8)[0]))
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


def signature_text(callee: Callee) -> str:
    """Ask ``callee`` for its signature: a zero-argument call fails with it in the TypeError text."""
    from ..errors import KernelError

    try:
        callee.call_packed(Signature(callee.name, ()), ())
    except KernelError as err:
        return err.message
    return ""


__all__ = [
    "ARRAY",
    "Callee",
    "EntryPoint",
    "Frame",
    "Function",
    "OpaquePtr",
    "PreparedCall",
    "Signature",
    "describe_frame",
    "pack_value",
    "signature_text",
]
