"""The separate-launch step's residual-add RMSNorm and SiLU-and-mul as the engine's own launches
(``csrc/release_rows.cu``), each releasing the launch after it at its start.

In a decode step of 5-32 rows each GEMM follows one of FlashInfer's launches (an add-norm, the attention,
``silu_and_mul``), which let the next launch start only as they end, so the GEMM's first weights are asked for only
then. These two kernels repeat FlashInfer's arithmetic (``fused_add_rmsnorm``: the same sums in the same order, bit
for bit; ``silu_and_mul``: its fast-math SiLU) and call ``griddepcontrol.launch_dependents`` first, so the GEMM after
them starts beside them and loads its first weights (before its own wait) while they run. On in the engine
(``ModelRunner.release_rows``); ``bench_llama_tp.py --variants no-release-rows`` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..values import float32_bits
from .cuda_sources import function_ptr, functions
from .launch import MAX_LD, U64, Launcher, address_arg, int_arg, overlap

__all__ = ["RELEASE_KERNELS", "ReleasingRows", "norm_threads"]

# release_rows.cu's kernels, by 16-bit type: (add-norm, SiLU-and-mul)
RELEASE_KERNELS = {
    True: ("add_rmsnorm_release_bf16", "silu_mul_release_bf16"),
    False: ("add_rmsnorm_release_f16", "silu_mul_release_f16"),
}
SILU_THREADS = 256  # a SiLU block's threads, each 8 elements of a row
MAX_WIDTH = 1 << 24  # k and inter: 8-element vectors a row as an int32 index, blocks a row within the grid's limit


def norm_threads(k: int) -> int:
    """The add-norm's threads a block (a row), FlashInfer's: 32 times ``ceil(min(1024, k / 8) / 32)``."""
    return 32 * -(-min(1024, k // 8) // 32)


class ReleasingRows:
    """The add-norm and SiLU launches of ``release_rows.cu``, compiled at construction (NVRTC through CuPy, with
    ``--use_fast_math`` as FlashInfer's modules are) and packed once per call site by ``launcher``."""

    def __init__(self, launcher: Launcher) -> None:
        import cupy

        self._launcher = launcher
        # launches packed so far by kind ("add_rmsnorm", "silu_mul"): counts, which the engine's tests read
        self.packed = {"add_rmsnorm": 0, "silu_mul": 0}
        self._fns = {
            bf16: tuple(function_ptr(f) for f in functions(cupy, "release_rows.cu", names, ("--use_fast_math",)))
            for bf16, names in RELEASE_KERNELS.items()
        }

    def prepared_add_rmsnorm(
        self, rows: int, x: int, h: int, weight: int, k: int, x_ld: int, h_ld: int, eps: float, bf16: bool
    ) -> Callable[[], None]:
        """FlashInfer's ``fused_add_rmsnorm(x, h, weight, eps)`` over ``rows`` rows, packed once: ``s = x + h``,
        ``h = s``, ``x = rmsnorm(s) * weight`` (``x``, ``h [rows, k]`` 16-bit with row strides ``x_ld``, ``h_ld``
        elements; ``weight [k]``). Raises TypeError/ValueError naming an argument that is no int (``bf16``: no
        bool), out of range (``rows`` in ``[1, 2**31)``, ``k`` a multiple of 8 in ``[8, 2**24)``, strides ``[0,
        2**40)`` and at least ``k`` where ``rows`` > 1), NULL or not 16-byte aligned (addresses and rows), whose rows
        run past the address space or overlap another's (the launch writes x and h while reading them and the
        weight), or ``eps`` no finite float."""
        _rows_and_width(rows, "k", k, bf16)
        strides = (("x_ld", x_ld, k), ("h_ld", h_ld, k))
        _strides(rows, strides)
        spans = _spans(rows, (("x", x, x_ld, k), ("h", h, h_ld, k), ("weight", weight, 0, k)))
        _apart(spans)
        args = [x, h, weight, k, x_ld, h_ld, float32_bits("eps", eps)]
        self.packed["add_rmsnorm"] += 1
        return self._packed(self._fns[bf16][0], (rows, 1), norm_threads(k), args, "add_rmsnorm_release")

    def prepared_silu_mul(
        self, rows: int, gu: int, act: int, inter: int, gu_ld: int, act_ld: int, bf16: bool
    ) -> Callable[[], None]:
        """FlashInfer's ``silu_and_mul`` over ``rows`` rows, packed once: ``silu(gate) * up`` of each row of
        ``gu [rows, 2 inter]`` (gate its first ``inter`` columns) into ``act [rows, inter]`` (16-bit, row strides in
        elements). Raises as
        :meth:`prepared_add_rmsnorm` (``inter`` as its ``k``; ``gu_ld`` at least ``2 inter``; ``act`` must not
        overlap ``gu``)."""
        _rows_and_width(rows, "inter", inter, bf16)
        _strides(rows, (("gu_ld", gu_ld, 2 * inter), ("act_ld", act_ld, inter)))
        _apart(_spans(rows, (("gu", gu, gu_ld, 2 * inter), ("act", act, act_ld, inter))))
        blocks = -(-inter // (8 * SILU_THREADS))
        args = [gu, act, inter, gu_ld, act_ld]
        self.packed["silu_mul"] += 1
        return self._packed(self._fns[bf16][1], (rows, blocks), SILU_THREADS, args, "silu_mul_release")

    def _packed(self, fn: int, grid: tuple[int, int], threads: int, args: list[int], name: str) -> Callable[[], None]:
        launcher = self._launcher
        launcher.check_open()
        params, values = launcher.slots(args)
        return launcher.prepared(fn, grid[0], threads, 0, params, values, name, True, grid[1])  # type: ignore[no-any-return]


def _rows_and_width(rows: int, name: str, width: int, bf16: object) -> None:
    int_arg("rows", rows, 1, 1 << 31)
    int_arg(name, width, 8, MAX_WIDTH)
    if width % 8:
        raise ValueError(f"{name}: {width} must be a multiple of 8 (the rows' 16-byte vectors)")
    if not isinstance(bf16, bool):
        raise TypeError(f"bf16: expected a bool (True: bfloat16, False: float16), got {type(bf16).__name__}")


def _strides(rows: int, strides: tuple[tuple[str, int, int], ...]) -> None:
    """Each ``(name, stride, least)`` an int in ``[0, 2**40)``; where ``rows`` > 1 a multiple of 8 (rows 16-byte
    aligned) of at least ``least`` elements (rows apart)."""
    for name, value, least in strides:
        int_arg(name, value, 0, MAX_LD)
        if rows > 1 and (value < least or value % 8):
            raise ValueError(f"{name}: {value} must be a multiple of 8 of at least {least}: rows 16-byte aligned")


def _spans(rows: int, named: tuple[tuple[str, Any, int, int], ...]) -> list[tuple[str, int, int]]:
    """``(name, address, bytes)`` of each ``(name, address, row stride, row width)`` (16-bit elements; stride 0: one
    row), each address a non-NULL int aligned to 16 bytes whose rows end within the address space."""
    spans = []
    for name, value, ld, width in named:
        address_arg(name, value, 16)
        span = 2 * ((rows - 1) * ld + width) if ld else 2 * width
        if value + span > U64:
            raise ValueError(f"{name}: 0x{value:x} + {span} bytes runs past the end of the address space")
        spans.append((name, value, span))
    return spans


def _apart(spans: list[tuple[str, int, int]]) -> None:
    for i, (name, at, span) in enumerate(spans):
        for other, at2, span2 in spans[:i]:
            if overlap(at, span, at2, span2):
                raise ValueError(f"{name}: overlaps {other} (the launch writes one while reading the other)")
