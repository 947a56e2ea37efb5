"""Radix top-k of ``topk.so``: the ``k`` largest entries of each row, and its two fused index transforms for
sparse attention (through a page table, or plus a ragged offset).

Every call is asynchronous on ``stream`` and never synchronizes. **fi_ffi never allocates device memory**:
the outputs and the ``row_states_buffer`` scratch are passed in by the caller. Inputs are ``[R, L]``
float32, float16 or bfloat16, contiguous; indices are int32. The ``k`` results of a row come in no
particular order (flashinfer-python's ``sorted=True`` sorts them afterwards with torch; sort them yourself).
Ties at the k-th value are broken arbitrarily.

``row_states_buffer``: a 1-D CUDA buffer of at least :data:`ROW_STATES_BYTES` (1 MiB, what flashinfer-python
allocates) bytes, zero-filled before its first use (the kernels leave it zeroed), used by the multi-CTA path
for long rows; one per stream (calls that may overlap must not share it).

Declared for the FlashInfer 0.6.3 ``topk`` module; 0.7's ``radix_topk*`` take more arguments (sorting, tie
break, ...) and a 0.7 module is refused by its signature when bound.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ..abi.wire import INT, declare, optional_tensor, tensor
from ..dtypes import bfloat16, float16, float32, int32
from ..launch import checks
from ..launch.launcher import launcher
from ..launch.pointer_rules import PointerRules
from ..launch.registry import op
from ..tensor.protocols import StreamLike, TensorLike, TensorT
from .sampling import ROW_STATE_ALIGNMENT, ROW_STATES_BYTES

_URI = "topk"
_FLOATS = (float32, float16, bfloat16)
_ROW_STATES = optional_tensor("row_states_buffer", output=True, default=None)

RADIX_TOPK = declare(
    "radix_topk",
    [tensor("input"), tensor("indices", output=True), tensor("values", output=True), _ROW_STATES, ("top_k", INT)],
    release="0.6.3",
)
PAGE_TABLE_TRANSFORM = declare(
    "radix_topk_page_table_transform",
    [
        tensor("input"),
        tensor("out", output=True),
        tensor("src_page_table"),
        optional_tensor("row_to_batch", default=None),
        tensor("lengths"),
        _ROW_STATES,
        ("top_k", INT),
    ],
    release="0.6.3",
)
RAGGED_TRANSFORM = declare(
    "radix_topk_ragged_transform",
    [tensor("input"), tensor("out", output=True), tensor("offsets"), tensor("lengths"), _ROW_STATES, ("top_k", INT)],
    release="0.6.3",
)
DECLARATIONS = tuple((_URI, d) for d in (RADIX_TOPK, PAGE_TABLE_TRANSFORM, RAGGED_TRANSFORM))

__all__ = ["ROW_STATES_BYTES"]  # public here, not ops of fi_ffi; the ops: @op below


def _on_input(name: str, t: Any, a: SimpleNamespace, dtypes: tuple[Any, ...] = (int32,)) -> None:
    checks.dtype_in(name, t, dtypes)
    checks.cuda(name, t)
    checks.same_device(name, t, "input", a.input)
    checks.contiguous(name, t)


def _rows_of(name: str, t: Any, n: int, a: SimpleNamespace) -> None:
    checks.ndim(name, t, 1, "[R]")
    checks.shape(name, t, (n,), "[R]")
    _on_input(name, t, a)


def _common(a: SimpleNamespace, out: str, k_at_most_len: bool) -> tuple[int, int]:
    """Layout checks shared by the three entry points; returns ``(R, L)``."""
    x = a.input
    checks.device_tensor("input", x, 2, "[R, L]", _FLOATS)
    rows, length = x.shape
    k = a.top_k
    if not 1 <= k < 1 << 31 or (k_at_most_len and k > length):
        bound = f"[1, {length}] (the row length)" if k_at_most_len else "[1, 2**31)"
        raise ValueError(f"k: expected an int in {bound}, got {k}")
    checks.ndim(out, getattr(a, out), 2, "[R, k]")
    checks.shape(out, getattr(a, out), (rows, k), "[R, k]")
    _on_input(out, getattr(a, out), a)
    states = a.row_states_buffer
    if states is None:
        raise TypeError("row_states_buffer: expected a tensor, got None (the multi-CTA path needs it)")
    checks.ndim("row_states_buffer", states, 1, "[bytes]")
    _on_input("row_states_buffer", states, a, (states.dtype,))
    if states.nbytes < ROW_STATES_BYTES:
        raise ValueError(
            f"row_states_buffer: needs at least {ROW_STATES_BYTES} bytes (ROW_STATES_BYTES), got {states.nbytes}"
        )
    return rows, length


def _rules(a: SimpleNamespace, outputs: tuple[str, ...], inputs: tuple[str, ...]) -> PointerRules:
    """The kernels load rows of ``input`` in vectors and keep 4-byte fields per row in ``row_states_buffer``;
    the outputs and the row states are written while other blocks read the inputs."""
    rules = PointerRules({"input": checks.row_vector_bytes(a.input), "row_states_buffer": ROW_STATE_ALIGNMENT})
    return rules.outputs_apart((*outputs, "row_states_buffer"), ("input", *inputs))


def _check_topk(a: SimpleNamespace) -> PointerRules:
    _common(a, "indices", True)
    checks.shape("values", a.values, a.indices.shape, "[R, k]")
    _on_input("values", a.values, a, (a.input.dtype,))
    return _rules(a, ("indices", "values"), ())


def _check_page_table(a: SimpleNamespace) -> PointerRules:
    rows, length = _common(a, "out", False)
    table = a.src_page_table
    checks.ndim("src_page_table", table, 2, "[batch, L]")
    _on_input("src_page_table", table, a)
    if table.shape[1] < length:
        raise ValueError(
            f"src_page_table: expected at least {length} columns (the input's row length), got shape {table.shape}"
        )
    if a.row_to_batch is None:
        if table.shape[0] < rows:
            raise ValueError(
                f"src_page_table: without row_to_batch, row r reads page-table row r: expected at "
                f"least {rows} rows, got shape {table.shape}"
            )
    else:
        _rows_of("row_to_batch", a.row_to_batch, rows, a)
    _rows_of("lengths", a.lengths, rows, a)
    return _rules(a, ("out",), ("src_page_table", "row_to_batch", "lengths"))


def _check_ragged(a: SimpleNamespace) -> PointerRules:
    rows, _ = _common(a, "out", False)
    _rows_of("offsets", a.offsets, rows, a)
    _rows_of("lengths", a.lengths, rows, a)
    return _rules(a, ("out",), ("offsets", "lengths"))


_radix_topk = launcher(RADIX_TOPK, _URI, _check_topk)
_page_table_transform = launcher(PAGE_TABLE_TRANSFORM, _URI, _check_page_table)
_ragged_transform = launcher(RAGGED_TRANSFORM, _URI, _check_ragged)


@op(launch=_radix_topk, flashinfer="flashinfer.topk.top_k")
def top_k(
    input: TensorLike,
    k: int,
    *,
    values: TensorT,
    indices: TensorT,
    row_states_buffer: TensorLike,
    stream: StreamLike = None,
) -> tuple[TensorT, TensorT]:
    """The ``k`` largest entries of each row of ``input``: ``values[r]`` and their column ``indices[r]``
    (unordered).

    Args:
        input: ``[R, L]`` float32/float16/bfloat16.
        k: ``1 <= k <= L``.
        values: ``[R, k]``, ``input``'s dtype, written.
        indices: ``[R, k]`` int32, written (flashinfer-python returns int64 copies).
        row_states_buffer: scratch (module docstring).

    flashinfer's ``top_k(input, k, sorted=False)`` returns the two tensors (indices as int64) and sorts them
    on request; here the caller passes them and the order is the kernel's.

    Returns:
        ``(values, indices)``.

    Raises:
        TypeError: a dtype other than those listed, ``k`` not an int.
        ValueError: a rank or shape that does not fit the others, ``k`` outside ``[1, L]`` (``top_k``) or < 1,
            a tensor not on ``input``'s CUDA device or not contiguous, a ``row_states_buffer`` too small.
    """
    # the launches take the required values in wire order, the optional ones by name
    _radix_topk(input, indices, values, _k(k), row_states_buffer=row_states_buffer, stream=stream)
    return values, indices


@op(launch=_page_table_transform, flashinfer="flashinfer.topk.top_k_page_table_transform")
def top_k_page_table_transform(
    input: TensorLike,
    src_page_table: TensorLike,
    lengths: TensorLike,
    k: int,
    row_to_batch: TensorLike | None = None,
    *,
    out: TensorT,
    row_states_buffer: TensorLike,
    stream: StreamLike = None,
) -> TensorT:
    """Top-k of each row's first ``lengths[r]`` scores, mapped through a page table:
    ``out[r, j] = src_page_table[row_to_batch[r] (or r), topk_index[r, j]]``; -1 past ``lengths[r]`` (when
    ``lengths[r] <= k`` the row is ``src_page_table[., :lengths[r]]`` then -1s).

    Args:
        input: ``[R, L]`` scores, float32/float16/bfloat16.
        src_page_table: ``[batch, >= L]`` int32.
        lengths: ``[R]`` int32, each ``<= L``.
        k: an int >= 1.
        out: ``[R, k]`` int32, written.
        row_states_buffer: scratch (module docstring).
        row_to_batch: optional ``[R]`` int32, the page-table row of each score row (default: ``r``).

    Returns:
        ``out``.

    Raises:
        TypeError, ValueError: as :func:`top_k`.
    """
    _page_table_transform(
        input,
        out,
        src_page_table,
        lengths,
        _k(k),
        row_to_batch=row_to_batch,
        row_states_buffer=row_states_buffer,
        stream=stream,
    )
    return out


@op(launch=_ragged_transform, flashinfer="flashinfer.topk.top_k_ragged_transform")
def top_k_ragged_transform(
    input: TensorLike,
    offsets: TensorLike,
    lengths: TensorLike,
    k: int,
    *,
    out: TensorT,
    row_states_buffer: TensorLike,
    stream: StreamLike = None,
) -> TensorT:
    """Top-k of each row's first ``lengths[r]`` scores plus a per-row offset:
    ``out[r, j] = topk_index[r, j] + offsets[r]``; -1 past ``lengths[r]``.

    Args:
        input: ``[R, L]`` scores, float32/float16/bfloat16.
        offsets: ``[R]`` int32.
        lengths: ``[R]`` int32, each ``<= L``.
        k: an int >= 1.
        out: ``[R, k]`` int32, written.
        row_states_buffer: scratch (module docstring).

    Returns:
        ``out``.

    Raises:
        TypeError, ValueError: as :func:`top_k`.
    """
    _ragged_transform(input, out, offsets, lengths, _k(k), row_states_buffer=row_states_buffer, stream=stream)
    return out


def _k(k: Any) -> int:
    """``k`` as an int, named ``k`` (the wire calls it ``top_k``); the launch's check bounds it by the rows."""
    if k.__class__ is not int:
        k = checks.integer("k", k)
    if not -(1 << 63) <= k < 1 << 63:  # past the wire's int64, which would name top_k
        raise ValueError(f"k: expected an int in [1, 2**31), got {k}")
    return k
