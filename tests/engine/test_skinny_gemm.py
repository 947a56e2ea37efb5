"""The skinny GEMM's host side without a GPU (fi_engine.kernels.skinny_gemm): which calls it takes, how it splits k,
and that every geometry a Dense may launch is compiled by ``csrc/skinny_gemm.cu``'s default instances (the ones
``tools/kernel_fingerprints.py`` fingerprints). Its numbers are tests/engine/test_gpu_skinny_gemm.py's."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace
from typing import Any

import pytest

from fi_engine.kernels.cuda_sources import read
from fi_engine.kernels.skinny_gemm import (
    DONE_SLOTS,
    E4M3_A8,
    E4M3_A8Q,
    E4M3_BLOCK,
    E4M3_ROW,
    GEOMETRIES,
    INT4,
    INT4_A8Q,
    PART_BYTES,
    SPLIT_HALF,
    SPLIT_RULE,
    SPLIT_WAVES,
    W16,
    Geometry,
    SkinnyGemm,
    SkinnyLaunches,
    _unit,
    range_length,
    splits,
    takes,
    wave_fill,
    wave_split,
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


def test_the_wave_split_fills_the_gate_up_grids_waves() -> None:
    # the 8B gate/up weight (28672 x 4096) on 8 warps of one tile: 224 column blocks; 132 SMs
    g = Geometry(1, 2, 8, 1, 0)
    n, k = SHAPES_8B["gate_up"]
    assert -(-n // g.rows_per_block) == 224
    assert splits(g, E4M3_BLOCK, 8, n, k, SMS, 128) == 1  # the rule: 224 blocks >= 1.5 an SM, one range
    # one block an SM: 224 blocks are 2 waves of 132, 224 / 264 full; 4 ranges of 1024 inputs are 896 blocks, 7
    # waves (924 slots); 8 ranges are 1792 blocks, 14 waves (1848 slots), as full but with twice the sums to add
    assert wave_fill(224, E4M3_BLOCK, k, 1, 132, 128) == pytest.approx(224 / 264)
    assert wave_fill(224, E4M3_BLOCK, k, 4, 132, 128) == pytest.approx(896 / 924)
    assert wave_fill(224, E4M3_BLOCK, k, 8, 132, 128) == pytest.approx(1792 / 1848)
    assert wave_split(g, E4M3_BLOCK, 8, n, k, SMS, 1, 128) == 4
    # two blocks an SM (264 slots): 224 blocks are one wave 85 % full, and no split of 2 to 6 ranges fills more; 7
    # ranges of whole 128-input blocks are 640 inputs (the last 256): 1568 blocks, 6 waves of 264 slots, each as
    # long as 640 inputs: 224 x 4096 / (6 x 264 x 640) = 0.905; 8 ranges of 512: 1792 blocks, 7 waves, 0.970
    assert wave_fill(224, E4M3_BLOCK, k, 7, 264, 128) == pytest.approx(224 * 4096 / (6 * 264 * 640))
    assert wave_fill(224, E4M3_BLOCK, k, 8, 264, 128) == pytest.approx(1792 / 1848)
    assert wave_split(g, E4M3_BLOCK, 8, n, k, SMS, 2, 128) == 8
    for fmt in (W16, E4M3_ROW, INT4):
        assert wave_split(g, fmt, 8, n, k, SMS, 1) == 4, fmt
    assert wave_split(g, INT4, 8, n, k, SMS, 2) == 8  # (ranges of whole 128-input tiles, as the blocks' above)
    # 16-bit, ranges of whole 32-input steps: 7 ranges of 608 (the last 448) are 1568 blocks, 6 waves of 264:
    # 224 x 4096 / (6 x 264 x 608) = 0.953, within WAVE_NEAR of 8 ranges' 0.970, and fewer
    assert wave_fill(224, W16, k, 7, 264) == pytest.approx(224 * 4096 / (6 * 264 * 608))
    assert wave_split(g, W16, 8, n, k, SMS, 2) == 7


def test_no_wave_split_where_the_rules_grid_fills_its_waves() -> None:
    # O (4096 x 4096) on 8 warps: 32 blocks, the rule's 8 ranges 256 blocks = 2 waves of 132, 97 % full
    g = Geometry(1, 2, 8, 1, 0)
    for name in ("o", "down"):
        n, k = SHAPES_8B[name]
        assert splits(g, E4M3_ROW, 8, n, k, SMS) == 8
        assert wave_fill(32, E4M3_ROW, k, 8, SMS) == pytest.approx(256 / 264)
        assert wave_split(g, E4M3_ROW, 8, n, k, SMS, 1) is None, name
        assert wave_split(g, E4M3_ROW, 8, n, k, SMS, 2) is None, name  # 256 of 264: one wave
    n, k = SHAPES_8B["qkv"]  # 48 blocks, 8 ranges: 384 blocks, 2 waves of 132 (97 %) but 1.45 waves of 264
    assert wave_split(g, E4M3_ROW, 8, n, k, SMS, 1) is None
    assert wave_split(g, E4M3_ROW, 8, n, k, SMS, 2) == 11  # 528 blocks: 2 waves of 264 (ranges of 384, last 256)


def test_the_wave_split_keeps_within_the_scratch_and_the_steps() -> None:
    g = Geometry(1, 4, 4, 1, 0)  # 64 rows a block
    for rows in (1, 8, 17, 32):
        for n, k in ((28672, 4096), (200_000, 4096), (1 << 20, 4096), (28672, 256), (28672, 64), (6144, 4096)):
            for resident in (1, 2, 3, 4):
                s = wave_split(g, W16, rows, n, k, SMS, resident)
                if s is None:
                    continue
                blocks = -(-n // g.rows_per_block)
                per_split = blocks * g.rows_per_block * 8 * -(-rows // 8) * 4
                assert 1 <= s <= max(1, k // 32) and (s == 1 or s * per_split <= PART_BYTES), (rows, n, k, s)
                assert s != splits(g, W16, rows, n, k, SMS)
    # 1 << 20 rows: one range's sums are 256 MiB at 8 rows, past the scratch: only one range, the rule's
    assert wave_split(g, W16, 8, 1 << 20, 4096, SMS, 1) is None
    # k of two steps: at most two ranges (the grid of 2 x 448 blocks on 132 slots fills 7 waves to 97 %)
    assert wave_split(g, W16, 8, 28672, 64, SMS, 1) == 2


def cpu_gemm(sms: int, resident: int) -> SkinnyGemm:
    """A SkinnyGemm without a GPU, to read its plans: stand-in kernel handles (never launched), ``sms`` SMs holding
    ``resident`` blocks of every kernel."""
    gemm = SkinnyGemm.__new__(SkinnyGemm)
    gemm.available, gemm.sms, gemm._smem_limit = True, sms, 227 << 10
    gemm.warpgroups, gemm.warpgroups_error, gemm._refused = True, "", set()  # (an SM 9.0: the warpgroup form too)
    gemm._part, gemm._done, gemm._modules = 1 << 30, 1 << 31, {}
    gemm._fns, gemm._resident = {}, {}
    for fmt, geometries in GEOMETRIES.items():
        for geometry in geometries:
            for mt in geometry.groups:
                fn = 1 + len(gemm._fns)
                gemm._fns.update({geometry.name(fmt, b, f, mt): fn for b in (False, True) for f in (False, True)})
                if fmt == W16:  # (the SiLU form's kernels: 16-bit output only)
                    gemm._fns.update({geometry.name(fmt, b, False, mt, True): -fn for b in (False, True)})
                    # (their residency too: where a driver is loaded, the GPU machine's, it would be asked about the
                    # stand-in handle and refuse, leaving the launch bounds' figure)
                    gemm._resident[(-fn, 32 * geometry.warps, geometry.smem(fmt, mt))] = resident
                gemm._resident[(fn, 32 * geometry.warps, geometry.smem(fmt, mt))] = resident
    return gemm


@pytest.mark.parametrize("resident", [1, 2])
@pytest.mark.parametrize("fmt", [W16, E4M3_BLOCK, E4M3_ROW, INT4], ids=["16bit", "e4m3-block", "e4m3-row", "int4"])
def test_every_plans_grid_covers_k_in_whole_ranges(fmt: int, resident: int) -> None:
    gemm = cpu_gemm(SMS, resident)
    block = (128, 128) if fmt == E4M3_BLOCK else None
    block_k = 128 if block else 0
    seen = set()
    for (n, k), rows in [(s, r) for s in (*SHAPES_8B.values(), (200, 640), (1040, 1408)) for r in (1, 8, 16, 32)]:
        call = (rows, 1 << 20, k, 1 << 24, n, k, 1 << 28, n, 14, 14)  # bfloat16 in and out
        plans = gemm.plans(fmt, call, 1 << 32, -(-k // 128), block, (1 << 33, k // 128, 1, 0))
        assert plans, (n, k, rows)
        for geometry in GEOMETRIES[fmt]:
            if -(-rows // 8) not in geometry.groups:  # (a two-block geometry below 17 or 25 rows)
                continue
            # (the pipelined warpgroup form: ranges of whole runs of tiles and of scale blocks)
            unit = math.lcm(geometry.k_unit, block_k) if geometry.k_unit and block_k else geometry.k_unit or block_k
            fn = gemm._fns[geometry.name(fmt, True, False, -(-rows // 8))]
            mine = [p for p in plans if p.function == fn]
            if geometry.k_unit and k % geometry.k_unit:  # a k the geometry cannot split into whole runs: not offered
                assert not mine
                continue
            assert [p.split for p in mine][:1] == [SPLIT_RULE] and len({p.grid[1] for p in mine}) == len(mine)
            rule = splits(geometry, fmt, rows, n, k, SMS, unit)
            assert mine[0].grid[1] == -(-k // range_length(fmt, k, rule, unit))
            for p in mine:
                kc = p.args[10]
                assert p.grid[0] == -(-n // geometry.rows_per_block) <= DONE_SLOTS
                assert kc % _unit(fmt, unit) == 0 and (p.grid[1] - 1) * kc < k <= p.grid[1] * kc, (p.grid, kc)
                assert p.resident == resident and p.threads == 32 * geometry.warps
                per_split = p.grid[0] * geometry.rows_per_block * 8 * -(-rows // 8) * 4
                assert p.grid[1] == 1 or p.grid[1] * per_split <= PART_BYTES
                seen.add(p.split)
                if p.split == SPLIT_WAVES:
                    assert wave_split(geometry, fmt, rows, n, k, SMS, resident, unit) is not None
    assert seen == {SPLIT_RULE, SPLIT_HALF, SPLIT_WAVES}
    # the gate/up shape at 8 rows: one range by rule, four (one block an SM) or eight (two) fitted to the waves
    n, k = SHAPES_8B["gate_up"]
    call = (8, 1 << 20, k, 1 << 24, n, k, 1 << 28, n, 14, 14)
    plans = gemm.plans(fmt, call, 1 << 32, -(-k // 128), block, (1 << 33, k // 128, 1, 0))
    ranges = 4 if resident == 1 else 7 if fmt == W16 else 8
    wide = {(p.split, p.grid[1]) for p in plans if p.threads == 256}  # (the 8-warp geometries: 224 column blocks)
    assert sorted(wide) == [(SPLIT_RULE, 1), (SPLIT_WAVES, ranges)]


def test_the_two_block_geometries_are_offered_at_their_row_groups_only() -> None:
    gemm = cpu_gemm(SMS, 2)
    n, k = SHAPES_8B["gate_up"]
    for fmt, groups in ((E4M3_BLOCK, (3, 4)), (E4M3_ROW, (3, 4)), (INT4, (4,)), (W16, ())):
        two = [g for g in GEOMETRIES[fmt] if g.min_blocks == 2 and not g.wg]
        assert [g.groups for g in two] == ([groups] if groups else [])
        for rows in (8, 16, 17, 24, 25, 32):
            mt = -(-rows // 8)
            call = (rows, 1 << 20, k, 1 << 24, n, k, 1 << 28, n, 14, 14)
            block = (128, 128) if fmt == E4M3_BLOCK else None
            fns = {p.function for p in gemm.plans(fmt, call, 1 << 32, k // 128, block, (1 << 33, k // 128, 1, 0))}
            offered = {g for g in GEOMETRIES[fmt] if mt in g.groups and gemm._fns[g.name(fmt, True, False, mt)] in fns}
            assert offered == {g for g in GEOMETRIES[fmt] if mt in g.groups}, (fmt, rows)
            assert any(g.min_blocks == 2 and not g.wg for g in offered) == (mt in groups), (fmt, rows)


def test_plans_leave_out_geometries_of_more_column_blocks_than_counters() -> None:
    gemm = cpu_gemm(SMS, 1)
    n = 64 * DONE_SLOTS + 64  # 16-bit: 4 warps of 16 rows take DONE_SLOTS + 1 column blocks, 8 warps half of it
    plans = gemm.plans(W16, (8, 1 << 20, 64, 1 << 24, n, 64, 1 << 28, n, 14, 14))
    assert plans and {p.threads for p in plans} == {256} and all(p.grid[0] <= DONE_SLOTS for p in plans)


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
    # (format, MT, geometry): MT "MT" in SKINNY_ROWS (every row group), else the one row group named
    found = re.findall(r"SKINNY_TYPES\(\w+, (SK_\w+), (MT|\d), (\d+), (\d+), (\d+), (\d+), (\d+)\)", body)
    defaults = {(f, mt, tuple(int(v) for v in g)) for f, mt, *g in found}
    names = {
        W16: "SK_W16",
        E4M3_BLOCK: "SK_E4M3_BLOCK",
        E4M3_ROW: "SK_E4M3_ROW",
        INT4: "SK_INT4",
        E4M3_A8: "SK_E4M3_A8",
        E4M3_A8Q: "SK_E4M3_A8Q",
        INT4_A8Q: "SK_INT4_A8Q",
    }
    # the warpgroup form's: SKINNY_WG_TYPES(prefix, FMT, MT, NT, U, WARPS, MINB, KX, P, R, S), every type pair, in a
    # macro SKINNY_WG*_ROWS(MT) invoked for each row group it serves
    # (a macro SKINNY_WG*_GEOMETRIES(prefix, fmt, MT) of such lines serves several formats: each use of it stands for
    # its lines with that format)
    shapes = r"MT, (\d), (\d+), (\d+), (\d+), (\d+), ([01]), (\d), ([01])\)"
    geometry_macros = {
        macro: re.findall(r"SKINNY_WG_TYPES\(prefix, fmt, " + shapes, lines)
        for macro, lines in re.findall(r"#define (SKINNY_WG\w*_GEOMETRIES)\(prefix, fmt, MT\)((?:.*\\\n)*.*)", body)
    }
    warpgroups = set()
    for macro, lines in re.findall(r"#define (SKINNY_WG\w*_ROWS)\(MT\)((?:.*\\\n)*.*)", body):
        found = re.findall(r"SKINNY_WG_TYPES\(\w+, (SK_\w+), " + shapes, lines)
        for name, shaped in geometry_macros.items():
            found += [(f, *g) for f in re.findall(rf"{name}\(\w+, (SK_\w+), MT\)", lines) for g in shaped]
        for mt in re.findall(rf"^{macro}\((\d)\)", body, re.M):
            warpgroups |= {(f, mt, *g) for f, *g in found}
    for fmt, geometries in GEOMETRIES.items():
        for g in geometries:
            shape = (g.nt, g.u, g.warps, g.min_blocks, g.kx)
            for mt in g.groups:
                if g.wg:
                    assert fmt != W16, g
                    form = (int(g.pipe), g.ring, int(g.xreg))
                    wanted = (names[fmt], str(mt), *(str(v) for v in (g.nt, g.u, g.warps, g.min_blocks, g.kx, *form)))
                    assert wanted in warpgroups, (g, mt)
                    continue
                assert {(names[fmt], "MT", shape), (names[fmt], str(mt), shape)} & defaults, (fmt, g, mt)
    for mt in (1, 2, 3, 4):
        assert f"SKINNY_ROWS({mt})" in text
    assert len(defaults) == sum(
        len(g.groups) if g.groups != (1, 2, 3, 4) else 1 for gs in GEOMETRIES.values() for g in gs if not g.wg
    )
    assert len(warpgroups) == sum(len(g.groups) for gs in GEOMETRIES.values() for g in gs if g.wg)
    for t, flag in (("bf16", "true"), ("f16", "false")):
        for out, f32 in (("16", "false"), ("f32", "true")):
            wanted = f"SKINNY_WG(prefix##_{t}_{out}, {flag}, {f32}, fmt, MT, NT, U, WARPS, MINB, KX, P, R, S)"
            assert wanted in text
    for name, value in names.items():  # the kernel's FMT codes are the module's
        assert f"#define {value} {name}" in text
    # the SiLU form: every 16-bit geometry of every row group, both types
    silu = set(re.findall(r"SKINNY_SILU\((\w+), (true|false), MT, (\d+), (\d+), (\d+), (\d+), (\d+)\)", body))
    want = {
        (f"skinnysilu_{t}_16", flag, *(str(v) for v in (g.nt, g.u, g.warps, g.min_blocks, g.kx)))
        for g in GEOMETRIES[W16]
        for t, flag in (("bf16", "true"), ("f16", "false"))
    }
    assert silu == want and all(g.groups == (1, 2, 3, 4) for g in GEOMETRIES[W16])


def test_kernel_names_and_instances_agree() -> None:
    g = Geometry(1, 4, 8, 1, 512)
    assert g.name(E4M3_BLOCK, True, False, 3) == "skinny8b_bf16_16_m3_n1_u4_w8_b1_x512"
    assert g.instance(E4M3_BLOCK, True, False, 3) == "SKINNY(skinny8b_bf16_16, true, false, 1, 3, 1, 4, 8, 1, 512)"
    assert g.name(W16, True, False, 2, silu=True) == "skinnysilu_bf16_16_m2_n1_u4_w8_b1_x512"
    assert g.instance(W16, False, False, 2, silu=True) == "SKINNY_SILU(skinnysilu_f16_16, false, 2, 1, 4, 8, 1, 512)"
    assert g.name(W16, False, True, 1) == "skinny_f16_f32_m1_n1_u4_w8_b1_x512"
    assert g.smem(W16, 4) == 2 * 32 * (512 + 32) * 2 and g.smem(E4M3_ROW, 1) == 2 * 8 * (512 + 8) * 2
    assert Geometry(1, 2, 8, 1, 0).smem(W16, 4) == 0
    wg = Geometry(1, 4, 8, 1, 512, (4,), True, True)
    assert wg.name(INT4, True, False, 4) == "skinnywg4_bf16_16_m4_n1_u4_w8_b1_x512_p1_r0_s0"
    assert (
        wg.instance(INT4, False, True, 4) == "SKINNY_WG(skinnywg4_f16_f32, false, true, 3, 4, 1, 4, 8, 1, 512, 1, 0, 0)"
    )
    assert wg.smem(INT4, 4) == 2 * 32 * 512 * 2 and wg.k_unit == 512  # (no padding; ranges of whole runs of 4 tiles)
    assert Geometry(1, 2, 8, 2, 512, (4,), True).k_unit == 0
    # two strips a warp, the weights in a ring of 3 stages (a kilobyte a tile and strip, an 8-byte mbarrier a stage)
    ring = Geometry(2, 2, 4, 2, 256, (4,), True, True, 3, True)
    assert ring.name(INT4, True, True, 4) == "skinnywg4_bf16_f32_m4_n2_u2_w4_b2_x256_p1_r3_s1"
    assert (
        ring.instance(INT4, True, False, 4)
        == "SKINNY_WG(skinnywg4_bf16_16, true, false, 3, 4, 2, 2, 4, 2, 256, 1, 3, 1)"
    )
    assert ring.smem(INT4, 4) == 2 * 32 * 256 * 2 + 4 * 3 * (2 * 2 * 1024 + 8) and ring.rows_per_block == 128
    assert ring.k_unit == 256
    # the e4m3 form: its own kernel names; a ring stage of 16 row runs of 128 u bytes, each padded by 64
    e4 = Geometry(1, 2, 4, 2, 256, (1, 2, 3, 4), True, True, 2, True)
    assert e4.name(E4M3_BLOCK, True, False, 2) == "skinnywg8b_bf16_16_m2_n1_u2_w4_b2_x256_p1_r2_s1"
    assert e4.name(E4M3_ROW, False, True, 1) == "skinnywg8r_f16_f32_m1_n1_u2_w4_b2_x256_p1_r2_s1"
    assert e4.instance(E4M3_ROW, True, True, 1).startswith("SKINNY_WG(skinnywg8r_bf16_f32, true, true, 2, 1, 1, 2")
    assert e4.smem(E4M3_BLOCK, 4) == 2 * 32 * 256 * 2 + 4 * 2 * (16 * (128 * 2 + 64) + 8)


def test_the_e4m3_warpgroup_form_is_offered_on_sm90_for_blocks_of_128_or_more() -> None:
    gemm = cpu_gemm(SMS, 1)
    n, k = SHAPES_8B["gate_up"]
    for rows in (1, 8, 16, 32):
        call = (rows, 1 << 20, k, 1 << 24, n, k, 1 << 28, n, 14, 14)
        mt = -(-rows // 8)
        for fmt, block in ((E4M3_BLOCK, (128, 128)), (E4M3_ROW, None)):
            wgs = {gemm._fns[g.name(fmt, True, False, mt)] for g in GEOMETRIES[fmt] if g.wg and mt in g.groups}
            assert wgs
            s_ld = k // 128 if block else 0

            def offered(block: tuple[int, int] | None = block, warpgroups: bool = True) -> set[int]:
                plans = gemm.plans(fmt, call, 1 << 32, s_ld, block, warpgroups=warpgroups)  # noqa: B023
                return {p.function for p in plans} & wgs  # noqa: B023

            assert offered() == wgs, (fmt, rows)
            assert not offered(warpgroups=False)
            if block:
                assert not offered((128, 64))  # blocks of 64 inputs: two factors a tile, which the form does not apply


def test_the_int4_warpgroup_form_is_offered_on_sm90_for_groups_of_128_or_more_only() -> None:
    gemm = cpu_gemm(SMS, 1)
    n, k = SHAPES_8B["gate_up"]
    call = (32, 1 << 20, k, 1 << 24, n, k, 1 << 28, n, 14, 14)
    wgs = {gemm._fns[g.name(INT4, True, False, 4)] for g in GEOMETRIES[INT4] if g.wg}
    assert len(wgs) == 3

    def offered(gshift: int, rows: int = 32, warpgroups: bool = True) -> set[int]:
        plans = gemm.plans(INT4, (rows, *call[1:]), int4=(1 << 33, k // 128, gshift, 0), warpgroups=warpgroups)
        assert plans
        return {p.function for p in plans} & wgs

    assert offered(1) == wgs and offered(2) == wgs  # groups of 128 and 256
    assert not offered(0)  # groups of 64: two records a tile, which the form does not read
    assert not offered(1, rows=16)  # (17-32 rows only)
    wgs24 = {gemm._fns[g.name(INT4, True, False, 3)] for g in GEOMETRIES[INT4] if g.wg}
    plans24 = gemm.plans(INT4, (24, *call[1:]), int4=(1 << 33, k // 128, 1, 0))
    assert {p.function for p in plans24} & wgs24 == wgs24
    assert not offered(1, warpgroups=False)  # SkinnyLaunches.warpgroups_on off
    gemm.warpgroups = False  # not an SM 9.0 (sm_90a code)
    assert not offered(1)
    # a k of 5 tiles: the pipelined geometries (runs of 2 and 4 tiles: all of them) cannot split it; of 6, those of
    # runs of 2 can
    gemm.warpgroups = True
    assert all(g.pipe for g in GEOMETRIES[INT4] if g.wg)
    for tiles, units in ((5, ()), (6, (256,))):
        call_k = (32, 1 << 20, 128 * tiles, 1 << 24, n, 128 * tiles, 1 << 28, n, 14, 14)
        fns = {p.function for p in gemm.plans(INT4, call_k, int4=(1 << 33, tiles, 1, 0))} & wgs
        assert fns == {gemm._fns[g.name(INT4, True, False, 4)] for g in GEOMETRIES[INT4] if g.wg and g.k_unit in units}


def test_the_w8a8_form_offers_its_two_kinds_of_plans_as_switched(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Over a 128x128-block FP8 weight at 16 rows, ``SkinnyLaunches.plans`` gives the e4m3 form's plans, then the
    W8A8 form's that quantize x in the kernel (``w8a8_fused``, skinnywg8q, over the call's own x; by default the
    only kind), then with ``w8a8_quantizer`` those over the quantizer's x (skinnywg8a, x at the FP8 scratch with row
    stride k), in that order, so that a Dense's plan indices stay as timed; each switch leaves its kind out, and the
    quantizer is asked for only where its kind is offered."""
    from fi_engine.kernels.cublas import CUDA_R_16BF

    assert SkinnyLaunches.w8a8_fused is True and SkinnyLaunches.w8a8_quantizer is False
    fp8 = _Fp8Registry()
    quantized = SimpleNamespace(fp8=fp8, fp8_gemv_max_rows=8, fp8_w8a8=True, fp8_w8a8_blocks=True)
    launches = SkinnyLaunches(SimpleNamespace(null=0), quantized)  # type: ignore[arg-type]
    launches._gemm = cpu_gemm(SMS, 1)
    n, k = SHAPES_8B["qkv"]
    weight = SimpleNamespace(w=0x5000, k=k, n=n, block=(128, 128), scales=1 << 34)
    key = (16, 0x1000, k, 0x5000, n, k, 1 << 28, n, CUDA_R_16BF, CUDA_R_16BF)

    def kinds() -> list[str]:
        plans = launches.plans(key, weight)
        names = [p.kernel[:10] for p in plans]
        order = {"skinnywg8q": 1, "skinnywg8a": 2}
        assert [order.get(name, 0) for name in names] == sorted(order.get(name, 0) for name in names), names
        for p in plans:
            x = p.args[0]
            assert x == (1 << 20 if p.kernel.startswith("skinnywg8a") else 0x1000), p.kernel  # whose x it reads
        return sorted({name for name in names if name in order})

    assert kinds() == ["skinnywg8q"] and fp8.asked == []  # the default: x quantized in the kernel only
    monkeypatch.setattr(SkinnyLaunches, "w8a8_quantizer", True)
    assert kinds() == ["skinnywg8a", "skinnywg8q"]
    assert fp8.asked and fp8.asked[-1][:4] == (16, 0x1000, k, k)
    monkeypatch.setattr(SkinnyLaunches, "w8a8_fused", False)
    assert kinds() == ["skinnywg8a"]
    monkeypatch.setattr(SkinnyLaunches, "w8a8_quantizer", False)
    assert kinds() == []


