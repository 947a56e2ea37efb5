"""Callees of the TVM-FFI C ABI: kernel entry points and ``ffi.Function`` objects, and the generic call.

Two kinds of callee share one calling convention (``int f(self, const TVMFFIAny* args, int n, TVMFFIAny*
result)``):

- :class:`EntryPoint`: a kernel module's exported ``__tvm_ffi_<name>`` symbol, bound once by address
  and called directly (``self`` = NULL), with no dispatcher in between.
- :class:`Function`: a ``ffi.Function`` object (for example a global such as ``testing.echo``), called
  through ``TVMFFIFunctionCall``.

Both are called through a :class:`~fi_ffi.abi.frame.Frame` (the one argument frame of the package; the
launcher's generated functions write theirs word by word). Calling a callee with Python values
(``Function(...)(*args)``) packs them by type (:func:`fi_ffi.abi.values.pack_value`, the one packer of Python
values) into this thread's frame: the generic path
of control calls, tests and tools; ops go through :mod:`fi_ffi.launch.launcher`.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

from ..loader import dl
from .cdefs import get_ffi
from .frame import Frame, call, describe_frame, fail, result
from .objects import FLOAT, FUNCTION, NONE, TYPE_NAMES, ObjectRef
from .raised import take_raised
from .runtime import api
from .values import OpaquePtr, pack_value


class Callee:
    """Common calling logic of :class:`EntryPoint` and :class:`Function`.

    Attributes:
        name: the callee's name in error messages.
        safe_call: the C function to call (``TVMFFISafeCallType``).
        this: its ``self`` argument (NULL for an entry point, the function object for a Function).
    """

    name: str
    safe_call: Any
    this: Any
    _tls: threading.local

    def _init_callee(self, name: str) -> None:
        self.name = name
        self._tls = threading.local()

    def frame(self, nargs: int) -> Frame:
        """This thread's frame for generic calls with ``nargs`` arguments (allocated on first use)."""
        try:
            untyped: dict[int, Frame] = self._tls.untyped
        except AttributeError:
            untyped = self._tls.untyped = {}
        frame = untyped.get(nargs)
        if frame is None:
            frame = untyped[nargs] = Frame(nargs, 0, self.safe_call, self.this)
        return frame

    def __call__(self, *args: Any) -> Any:
        """Generic call: pack Python values by their type (see :func:`pack_value`), call, decode the result.

        For control calls, tests and tools; ops use their generated launchers instead.
        """
        keep: list[Any] = []
        triples: list[Any] = []
        fmt = ["<"]
        for i, a in enumerate(args):
            type_index, payload = pack_value(a, keep, self.name, i)
            fmt.append("iId" if type_index == FLOAT else "iIq")
            triples += (type_index, 0, payload)
        fmt.append("iIq")
        frame = self.frame(len(args))
        struct.pack_into("".join(fmt), frame.buf, 0, *triples, NONE, 0, 0)
        if frame.call(*frame.cargs):
            fail(self.name, frame)
        return result(frame)


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
        self.safe_call = ffi.cast("TVMFFISafeCallType", addr)
        self.this = ffi.NULL
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
        self.safe_call = lib.TVMFFIFunctionCall
        self.this = get_ffi().cast("void*", ref.handle)

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


def signature_text(callee: Callee) -> str:
    """Ask ``callee`` for its signature: a zero-argument call fails with it in the TypeError text."""
    from ..errors import KernelError

    try:
        call(callee.name, Frame(0, 0, callee.safe_call, callee.this))
    except KernelError as err:
        return err.message
    return ""


__all__ = [
    "Callee",
    "EntryPoint",
    "Function",
    "OpaquePtr",
    "describe_frame",
    "pack_value",
    "signature_text",
]
