"""The shapes the model runner's CUDA graphs are captured at: the decode step at each batch size of a ladder
(:func:`decode_batches`), a prefill padded up to a token-row bucket (:func:`prefill_buckets`, :func:`bucket_for`) and
to a number of request slots (:func:`prefill_slots`). Values only: nothing here touches a GPU.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Sequence

import numpy as np

from ...values import MAX_SIZE, arg_int, integer, show

__all__ = ["bucket_for", "decode_batches", "prefill_buckets", "prefill_slots"]

# Bucketed prefill graphs (step_graphs.StepGraphs): a prefill's token rows are padded up to a bucket so every
# prompt length in a bucket replays one CUDA graph. Below _COARSE_UNTIL rows a prefill's GPU time barely depends
# on its rows (launch-bound kernels, GEMMs far from filling the GPU), so padding there is free and the ladder
# doubles (fewer graphs to capture); above it the GEMMs' time grows with the rows, so the ladder takes quarter
# octaves (x1.25, x1.2, x1.17, x1.14): at most 25 % padded rows, about 12 % on average, for 4 graphs per octave.
_MIN_BUCKET = 16
_COARSE_UNTIL = 256


def prefill_buckets(max_tokens: int) -> tuple[int, ...]:
    """The token-row buckets of padded prefill graphs, ascending, the last one ``max_tokens`` (the engine's
    buffer rows): 16, 32, 64, 128, 256 (doubling), then quarter octaves 320, 384, 448, 512, 640, 768, 896,
    1024, 1280, ... (see the comment above); a bucket above ``max_tokens`` becomes ``max_tokens``."""
    max_tokens = integer("max_tokens", max_tokens, 1)
    if max_tokens >= 1 << 31:
        bits = max_tokens.bit_length()
        raise ValueError(f"max_tokens: expected token rows below 2**31 (the kernels' int32), got {bits} bits")
    ladder: list[int] = []
    n = _MIN_BUCKET
    while n < max_tokens:
        ladder.append(n)
        if n < _COARSE_UNTIL:
            n *= 2
        else:
            octave = 1 << (n.bit_length() - 1)  # the power of two at or below n: steps of a quarter of it
            n += octave // 4
    ladder.append(max_tokens)
    return tuple(ladder)


def decode_batches(max_batch: int) -> tuple[int, ...]:
    """The batch sizes the decode step is captured at as CUDA graphs, ascending: the powers of two below
    ``max_batch``, then ``max_batch`` itself (1, 2, 4, 8, 16, 32, 48 for 48). A step replays the smallest graph
    holding every occupied slot (:meth:`Scheduler.graph_rows`), as vLLM and SGLang pad to their capture sizes:
    with one graph of ``max_batch`` rows, a server's step at low load ran ``max_batch`` rows (a one-row step of an
    8B model is the fused GEMV step, a 32-row one cuBLASLt's GEMMs and 32 rows of attention; a MoE step's padding
    rows route to experts of their own). Doubling keeps the padding at most half the rows, where a decode step's
    time barely depends on its rows, with one graph per octave to capture."""
    max_batch = arg_int("max_batch", max_batch, 1, MAX_SIZE)
    ladder = []
    n = 1
    while n < max_batch:
        ladder.append(n)
        n *= 2
    ladder.append(max_batch)
    return tuple(ladder)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket of ``buckets`` (ascending, from :func:`prefill_buckets`) holding ``rows`` token rows
    (``rows >= 1``). Raises ValueError when ``rows`` exceeds the largest bucket; TypeError/ValueError naming
    ``rows`` or ``buckets`` when one is no int or no non-empty ascending sequence of ints in ``[1, 2**31)``."""
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)):
        raise TypeError(f"rows: expected an int, got {type(rows).__name__}")
    if rows < 1:
        raise ValueError(f"rows: expected at least 1 token row, got {int(rows)}")
    ladder = _ladder("buckets", buckets, MAX_SIZE)
    i = bisect.bisect_left(ladder, rows)
    if i == len(ladder):
        raise ValueError(f"rows: {rows} token rows exceed the largest prefill bucket {ladder[-1]}")
    return ladder[i]


def _ladder(name: str, buckets: object, top: int) -> tuple[int, ...]:
    """``buckets`` as a tuple of ints if it is a non-empty, strictly ascending sequence of token-row counts in
    ``[1, top]``, else TypeError/ValueError naming ``name`` (a bucket past the buffer rows would pad a prefill
    past them)."""
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence) or not buckets:
        raise TypeError(f"{name}: expected a non-empty sequence of token-row counts, got {show(buckets)}")
    ladder = tuple(buckets)
    if set(map(type, ladder)) != {int}:  # (a few us a prefill) the slow path names the one that is no int
        ladder = tuple(arg_int(f"{name}[{i}]", b, 1, top) for i, b in enumerate(ladder))
    if ladder[0] < 1 or ladder[-1] > top or not all(map(operator.lt, ladder, ladder[1:])):
        raise ValueError(f"{name}: expected strictly ascending token-row counts in [1, {top}], got {show(ladder)}")
    return ladder


def prefill_slots(batch: int, max_batch: int) -> int:
    """The real-request slots of a padded prefill of ``batch`` requests (:func:`pad_prefill`): the next power of
    two above ``batch``, less one (1, 3, 7, 15, ...), at most ``max_batch``. A prefill graph serves any batch up to
    its slots, so a bucket has a few graphs instead of one per batch size: the first prefill of a new shape costs a
    capture (about 40 ms for a 135M model on an H100, where a replay takes 2-14), and a server's admissions come in
    every size."""
    batch = arg_int("batch", batch, 1, MAX_SIZE)
    max_batch = arg_int("max_batch", max_batch, 1, MAX_SIZE)
    if batch > max_batch:
        raise ValueError(f"batch: {batch} requests exceed max_batch {max_batch}")
    return min((1 << batch.bit_length()) - 1, max_batch)
