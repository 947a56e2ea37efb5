"""The LoRA slots on the host (CPU): the slot table's least-recently-used choice and pins, an adapter packed into the
slot layout (its product through the kernels' arithmetic in numpy equal to the merged ``scale * B @ A``), a step's
row-to-slot array and segments against numpy, the kernels' packed launch arguments, and the settings' checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.lora_adapters import bgmv_reference, llama_shapes, write_adapter

from fi_engine.kernels.lora_bgmv import (
    EXPAND_THREADS,
    LONG_ROWS,
    SHRINK_WARPS,
    LoraBgmv,
    expand_args,
    shrink_args,
)
from fi_engine.lora.adapter import BaseShapes, read_adapter
from fi_engine.lora.batch import NO_ADAPTER, row_slots, segments, takes_adapters
from fi_engine.lora.settings import LoraSettings, adapter_name
from fi_engine.lora.slots import GROUPS, SlotLayout, SlotTable, pack

SHAPES = llama_shapes(64, 96, 4, 2, 16)
BASE = BaseShapes(2, "bfloat16", SHAPES)

# ---------------------------------------------------------------------------------------------------- SlotTable


def test_the_table_fills_empty_slots_then_evicts_the_least_recently_used_unpinned_one() -> None:
    t = SlotTable(3)
    assert [t.acquire(k) for k in "abc"] == [(0, True), (1, True), (2, True)]
    for slot in (0, 1, 2):
        t.release(slot)
    assert t.acquire("a") == (0, False)  # held already: no copy; a is now the most recent
    t.release(0)
    assert t.acquire("d") == (1, True)  # b, least recently used, leaves the GPU
    assert t.slot_of("b") is None and sorted(t.held()) == ["a", "c", "d"]
    assert t.acquire("b") == (2, True)  # then c (a and d were used after it)


def test_a_pinned_slot_is_never_taken_and_a_full_table_says_wait() -> None:
    t = SlotTable(2)
    assert t.acquire("a") == (0, True) and t.acquire("b") == (1, True)
    assert t.acquire("a") == (0, False)  # a second request of a: pins 2
    assert t.pins == [2, 1]
    assert t.acquire("c") is None  # every slot in use by other adapters' requests
    t.release(1)
    assert t.acquire("c") == (1, True)  # b's slot, unpinned
    t.release(0)
    assert t.acquire("d") is None  # a still has a request
    t.release(0)
    assert t.acquire("d") == (0, True)


def test_drop_and_release_refuse_a_slot_in_use_or_not_held() -> None:
    t = SlotTable(2)
    slot, _ = t.acquire("a")
    with pytest.raises(ValueError, match=r"slot: 0 is in use by 1 request\(s\)"):
        t.drop("a")
    t.release(slot)
    with pytest.raises(ValueError, match=r"slot: 0 is not held by any request"):
        t.release(slot)
    with pytest.raises(ValueError, match=r"slot: expected an int in \[0, 1\], got 5"):
        t.release(5)
    assert t.drop("a") is True and t.drop("a") is False and t.keys == [None, None]
    assert t.acquire("b") == (1, True)  # the empty slots, least recently used first (0 was used)
    for bad in (0, -1, True, 1.5, 10**6):
        with pytest.raises((TypeError, ValueError), match=r"^slots: "):
            SlotTable(bad)


# ------------------------------------------------------------------------------------------------ pack and layout


def test_the_layout_stacks_each_groups_parts() -> None:
    layout = SlotLayout.of(BASE, 8)
    assert [g.name for g in layout.groups] == [name for name, _ in GROUPS]
    qkv = layout.group("qkv")
    assert (qkv.outs, qkv.k, qkv.n, qkv.split, qkv.bit) == ((64, 32, 32), 64, 128, (64, 96), 1)
    gate_up, down = layout.group("gate_up"), layout.group("down")
    assert (gate_up.split, down.split) == ((96, 192), (64, 64))
    assert layout.a_shape(qkv) == (2, 24, 64) and layout.bt_shape(qkv) == (2, 8, 128)
    assert layout.t_width == 24
    moe = SlotLayout.of(BaseShapes(2, "bfloat16", {m: SHAPES[m] for m in ("q_proj", "k_proj", "v_proj", "o_proj")}), 8)
    assert [g.name for g in moe.groups] == ["qkv", "o"]
    with pytest.raises(ValueError, match=r"^name: 'down' is no projection group of this base \(\['qkv', 'o'\]\)"):
        moe.group("down")
    assert layout.slot_bytes() == 2 * sum(np.prod(layout.a_shape(g)) + np.prod(layout.bt_shape(g))
                                          for g in layout.groups)  # fmt: skip


def floats(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("modules", [("q_proj", "v_proj", "o_proj", "down_proj"), ("k_proj", "gate_proj", "up_proj")])
def test_a_packed_adapter_through_the_kernels_arithmetic_is_the_merged_product(tmp_path: Path, modules) -> None:
    deltas = write_adapter(tmp_path, SHAPES, 2, 4, alpha=8.0, modules=modules, seed=3)
    layout = SlotLayout.of(BASE, 8)  # slots of rank 8 holding a rank-4 adapter: the padding must add nothing
    packed = pack(read_adapter(tmp_path, BASE, 8), layout)
    changed = {g.name for g in layout.groups if any(m in modules for m in g.modules)}
    assert set(packed.arrays) == changed
    assert packed.targets == sum(g.bit for g in layout.groups if g.name in changed)
    assert packed.scale == np.float32(2.0)
    rng = np.random.default_rng(0)
    slots = np.array([1, NO_ADAPTER, 1, 0])  # rows of the adapter (slot 1), of none, of an empty slot 0
    for g in layout.groups:
        x = rng.standard_normal((4, g.k)).astype(np.float32)
        if g.name not in packed.arrays:
            continue
        a, bt = (floats(m) for m in packed.arrays[g.name])
        zero_a, zero_bt = np.zeros_like(a), np.zeros_like(bt)
        for layer in range(2):
            stack_a, stack_bt = np.stack([zero_a[layer], a[layer]]), np.stack([zero_bt[layer], bt[layer]])
            got = bgmv_reference(x, slots, stack_a, stack_bt, np.array([0.0, packed.scale]),
                                 np.array([0, packed.targets]), g.bit, g.split, layout.rank)  # fmt: skip
            merged = np.concatenate([deltas.get((layer, m), np.zeros(SHAPES[m])) for m in g.modules])  # [n, k]
            want = x @ merged.T
            np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], rtol=1e-4, atol=1e-6)
            assert not got[[1, 3]].any()  # no adapter, and a slot without the group's bit
            assert np.abs(want[0]).max() > 0


def test_pack_refuses_what_is_no_adapter_or_too_wide(tmp_path: Path) -> None:
    write_adapter(tmp_path, SHAPES, 2, 8, modules=("q_proj",))
    adapter = read_adapter(tmp_path, BASE, 16)
    with pytest.raises(ValueError, match=r"adapter: rank 8 exceeds the slots' rank 4"):
        pack(adapter, SlotLayout.of(BASE, 4))
    with pytest.raises(TypeError, match=r"^adapter: expected a LoraAdapter"):
        pack(str(tmp_path), SlotLayout.of(BASE, 8))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^layout: expected the slots' SlotLayout"):
        pack(adapter, BASE)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ a step's slot arrays


def test_row_slots_repeat_each_requests_slot_over_its_rows() -> None:
    out = np.full(12, 99, np.int32)
    slots, counts = [2, NO_ADAPTER, 0, 2], [3, 2, 0, 4]
    assert row_slots(slots, counts, out) == 9
    assert out[:9].tolist() == np.repeat(slots, counts).tolist() and (out[9:] == 99).all()
    assert row_slots(np.array([1, -1, 3], np.int32), None, out) == 3  # a decode step: one row each
    assert out[:3].tolist() == [1, -1, 3]
    assert row_slots([], None, out) == 0


def test_row_slots_refuse_by_name_and_write_nothing() -> None:
    out = np.full(4, 7, np.int32)
    cases = [
        (([0, 1], [3, 2], out), r"^out: 4 entries cannot hold 5 rows"),
        (([0, 1], [3], out), r"^rows_per_request: 1 counts for 2 requests"),
        (([0, 1], [3, -1], out), r"^rows_per_request: expected ints in \[0, 2\*\*31\)"),
        (([0, -2], None, out), r"^request_slots: expected ints in \[-1, 2\*\*31\)"),
        (([0, 1.5], None, out), r"^request_slots: expected a list"),
        (([0], [2**40], out), r"^rows_per_request: expected ints in"),  # (never allocated)
        (([0], None, out.astype(np.int64)), r"^out: expected a 1-D int32 numpy array"),
        ((np.zeros((1, 2), np.int32), None, out), r"^request_slots: expected a 1-D array of ints"),
    ]
    for args, match in cases:
        with pytest.raises((TypeError, ValueError), match=match):
            row_slots(*args)
    assert (out == 7).all()


@pytest.mark.parametrize("seed", range(5))
def test_segments_are_the_runs_of_equal_slots(seed: int) -> None:
    rng = np.random.default_rng(seed)
    slots = np.repeat(rng.integers(-1, 3, 12), rng.integers(0, 4, 12)).astype(np.int32)
    indptr, ids = segments(slots)
    assert indptr[0] == 0 and indptr[-1] == len(slots) and (np.diff(indptr) > 0).all()
    assert (ids[1:] != ids[:-1]).all()  # maximal runs
    assert np.repeat(ids, np.diff(indptr)).tolist() == slots.tolist()
    assert indptr.dtype == ids.dtype == np.int32


def test_segments_of_no_rows_and_bad_slots() -> None:
    indptr, ids = segments(np.zeros(0, np.int32))
    assert indptr.tolist() == [0] and ids.tolist() == []
    assert [x.tolist() for x in segments([0, 0, -1])] == [[0, 2, 3], [0, -1]]
    for bad in (np.zeros((2, 2), np.int32), np.array([0.5]), [True], [-3], "01"):
        with pytest.raises((TypeError, ValueError), match=r"^slots: "):
            segments(bad)


def test_a_step_takes_adapters_where_any_row_has_a_slot() -> None:
    # a step of base rows and padding only runs the base model's path (the model runner's step_lora)
    assert not takes_adapters(np.array([NO_ADAPTER] * 5, np.int32))
    assert not takes_adapters(np.zeros(0, np.int32))  # (no rows)
    assert takes_adapters(np.array([NO_ADAPTER, NO_ADAPTER, 0], np.int32))  # slot 0 is an adapter's
    assert takes_adapters(np.array([3], np.int64))
    for bad in ([0, -1], np.zeros((2, 2), np.int32), np.array([0.0]), np.array([True])):
        with pytest.raises(TypeError, match=r"^slots: expected a 1-D int numpy array"):
            takes_adapters(bad)


# ------------------------------------------------------------------------------------------- the kernels' arguments


def test_the_launch_arguments_are_packed_in_the_kernels_order_and_types() -> None:
    base = 1 << 40
    long, grid, args = shrink_args(5, base, 64, 2 * base, 3 * base, 4 * base, 2, 5 * base, 1536, 24, 64, 6 * base, 24)
    assert not long and grid == (24, 5)  # one block an output entry and row, its SHRINK_WARPS warps splitting k
    assert [type(a).__name__ for a in args] == ["uint64", "int64", "uint64", "uint64", "uint64", "int32", "uint64",
                                                "int64", "int32", "int32", "uint64", "int64"]  # fmt: skip
    assert [int(a) for a in args] == [base, 64, 2 * base, 3 * base, 4 * base, 2, 5 * base, 1536, 24, 64, 6 * base, 24]
    long, grid, args = expand_args(5, base, 24, 24, 2 * base, 3 * base, 1, 4 * base, 1024, 8, 300, 100, 200, 5 * base,
                                   320)  # fmt: skip
    assert not long and grid == (-(-300 // EXPAND_THREADS), 5)
    assert [int(a) for a in args] == [base, 24, 24, 2 * base, 3 * base, 1, 4 * base, 1024, 8, 300, 100, 200, 5 * base,
                                      320]  # fmt: skip


def test_a_prefills_rows_take_the_long_shrink_and_its_grid() -> None:
    base = 1 << 40
    rows = LONG_ROWS + 1  # the first row count past a decode step's
    long, grid, args = shrink_args(rows, base, 64, base, base, base, 2, base, 1536, 24, 64, base, 24)
    assert long and grid == (-(-24 // SHRINK_WARPS), rows)  # a warp an entry: the same arguments
    assert len(args) == 12 and int(args[8]) == 24
    assert not shrink_args(LONG_ROWS, base, 64, base, base, base, 2, base, 1536, 24, 64, base, 24).long
    long, grid, args = expand_args(rows, base, 24, 24, base, base, 1, base, 1024, 8, 300, 100, 200, base, 320)
    assert not long and grid == (-(-300 // EXPAND_THREADS), rows)  # the expand: one form at any row count
    assert int(args[2]) == 24


def test_the_launch_arguments_refuse_shapes_the_kernels_do_not_take() -> None:
    base = 1 << 40
    ok = dict(rows=5, x=base, x_ld=64, slots=base, scale=base, targets=base, bit=1, a=base, a_slot=1536, width=24,
              k=64, t=base, t_ld=24)  # fmt: skip
    for change, match in [
        ({"k": 60}, r"^k: expected a multiple of 8"),
        ({"x": base + 8}, r"^x: the address 0x10000000008 is not 16-byte aligned"),
        ({"t_ld": 16}, r"^t_ld: expected an int in \[24, "),
        ({"width": 3 * 512 + 1}, r"^width: expected an int in \[1, 1536\]"),
        ({"x_ld": 68}, r"^x_ld: expected a multiple of 8 elements"),
    ]:
        with pytest.raises(ValueError, match=match):
            shrink_args(**{**ok, **change})
    ok = dict(rows=5, t=base, t_ld=24, tw=24, slots=base, targets=base, bit=1, bt=base, b_slot=1024, rank=8, n=300,
              n0=100, n1=200, y=base, y_ld=320)  # fmt: skip
    for change, match in [
        ({"n1": 50}, r"^n1: expected an int in \[100, 300\]"),
        ({"tw": 16}, r"^tw: expected an int in \[24, 1536\]"),  # three parts of rank 8 named by the split
        ({"y_ld": 299}, r"^y_ld: expected an int in \[300, "),
        ({"rank": 513}, r"^rank: expected an int in \[1, 512\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            expand_args(**{**ok, **change})
    assert expand_args(**{**ok, "n0": 300, "n1": 300, "tw": 8}).args[2] == 8  # one part: one rank of t


def test_the_kernels_refuse_a_dtype_before_compiling() -> None:
    with pytest.raises(ValueError, match=r"^dtype: expected 'float16' or 'bfloat16', got 'float32'"):
        LoraBgmv("float32", None)


# -------------------------------------------------------------------------------------------------- the settings


def test_settings_default_and_refuse_by_field() -> None:
    s = LoraSettings()
    assert (s.max_loras, s.max_cpu_loras, s.max_lora_rank, s.modules) == (1, 1, 16, ())
    s = LoraSettings.of({"max_loras": 4, "modules": {"a": "/x", "b": "/y"}})
    assert s is not None and s.max_cpu_loras == 4 and s.modules == (("a", "/x"), ("b", "/y"))
    assert LoraSettings.of(None) is None and LoraSettings.of(s) is s
    for value, match in [
        ({"max_loras": 0}, r"^lora: max_loras: expected an int in \[1, 1024\], got 0"),
        ({"max_loras": 2, "max_cpu_loras": 1}, r"^lora: max_cpu_loras: expected an int in \[2, "),
        ({"max_lora_rank": 1024}, r"^lora: max_lora_rank: expected an int in \[1, 512\]"),
        ({"modules": [("a", "/x"), ("a", "/y")]}, r"^lora: modules\[1\]: the name 'a' is given twice"),
        ({"modules": [("a b", "/x")]}, r"^lora: modules\[0\]: expected 1 to 128 printable characters"),
        ({"modules": "a=/x"}, r"^lora: modules: expected \(name, path\) pairs or a mapping"),
        ({"rank": 8}, r"^lora: unknown setting\(s\) \['rank'\]; the settings are max_cpu_loras, max_lora_rank"),
        ([("max_loras", 2)], r"^lora: expected None, a dict of LoRA settings or LoraSettings, got list"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match):
            LoraSettings.of(value)


def test_adapter_names_are_what_a_requests_model_can_be() -> None:
    assert adapter_name("org/sql-lora_v1.2") == "org/sql-lora_v1.2"
    for bad in ("", "a b", "tab\there", "x" * 129, "nl\n"):
        with pytest.raises(ValueError, match=r"^lora_name: expected 1 to 128 printable characters without spaces"):
            adapter_name(bad)
    with pytest.raises(TypeError, match=r"^model: expected an adapter's name \(a str\), got int"):
        adapter_name(5, "model")
