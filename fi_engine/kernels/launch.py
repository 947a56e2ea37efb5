"""Packed kernel launches through the CUDA driver: a kernel's integer arguments checked, packed once into 8-byte slots
and launched with ``cuLaunchKernel`` (or ``cuLaunchKernelEx``, with programmatic dependent launch where asked) on
one stream. A CuPy ``RawKernel`` call converts its arguments on every launch; a packed launch passes the same array
again, about a tenth of the host time (benchmarks/RESULTS.md), which is what an eager decode step is bound by.

:class:`Launcher` is the one object that holds the driver's entry points; the engine's own GEMVs
(:class:`~fi_engine.kernels.dense.Dense`), their fused forms, the quantized weights' GEMVs and the row kernels all
pack their launches through it. :func:`int_arg` and :func:`overlap` are the checks every packer makes first, so a
bad value is refused by name before cffi would raise an OverflowError naming nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fi_ffi.cuda import driver_error

from ..values import integer

__all__ = ["MAX_LD", "U64", "Launcher", "address_arg", "int_arg", "overlap"]

U64 = 1 << 64  # a device address is below it (the kernels' pointers, packed into uint64 slots)
MAX_LD = 1 << 40  # row strides (elements): far past any buffer, far below the kernels' long long
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # cuda.h's CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def int_arg(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi)`` (a bool or a float is none), else TypeError/ValueError naming ``name``:
    checked before packing, where cffi would raise OverflowError or TypeError naming nothing."""
    value = integer(name, value)
    if not lo <= value < hi:
        shown = value if abs(value) < 1 << 80 else f"an int of {value.bit_length()} bits"
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}), got {shown}")
    return value


def address_arg(name: str, value: Any, align: int) -> int:
    """``value`` as a device address: a non-NULL int below ``2**64`` aligned to ``align`` bytes, else
    TypeError/ValueError naming ``name``."""
    if not int_arg(name, value, 0, U64) or value % align:
        raise ValueError(f"{name}: 0x{value:x} must be a non-NULL address aligned to {align} bytes")
    return int(value)


def overlap(a: int, a_len: int, b: int, b_len: int) -> bool:
    """Whether the byte ranges ``[a, a + a_len)`` and ``[b, b + b_len)`` share a byte."""
    return a < b + b_len and b < a + a_len


