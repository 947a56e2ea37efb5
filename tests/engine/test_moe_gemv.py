"""fi_engine.kernels.moe_gemv on the CPU: the grouped GEMV refuses a dtype it has no kernel for before it imports CuPy
(its arithmetic is checked on the GPU in tests/engine/test_gpu_moe.py)."""

from __future__ import annotations

import pytest

from fi_engine.kernels.cuda_sources import source
from fi_engine.kernels.moe_gemv import GroupedGemv


@pytest.mark.parametrize("dtype", ["float32", "fp8_e4m3", None, 16])
def test_a_dtype_without_a_kernel_is_refused_by_name(dtype: object) -> None:
    with pytest.raises(ValueError, match=r"dtype: expected 'float16' or 'bfloat16'"):
        GroupedGemv(dtype, None)  # type: ignore[arg-type]


def test_every_kernel_the_launcher_names_is_in_the_source() -> None:
    for tag in ("f16", "bf16"):
        for rows in (1, 2, 4, 8):
            assert f"GROUPED(grouped_gemv_{tag}_r{rows}," in source("grouped_gemv.cu")
