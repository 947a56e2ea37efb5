"""Bit packing of boolean masks (``packbits``, ``segment_packbits``): the ``quantization`` module.

Packs 8 booleans per byte, like ``numpy.packbits``: with ``bitorder="big"`` the first of 8 elements is the
most significant bit of its byte, with ``"little"`` the least. A last partial byte is padded with zero bits.
Attention custom masks are packed this way (``bitorder="little"``).

- ``packbits(x)``: ``x`` (contiguous, any shape, read as flat) into ``out[(x.numel + 7) // 8]``.
- ``segment_packbits(x, indptr)``: each segment ``x[indptr[i]:indptr[i+1]]`` packed on its own into
  ``out[output_indptr[i]:output_indptr[i+1]]``, where the caller supplies ``output_indptr`` with
  ``output_indptr[0] = 0`` and ``output_indptr[i+1] - output_indptr[i] = (indptr[i+1] - indptr[i] + 7) // 8``
  (:func:`segment_packbits_indptr` computes it on the host). fi_ffi allocates nothing and reads no device
  values, so ``out``'s length (``output_indptr[-1]``) and the index values are the caller's to get right.

Contract (checked before the kernel): ``x`` bool (1 byte per element; uint8 0/1 arrays can be viewed as bool),
contiguous, non-empty; ``out`` uint8 1-D contiguous; index arrays int32 1-D contiguous with ``batch_size >= 1``;
``bitorder`` ``"big"`` or ``"little"``; one device.

FlashInfer's ``segment_packbits`` binding (0.6.3 and 0.7.2) ignores the kernel launch status: a failed launch is
not reported by the call (it surfaces, if at all, at the next synchronizing CUDA call).

All calls are asynchronous on ``stream`` (see :mod:`fi_ffi.tensor.streams`) and never synchronize.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Literal

import numpy as np

from ..abi.wire import STRING, declare, tensor, tensors
from ..dtypes import bool_, int32, uint8
from ..launch import checks
from ..launch.launcher import launcher
from ..launch.pointer_rules import PointerRules
from ..launch.registry import op
from ..tensor.protocols import StreamLike, TensorLike, TensorT

_URI = "quantization"
_BITORDERS = ("big", "little")
BitOrder = Literal["big", "little"]  # _BITORDERS, as a type

# Wire order as in FlashInfer's csrc/flashinfer_quantization_binding.cu; the packed output (``y`` there) is
# ``out`` here, the input indptr ``indptr`` (flashinfer-python's public names).
PACKBITS = declare("packbits", [tensor("x"), ("bitorder", STRING), tensor("out", output=True)])
SEGMENT_PACKBITS = declare(
    "segment_packbits",
    [
        *tensors("x", "indptr", "output_indptr"),
        ("bitorder", STRING),
        tensor("out", output=True),
    ],
)
DECLARATIONS = tuple((_URI, d) for d in (PACKBITS, SEGMENT_PACKBITS))


def _check_x(a: SimpleNamespace) -> None:
    x = a.x
    checks.dtype_in("x", x, (bool_,))
    checks.cuda("x", x)
    checks.contiguous("x", x)
    if x.numel == 0:
        raise ValueError(f"x: expected at least one element, got shape {x.shape}")
    if a.bitorder not in _BITORDERS:
        raise ValueError(f"bitorder: expected 'big' or 'little', got {a.bitorder!r}")


def _check_out(a: SimpleNamespace, length: int | None) -> None:
    out = a.out
    checks.ndim("out", out, 1, "[packed bytes]")
    if length is not None:
        checks.shape("out", out, (length,), "[(x.numel + 7) // 8]")
    checks.dtype_in("out", out, (uint8,))
    checks.same_device("out", out, "x", a.x)
    checks.cuda("out", out)
    checks.contiguous("out", out)


def _check_packbits(a: SimpleNamespace) -> PointerRules:
    _check_x(a)
    _check_out(a, (a.x.numel + 7) // 8)
    return PointerRules().disjoint("out", "x")


def _check_segments(a: SimpleNamespace) -> PointerRules:
    _check_x(a)
    checks.ndim("x", a.x, 1, "[indptr[-1]]")
    for name in ("indptr", "output_indptr"):
        t = getattr(a, name)
        checks.ndim(name, t, 1, "[batch_size + 1]")
        if t.shape[0] < 2:
            raise ValueError(f"{name}: expected [batch_size + 1] with batch_size >= 1, got shape {t.shape}")
        checks.dtype_in(name, t, (int32,))  # the kernel reads both as int32
        checks.same_device(name, t, "x", a.x)
        checks.cuda(name, t)
        checks.contiguous(name, t)
    checks.shape("output_indptr", a.output_indptr, a.indptr.shape, "[batch_size + 1], like indptr")
    _check_out(a, None)
    return PointerRules().disjoint("out", "x").disjoint("out", "indptr").disjoint("out", "output_indptr")


_packbits = launcher(PACKBITS, _URI, _check_packbits)
_segment_packbits = launcher(SEGMENT_PACKBITS, _URI, _check_segments)


@op(launch=_packbits, flashinfer="flashinfer.quantization.packbits")
def packbits(
    x: TensorLike, bitorder: BitOrder = "big", *, out: TensorT | None = None, stream: StreamLike = None
) -> TensorT:
    """Pack the booleans of ``x`` (read flat) 8 per byte.

    Args:
        x: bool, contiguous, at least one element, on a CUDA device.
        bitorder: ``"big"`` (first element in the most significant bit) or ``"little"``.
        out: uint8 ``[(x.numel + 7) // 8]``, contiguous (required).
        stream: where the kernel runs (None: the framework's current stream of ``x``).

    Returns:
        ``out``, as passed.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed (``x``
            bool, ``out`` uint8), ``out`` missing.
        ValueError: ``x`` empty, ``bitorder`` not ``"big"`` / ``"little"``, ``out`` not ``[(x.numel + 7) // 8]``, a
            tensor not contiguous or not on ``x``'s CUDA device.
    """
    if out is None:
        raise TypeError(
            "out: required (fi_ffi never allocates device memory); pass a uint8 tensor [(x.numel + 7) // 8]"
        )
    _packbits(x, bitorder, out, stream=stream)
    return out


@op(launch=_segment_packbits, flashinfer="flashinfer.quantization.segment_packbits")
def segment_packbits(
    x: TensorLike,
    indptr: TensorLike,
    bitorder: BitOrder = "big",
    *,
    output_indptr: TensorT | None = None,
    out: TensorT | None = None,
    stream: StreamLike = None,
) -> tuple[TensorT, TensorT]:
    """Pack each segment ``x[indptr[i]:indptr[i+1]]`` on its own (see the module docstring).

    Args:
        x: bool ``[indptr[-1]]`` (at least), contiguous.
        indptr: int32 ``[batch_size + 1]``, contiguous, non-decreasing from 0 (device values: not checked).
        bitorder: ``"big"`` or ``"little"``.
        output_indptr: int32 ``[batch_size + 1]`` with the packed segment offsets (required; see
            :func:`segment_packbits_indptr`).
        out: uint8 ``[output_indptr[-1]]`` (required).

    Returns:
        ``(out, output_indptr)``, as passed (flashinfer-python returns the same pair).

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed (``x``
            bool, index arrays int32, ``out`` uint8), ``out`` or ``output_indptr`` missing.
        ValueError: ``indptr`` not ``[batch_size + 1]`` with ``batch_size >= 1``, ``output_indptr`` not ``indptr``'s
            shape, ``bitorder`` unknown, ``out`` of the wrong length, a tensor not contiguous or not on ``x``'s CUDA
            device.
    """
    if output_indptr is None or out is None:
        missing = "output_indptr" if output_indptr is None else "out"
        raise TypeError(
            f"{missing}: required (fi_ffi never allocates device memory or reads device values); "
            f"compute output_indptr with fi_ffi.segment_packbits_indptr and allocate "
            f"out = uint8[output_indptr[-1]]"
        )
    _segment_packbits(x, indptr, output_indptr, bitorder, out, stream=stream)
    return out, output_indptr


@op()
def segment_packbits_indptr(indptr: Sequence[int]) -> list[int]:
    """On the host: the packed offsets for :func:`segment_packbits`, ``[0, ceil(len_0 / 8), ...]`` cumulated.

    Args:
        indptr: the segment boundaries: a list or tuple of ints or a 1-D numpy integer array, non-decreasing,
            ``[batch_size + 1]``, each in ``[0, 2**31)`` (the kernel's int32 offsets).

    Returns:
        ``output_indptr`` as a list; its last value is the length of ``out``.

    Raises:
        TypeError: ``indptr`` not a list, tuple or 1-D integer array of ints.
        ValueError: ``indptr`` empty or with offsets outside ``[0, 2**31)``.
    """
    if isinstance(indptr, np.ndarray) and indptr.ndim == 1 and indptr.dtype.kind in "iu":
        values = indptr.tolist()
    elif isinstance(indptr, (list, tuple)):
        values = [int(checks.integer("indptr", v)) for v in indptr]
    else:  # sets, bytes, strings and dicts iterate too, but are no boundaries
        what = f"a {indptr.ndim}-D {indptr.dtype} array" if isinstance(indptr, np.ndarray) else type(indptr).__name__
        raise TypeError(f"indptr: expected a list, tuple or 1-D numpy integer array of ints, got {what}")
    if not values:
        raise ValueError("indptr: expected at least one entry")
    if min(values) < 0 or max(values) >= 1 << 31:
        bad = next(v for v in values if not 0 <= v < 1 << 31)
        raise ValueError(f"indptr: expected offsets in [0, 2**31) (the kernel's int32), got {bad}")
    out = [0]
    for i, (start, end) in enumerate(itertools.pairwise(values)):
        if end < start:
            raise ValueError(f"indptr: must be non-decreasing, got indptr[{i}] = {start} > indptr[{i + 1}] = {end}")
        out.append(out[-1] + (end - start + 7) // 8)
    return out
