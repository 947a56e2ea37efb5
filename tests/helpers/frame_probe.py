"""A TVM-FFI Function that records the frame each call hands it (tests/ops/attention/test_prepared_decode_run.py and
the engine's
wiring test in tests/engine/test_kernel_calls.py bind a launcher's entry point to it)."""

from __future__ import annotations

import struct
from types import SimpleNamespace

from fi_ffi.abi import objects
from fi_ffi.abi.call import Function
from fi_ffi.abi.cdefs import get_ffi
from fi_ffi.abi.runtime import api


class FrameProbe:
    """A TVM-FFI Function (a cffi callback) that records what each call hands it, in a form two frames at different
    addresses can be compared by: per slot (type index, padding, payload), a ``DLTensor*`` payload replaced by the
    record's contents; then the result slot (its payload only when its type is not None: a launcher resets the
    type before each call, and a None's payload is read by no one), and TVM-FFI's current CUDA stream of device 0.
    Each call answers an Int in the result slot, as a function with a result does, so a frame whose result type a
    call did not reset is seen at the next call."""

    def __init__(self) -> None:
        ffi = get_ffi()
        self.seen: list[tuple[object, ...]] = []

        def safe_call(_self: object, args: object, n: int, result: object) -> int:
            raw = bytes(ffi.buffer(ffi.cast("char*", args), (n + 1) * 16))  # the result slot follows the arguments
            slots = []
            for i in range(n + 1):
                type_index, pad, payload = struct.unpack_from("<iIq", raw, 16 * i)
                if type_index == objects.DLTENSOR_PTR:
                    slots.append((type_index, pad, self._record(payload)))
                elif i == n and type_index == objects.NONE:
                    slots.append((type_index, pad, None))  # a None result slot: its payload word is never read
                else:
                    slots.append((type_index, pad, payload))
            self.seen.append((n, tuple(slots), int(api().TVMFFIEnvGetStream(2, 0))))
            struct.pack_into("<iIq", ffi.buffer(ffi.cast("char*", result), 16), 0, objects.INT, 0, 7)
            return 0

        self._cb = ffi.callback("TVMFFISafeCallType", safe_call)
        out = ffi.new("void**")
        assert api().TVMFFIFunctionCreate(ffi.NULL, self._cb, ffi.NULL, out) == 0
        self.function = Function(objects.ObjectRef(int(ffi.cast("uintptr_t", out[0])), objects.FUNCTION), "probe")
        self.entry = SimpleNamespace(safe_call=self.function.safe_call, this=self.function.this)

    @staticmethod
    def _record(addr: int) -> tuple[object, ...]:
        ffi = get_ffi()
        header = bytes(ffi.buffer(ffi.cast("char*", addr), 48))
        ndim = struct.unpack_from("<i", header, 16)[0]
        shape_p, strides_p = struct.unpack_from("<QQ", header, 24)

        def words(p: int) -> tuple[int, ...]:
            return struct.unpack(f"<{ndim}q", bytes(ffi.buffer(ffi.cast("char*", p), 8 * ndim)))

        shape, strides = words(shape_p), None if not strides_p else words(strides_p)
        # data pointer, device, ndim, dtype (24 bytes) and byte_offset as bytes; shape and strides by value
        return (header[:24], header[40:48], shape, strides)

    def last(self) -> tuple[object, ...]:
        assert self.seen, "the probe was not called"
        return self.seen.pop()
