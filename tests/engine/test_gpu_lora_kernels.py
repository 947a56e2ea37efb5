"""The LoRA shrink and expand kernels (fi_engine.kernels.lora_bgmv, ``csrc/lora_bgmv.cu``) on a GPU
(FI_FFI_RUN_GPU_TESTS=1; CuPy, no torch), the shrink in both forms: a decode step's rows (up to ``LONG_ROWS``) and
a prefill's.

- Each form against a float64 reference at row counts on both sides of ``LONG_ROWS``, rows of three slots (one
  whose adapter leaves the projection alone), of no slot (-1), in runs as a prefill has them and interleaved as a
  decode step has them; ranks 8, 16, 64 and 128.
  Bound on the shrink's float32 ``t``: ``(k + 8) * 2**-24 * sum |x| |a|`` (float32 sums of exact products in any order)
  times the slot's scale; on ``y``: half an ulp of the 16-bit output plus the rank's float32 sums of the t's
  products.
- Untouched rows (no slot, or the bit clear) keep their ``y`` bits and their ``t`` sentinel.
- The segment form of a prefill (``DeviceSlots.prefill_segment_gemm``: FlashInfer's SM90 segment GEMMs; SM 9.x
  only) against the CUDA-core form through ``DeviceSlots.apply`` at 100 and 4096 rows, ranks 8, 16 and 64, within
  two bfloat16 ulps of the larger of ``y`` and the adapter term's sum of absolute products.
- The segment form's prepared GEMMs follow a slot reloaded (``DeviceSlots.write``) with an adapter of a group its old
  one left alone: the same rows and row slots then serve that slot's runs too, against the CUDA-core form with the
  same state (same bound), in both layers, the unchanged pass's GEMMs found again before the reload.

Run on the GPU machine: ``FI_FFI_RUN_GPU_TESTS=1 python -m pytest -q tests/engine/test_gpu_lora_kernels.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cupy = pytest.importorskip("cupy", reason="the engine needs CuPy (python -m pip install '.[engine]')")

from helpers.random_llama import bf16_bits  # noqa: E402

from fi_engine.kernels.lora_bgmv import LONG_ROWS, LoraBgmv  # noqa: E402

pytestmark = pytest.mark.gpu

SLOTS = 3
BIT = 2  # the projection's bit in targets[s]; slot 2's adapter leaves it alone
SENTINEL_T = -12345.0


def from_bf16(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def row_slots(rng: np.random.Generator, rows: int, runs: bool) -> np.ndarray:
    """Slots 0-2 and -1: in runs of a request's rows (a prefill) or drawn per row (a decode step)."""
    if not runs:
        return rng.integers(-1, SLOTS, rows).astype(np.int32)
    cuts = np.sort(rng.choice(np.arange(1, rows), size=min(3, rows - 1), replace=False)) if rows > 1 else []
    return np.concatenate([np.full(len(p), s, np.int32) for p, s in
                           zip(np.split(np.arange(rows), cuts), (0, -1, 1, 2), strict=False)])  # fmt: skip


