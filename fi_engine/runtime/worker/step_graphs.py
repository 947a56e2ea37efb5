"""The model runner's CUDA graphs, a part of the runner (:class:`~fi_engine.runtime.worker.model_runner.ModelRunner`
holds one, ``runner.step_graphs``): the decode step captured at each batch size of a ladder up to ``max_batch`` rows
(:func:`~fi_engine.runtime.worker.graph_shapes.decode_batches`: 1, 2, 4, ..., ``max_batch``) and each step replayed as
the smallest graph holding its occupied slots (the step's index arrays copied into the graph's buffers, the plan made
again with ``enable_cuda_graph`` for that batch), and a prefill padded up to a token-row bucket
(:func:`~fi_engine.runtime.worker.graph_shapes.prefill_buckets`) replayed as that bucket's graph, captured the first
time the bucket and request slots (the batch size padded up:
:func:`~fi_engine.runtime.worker.graph_shapes.prefill_slots`) are met (at most :data:`_PREFILL_GRAPHS` kept, the least
recently replayed evicted first). Capture and replay:
:class:`~fi_engine.kernels.graph.CudaGraph`. The graphs run the runner's pass (its ``forward``, ``head``, fused step
and sampler's argmax); its switches ``prefill_graphs``, ``graph_fused_decode``, ``graph_fused_int4_rows``,
``decode_graph_ladder`` and ``lora_base_graphs`` say which.

An engine serving LoRA adapters (the runner's ``lora``) captures each decode graph twice (``lora_base_graphs``, on by
default): with the adapters' launches (``lora_graphs``), replayed by a step where a row takes an adapter, and without
them (``graphs``), the same pass as an engine without adapters (the fused step at one row), replayed by a step where
none does. The second set costs, once, at open: one more eager warm-up step and one more capture per batch size of the
ladder (``capture_s`` keeps the seconds of each set), and the graphs' own memory, in the driver: no buffer, since
every buffer a decode step touches is the runner's already (a capture that allocates is refused). A prefill graph is
keyed by whether a row of it takes an adapter too, so a prefill of base rows replays one captured without them.

A family whose steps of some rows choose their attention kernel per step (its ``decode_graph_kernels``: the Llama
family's graphs of fewer rows than the runner's ``tensor_core_decode_rows``, by context) has those sizes captured once
more, the same staged step planned for the second kernel (``second_graphs``, ``second_lora_graphs``), and each replay
takes the graph whose captured plan kind is the step's plan's.
"""

from __future__ import annotations

import time
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..sched.step_arrays import fill_decode
from .graph_shapes import bucket_for, decode_batches
from .state import RunnerState
from .step_tuning import TUNE_WORDS, Shapes, StepTuning, shapes_from_words, shapes_words, step_ms, tuned_step

__all__: list[str] = []


# Padded prefill graphs kept per engine. Each is ~10 kernel nodes per layer (a few hundred KB of host and device
# memory for a 30-layer model), and a shape evicted costs one capture when met again (about 40 ms for SmolLM2 on an
# H100, a replay 2-14 ms). A server admits requests in every group size; padded to slots of 1, 3, 7, 15, ... real
# requests (paging.prefill_slots) they meet a few shapes per bucket, and 64 hold the buckets of a serving mix of
# prompt lengths at every slot count up to 64 requests; the key grows with (bucket, slots) pairs, so some bound is
# needed.
_PREFILL_GRAPHS = 64


def _refuse_allocation(size: int) -> Any:
    """A CuPy allocator that refuses: installed while the decode step is captured."""
    raise RuntimeError(
        f"the decode step asked CuPy for {size} bytes of device memory while being captured as a "
        f"CUDA graph; allocate every buffer it uses in LlamaEngine.__init__ instead"
    )


