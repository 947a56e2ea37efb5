"""Choosing a decode graph's GEMM launches by timing the captured step (fi_engine.runtime.worker.step_tuning), no
GPU: which shapes and launches ``close_choices`` names from a Dense's timings, and what ``tuned_step`` keeps, closes
and leaves chosen. The Dense is a real one made without its constructor (which compiles kernels on a GPU) holding
timings as its ``_choice`` records them; the graphs are stand-ins whose step time depends on the launches chosen
when they were captured (the GPU test, tests/engine/test_gpu_llama.py, captures and times real ones).
"""

from __future__ import annotations

from typing import Any

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
    kept = held[8]
    assert kept.choices == {key(8, QKV): 4, key(8, OUT): 2} and kept.closes == 0
    assert all(g.closes == 1 for g in made if g is not kept)  # each other graph closed once
    assert dense.choices((key(8, QKV), key(8, OUT))) == (4, 2)  # the Dense left with the kept graph's launches


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
