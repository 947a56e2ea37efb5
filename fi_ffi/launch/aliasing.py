"""Whether an output may share memory with an input: the aliasing rules of element-wise kernels.

Kernels such as RoPE, the activations and the cascade merge read each element and write its result from the
same thread, so an output may *be* its input (same address, same strides: the in-place form), or be memory
of its own. Any other overlap (an output that starts a few elements into its input, or rows interleaved with
another tensor's) makes threads read what other threads already wrote, and the result depends on scheduling.

The test works on byte ranges of each tensor, refined row by row for views of one buffer with a common row
stride (q and k of a fused QKV tensor do not overlap): conservative otherwise, and cheap. The geometry depends on
layouts only, so the launcher computes it once per layout combination and tests each call's pointers against it
(:mod:`fi_ffi.launch.pointer_rules`); the raising functions below give the slow path its messages.
"""

from __future__ import annotations

from ..tensor.descriptor import Tensor


def footprint(t: Tensor) -> tuple[int, int]:
    """``(first, end)``: the bytes ``t`` may touch, as offsets from its data pointer, ``end`` exclusive
    (``(0, 0)`` for an empty tensor). Depends on the layout only."""
    if 0 in t.shape:
        return 0, 0
    low = high = 0
    for size, stride in zip(t.shape, t.strides, strict=True):
        if stride >= 0:
            high += (size - 1) * stride
        else:
            low += (size - 1) * stride
    item = t.dtype.itemsize
    return low * item, (high + 1) * item


def byte_range(t: Tensor) -> tuple[int, int]:
    """``(first, end)``: the addresses ``t`` may touch, ``end`` exclusive (``(p, p)`` for an empty tensor)."""
    first, end = footprint(t)
    return t.data_ptr + first, t.data_ptr + end


def overlaps(a: Tensor, b: Tensor) -> bool:
    """True if ``a`` and ``b`` may share a byte.

    Exact at the granularity of rows for the common case of two views into one buffer with the same row
    stride (q and k slices of a fused QKV tensor): each row's footprint is treated as one interval, and the
    rows of ``a`` and ``b`` are compared modulo the row stride. Otherwise the whole byte ranges are compared.
    """
    a0, a1 = byte_range(a)
    b0, b1 = byte_range(b)
    if not (a0 < b1 and b0 < a1):
        return False
    rows = row_geometry(a, b)
    return rows is None or rows_overlap(rows, b0 - a0)


def row_geometry(a: Tensor, b: Tensor) -> tuple[int, int, int, int, int] | None:
    """``(row stride, rows of a, row width of a, rows of b, row width of b)`` in bytes, when both tensors are
    rows of one positive byte stride whose footprints fit in a row; else None. Depends on the layouts only."""
    if a.ndim < 2 or b.ndim < 2:
        return None
    stride = a.strides[0] * a.dtype.itemsize
    if stride <= 0 or stride != b.strides[0] * b.dtype.itemsize:
        return None
    widths = []
    for t in (a, b):
        if any(s < 0 for s in t.strides):
            return None
        width = (sum((size - 1) * s for size, s in zip(t.shape[1:], t.strides[1:], strict=True)) + 1) * t.dtype.itemsize
        if width > stride:
            return None
        widths.append(width)
    return stride, a.shape[0], widths[0], b.shape[0], widths[1]


def rows_overlap(rows: tuple[int, int, int, int, int], delta: int) -> bool:
    """Whether two row sets of :func:`row_geometry` whose first rows start ``delta`` bytes apart (b after a)
    share a byte."""
    stride, na, wa, nb, wb = rows
    # a byte is shared iff some m = (row of a) - (row of b) has delta - wa < m * stride < delta + wb
    low = max((delta - wa) // stride + 1, -(nb - 1))
    high = min(-((-(delta + wb)) // stride) - 1, na - 1)
    return low <= high


def same_or_disjoint(out_name: str, out: Tensor, in_name: str, inp: Tensor) -> None:
    """``out`` is exactly ``inp`` (in place: same address, shape and strides) or shares no byte with it.

    Raises:
        ValueError: naming both, otherwise.
    """
    if (
        out.data_ptr == inp.data_ptr
        and out.shape == inp.shape
        and out.strides == inp.strides
        and out.dtype == inp.dtype
    ):
        return
    if overlaps(out, inp):
        raise ValueError(
            f"{out_name}: overlaps {in_name} without being the same tensor (address 0x{out.data_ptr:x}"
            f" strides {out.strides} vs 0x{inp.data_ptr:x} strides {inp.strides}); pass {in_name} "
            f"itself for an in-place call, or memory of its own"
        )


def disjoint(out_name: str, out: Tensor, other_name: str, other: Tensor) -> None:
    """``out`` shares no byte with ``other`` (an output that must not alias even in place).

    Raises:
        ValueError: naming both, otherwise.
    """
    if overlaps(out, other):
        raise ValueError(
            f"{out_name}: overlaps {other_name}; the kernel reads {other_name} while it writes "
            f"{out_name}, so they must not share memory"
        )


__all__ = ["byte_range", "disjoint", "footprint", "overlaps", "row_geometry", "rows_overlap", "same_or_disjoint"]
