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
from .launch import MAX_LD, U64, Launcher, int_arg

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
        self._fns = {
            bf16: tuple(function_ptr(f) for f in functions(cupy, "release_rows.cu", names, ("--use_fast_math",)))
            for bf16, names in RELEASE_KERNELS.items()
        }

    def prepared_add_rmsnorm(
        self, rows: int, x: int, h: int, weight: int, k: int, x_ld: int, h_ld: int, eps: float, bf16: bool
    ) -> Callable[[], None]:
        """FlashInfer's ``fused_add_rmsnorm(x, h, weight, eps)`` over ``rows`` rows, packed once: ``s = x + h``,
        ``h = s``, ``x = rmsnorm(s) * weight`` (``x``, ``h [rows, k]`` 16-bit with row strides ``x_ld``, ``h_ld``
        elements; ``weight [k]``). Raises TypeError/ValueError naming an argument that is no int, out of range
        (``rows`` in ``[1, 2**31)``, ``k`` a multiple of 8 in ``[8, 2**24)``, strides ``[0, 2**40)`` and at least
        ``k`` where ``rows`` > 1), NULL or not 16-byte aligned (addresses and rows), or ``eps`` no finite float."""
        int_arg("rows", rows, 1, 1 << 31)
        int_arg("k", k, 8, MAX_WIDTH)
        if k % 8:
            raise ValueError(f"k: {k} must be a multiple of 8 (the rows' 16-byte vectors)")
        for name, value in (("x_ld", x_ld), ("h_ld", h_ld)):
            int_arg(name, value, 0, MAX_LD)
            if rows > 1 and (value < k or value % 8):
                raise ValueError(f"{name}: {value} must be a multiple of 8 of at least k ({k}): rows 16-byte aligned")
        _aligned(("x", x), ("h", h), ("weight", weight))
        args = [x, h, weight, k, x_ld, h_ld, float32_bits("eps", eps)]
        return self._packed(self._fns[bool(bf16)][0], (rows, 1), norm_threads(k), args, "add_rmsnorm_release")

    def prepared_silu_mul(
        self, rows: int, gu: int, act: int, inter: int, gu_ld: int, act_ld: int, bf16: bool
    ) -> Callable[[], None]:
        """FlashInfer's ``silu_and_mul`` over ``rows`` rows, packed once: ``silu(gate) * up`` of each row of
        ``gu [rows, 2 inter]`` (gate its first ``inter`` columns) into ``act [rows, inter]`` (16-bit, row strides in
        elements). Raises as
        :meth:`prepared_add_rmsnorm` (``inter`` as its ``k``; ``gu_ld`` at least ``2 inter``)."""
        int_arg("rows", rows, 1, 1 << 31)
        int_arg("inter", inter, 8, MAX_WIDTH)
        if inter % 8:
            raise ValueError(f"inter: {inter} must be a multiple of 8 (the rows' 16-byte vectors)")
        for name, value, least in (("gu_ld", gu_ld, 2 * inter), ("act_ld", act_ld, inter)):
            int_arg(name, value, 0, MAX_LD)
            if rows > 1 and (value < least or value % 8):
                raise ValueError(f"{name}: {value} must be a multiple of 8 of at least {least}: rows 16-byte aligned")
        _aligned(("gu", gu), ("act", act))
        blocks = -(-inter // (8 * SILU_THREADS))
        args = [gu, act, inter, gu_ld, act_ld]
        return self._packed(self._fns[bool(bf16)][1], (rows, blocks), SILU_THREADS, args, "silu_mul_release")

    def _packed(self, fn: int, grid: tuple[int, int], threads: int, args: list[int], name: str) -> Callable[[], None]:
        launcher = self._launcher
        launcher.check_open()
        params, values = launcher.slots(args)
        return launcher.prepared(fn, grid[0], threads, 0, params, values, name, True, grid[1])  # type: ignore[no-any-return]


def _aligned(*named: tuple[str, Any]) -> None:
    for name, value in named:
        if not int_arg(name, value, 0, U64) or value % 16:
            raise ValueError(f"{name}: 0x{value:x} must be a non-NULL address aligned to 16 bytes")
