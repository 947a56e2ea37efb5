"""What the FP8 and int4 weight registries (:class:`~fi_engine.kernels.fp8_linear.Fp8Linears`,
:class:`~fi_engine.kernels.int4_linear.Int4Linears`) share: the registrations by device address, the 16-bit scratch
matrix a weight is dequantized into for a GEMM of many rows, and the launches packed once per call site (their
arguments in 8-byte slots, as :meth:`~fi_engine.kernels.launch.Launcher.slots` packs them) and run through the
driver's ``cuLaunchKernel`` on the Dense's stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from fi_ffi.cuda import driver_error

__all__ = ["QuantizedLinears"]

W = TypeVar("W")  # a registration: Fp8Weight or Int4Weight (its device address ``w``, shape and scales)

_MAX_PACKED = 4096  # packed call sites kept, then the cache starts again


class QuantizedLinears(Generic[W]):
    """The registry of one Dense's weights of one format (``kind``: its name in errors) and the plumbing of its
    launches: ``launch`` is the driver's ``cuLaunchKernel``, ``ffi`` its cffi instance, ``stream`` the Dense's
    stream (a ``CUstream`` as an int). A registration is a value (addresses and sizes): the weight must stay
    allocated until :meth:`remove` or :meth:`close`."""

    kind = ""
    """The format's name in errors (``"FP8"``, ``"int4"``)."""

    def __init__(self, launch: Any, ffi: Any, stream: int) -> None:
        self._launch, self._ffi, self._stream = launch, ffi, stream
        self._sms = 132  # the GPU's SMs (set at the first compile)
        self.weights: dict[int, W] = {}  # device address -> its registration (values only)
        self._module: Any = None
        self._dequant: dict[bool, int] = {}  # bf16 -> the dequantizing kernel's CUfunction
        self._scratch: Any = None  # the 16-bit weight a GEMM of many rows reads (grown by add, never in a step)
        self._packed: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # packed launches by their call's values

    def _forget_packed(self) -> None:
        """Drop the packed launches: the scratch they write moved, or a weight they read was removed."""
        self._packed.clear()

    def _grow_scratch(self, nbytes: int) -> None:
        """Make the scratch matrix hold at least ``nbytes`` (at registration, never during a step)."""
        import cupy

        if self._scratch is None or self._scratch.nbytes < nbytes:
            self._scratch = cupy.empty(nbytes, cupy.uint8)
            self._forget_packed()  # packed dequantizations point into the old scratch

    def _slots(self, args: list[int]) -> tuple[Any, Any]:
        """``(params, values)`` of a launch: each of ``args`` in its own 8-byte slot of ``values`` (a 32-bit
        parameter reads its low 4 bytes), ``params`` the kernel's pointers into them; keep ``values`` with them."""
        values = self._ffi.new(f"uint64_t[{len(args)}]", args)
        return self._ffi.new(f"void*[{len(args)}]", [values + i for i in range(len(args))]), values

    def _kept(self, key: tuple[Any, ...], pack: Callable[[], tuple[Any, ...]]) -> tuple[Any, ...]:
        """The launch packed for the call site ``key``: packed by ``pack`` at the first call and kept (at most
        4096 call sites, then the cache starts again)."""
        packed = self._packed.get(key)
        if packed is None:
            packed = pack()
            if len(self._packed) > _MAX_PACKED:
                self._packed.clear()
            self._packed[key] = packed
        return packed

    def _run(self, fn: int, grid: int, threads: int, params: Any, null: Any, name: str) -> None:
        """Launch ``fn`` on ``grid`` blocks of ``threads`` on the stream (no dynamic shared memory); a driver error
        raised naming ``name``."""
        err = self._launch(fn, grid, 1, 1, threads, 1, 1, 0, self._stream, params, null)
        if err:
            raise driver_error(err, f"cuLaunchKernel({name})")

    def run_gemv(self, packed: tuple[Any, ...], null: Any) -> None:
        """Launch a packed GEMV (the subclass's ``gemv``: ``(function, grid, threads, params, values)``)."""
        fn, grid, threads, params, _ = packed
        self._run(fn, grid, threads, params, null, f"{self.kind} gemv")

    def _dequantize(
        self, wt: Any, bf16: bool, null: Any, grid: int, args: Callable[[int], list[int]], name: str
    ) -> int:
        """Write the registered ``wt`` dequantized into the scratch matrix with its ``bf16`` kernel on ``grid``
        blocks of 256 threads (``args(out)``: the kernel's arguments, ``out`` the scratch's address), packed once per
        weight; the scratch's address."""

        def pack() -> tuple[Any, ...]:
            out = int(self._scratch.data.ptr)
            params, values = self._slots(args(out))
            return (self._dequant[bf16], grid, params, values, out)

        fn, grid, params, _, out = self._kept((-1, wt.w, bf16), pack)
        self._run(fn, grid, 256, params, null, name)
        return int(out)

    def remove(self, w: int) -> None:
        """Forget the registration of ``w`` (before its memory is freed: a 16-bit weight allocated there later must
        not be read as this format) and the launches packed for it. Unknown addresses: nothing happens."""
        if self.weights.pop(w, None) is not None:
            self._forget_packed()

    def close(self) -> None:
        """Forget the weights and packed launches and free the scratch (the module goes with the object)."""
        self.weights.clear()
        self._forget_packed()
        self._scratch = None
