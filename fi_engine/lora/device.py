"""The adapters' GPU slots (:class:`DeviceSlots`): per projection group one ``A`` and one ``Bt`` array of every slot
(:mod:`fi_engine.lora.slots`' layout), a float32 scale and the groups' bits per slot, the shrink's float32 scratch
and the fused step's in-grid shrinks' counters (a pair per layer and group); :meth:`DeviceSlots.write` copies a
packed adapter into a slot, :meth:`DeviceSlots.apply` adds the adapters of a step's rows to a projection's output
(:mod:`fi_engine.kernels.lora_bgmv`). Allocated once, when the engine opens: a slot is rewritten in place, so a
captured CUDA graph reads whatever adapter its slots hold at replay."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ..kernels.lora_bgmv import SHRINK_WARPS, LoraBgmv, LoraLaunch, expand_args, shrink_args
from ..kernels.lora_fused import LoraExpand
from .segment_form import SEGMENT_MIN_ROWS, SegmentForm, expand_problems, served_segments, shrink_problems
from .slots import PackedAdapter, SlotLayout

__all__ = ["DeviceSlots"]

_MAX_LAUNCHES = 4096  # prepared launches kept (a step shape's per layer and group); cleared past it


class DeviceSlots:
    """``slots`` GPU slots of ``layout`` in ``dtype`` on CuPy's current device, for steps of up to ``max_rows`` token
    rows, the kernels launched on ``stream`` (a ``cupy.cuda.Stream``)."""

    prefill_segment_gemm = True
    """Whether a pass of more than :attr:`segment_min_rows` rows (a prefill's) runs its adapters' shrink and expand
    as FlashInfer's segment GEMMs on tensor cores (:mod:`fi_engine.lora.segment_form`) where they fit (an SM 9.x GPU,
    a rank and part sizes of multiples of 8, no CUDA-graph capture, the pass's row slots known); else the CUDA-core
    kernels. A 4096-token prefill with a rank-16 adapter on the 8B shape took 131.9 ms against 157.1 with the
    CUDA-core kernels, and 136.6 against 157.6 where each pass's prompt was 16 tokens shorter than the last, as in
    serving (base 100.0; H200, benchmarks/RESULTS.md). Read at each launch: set it on the class to compare
    (``benchmarks/bench_lora.py --lora-prefill-form``)."""

    segment_min_rows = SEGMENT_MIN_ROWS
    """The rows a pass must exceed to take the segment form."""

    def __init__(self, cupy: Any, layout: SlotLayout, slots: int, dtype: str, max_rows: int, stream: Any) -> None:
        self.cupy, self.layout, self.slots, self.stream = cupy, layout, slots, stream
        storage = np.float16 if dtype == "float16" else np.uint16
        self.arrays = {
            g.name: (
                cupy.zeros((slots, *layout.a_shape(g)), storage),
                cupy.zeros((slots, *layout.bt_shape(g)), storage),
            )
            for g in layout.groups
        }
        self.scale = cupy.zeros(slots, np.float32)
        self.targets = cupy.zeros(slots, np.int32)  # no group: every kernel skips the slot's rows
        self.t = cupy.zeros((max_rows, layout.t_width), np.float32)
        # the fused step's in-grid shrinks' counters: a pair per layer and group (each call site its own), which
        # only grow (csrc/fused_gemv.cu's lora_ticket)
        self.sync = cupy.zeros((layout.num_layers, len(layout.groups), 2), np.uint64)
        self.kernels = LoraBgmv(dtype, stream)
        self._groups = {g.name: g for g in layout.groups}
        self._launches: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self.host_targets = np.zeros(slots, np.int64)  # targets' copy on the host: the segment form's runs
        self.max_rows = max_rows
        self._segment_form: SegmentForm | bool | None = None  # None: not asked yet; False: it does not fit

    @property
    def nbytes(self) -> int:
        """Bytes of the slot arrays (every slot)."""
        return sum(a.nbytes + b.nbytes for a, b in self.arrays.values())

    def write(self, slot: int, packed: PackedAdapter) -> None:
        """Copy ``packed`` into slot ``slot`` on the stream (behind the steps launched before, ahead of those after);
        the groups it leaves alone keep their old bytes, which its bit, cleared, keeps every kernel from reading."""
        s = self.stream
        for name, (a, bt) in self.arrays.items():
            if name in packed.arrays:
                host_a, host_bt = packed.arrays[name]
                a[slot].set(host_a, stream=s)
                bt[slot].set(host_bt, stream=s)
        self.scale[slot : slot + 1].set(np.array([packed.scale], np.float32), stream=s)
        self.targets[slot : slot + 1].set(np.array([packed.targets], np.int32), stream=s)
        self.host_targets[slot] = packed.targets

    def clear(self, slot: int) -> None:
        """Slot ``slot`` takes no group any more (its adapter was unloaded)."""
        self.targets[slot : slot + 1].set(np.zeros(1, np.int32), stream=self.stream)
        self.host_targets[slot] = 0

    def apply(self, group: str, layer: int, rows: int, x: int, x_ld: int, y: int, y_ld: int, slots: int) -> None:
        """``y[r] += scale[s] * B_s A_s x[r]`` for each of ``rows`` rows of slot ``s = slots[r] >= 0`` whose adapter
        changes ``group`` (``"qkv"``, ``"o"``, ``"gate_up"``, ``"down"``) in layer ``layer``: ``x`` the projection's
        16-bit input rows (stride ``x_ld`` elements), ``y`` its output rows (stride ``y_ld``), ``slots`` the step's
        int32 device array of row slots (``lora_slots`` of the step views). Two launches, their arguments checked and
        packed once per (group, layer, rows, addresses); in the segment form (:attr:`prefill_segment_gemm`) two
        segment GEMMs and an add."""
        if rows > self.segment_min_rows and self.prefill_segment_gemm:
            # (capture asked first: the form's first use allocates its workspace, which no capture may see)
            capturing = self.cupy.cuda.runtime.streamIsCapturing(self.stream.ptr)
            form = None if capturing else self.segment_form()
            # (16-byte rows too, as the SM90 kernel and the add need; a strided or offset view may not be)
            aligned = all(v % 8 == 0 for v in (x_ld, y_ld)) and x % 16 == 0 and y % 16 == 0
            if form is not None and aligned and form.covers(rows):
                self._apply_segments(form, group, layer, rows, x, x_ld, y, y_ld, slots)
                return
        key = (group, layer, rows, x, x_ld, y, y_ld, slots)
        launch = self._launches.get(key)
        if launch is None:
            if len(self._launches) >= _MAX_LAUNCHES:
                self._launches.clear()
            launch = self._launches[key] = self._prepare(group, layer, rows, x, x_ld, y, y_ld, slots)
        shrink, expand = launch
        self.kernels.launch_shrink(shrink)
        self.kernels.launch_expand(expand)

    def begin_step(self, slots: np.ndarray | None) -> None:
        """The host's row slots of the pass about to run (its ``lora_slots``), or None once it has run: the segment
        form serves a pass only where they are known for its rows (see :attr:`prefill_segment_gemm`)."""
        if slots is None:
            if isinstance(self._segment_form, SegmentForm):
                self._segment_form.begin_step(None)
        elif self.takes_segment_form(len(slots)):
            form = self.segment_form()
            assert form is not None
            form.begin_step(slots)

    def close(self) -> None:
        """Free the segment form's workspace, where it was made (the slot arrays go with CuPy). Idempotent."""
        if isinstance(self._segment_form, SegmentForm):
            self._segment_form.close()
            self._segment_form = False

    def takes_segment_form(self, rows: int) -> bool:
        """Whether a pass of ``rows`` rows with adapters runs their segment form (:attr:`prefill_segment_gemm` on,
        more than :attr:`segment_min_rows` rows, and the form fits these slots): the model runner then runs the pass
        eagerly, not as a padded prefill graph, whose replays could not follow each pass's segments."""
        return self.prefill_segment_gemm and rows > self.segment_min_rows and self.segment_form() is not None

    def segment_form(self) -> SegmentForm | None:
        """The segment form's state (made at the first call), or None where it does not fit these slots: a GPU
        other than SM 9.x (the segment GEMM's SM90 kernel), a rank, part size or input size no multiple of 8."""
        if self._segment_form is None:
            from ..kernels.system import FiFFIError, compute_capability

            device_id = self.cupy.cuda.Device().id
            try:
                sm90 = compute_capability(device_id)[0] == 9
            except FiFFIError:
                sm90 = False
            sizes = [self.layout.rank] + [v for g in self.layout.groups for v in (*g.outs, g.k)]
            fits = sm90 and all(v % 8 == 0 for v in sizes)
            self._segment_form = False
            if fits:
                dtype = "float16" if self.arrays[self.layout.groups[0].name][0].dtype == np.float16 else "bfloat16"
                max_n = max(g.n for g in self.layout.groups)
                self._segment_form = SegmentForm(self.cupy, dtype, device_id, self.max_rows, self.layout.t_width, max_n)
        return self._segment_form if isinstance(self._segment_form, SegmentForm) else None

    def _apply_segments(
        self, form: SegmentForm, group: str, layer: int, rows: int, x: int, x_ld: int, y: int, y_ld: int, slots: int
    ) -> None:
        """:meth:`apply` in the segment form: the shrink and expand GEMMs over the pass's served runs, then
        ``y += scale * z`` (the module docstring of :mod:`~fi_engine.lora.segment_form`)."""
        g = self._groups[group]
        runs = served_segments(form.slots, self.host_targets, g.bit)
        if not len(runs[0]):
            return  # no row's adapter changes this group
        t, t_ld = int(form.t.data.ptr), form.t.shape[1]
        z = int(form.scratch_z().data.ptr)

        def problems() -> tuple[Any, Any]:  # this layer's shrink and expand
            a_at, a_slot, width, _ = self.shrink_operands(group, layer)
            e = self.expand_operands(group, layer, slots)
            shrink = shrink_problems(runs, x, x_ld, a_at, a_slot, width, g.k, t, t_ld)
            return shrink, expand_problems(runs, t, t_ld, e.bt, e.b_slot, e.rank, g.outs, z, g.n)

        # the key, with the layer: every value the group's GEMM arrays hold but a layer's A and Bt addresses (those
        # follow from the slot arrays' in the key and the layer): the served runs (starts, lengths and slot of each:
        # how the row slots and the slots' targets reach the GEMMs; a slot reloaded with an adapter of other groups
        # keeps the row slots but changes them, and problems of the old runs would leave z's rows of the new ones
        # stale), rows, x and its stride, and t and z (the form's, fixed); the group fixes k, the parts and n
        served = b"".join(v.tobytes() for v in runs)
        a, bt = (int(v.data.ptr) for v in self.arrays[group])
        key = (group, rows, x, x_ld, served, a, bt, t, z)
        operands = (form.tensor(x, (rows, g.k)), form.tensor(t, (rows, t_ld)), form.tensor(z, (rows, g.n)))
        shrink_gemm, expand_gemm = form.prepared(key, layer, problems, operands, self.stream)
        shrink_gemm()
        expand_gemm()
        scale, targets = int(self.scale.data.ptr), int(self.targets.data.ptr)
        self.kernels.add_scaled(rows, z, g.n, slots, scale, targets, g.bit, g.n, y, y_ld)

    def has(self, group: str) -> bool:
        """Whether the slots hold adapters' matrices of ``group`` (the base model has its projections)."""
        return group in self._groups

    def shrink_operands(self, group: str, layer: int) -> tuple[int, int, int, int]:
        """``(a, a_slot, width, bit)`` of ``group``'s shrink in layer ``layer``: slot 0's ``A [width, k]`` of that
        layer (an address), the elements between slots, its rows (parts times the rank) and the group's bit."""
        g, (a, _) = self._groups[group], self.arrays[group]
        width = len(g.modules) * self.layout.rank
        return int(a.data.ptr) + 2 * layer * width * g.k, int(np.prod(a.shape[1:])), width, g.bit

    def expand_operands(self, group: str, layer: int, slots: int, in_grid: bool = False) -> LoraExpand:
        """What the fused GEMVs' expand epilogue reads for ``group`` in layer ``layer`` (the step's int32 row slots
        at ``slots``): :class:`~fi_engine.kernels.lora_fused.LoraExpand` over the shrink's scratch ``t``; with
        ``in_grid`` also what the GEMV's in-grid shrink reads (the group's A of the layer, the scales) and the layer
        and group's own counters."""
        g, (_, bt) = self._groups[group], self.arrays[group]
        rank = self.layout.rank
        n0, n1 = g.split
        e = LoraExpand(
            t=int(self.t.data.ptr), t_ld=self.t.shape[1], slots=slots, targets=int(self.targets.data.ptr),
            bit=g.bit, bt=int(bt.data.ptr) + 2 * layer * rank * g.n, b_slot=int(np.prod(bt.shape[1:])), rank=rank,
            n0=n0, n1=n1,
        )  # fmt: skip
        if not in_grid:
            return e
        if not 0 <= layer < self.sync.shape[0]:
            raise ValueError(f"layer: expected 0 to {self.sync.shape[0] - 1}, got {layer}")
        a, a_slot, width, _ = self.shrink_operands(group, layer)
        at = list(self._groups).index(group)
        sync = int(self.sync.data.ptr) + 16 * (layer * len(self._groups) + at)  # (sync: [layers, groups, 2] uint64)
        return replace(e, a=a, a_slot=a_slot, scale=int(self.scale.data.ptr), width=width, sync=sync)

    def prepared_shrink(
        self, launcher: Any, group: str, layer: int, rows: int, x: int, x_ld: int, slots: int
    ) -> Callable[[], None]:
        """:meth:`apply`'s shrink alone (``t = scale * A x`` of ``group`` in ``layer``), packed once through
        ``launcher`` (a Dense's :class:`~fi_engine.kernels.launch.Launcher`, on this stream): for the fused step,
        whose GEMV after it adds ``t``'s expand in its epilogue (:mod:`~fi_engine.kernels.lora_fused`). Launched
        with programmatic dependent launch: its blocks wait on the GPU for the kernel before them, and the GEMV
        after them loads its weights while they sum."""
        launch = self._shrink(group, layer, rows, x, x_ld, slots)
        if launch.long:
            raise ValueError(f"rows: the fused step's shrink takes at most a decode step's rows, got {rows}")
        grid, args = launch.grid, launch.args
        fn = self.kernels.shrink_function
        ints = [int(a) for a in args]
        return launcher.prepared_kernel(fn, grid, 32 * SHRINK_WARPS, 0, ints, "lora shrink", pdl=True)

    def normed_shrink_operands(self, group: str, layer: int, rows: int, slots: int) -> dict[str, int]:
        """The operands of ``group``'s shrink in ``layer`` over ``rows`` rows the fused GEMV after it normalizes,
        the step's int32 ``slots`` among them, as :meth:`~fi_engine.kernels.lora_fused.LoraFusedGemvs.prepared_shrink`
        takes them by keyword after the norm's (``k`` .. ``t_ld``): its A matrices, the slots' scales and target
        bits, and the scratch ``t`` it writes. ValueError naming ``rows`` past the scratch's rows."""
        if rows > self.t.shape[0]:
            raise ValueError(f"rows: {rows} exceed the LoRA scratch's {self.t.shape[0]} rows")
        a, a_slot, width, bit = self.shrink_operands(group, layer)
        operands = {"k": self._groups[group].k, "slots": slots, "scale": int(self.scale.data.ptr)}
        operands |= {"targets": int(self.targets.data.ptr), "bit": bit, "a": a, "a_slot": a_slot, "width": width}
        return operands | {"t": int(self.t.data.ptr), "t_ld": self.t.shape[1]}

    def _shrink(self, group: str, layer: int, rows: int, x: int, x_ld: int, slots: int) -> LoraLaunch:
        if rows > self.t.shape[0]:
            raise ValueError(f"rows: {rows} exceed the LoRA scratch's {self.t.shape[0]} rows")
        a_at, a_slot, width, bit = self.shrink_operands(group, layer)
        t, t_ld = int(self.t.data.ptr), self.t.shape[1]
        scale, targets = int(self.scale.data.ptr), int(self.targets.data.ptr)
        k = self._groups[group].k
        return shrink_args(rows, x, x_ld, slots, scale, targets, bit, a_at, a_slot, width, k, t, t_ld)

    def _prepare(
        self, group: str, layer: int, rows: int, x: int, x_ld: int, y: int, y_ld: int, slots: int
    ) -> tuple[LoraLaunch, LoraLaunch]:
        g = self._groups[group]
        shrink = self._shrink(group, layer, rows, x, x_ld, slots)
        e = self.expand_operands(group, layer, slots)
        width = len(g.modules) * e.rank  # (t's entries each row stages)
        expand = expand_args(
            rows, e.t, e.t_ld, width, slots, e.targets, e.bit, e.bt, e.b_slot, e.rank, g.n, e.n0, e.n1, y, y_ld
        )
        return shrink, expand
