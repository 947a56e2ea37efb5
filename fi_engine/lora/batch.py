"""A step's adapter arrays, written on the host with numpy: each token row's GPU slot (:func:`row_slots`; -1 for a
row of the base model or a padding row), which the kernels read on the device, and the segments of rows sharing a
slot (:func:`segments`: a grouped GEMM's ``indptr`` and slot ids; the rows of one request are contiguous in a
prefill, so each request is one segment at least)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["NO_ADAPTER", "row_slots", "segments"]

NO_ADAPTER = -1
"""The slot of a row that takes no adapter (the kernels leave it untouched)."""


def row_slots(
    request_slots: Sequence[int], rows_per_request: Sequence[int] | np.ndarray | None, out: np.ndarray
) -> int:
    """Write each token row's slot into ``out`` (int32): request ``b``'s slot ``request_slots[b]`` repeated over its
    ``rows_per_request[b]`` rows (None: one row each, a decode step). Returns the rows written; ValueError where
    the lists differ in length or ``out`` is too short."""
    slots = np.asarray(request_slots, np.int32)
    if rows_per_request is None:
        n = len(slots)
        rows = slots
    else:
        counts = np.asarray(rows_per_request, np.int64)
        if counts.shape != slots.shape:
            raise ValueError(f"rows_per_request: {len(counts)} counts for {len(slots)} requests")
        if (counts < 0).any():
            raise ValueError("rows_per_request: expected counts >= 0")
        rows = np.repeat(slots, counts)
        n = len(rows)
    if n > len(out):
        raise ValueError(f"out: {len(out)} entries cannot hold {n} rows")
    out[:n] = rows
    return n


def segments(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs of equal slots in ``slots`` (one per row): ``(indptr [S + 1], slot_ids [S])`` (int32), segment ``i``
    being rows ``indptr[i]:indptr[i + 1]`` of slot ``slot_ids[i]`` (:data:`NO_ADAPTER` for a run of rows that take
    none, which a grouped GEMM skips). The segments cover every row in order; for a grouped GEMM
    (``fi_ffi.segment_gemm``) over the rows of one adapter at a time. ValueError for anything but one slot per row."""
    s = np.asarray(slots)
    if s.ndim != 1 or s.dtype.kind not in "iu":
        raise ValueError(f"slots: expected one int slot per row (1-D), got shape {s.shape} of {s.dtype}")
    if not len(s):
        return np.zeros(1, np.int32), np.zeros(0, np.int32)
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
    indptr = np.concatenate([starts, [len(s)]]).astype(np.int32)
    return indptr, s[starts].astype(np.int32)
