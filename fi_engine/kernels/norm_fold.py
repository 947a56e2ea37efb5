"""The RMSNorm between two GEMVs of a quantized decode step, folded into them so that it has no launch of its own
(``csrc/norm_fold.cuh``): the arguments of its two sides, checked.

Between the o and gate/up GEMVs (and between the down GEMV and the next layer's QKV GEMV) a decode step runs
FlashInfer's ``fused_add_rmsnorm``: ``s = y + h`` (``y`` the first GEMV's output, ``h`` the residual), the new
residual ``round(s)``, and the second GEMV's input ``round(s * f * nw)`` with ``f = rsqrt(mean(s^2) + eps)`` per
row. Folded, the norm's launch goes away:

- the first GEMV (:class:`FoldOut`) stores, with its output ``y``, the new residual ``h_out = round(s)`` and
  ``xn = round(s * nw)``: the second GEMV's input short of the row's factor, which needs the whole row;
- the second GEMV (:class:`FoldIn`) reads ``xn`` as its input and multiplies each sum by its row's ``f`` before it
  rounds it. One block of its grid (one block more than the GEMV's) computes the factors from ``h`` and ``y`` as
  FlashInfer does while the others stream their weights, and publishes them in ``rs`` with a count in ``sync``; a
  block that reaches its outputs before the count says so computes them itself, the same way, so no block waits on
  another and the result does not depend on which did.

The decode step folds its norms so only where ``QuantizedWeights.norm_in_gemv`` is set: off by default, since on an
H100 it did not pay (FP8 3 % slower at one row, int4 even; benchmarks/RESULTS.md). The result differs from the
separate launches' only in where the input is rounded (``s * nw`` rounded, then times
``f`` in float32): one rounding of the same size as FlashInfer's. ``sync`` is a pair of uint64 counters that only
grow (each launch's blocks draw a ticket from the first; the second counts the launches whose factors are
published), so nothing resets them between steps or CUDA graph replays; a pair belongs to one call site, whose grid
never changes (:class:`FoldCounters` refuses a second grid). Both sides take 7 kernel arguments after their GEMV's
(:func:`fold_ints`), in the order of ``NORM_FOLD_PARAMS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..values import float32_bits
from .launch import U64, int_arg

__all__ = ["FoldCounters", "FoldIn", "FoldOut", "fold_ints"]

FOLD_ROWS = 8  # the rows a folded launch serves at most (the factors' shared array in norm_fold.cuh: R)


@dataclass(frozen=True)
class FoldOut:
    """The first GEMV's side: ``h`` the residual ``[rows, n]`` before the add, ``nw`` the norm's weight ``[n]``,
    ``h_out`` where the new residual goes and ``xn`` where the second GEMV's input goes (both ``[rows, n]``; ``h``,
    ``h_out`` and ``xn`` have the GEMV output's row stride). 16-bit, of the GEMV's type; addresses as ints."""

    h: int
    nw: int
    h_out: int
    xn: int


@dataclass(frozen=True)
class FoldIn:
    """The second GEMV's side: ``h`` the residual before the add and ``y`` the first GEMV's output (16-bit ``[rows,
    k]``, with the GEMV input's row stride), ``sync`` its call site's two uint64 counters, ``rs`` the rows' float32
    factors ``[rows]``, ``eps`` the norm's epsilon. Addresses as ints."""

    h: int
    y: int
    sync: int
    rs: int
    eps: float


def fold_ints(fold: object) -> list[int]:
    """The 7 kernel arguments of a :class:`FoldOut` or :class:`FoldIn` (``h, v, h_out, xn, sync, rs, eps``'s float32
    bits; ``v`` is ``nw`` or ``y``, the other side's fields 0), checked: TypeError naming ``fold`` that is neither,
    ValueError/TypeError naming the field (``fold.<field>``) that is no int, NULL or misaligned (16-bit rows: 2 bytes,
    read whole by the factors' block: 16; ``sync`` 8; ``rs`` 4), ``h_out`` the same as ``h`` (the second GEMV's block
    reads the residual before the add), or an ``eps`` that is not a finite float32."""
    if isinstance(fold, FoldOut):
        fields = (("h", fold.h, 2), ("nw", fold.nw, 2), ("h_out", fold.h_out, 2), ("xn", fold.xn, 2))
    elif isinstance(fold, FoldIn):
        fields = (("h", fold.h, 16), ("y", fold.y, 16), ("sync", fold.sync, 8), ("rs", fold.rs, 4))
    else:
        raise TypeError(f"fold: expected a FoldOut or a FoldIn, got {type(fold).__name__}")
    ints = []
    for name, value, align in fields:
        value = int_arg(f"fold.{name}", value, 0, U64)
        if not value or value % align:
            raise ValueError(f"fold.{name}: 0x{value:x} must be a non-NULL device address aligned to {align} bytes")
        ints.append(value)
    if isinstance(fold, FoldOut):
        if fold.h_out == fold.h:
            raise ValueError(
                "fold.h_out: the new residual must go to another buffer than h (the second GEMV reads h before the "
                "add); alternate two residual buffers"
            )
        return [*ints, 0, 0, 0]
    eps = fold.eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"fold.eps: expected a float, got {type(eps).__name__}")
    try:
        eps_value = float(eps)
    except OverflowError:  # an int past float's range
        eps_value = math.nan
    h, y, sync, rs = ints
    return [h, y, 0, 0, sync, rs, float32_bits("fold.eps", eps_value)]


class FoldCounters:
    """The grid each pair of fold counters (:attr:`FoldIn.sync`) serves: a launch's number is its ticket over its
    grid, so one pair must never count two grid sizes. :meth:`check` records a pair's grid at its first launch and
    refuses another."""

    def __init__(self) -> None:
        self._grids: dict[int, int] = {}  # sync address -> the blocks of its launches

    def check(self, sync: int, grid: int) -> None:
        """Record ``grid`` for the counters at ``sync``, else ValueError where they serve another grid."""
        known = self._grids.setdefault(sync, grid)
        if known != grid:
            raise ValueError(
                f"fold.sync: 0x{sync:x} counts the launches of a {known}-block grid; this call's has {grid}: give "
                f"each call site its own counter pair"
            )