class StepGraphs:
    """The decode graphs and the padded prefill graphs of ``runner`` (none until :meth:`capture`, or a prefill of a
    new shape, makes them)."""

    def __init__(self, runner: RunnerState) -> None:
        self.runner = runner
        self.graph: Any = None  # the decode graph of max_batch rows (with cuda_graph), one of `graphs`
        # the decode graphs a step with no adapter row replays, by their rows (on the kernel of each size's first
        # capture: a step planned for a size's second kernel replays `second_graphs`)
        self.graphs: dict[int, Any] = {}
        # those a step where a row takes a LoRA adapter replays (an engine serving adapters), by their rows: `graphs`
        # itself where the runner's lora_base_graphs is off (every step replays the adapters' graphs then)
        self.lora_graphs: dict[int, Any] = {}
        # seconds to warm up and capture each set of decode graphs (False: without the adapters' launches; True: with)
        self.capture_s: dict[bool, float] = {}
        # what choosing the GEMM launches in the captured step did, by the decode graph's rows (the runner's
        # tune_decode_graphs; a graph with no close launches has no entry)
        self.tuning: dict[int, StepTuning] = {}
        # a second decode graph of the same rows on another attention kernel, where the family's steps of those rows
        # choose their kernel per step (its decode_graph_kernels: Llama's one-row graph, the prefill kernel at long
        # contexts): replayed by a step whose plan is of that kernel; without the adapters' launches and with, as
        # `graphs` and `lora_graphs` (one dict where those are)
        self.second_graphs: dict[int, Any] = {}
        self.second_lora_graphs: dict[int, Any] = {}
        # each decode graph's plan schedule layout, which a replay must keep, by (rows, plan kind)
        self._plan_infos: dict[tuple[int, Any], Any] = {}
        self._batches: tuple[int, ...] = ()  # the rows of `graphs`, ascending (once captured)
        self._checked: set[tuple[int, Any]] = set()  # the (rows, plan kind) whose replay's plan layout was checked
        # each decode graph's plan kind ("batch_decode", "batch_prefill": the kernel it captured), checked every replay;
        # and that of the second graph of the rows that have one
        self._plan_kinds: dict[int, Any] = {}
        self._second_kinds: dict[int, Any] = {}
        # the padded prefill graphs by (bucket, request slots, plan info, adapters' launches in it), the least recently
        # replayed first
        self.prefill_cache: dict[tuple[int, ...], Any] = {}

    def batches(self) -> tuple[int, ...]:
        """The batch sizes (rows) of the decode graphs, ascending, the last ``max_batch``: those captured
        (``cuda_graph=True``), or before the capture those it will capture (the runner's ``decode_graph_ladder``)."""
        if self._batches:
            return self._batches
        r = self.runner
        return decode_batches(r.max_batch) if r.decode_graph_ladder else (r.max_batch,)

    def _decode_body(self, v: SimpleNamespace, rows: int) -> None:
        """One decode step on the device: forward, LM head, argmax into ``ids`` (what the graph captures); with the
        runner's ``graph_fused_decode``, forward and LM head as the fused step where it applies (``fuses``): at one
        row, and over int4 weights up to its ``graph_fused_int4_rows``. The adapters' launches are in it
        where the runner's ``step_lora`` is set."""
        r = self.runner
        most = r.graph_fused_int4_rows if r.dense.quantized.serves_int4 else 1
        r.decode_pass(v, rows, r.graph_fused_decode and rows <= most and r.fuses(rows), static_moe=r.static_moe)
        r.sampler.argmax(rows)

    def sets(self) -> tuple[bool, ...]:
        """The sets of decode graphs :meth:`capture` makes, by whether their steps take the LoRA adapters' launches:
        ``(False,)`` for an engine without adapters, ``(False, True)`` for one serving them, ``(True,)`` where the
        runner's ``lora_base_graphs`` is off (every step replays the adapters' graphs)."""
        r = self.runner
        if r.lora is None:
            return (False,)
        return (False, True) if r.lora_base_graphs else (True,)

    def capture(self) -> None:
        """For each batch size of :meth:`batches` and each set of :meth:`sets`: warm up one padded decode step eagerly
        (loads modules, compiles kernels, picks GEMM algorithms), then capture the same step into a CUDA graph."""
        r = self.runner
        # the captured step is GPU-bound: the GEMV serves only the shapes where the device runs it faster than
        # cuBLASLt (dense.gemv_bound); eagerly it serves every small-row GEMM, for its lower host time
        r.dense.bandwidth_bound = True
        try:
            self._capture_step()
        finally:
            r.dense.bandwidth_bound = False

    def _capture_step(self) -> None:
        r = self.runner
        sets = self.sets()
        if sets == (True,):  # (lora_base_graphs off) the one set serves every step
            self.graphs = self.lora_graphs
            self.second_graphs = self.second_lora_graphs
        self.capture_s = dict.fromkeys(sets, 0.0)
        try:
            for rows in self.batches():
                n_pages = fill_decode([None] * rows, r.page_size, r.decode_arrays)
                r.upload_decode(rows, n_pages, cuda_graph=True)
                v = r.view("decode", rows, rows)
                for adapters in sets:  # the same staged step and plan, with and without the adapters' launches
                    t = time.perf_counter()
                    r.step_lora = r.lora if adapters else None
                    graph = (self.lora_graphs if adapters else self.graphs)[rows] = self._captured_step(v, rows)
                    if not adapters and r.tune_decode_graphs and (r.comm is None or r.tp_tune_decode_graphs):
                        self._tune(v, rows, graph)  # (the adapters' set, captured next, takes the launches kept)
                    self.capture_s[adapters] += time.perf_counter() - t
                # the plan's schedule layout of this batch size, which every replay's plan must keep (checked once)
                kind = self._plan_kinds[rows] = getattr(r.decode_plan, "kind", None)
                self._plan_infos[(rows, kind)] = r.decode_plan.info
                self._capture_second(v, rows, sets)
        finally:
            r.step_lora = None  # (each step sets its own)
        self.graph = self.graphs[r.max_batch]
        self._batches = tuple(self.graphs)  # ascending: what each step's rows are cut to (serving)

    def _capture_second(self, v: SimpleNamespace, rows: int, sets: tuple[bool, ...]) -> None:
        """The second decode graph of ``rows`` rows, for each set of ``sets``, where the family names another kernel
        for that many rows (``decode_graph_kernels``): the same staged step planned for that kernel, captured with the
        GEMM launches the first graph's tuning kept. None where that plan falls back to the first graph's kernel."""
        r = self.runner
        for kind in r.family.decode_graph_kernels(r, rows):
            if kind == self._plan_kinds[rows]:
                continue
            r.plan_decode(rows, True, kind)
            if getattr(r.decode_plan, "kind", None) != kind:  # (refused: the first graph serves every step)
                continue
            for adapters in sets:
                t = time.perf_counter()
                r.step_lora = r.lora if adapters else None
                (self.second_lora_graphs if adapters else self.second_graphs)[rows] = self._captured_step(v, rows)
                self.capture_s[adapters] += time.perf_counter() - t
            self._second_kinds[rows] = kind
            self._plan_infos[(rows, kind)] = r.decode_plan.info

    def _captured_step(self, v: SimpleNamespace, rows: int) -> Any:
        """A new CUDA graph of one decode step of ``rows`` rows over the view ``v``, run eagerly first (loads modules,
        compiles kernels, times the GEMM shapes met first, packs the launches the capture records); the graph is
        closed where the capture fails."""
        from ...kernels.graph import CudaGraph

        r = self.runner
        self._decode_body(v, rows)
        r.stream.synchronize()
        graph = CudaGraph(r.stream_ptr)
        try:
            # Nothing in the step may allocate: memory handed out during capture would go back to CuPy's pool after
            # it and be reused while every replay still writes to it. The step only uses buffers made in __init__;
            # this allocator turns a regression into an error at capture instead of silent corruption.
            with r.cupy.cuda.using_allocator(_refuse_allocation), graph.capture():
                self._decode_body(v, rows)
            r.stream.synchronize()
        except BaseException:
            graph.close()
            raise
        return graph

    def _tune(self, v: SimpleNamespace, rows: int, graph: Any) -> None:
        """Keep, in ``graphs[rows]``, the decode graph of ``rows`` rows whose GEMM launches replay fastest
        (:func:`~fi_engine.runtime.worker.step_tuning.tuned_step`, from ``graph``, the one just captured)."""
        r = self.runner

        def keep(kept: Any) -> None:
            self.graphs[rows] = kept

        def capture() -> Any:
            return self._captured_step(v, rows)

        if r.comm is None:
            tuning = tuned_step(r.dense, rows, graph, capture, keep, lambda g: step_ms(g, r.stream, r.cupy))
        else:
            try:
                tuning = tuned_step(r.dense, rows, graph, capture, keep, self._slowest_rank_ms, self._rank0_shapes)
            except BaseException as exc:  # the other ranks wait in this step's collectives: tell them
                r.comm.abort(f"decode-graph tuning of {rows} rows failed: {type(exc).__name__}: {exc}")
                raise
        if tuning is not None:
            self.tuning[rows] = tuning

    def _rank0_shapes(self, shapes: Shapes) -> Shapes:
        """Tensor parallelism: rank 0's ``shapes`` (``tuned_step``'s list of close launches) on every rank, or none on
        any where a rank has not timed each of their launches (its own timings named other shapes)."""
        r = self.runner
        words = np.zeros(TUNE_WORDS, np.int64)
        if r.comm.rank == 0:
            mine = shapes_words(shapes)
            words[: len(mine)] = mine
        with r.stream:  # (the copies in and out on the collectives' stream, in order)
            device = r.cupy.asarray(words)
            r.comm.broadcast(device, root=0, stream=r.stream_ptr)
            got = shapes_from_words(device.get())
            ok = r.cupy.asarray(np.array([all(r.dense.timed_all(keys, labels) for keys, labels in got)], np.int32))
            r.comm.all_reduce(ok, op="min", stream=r.stream_ptr)
            return got if int(ok.get()[0]) else []

    def _slowest_rank_ms(self, graph: Any) -> float:
        """Tensor parallelism: ``graph``'s step time in ms (``step_ms``) on the slowest rank."""
        r = self.runner
        mine = step_ms(graph, r.stream, r.cupy)
        with r.stream:
            ms = r.cupy.asarray(np.array([mine], np.float32))  # (fi_ffi's tensors take no float64)
            r.comm.all_reduce(ms, op="max", stream=r.stream_ptr)
            return float(ms.get()[0])

    def replay_decode(self, rows: int, adapters: bool = False) -> None:
        """Replay the decode graph of ``rows`` rows (its index arrays staged and its plan made; its argmax is every
        greedy row's token): :meth:`planned_graph`'s."""
        self.planned_graph(rows, adapters).launch()

    def planned_graph(self, rows: int, adapters: bool = False) -> Any:
        """The decode graph of ``rows`` rows that the plan staged now replays: one of ``lora_graphs`` where
        ``adapters`` (a row of the step takes a LoRA adapter), else one of ``graphs``; the second graph of those rows
        (``second_lora_graphs``, ``second_graphs``) where the plan is of its kernel. RuntimeError where no graph of
        that size was captured on the plan's kernel, or the plan's schedule layout is not the capture's. (A benchmark
        that replays a step's graph by itself asks this one, as the engine's steps do.)"""
        kind = getattr(self.runner.decode_plan, "kind", None)
        if kind == self._plan_kinds[rows]:
            graphs = self.lora_graphs if adapters else self.graphs
        elif kind is not None and kind == self._second_kinds.get(rows):
            graphs = self.second_lora_graphs if adapters else self.second_graphs
        else:  # (a plan of another kernel: its workspace is not what the graph reads)
            captured = " and ".join(str(k) for k in (self._plan_kinds[rows], self._second_kinds.get(rows)) if k)
            raise RuntimeError(
                f"the decode graph of {rows} rows was captured with a {captured or None} plan; this step's plan is a "
                f"{kind} plan, which no captured kernel of that size can read"
            )
        if (rows, kind) not in self._checked:
            # FlashInfer keeps a CUDA-graph schedule's layout fixed for a fixed batch; the graph relies on it.
            if self.runner.decode_plan.info != self._plan_infos[(rows, kind)]:
                raise RuntimeError(
                    f"a CUDA-graph decode plan of {rows} rows changed its schedule layout; the captured graph "
                    f"cannot replay it"
                )
            self._checked.add((rows, kind))
        return graphs[rows]

    def shapes(self) -> list[tuple[int, int]]:
        """The ``(bucket rows, request slots)`` of every prefill graph held, in replay order (least recent first); an
        engine serving LoRA adapters may hold two graphs of one shape (with the adapters' launches and without), both
        listed."""
        return [(int(key[0]), int(key[1])) for key in self.prefill_cache]

    def prefill_bucket(self, nnz: int, slots: int) -> int | None:
        """The token rows a prefill of ``nnz`` rows is padded to, to run as that bucket's CUDA graph of ``slots``
        request slots (:meth:`_prefill_graph`; :func:`~fi_engine.runtime.worker.graph_shapes.prefill_slots` of its
        requests, or ``max_batch`` for a mixed pass); None: it runs eagerly, unpadded. Eager for MoE layers (host
        routing synchronizes), tensor parallelism, the families that run a pass of their own, the runner's
        ``prefill_graphs`` False, and a shape whose capture failed before (``prefill_graph_failures``)."""
        r = self.runner
        if not r.prefill_graphs or r.moe_layers or r.comm is not None or not r.family.llama_pass:
            return None
        bucket = bucket_for(nnz, r.prefill_buckets)
        return None if (bucket, slots) in r.prefill_graph_failures else bucket

    def run_padded_prefill(self, nnz: int, batch: int, bucket: int) -> bool:
        """The forward pass of a prefill padded to ``bucket`` rows and ``batch`` request slots
        (:func:`~fi_engine.runtime.worker.graph_shapes.prefill_slots`; the index arrays on the device), as that
        shape's graph, or eagerly if its capture fails; False when its CUDA-graph plan fails (e.g. FA2's split-KV
        scratch for a long bucket exceeds the workspace): recorded, and the caller runs the prefill eagerly, unpadded
        (the padded arrays begin with the unpadded ones, so the copy already made serves it)."""
        r = self.runner
        try:
            r.plan_prefill_padded(batch + 1)
        except Exception as exc:
            self._prefill_graph_failed(bucket, batch, "planning", exc)
            return False
        padded = r.view("padded prefill", bucket, batch + 1)
        if not self._prefill_graph(padded, bucket, batch):
            r.forward(padded, bucket, r.prefill_attention)  # the capture failed: the same pass, eagerly
        return True

    def _prefill_graph_failed(self, rows: int, batch: int, stage: str, exc: Exception) -> None:
        """Record why the prefill graph of ``rows`` rows and ``batch`` request slots failed (that shape is eager from
        now on: :meth:`prefill_bucket`; with LoRA adapters, for prefills with and without adapter rows alike: a
        shape's failure is kept per shape), and warn once."""
        why = f"{stage}: {type(exc).__name__}: {exc}"[:500]
        self.runner.prefill_graph_failures[(rows, batch)] = why
        warnings.warn(
            f"LlamaEngine: the prefill graph of {rows} token rows and {batch} request slots failed ({why}); prefills "
            f"of that shape run eagerly from now on (engine.prefill_graph_failures)",
            RuntimeWarning,
            stacklevel=2,
        )

    def _prefill_graph(self, v: SimpleNamespace, rows: int, batch: int) -> bool:
        """Run the padded prefill pass (``rows``: the bucket's token rows, ``v`` its views; ``batch`` request slots,
        real or empty, plus the padding request) as a CUDA graph, captured the first time its shape is met; False:
        the capture failed and the caller runs the same pass eagerly.

        Issuing ~10 launches per layer costs more host time than a small model's GPU takes for them, so an eager
        prefill is host-bound even at thousands of tokens. The graph's shape is the bucket, the batch size and
        the plan's schedule vector (and whether a row takes a LoRA adapter: the runner's ``step_lora``): a CUDA-graph
        plan (``enable_cuda_graph=True``) fixes every workspace offset and grid from ``qo_indptr[-1]`` (the bucket)
        and the batch size alone, and each prefill's plan copies its own schedule to those offsets before the
        replay; every buffer the pass touches was allocated in the constructor. A bucket, unlike an exact length, is
        met again, so it is captured on its first sight. At most :data:`_PREFILL_GRAPHS` are kept, the least
        recently replayed evicted first.
        """
        cache = self.prefill_cache
        # (the last entry: whether its pass takes the adapters' launches, the runner's step_lora set)
        key = (rows, batch, *self.runner.prefill_plan.info, self.runner.step_lora is not None)
        graph = cache.pop(key, None)
        if graph is None:
            graph = self._capture_prefill(v, rows, batch)
            if graph is None:
                return False
        cache[key] = graph  # (re)inserted last: the dict's order is the replay order, oldest first
        graph.launch()
        return True

    def _capture_prefill(self, v: SimpleNamespace, rows: int, batch: int) -> Any:
        """Capture the padded prefill pass into a new graph (not run yet); None, with a warning and the reason in
        ``prefill_graph_failures``, when the capture fails: the graph is closed and the stream left out of
        capture mode (:meth:`CudaGraph.capture`), so the caller can run the pass eagerly."""
        from ...kernels.graph import CudaGraph

        cache = self.prefill_cache
        if len(cache) >= _PREFILL_GRAPHS:  # the least recently replayed goes, after its last replay
            self.runner.stream.synchronize()
            cache.pop(next(iter(cache))).close()
        r = self.runner
        graph = CudaGraph(r.stream_ptr)
        try:
            with r.cupy.cuda.using_allocator(_refuse_allocation), graph.capture():
                r.forward(v, rows, r.prefill_attention)
        except Exception as exc:  # e.g. a launch refused in capture, an allocation, instantiation refused
            graph.close()
            self._prefill_graph_failed(rows, batch, "capture", exc)
            return None
        except BaseException:  # interrupted: nothing else holds the graph
            graph.close()
            raise
        return graph

    def close(self) -> None:
        """Free every graph (the stream synchronized first: the runner's teardown)."""
        every = (self.graphs, self.lora_graphs, self.second_graphs, self.second_lora_graphs)
        decode = {id(g): g for graphs in every for g in graphs.values()}  # (one set may be both)
        for graph in decode.values():
            graph.close()
        for graphs in every:
            graphs.clear()
        self.graph = None
        for graph in self.prefill_cache.values():
            graph.close()
        self.prefill_cache.clear()
