"""The skinny GEMM's host side without a GPU (fi_engine.kernels.skinny_gemm): which calls it takes, how it splits k,
and that every geometry a Dense may launch is compiled by ``csrc/skinny_gemm.cu``'s default instances (the ones
``tools/kernel_fingerprints.py`` fingerprints). Its numbers are tests/engine/test_gpu_skinny_gemm.py's."""

from __future__ import annotations

import re

import pytest

from fi_engine.kernels.cuda_sources import read
from fi_engine.kernels.skinny_gemm import (
    E4M3_BLOCK,
    E4M3_ROW,
    GEOMETRIES,
    INT4,
    PART_BYTES,
    W16,
    Geometry,
    range_length,
    splits,
    takes,
)

SHAPES_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
SMS = 132  # an H100's


def test_the_split_rule_gives_the_h100_sweeps_best_splits_of_the_8b_shapes() -> None:
    # benchmarks/RESULTS.md: the fastest splits at 5-16 rows were, for x read from global memory (16-bit: 4 warps
    # of one tile), QKV 4, O 4, gate/up 1, down 4; for e4m3 (8 warps of one tile), QKV 4, O 8, gate/up 1, down 8
    x16, x8 = Geometry(1, 4, 4, 1, 0), Geometry(1, 2, 8, 1, 0)
    best16 = {"qkv": 4, "o": 4, "gate_up": 1, "down": 4}
    best8 = {"qkv": 4, "o": 8, "gate_up": 1, "down": 8}
    for name, (n, k) in SHAPES_8B.items():
        rule = splits(x16, W16, 8, n, k, SMS)
        assert best16[name] in (rule, rule // 2), (name, rule)
        rule = splits(x8, E4M3_BLOCK, 8, n, k, SMS, 128)
        assert best8[name] in (rule, rule // 2), (name, rule)


@pytest.mark.parametrize("fmt,block_k", [(W16, 0), (E4M3_ROW, 0), (E4M3_BLOCK, 128), (E4M3_BLOCK, 256)])
def test_k_ranges_are_whole_steps_and_blocks_and_cover_k(fmt: int, block_k: int) -> None:
    step = 32 if fmt == W16 else 64
    for k in (step, 576, 1344, 4096, 14336):
        if k % step:
            continue
        for s in (1, 2, 3, 4, 7, 8, 16):
            kc = range_length(fmt, k, s, block_k)
            assert kc % step == 0 and (not block_k or kc % block_k == 0), (k, s, kc)
            ranges = -(-k // kc)
            assert ranges <= s and ranges * kc >= k and (ranges - 1) * kc < k, (k, s, kc)


def test_splits_keep_the_sums_within_the_scratch_and_ranges_nonempty() -> None:
    g = Geometry(1, 4, 8, 1, 512)
    for rows in (1, 8, 32):
        for n, k in ((128, 64), (32, 4096), (1 << 20, 4096), (64, 1 << 20)):
            s = splits(g, W16, rows, n, k, SMS)
            blocks = -(-n // g.rows_per_block)
            assert 1 <= s <= max(1, k // 32)
            kc = range_length(W16, k, s)
            assert (-(-k // kc) - 1) * kc < k  # the grid's ranges (ceil(k / kc)) each start inside k
            assert s == 1 or s * blocks * g.rows_per_block * 8 * -(-rows // 8) * 4 <= PART_BYTES


def test_takes_refuses_what_the_kernel_cannot_read() -> None:
    ok = dict(fmt=W16, rows=8, x=256, x_ld=4096, w=1 << 20, n=4096, k=4096, y=512, f32out=False, block=None)
    assert takes(**ok) == (16, 0, 0)
    for change in (
        {"rows": 0},
        {"rows": 33},
        {"k": 4008},  # not whole 32-input steps
        {"x": 264},  # x, its rows and w 16-byte aligned (16-byte loads and asynchronous copies)
        {"x_ld": 4100},
        {"w": (1 << 20) + 8},
        {"y": 513},  # y aligned to its elements
        {"y": 514, "f32out": True},
        {"n": 0},
        {"n": 1 << 31},
        {"fmt": 7},
    ):
        assert takes(**{**ok, **change}) is None, change
    e4m3 = {**ok, "fmt": E4M3_BLOCK, "block": (128, 128)}
    assert takes(**e4m3) == (128, 1, 128)
    assert takes(**{**e4m3, "block": (128, 64)}) == (128, 0, 64)
    for block in (None, (100, 128), (128, 96), (128, 32)):
        assert takes(**{**e4m3, "block": block}) is None, block
    assert takes(**{**e4m3, "k": 4064}) is None  # e4m3: whole 64-input steps
    assert takes(**{**ok, "fmt": E4M3_ROW}) == (16, 0, 0)
    assert takes(**{**ok, "fmt": INT4}) == (16, 0, 0)
    assert takes(**{**ok, "fmt": INT4, "k": 4032}) is None  # int4: whole 128-input tiles


def test_every_geometry_a_dense_launches_is_a_default_instance() -> None:
    text = read("skinny_gemm.cu")
    body = text[text.index("#define SKINNY_ROWS(MT)") :]
    defaults = set(re.findall(r"SKINNY_TYPES\(\w+, (SK_\w+), MT, (\d+), (\d+), (\d+), (\d+), (\d+)\)", body))
    names = {W16: "SK_W16", E4M3_BLOCK: "SK_E4M3_BLOCK", E4M3_ROW: "SK_E4M3_ROW", INT4: "SK_INT4"}
    for fmt, geometries in GEOMETRIES.items():
        for g in geometries:
            assert (names[fmt], str(g.nt), str(g.u), str(g.warps), str(g.min_blocks), str(g.kx)) in defaults, (fmt, g)
    for mt in (1, 2, 3, 4):
        assert f"SKINNY_ROWS({mt})" in text
    for name, value in names.items():  # the kernel's FMT codes are the module's
        assert f"#define {value} {name}" in text


def test_kernel_names_and_instances_agree() -> None:
    g = Geometry(1, 4, 8, 1, 512)
    assert g.name(E4M3_BLOCK, True, False, 3) == "skinny8b_bf16_16_m3_n1_u4_w8_b1_x512"
    assert g.instance(E4M3_BLOCK, True, False, 3) == "SKINNY(skinny8b_bf16_16, true, false, 1, 3, 1, 4, 8, 1, 512)"
    assert g.name(W16, False, True, 1) == "skinny_f16_f32_m1_n1_u4_w8_b1_x512"
    assert g.smem(W16, 4) == 2 * 32 * (512 + 32) * 2 and g.smem(E4M3_ROW, 1) == 2 * 8 * (512 + 8) * 2
    assert Geometry(1, 2, 8, 1, 0).smem(W16, 4) == 0


def test_registering_or_removing_a_quantized_weight_forgets_the_launches_chosen_by_address() -> None:
    """``Dense._choices`` and the skinny GEMM's packed launches are keyed by addresses and shapes: a quantized weight
    registered or removed at an address changes what a call there reads (a 16-bit weight allocated where an FP8 one
    was must not be read as e4m3), so both are dropped. (A Dense made without its GPU parts: removing touches no
    device.)"""
    from fi_engine.kernels.dense import Dense
    from fi_engine.kernels.launch import Launcher
    from fi_engine.kernels.quantized_weights import QuantizedWeights
    from fi_engine.kernels.skinny_gemm import SkinnyLaunches

    d = Dense.__new__(Dense)
    launcher = Launcher(0)
    d._skinny = SkinnyLaunches(launcher)
    d.quantized = QuantizedWeights(launcher, 0, d._quantized_changed, lambda key, accumulate: None)
    d._choices = {(8, 4096, 4096, 14, 14, 1 << 20): 0}
    call = (8, 1 << 21, 4096, 1 << 20, 4096, 4096, 1 << 22, 4096, 14, 14)
    d._skinny._calls = {(call, 0): print}
    d.quantized.remove_weight(1 << 20)  # (FP8 or int4: one removal serves both registries)
    assert d._choices == {} and d._skinny._calls == {}
