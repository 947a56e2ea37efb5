"""The wgmma skinny GEMM's host side without a GPU (fi_engine.kernels.skinny_wgmma): the B operand's descriptor bit
fields, which calls it takes, how it splits k, that each launch's arguments are the kernel's parameters in order,
that every geometry a Dense may launch is a default instance of ``csrc/skinny_wgmma.cu`` (the ones
``tools/kernel_fingerprints.py`` fingerprints), and which shapes, rows and devices get its plans. Its numbers are
tests/engine/test_gpu_skinny_wgmma.py's."""

from __future__ import annotations

import re

import pytest

from fi_engine.kernels.cublas import CUDA_R_16BF, CUDA_R_32F
from fi_engine.kernels.cuda_sources import read
from fi_engine.kernels.launch import Launcher
from fi_engine.kernels.skinny_gemm import E4M3_BLOCK, E4M3_ROW, INT4, W16, SkinnyGemm
from fi_engine.kernels.skinny_wgmma import (
    GEOMETRIES,
    WgmmaGemm,
    WgmmaGeometry,
    WgmmaLaunches,
    descriptor,
    descriptor_fields,
    padded_rows,
    range_length,
    splits,
    takes,
)

SMS = 132  # an H100's


def test_the_descriptor_fields_are_the_k_major_no_swizzle_layouts_offsets() -> None:
    # 32 rows: core matrices of an instruction's two k halves 32 * 16 = 512 bytes apart (LBO, bits 16-29: 512 / 16
    # = 32), 8-row groups 128 bytes apart (SBO, bits 32-45: 8), no swizzle (bits 62-63: 0); the address's bits 4-17
    # in bits 0-13
    assert descriptor_fields(32) == 0x0000_0008_0020_0000
    assert descriptor_fields(16) == 0x0000_0008_0010_0000
    assert descriptor(0x1230, 32) == 0x0000_0008_0020_0123
    assert descriptor(0x4_0010, 16) == 0x0000_0008_0010_0001  # (shared addresses: 18 bits)
    assert descriptor_fields(32) >> 62 == 0 and (descriptor_fields(32) >> 49) & 7 == 0


def test_rows_pad_to_the_instructions_n() -> None:
    assert [padded_rows(r) for r in (9, 16, 17, 24, 32)] == [16, 16, 32, 32, 32]


def test_takes_the_rows_and_shapes_the_kernel_reads() -> None:
    ok = dict(fmt=W16, rows=24, x=256, x_ld=4096, w=1 << 20, n=4096, k=4096, y=512, f32out=False, block=None)
    assert takes(**ok) == (16, 0, 0)
    for change in (
        {"rows": 8},  # up to 8 rows: the mma.sync kernel's
        {"rows": 33},
        {"k": 4064},  # whole 64-input steps
        {"x": 264},
        {"x_ld": 4100},
        {"w": (1 << 20) + 8},
        {"y": 513},
        {"y": 514, "f32out": True},
        {"n": 0},
        {"fmt": 7},
    ):
        assert takes(**{**ok, **change}) is None, change
    assert takes(**{**ok, "rows": 9}) == takes(**{**ok, "rows": 32}) == (16, 0, 0)
    e4m3 = {**ok, "fmt": E4M3_BLOCK, "block": (128, 128)}
    assert takes(**e4m3) == (128, 1, 128)
    for block in (None, (100, 128), (128, 96)):
        assert takes(**{**e4m3, "block": block}) is None, block
    assert takes(**{**ok, "fmt": E4M3_ROW}) == (16, 0, 0)
    assert takes(**{**ok, "fmt": INT4, "k": 4032}) is None  # int4: whole 128-input tiles
    assert takes(**{**ok, "fmt": INT4, "k": 4096}) == (16, 0, 0)


