"""How the engine's 16-bit GEMVs are compiled, plain (``csrc/gemv.cu``, :class:`~fi_engine.kernels.dense.Dense`'s)
and fused (``csrc/fused_gemv.cu``, :class:`~fi_engine.kernels.fused_gemv.FusedGemvs`'): the settings both compile in
(:class:`GemvSettings`), their kernels' names per type pair and row count, and the lookup of one kernel per row count.
"""

from __future__ import annotations

from typing import Any

from .cublas import CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F
from .cuda_sources import function_ptr

__all__ = ["GEMV_MAX_ROWS", "GEMV_NAMES", "GemvSettings"]

GEMV_MAX_ROWS = 4  # the rows one GEMV launch takes (the kernel keeps a sum per row in registers)

# (ab_type, c_type) -> the 16-bit GEMV's kernel name (without the ``_r<rows>`` suffix)
GEMV_NAMES = {
    (CUDA_R_16F, CUDA_R_16F): "gemv_f16_f16",
    (CUDA_R_16F, CUDA_R_32F): "gemv_f16_f32",
    (CUDA_R_16BF, CUDA_R_16BF): "gemv_bf16_bf16",
    (CUDA_R_16BF, CUDA_R_32F): "gemv_bf16_f32",
}


def unroll(value: Any) -> int:
    """A ``gemv_unroll`` / ``rope_unroll`` setting checked: an int from 1 to 16 (registers bound it)."""
    if value.__class__ is not int or not 1 <= value <= 16:
        raise ValueError(
            f"GemvSettings.gemv_unroll, FusedGemvs.rope_unroll: expected an int from 1 to 16, got {value!r:.40}"
        )
    return int(value)


class GemvSettings:
    """The compile-time settings of the 16-bit GEMVs, plain and fused (class attributes, read when a
    :class:`~fi_engine.kernels.dense.Dense` is made; set one on the class to compare)."""

    gemv_unroll = 4
    """16-byte weight vectors each lane of the 16-bit GEMVs (plain and fused) keeps in flight: more bytes in flight
    per warp against more registers (``benchmarks/bench_llama_tp.py --variants unroll-N``)."""

    gemv_fixed_rows = True
    """The 16-bit GEMVs (plain, fused, RoPE, router) compiled once per row count, 1 to 4, each launch taking the
    kernel of its rows: loops of known length, whose loads of the input rows the compiler issues together. False:
    one kernel per variant for any row count (each row's load behind a branch), as the engine ran before 2026-11-25.
    The same sums either way (``benchmarks/bench_llama_tp.py --variants any-rows``)."""

    gemv_pipeline = True
    """The plain and fused 16-bit GEMVs load each lane's next :attr:`gemv_unroll` weight vectors before summing the
    ones in hand, so a load never waits for a sum (the same sums in the same order;
    ``benchmarks/bench_llama_tp.py --variants no-gemv-pipeline``)."""

    @classmethod
    def gemv_options(cls) -> tuple[str, ...]:
        """The NVRTC options ``csrc/gemv.cu`` is compiled with: :attr:`gemv_unroll`, :attr:`gemv_fixed_rows` and
        :attr:`gemv_pipeline` (what ``tools/kernel_fingerprints.py`` compiles too)."""
        return (
            f"-DGEMV_UNROLL={unroll(cls.gemv_unroll)}",
            f"-DGEMV_FIXED_ROWS={int(bool(cls.gemv_fixed_rows))}",
            f"-DGEMV_PIPELINE={int(bool(cls.gemv_pipeline))}",
        )

    @classmethod
    def row_kernel_names(cls, name: str) -> list[str]:
        """Kernel ``name``'s functions for 1, 2, 3 and 4 rows, in that order: ``name_r1`` .. ``name_r4``, or without
        :attr:`gemv_fixed_rows` ``name_r0`` four times (one kernel for any count)."""
        return [f"{name}_r{r}" for r in range(1, GEMV_MAX_ROWS + 1)] if cls.gemv_fixed_rows else [f"{name}_r0"] * 4

    @classmethod
    def by_row_count(cls, module: Any, name: str, keep: bool = False) -> Any:
        """Kernel ``name``'s functions of the compiled ``module`` for 1, 2, 3 and 4 rows (:meth:`row_kernel_names`):
        CUfunction handles, or with ``keep`` the CuPy functions."""
        kernels = [module.get_function(n) for n in cls.row_kernel_names(name)]
        return tuple(kernels) if keep else tuple(function_ptr(k) for k in kernels)
