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
    """Each GEMV the launcher looks up (``kernel_names``: by gated, per-block scales, tiled) is instantiated in
    ``grouped_gemv8.cu`` under that name with those flags, and each dequantizer (``dequant_names``) is defined there."""
    from fi_engine.kernels.fp8_moe_gemv import Fp8GroupedGemv

    text = source("grouped_gemv8.cu")
    for dtype in ("float16", "bfloat16"):
        gemvs, dequants = Fp8GroupedGemv.kernel_names(dtype), Fp8GroupedGemv.dequant_names(dtype)
        assert len(gemvs) == 8 and len(set(gemvs.values())) == 8
        for (gated, block, tiled), name in gemvs.items():
            flags = ", ".join(str(f).lower() for f in (dtype == "bfloat16", gated, block, tiled))
            assert f"GROUPED8({name}, {flags})" in text, name
        for name in dequants.values():
            assert f"void {name}(" in text, name


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
        (
            Fp8Experts(gu[:, 1:].copy(), rows[0], dn, rows[1], None),
            r"fp8_experts.gate_up: expected \[experts, 2 \* inter",
        ),
        (Fp8Experts([1], rows[0], dn, rows[1], None), r"fp8_experts.gate_up: expected a CuPy array, got list"),
    ]
    for experts, message in cases:
        with pytest.raises(ValueError, match=message):
            experts.shapes()


def test_fp8_experts_refuse_what_the_kernels_would_misread() -> None:
    """Codes that are not uint8 or scales not float32 (their bytes would be read as such), arrays that are not
    C-contiguous, a block the kernels do not take, a ``tiled`` that is not a bool: each named."""
    import numpy as np

    from fi_engine.kernels.fp8_moe_gemv import Fp8Experts

    e, h, i = 2, 256, 128
    gu, dn = np.zeros((e, 2 * i, h), np.uint8), np.zeros((e, h, i), np.uint8)
    rows = (np.ones((e, 2 * i), np.float32), np.ones((e, h), np.float32))
    good = Fp8Experts(gu, rows[0], dn, rows[1], None)
    assert good.shapes() == (e, h, i)
    cases = [
        (dict(gate_up=gu.astype(np.float16)), r"fp8_experts.gate_up: expected a C-contiguous uint8 array.*float16"),
        (dict(down_scales=rows[1].astype(np.int64)), r"fp8_experts.down_scales: expected a C-contiguous float32"),
        (dict(down=np.asfortranarray(dn)), r"fp8_experts.down: expected a C-contiguous uint8 .*, not C-contiguous$"),
        (dict(block=(0, 128)), r"fp8_experts.block: expected None or \(rows, columns\)"),
        (dict(block=128), r"fp8_experts.block: expected None or"),
        (dict(block=("a", "b")), r"fp8_experts.block: expected None or"),
        (dict(block=(128,)), r"fp8_experts.block: expected None or"),
        (dict(block=(128, 96)), r"fp8_experts.block: expected None or"),
        (dict(tiled=None), r"fp8_experts.tiled: expected True or False, got None"),
        (dict(tiled=1), r"fp8_experts.tiled: expected True or False, got 1"),
    ]
    import dataclasses

    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(good, **change).shapes()


def test_the_blocks_the_grouped_gemv_takes() -> None:
    """``grouped_gemv_block`` (what ``Fp8Scheme.grouped_gemv_takes`` and the kernels' ``add`` ask): rows a multiple
    of 16, columns a power of two >= 128, both positive ints."""
    from fi_engine.checkpoint.quantization import Fp8Scheme, grouped_gemv_block

    takes = [None, (128, 128), (16, 128), (64, 256), (96, 512), (48, 1024)]
    refuses = [(8, 128), (128, 64), (128, 192), (0, 128), (-16, 128), (128,), (128.0, 128), [128, 128], (True, 128)]
    for block, taken in [(b, True) for b in takes] + [(b, False) for b in refuses]:
        assert grouped_gemv_block(block) is taken, block
        if taken:
            assert Fp8Scheme("fp8", "block", "dynamic", block).grouped_gemv_takes()  # type: ignore[arg-type]


def test_the_fp8_grouped_gemv_registers_only_what_its_kernels_can_address() -> None:
    """``add`` (pure arithmetic, no GPU): experts above the grid's 65,535, n or k above 2**30 (the kernels' 32-bit
    row arithmetic), a ``tiled`` that is not a bool, a bad block: refused by name, nothing registered."""
    from fi_engine.kernels.fp8_moe_gemv import Fp8GroupedGemv

    g = Fp8GroupedGemv.__new__(Fp8GroupedGemv)
    g.stacks = {}
    g.add(1 << 20, 1 << 21, 4, 256, 128, (128, 128), True)
    assert g.stacks[1 << 20].shift == 3 and g.stacks[1 << 20].tiled
    for change, message in (
        ({"experts": 65536}, r"experts: expected an int in \[1, 65535\], got 65536"),
        ({"n": (1 << 30) + 16}, r"n: expected an int in \[1, 1073741824\]"),
        ({"k": 1 << 31}, r"k: expected an int in \[1, 1073741824\]"),
        ({"tiled": None}, r"tiled: expected True or False, got None"),
        ({"block": (128, 96)}, r"block: expected None or \(rows, columns\)"),
        ({"block": (128, 128), "n": 192}, r"block: .* rows dividing n \(192\)"),
    ):
        args = {"w": 1 << 22, "scales": 1 << 23, "experts": 4, "n": 256, "k": 128, "block": (128, 128), "tiled": False}
        with pytest.raises(ValueError, match=message):
            g.add(**{**args, **change})  # type: ignore[arg-type]
    assert list(g.stacks) == [1 << 20]


def test_the_dequantizer_refuses_an_out_that_is_not_the_stacks_16bit_copy() -> None:
    """``dequantize(w, out)`` writes ``E * n * k`` 16-bit values: an ``out`` of another shape, element size or
    layout is refused by name before any launch (arrays here are numpy stand-ins with a ``data.ptr``)."""
    from types import SimpleNamespace

    import numpy as np

    from fi_engine.kernels.fp8_moe_gemv import Fp8GroupedGemv

    g = Fp8GroupedGemv.__new__(Fp8GroupedGemv)
    g.stacks = {}
    g.add(1 << 20, 1 << 21, 2, 32, 128, None)
    w = SimpleNamespace(data=SimpleNamespace(ptr=1 << 20), shape=(2, 32, 128))

    def out(a: np.ndarray) -> SimpleNamespace:
        return SimpleNamespace(shape=a.shape, dtype=a.dtype, flags=a.flags, data=SimpleNamespace(ptr=1 << 22))

    for bad in (np.zeros((2, 32, 64), np.float16), np.zeros((2, 32, 128), np.float32),
                np.zeros((2, 128, 32), np.uint16).transpose(0, 2, 1)):  # fmt: skip
        with pytest.raises(ValueError, match=r"^out: expected a C-contiguous 16-bit array of shape \[2, 32, 128\]"):
            g.dequantize(w, out(bad))