@pytest.mark.parametrize("fmt,block_k", [(W16, 0), (E4M3_ROW, 0), (E4M3_BLOCK, 128), (INT4, 0)])
def test_k_ranges_are_whole_steps_and_blocks_and_cover_k(fmt: int, block_k: int) -> None:
    step = 128 if fmt == INT4 else 64
    for k in (step, 1344 if step == 64 else 1408, 4096, 14336):
        for s in (1, 2, 3, 4, 8, 16):
            kc = range_length(fmt, k, s, block_k)
            assert kc % step == 0 and (not block_k or kc % block_k == 0), (k, s, kc)
            ranges = -(-k // kc)
            assert ranges <= s and ranges * kc >= k and (ranges - 1) * kc < k, (k, s, kc)


def test_the_split_rule_fills_the_gpu_and_the_scratch_bounds_it() -> None:
    g = WgmmaGeometry(2, 2, 512)
    assert splits(g, E4M3_BLOCK, 32, 28672, 4096, SMS, 128) == 1  # gate/up: 224 blocks already
    assert splits(g, E4M3_BLOCK, 32, 4096, 4096, SMS, 128) == 8  # O: 32 blocks -> 256
    assert splits(g, INT4, 24, 4096, 14336, SMS) == 8
    assert splits(g, W16, 32, 64, 1 << 20, SMS) <= (32 << 20) // (64 * 32 * 4)


def test_every_geometry_a_dense_launches_is_a_default_instance() -> None:
    text = read("skinny_wgmma.cu")
    body = text[text.index("#define WGMMA_ROWS(NR)") :]
    defaults = set(re.findall(r"SKINNY_WGMMA_TYPES\(\w+, (SK_\w+), NR, (\d+), (\d+), (\d+)\)", body))
    names = {W16: "SK_W16", E4M3_BLOCK: "SK_E4M3_BLOCK", E4M3_ROW: "SK_E4M3_ROW", INT4: "SK_INT4"}
    for fmt, geometries in GEOMETRIES.items():
        for g in geometries:
            assert (names[fmt], str(g.warpgroups), str(g.u), str(g.kx)) in defaults, (fmt, g)
    assert "WGMMA_ROWS(16)" in text and "WGMMA_ROWS(32)" in text


def test_kernel_names_and_instances_agree() -> None:
    g = WgmmaGeometry(2, 2, 512)
    assert g.name(INT4, True, False, 32) == "wgmma4_bf16_16_r32_w2_u2_x512"
    assert g.instance(INT4, True, False, 32) == "SKINNY_WGMMA(wgmma4_bf16_16, true, false, SK_INT4, 32, 2, 2, 512)"
    assert g.name(E4M3_ROW, False, True, 16) == "wgmma8r_f16_f32_r16_w2_u2_x512"
    assert g.smem(32) == 2 * 512 * 32 * 2 and g.threads == 256 and g.rows_per_block == 128


def _gemm(available: bool = True) -> WgmmaGemm:
    """A WgmmaGemm without a GPU: its device facts set, each kernel a made-up handle (the plans' packing only)."""
    gemm = WgmmaGemm.__new__(WgmmaGemm)
    gemm.available, gemm.sms, gemm._smem_limit = available, SMS, 227 << 10
    gemm._part, gemm._done = 0x7000_0000, 0x7100_0000
    gemm._modules, gemm._fns = {}, {}
    gemm._function = lambda geometry, fmt, bf16, f32out, nr: hash(geometry.name(fmt, bf16, f32out, nr)) & 0xFFFF
    return gemm


def test_each_plan_packs_the_kernels_parameters_in_order() -> None:
    text = read("skinny_wgmma.cu")
    found = re.search(r"_x##KX\((.*?)\)\s*\{", text, re.DOTALL)
    assert found is not None
    params = [p.split()[-1].lstrip("*") for p in found[1].replace("\\", "").split(",")]
    assert params == [
        "x",
        "w",
        "y",
        "part",
        "done",
        "rows",
        "n",
        "k",
        "x_ld",
        "y_ld",
        "kc",
        "q",
        "q_ld",
        "q_a",
        "q_b",
        "desc",
    ]
    gemm = _gemm()
    rows, n, k = 24, 4096, 14336
    int4 = (0x5000, k // 128, 1, 2048)  # (records, groups a row, gshift, half_n)
    plans = gemm.plans(INT4, rows, 0x1000, k, 0x2000, n, k, 0x3000, n, True, False, int4=int4)
    assert len(plans) == 2 * len(GEOMETRIES[INT4])  # each geometry at the rule's split and half of it
    for plan, g in zip(plans, [g for g in GEOMETRIES[INT4] for _ in (0, 1)], strict=True):
        x, w, y, part, done, r, nn, kk, x_ld, y_ld, kc, q, q_ld, q_a, q_b, desc = plan.args
        assert (x, w, y, part, done, r, nn, kk, x_ld, y_ld) == (0x1000, 0x2000, 0x3000, 0x7000_0000, 0x7100_0000,
                                                                 rows, n, k, k, n)  # fmt: skip
        assert (q, q_ld, q_a, q_b) == (0x5000, k // 128, 2048, 1)  # the kernel's q_a: half_n, q_b: gshift
        assert desc == descriptor_fields(32)
        assert plan.grid == (-(-n // g.rows_per_block), -(-k // kc)) and kc % 128 == 0
        assert plan.threads == g.threads and plan.smem == g.smem(32)
    fp8 = gemm.plans(E4M3_BLOCK, 12, 0x1000, 4096, 0x2000, 6144, 4096, 0x3000, 6144, True, True, 0x9000, 32, (128, 128))
    assert fp8 and all(p.args[11:15] == (0x9000, 32, 128, 1) and p.args[15] == descriptor_fields(16) for p in fp8)
    assert all(p.args[10] % 128 == 0 for p in fp8)  # whole scale blocks a range


def test_no_plans_off_hopper_or_for_rows_it_does_not_take() -> None:
    assert _gemm(available=False).plans(W16, 24, 0x1000, 4096, 0x2000, 4096, 4096, 0x3000, 4096, True, False) == []
    gemm = _gemm()
    for rows in (1, 8, 33):
        assert gemm.plans(W16, rows, 0x1000, 4096, 0x2000, 4096, 4096, 0x3000, 4096, True, False) == []
    assert gemm.plans(W16, 17, 0x1000, 4096, 0x2000, 4096, 4096, 0x3000, 4096, True, False)


class _NoSkinnyPlans(SkinnyGemm):
    """The skinny GEMM with no plan of its own (no GPU here): what WgmmaLaunches adds after its plans is seen alone."""

    def __init__(self) -> None:
        self.available, self.sms, self._smem_limit, self._part, self._done = True, SMS, 227 << 10, 1 << 30, 1 << 31

    def plans(self, *args: object, **kwargs: object) -> list:  # type: ignore[override]
        return []


def _launches() -> WgmmaLaunches:
    launches = WgmmaLaunches(Launcher(0))
    launches._gemm = _NoSkinnyPlans()
    launches._wgmma = _gemm()
    return launches


def test_a_dense_gets_wgmma_plans_for_9_to_32_rows_of_16_bit_calls_unless_switched_off() -> None:
    call = (24, 0x1000, 4096, 0x2000, 4096, 4096, 0x3000, 4096, CUDA_R_16BF, CUDA_R_16BF)
    launches = _launches()
    assert len(launches.plans(call, None)) == 2 * len(GEOMETRIES[W16])
    assert len(launches.plans((*call[:9], CUDA_R_32F), None)) == 2 * len(GEOMETRIES[W16])
    for rows in (4, 8, 33):
        assert launches.plans((rows, *call[1:]), None) == [], rows
    assert launches.plans((*call[:8], CUDA_R_32F, CUDA_R_32F), None) == []  # float32 x: neither kernel
    try:
        WgmmaLaunches.wgmma = False
        assert _launches().plans(call, None) == []
    finally:
        WgmmaLaunches.wgmma = True
    try:
        WgmmaLaunches.on = False  # the skinny GEMM switched off takes its wgmma form with it
        assert _launches().plans(call, None) == []
    finally:
        WgmmaLaunches.on = True
    off = _launches()
    off._wgmma = _gemm(available=False)  # no SM 9.0 GPU
    assert off.plans(call, None) == []


def test_the_kernels_a_dense_looks_up_are_in_the_program_it_compiles() -> None:
    """WgmmaGemm compiles a format's instances (``WGMMA_INSTANCES``) for sm_90a and looks each geometry's kernels up
    by name; a name the program does not define would leave the wgmma plans off on the GPU. NVRTC on the CPU
    (skipped without it)."""
    from helpers.tools import load_tool

    from fi_engine.kernels.cuda_sources import source

    tool = load_tool("kernel_fingerprints")
    lines = [g.instance(INT4, True, False, r) for g in GEOMETRIES[INT4] for r in (16, 32)]
    code = "#define WGMMA_INSTANCES " + " ".join(lines) + "\n" + source("skinny_wgmma.cu")
    try:
        cubin = tool.compile_cubin(code, ("-arch=sm_90a",), "sm_90")
    except tool.CompileError:
        raise
    except Exception as exc:  # no cuda.bindings or NVRTC library here
        pytest.skip(f"NVRTC is not usable here ({type(exc).__name__})")
    names = {g.name(INT4, True, False, r) for g in GEOMETRIES[INT4] for r in (16, 32)}
    sections = tool.text_sections(cubin)
    assert set(sections) == names and all(len(code) > 4096 for code in sections.values())  # wgmma bodies, not empty
