"""The segment form of a prefill's LoRA products (fi_engine.lora.segment_form) on the CPU machine: the served runs
a pass builds from its row slots (mixed adapters, rows of none, an adapter that leaves the group alone) against a
row-by-row numpy reference, and the shrink and expand problems it lays out, executed here in numpy over stand-in
memory (each problem's pointers and leading dimensions read back into arrays), against the LoRA formula
``y + scale_s * B_s A_s x`` per row; GEMMs' problems packed into the one host buffer a copy takes, each array read
back from it against the problems' own; and the prepared GEMMs (PreparedGemms, over fi_ffi's real
prepare_segment_gemm_problems and a stand-in for the CuPy calls of the arena, which needs a GPU): each layer prepared
and copied at its own launch alone, kept for a pass of the same runs, prepared anew for new runs, and a full arena
drained before its parts are written again."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers.attention_plans import workspace

from fi_engine.kernels import flashinfer as kernels
from fi_engine.lora import segment_form
from fi_engine.lora.batch import NO_ADAPTER, segments
from fi_engine.lora.segment_form import PreparedGemms, expand_problems, pack_args, served_segments, shrink_problems

pytestmark = pytest.mark.cpu_only

BIT = 4


def reference_runs(slots: np.ndarray, targets: np.ndarray, bit: int) -> list[tuple[int, int, int]]:
    """(start, length, slot) of each maximal run of equal slots whose adapter has ``bit``, by walking the rows."""
    runs: list[tuple[int, int, int]] = []
    r = 0
    while r < len(slots):
        end = r
        while end < len(slots) and slots[end] == slots[r]:
            end += 1
        if slots[r] != NO_ADAPTER and targets[slots[r]] & bit:
            runs.append((r, end - r, int(slots[r])))
        r = end
    return runs


def prefill_slots(rng: np.random.Generator, requests: int) -> np.ndarray:
    """A prefill's row slots: each request's rows one run of its slot (0-3, or none), padding rows of none after."""
    slot_of = rng.integers(-1, 4, requests)
    lengths = rng.integers(1, 300, requests)
    return np.concatenate([np.repeat(slot_of, lengths), np.full(rng.integers(0, 17), NO_ADAPTER)]).astype(np.int32)


@pytest.mark.parametrize("seed", range(6))
def test_served_runs_match_a_row_walk_for_mixed_adapters_and_rows_of_none(seed: int) -> None:
    rng = np.random.default_rng(seed)
    slots = prefill_slots(rng, 1 + seed * 3)
    targets = np.array([BIT | 1, 1, BIT, BIT | 8], np.int64)  # slot 1's adapter leaves the group alone
    starts, lengths, ids = served_segments(slots, targets, BIT)
    assert list(zip(starts.tolist(), lengths.tolist(), ids.tolist(), strict=True)) == reference_runs(
        slots, targets, BIT
    )
    indptr, all_ids = segments(slots)  # every run, served or not, covers the rows in order
    assert indptr[0] == 0 and indptr[-1] == len(slots) and (np.diff(indptr) > 0).all()
    assert (np.repeat(all_ids, np.diff(indptr)) == slots).all()


def test_no_served_rows_give_no_runs() -> None:
    targets = np.array([1, 1], np.int64)
    for slots in (np.full(100, NO_ADAPTER, np.int32), np.array([0] * 50 + [1] * 50, np.int32)):
        assert all(len(a) == 0 for a in served_segments(slots, targets, BIT))


class Memory:
    """Stand-in device memory: float64 arrays at byte addresses, 16-bit elements (``itemsize`` 2)."""

    def __init__(self) -> None:
        self.regions: list[tuple[int, np.ndarray]] = []

    def place(self, base: int, a: np.ndarray) -> int:
        self.regions.append((base, a.reshape(-1)))
        return base

    def matrix(self, address: int, rows: int, cols: int, ld: int) -> np.ndarray:
        """A view of ``rows`` x ``cols`` elements from ``address``, rows ``ld`` elements apart."""
        for base, flat in self.regions:
            if base <= address < base + 2 * flat.size:
                at = (address - base) // 2
                assert (address - base) % 2 == 0 and at + (rows - 1) * ld + cols <= flat.size, "past the region"
                return np.lib.stride_tricks.as_strided(flat[at:], (rows, cols), (8 * ld, 8))
        raise AssertionError(f"0x{address:x} is in no region")


def run_problems(mem: Memory, args: object, column_major: bool) -> None:
    """Each problem's ``y = x @ W`` in float64, as the segment GEMM computes it (W column-major: ``[n, k]`` rows of
    ``w_ld``; row-major: ``[k, n]``)."""
    for p, (m, n, k) in enumerate(args.problems.tolist()):  # type: ignore[attr-defined]
        a = args  # (a SegmentGEMMArgs)
        x = mem.matrix(int(a.x_ptr[p]), m, k, int(a.x_ld[p]))  # type: ignore[attr-defined]
        if column_major:
            w = mem.matrix(int(a.w_ptr[p]), n, k, int(a.w_ld[p])).T  # type: ignore[attr-defined]
        else:
            w = mem.matrix(int(a.w_ptr[p]), k, n, int(a.w_ld[p]))  # type: ignore[attr-defined]
        mem.matrix(int(a.y_ptr[p]), m, n, int(a.y_ld[p]))[:] = x @ w  # type: ignore[attr-defined]


@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("outs", [(32, 16, 16), (24,)], ids=["qkv-parts", "one-part"])
def test_the_problems_compute_each_rows_adapter_term(rank: int, outs: tuple[int, ...]) -> None:
    rng = np.random.default_rng(rank + len(outs))
    slots_n, k, parts, n = 3, 40, len(outs), sum(outs)
    rows = 150
    slots = np.concatenate([np.full(40, 0), np.full(30, NO_ADAPTER), np.full(50, 2), np.full(30, 1)]).astype(np.int32)
    targets = np.array([BIT, BIT | 1, 1], np.int64)  # slot 2 leaves the group alone
    x_ld, t_ld = k + 8, parts * rank + 8  # strided rows, as the engine's buffers may be
    x = rng.standard_normal((rows, x_ld))
    a = rng.standard_normal((slots_n, parts * rank, k))
    bt = rng.standard_normal((slots_n, rank, n))
    t = np.full((rows, t_ld), np.nan)
    z = np.full((rows, n), np.nan)
    mem = Memory()
    xa, aa, ta, ba, za = (mem.place(base << 28, v) for base, v in zip(range(1, 6), (x, a, t, bt, z), strict=True))
    runs = served_segments(slots, targets, BIT)
    shrink = shrink_problems(runs, xa, x_ld, aa, parts * rank * k, parts * rank, k, ta, t_ld)
    expand = expand_problems(runs, ta, t_ld, ba, rank * n, rank, outs, za, n)
    assert shrink.count == 2 and expand.count == 2 * parts  # rows of slot 0 and slot 1; slot 2's and none skipped
    assert shrink.problems.tolist() == [[40, parts * rank, k], [30, parts * rank, k]]
    run_problems(mem, shrink, True)
    run_problems(mem, expand, False)
    part = np.repeat(np.arange(parts), outs)
    for r in range(rows):
        s = slots[r]
        if s == NO_ADAPTER or not targets[s] & BIT:
            assert np.isnan(z[r]).all(), f"row {r}: written"
            continue
        tp = (a[s] @ x[r, :k]).reshape(parts, rank)[part]  # each output column's part of A x
        np.testing.assert_allclose(z[r], (tp * bt[s].T).sum(1), rtol=1e-12, atol=1e-12)


def test_addresses_past_2_63_keep_their_bits() -> None:
    runs = (np.array([0, 100]), np.array([100, 50]), np.array([1, 0]))
    high = 0xFFFF_0000_0000_0000
    shrink = shrink_problems(runs, high, 64, high + (1 << 20), 64 * 16, 16, 64, high + (1 << 30), 16)
    assert shrink.x_ptr.view(np.uint64).tolist() == [high, high + 100 * 64 * 2]
    assert shrink.w_ptr.view(np.uint64).tolist() == [high + (1 << 20) + 64 * 16 * 2, high + (1 << 20)]


ARRAYS = (("all_problems", "problems", np.int32), ("x_ptr", "x_ptr", np.int64), ("w_ptr", "w_ptr", np.int64),
          ("y_ptr", "y_ptr", np.int64), ("x_ld", "x_ld", np.int64), ("w_ld", "w_ld", np.int64),
          ("y_ld", "y_ld", np.int64))  # fmt: skip
"""(name in SegmentGEMMArgs.pack's offsets, attribute, dtype) of each array the kernel reads."""


@pytest.mark.parametrize("layers", [1, 3, 32])
def test_gemms_problems_packed_in_one_buffer_read_back_as_their_arrays(layers: int) -> None:
    # a group's shrink and expand of each layer, as DeviceSlots._apply_segments lays them out (only A's and Bt's
    # addresses differ between layers), packed for one copy: each GEMM's part starts 16-byte aligned, the parts do
    # not overlap, and each array read back at its offset is the problems' own
    rng = np.random.default_rng(layers)
    slots = prefill_slots(rng, 7)
    targets = np.array([BIT | 1, 1, BIT, BIT | 8], np.int64)
    runs = served_segments(slots, targets, BIT)
    rank, k, outs = 16, 4096, (4096, 1024, 1024)
    width, n = 3 * rank, sum(outs)
    a_layer, b_layer = width * k, rank * n  # elements between layers, in one slot
    gemms = []
    for layer in range(layers):
        gemms.append(shrink_problems(runs, 1 << 40, k, (2 << 40) + 2 * layer * a_layer, layers * a_layer, width, k,
                                     3 << 40, width))  # fmt: skip
        gemms.append(expand_problems(runs, 3 << 40, width, (4 << 40) + 2 * layer * b_layer, layers * b_layer, rank,
                                     outs, 5 << 40, n))  # fmt: skip
    data, offsets = pack_args(gemms)
    assert data.dtype == np.uint8 and len(offsets) == 2 * layers and offsets[0] == 0
    ends = [*offsets[1:], len(data)]
    for i, args in enumerate(gemms):
        packed, at = args.pack()
        assert offsets[i] % 16 == 0 and ends[i] - offsets[i] == len(packed)
        for name, attr, dtype in ARRAYS:
            want = getattr(args, attr)
            start = offsets[i] + at[name]
            got = data[start : start + want.nbytes].view(dtype).reshape(want.shape)
            np.testing.assert_array_equal(got, want, err_msg=f"gemm {i} (layer {i // 2}): {name}")
    assert gemms[0].count == len(runs[0]) and gemms[1].count == 3 * len(runs[0])
    if layers > 1:  # the layers' A addresses read back from the buffer differ by one layer's bytes
        first, second = (data[offsets[i] + gemms[i].pack()[1]["w_ptr"] :][:8].view(np.uint64)[0] for i in (0, 2))
        assert int(second) - int(first) == 2 * a_layer


def test_a_gemm_of_no_problem_keeps_a_part_of_its_own() -> None:
    none = shrink_problems(
        tuple(np.zeros(0, np.int64) for _ in range(3)), 1 << 40, 64, 2 << 40, 1024, 16, 64, 3 << 40, 16
    )
    some = shrink_problems((np.array([0]), np.array([8]), np.array([0])), 1 << 40, 64, 2 << 40, 1024, 16, 64, 3 << 40,
                           16)  # fmt: skip
    data, offsets = pack_args([none, some])
    assert none.count == 0 and offsets == [0, 16] and len(data) == 16 + len(some.pack()[0])


class StandInCupy:
    """Stands in for the CuPy calls :class:`~fi_engine.lora.segment_form.ArgsArena` makes (CuPy needs a GPU): its
    device memory and page-locked buffer as host bytes, ``runtime.memcpyAsync`` copying at once, each copy kept as
    ``(device address, bytes)`` with the stream's drains before it (:attr:`epochs`), and a stream whose drains are
    counted."""

    def __init__(self) -> None:
        self.copies: list[tuple[int, bytes]] = []
        self.epochs: list[int] = []
        self.drains = 0
        self.stream = SimpleNamespace(ptr=0x77, synchronize=self._drain)
        runtime = SimpleNamespace(memcpyAsync=self._copy, memcpyHostToDevice=1)
        self.cuda = SimpleNamespace(Memory=self._memory, alloc_pinned_memory=bytearray, runtime=runtime)

    @staticmethod
    def _memory(nbytes: int) -> Any:
        host = np.zeros(nbytes + 256, np.uint8)
        return SimpleNamespace(ptr=(host.ctypes.data + 255) // 256 * 256, host=host)  # (256-aligned, as cudaMalloc)

    def _copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        assert kind == 1 and stream == 0x77, "a copy host to device, on the launches' stream"
        self.copies.append((dst, ctypes.string_at(src, nbytes)))
        self.epochs.append(self.drains)
        ctypes.memmove(dst, src, nbytes)

    def _drain(self) -> None:
        self.drains += 1


K, OUTS, RANK = 4096, (4096, 1024, 1024), 16  # an 8B-shaped q/k/v group
N, WIDTH = sum(OUTS), len(OUTS) * RANK
X, A, T, BT, Z = (v << 40 for v in range(1, 6))  # addresses of x, the slots' A, t, the slots' Bt and z
LAYERS = 32


class Launches:
    """A group's launches over the served runs of ``slots``, as DeviceSlots._apply_segments makes them: its key, and
    each layer's problems (recording the layers asked for) and operands."""

    def __init__(self, slots: np.ndarray) -> None:
        self.runs = served_segments(slots, np.array([BIT, BIT, BIT, BIT], np.int64), BIT)
        self.key = ("qkv", len(slots), X, K, b"".join(v.tobytes() for v in self.runs), A, BT, T, Z)
        self.asked: list[int] = []
        rows = len(slots)
        self.operands = tuple(kernels.Tensor(v, (rows, c), "bfloat16", 0) for v, c in ((X, K), (T, WIDTH), (Z, N)))

    def problems(self, layer: int) -> tuple[Any, Any]:
        self.asked.append(layer)
        a_layer, b_layer = WIDTH * K, RANK * N  # elements between layers, in one slot
        a, bt = A + 2 * layer * a_layer, BT + 2 * layer * b_layer  # this layer's in slot 0
        shrink = shrink_problems(self.runs, X, K, a, LAYERS * a_layer, WIDTH, K, T, WIDTH)
        return shrink, expand_problems(self.runs, T, WIDTH, bt, LAYERS * b_layer, RANK, OUTS, Z, N)

    def launch(self, gemms: PreparedGemms, cupy: StandInCupy, layer: int) -> tuple[Any, Any]:
        return gemms.get(self.key, layer, lambda: self.problems(layer), self.operands, cupy.stream)


def device_arrays(gemm: Any) -> np.ndarray:
    """The (m, n, k) rows a prepared GEMM's kernel would read, from the stand-in device memory it points at."""
    sizes = gemm.problem_sizes
    return np.frombuffer(ctypes.string_at(sizes.data_ptr, 12 * gemm.count), np.int32).reshape(gemm.count, 3)


def test_a_layer_is_prepared_and_copied_at_its_own_launch_alone() -> None:
    cupy = StandInCupy()
    gemms = PreparedGemms(cupy, workspace(), 0)
    slots = np.repeat(np.array([0, 2], np.int32), [1500, 2596])
    group = Launches(slots)
    shrink, expand = group.launch(gemms, cupy, 3)
    assert group.asked == [3] and gemms.count == 1  # no other layer prepared
    assert len(cupy.copies) == 1  # the layer's shrink and expand in one copy
    data, offsets = pack_args(Launches(slots).problems(3))
    dst, copied = cupy.copies[0]
    assert copied == data.tobytes() and dst == shrink.problem_sizes.data_ptr - offsets[0]
    assert expand.problem_sizes.data_ptr == dst + offsets[1]  # each GEMM reads its own part of the copy
    assert device_arrays(shrink).tolist() == [[1500, WIDTH, K], [2596, WIDTH, K]]
    assert device_arrays(expand)[:, 1].tolist() == [*OUTS, *OUTS]  # (run-major: each run's q, k, v)
    group.launch(gemms, cupy, 4)
    assert group.asked == [3, 4] and len(cupy.copies) == 2 and gemms.count == 2
    assert cupy.copies[1][0] >= dst + len(data)  # layer 4's part after layer 3's: nothing written twice


def test_a_pass_of_the_same_runs_reuses_its_layers_and_new_runs_prepare_anew() -> None:
    cupy = StandInCupy()
    gemms = PreparedGemms(cupy, workspace(), 0)
    slots = np.repeat(np.array([1, NO_ADAPTER], np.int32), [4000, 96])
    group = Launches(slots)
    first = []
    for _ in range(2):  # two passes of the same runs
        gemms.begin_pass()
        first.append([group.launch(gemms, cupy, layer) for layer in range(LAYERS)])
    assert group.asked == list(range(LAYERS)) and len(cupy.copies) == LAYERS  # the second pass prepared nothing
    assert all(a is b for a, b in zip(*first, strict=True))
    assert len({dst for dst, _ in cupy.copies}) == LAYERS
    shorter = Launches(slots[:-16])  # the next prompt 16 tokens shorter: other rows, so other GEMMs
    gemms.begin_pass()
    for layer in range(LAYERS):
        shorter.launch(gemms, cupy, layer)
        assert shorter.asked == list(range(layer + 1))  # each layer prepared at its own launch
    assert len(cupy.copies) == 2 * LAYERS and gemms.count == 2 * LAYERS
    assert cupy.drains == 1  # (only where the arena was made, at the first preparation)


def test_a_full_arena_drains_the_stream_before_its_parts_are_written_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segment_form, "ARENA_BYTES", 4096)  # (a few layers' parts)
    cupy = StandInCupy()
    gemms = PreparedGemms(cupy, workspace(), 0)
    group = Launches(np.zeros(200, np.int32))
    gemms.begin_pass()
    for layer in range(LAYERS):
        group.launch(gemms, cupy, layer)
    assert cupy.drains >= 2  # (the first where the arena was made)
    for epoch in range(cupy.drains + 1):  # each part written once between drains
        written = [dst for (dst, _), at in zip(cupy.copies, cupy.epochs, strict=True) if at == epoch]
        assert len(written) == len(set(written)), f"a part written twice before a drain: {written}"
    assert gemms.count == cupy.epochs.count(cupy.drains) < LAYERS  # those before the last drain dropped
    group.launch(gemms, cupy, LAYERS - 1)  # the last layer, prepared since
    assert len(group.asked) == LAYERS
    group.launch(gemms, cupy, 0)  # the first, dropped at a drain: prepared again
    assert group.asked[-1] == 0 and len(group.asked) == LAYERS + 1


def test_refused_problems_copy_nothing() -> None:
    cupy = StandInCupy()
    gemms = PreparedGemms(cupy, workspace(), 0)
    group = Launches(np.zeros(200, np.int32))
    misaligned = lambda: (shrink_problems(group.runs, X + 2, K, A, LAYERS * WIDTH * K, WIDTH, K, T, WIDTH),  # noqa: E731
                          group.problems(0)[1])  # fmt: skip
    with pytest.raises(ValueError, match=r"args\.x_ptr: problem 0 .*16-byte aligned"):
        gemms.get(group.key, 0, misaligned, group.operands, cupy.stream)
    assert cupy.copies == [] and gemms.count == 0
