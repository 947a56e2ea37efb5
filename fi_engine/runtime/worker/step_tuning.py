"""A decode graph's GEMM launches chosen by timing the captured step itself (:func:`tuned_step`), where the launches
timed alone came close: a part of :class:`~fi_engine.runtime.worker.step_graphs.StepGraphs`' capture.

The Dense times each GEMM shape's launches alone once (the GEMV, the skinny GEMM's plans, cuBLASLt or a quantized
weight's own path: ``LaunchTimer``) and serves the shape by the fastest. In the step a launch follows another kernel
and overlaps its tail (programmatic dependent launch), and launches that came within a few percent alone can differ
by more there: on an H200, an 8B decode step of 8 rows took 4.8 or 5.2 ms by which of two gate/up launches, 68.2
and 68.3 us alone, won, so the same engine decoded at 1,540 or 1,665 tokens/s from one start to the next. Here each
16-bit shape whose runners-up came within :data:`TUNE_WITHIN` of the fastest is tried in the captured step with each
of them, one shape at a time in the order they were timed, and the step keeps the launch whose graph replays fastest
by at least :data:`TUNE_GAIN`; else the one chosen alone.

With :data:`TUNE_PAIRS` (off) each two shapes timed one after the other (in a layer's order: QKV, O, gate/up, down,
LM head) are then tried together in every pair of launches that changes both, for a launch faster in the step only
beside another's. On an H200, 8B bf16 at 8 rows, the step took 4.69 ms with the gate/up GEMM on cuBLASLt and the down
GEMM's first skinny plan, 5.02-5.07 where the tuning kept neither, and starts decoded at 1,647-1,651 or 1,538-1,597
tokens/s by that. The pairs did not move the mean in the one call that measured them (benchmarks/RESULTS.md), so they
are off; ``bench_llama_tp.py --variants tune-pairs`` turns them on.

Shapes over FP8 or int4 weights keep the launch timed alone (:data:`TUNE_QUANTIZED`): on an H200, AWQ int4 at 8 rows,
the QKV shape's skinny GEMM replayed the step 50 us faster than the int4 path, yet the serving loop then decoded 2 %
slower (2,539 against 2,593 tokens/s, two runs each; the trials alone, every graph but the first closed, changed
nothing). The 16-bit shapes' picks held in the serving loop.

With tensor parallelism each rank's graphs hold collectives, so the ranks must capture and replay the same trials in
the same order: rank 0's shapes and launches go to every rank (:func:`shapes_words`, :func:`shapes_from_words`: the
ranks' own timings alone differ), every launch of the list is tried (a rank's choice timed alone may differ from rank
0's, so none is skipped as the one already captured), and each trial's step time is the slowest rank's, so every rank
keeps the same trials (``tuned_step``'s ``lockstep``; ``StepGraphs`` makes it from the runner's communicator).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TUNE_GAIN",
    "TUNE_MOST",
    "TUNE_PAIRS",
    "TUNE_QUANTIZED",
    "TUNE_WITHIN",
    "TUNE_WORDS",
    "PairTrial",
    "ShapeTrial",
    "StepTuning",
    "step_ms",
    "tuned_step",
]

TUNE_WITHIN = 0.15  # launches timed alone within this fraction of a shape's fastest are tried in the step
TUNE_MOST = 2  # at most this many of them a shape besides the fastest
TUNE_GAIN = 0.005  # a trial's graph is kept only where its step is this fraction faster than the graph kept so far
TUNE_REPLAYS, TUNE_ROUNDS = 4, 3  # a graph's step time: the best of TUNE_ROUNDS rounds of TUNE_REPLAYS replays
TUNE_QUANTIZED = False  # whether shapes over FP8 or int4 weights are tried too (the module's docstring says why not)
TUNE_WORDS = 1024  # the int64 words rank 0's shapes and launches travel in to the other ranks (shapes_words)
TUNE_PAIRS = False  # whether each two consecutive shapes are tried together after the one-at-a-time pass (below)

Shapes = list[tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]]  # close_choices' list: (keys, labels) a shape


@dataclass(frozen=True)
class ShapeTrial:
    """One GEMM shape tried in the step: ``shape`` ``(rows, n, k, ab_type, c_type)`` (and 1 for the gate/up GEMM
    with its SiLU, ``Dense.gate_up_silu``); ``before``: the launch each of
    its keys took by timing alone (the Dense's labels: -1 the GEMV, -2 cuBLASLt or the quantized path, 0, 1, ... a
    skinny GEMM plan); ``tried``: each other launch tried, with its graph's step time in ms; ``kept``: the launches
    the step keeps."""

    shape: tuple[int, ...]
    before: tuple[int, ...]
    tried: tuple[tuple[int, float], ...]
    kept: tuple[int, ...]


@dataclass(frozen=True)
class PairTrial:
    """Two consecutive GEMM shapes tried together (:data:`TUNE_PAIRS`): ``shapes`` as :class:`ShapeTrial` names
    them; ``tried``: each pair of launches tried (a launch a shape, set for all its keys) with its graph's step time
    in ms; ``kept``: the pair the step keeps after them."""

    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    tried: tuple[tuple[int, int, float], ...]
    kept: tuple[int, int]


@dataclass(frozen=True)
class StepTuning:
    """What :func:`tuned_step` did for one decode graph: its step time in ms as first captured (``start_ms``) and as
    kept (``kept_ms``), each shape tried (``shapes``; their ``kept``: what the step keeps after the pairs too) and
    each pair of shapes tried together (``pairs``)."""

    start_ms: float
    kept_ms: float
    shapes: tuple[ShapeTrial, ...]
    pairs: tuple[PairTrial, ...] = ()


def step_ms(graph: Any, stream: Any, cupy: Any) -> float:
    """The step time of ``graph`` in ms: 2 replays to warm, then the best of :data:`TUNE_ROUNDS` rounds of
    :data:`TUNE_REPLAYS` replays on ``stream`` (a CuPy stream, the graph's), by events."""
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    graph.launch()
    graph.launch()
    best = math.inf
    for _ in range(TUNE_ROUNDS):
        start.record(stream)
        for _ in range(TUNE_REPLAYS):
            graph.launch()
        end.record(stream)
        end.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, end) / TUNE_REPLAYS)
    return best


