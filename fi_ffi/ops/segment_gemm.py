"""Grouped ("segment") GEMM: one GEMM per segment of rows, each with its own weight matrix (MoE experts, LoRA).

``segment_gemm`` is flashinfer-python's ``SegmentGEMMWrapper.run``: for segment ``i`` (rows
``seg_indptr[i]:seg_indptr[i+1]`` of ``x``) and its weight ``W = weights[weight_indices[i]]`` (or ``weights[i]``)::

    out[rows] = x[rows] @ W.T      weight_column_major=True   (weights [num_weights, d_out, d_in]: nn.Linear's)
    out[rows] = x[rows] @ W        weight_column_major=False  (weights [num_weights, d_in, d_out])

accumulated in float32. Modules: ``gemm_sm90`` (``cutlass_segment_gemm_sm90``: CUTLASS grouped GEMM for Hopper;
float16/bfloat16, and FP8 e4m3/e5m2 inputs with a float16/bfloat16 ``out`` and column-major weights) and
``gemm`` (``cutlass_segment_gemm``: the SM80 grouped GEMM, float16/bfloat16; the module needs cuBLAS, which
fi_ffi loads from the ``nvidia-cublas`` wheel or a CUDA toolkit). ``backend="auto"`` picks ``sm90`` on SM 9.x.
The generic module's epilogue **adds** to ``out`` (``out += x @ W``, as upstream's, whose own ``out`` is zeroed
when it allocates it): zero ``out`` first for a plain product.

Both kernels take per-segment argument arrays on the device (problem sizes, row pointers of x, W and out,
leading dimensions); flashinfer-python fills them with a Triton kernel. fi_ffi, with no JIT, computes them on the
host (:func:`segment_gemm_args`: the segment offsets, lengths and weight indices are therefore host int32 arrays
or lists of ints, not device tensors), writes them into the workspace's page-locked buffer and copies them into
its int buffer on the call's stream, with the workspace's plan-copy handshake (see
:mod:`.attention.workspace`): so a segment GEMM makes earlier attention plans of the same workspace stale. Give
the MoE layer a :class:`~fi_ffi.ops.attention.workspace.Workspace` of its own. The SM90 kernel also keeps its CUTLASS
scratch in the float buffer. Empty segments are left out of the argument arrays (the kernels never see a
zero-row problem); a call whose segments are all empty checks every argument and launches nothing.

:func:`prepare_segment_gemm` checks a call once and copies its arrays into a buffer of the caller's (from the
workspace's page-locked buffer, on the call's stream, waiting for the copy to land); the
:class:`PreparedSegmentGEMM` it returns launches the same GEMM with no copy and no host computation, which a CUDA
graph can capture (the MoE layer's fixed-capacity path, where every expert owns the same rows each step); a
device kernel of the caller's may lower each problem's row count between launches (see
:class:`PreparedSegmentGEMM`), so the rows computed can follow the data with nothing decided on the host.

Contract (checked on every call, before the FFI): ``x`` ``[seg_indptr[-1], d_in]``, ``weights`` 3-D and ``out``
``[seg_indptr[-1], d_out]`` contiguous on one device; ``d_in`` and ``d_out`` multiples of 16 bytes of their
element type (CUTLASS's 128-bit alignment of every row); 16-byte aligned data pointers; ``weight_indices``
within ``[0, num_weights)``, or without them ``batch_size <= num_weights`` (segment ``i`` uses ``weights[i]``,
empty segments keeping their number, as upstream); ``out`` shares no memory with ``x`` or ``weights``; no
non-empty operand at NULL or over the end of the address space. The pointers reach the kernel inside the
argument arrays, where the launcher's own tensor checks do not see them, so these rules are tested here on every
call (and :func:`prepare_segment_gemm` holds ``args_buffer`` to them too).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal, NoReturn

import numpy as np

from ..abi.streams import current_stream
from ..abi.wire import BOOL, declare, tensor, tensors
from ..cuda import driver
from ..dtypes import bfloat16, float8_e4m3fn, float8_e5m2, float16, int32, int64, uint8
from ..launch import checks
from ..launch.aliasing import disjoint
from ..launch.launcher import check_tensor, launcher
from ..launch.pointer_rules import PointerRules
from ..launch.registry import op
from ..tensor import intake
from ..tensor.descriptor import Tensor, relocated
from ..tensor.protocols import IndexLike, StreamLike, TensorLike, TensorT
from ..tensor.streams import stream_handle
from .attention.host_index import host_array
from .attention.workspace import Workspace

# public here, not ops of fi_ffi (the ops, and the engine's prepare_segment_gemm, segment_gemm_args_bytes: @op below)
__all__ = ["PreparedSegmentGEMM", "SegmentGEMMArgs", "prepare_segment_gemm_problems", "segment_gemm_args"]

_ARRAYS = [
    *tensors("all_problems", "x_ptr", "w_ptr", "y_ptr"),
]
SEGMENT_GEMM_SM90 = declare(
    "cutlass_segment_gemm_sm90",
    [
        *tensors("float_workspace_buffer", "int_workspace_buffer"),
        *_ARRAYS,
        *tensors("x_stride", "weight_stride", "y_stride"),
        tensor("empty_x_data"),  # only its dtype is read: fi_ffi passes x itself
        tensor("empty_y_data"),  # ... and out itself
        ("weight_column_major", BOOL),
    ],
)
SEGMENT_GEMM = declare(
    "cutlass_segment_gemm",
    [
        tensor("workspace_buffer"),
        *_ARRAYS,
        *tensors("x_ld", "w_ld", "y_ld", "empty_x_data"),
        ("weight_column_major", BOOL),
    ],
)
DECLARATIONS = (("gemm_sm90", SEGMENT_GEMM_SM90), ("gemm", SEGMENT_GEMM))

_PTR_END = 1 << 64  # addresses are 64-bit
_ALIGN = 16  # bytes: CUTLASS's 128-bit alignment of A, B and C rows; each argument array starts 16-byte aligned
_HALF = (float16, bfloat16)
_FP8 = (float8_e4m3fn, float8_e5m2)
BACKENDS = ("auto", "sm90", "sm80")
SegmentGEMMBackend = Literal["auto", "sm90", "sm80"]  # BACKENDS, as a type


@dataclass(frozen=True)
class SegmentGEMMArgs:
    """The per-problem argument arrays of one segment GEMM (empty segments left out), as host numpy arrays.

    Attributes:
        problems: int32 ``[P, 3]``: ``(m, n, k)`` = (rows of the segment, d_out, d_in).
        x_ptr, w_ptr, y_ptr: int64 ``[P]``: addresses of each problem's first row of x, its weight, out.
        x_ld, w_ld, y_ld: int64 ``[P]``: leading dimensions in elements (``d_in``; ``d_in`` column-major or
            ``d_out`` row-major; ``d_out``).
        segments: int64 ``[P]``: the segment each problem is (for messages and tests).
    """

    problems: np.ndarray
    x_ptr: np.ndarray
    w_ptr: np.ndarray
    y_ptr: np.ndarray
    x_ld: np.ndarray
    w_ld: np.ndarray
    y_ld: np.ndarray
    segments: np.ndarray

    @property
    def count(self) -> int:
        return int(self.problems.shape[0])

    def pack(self) -> tuple[bytes, dict[str, int]]:
        """The arrays laid out one after another, each at a 16-byte aligned offset: (bytes, name -> offset); for
        arrays of the dtypes and shapes above, the layout ``_packed_layout`` gives for their count."""
        offsets: dict[str, int] = {}
        chunks: list[bytes] = []
        at = 0
        for name, attr in _PACKED:
            offsets[name] = at
            data = np.ascontiguousarray(getattr(self, attr)).tobytes()
            pad = -len(data) % _ALIGN
            chunks.append(data + bytes(pad))
            at += len(data) + pad
        return b"".join(chunks), offsets


_PACKED = (("all_problems", "problems"), ("x_ptr", "x_ptr"), ("w_ptr", "w_ptr"), ("y_ptr", "y_ptr"),
           ("x_ld", "x_ld"), ("w_ld", "w_ld"), ("y_ld", "y_ld"))  # fmt: skip
"""(name in the packed layout, :class:`SegmentGEMMArgs` attribute) of each array the kernels read, in layout order."""
_ITEM_BYTES = (12, 8, 8, 8, 8, 8, 8)  # each array's bytes a problem: (m, n, k) int32, then int64 values


def _packed_layout(count: int) -> tuple[dict[str, int], int]:
    """``(name -> byte offset, bytes)`` of :meth:`SegmentGEMMArgs.pack` for ``count`` problems: int32 ``[count, 3]``
    problems, then six int64 ``[count]`` arrays, each at a 16-byte aligned offset."""
    offsets: dict[str, int] = {}
    at = 0
    for (name, _), itemsize in zip(_PACKED, _ITEM_BYTES, strict=True):
        offsets[name] = at
        at += -(-itemsize * count // _ALIGN) * _ALIGN
    return offsets, at


def segment_gemm_args(
    seg_indptr: np.ndarray,
    weight_indices: np.ndarray | None,
    num_weights: int,
    d_in: int,
    d_out: int,
    x_ptr: int,
    w_ptr: int,
    y_ptr: int,
    x_itemsize: int,
    w_itemsize: int,
    y_itemsize: int,
    weight_column_major: bool,
) -> SegmentGEMMArgs:
    """The kernels' per-problem arguments (what flashinfer-python's ``compute_sm90_group_gemm_args`` writes), on
    the host, leaving out empty segments. ``seg_indptr`` int ``[S + 1]`` (checked by the caller),
    ``weight_indices`` int ``[S]`` or None (segment ``i`` uses weight ``i``).

    Raises:
        ValueError: a weight index outside ``[0, num_weights)`` (naming ``weight_indices`` and the segment), or
            more segments than weights without ``weight_indices`` (naming ``batch_size``).
    """
    starts = seg_indptr[:-1].astype(np.int64)
    rows = seg_indptr[1:].astype(np.int64) - starts
    segs = np.arange(rows.shape[0], dtype=np.int64)
    widx = segs if weight_indices is None else weight_indices.astype(np.int64)
    if weight_indices is None and rows.shape[0] > num_weights:
        # upstream's rule (its Triton argument kernel uses the segment number as the weight index), empty
        # segments included: they keep their number, so segment i is weights[i] whatever the others hold
        raise ValueError(
            f"batch_size: {rows.shape[0]} segments but weights holds {num_weights} matrices; without "
            f"weight_indices segment i uses weights[i] (empty segments included), so pass weight_indices to "
            f"share matrices between segments"
        )
    bad = np.nonzero((widx < 0) | (widx >= num_weights))[0]
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"weight_indices: segment {i} uses weight {int(widx[i])}, outside [0, {num_weights}) (weights holds "
            f"{num_weights} matrices)"
        )
    keep = rows > 0
    starts, rows, widx, segs = starts[keep], rows[keep], widx[keep], segs[keep]
    p = rows.shape[0]
    problems = np.empty((p, 3), np.int32)
    problems[:, 0] = rows
    problems[:, 1] = d_out
    problems[:, 2] = d_in
    matrix = d_in * d_out
    return SegmentGEMMArgs(
        problems=problems,
        x_ptr=_addresses("x_ptr", x_ptr, starts * (d_in * x_itemsize)),
        w_ptr=_addresses("w_ptr", w_ptr, widx * (matrix * w_itemsize)),
        y_ptr=_addresses("y_ptr", y_ptr, starts * (d_out * y_itemsize)),
        x_ld=np.full(p, d_in, np.int64),
        w_ld=np.full(p, d_in if weight_column_major else d_out, np.int64),
        y_ld=np.full(p, d_out, np.int64),
        segments=segs,
    )


def _addresses(name: str, base: Any, offsets: np.ndarray) -> np.ndarray:
    """``base + offsets`` (bytes) as the kernels' int64 pointer array: computed in uint64, so an address at or
    above 2**63 keeps its bits instead of overflowing numpy's int64. Each address must lie in ``[0, 2**64)`` (NULL
    operands are refused by :func:`segment_gemm`, which knows which are empty).

    Raises:
        TypeError, ValueError: naming ``name``, for a base that is no address or a result outside the address space.
    """
    base = checks.integer(name, base, 0)
    if base >= _PTR_END:
        raise ValueError(f"{name}: expected a device address below 2**64, got {base}")
    if offsets.size and base + int(offsets.max()) >= _PTR_END:
        raise ValueError(
            f"{name}: 0x{base:x} + {int(offsets.max())} bytes wraps past the end of the address space; pass the "
            f"address of memory you allocated"
        )
    return (np.uint64(base) + offsets.astype(np.uint64)).view(np.int64)


def _arrays_check(ld_names: tuple[str, str, str], has_y: bool) -> Any:
    """The contract of the argument arrays fi_ffi itself laid out in the workspace (a wrong one is a bug here)."""

    def check(a: SimpleNamespace) -> PointerRules:
        count = a.all_problems.shape[0]
        checks.shape("all_problems", a.all_problems, (count, 3), "[problems, 3]")
        checks.dtype_in("all_problems", a.all_problems, (int32,))
        aligned = {"all_problems": _ALIGN, "empty_x_data": _ALIGN}  # x itself: its pointer is tested every call
        for name in ("x_ptr", "w_ptr", "y_ptr", *ld_names):
            t = getattr(a, name)
            checks.shape(name, t, (count,), "[problems]")
            checks.dtype_in(name, t, (int64,))
            aligned[name] = _ALIGN
        if has_y:
            aligned["empty_y_data"] = _ALIGN  # out itself
        # x and out (empty_x_data, empty_y_data) are checked apart by segment_gemm itself, with the weights the
        # kernel reaches only through w_ptr; the argument arrays are fi_ffi's own, in the workspace
        return PointerRules(aligned)

    check.__qualname__ = f"check_segment_gemm_{ld_names[0]}"
    return check


_sm90 = launcher(SEGMENT_GEMM_SM90, "gemm_sm90", _arrays_check(("x_stride", "weight_stride", "y_stride"), True))
_sm80 = launcher(SEGMENT_GEMM, "gemm", _arrays_check(("x_ld", "w_ld", "y_ld"), False))


def _need_out(batch_size: Any) -> NoReturn:
    """The error of a call without ``out``; a tensor as ``batch_size`` is ``out`` given by position two places
    early (``segment_gemm(x, weights, out)``), and that error comes first."""
    checks.integer("batch_size", batch_size, 0)
    raise TypeError(
        "out: required (fi_ffi never allocates device memory); pass a contiguous [total_rows, d_out] tensor"
    )


@op(flashinfer="flashinfer.gemm.gemm_base.SegmentGEMMWrapper.run")
def segment_gemm(
    x: TensorLike,
    weights: TensorLike,
    batch_size: int,
    weight_column_major: bool,
    out: TensorT | None = None,
    seg_lens: IndexLike | None = None,
    seg_indptr: IndexLike | None = None,
    weight_indices: IndexLike | None = None,
    *,
    workspace: Workspace,
    backend: SegmentGEMMBackend = "auto",
    stream: StreamLike = None,
) -> TensorT:
    """Grouped GEMM over segments of ``x`` (see the module docstring).

    flashinfer's ``SegmentGEMMWrapper(float_workspace_buffer, backend).run(x, weights, batch_size,
    weight_column_major, out, seg_lens, seg_indptr, weight_indices)``, with the wrapper's state passed per call
    (``workspace=``, ``backend=``) and ``out`` required.

    Args:
        x: ``[total_rows, d_in]``, float16/bfloat16 (FP8 with ``backend`` sm90), contiguous.
        weights: ``[num_weights, d_out, d_in]`` (column-major) or ``[num_weights, d_in, d_out]``, x's dtype,
            contiguous.
        batch_size: the number of segments ``S``.
        weight_column_major: the weights' layout (True: nn.Linear's ``[out_features, in_features]``).
        out: ``[total_rows, d_out]`` (x's dtype; float16/bfloat16 for FP8 x), contiguous (required).
        seg_lens: host int32 ``[S]`` rows per segment, or
        seg_indptr: host int32 ``[S + 1]`` row offsets (starts at 0, non-decreasing; ``seg_indptr[-1]`` is
            ``total_rows``); exactly one of the two.
        weight_indices: host int32 ``[S]``: the weight of each segment (default: segment ``i`` uses ``i``).
        workspace: a :class:`~fi_ffi.ops.attention.workspace.Workspace` (its int buffer receives the argument
            arrays, 60 bytes per non-empty segment; the float buffer is the SM90 kernel's scratch).
        backend: ``"auto"``, ``"sm90"`` (Hopper) or ``"sm80"`` (the generic module; adds into ``out``).
        stream: where the copy and the kernel run (None: x's framework's current stream, else TVM-FFI's).

    Returns:
        ``out``.

    Raises:
        TypeError: ``out`` missing, a dtype other than those listed, ``workspace`` not a ``Workspace``, index
            arrays that are not host integer arrays.
        ValueError: both or neither of ``seg_lens`` / ``seg_indptr``, offsets not starting at 0 or decreasing,
            a shape that does not fit the others, ``d_in`` / ``d_out`` not a multiple of 16 bytes, a weight index
            out of range, ``out`` overlapping ``x`` or ``weights``, an unknown ``backend``, a workspace too small.
    """
    if out is None:
        _need_out(batch_size)
    c = _checked(
        workspace,
        x,
        weights,
        batch_size,
        weight_column_major,
        out,
        seg_lens,
        seg_indptr,
        weight_indices,
        backend,
        stream,
    )
    if c.args.count == 0:  # nothing to multiply: everything is checked, nothing is copied or launched
        return out
    data, offsets = c.args.pack()
    if len(data) > workspace.int_bytes:
        raise ValueError(
            f"workspace: the argument arrays of {c.args.count} segments need {len(data)} bytes of int buffer, "
            f"the workspace has {workspace.int_bytes}"
        )
    arrays = _arrays(workspace.int_buffer.data_ptr, offsets, c.args.count, workspace.device)
    from ..cuda import device

    previous = device.make_current(workspace.device.device_id)  # the driver's copy needs the context current
    try:
        # the int buffer will hold these arrays: earlier plans are stale; the launch stays under the staging's
        # lock (no other staging overwrites the arrays before it is enqueued) but out of the copy's event
        with workspace.staging(c.stream) as stage:
            _stage(workspace, workspace.int_buffer.data_ptr, data, c.stream)
            stage.record()
            _launch(c, workspace, arrays, x, out)
    finally:
        device.restore(previous)
    return out


@dataclass(frozen=True)
class _Call:
    """A checked segment GEMM call: its argument arrays (host), module, layout flag and stream."""

    args: SegmentGEMMArgs
    sm90: bool
    column_major: bool
    stream: int


def _checked(
    workspace: Any,
    x: Any,
    weights: Any,
    batch_size: Any,
    weight_column_major: Any,
    out: Any,
    seg_lens: Any,
    seg_indptr: Any,
    weight_indices: Any,
    backend: Any,
    stream: Any,
) -> _Call:
    """Every argument checked (pointers included: this runs on every call) and the argument arrays computed."""
    if out is None:
        _need_out(batch_size)
    if not isinstance(workspace, Workspace):
        raise TypeError(f"workspace: expected a fi_ffi Workspace, got {type(workspace).__name__}")
    batch_size = checks.integer("batch_size", batch_size, 0)
    column_major = checks.flag("weight_column_major", weight_column_major)
    indptr = _indptr(seg_lens, seg_indptr, batch_size)
    xt, wt, yt = checks.tensor("x", x), checks.tensor("weights", weights), checks.tensor("out", out)
    use_sm90 = _use_sm90(backend, xt)
    d_in, d_out = _check_operands(xt, wt, yt, column_major, use_sm90, int(indptr[-1]), workspace)
    widx = None
    if weight_indices is not None:
        widx = host_array("weight_indices", weight_indices)
        if widx.shape[0] != batch_size:
            raise ValueError(f"weight_indices: expected {batch_size} entries (batch_size), got {widx.shape[0]}")
    args = segment_gemm_args(
        indptr,
        widx,
        wt.shape[0],
        d_in,
        d_out,
        xt.data_ptr,
        wt.data_ptr,
        yt.data_ptr,
        xt.dtype.itemsize,
        wt.dtype.itemsize,
        yt.dtype.itemsize,
        column_major,
    )
    s = stream_handle(stream)
    if s is None:
        s = intake.default_stream(x, xt.device.device_id)
        if s is None:
            s = current_stream(xt.device.device_id)
    return _Call(args, use_sm90, column_major, s)


def _arrays(base: int, offsets: dict[str, int], count: int, dev: Any) -> list[Tensor]:
    """Descriptors of the packed argument arrays at device address ``base`` (problems, then the six int64 arrays),
    inside a buffer whose range the caller checked (so the six share one parsed layout, moved unchecked)."""
    problems = Tensor(base + offsets["all_problems"], (count, 3), int32, dev)
    values = Tensor(base + offsets["x_ptr"], (count,), int64, dev)
    rest = [relocated(values, base + offsets[n]) for n in ("w_ptr", "y_ptr", "x_ld", "w_ld", "y_ld")]
    return [problems, values, *rest]


def _launch(c: _Call, workspace: Workspace, arrays: list[Tensor], x: Any, out: Any) -> None:
    if c.sm90:  # the int workspace argument is not read by the SM90 kernel: the workspace's own buffer is passed
        _sm90(workspace.float_buffer, workspace.int_buffer, *arrays, x, out, c.column_major, stream=c.stream)
    else:
        _sm80(workspace.float_buffer, *arrays, x, c.column_major, stream=c.stream)


class PreparedSegmentGEMM:
    """A grouped GEMM whose argument arrays live in a device buffer of the caller's, copied there once; calling it
    launches the kernel with no copy and no host computation (one launcher call): what a CUDA graph can capture,
    and what a fixed-shape step (a MoE layer at a fixed capacity per expert) repeats.

    It keeps ``x``, ``weights``, ``out``, the workspace and ``args_buffer`` referenced until dropped: their
    addresses are in the copied arrays, so they must neither move nor be freed while it is used.

    Rows computed at run time: :attr:`problem_sizes` is the device array the kernel reads its problems' ``(m, n,
    k)`` from. A kernel of the caller's may lower a problem's ``m`` (its rows, from the segment's first row) to
    any value in ``[0, prepared_rows[p]]`` on the launch stream before a launch; the GEMM then computes only those
    rows (``m = 0``: none, and that segment's weight is not read) and leaves the segment's other rows of ``out``
    as they were. Nothing else in the arrays may change: the checks made at preparation covered the prepared
    rows, and a larger ``m`` would reach past them. (The MoE layer's fixed-capacity path writes each expert's
    token count there, so a step reads only the chosen experts' weights.)

    Attributes:
        count: problems in the arrays (the non-empty segments at preparation).
        problem_sizes: descriptor of the device int32 ``[count, 3]`` array of ``(m, n, k)`` rows.
        prepared_rows: host int32 ``[count]``: each problem's ``m`` as prepared (the most it may be set to).
        segments: host int64 ``[count]``: the segment each problem is (empty segments have no problem).
    """

    __slots__ = ("_arrays", "_call", "_keep", "count", "prepared_rows", "problem_sizes", "segments")

    def __init__(self, call: _Call, arrays: list[Tensor], keep: tuple[Any, ...]) -> None:
        self._call = call
        self._arrays = arrays
        self._keep = keep
        self.count = call.args.count
        self.problem_sizes = arrays[0]
        self.prepared_rows = call.args.problems[:, 0].copy()
        self.segments = call.args.segments.copy()

    def __call__(self, stream: Any = None) -> None:
        """Launch on ``stream`` (None: the stream it was prepared for)."""
        if self.count == 0:
            return
        c = self._call
        if stream is not None:
            c = _Call(c.args, c.sm90, c.column_major, _stream_int(stream))
        workspace, x, out = self._keep[0], self._keep[1], self._keep[3]
        _launch(c, workspace, self._arrays, x, out)


def _stream_int(stream: Any) -> int:
    s = stream_handle(stream)
    assert s is not None
    return s


@op()
def prepare_segment_gemm(
    x: Any,
    weights: Any,
    batch_size: int,
    weight_column_major: bool,
    out: Any,
    seg_lens: Any = None,
    seg_indptr: Any = None,
    weight_indices: Any = None,
    *,
    workspace: Workspace,
    args_buffer: Any,
    backend: SegmentGEMMBackend = "auto",
    stream: Any = None,
) -> PreparedSegmentGEMM:
    """Check a :func:`segment_gemm` call once and copy its argument arrays into ``args_buffer`` (through the
    workspace's page-locked buffer, on ``stream``, then waiting for that stream: call it outside any stream capture,
    and expect it to wait for the work queued on ``stream`` before it); the result launches the same GEMM again (see
    :class:`PreparedSegmentGEMM`). Arguments as :func:`segment_gemm`, plus:

    Args:
        args_buffer: a uint8 device buffer of at least :func:`segment_gemm_args_bytes` bytes, 16-byte aligned,
            used by nothing else while the prepared GEMM lives (the workspace's int buffer is not written: its
            attention plans stay valid).

    Raises:
        TypeError / ValueError: an argument :func:`segment_gemm` refuses, or ``args_buffer`` not a uint8 device
            buffer that large and aligned, each named.
        CudaError: the copy of the argument arrays, or the wait for it, failed.
    """
    c = _checked(
        workspace,
        x,
        weights,
        batch_size,
        weight_column_major,
        out,
        seg_lens,
        seg_indptr,
        weight_indices,
        backend,
        stream,
    )
    buf = checks.tensor("args_buffer", args_buffer)
    checks.device_tensor("args_buffer", buf, 1, "[bytes]", (uint8,))
    checks.same_device("args_buffer", buf, "x", checks.tensor("x", x))
    data, offsets = c.args.pack()
    if buf.shape[0] < len(data):
        raise ValueError(
            f"args_buffer: the argument arrays of {c.args.count} segments need {len(data)} bytes, got {buf.shape[0]}"
        )
    check_tensor("args_buffer", buf, output=True)  # NULL, or a range past the end of the address space
    if buf.data_ptr % _ALIGN:
        raise ValueError(f"args_buffer: data pointer 0x{buf.data_ptr:x} must be aligned to {_ALIGN} bytes")
    for name, value in (("x", x), ("weights", weights), ("out", out)):
        disjoint("args_buffer", buf, name, checks.tensor(name, value))
    disjoint("args_buffer", buf, "workspace.float_buffer", workspace.float_buffer)  # the SM90 kernel's scratch
    arrays = _arrays(buf.data_ptr, offsets, c.args.count, buf.device)
    if c.args.count:
        _copy_and_wait(workspace, buf, data, c.stream)
    return PreparedSegmentGEMM(c, arrays, (workspace, x, weights, out, args_buffer))


def prepare_segment_gemm_problems(
    args: SegmentGEMMArgs,
    x: Any,
    out: Any,
    weight_column_major: bool,
    *,
    workspace: Workspace,
    args_buffer: Any,
    backend: SegmentGEMMBackend = "auto",
    stream: Any = None,
    copy_args: bool = True,
) -> PreparedSegmentGEMM:
    """A grouped GEMM of problems the caller laid out itself (its own :class:`SegmentGEMMArgs`: any row pointers
    and leading dimensions, e.g. column slices of a wider matrix or weights strided apart), copied into
    ``args_buffer`` once (as :func:`prepare_segment_gemm` copies them, waiting for ``stream``: call it outside any
    stream capture) and launched by the result as
    :func:`prepare_segment_gemm`'s. ``x`` and ``out``: tensors whose dtypes the kernel takes (x's for x and the
    weights, out's for out); the problems' addresses are the caller's to keep within memory it owns: only their
    alignment is checked here (16-byte pointers, leading dimensions of 16-byte multiples, ``n`` and ``k``
    multiples of 16 bytes of their element type), as no tensor bounds them.

    ``copy_args=False`` leaves the copy to the caller: ``args_buffer`` must hold ``args.pack()``'s bytes before the
    first launch (e.g. many GEMMs' arrays packed into one host buffer and copied in one go, each GEMM prepared over
    its own 16-byte aligned part of the device copy); nothing is copied here, and no driver is needed.

    Raises:
        TypeError / ValueError: ``args`` not :class:`SegmentGEMMArgs` of consistent arrays, a misaligned problem
            (naming the array and problem), ``x``/``out`` dtypes the backend does not take, ``x`` off CUDA or
            ``out``, ``workspace`` or ``args_buffer`` on another device, or ``args_buffer`` as
            :func:`prepare_segment_gemm` refuses it.
        CudaError: the copy of the argument arrays, or the wait for it, failed.
    """
    if not isinstance(args, SegmentGEMMArgs):
        raise TypeError(f"args: expected SegmentGEMMArgs (the per-problem arrays), got {type(args).__name__}")
    if not isinstance(workspace, Workspace):
        raise TypeError(f"workspace: expected a fi_ffi Workspace, got {type(workspace).__name__}")
    column_major = checks.flag("weight_column_major", weight_column_major)
    copy = checks.flag("copy_args", copy_args)
    xt, yt = checks.tensor("x", x), checks.tensor("out", out)
    checks.cuda("x", xt)
    checks.same_device("out", yt, "x", xt)
    if workspace.device.device_id != xt.device.device_id or not workspace.device.is_cuda:
        # (the copy stages through the workspace's pinned buffer and records its event on x's stream)
        raise ValueError(f"workspace: expected a workspace on {xt.device} (same as x), got one on {workspace.device}")
    use_sm90 = _use_sm90(backend, xt)
    checks.dtype_in("x", xt, (*_HALF, *_FP8) if use_sm90 else _HALF)
    checks.dtype_in("out", yt, _HALF)
    if xt.dtype not in _FP8:
        checks.same_dtype("out", yt, "x", xt)
    elif not column_major:
        raise ValueError("weight_column_major: FP8 inputs need column-major weights")
    _check_problems(args, xt.dtype.itemsize, yt.dtype.itemsize, column_major)
    s = stream_handle(stream)
    if s is None:
        s = current_stream(xt.device.device_id)
    c = _Call(args, use_sm90, column_major, s)
    buf = checks.tensor("args_buffer", args_buffer)
    checks.device_tensor("args_buffer", buf, 1, "[bytes]", (uint8,))
    checks.same_device("args_buffer", buf, "x", xt)
    offsets, nbytes = _packed_layout(args.count)  # (the bytes themselves packed only for a copy of our own)
    if buf.shape[0] < nbytes:
        raise ValueError(
            f"args_buffer: the argument arrays of {args.count} problems need {nbytes} bytes, got {buf.shape[0]}"
        )
    check_tensor("args_buffer", buf, output=True)
    if buf.data_ptr % _ALIGN:
        raise ValueError(f"args_buffer: data pointer 0x{buf.data_ptr:x} must be aligned to {_ALIGN} bytes")
    disjoint("args_buffer", buf, "workspace.float_buffer", workspace.float_buffer)
    arrays = _arrays(buf.data_ptr, offsets, args.count, buf.device)
    if args.count and copy:
        _copy_and_wait(workspace, buf, args.pack()[0], s)
    return PreparedSegmentGEMM(c, arrays, (workspace, x, None, out, args_buffer))


def _check_problems(args: SegmentGEMMArgs, x_size: int, y_size: int, column_major: bool) -> None:
    """The alignment CUTLASS needs of every problem of caller-made arrays (16-byte rows and pointers), each
    refusal naming the array and the problem."""
    problems = args.problems  # (checked before args.count, which reads its shape)
    if (
        not isinstance(problems, np.ndarray)
        or problems.ndim != 2
        or problems.shape[1] != 3
        or problems.dtype != np.int32
    ):
        raise TypeError(f"args.problems: expected an int32 [P, 3] array of (m, n, k), got {problems!r:.60}")
    p = args.count
    for name in ("x_ptr", "w_ptr", "y_ptr", "x_ld", "w_ld", "y_ld", "segments"):
        a = getattr(args, name)
        if not isinstance(a, np.ndarray) or a.shape != (p,) or a.dtype != np.int64:
            raise TypeError(f"args.{name}: expected an int64 array of {p} entries (one per problem), got {a!r:.60}")
    # every rule in a few array operations over all problems (this runs on every preparation, and the engine
    # prepares a layer's GEMMs as it launches them); the rules one by one only to name the first broken one
    mnk = problems.astype(np.int64)
    k, n, w_width = mnk[:, 2], mnk[:, 1], mnk[:, 2] if column_major else mnk[:, 1]
    values = np.stack((args.x_ptr, args.w_ptr, args.y_ptr, args.x_ld * x_size, args.w_ld * x_size,
                       args.y_ld * y_size, k * x_size, n * y_size))  # fmt: skip
    # (an int64 address past 2**63 is negative; % 16 of it is still the address's: 2**64 is a multiple of 16)
    room = np.stack((args.x_ld - k, args.y_ld - n, args.w_ld - w_width))  # leading dimensions past the rows' ends
    if (values % _ALIGN).any() or not values[:3].all() or (mnk <= 0).any() or (room < 0).any():
        _name_broken_rule(args, mnk, x_size, y_size, column_major)


def _name_broken_rule(args: SegmentGEMMArgs, mnk: np.ndarray, x_size: int, y_size: int, column_major: bool) -> None:
    """Raise the ValueError of the first rule of :func:`_check_problems` a problem breaks, naming the array and the
    problem (the slow path: only where the checks over all problems found one)."""
    sizes = {"x_ptr": x_size, "w_ptr": x_size, "y_ptr": y_size, "x_ld": x_size, "w_ld": x_size, "y_ld": y_size}
    rules = [(name, getattr(args, name).view(np.uint64) % _ALIGN != 0, "a 16-byte aligned address") for name in
             ("x_ptr", "w_ptr", "y_ptr")]  # fmt: skip
    rules += [(name, getattr(args, name) * sizes[name] % _ALIGN != 0, "a multiple of 16 bytes")
              for name in ("x_ld", "w_ld", "y_ld")]  # fmt: skip
    rules += [("x_ptr", args.x_ptr == 0, "a device address, not NULL"), ("w_ptr", args.w_ptr == 0, "not NULL"),
              ("y_ptr", args.y_ptr == 0, "not NULL"), ("problems", (mnk <= 0).any(1), "m, n and k >= 1"),
              ("x_ld", args.x_ld < mnk[:, 2], "x_ld >= k"), ("y_ld", args.y_ld < mnk[:, 1], "y_ld >= n: rows apart"),
              ("w_ld", args.w_ld < mnk[:, 2 if column_major else 1], "w_ld >= k column-major, n row-major"),
              ("problems", mnk[:, 2] * x_size % _ALIGN != 0, "k a multiple of 16 bytes"),
              ("problems", mnk[:, 1] * y_size % _ALIGN != 0, "n a multiple of 16 bytes")]  # fmt: skip
    for name, bad, rule in rules:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"args.{name}: problem {i} breaks the kernels' rule ({rule})")
    raise AssertionError("a rule of _check_problems found broken, but none named")  # (the two lists disagree)


@op()
def segment_gemm_args_bytes(batch_size: int) -> int:
    """Bytes of the argument arrays of ``batch_size`` non-empty segments (what ``args_buffer`` must hold).

    Raises:
        TypeError / ValueError: ``batch_size`` not an int >= 0.
    """
    n = checks.integer("batch_size", batch_size, 0)
    return _packed_layout(n)[1]


def _copy_and_wait(ws: Workspace, buf: Tensor, data: bytes, stream: int) -> None:
    """Copy ``data`` into ``buf`` (device) on ``stream`` through the workspace's page-locked buffer (in chunks of
    its size, each under :meth:`Workspace.staging`, leaving the int workspace and its plans alone), then wait for
    the copy to land.

    Not ``cuMemcpyHtoD`` from the Python bytes: from pageable memory that call may return once the bytes are
    staged, before the DMA lands, and it runs on the legacy default stream, which a non-blocking stream (the
    engine's) does not wait for, so a launch on ``stream`` could read the arrays early; syncing ``stream`` after it
    would not help (the copy is not on it). From page-locked memory, ``cuMemcpyHtoDAsync`` on ``stream`` is ordered
    before every later launch on it, and ``cuStreamSynchronize(stream)`` keeps the preparation synchronous, so a
    launch on any stream afterwards reads the arrays (and the page-locked buffer is free again).

    Raises:
        CudaError: no driver, or the copy or the wait failed (the driver's code and name).
    """
    from ..cuda import device
    from ..cuda import runtime as cuda_runtime

    lib = driver.load()
    if lib is None:
        raise cuda_runtime.no_driver("cuMemcpyHtoDAsync")
    previous = device.make_current(buf.device.device_id)  # the driver's copy needs the context current
    try:
        step = ws.pinned_bytes
        for at in range(0, len(data), step):
            with ws.staging(stream, into_int_buffer=False):
                _stage(ws, buf.data_ptr + at, data[at : at + step], stream)
        err = lib.cuStreamSynchronize(stream)
    finally:
        device.restore(previous)
    if err:
        raise cuda_runtime.driver_error(err, "cuStreamSynchronize(segment GEMM argument copy)")


def _indptr(seg_lens: Any, seg_indptr: Any, batch_size: int) -> np.ndarray:
    from .attention.host_index import check_indptr

    if seg_indptr is not None and seg_lens is not None:
        raise ValueError("seg_lens: pass seg_lens or seg_indptr, not both (flashinfer-python ignores seg_lens then)")
    if seg_indptr is not None:
        indptr = host_array("seg_indptr", seg_indptr)
        check_indptr("seg_indptr", indptr, batch_size)
        return indptr
    if seg_lens is None:
        raise TypeError("seg_indptr: one of seg_lens and seg_indptr is required (host int32 arrays)")
    lens = host_array("seg_lens", seg_lens)
    if lens.shape[0] != batch_size:
        raise ValueError(f"seg_lens: expected {batch_size} entries (batch_size), got {lens.shape[0]}")
    if (lens < 0).any():
        raise ValueError(f"seg_lens: expected lengths >= 0, got {int(lens.min())}")
    indptr = np.zeros(batch_size + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    if indptr[-1] >= 1 << 31:
        raise ValueError(f"seg_lens: {int(indptr[-1])} rows in all do not fit the kernels' int32")
    return indptr


def _use_sm90(backend: Any, x: Tensor) -> bool:
    if backend == "sm90":
        return True
    if backend == "sm80":
        return False
    if backend != "auto":
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    from .attention.variants import sm_major

    return x.device.is_cuda and sm_major(x.device.device_id) == 9


def _check_operands(
    x: Tensor, w: Tensor, y: Tensor, column_major: bool, sm90: bool, rows: int, ws: Workspace
) -> tuple[int, int]:
    """Shapes, dtypes, devices, layout, alignment (pointers included: this runs on every call) and overlap."""
    allowed = (*_HALF, *_FP8) if sm90 else _HALF
    checks.device_tensor("x", x, 2, "[total_rows, d_in]", allowed)
    layout = "[num_weights, d_out, d_in]" if column_major else "[num_weights, d_in, d_out]"
    checks.ndim("weights", w, 3, layout)
    checks.same_dtype("weights", w, "x", x)
    checks.same_device("weights", w, "x", x)
    checks.cuda("weights", w)
    checks.contiguous("weights", w)
    d_in = x.shape[1]
    d_out = w.shape[1] if column_major else w.shape[2]
    w_in = w.shape[2] if column_major else w.shape[1]
    if w_in != d_in:
        raise ValueError(f"weights: expected d_in = {d_in} (x.shape[1]) in {layout}, got shape {w.shape}")
    if w.shape[0] == 0:
        raise ValueError(f"weights: expected at least one weight matrix, got shape {w.shape}")
    if x.shape[0] != rows:
        raise ValueError(f"x: expected {rows} rows (seg_indptr[-1]), got shape {x.shape}")
    if x.dtype in _FP8:
        checks.dtype_in("out", y, _HALF)
        if not column_major:
            raise ValueError("weight_column_major: FP8 inputs need column-major weights [num_weights, d_out, d_in]")
    else:
        checks.same_dtype("out", y, "x", x)
    checks.shape("out", y, (rows, d_out), "[total_rows, d_out]")
    checks.same_device("out", y, "x", x)
    checks.cuda("out", y)
    checks.contiguous("out", y)
    # the pointers reach the kernel through the argument arrays, past the launcher's own tensor checks: the same
    # rules here, on every call (NULL, an address range that wraps; then alignment and overlap below)
    check_tensor("x", x)
    check_tensor("weights", w)
    check_tensor("out", y, output=True)
    w_row = ("d_in", d_in) if column_major else ("d_out", d_out)  # the weights' contiguous dimension
    for name, (dim, width), t in (("x", ("d_in", d_in), x), ("weights", w_row, w), ("out", ("d_out", d_out), y)):
        if (width * t.dtype.itemsize) % _ALIGN or width == 0:
            raise ValueError(
                f"{name}: {dim} = {width} must be a positive multiple of {_ALIGN // t.dtype.itemsize} "
                f"({_ALIGN} bytes of {t.dtype.name}): the kernels access rows in 128-bit vectors"
            )
        if t.data_ptr % _ALIGN:
            raise ValueError(f"{name}: data pointer 0x{t.data_ptr:x} must be aligned to {_ALIGN} bytes")
    if ws.device.device_id != x.device.device_id or not ws.device.is_cuda:
        raise ValueError(f"workspace: expected a workspace on {x.device} (same as x), got one on {ws.device}")
    disjoint("out", y, "x", x)
    disjoint("out", y, "weights", w)
    return d_in, d_out


def _stage(ws: Workspace, dst: int, data: bytes, stream: int) -> None:
    """Write ``data`` (at most ``ws.pinned_bytes``) into the page-locked buffer and enqueue its copy to device
    address ``dst`` on ``stream`` (inside the workspace's staging)."""
    from ..abi.cdefs import get_ffi
    from ..cuda import runtime as cuda_runtime

    lib = driver.load()
    if lib is None:
        raise cuda_runtime.no_driver("cuMemcpyHtoDAsync")
    ffi = get_ffi()
    ffi.memmove(ffi.cast("char *", ws.pinned_buffer.data_ptr), data, len(data))
    err = lib.cuMemcpyHtoDAsync_v2(dst, ws.pinned_buffer.data_ptr, len(data), stream)
    if err:
        raise cuda_runtime.driver_error(err, "cuMemcpyHtoDAsync")
