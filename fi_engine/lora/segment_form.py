"""A prefill's LoRA products on tensor cores: the shrink and the expand of a projection's adapters as FlashInfer's
segment (grouped) GEMMs (:func:`fi_ffi.ops.segment_gemm.prepare_segment_gemm_problems`, its SM90 kernel), one
problem per run of rows that share an adapter, instead of the CUDA-core kernels of :mod:`fi_engine.kernels.lora_bgmv`
(which stay the form of a decode step's few rows, of a CUDA graph's capture, and of every GPU but SM 9.x).

For a projection ``y = x @ W^T`` of ``P`` parts (``outs``; q/k/v: three) and the slots' rank ``R``, over the served
segments (:func:`served_segments`: runs of rows of one slot whose adapter changes the group; rows of no adapter
skipped):

- shrink (:func:`shrink_problems`): ``t[rows] = x[rows] @ A_s^T`` (``A_s [P R, k]``, nn.Linear's column-major
  layout), ``t`` 16-bit ``[rows, P R]``, one problem per segment;
- expand (:func:`expand_problems`): ``z[rows, part p] = t[rows, p R:(p + 1) R] @ Bt_s[:, part p]`` (``Bt_s [R, n]``
  row-major, each part a column slice), one problem per segment and part;
- add (``LoraBgmv.add_scaled``): ``y = round(y + scale_s * z)``, as the SM90 kernel writes its output (its epilogue's
  beta is 0) rather than adding to it.

The scale is applied last, in float32; ``t`` and ``z`` are rounded to 16 bits (the CUDA-core form keeps ``t`` in
float32 and rounds once), so the two forms differ by a few 16-bit ulps of the adapter's term.

The segments come from the host (the step's row slots, :meth:`SegmentForm.begin_step`). Each layer's GEMMs of a
group are prepared at that layer's own launch (:class:`PreparedGemms`; the layers differ only in the slots' A and Bt
addresses): the layer's shrink and expand checked, their argument arrays packed into one host buffer
(:func:`pack_args`) and copied to the GPU in one asynchronous copy on the stream (:class:`ArgsArena`), then kept by
what they read and the layer. So a pass whose served runs are new makes one copy a layer and group, each queued just
before that layer's launches: the host prepares layer ``l`` while the GPU still runs the layers before it, and the
preparation hides behind their work rather than standing before the first launch. A pass of the same runs (a prefill
repeated with the same rows and adapters) prepares and copies nothing. A pass under CUDA-graph capture takes the
CUDA-core form, whose launches read the slots on the device at each replay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

import numpy as np

from ..kernels import flashinfer as kernels
from .batch import NO_ADAPTER, segments

__all__ = [
    "ARENA_BYTES",
    "SEGMENT_MIN_ROWS",
    "ArgsArena",
    "PreparedGemms",
    "SegmentForm",
    "expand_problems",
    "pack_args",
    "served_segments",
    "shrink_problems",
]

SEGMENT_MIN_ROWS = 64
"""Steps of more token rows than this (a prefill's) take the segment form where it is on; fewer: the CUDA-core form."""

ARENA_BYTES = 4 << 20
"""The argument arrays' device arena at first (:class:`ArgsArena`; a page-locked host buffer as large beside it):
some 60 bytes a problem, so a 32-layer model's four groups of 16 served runs (64 problems a layer with q/k/v's
expand) take some 0.6 MiB a pass shape. It grows where one pass needs more than half of it."""

_ARENA_ALIGN = 256  # bytes between packs in the arena (the arrays within a pack: 16, as the kernels need)


def served_segments(slots: np.ndarray, targets: np.ndarray, bit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs of rows of ``slots`` (one slot per row; :data:`~fi_engine.lora.batch.NO_ADAPTER` for none) whose
    adapter changes the group of bit ``bit`` (``targets[s] & bit``, ``targets`` the host's copy of each slot's group
    bits): ``(starts, lengths, slot_ids)`` (int64), in row order. Runs of no adapter, or of an adapter that leaves
    the group alone, are left out (the segment GEMM skips their rows; the add leaves them untouched too)."""
    indptr, ids = segments(slots)
    targets = np.asarray(targets, np.int64)
    served = ids != NO_ADAPTER
    served[served] = (targets[ids[served]] & bit) != 0
    starts, ends = indptr[:-1].astype(np.int64), indptr[1:].astype(np.int64)
    return starts[served], (ends - starts)[served], ids[served].astype(np.int64)


def _args(
    m: np.ndarray, n: Any, k: Any, offsets: tuple[np.ndarray, np.ndarray, np.ndarray], bases: tuple[int, int, int],
    lds: tuple[int, int, int],
) -> Any:  # fmt: skip
    """Problems ``(m[p], n[p], k[p])`` (``n``, ``k``: arrays or one int for all) whose x, weight and output start at
    ``offsets`` (int64 ``[P]`` byte offsets each) from ``bases`` (addresses; sums wrap in 64 bits, so addresses past
    2**63 keep their bits), leading dimensions ``lds`` (elements) for all."""
    p = len(m)
    problems = np.empty((p, 3), np.int32)
    problems[:, 0], problems[:, 1], problems[:, 2] = m, n, k
    pointers = (np.array(bases, np.uint64)[:, None] + np.stack(offsets).astype(np.uint64)).view(np.int64)
    strides = np.repeat(np.array(lds, np.int64)[:, None], p, 1)
    return kernels.SegmentGEMMArgs(
        problems=problems, x_ptr=pointers[0], w_ptr=pointers[1], y_ptr=pointers[2], x_ld=strides[0],
        w_ld=strides[1], y_ld=strides[2], segments=np.arange(p, dtype=np.int64),
    )  # fmt: skip


def shrink_problems(
    runs: tuple[np.ndarray, np.ndarray, np.ndarray], x: int, x_ld: int, a: int, a_slot: int, width: int, k: int,
    t: int, t_ld: int, itemsize: int = 2,
) -> Any:  # fmt: skip
    """The shrink's segment GEMM problems (:class:`~fi_ffi.ops.segment_gemm.SegmentGEMMArgs`, weights
    column-major): for each served run ``(start, length, slot)`` of :func:`served_segments`, ``(length, width, k)``
    over ``x`` rows from ``start`` (stride ``x_ld`` elements), ``A_slot`` at ``a + slot * a_slot`` elements (``[width,
    k]``, leading dimension ``k``) and ``t`` rows from ``start`` (stride ``t_ld``). Addresses in bytes."""
    starts, lengths, ids = (np.asarray(v, np.int64) for v in runs)
    offsets = starts * (x_ld * itemsize), ids * (a_slot * itemsize), starts * (t_ld * itemsize)
    return _args(lengths, width, k, offsets, (x, a, t), (x_ld, k, t_ld))


def expand_problems(
    runs: tuple[np.ndarray, np.ndarray, np.ndarray],
    t: int,
    t_ld: int,
    bt: int,
    b_slot: int,
    rank: int,
    outs: tuple[int, ...],
    z: int,
    z_ld: int,
    itemsize: int = 2,
) -> Any:
    """The expand's segment GEMM problems (weights row-major): for each served run and each part ``p`` of output
    size ``outs[p]`` (columns from ``off_p``, the sizes before it), ``(length, outs[p], rank)`` over ``t``'s columns
    ``p * rank`` on (rows from ``start``, stride ``t_ld``), ``Bt_slot``'s columns ``off_p`` on (``bt + slot * b_slot``
    elements, ``[rank, n]``, leading dimension ``n = sum(outs)``) and ``z``'s columns ``off_p`` on (stride ``z_ld``).
    Run-major: the parts of a run follow each other."""
    starts, lengths, ids = (np.asarray(v, np.int64)[:, None] for v in runs)  # [runs, 1] against [parts]: run-major
    sizes = np.asarray(outs, np.int64)
    columns = np.cumsum(sizes) - sizes  # each part's first column in Bt and z
    t_columns = np.arange(len(outs)) * rank  # ... and in t
    offsets = (
        ((starts * t_ld + t_columns) * itemsize).ravel(),
        ((ids * b_slot + columns) * itemsize).ravel(),
        ((starts * z_ld + columns) * itemsize).ravel(),
    )
    m, n = np.repeat(lengths[:, 0], len(outs)), np.tile(sizes, len(starts))
    return _args(m, n, rank, offsets, (t, bt, z), (t_ld, int(sizes.sum()), z_ld))


def pack_args(gemm_args: Sequence[Any]) -> tuple[np.ndarray, list[int]]:
    """The argument arrays of several segment GEMMs (:class:`~fi_ffi.ops.segment_gemm.SegmentGEMMArgs`; a layer's
    shrink and expand) in one host buffer, for one copy: each GEMM's
    :meth:`~fi_ffi.ops.segment_gemm.SegmentGEMMArgs.pack` bytes (its arrays at 16-byte aligned offsets, its length a
    multiple of 16; at least 16 bytes for one of no problem) one after another. ``(buffer, offsets)``: uint8
    ``[bytes]`` and each GEMM's byte offset in it, in the order given."""
    parts = [a.pack()[0] or bytes(16) for a in gemm_args]
    offsets = list(accumulate((len(p) for p in parts[:-1]), initial=0))
    return np.frombuffer(b"".join(parts), np.uint8), offsets