def shapes_words(shapes: Shapes) -> list[int]:
    """``shapes`` (``close_choices``' list) as at most :data:`TUNE_WORDS` ints: their count, then for each shape the
    count and length of its keys, the keys' values, the count of its launches and their labels; ``[0]`` (no shape)
    where they need more words."""
    words = [len(shapes)]
    for keys, labels in shapes:
        width = len(keys[0]) if keys else 0
        if any(len(key) != width for key in keys):
            return [0]
        words += [len(keys), width, *(value for key in keys for value in key), len(labels), *labels]
    return words if len(words) <= TUNE_WORDS else [0]


def shapes_from_words(words: Any) -> Shapes:
    """The shapes :func:`shapes_words` wrote into ``words`` (a sequence of ints, longer is fine); ValueError where
    they are not such a list."""
    values = [int(w) for w in words]
    bad = "words: not a list of shapes written by shapes_words"
    at = 0

    def take(n: int) -> list[int]:
        nonlocal at
        if n < 0 or at + n > len(values):
            raise ValueError(bad)
        at += n
        return values[at - n : at]

    def count() -> int:
        (n,) = take(1)
        if n < 0:
            raise ValueError(bad)
        return n

    shapes: Shapes = []
    for _ in range(count()):
        n_keys, width = count(), count()
        if n_keys and not width:  # (keys of no value would take no words: a count no buffer bounds)
            raise ValueError(bad)
        keys = tuple(tuple(take(width)) for _ in range(n_keys))
        labels = tuple(take(count()))
        shapes.append((keys, labels))
    return shapes


