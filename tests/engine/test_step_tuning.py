"""Choosing a decode graph's GEMM launches by timing the captured step (fi_engine.runtime.worker.step_tuning), no
GPU: which shapes and launches ``close_choices`` names from a Dense's timings, and what ``tuned_step`` keeps, closes
and leaves chosen. The Dense is a real one made without its constructor (which compiles kernels on a GPU) holding
timings as its ``_choice`` records them; the graphs are stand-ins whose step time depends on the launches chosen
when they were captured (the GPU test, tests/engine/test_gpu_llama.py, captures and times real ones).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest

from fi_engine.kernels import dense as D
from fi_engine.kernels.launch_timing import close_choices
from fi_engine.runtime.worker import step_tuning as T

pytestmark = pytest.mark.cpu_only

BF16 = D.CUDA_R_16BF
QKV, OUT, GATE_UP = (6144, 4096), (4096, 4096), (28672, 4096)


def key(rows: int, nk: tuple[int, int], weight: int = 0) -> tuple[int, ...]:
    return (rows, *nk, BF16, BF16, weight)


def test_close_choices_names_the_launches_within_the_window_fastest_first() -> None:
    timings = {
        key(8, QKV): {-2: 0.0230, -1: 0.0300, 0: 0.0219, 4: 0.0228},  # 4 and -2 within 15 % of 0; -1 not
        key(8, OUT): {0: 0.0175, 2: 0.0174},
        key(8, GATE_UP): {0: 0.0680, 1: 0.0900},  # nothing close: left out
        key(16, QKV): {0: 0.0200, 1: 0.0201},  # other rows: left out
        key(8, (4096, 14336)): {-2: 0.0},  # one launch (not timed): left out
    }
    got = close_choices(timings, 8, 0.15, 2)
    assert got == [((key(8, QKV),), (0, 4, -2)), ((key(8, OUT),), (2, 0))]
    assert close_choices(timings, 8, 0.15, 1)[0] == ((key(8, QKV),), (0, 4))  # at most `most` besides the fastest
    assert close_choices(timings, 8, 0.045, 2) == [((key(8, QKV),), (0, 4)), ((key(8, OUT),), (2, 0))]
    assert close_choices(timings, 8, 0.006, 2) == [((key(8, OUT),), (2, 0))]
    assert close_choices(timings, 4, 0.15, 2) == []


def test_close_choices_sums_a_quantized_shapes_layers_over_the_launches_all_have() -> None:
    # two layers' FP8 weights of one shape: timed per weight; launch 3 only timed for the first
    timings = {
        key(32, GATE_UP, 0x100): {-2: 0.064, 0: 0.060, 3: 0.050},
        key(32, GATE_UP, 0x200): {-2: 0.058, 0: 0.066},
    }
    got = close_choices(timings, 32, 0.15, 2)
    assert got == [((key(32, GATE_UP, 0x100), key(32, GATE_UP, 0x200)), (-2, 0))]  # sums 0.122 and 0.126


def test_close_choices_keeps_the_gate_up_silu_form_apart_from_the_plain_gemm() -> None:
    """Dense.gate_up_silu's key is the plain GEMM's and a last value (1): the same (rows, n, k, types), its own
    launches (-2: the GEMM then silu_and_mul; 0, 1: the SiLU form's plans), so it is a shape of its own, its labels
    never mixed with the GEMM's."""
    plain, silu = key(8, GATE_UP), (*key(8, GATE_UP), 1)
    timings = {plain: {-2: 0.0340, 0: 0.0345, 1: 0.0400}, silu: {-2: 0.0380, 0: 0.0352, 1: 0.0500}}
    got = close_choices(timings, 8, 0.15, 2)
    assert got == [((plain,), (-2, 0)), ((silu,), (0, -2))]
    words = T.shapes_words(got)
    assert T.shapes_from_words([*words, 0, 0]) == got  # (the keys of 7 values travel to the other ranks as well)


class Graph:
    """A stand-in decode graph: the launches chosen when it was captured, and whether it was closed."""

    def __init__(self, choices: dict[tuple[int, ...], int]) -> None:
        self.choices = dict(choices)
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


def dense_with(timings: dict[tuple[int, ...], dict[int, float]]) -> D.Dense:
    """A Dense holding ``timings`` and, for each key, the fastest launch chosen (as ``_choice`` leaves them)."""
    dense = D.Dense.__new__(D.Dense)
    dense._timings = {k: dict(v) for k, v in timings.items()}
    dense._choices = {k: min(v, key=v.__getitem__) for k, v in timings.items()}
    return dense


def run(dense: D.Dense, rows: int, step_ms: dict[tuple[int, ...], float]) -> tuple[Any, list[Graph], dict[int, Any]]:
    """tuned_step over stand-in graphs whose step time is ``step_ms`` of the launches of the QKV and OUT keys chosen at
    capture (0.0 for the first graph's); returns (the tuning, every graph made, the graph kept by rows)."""
    order = [key(rows, QKV), key(rows, OUT)]
    made: list[Graph] = []

    def capture() -> Graph:
        made.append(Graph(dense._choices))
        return made[-1]

    held: dict[int, Any] = {}
    first = capture()
    held[rows] = first
    tuning = T.tuned_step(
        dense,
        rows,
        first,
        capture,
        lambda g: held.__setitem__(rows, g),
        lambda g: step_ms[tuple(g.choices[k] for k in order)],
    )
    return tuning, made, held


def test_tuned_step_keeps_the_graph_that_replays_fastest_and_closes_the_rest() -> None:
    dense = dense_with({key(8, QKV): {0: 0.0219, 4: 0.0228}, key(8, OUT): {2: 0.0174, 0: 0.0175}})
    # step ms by (QKV launch, OUT launch): QKV 4 is faster in the step, then OUT 0 only 0.2 % faster (within the gain)
    step_ms = {(0, 2): 5.20, (4, 2): 4.80, (4, 0): 4.79}
    tuning, made, held = run(dense, 8, step_ms)
    assert tuning is not None
    assert (tuning.start_ms, tuning.kept_ms) == (5.20, 4.80)
    assert [(s.shape, s.before, s.tried, s.kept) for s in tuning.shapes] == [
        (key(8, QKV)[:5], (0,), ((4, 4.80),), (4,)),
        (key(8, OUT)[:5], (2,), ((0, 4.79),), (2,)),
    ]
    assert tuning.pairs == () and len(made) == 3  # (no pairs of shapes: TUNE_PAIRS is off by default)
    kept = held[8]
    assert kept.choices == {key(8, QKV): 4, key(8, OUT): 2} and kept.closes == 0
    assert all(g.closes == 1 for g in made if g is not kept)  # each other graph closed once
    assert dense.choices((key(8, QKV), key(8, OUT))) == (4, 2)  # the Dense left with the kept graph's launches


def test_a_pair_of_launches_faster_only_together_is_found_by_the_pair_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither change alone gains (QKV 4 with OUT 2, QKV 0 with OUT 0), both together do: the one-at-a-time pass keeps
    nothing, the pair pass keeps (4, 0). Without the pair pass (TUNE_PAIRS off) the step stays as first captured."""
    timings = {key(8, QKV): {0: 0.0219, 4: 0.0228}, key(8, OUT): {2: 0.0174, 0: 0.0175}}
    step_ms = {(0, 2): 5.00, (4, 2): 5.01, (0, 0): 5.02, (4, 0): 4.70}
    monkeypatch.setattr(T, "TUNE_PAIRS", True)
    dense = dense_with(timings)
    tuning, made, held = run(dense, 8, step_ms)
    assert tuning is not None and (tuning.start_ms, tuning.kept_ms) == (5.00, 4.70)
    assert [s.kept for s in tuning.shapes] == [(4,), (0,)] and [s.before for s in tuning.shapes] == [(0,), (2,)]
    assert [(p.tried, p.kept) for p in tuning.pairs] == [(((4, 0, 4.70),), (4, 0))]
    assert held[8].choices == {key(8, QKV): 4, key(8, OUT): 0} and dense.choices((key(8, QKV), key(8, OUT))) == (4, 0)
    assert len(made) == 4 and all(g.closes == 1 for g in made if g is not held[8]) and held[8].closes == 0
    off = dense_with(timings)
    monkeypatch.setattr(T, "TUNE_PAIRS", False)
    tuning, made, held = run(off, 8, step_ms)
    assert tuning is not None and tuning.kept_ms == 5.00 and tuning.pairs == () and len(made) == 3
    assert off.choices((key(8, QKV), key(8, OUT))) == (0, 2)


def test_tuned_step_leaves_quantized_shapes_to_their_launches_timed_alone() -> None:
    keys = (key(32, QKV, 0x100), key(32, QKV, 0x200))
    dense = dense_with({keys[0]: {0: 0.020, -2: 0.021}, keys[1]: {0: 0.022, -2: 0.0215}})
    graph = Graph(dense._choices)
    assert T.tuned_step(dense, 32, graph, lambda: pytest.fail("captured"), lambda g: None, lambda g: 1.0) is None
    assert dense.choices(keys) == (0, -2)


def test_tuned_step_sets_every_layer_of_a_quantized_shape_to_one_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "TUNE_QUANTIZED", True)
    keys = (key(32, QKV, 0x100), key(32, QKV, 0x200))
    dense = dense_with({keys[0]: {0: 0.020, -2: 0.021}, keys[1]: {0: 0.022, -2: 0.0215}})  # chosen 0 and -2
    graphs: list[Graph] = []

    def capture() -> Graph:
        graphs.append(Graph(dense._choices))
        return graphs[-1]

    first = capture()
    times = {(0, -2): 3.0, (0, 0): 2.9, (-2, -2): 3.1}
    tuning = T.tuned_step(dense, 32, first, capture, lambda g: None, lambda g: times[tuple(g.choices[k] for k in keys)])
    assert tuning is not None and tuning.shapes[0].before == (0, -2)
    assert [label for label, _ in tuning.shapes[0].tried] == [0, -2]  # each launch for every layer at once
    assert tuning.shapes[0].kept == (0, 0) and dense.choices(keys) == (0, 0)


def test_tuned_step_restores_the_choices_and_closes_the_trial_when_timing_fails() -> None:
    dense = dense_with({key(8, QKV): {0: 0.0219, 4: 0.0228}})
    made: list[Graph] = []

    def capture() -> Graph:
        made.append(Graph(dense._choices))
        return made[-1]

    def timed(g: Graph) -> float:
        if g is not made[0]:
            raise RuntimeError("replay failed")
        return 1.0

    with pytest.raises(RuntimeError, match="replay failed"):
        T.tuned_step(dense, 8, capture(), capture, lambda g: None, timed)
    assert made[1].closes == 1 and made[0].closes == 0  # the caller still holds (and closes) the first
    assert dense.choices((key(8, QKV),)) == (0,)


def test_tuned_step_does_nothing_without_close_launches() -> None:
    dense = dense_with({key(8, GATE_UP): {0: 0.068, 1: 0.090}})
    graph = Graph(dense._choices)
    assert T.tuned_step(dense, 8, graph, lambda: pytest.fail("captured"), lambda g: None, lambda g: 1.0) is None
    assert graph.closes == 0


def test_set_choices_refuses_a_launch_the_shape_was_not_timed_with() -> None:
    dense = dense_with({key(8, QKV): {0: 0.0219, 4: 0.0228}})
    with pytest.raises(ValueError, match="7 is not a launch timed"):
        dense.set_choices((key(8, QKV),), (7,))
    assert dense.choices((key(8, QKV),)) == (0,)


def test_timed_launches_reports_each_shapes_times_and_the_launch_serving_it_as_a_copy() -> None:
    """Dense.timed_launches (benchmarks/bench_llama_tp.py --choices prints it): each key's launches timed alone and
    the one serving it, the step tuning's choice once set_choices made one; a copy, so changing it changes nothing."""
    dense = dense_with({key(8, QKV): {0: 0.0219, 4: 0.0228}, key(8, OUT): {-2: 0.012, 1: 0.011}})
    got = dense.timed_launches()
    assert got == {key(8, QKV): ({0: 0.0219, 4: 0.0228}, 0), key(8, OUT): ({-2: 0.012, 1: 0.011}, 1)}
    dense.set_choices((key(8, QKV),), (4,))
    assert dense.timed_launches()[key(8, QKV)] == ({0: 0.0219, 4: 0.0228}, 4)
    got[key(8, OUT)][0][1] = 1.0
    assert dense.timed_launches()[key(8, OUT)][0] == {-2: 0.012, 1: 0.011}
    del dense._choices[key(8, OUT)]  # timed, none set (as a capture met first would leave none)
    assert dense.timed_launches()[key(8, OUT)][1] is None


# ------------------------------------------------------------------------------------- tensor parallelism (lock step)


def test_shapes_travel_as_words_and_back() -> None:
    shapes = [((key(8, QKV),), (0, 4, -2)), ((key(8, OUT, 0x100), key(8, OUT, 0x200)), (2, 0))]
    words = T.shapes_words(shapes)
    assert len(words) <= T.TUNE_WORDS and words[0] == 2
    assert T.shapes_from_words([*words, 0, 0, 0]) == shapes  # (the broadcast buffer is longer)
    assert T.shapes_words([]) == [0] and T.shapes_from_words([0] * 8) == []
    many = [((key(8, (n, 4096)),), (0, 1, 2)) for n in range(0, 200 * 128, 128)]
    assert T.shapes_words(many) == [0]  # more than TUNE_WORDS: no shape (every rank then tries none)
    for bad in ([], [1], [1, 1, 6, 8], [-1], [1, -2, 6], [1, 10**9, 0]):
        with pytest.raises(ValueError, match="^words: not a list of shapes"):
            T.shapes_from_words(bad)


def test_ranks_in_lock_step_capture_and_keep_the_same_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    # two ranks whose launches timed alone differ: rank 1 chose QKV 4 where rank 0 chose 0, and named OUT's launches
    # in another order; in lock step both try rank 0's list, every launch of it, and keep by the slowest rank's time
    # (and with the pairs of shapes on, every pair of them)
    import threading

    monkeypatch.setattr(T, "TUNE_PAIRS", True)

    timings = [
        {key(8, QKV): {0: 0.0219, 4: 0.0228}, key(8, OUT): {2: 0.0174, 0: 0.0175}},
        {key(8, QKV): {0: 0.0230, 4: 0.0225}, key(8, OUT): {2: 0.0176, 0: 0.0170}},
    ]
    denses = [dense_with(t) for t in timings]
    shared = denses[0].close_choices(8, T.TUNE_WITHIN, T.TUNE_MOST)
    step_ms = [  # each rank's step ms by its graph's (QKV, OUT) launches
        {(0, 2): 5.20, (4, 2): 4.80, (0, 0): 5.3, (4, 0): 4.70},
        {(4, 0): 5.10, (0, 0): 5.00, (4, 2): 4.85, (0, 2): 5.2},
    ]
    order = [key(8, QKV), key(8, OUT)]
    barrier, slot = threading.Barrier(2, timeout=5), [0.0, 0.0]  # (a rank out of step: broken, not hung)
    out: list[Any] = [None, None]

    def rank(i: int) -> None:
        dense, made = denses[i], []

        def capture() -> Graph:
            made.append(Graph(dense._choices))
            return made[-1]

        def slowest(g: Graph) -> float:
            slot[i] = step_ms[i][tuple(g.choices[k] for k in order)]
            barrier.wait()
            worst = max(slot)
            barrier.wait()
            return worst

        held = {8: capture()}
        tuning = T.tuned_step(dense, 8, held[8], capture, lambda g: held.__setitem__(8, g), slowest, lambda s: shared)
        out[i] = (tuning, made, held[8])

    threads = [threading.Thread(target=rank, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    (t0, made0, kept0), (t1, made1, kept1) = out
    # the first graph, then every launch of both shapes, then every pair of them: none skipped
    assert len(made0) == len(made1) == 1 + 2 + 2 + 4
    assert [s.tried for s in t0.shapes] == [s.tried for s in t1.shapes]  # the same trials, by the same times
    # first graphs: 5.20 (rank 0) and 5.10; QKV 0: 5.20 / 5.00; QKV 4: 4.80 / 5.10, kept; OUT 2: 4.80 / 4.85, kept
    assert [s.tried for s in t0.shapes] == [((0, 5.2), (4, 5.1)), ((2, 4.85), (0, 5.1))]
    assert (t0.start_ms, t0.kept_ms) == (t1.start_ms, t1.kept_ms) == (5.2, 4.85)
    assert [s.kept for s in t0.shapes] == [s.kept for s in t1.shapes] == [(4,), (2,)]
    assert kept0.choices == kept1.choices == {key(8, QKV): 4, key(8, OUT): 2}
    assert all(g.closes == 1 for g in (*made0, *made1) if g not in (kept0, kept1))
    # the pairs: all four, each rank by the slowest time (none faster than 4.85 by the gain)
    assert (
        [p.tried for p in t0.pairs]
        == [p.tried for p in t1.pairs]
        == [((0, 2, 5.2), (0, 0, 5.3), (4, 2, 4.85), (4, 0, 5.1))]
    )


class _Device(np.ndarray):
    """A host array standing in for a CuPy one (``get``)."""

    def get(self) -> np.ndarray:
        return np.asarray(self)


class _Rank1Comm:
    """Rank 1 of two: its broadcast receives ``rank0_words``; its min all-reduce meets rank 0's ``rank0_ok``, its max
    all-reduce rank 0's ``rank0_ms``. Each buffer goes through what the real communicator does with it first (fi_ffi's
    tensor intake and NCCL's type for its dtype), so a buffer the real one refuses fails here too."""

    rank = 1

    def __init__(self, rank0_words: list[int], rank0_ok: bool = True, rank0_ms: float = 0.0) -> None:
        self.rank0_words, self.rank0_ok, self.rank0_ms = rank0_words, rank0_ok, rank0_ms
        self.calls: list[tuple[Any, ...]] = []
        self.aborted: list[str] = []

    @staticmethod
    def _nccl(buffer: Any) -> None:
        from fi_ffi.comm.nccl import _nccl_type
        from fi_ffi.tensor.intake import as_tensor

        _nccl_type("buffer", as_tensor(np.asarray(buffer), name="buffer").dtype)

    def broadcast(self, buffer: Any, *, root: int, stream: int) -> None:
        self._nccl(buffer)
        self.calls.append(("broadcast", root, stream))
        buffer[:] = 0
        buffer[: len(self.rank0_words)] = self.rank0_words

    def all_reduce(self, buffer: Any, *, op: str, stream: int) -> None:
        self._nccl(buffer)
        self.calls.append(("all_reduce", op, stream))
        buffer[0] = min(buffer[0], int(self.rank0_ok)) if op == "min" else max(buffer[0], self.rank0_ms)

    def abort(self, reason: str) -> None:
        self.aborted.append(reason)


def _tp_graphs(dense: D.Dense, comm: _Rank1Comm) -> Any:
    from types import SimpleNamespace

    from fi_engine.runtime.worker.step_graphs import StepGraphs

    runner = SimpleNamespace(
        comm=comm,
        dense=dense,
        stream_ptr=77,
        stream=contextlib.nullcontext(),
        cupy=SimpleNamespace(asarray=lambda a: np.array(a).view(_Device)),
    )
    return StepGraphs.__new__(StepGraphs), runner


@pytest.mark.parametrize(
    ("rank1_has", "rank0_ok", "tried"),
    [(True, True, True), (False, True, False), (True, False, False)],
    ids=["both timed", "rank 1 lacks a launch", "rank 0 lacks one"],
)
def test_a_rank_takes_rank_0s_shapes_only_where_every_rank_timed_their_launches(rank1_has, rank0_ok, tried) -> None:
    # rank 0's list (QKV: 0 and 4) reaches rank 1, whose own timings named other launches; where a rank has not timed
    # one of them (here rank 1 without QKV's 4, or rank 0 saying so), every rank tries no shape
    rank0 = [((key(8, QKV),), (0, 4))]
    mine = {key(8, QKV): {0: 0.0230, 4: 0.0225} if rank1_has else {0: 0.0230, 2: 0.0231}}
    comm = _Rank1Comm(T.shapes_words(rank0), rank0_ok)
    graphs, runner = _tp_graphs(dense_with(mine), comm)
    graphs.runner = runner
    own = runner.dense.close_choices(8, T.TUNE_WITHIN, T.TUNE_MOST)
    assert graphs._rank0_shapes(own) == (rank0 if tried else [])
    assert comm.calls == [("broadcast", 0, 77), ("all_reduce", "min", 77)]  # on the engine's stream


def test_a_trials_step_time_is_the_slowest_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    from fi_engine.runtime.worker import step_graphs

    comm = _Rank1Comm([0], rank0_ms=5.25)
    graphs, runner = _tp_graphs(dense_with({}), comm)
    graphs.runner = runner
    for mine, want in ((4.5, 5.25), (6.0, 6.0)):
        monkeypatch.setattr(step_graphs, "step_ms", lambda graph, stream, cupy, mine=mine: mine)
        assert graphs._slowest_rank_ms(object()) == pytest.approx(want)  # (float32 on the wire)
    assert comm.calls == [("all_reduce", "max", 77)] * 2


def test_a_rank_whose_tuning_fails_tells_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    # the other ranks wait in the step's collectives: the failing rank aborts the communicator before it raises
    from fi_engine.runtime.worker import step_graphs

    def fails(*args: Any) -> None:
        raise RuntimeError("capture failed")

    monkeypatch.setattr(step_graphs, "tuned_step", fails)
    comm = _Rank1Comm([0])
    graphs, runner = _tp_graphs(dense_with({}), comm)
    graphs.runner, graphs.graphs, graphs.tuning = runner, {}, {}
    with pytest.raises(RuntimeError, match="capture failed"):
        graphs._tune(object(), 8, object())
    assert comm.aborted == ["decode-graph tuning of 8 rows failed: RuntimeError: capture failed"]


# ------------------------------------------------------------------------------------- the gate/up GEMM's SiLU form


class Skinny:
    """A stand-in for the Dense's SkinnyLaunches (its kernels need a GPU): records the SiLU form's launches."""

    def __init__(self) -> None:
        self.runs: list[tuple[tuple[int, ...], int, bool]] = []

    def run(self, key: tuple[int, ...], index: int, quant: Any, silu: bool = False) -> bool:
        self.runs.append((key, index, silu))
        return True


def silu_dense(choice: int | None, bandwidth_bound: bool = True) -> tuple[D.Dense, list[str]]:
    """A Dense whose linear logs its calls, its SiLU-form key set to ``choice`` (None: untimed) and a stand-in skinny
    GEMM."""
    dense = D.Dense.__new__(D.Dense)
    log: list[str] = []
    dense.linear = lambda *args, **kw: log.append(f"gemm {args}")  # type: ignore[method-assign]
    dense.bandwidth_bound, dense.gemv = bandwidth_bound, True
    dense._skinny = Skinny()  # type: ignore[assignment]
    dense._choices = {} if choice is None else {(8, 28672, 4096, BF16, BF16, 0, 1): choice}
    dense._timings = {}
    return dense, log


GU_CALL = (8, 0x1000, 4096, 0x2000, 28672, 4096, 0x3000, 28672, 0x4000, 14336, BF16)  # rows ... act_ld, ab_type


@pytest.mark.parametrize("choice", [0, 3])
def test_gate_up_silu_launches_the_form_where_it_was_chosen(choice: int) -> None:
    dense, log = silu_dense(choice)
    dense.gate_up_silu(*GU_CALL, lambda: log.append("silu"))
    assert log == []
    act_call = (8, 0x1000, 4096, 0x2000, 28672, 4096, 0x4000, 14336, BF16, BF16)  # (y: act, at its row stride)
    assert dense._skinny.runs == [(act_call, choice, True)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", ["gemm chosen", "eager step", "more than 32 rows", "fp8 weight", "int4 weight"])
def test_gate_up_silu_is_the_gemm_then_the_silu_elsewhere(case: str) -> None:
    dense, log = silu_dense(-2 if case == "gemm chosen" else 0, bandwidth_bound=case != "eager step")
    call = list(GU_CALL)
    if case == "more than 32 rows":
        call[0] = 33
    if case == "fp8 weight":
        dense._fp8_weights = {0x2000: object()}
    if case == "int4 weight":
        dense._int4_weights = {0x2000: object()}
    dense.gate_up_silu(*call, lambda: log.append("silu"))
    gemm = (call[0], 0x1000, 4096, 0x2000, 28672, 4096, 0x3000, 28672, BF16, BF16)
    assert log == [f"gemm {gemm}", "silu"]
    assert dense._skinny.runs == []  # type: ignore[attr-defined]