class ArgsArena:
    """``nbytes`` of device memory for prepared GEMMs' argument arrays, handed out from the front in 256-byte
    aligned parts (:meth:`take`) and taken back all at once (:meth:`reset`), with a page-locked host buffer of the
    same size that each part is staged in at the same offset before its copy (:meth:`copy`) on the stream.

    Outside CuPy's memory pool on purpose: the pool hands a freed block out again while a launch queued on the
    stream may still read it, and arrays copied into it then would change under that launch. A part of the arena
    is written once between resets, and its owner resets it only after the stream has drained, so no launch that
    reads a part's old arrays can be in flight when it is written again; the same holds for the host buffer, which
    the copy of a part may still be reading until then. The copy runs on the launches' stream (ordered before
    them; a synchronous copy from pageable memory may return before its bytes have landed)."""

    def __init__(self, cupy: Any, nbytes: int) -> None:
        self.cupy, self.nbytes, self.used = cupy, nbytes, 0
        self.device = cupy.cuda.Memory(nbytes)  # (cudaMalloc, not the pool: see above)
        self._pinned = cupy.cuda.alloc_pinned_memory(nbytes)  # (kept as long as the arena: no other user)
        self.host = np.frombuffer(self._pinned, np.uint8, nbytes)

    def take(self, nbytes: int) -> int | None:
        """The offset of ``nbytes`` not handed out since the last :meth:`reset`, or None where they do not fit."""
        at = -(-self.used // _ARENA_ALIGN) * _ARENA_ALIGN
        if at + nbytes > self.nbytes:
            return None
        self.used = at + nbytes
        return at

    def reset(self) -> None:
        """Take every part back (the caller's stream drained first: no copy or launch of a part in flight)."""
        self.used = 0

    def copy(self, at: int, data: np.ndarray, stream: Any) -> None:
        """Stage ``data`` (uint8) at offset ``at`` of the host buffer and copy it to the device's, on ``stream``."""
        self.host[at : at + len(data)] = data
        rt = self.cupy.cuda.runtime
        rt.memcpyAsync(self.device.ptr + at, self.host.ctypes.data + at, len(data), rt.memcpyHostToDevice, stream.ptr)


class PreparedGemms:
    """The prepared (shrink, expand) segment GEMMs of each group's layers a pass has launched, kept by what they
    read and the layer (:meth:`get`), their argument arrays in an :class:`ArgsArena` (made at the first preparation)
    on CuPy ``cupy``'s device ``device_id``, the GEMMs run with ``workspace`` (the SM90 kernel's scratch)."""

    def __init__(self, cupy: Any, workspace: Any, device_id: int) -> None:
        self.cupy, self.workspace, self.device_id = cupy, workspace, device_id
        self.arena: ArgsArena | None = None
        self._pass_bytes = 0  # arena bytes this pass's packs took (what the arena must hold at once, at least)
        self._gemms: dict[tuple[Any, int], tuple[Any, Any]] = {}

    def begin_pass(self) -> None:
        """A pass begins: the arena's growth (where it fills) counts its packs from here."""
        self._pass_bytes = 0

    def get(
        self,
        key: tuple[Any, ...],
        layer: int,
        problems: Callable[[], tuple[Any, Any]],
        operands: tuple[Any, Any, Any],
        stream: Any,
    ) -> tuple[Any, Any]:
        """The prepared (shrink, expand) GEMMs of layer ``layer`` of the group whose GEMMs ``key`` describes: every
        value their arrays hold but the layer's A and Bt addresses (the served runs, rows, addresses of x, the slot
        arrays, ``t`` and ``z``, strides). On a miss, that layer's alone: ``problems()`` gives its shrink and expand
        :class:`~fi_ffi.ops.segment_gemm.SegmentGEMMArgs`, ``operands`` the descriptors of x, ``t`` and ``z`` (the
        kernel reads their dtypes); both are checked, then their arrays packed into one host buffer
        (:func:`pack_args`) and copied into the arena in one copy on ``stream``, queued behind the launches before."""
        found = self._gemms.get((key, layer))
        if found is None:
            found = self._gemms[(key, layer)] = self._prepare(problems(), operands, stream)
        return found

    def _prepare(self, pair: tuple[Any, Any], operands: tuple[Any, Any, Any], stream: Any) -> tuple[Any, Any]:
        data, offsets = pack_args(pair)
        at = self._take(len(data), stream)
        assert self.arena is not None
        base = self.arena.device.ptr + at
        ends = [*offsets[1:], len(data)]

        def prepare(i: int, args: Any, x: Any, out: Any, column_major: bool) -> Any:
            view = kernels.Tensor(base + offsets[i], (ends[i] - offsets[i],), "uint8", self.device_id)
            return kernels.prepare_segment_gemm_problems(
                args, x, out, column_major, workspace=self.workspace, args_buffer=view, backend="sm90",
                stream=stream.ptr, copy_args=False,
            )  # fmt: skip

        x, t, z = operands
        gemms = prepare(0, pair[0], x, t, True), prepare(1, pair[1], t, z, False)
        self.arena.copy(at, data, stream)  # (after both checks: nothing copied for problems refused)
        return gemms

    def _take(self, nbytes: int, stream: Any) -> int:
        """An arena offset of ``nbytes``; where the arena is full, the stream drains, every prepared GEMM is dropped
        (their arrays' parts reused) and the arena grows to twice this pass's packs where they would not fit."""
        at = None if self.arena is None else self.arena.take(nbytes)
        if at is None:
            stream.synchronize()  # (no launch reading the arena's arrays in flight past this)
            self._gemms.clear()  # (this pass's layers launched before prepared again at their next launch)
            need = 2 * (self._pass_bytes + nbytes + _ARENA_ALIGN)
            if self.arena is None or self.arena.nbytes < need:
                self.arena = None  # (freed before the larger one is made)
                self.arena = ArgsArena(self.cupy, max(ARENA_BYTES, need))
            self.arena.reset()
            self._pass_bytes = 0
            at = self.arena.take(nbytes)
            assert at is not None
        self._pass_bytes += nbytes + _ARENA_ALIGN
        return at

    def clear(self) -> None:
        """Drop every prepared GEMM and free the arena (the caller's stream drained first)."""
        self._gemms.clear()
        self.arena = None

    @property
    def count(self) -> int:
        """The prepared (shrink, expand) pairs kept: one per layer launched of each group and pass shape."""
        return len(self._gemms)


class SegmentForm:
    """The segment form's state for one engine's slots (:class:`~fi_engine.lora.device.DeviceSlots`): the 16-bit
    scratch ``t`` (``[max_rows, t_width]``) and ``z`` (``[max_rows, max n]``, allocated at the first use), a
    workspace of its own (the SM90 kernel's scratch), the step's row slots, and the prepared GEMMs of each group's
    layers (:meth:`prepared`, :class:`PreparedGemms`)."""

    def __init__(self, cupy: Any, dtype: str, device_id: int, max_rows: int, t_width: int, max_n: int) -> None:
        self.cupy, self.dtype, self.device_id = cupy, dtype, device_id
        self.max_rows, self.max_n = max_rows, max_n
        self.t = cupy.zeros((max_rows, t_width), np.uint16)
        self.z: Any = None
        self.workspace = kernels.Workspace.allocate(device_id, float_bytes=32 << 20, int_bytes=1 << 16)
        self.gemms = PreparedGemms(cupy, self.workspace, device_id)
        self._slots: np.ndarray | None = None

    def begin_step(self, slots: np.ndarray | None) -> None:
        """The row slots of the pass about to run (the host's ``lora_slots`` of its rows, copied), or None after it:
        :meth:`covers` answers only for the pass whose slots were given."""
        self._slots = None if slots is None else np.array(slots, np.int32)
        self.gemms.begin_pass()

    def covers(self, rows: int) -> bool:
        """Whether the step's row slots are known for a pass of ``rows`` rows (:meth:`begin_step`)."""
        return self._slots is not None and len(self._slots) == rows

    def tensor(self, address: int, shape: tuple[int, ...]) -> Any:
        """An fi_ffi descriptor of the 16-bit rows at ``address`` (what the kernel reads the dtypes from)."""
        return kernels.Tensor(address, shape, self.dtype, self.device_id)

    def scratch_z(self) -> Any:
        """The expand's output, ``[max_rows, max_n]`` 16-bit rows (CuPy, made on first use and kept): the SM90
        segment GEMM writes it, and the add kernel adds ``scale * z`` into the projection's output."""
        if self.z is None:
            self.z = self.cupy.zeros((self.max_rows, self.max_n), np.uint16)
        return self.z

    def prepared(
        self,
        key: tuple[Any, ...],
        layer: int,
        problems: Callable[[], tuple[Any, Any]],
        operands: tuple[Any, Any, Any],
        stream: Any,
    ) -> tuple[Any, Any]:
        """The prepared (shrink, expand) GEMMs of layer ``layer`` of the group whose GEMMs ``key`` describes,
        prepared at this call where they are not kept (:meth:`PreparedGemms.get`)."""
        return self.gemms.get(key, layer, problems, operands, stream)

    def close(self) -> None:
        """Free the workspace and the arena (the caller's stream drained first: no launch of the form in flight)."""
        self.gemms.clear()
        self.workspace.close()

    @property
    def prepared_count(self) -> int:
        """The prepared (shrink, expand) pairs kept: one per layer launched of each group and pass shape served."""
        return self.gemms.count

    @property
    def slots(self) -> np.ndarray:
        assert self._slots is not None
        return self._slots