def tuned_step(
    dense: Any,
    rows: int,
    graph: Any,
    capture: Callable[[], Any],
    keep: Callable[[Any], None],
    timed: Callable[[Any], float],
    lockstep: Callable[[Shapes], Shapes] | None = None,
) -> StepTuning | None:
    """Try the decode graph ``graph`` of ``rows`` rows with each close launch of its GEMM shapes (``dense``'s
    ``close_choices``) and keep the fastest: ``capture()`` captures the step again with the Dense's current
    choices (a new graph), ``keep(graph)`` hands over the graph kept so far (the caller holds it: it closes it on a
    failure), ``timed(graph)`` times one (:func:`step_ms`). A trial not kept is closed, a kept graph's predecessor
    too, and the Dense left with the kept graph's choices. None where no shape has a close launch.

    ``lockstep`` (tensor parallelism): given this rank's shapes, returns the list every rank tries (rank 0's, where
    each rank has timed its launches; else none); every launch of it is then tried, and ``timed`` must return the
    slowest rank's step time, so that every rank captures, replays and keeps the same trials."""
    shapes = [
        (keys, labels)
        for keys, labels in dense.close_choices(rows, TUNE_WITHIN, TUNE_MOST)
        if TUNE_QUANTIZED or not any(key[5] for key in keys)  # (a key's last value: its quantized weight, or 0)
    ]
    if lockstep is not None:
        shapes = lockstep(shapes)
    if not shapes:
        return None
    start_ms = timed(graph)
    best = [graph, start_ms]  # the graph kept so far and its step time

    def trial(keys: tuple[tuple[int, ...], ...], choices: tuple[int, ...]) -> float:
        """The step's time with ``choices`` for ``keys`` (the rest as kept), its graph kept where it is faster."""
        kept = dense.choices(keys)
        dense.set_choices(keys, choices)
        new = capture()
        try:
            ms = timed(new)
        except BaseException:
            new.close()
            dense.set_choices(keys, kept)
            raise
        if ms < best[1] * (1 - TUNE_GAIN):
            keep(new)
            best[0].close()
            best[:] = [new, ms]
            return ms
        new.close()
        dense.set_choices(keys, kept)
        return ms

    done = []
    for keys, labels in shapes:
        before = dense.choices(keys)
        tried = []
        for label in labels:
            choices = (label,) * len(keys)
            if choices == dense.choices(keys) and lockstep is None:  # (in lockstep another rank may not have it)
                continue
            tried.append((label, trial(keys, choices)))
        done.append((keys, before, tuple(tried)))
    pairs = []
    for (keys_a, labels_a), (keys_b, labels_b) in itertools.pairwise(shapes) if TUNE_PAIRS else ():
        both = keys_a + keys_b
        tried_pairs = []
        for a in labels_a:
            for b in labels_b:
                choices = (a,) * len(keys_a) + (b,) * len(keys_b)
                kept = dense.choices(both)
                # (a pair that changes one shape only was tried above; in lock step every pair is tried, since the
                # ranks may keep different launches where no trial of a shape was kept)
                if lockstep is None and (choices[0] == kept[0] or choices[-1] == kept[-1]):
                    continue
                tried_pairs.append((a, b, trial(both, choices)))
        final = dense.choices(both)
        pairs.append(PairTrial((_shape(keys_a), _shape(keys_b)), tuple(tried_pairs), (final[0], final[-1])))
    trials = tuple(ShapeTrial(_shape(keys), before, tried, dense.choices(keys)) for keys, before, tried in done)
    return StepTuning(start_ms, best[1], trials, tuple(pairs))


def _shape(keys: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """A shape's name in :class:`ShapeTrial`: its keys' values but the quantized weight's address."""
    return (*keys[0][:5], *keys[0][6:])