@pytest.mark.parametrize("rank", [8, 16, 64, 128])
@pytest.mark.parametrize("rows", [1, 8, LONG_ROWS, LONG_ROWS + 1, 300, 1000])
@pytest.mark.parametrize("runs", [True, False], ids=["prefill-runs", "interleaved"])
def test_shrink_and_expand_match_float64_in_either_form(rank: int, rows: int, runs: bool) -> None:
    rng = np.random.default_rng(rows * 1000 + rank + runs)
    k, parts = 576, 3
    width, n0, n1, n = parts * rank, 128, 192, 256  # q, k and v parts: 128 + 64 + 64 columns
    x16 = bf16_bits(rng.standard_normal((rows, k)).astype(np.float32))
    a16 = bf16_bits((rng.standard_normal((SLOTS, width, k)) * 0.05).astype(np.float32))
    bt16 = bf16_bits((rng.standard_normal((SLOTS, rank, n)) * 0.05).astype(np.float32))
    y16 = bf16_bits(rng.standard_normal((rows, n)).astype(np.float32))
    slots = row_slots(rng, rows, runs)
    scale = np.array([0.5, 2.0, 1.0], np.float32)
    targets = np.array([BIT | 1, BIT, 1], np.int32)  # slot 2: the bit clear
    dx, da, dbt, dy = (cupy.asarray(v) for v in (x16, a16, bt16, y16))
    dslots, dscale, dtargets = cupy.asarray(slots), cupy.asarray(scale), cupy.asarray(targets)
    t = cupy.full((rows, width), SENTINEL_T, cupy.float32)
    kernels = LoraBgmv("bfloat16", cupy.cuda.get_current_stream())
    kernels.shrink(rows, dx.data.ptr, k, dslots.data.ptr, dscale.data.ptr, dtargets.data.ptr, BIT, da.data.ptr,
                   width * k, width, k, t.data.ptr, width)  # fmt: skip
    kernels.expand(rows, t.data.ptr, width, width, dslots.data.ptr, dtargets.data.ptr, BIT, dbt.data.ptr, rank * n,
                   rank, n, n0, n1, dy.data.ptr, n)  # fmt: skip
    got_t, got_y = t.get(), dy.get()
    x, a, bt, y0 = from_bf16(x16), from_bf16(a16), from_bf16(bt16), from_bf16(y16)
    served = (slots >= 0) & ((targets[np.maximum(slots, 0)] & BIT) != 0)
    part = (np.arange(n) >= n0).astype(int) + (np.arange(n) >= n1)
    for r in range(rows):
        if not served[r]:
            assert (got_t[r] == SENTINEL_T).all(), f"row {r} (slot {slots[r]}): t written"
            assert (got_y[r] == y16[r]).all(), f"row {r} (slot {slots[r]}): y changed"
            continue
        s = slots[r]
        ref_t = scale[s] * (a[s] @ x[r])
        bound_t = scale[s] * (k + 8) * 2.0**-24 * (np.abs(a[s]) @ np.abs(x[r]))
        err_t = np.abs(got_t[r] - ref_t)
        assert (err_t <= bound_t + 1e-30).all(), f"row {r}: t off by {err_t.max()}"
        tp = got_t[r].astype(np.float64).reshape(parts, rank)[part]  # [n, rank]: each column's part of t
        delta = (tp * bt[s].T).sum(1)
        ref_y = y0[r] + delta
        bound_y = np.abs(ref_y) * 2.0**-8 + (rank + 2) * 2.0**-24 * (np.abs(tp * bt[s].T).sum(1) + np.abs(y0[r]))
        err = np.abs(from_bf16(got_y[r]) - ref_y)
        assert (err <= bound_y + 1e-30).all(), f"row {r}: y off by {err.max()} (bound {bound_y[err.argmax()]})"


