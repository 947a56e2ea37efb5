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

The segments come from the host (the step's row slots, :meth:`SegmentForm.begin_step`); their argument arrays are
copied to the GPU once per step shape (synchronously, after the stream drains) and kept: a prefill repeated with the
same rows and adapters launches with no copy. A pass under CUDA-graph capture takes the CUDA-core form, whose launches
read the slots on the device at each replay.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..kernels import flashinfer as kernels
from .batch import NO_ADAPTER, segments

__all__ = ["SEGMENT_MIN_ROWS", "SegmentForm", "expand_problems", "served_segments", "shrink_problems"]

SEGMENT_MIN_ROWS = 64
"""Steps of more token rows than this (a prefill's) take the segment form where it is on; fewer: the CUDA-core form."""

_MAX_PREPARED = 2048  # prepared GEMM pairs kept (per step shape, group and layer); the oldest dropped past it


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
    problems: np.ndarray, x_ptr: np.ndarray, w_ptr: np.ndarray, y_ptr: np.ndarray, lds: tuple[int, int, int]
) -> Any:
    p = len(problems)
    as_address = lambda a: np.asarray(a, np.uint64).view(np.int64)  # noqa: E731  (addresses past 2**63 keep their bits)
    return kernels.SegmentGEMMArgs(
        problems=np.asarray(problems, np.int32).reshape(p, 3), x_ptr=as_address(x_ptr), w_ptr=as_address(w_ptr),
        y_ptr=as_address(y_ptr), x_ld=np.full(p, lds[0], np.int64), w_ld=np.full(p, lds[1], np.int64),
        y_ld=np.full(p, lds[2], np.int64), segments=np.arange(p, dtype=np.int64),
    )  # fmt: skip


def shrink_problems(
    runs: tuple[np.ndarray, np.ndarray, np.ndarray], x: int, x_ld: int, a: int, a_slot: int, width: int, k: int,
    t: int, t_ld: int, itemsize: int = 2,
) -> Any:  # fmt: skip
    """The shrink's segment GEMM problems (:class:`~fi_ffi.ops.segment_gemm.SegmentGEMMArgs`, weights
    column-major): for each served run ``(start, length, slot)`` of :func:`served_segments`, ``(length, width, k)``
    over ``x`` rows from ``start`` (stride ``x_ld`` elements), ``A_slot`` at ``a + slot * a_slot`` elements (``[width,
    k]``, leading dimension ``k``) and ``t`` rows from ``start`` (stride ``t_ld``). Addresses in bytes."""
    starts, lengths, ids = runs
    problems = np.stack([lengths, np.full_like(lengths, width), np.full_like(lengths, k)], 1)
    u = np.uint64
    x_ptr = u(x) + (starts * x_ld * itemsize).astype(u)
    w_ptr = u(a) + (ids * a_slot * itemsize).astype(u)
    y_ptr = u(t) + (starts * t_ld * itemsize).astype(u)
    return _args(problems, x_ptr, w_ptr, y_ptr, (x_ld, k, t_ld))


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
    starts, lengths, ids = runs
    n, parts = sum(outs), len(outs)
    offsets = np.concatenate([[0], np.cumsum(outs)[:-1]]).astype(np.int64)
    part = np.tile(np.arange(parts), len(starts))
    start, length, slot = (np.repeat(v, parts) for v in (starts, lengths, ids))
    problems = np.stack([length, np.asarray(outs, np.int64)[part], np.full_like(length, rank)], 1)
    u = np.uint64
    x_ptr = u(t) + ((start * t_ld + part * rank) * itemsize).astype(u)
    w_ptr = u(bt) + ((slot * b_slot + offsets[part]) * itemsize).astype(u)
    y_ptr = u(z) + ((start * z_ld + offsets[part]) * itemsize).astype(u)
    return _args(problems, x_ptr, w_ptr, y_ptr, (t_ld, n, z_ld))


class SegmentForm:
    """The segment form's state for one engine's slots (:class:`~fi_engine.lora.device.DeviceSlots`): the 16-bit
    scratch ``t`` (``[max_rows, t_width]``) and ``z`` (``[max_rows, max n]``, allocated at the first use), a
    workspace of its own (the SM90 kernel's scratch), the step's row slots and the prepared GEMMs by step shape."""

    def __init__(self, cupy: Any, dtype: str, device_id: int, max_rows: int, t_width: int, max_n: int) -> None:
        self.cupy, self.dtype, self.device_id = cupy, dtype, device_id
        self.max_rows, self.max_n = max_rows, max_n
        self.t = cupy.zeros((max_rows, t_width), np.uint16)
        self.z: Any = None
        self.workspace = kernels.Workspace.allocate(device_id, float_bytes=32 << 20, int_bytes=1 << 16)
        self._slots: np.ndarray | None = None
        self._drained = False
        self._prepared: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def begin_step(self, slots: np.ndarray | None) -> None:
        """The row slots of the pass about to run (the host's ``lora_slots`` of its rows, copied), or None after it:
        :meth:`covers` answers only for the pass whose slots were given."""
        self._slots = None if slots is None else np.array(slots, np.int32)
        self._drained = False

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

    def prepared(self, key: tuple[Any, ...], stream: Any, build: Any) -> tuple[Any, Any]:
        """The prepared (shrink, expand) GEMMs of ``key`` (the step's slots, group, layer, rows, addresses and
        served runs), made by ``build(prepare)`` on a miss, where ``prepare(args, x, out, column_major)`` copies
        one GEMM's arrays. The stream drains before the first copy of a step (a buffer freed by CuPy may still
        be read by a launch)."""
        assert self._slots is not None
        full_key = (self._slots.tobytes(), *key)
        found = self._prepared.get(full_key)
        if found is not None:
            return found
        if not self._drained:
            stream.synchronize()
            self._drained = True
        if len(self._prepared) >= _MAX_PREPARED:
            self._prepared.clear()  # (drained above: no launch of theirs is in flight)

        def prepare(args: Any, x: Any, out: Any, column_major: bool) -> Any:
            buffer = self.cupy.empty(max(16, kernels.segment_gemm_args_bytes(args.count)), np.uint8)  # (no fill:
            # a fill on CuPy's stream might land after the synchronous copy)
            view = kernels.Tensor(int(buffer.data.ptr), (buffer.size,), "uint8", self.device_id)
            gemm = kernels.prepare_segment_gemm_problems(
                args, x, out, column_major, workspace=self.workspace, args_buffer=view, backend="sm90",
                stream=stream.ptr,
            )  # fmt: skip
            return gemm, buffer  # (the buffer kept with it)

        found = self._prepared[full_key] = build(prepare)
        return found

    def close(self) -> None:
        """Free the workspace (the caller's stream drained first: no launch of the form in flight)."""
        self._prepared.clear()
        self.workspace.close()

    @property
    def prepared_count(self) -> int:
        """The prepared (shrink, expand) pairs kept: one per step shape, group and layer the form has served."""
        return len(self._prepared)

    @property
    def slots(self) -> np.ndarray:
        assert self._slots is not None
        return self._slots