def test_the_w4a8_form_is_offered_only_switched_on_for_groups_of_128_or_more(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``SkinnyLaunches.w4a8_on`` (off by default) adds the W4A8 form's plans after the int4 form's, at every row
    count up to 32, for groups of 128 inputs or more, with the warpgroup form on and served (an SM 9.0); its kernels
    are the skinnywg4q ones, a ring stage a kilobyte a tile and strip as the int4 form's."""
    from fi_engine.kernels.cublas import CUDA_R_16BF
    from fi_engine.kernels.int4_linear import Int4Weight

    assert SkinnyLaunches.w4a8_on is False
    gemm = cpu_gemm(SMS, 1)
    launches = SkinnyLaunches(SimpleNamespace(null=0))  # type: ignore[arg-type]
    launches._gemm = gemm
    n, k = SHAPES_8B["gate_up"]
    weight = Int4Weight(1 << 24, n, k, 1 << 33, 128)

    def w4a8(rows: int, w: Int4Weight = weight) -> list[str]:
        key = (rows, 1 << 20, k, 0x5000, n, k, 1 << 28, n, CUDA_R_16BF, CUDA_R_16BF)
        plans = launches.plans(key, w)
        assert plans, rows
        kinds = [p.kernel.startswith("skinnywg4q") for p in plans]
        assert kinds == sorted(kinds), "the W4A8 plans after the int4 form's"
        return [p.kernel for p in plans if p.kernel.startswith("skinnywg4q")]

    assert not any(w4a8(rows) for rows in (1, 8, 32))  # off by default
    monkeypatch.setattr(SkinnyLaunches, "w4a8_on", True)
    for rows in (1, 8, 13, 32):
        mt = -(-rows // 8)
        assert set(w4a8(rows)) == {g.name(INT4_A8Q, True, False, mt) for g in GEOMETRIES[INT4_A8Q]}, rows
    assert w4a8(32, Int4Weight(1 << 24, n, k, 1 << 33, 256))  # groups of 256: a tile's one record still
    assert not w4a8(32, Int4Weight(1 << 24, n, k, 1 << 33, 64))  # two records a tile: not read
    monkeypatch.setattr(SkinnyLaunches, "warpgroups_on", False)
    assert not w4a8(32)
    monkeypatch.setattr(SkinnyLaunches, "warpgroups_on", True)
    gemm.warpgroups = False  # (no sm_90a)
    assert not w4a8(32)
    ring = Geometry(2, 2, 4, 2, 256, (1, 2, 3, 4), True, True, 2, True)
    assert ring in GEOMETRIES[INT4_A8Q] and ring.smem(INT4_A8Q, 4) == ring.smem(INT4, 4)
    assert ring.name(INT4_A8Q, False, True, 1) == "skinnywg4q_f16_f32_m1_n2_u2_w4_b2_x256_p1_r2_s1"


def test_an_nvrtc_refusing_sm90a_leaves_the_mma_sync_geometries() -> None:
    gemm = cpu_gemm(SMS, 1)
    n, k = SHAPES_8B["gate_up"]
    call = (32, 1 << 20, k, 1 << 24, n, k, 1 << 28, n, 14, 14)
    compiled = gemm._function
    tried: list[Geometry] = []

    def refuse_sm90a(geometry: Geometry, *args: object, **kwargs: object) -> int:
        if geometry.wg:
            tried.append(geometry)
            raise RuntimeError("nvrtc: error: invalid value for --gpu-architecture (-arch)")
        return compiled(geometry, *args, **kwargs)  # type: ignore[arg-type]

    gemm._function = refuse_sm90a  # type: ignore[method-assign]
    int4 = (1 << 33, k // 128, 1, 0)
    plans = gemm.plans(INT4, call, int4=int4)
    assert plans and not any(p.kernel.startswith("skinnywg4") for p in plans)
    assert {p.function for p in plans} == {
        gemm._fns[g.name(INT4, True, False, 4)] for g in GEOMETRIES[INT4] if not g.wg and 4 in g.groups
    }
    assert len(tried) == 1 and "invalid value" in gemm.warpgroups_error
    assert gemm.plans(INT4, call, int4=int4) == plans and len(tried) == 1  # (not tried again)


def test_a_warpgroup_family_that_fails_to_compile_leaves_the_others_plans_as_they_were() -> None:
    """A family of the warpgroup form (format, types) whose module NVRTC refuses is left out alone: the plans of
    families already served keep their order and indices (a Dense's choices index them), and it is not tried again."""
    gemm = cpu_gemm(SMS, 1)
    n, k = SHAPES_8B["gate_up"]
    call = (32, 1 << 20, k, 1 << 24, n, k, 1 << 28, n, 14, 14)
    int4 = (1 << 33, k // 128, 1, 0)
    compiled = gemm._function
    tried: list[int] = []

    def refuse_w4a8(geometry: Geometry, fmt: int, *args: object, **kwargs: object) -> int:
        if fmt == INT4_A8Q:
            tried.append(fmt)
            raise RuntimeError("nvrtc: error: an instruction this NVRTC does not know")
        return compiled(geometry, fmt, *args, **kwargs)  # type: ignore[arg-type]

    gemm._function = refuse_w4a8  # type: ignore[method-assign]
    before = gemm.plans(INT4, call, int4=int4)
    assert any(p.kernel.startswith("skinnywg4_") for p in before)
    assert gemm.plans(INT4_A8Q, call, int4=int4) == [] and len(tried) == 1 and "does not know" in gemm.warpgroups_error
    assert gemm.plans(INT4, call, int4=int4) == before  # (the int4 form's warpgroup plans still offered, in order)
    assert gemm.plans(INT4_A8Q, call, int4=int4) == [] and len(tried) == 1  # (not tried again)
    f32 = (*call[:9], 0)  # (float32 output: a family of its own, tried on its own)
    assert gemm.plans(INT4_A8Q, f32, int4=int4) == [] and len(tried) == 2


def test_registering_or_removing_a_quantized_weight_forgets_the_launches_chosen_by_address() -> None:
    """``Dense._choices``, their timings and the skinny GEMM's packed launches are keyed by addresses and shapes: a
    quantized weight registered or removed at an address changes what a call there reads (a 16-bit weight allocated
    where an FP8 one was must not be read as e4m3), so all are dropped. (A Dense made without its GPU parts: removing
    touches no device.)"""
    from fi_engine.kernels.dense import Dense
    from fi_engine.kernels.launch import Launcher
    from fi_engine.kernels.quantized_weights import QuantizedWeights
    from fi_engine.kernels.skinny_gemm import SkinnyLaunches

    d = Dense.__new__(Dense)
    launcher = Launcher(0)
    d._skinny = SkinnyLaunches(launcher)
    d.quantized = QuantizedWeights(launcher, 0, d._quantized_changed, lambda key, accumulate: None)
    d._choices = {(8, 4096, 4096, 14, 14, 1 << 20): 0}
    d._timings = {(8, 4096, 4096, 14, 14, 1 << 20): {0: 0.02, -2: 0.021}}
    call = (8, 1 << 21, 4096, 1 << 20, 4096, 4096, 1 << 22, 4096, 14, 14)
    d._skinny._calls = {(call, 0): print}
    d.quantized.remove_weight(1 << 20)  # (FP8 or int4: one removal serves both registries)
    assert d._choices == {} and d._timings == {} and d._skinny._calls == {}


@pytest.mark.parametrize("rows", [5, 8, 16, 32])
def test_the_silu_forms_plans_are_the_plain_plans_into_the_activation(rows: int) -> None:
    """The SiLU form (``SKINNY_SILU``): for a gate/up weight of n rows, the same grids and splits as the plain GEMM
    over those n rows, its own kernels, y the activation at its row stride, and the kernel's q_a the gate's n / 2
    rows; none for an odd n, a float32 output or a quantized format."""
    gemm = cpu_gemm(SMS, 1)
    n, k = SHAPES_8B["gate_up"]
    plain = gemm.plans(W16, (rows, 1 << 20, k, 1 << 24, n, k, 1 << 28, n, 14, 14))
    act = 1 << 29
    silu = gemm.plans(W16, (rows, 1 << 20, k, 1 << 24, n, k, act, n // 2, 14, 14), silu=True)
    assert silu and [(p.grid, p.threads, p.smem, p.split) for p in silu] == [
        (p.grid, p.threads, p.smem, p.split) for p in plain
    ]
    for p, q in zip(silu, plain, strict=True):
        assert p.kernel.startswith("skinnysilu_bf16_16_") and p.kernel.replace("skinnysilu", "skinny") == q.kernel
        assert p.function == gemm._fns[p.kernel] != q.function
        assert p.args[2] == act and p.args[9] == n // 2  # y: the activation, its row stride
        assert p.args[11:] == (0, 0, n // 2, 0)  # (q, q_ld unused; q_a the gate's rows)
        assert p.args[:2] == q.args[:2] and p.args[3:9] == q.args[3:9] and p.args[10] == q.args[10]
    assert gemm.plans(W16, (rows, 1 << 20, k, 1 << 24, n - 1, k, act, n, 14, 14), silu=True) == []
    assert gemm.plans(W16, (rows, 1 << 20, k, 1 << 24, n, k, act, n // 2, 14, 0), silu=True) == []  # float32 out
    e4m3 = (rows, 1 << 20, k, 1 << 24, n, k, act, n // 2, 14, 14)
    assert gemm.plans(E4M3_ROW, e4m3, 1 << 32, silu=True) == []


class _Fp8Registry:
    """A stand-in for the Dense's FP8 registry (Fp8Linears needs a GPU): records what the W8A8 form asks of it."""

    def __init__(self) -> None:
        self.asked: list[tuple[Any, ...]] = []

    def x_quantizer(self, *args: Any) -> tuple[int, Any]:
        self.asked.append(args)
        return 1 << 20, lambda: None


def test_the_w8a8_form_quantizes_x_only_where_the_engine_quantizes_it(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``SkinnyLaunches``' W8A8 form asks the FP8 registry for x's quantization only with ``w8a8_on`` (on by
    default) and the warpgroup form on, above ``fp8_gemv_max_rows`` rows (where x stays 16-bit) and where the
    engine's W8A8 switches serve block weights, for 128x128 blocks and ``n`` a multiple of 128; then with the call's
    rows, x, its row stride, the weight's k, the bfloat16 flag and the launcher's NULL."""
    from fi_engine.kernels.cublas import CUDA_R_16BF, CUDA_R_16F

    assert SkinnyLaunches.w8a8_on is True
    monkeypatch.setattr(SkinnyLaunches, "w8a8_on", False)
    fp8 = _Fp8Registry()
    quantized = SimpleNamespace(fp8=fp8, fp8_gemv_max_rows=8, fp8_w8a8=True, fp8_w8a8_blocks=True)
    launches = SkinnyLaunches(SimpleNamespace(null="NULL"), quantized)  # type: ignore[arg-type]
    weight = SimpleNamespace(k=4096, n=6144, block=(128, 128))
    key = (16, 0x1000, 4096, 0x2000, 6144, 4096, 0x3000, 6144, CUDA_R_16BF, CUDA_R_16BF)
    assert launches._x_quantizer(key, weight) is None  # switched off
    monkeypatch.setattr(SkinnyLaunches, "w8a8_on", True)
    fp8.asked.clear()
    got = launches._x_quantizer(key, weight)
    assert got is not None and got[0] == 1 << 20
    assert fp8.asked == [(16, 0x1000, 4096, 4096, True, "NULL")]
    f16 = (*key[:8], CUDA_R_16F, CUDA_R_16F)
    launches._x_quantizer(f16, weight)
    assert fp8.asked[-1][4] is False
    fp8.asked.clear()
    assert launches._x_quantizer((8, *key[1:]), weight) is None  # W8A16 rows
    for switch in ("fp8_w8a8", "fp8_w8a8_blocks"):
        setattr(quantized, switch, False)
        assert launches._x_quantizer(key, weight) is None, switch
        setattr(quantized, switch, True)
    for other in (SimpleNamespace(k=4096, n=6144, block=(16, 256)), SimpleNamespace(k=4096, n=6160, block=(128, 128))):
        assert launches._x_quantizer(key, other) is None, other  # (the engine dequantizes those above 8 rows)
    monkeypatch.setattr(SkinnyLaunches, "warpgroups_on", False)
    assert launches._x_quantizer(key, weight) is None
    assert fp8.asked == []
    assert SkinnyLaunches(SimpleNamespace(null=0))._x_quantizer(key, weight) is None  # type: ignore[arg-type]