class Launcher:
    """The driver's launch entry points bound to one stream (``stream``: a ``CUstream`` as an int): ``launch``
    (``cuLaunchKernel``), ``launch_ex`` (``cuLaunchKernelEx``, None before CUDA 12.0 drivers or Hopper), ``ffi``
    (the driver's cffi instance) and its ``null``. Made without ``launch`` (no driver, or the GEMV did not compile)
    it is off: :attr:`open` False, and every packer refuses. :meth:`close` turns it off; a launch prepared before
    then raises instead of launching (its kernel's module may be gone)."""

    pdl = True
    """The prepared GEMV launches (the fused decode step's) use programmatic dependent launch on Hopper and later:
    each may start while the kernel before it drains, its first weights already loading (benchmarks/RESULTS.md).
    Read when a launch is prepared; set it on the class to compare."""

    def __init__(self, stream: int, launch: Any = None, launch_ex: Any = None, ffi: Any = None) -> None:
        self.stream, self.launch, self.launch_ex, self.ffi = stream, launch, launch_ex, ffi
        self.null: Any = None if ffi is None else ffi.NULL
        self.open = launch is not None

    @property
    def launches_with_pdl(self) -> bool:
        """Whether the prepared launches use programmatic dependent launch (:attr:`pdl` on, a Hopper or later GPU,
        a driver with ``cuLaunchKernelEx``): the decode step launches its attention runs the same way."""
        return bool(self.pdl and self.launch_ex is not None)

    def close(self) -> None:
        """Turn the launch path off: prepared launches refuse from now on. Idempotent."""
        self.open = False

    def check_open(self) -> None:
        """ValueError where the launch path is off (closed, or the GEMV is unavailable)."""
        if not self.open:
            raise ValueError("dense: the driver launch path is off (closed, or the GEMV is unavailable)")

    def slots(self, ints: list[int]) -> tuple[Any, Any]:
        """``(params, values)`` of a launch: each of ``ints`` in its own 8-byte slot of ``values`` (a 32-bit
        parameter reads its low 4 bytes: little-endian), ``params`` the kernel's array of pointers into them; at
        least one slot (cffi makes no empty array). ``values`` must be kept alive with ``params``."""
        ffi, count = self.ffi, max(1, len(ints))
        values = ffi.new(f"uint64_t[{count}]", ints or [0])
        params = ffi.new(f"void*[{count}]", [values + i for i in range(count)])
        return params, values

    def prepared_kernel(
        self,
        fn: int,
        grid: tuple[int, int],
        block: int,
        smem: int,
        args: Sequence[int],
        name: str,
        pdl: bool = False,
    ) -> Callable[[], None]:
        """A launch of kernel ``fn`` (a ``CUfunction`` handle, e.g. a CuPy ``RawKernel``'s ``ptr``) on ``grid``
        (x, y) blocks of ``block`` threads with ``smem`` dynamic shared bytes, its arguments packed once: each a
        pointer or an integer, passed in an 8-byte slot (a 32-bit parameter reads its low 4 bytes: little-endian),
        so none may be a float. Calling the result launches it again on this stream (about a tenth of a CuPy kernel
        call's host time). ``pdl``: as :meth:`prepared`'s (the kernel must call ``griddep_wait`` before it reads
        what the kernel before it writes). Raises ValueError when the driver launch path is off and
        TypeError/ValueError naming an argument that is no int or outside ``[0, 2**64)`` (negative 32-bit values:
        pass them as their unsigned bits)."""
        self.check_open()
        gx, gy = (int_arg("grid", g, 1, 1 << 31) for g in grid)
        int_arg("block", block, 1, 1025)
        int_arg("smem", smem, 0, 1 << 31)
        params, values = self.slots([int_arg(f"args[{i}]", a, 0, U64) for i, a in enumerate(args)])
        return self.prepared(fn, gx, block, smem, params, values, name, pdl=pdl, grid_y=gy)

    def prepared(
        self,
        fn: int,
        grid: int,
        block: int,
        smem: int,
        params: Any,
        values: Any,
        name: str,
        pdl: bool = False,
        grid_y: int = 1,
    ) -> Any:
        """A launch of ``fn`` packed once. ``pdl``: the kernel waits for its predecessor itself
        (``griddep_wait`` in :mod:`~fi_engine.kernels.cuda_sources`), so it is launched with programmatic dependent
        launch where :attr:`pdl` allows it: it may start while the kernel before it drains, loading its weights. Where
        the driver has ``cuLaunchKernelEx`` every launch goes through it, its configuration packed here: a call then
        passes 4 arguments where ``cuLaunchKernel`` takes 11, each converted by cffi (about 1.5 us of host time a launch
        on the H100's host: benchmarks/RESULTS.md); the attribute only where ``pdl`` asks for it."""
        stream, null = self.stream, self.null
        if self.launch_ex is not None:
            ffi = self.ffi
            config = ffi.new("CUlaunchConfig*")
            config.gridDimX, config.gridDimY, config.gridDimZ = grid, grid_y, 1
            config.blockDimX, config.blockDimY, config.blockDimZ = block, 1, 1
            config.sharedMemBytes, config.hStream = smem, stream
            attr = ffi.NULL
            if pdl and self.pdl:
                attr = ffi.new("CUlaunchAttribute*")
                attr.id = _PROGRAMMATIC_STREAM_SERIALIZATION
                attr.value[0] = 1  # programmaticStreamSerializationAllowed (an int, little-endian)
                config.attrs, config.numAttrs = attr, 1
            launch_ex = self.launch_ex

            def call_ex() -> None:
                if not self.open:  # closed: the module and its functions may be gone
                    raise ValueError("dense: closed (or the GEMV turned off); prepared launches refuse")
                err = launch_ex(config, fn, params, null)
                if err:
                    raise driver_error(err, f"cuLaunchKernelEx({name})")

            call_ex.keep = (values, attr, config)  # type: ignore[attr-defined]  # what params and config point into
            return call_ex
        launch = self.launch

        def call() -> None:
            if not self.open:  # closed: the module and its functions may be gone
                raise ValueError("dense: closed (or the GEMV turned off); prepared launches refuse")
            err = launch(fn, grid, grid_y, 1, block, 1, 1, smem, stream, params, null)
            if err:
                raise driver_error(err, f"cuLaunchKernel({name})")

        call.keep = values  # type: ignore[attr-defined]  # the argument array params points into
        return call
