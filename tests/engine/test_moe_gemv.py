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


@pytest.mark.parametrize("dtype", ["float32", "fp8_e4m3", None, 16])
def test_the_fp8_grouped_gemv_refuses_a_dtype_without_a_kernel_by_name(dtype: object) -> None:
    from fi_engine.kernels.fp8_moe_gemv import Fp8GroupedGemv

    with pytest.raises(ValueError, match=r"dtype: expected 'float16' or 'bfloat16'"):
        Fp8GroupedGemv(dtype, None)  # type: ignore[arg-type]


def test_every_fp8_kernel_the_launcher_names_is_in_the_source() -> None:
    text = source("grouped_gemv8.cu")
    for tag in ("f16", "bf16"):
        for scales in ("row", "block"):
            for gated in ("", "_silu"):
                assert f"GROUPED8(grouped_gemv8_{tag}_{scales}{gated}," in text
        assert f"void dequant_e4m3_{tag}(" in text


def test_fp8_experts_name_the_array_that_does_not_fit() -> None:
    """``Fp8Experts.shapes`` (what MoELayer checks ``fp8_experts`` with): each array's shape against the others',
    per-row and per-block scales."""
    import numpy as np

    from fi_engine.kernels.fp8_moe_gemv import Fp8Experts

    e, h, i = 4, 256, 384
    gu, dn = np.zeros((e, 2 * i, h), np.uint8), np.zeros((e, h, i), np.uint8)
    rows = (np.ones((e, 2 * i), np.float32), np.ones((e, h), np.float32))
    blocks = (np.ones((e, 6, 2), np.float32), np.ones((e, 2, 3), np.float32))
    assert Fp8Experts(gu, rows[0], dn, rows[1], None).shapes() == (e, h, i)
    assert Fp8Experts(gu, blocks[0], dn, blocks[1], (128, 128)).shapes() == (e, h, i)
    cases = [
        (Fp8Experts(gu, rows[0], dn, rows[1], (128, 128)), r"fp8_experts.gate_up_scales: expected \[4, 6, 2\]"),
        (Fp8Experts(gu, blocks[0], dn, blocks[0], (128, 128)), r"fp8_experts.down_scales: expected \[4, 2, 3\]"),
        (Fp8Experts(gu, rows[0], gu, rows[1], None), r"fp8_experts.down: expected \[4, 256, 384\]"),
        (Fp8Experts(gu[:, :-1], rows[0], dn, rows[1], None), r"fp8_experts.gate_up: expected \[experts, 2 \* inter"),
        (Fp8Experts([1], rows[0], dn, rows[1], None), r"fp8_experts.gate_up: expected a CuPy array, got list"),
    ]
    for experts, message in cases:
        with pytest.raises(ValueError, match=message):
            experts.shapes()