def prefill_runs(rows: int) -> np.ndarray:
    """A prefill's row slots: requests of slots 0, none, 1, 2 and 0 again, in runs (a fifth of the rows each)."""
    cuts = [rows // 5 * i for i in range(1, 5)]
    return np.concatenate([np.full(len(p), s, np.int32) for p, s in
                           zip(np.split(np.arange(rows), cuts), (0, -1, 1, 2, 0), strict=True)])  # fmt: skip


GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj"), (512, 128, 128), 512, 1), ("down", ("down_proj",), (512,), 1024, 8))
"""q/k/v (three parts, k 512) and down (one part, k 1024): (name, modules, outs, k, bit) of each Group."""


def random_slots(rng, rows, rank, scale, targets):  # type: ignore[no-untyped-def]
    """DeviceSlots of the GROUPS over 2 layers and ``SLOTS`` slots of random bfloat16 A and Bt, ``scale`` and
    ``targets`` per slot (set on the device and the host), for passes of up to ``rows`` rows; with the host's A and Bt
    in float64 by group (``[slot, layer, ...]``). None where the segment form does not fit the GPU."""
    from fi_engine.lora.device import DeviceSlots
    from fi_engine.lora.slots import Group, SlotLayout

    layout = SlotLayout(tuple(Group(*g) for g in GROUPS), 2, rank)
    ds = DeviceSlots(cupy, layout, SLOTS, "bfloat16", rows, cupy.cuda.get_current_stream())
    if ds.segment_form() is None:
        ds.close()
        return None, None
    host: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for g in layout.groups:
        a16 = bf16_bits((rng.standard_normal((SLOTS, *layout.a_shape(g))) * 0.05).astype(np.float32))
        bt16 = bf16_bits((rng.standard_normal((SLOTS, *layout.bt_shape(g))) * 0.05).astype(np.float32))
        ds.arrays[g.name][0].set(a16)
        ds.arrays[g.name][1].set(bt16)
        host[g.name] = (from_bf16(a16), from_bf16(bt16))
    ds.scale.set(scale)
    ds.targets.set(targets)
    ds.host_targets[:] = targets
    return ds, host


def apply_in_form(ds, segment, monkeypatch, group, layer, slots, dslots, dx, y16):  # type: ignore[no-untyped-def]
    """``y16`` after ``DeviceSlots.apply`` of ``group`` in ``layer`` over ``slots``' rows, in the segment form
    (``segment``) or the CUDA-core one (host bfloat16 bits)."""
    from fi_engine.lora.device import DeviceSlots

    g = ds.layout.group(group)
    rows = len(slots)
    monkeypatch.setattr(DeviceSlots, "prefill_segment_gemm", segment)
    dy = cupy.asarray(y16)
    ds.begin_step(slots)
    ds.apply(group, layer, rows, dx.data.ptr, g.k, dy.data.ptr, g.n, dslots.data.ptr)
    ds.begin_step(None)
    ds.stream.synchronize()
    return dy.get()


def check_forms_agree(g, layer, rank, slots, x, a, bt, scale, targets, y16, core16, seg16):  # type: ignore[no-untyped-def]
    """The segment form's ``y`` (``seg16``) against the CUDA-core form's (``core16``), both from ``y16``: rows no
    adapter of group ``g`` serves keep their bits; each served row within 2**-7 * (|y| + the adapter term's sum of
    |products|), two bfloat16 ulps of the larger: the segment form rounds t and z to 16 bits (half an ulp each of the
    term), both round y once."""
    core, seg = from_bf16(core16), from_bf16(seg16)
    served = (slots >= 0) & ((targets[np.maximum(slots, 0)] & g.bit) != 0)
    assert (seg16[~served] == y16[~served]).all(), f"{g.name}: a row of no adapter (or bit clear) changed"
    assert (core16[~served] == y16[~served]).all(), f"{g.name}: a row of no adapter changed (CUDA cores)"
    for s in np.unique(slots[served]):
        mine = slots == s
        t = np.abs(x[mine] @ a[s, layer].T).reshape(-1, len(g.outs), rank)  # |A x| by part
        cols = np.split(np.abs(bt[s, layer]), np.cumsum(g.outs)[:-1], axis=1)  # |Bt| by part
        term = scale[s] * np.concatenate([t[:, p] @ c for p, c in enumerate(cols)], axis=1)
        bound = 2.0**-7 * (np.abs(core[mine]) + term) + 1e-30
        err = np.abs(seg[mine] - core[mine])
        assert (err <= bound).all(), (
            f"{g.name} layer {layer} slot {s}: forms differ by {err.max()} (bound {bound.flat[err.argmax()]})"
        )


@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("rows", [100, 4096])
def test_the_segment_form_matches_the_cuda_core_form(rank: int, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # DeviceSlots.apply in both forms over the same slots, inputs and outputs: q/k/v and down of layer 1 of 2; slot
    # 1's adapter leaves down alone, slot 2's q/k/v (bound: check_forms_agree)
    rng = np.random.default_rng(rows + rank)
    scale, targets = np.array([0.5, 2.0, 1.0], np.float32), np.array([1 | 8, 1, 8], np.int32)
    ds, host = random_slots(rng, rows, rank, scale, targets)
    if ds is None:
        pytest.skip("the segment form needs an SM 9.x GPU (FlashInfer's SM90 segment GEMM)")
    try:
        slots = prefill_runs(rows)
        dslots = cupy.asarray(slots)
        layer = 1
        for g in ds.layout.groups:
            x16 = bf16_bits(rng.standard_normal((rows, g.k)).astype(np.float32))
            y16 = bf16_bits(rng.standard_normal((rows, g.n)).astype(np.float32))
            dx = cupy.asarray(x16)
            core, seg = (
                apply_in_form(ds, on, monkeypatch, g.name, layer, slots, dslots, dx, y16) for on in (False, True)
            )
            assert ds.segment_form().prepared_count > 0, "the segment form did not run"  # type: ignore[union-attr]
            check_forms_agree(g, layer, rank, slots, from_bf16(x16), *host[g.name], scale, targets, y16, core, seg)
    finally:
        ds.close()  # (the segment form's workspace and arena)


@pytest.mark.parametrize("rows", [100, 4096])
def test_a_slot_reloaded_with_a_group_it_left_alone_is_served_in_the_segment_form(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the stale-cache case: down's segment GEMMs prepared (each layer at its launch) over the runs of slots 0 and 2
    # (slot 1's adapter leaves down alone); then slot 1 reloaded (DeviceSlots.write) with an adapter that changes
    # down, same row slots: the same rows and addresses must now take slot 1's runs too. GEMMs kept by the row slots
    # alone would leave z's rows of slot 1 as they were (filled here with 1.0, so the add moves them past any bound)
    # while the add, which reads the targets on the device, adds them. Both layers against the CUDA-core form with
    # the same state (bound: check_forms_agree), before and after the reload; the first pass again hits its GEMMs.
    from fi_engine.lora.slots import PackedAdapter

    rank = 16
    rng = np.random.default_rng(rows)
    scale, targets = np.array([0.5, 2.0, 1.0], np.float32), np.array([1 | 8, 1, 8], np.int32)
    ds, host = random_slots(rng, rows, rank, scale, targets)
    if ds is None:
        pytest.skip("the segment form needs an SM 9.x GPU (FlashInfer's SM90 segment GEMM)")
    try:
        form = ds.segment_form()
        assert form is not None
        g = ds.layout.group("down")
        slots = prefill_runs(rows)
        dslots = cupy.asarray(slots)
        x16 = bf16_bits(rng.standard_normal((rows, g.k)).astype(np.float32))
        y16 = bf16_bits(rng.standard_normal((rows, g.n)).astype(np.float32))
        dx = cupy.asarray(x16)

        def both_layers(targets: np.ndarray, a: np.ndarray, bt: np.ndarray) -> None:
            for layer in (0, 1):
                form.scratch_z()[:] = np.uint16(0x3F80)  # (1.0: what stale rows of z would add)
                seg = apply_in_form(ds, True, monkeypatch, "down", layer, slots, dslots, dx, y16)
                core = apply_in_form(ds, False, monkeypatch, "down", layer, slots, dslots, dx, y16)
                check_forms_agree(g, layer, rank, slots, from_bf16(x16), a, bt, scale, targets, y16, core, seg)

        both_layers(targets, *host["down"])
        kept = form.prepared_count
        assert kept == 2  # down's GEMMs of both layers, each prepared at that layer's first launch
        both_layers(targets, *host["down"])
        assert form.prepared_count == kept  # the same pass again: its GEMMs found, none prepared
        a16 = bf16_bits((rng.standard_normal(ds.layout.a_shape(g)) * 0.05).astype(np.float32))
        bt16 = bf16_bits((rng.standard_normal(ds.layout.bt_shape(g)) * 0.05).astype(np.float32))
        ds.write(1, PackedAdapter({"down": (a16, bt16)}, float(scale[1]), 1 | 8))  # slot 1 now changes down
        reloaded = targets | np.array([0, 8, 0], np.int32)
        a, bt = (v.copy() for v in host["down"])
        a[1], bt[1] = from_bf16(a16), from_bf16(bt16)
        served = (slots >= 0) & ((reloaded[np.maximum(slots, 0)] & 8) != 0)
        assert served[slots == 1].all()  # (slot 1's rows are among the served now)
        both_layers(reloaded, a, bt)
        assert form.prepared_count == 2 * kept  # the new runs' GEMMs prepared, the old ones kept
    finally:
        ds.close()
