"""A step's adapter arrays, written on the host with numpy: each token row's GPU slot (:func:`row_slots`; -1 for a
row of the base model or a padding row), which the kernels read on the device, and the segments of rows sharing a
slot (:func:`segments`: a grouped GEMM's ``indptr`` and slot ids; the rows of one request are contiguous in a
prefill, so each request is one segment at least), and whether any row takes an adapter at all
(:func:`takes_adapters`: a step with none runs the base model's path, without the adapters' launches)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..values import show

__all__ = ["NO_ADAPTER", "row_slots", "segments", "takes_adapters"]

NO_ADAPTER = -1
"""The slot of a row that takes no adapter (the kernels leave it untouched)."""


def _int_list(name: str, value: object, lo: int) -> np.ndarray:
    """``value`` (a list or 1-D numpy array of ints in ``[lo, 2**31)``: slots, or row counts) as an int array, else
    TypeError/ValueError naming ``name``."""
    if isinstance(value, np.ndarray):
        a = value
    elif isinstance(value, (list, tuple)) and all(
        isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in value
    ):
        a = np.array([int(x) if -(1 << 62) < x < 1 << 62 else 1 << 62 for x in value], np.int64)  # (huge: refused)
    else:
        raise TypeError(f"{name}: expected a list or 1-D numpy array of ints, got {show(value)}")
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise TypeError(f"{name}: expected a 1-D array of ints, got shape {a.shape} of {a.dtype}")
    if len(a) and not (a.min() >= lo and a.max() < 1 << 31):
        raise ValueError(f"{name}: expected ints in [{lo}, 2**31), got {show(a.tolist())}")
    return a


def row_slots(
    request_slots: Sequence[int] | np.ndarray, rows_per_request: Sequence[int] | np.ndarray | None, out: np.ndarray
) -> int:
    """Write each token row's slot into ``out`` (a 1-D int32 array): request ``b``'s slot ``request_slots[b]``
    (:data:`NO_ADAPTER`, or a slot >= 0) repeated over its ``rows_per_request[b]`` rows (None: one row each, a decode
    step). Returns the rows written; TypeError/ValueError naming the argument where one is no list of ints, the
    lists differ in length or ``out`` is too short (nothing is written then)."""
    if not isinstance(out, np.ndarray) or out.dtype != np.int32 or out.ndim != 1:
        raise TypeError(f"out: expected a 1-D int32 numpy array (the step's lora_slots view), got {show(out)}")
    slots = _int_list("request_slots", request_slots, NO_ADAPTER)
    if rows_per_request is None:
        counts = np.ones(len(slots), np.int64)
    else:
        counts = _int_list("rows_per_request", rows_per_request, 0)
        if len(counts) != len(slots):
            raise ValueError(f"rows_per_request: {len(counts)} counts for {len(slots)} requests")
    n = int(counts.sum(dtype=np.int64))  # checked before the rows are made (a huge count would allocate them)
    if n > len(out):
        raise ValueError(f"out: {len(out)} entries cannot hold {n} rows")
    out[:n] = np.repeat(slots, counts)
    return n


def segments(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs of equal slots in ``slots`` (one per row, a list or 1-D numpy array of ints): ``(indptr [S + 1],
    slot_ids [S])`` (int32), segment ``i`` being rows ``indptr[i]:indptr[i + 1]`` of slot ``slot_ids[i]``
    (:data:`NO_ADAPTER` for a run of rows that take none, which a grouped GEMM skips). The segments cover every
    row in order; for a grouped GEMM (``fi_ffi.segment_gemm``) over the rows of one adapter at a time.
    TypeError/ValueError naming ``slots`` for anything but one slot (>= -1) per row."""
    s = _int_list("slots", slots, NO_ADAPTER)
    if not len(s):
        return np.zeros(1, np.int32), np.zeros(0, np.int32)
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
    indptr = np.concatenate([starts, [len(s)]]).astype(np.int32)
    return indptr, s[starts].astype(np.int32)


def takes_adapters(slots: np.ndarray) -> bool:
    """Whether any row of ``slots`` (a step's row slots as :func:`row_slots` wrote them: a 1-D int numpy array)
    takes an adapter: a slot other than :data:`NO_ADAPTER`. A step where none does runs the base model's path (the
    model runner's ``step_lora``: no adapters' launches, the fused decode step where it fits). TypeError naming
    ``slots`` for anything but a 1-D int array."""
    if not isinstance(slots, np.ndarray) or slots.dtype.kind not in "iu" or slots.ndim != 1:
        raise TypeError(f"slots: expected a 1-D int numpy array (a step's row slots), got {show(slots)}")
    return bool((slots != NO_ADAPTER).any())
