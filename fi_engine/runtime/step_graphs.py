"""The engine's CUDA graphs: the decode step captured at each batch size of a ladder up to ``max_batch`` rows
(:func:`~fi_engine.runtime.worker.graph_shapes.decode_batches`: 1, 2, 4, ..., ``max_batch``) and each step replayed as
the smallest graph holding its occupied slots (the step's index arrays copied into the graph's buffers, the plan made
again with ``enable_cuda_graph`` for that batch), and a prefill padded up to a token-row bucket
(:func:`~fi_engine.runtime.worker.graph_shapes.prefill_buckets`) replayed as that bucket's graph, captured the first
time the bucket and request slots (the batch size padded up:
:func:`~fi_engine.runtime.worker.graph_shapes.prefill_slots`) are met (at most
:data:`_PREFILL_GRAPHS` kept, the least recently replayed evicted first). Capture and replay:
:class:`~fi_engine.kernels.graph.CudaGraph`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from ..kernels.copies import H2D, host_address
from .sched.step_arrays import fill_decode
from .state import RunnerState
from .worker.graph_shapes import _ladder, bucket_for, decode_batches

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


class StepGraphs(RunnerState):
    """The decode graph and the padded prefill graphs of an engine."""

    graph_fused_decode = True
    """A decode graph of one row captures the fused step (``_fused_step``, where ``_fuses`` holds) instead of the
    separate launches: on an H100, 8B shape, 6.02 instead of 6.19 ms per step (the norms, SiLU, RoPE and KV append
    leave 4 of every 9 launches; benchmarks/RESULTS.md). Not at 2-4 rows, where the fused GEMVs' per-row work makes
    them slower than cuBLASLt. Read when the graph is captured (at construction): set it on the class to compare."""

    decode_graph_ladder = True
    """Capture the decode step at every batch size of :func:`~fi_engine.runtime.worker.graph_shapes.decode_batches`
    (each step replays the
    smallest graph holding its occupied slots); False: one graph of ``max_batch`` rows, which every step replays
    (before 2026-11-25). Read when the graphs are captured (at construction): set it on the class to compare."""

    @property
    def decode_graph_batches(self) -> tuple[int, ...]:
        """The batch sizes (rows) of the decode graphs, ascending, the last ``max_batch``: those the engine captured
        (``cuda_graph=True``), or before the capture those it will capture (:attr:`decode_graph_ladder`)."""
        if self._graph_batches:
            return self._graph_batches
        return decode_batches(self.max_batch) if self.decode_graph_ladder else (self.max_batch,)

    def _decode_body(self, v: SimpleNamespace, rows: int) -> None:
        """One decode step on the device: forward, LM head, argmax into ``ids`` (what the graph captures); with
        :attr:`graph_fused_decode`, forward and LM head as the fused step where it applies (``_fuses``)."""
        if self.graph_fused_decode and rows == 1 and self._fuses(rows):
            self._fused_step(v, rows)
        else:
            self._forward(v, rows, self._decode_attention, static_moe=self.static_moe)
            self._head(rows, self.normed.data.ptr)
        self.sampler.argmax(rows)

    def _capture(self) -> None:
        """For each batch size of :attr:`decode_graph_batches`: warm up one padded decode step eagerly (loads
        modules, compiles kernels, picks GEMM algorithms), then capture the same step into a CUDA graph."""
        # the captured step is GPU-bound: the GEMV serves only the shapes where the device runs it faster than
        # cuBLASLt (dense.gemv_bound); eagerly it serves every small-row GEMM, for its lower host time
        self.dense.bandwidth_bound = True
        try:
            self._capture_step()
        finally:
            self.dense.bandwidth_bound = False

    def _capture_step(self) -> None:
        from ..kernels.graph import CudaGraph

        for rows in self.decode_graph_batches:
            n_pages = fill_decode([None] * rows, self.page_size, self.decode_arrays)
            self._upload_decode(rows, n_pages, cuda_graph=True)
            v = self._view("decode", rows, rows)
            self._decode_body(v, rows)
            self.stream.synchronize()
            graph = self.graphs[rows] = CudaGraph(
                self.stream_ptr
            )  # kept at once: close() frees it if the capture fails
            # Nothing in the step may allocate: memory handed out during capture would go back to CuPy's pool after
            # it and be reused while every replay still writes to it. The step only uses buffers made in __init__;
            # this allocator turns a regression into an error at capture instead of silent corruption.
            with self.cupy.cuda.using_allocator(_refuse_allocation), graph.capture():
                self._decode_body(v, rows)
            # the plan's schedule layout of this batch size, which every replay's plan must keep (checked once)
            self._graph_plan_infos[rows] = self.decode_plan.info
        self.graph = self.graphs[self.max_batch]
        self._graph_batches = tuple(self.graphs)  # ascending: what each step's rows are cut to (serving)

    def _upload_decode(self, rows: int, n_pages: int, cuda_graph: bool) -> None:
        """Copy the step's index arrays to the device and plan the step (``cuda_graph``: a fixed-batch plan for
        the captured graph)."""
        n = self._dlayout.end("kv_indices", n_pages)
        self.cupy.cuda.runtime.memcpyAsync(self._dmeta.data.ptr, host_address(self._dhost), 4 * n, H2D, self.stream_ptr)
        self._plan_decode(rows, cuda_graph)
        self._staged.record(self.stream)  # the host staging (ours and the plan's) may be rewritten after this

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        """The token-row buckets a prefill is padded up to for its CUDA graph, ascending; by default
        :func:`~fi_engine.runtime.worker.graph_shapes.prefill_buckets` of ``max_prefill_tokens`` (which says why those).
        Settable to another ladder: a non-empty, strictly ascending sequence of ints ending at ``max_prefill_tokens``
        (each prefill needs a bucket, and none may pad past the buffers' rows); TypeError/ValueError naming
        ``prefill_buckets`` otherwise."""
        return self._prefill_buckets

    @prefill_buckets.setter
    def prefill_buckets(self, buckets: Sequence[int]) -> None:
        top = self.max_prefill_tokens
        ladder = _ladder("prefill_buckets", buckets, top)
        if ladder[-1] != top:
            raise ValueError(
                f"prefill_buckets: expected the last bucket to be max_prefill_tokens ({top}), got {ladder[-1]}"
            )
        self._prefill_buckets = ladder

    def prefill_graph_shapes(self) -> list[tuple[int, int]]:
        """The ``(bucket rows, request slots)`` of every prefill graph held, in replay order (least recent first)."""
        return [(int(key[0]), int(key[1])) for key in self._prefill_graph_cache]

    def _prefill_bucket(self, nnz: int, slots: int) -> int | None:
        """The token rows a prefill of ``nnz`` rows is padded to, to run as that bucket's CUDA graph of ``slots``
        request slots (:meth:`_prefill_graph`; :func:`~fi_engine.runtime.worker.graph_shapes.prefill_slots` of its
        requests, or ``max_batch`` for a mixed pass); None: it runs eagerly, unpadded. Eager for MoE layers (host
        routing synchronizes), tensor parallelism, the engines that override the pass, ``prefill_graphs = False``, and a
        shape whose capture failed before (:attr:`prefill_graph_failures`)."""
        if not self.prefill_graphs or self.moe_layers or self.comm is not None or not self.family.llama_pass:
            return None
        bucket = bucket_for(nnz, self.prefill_buckets)
        return None if (bucket, slots) in self.prefill_graph_failures else bucket

    def _prefill_padded(self, nnz: int, batch: int, bucket: int) -> bool:
        """The forward pass of a prefill padded to ``bucket`` rows and ``batch`` request slots
        (:func:`~fi_engine.runtime.worker.graph_shapes.prefill_slots`; the index arrays on the device), as that shape's
        graph, or eagerly if its capture fails; False when its CUDA-graph plan fails (e.g. FA2's split-KV scratch for a
        long bucket exceeds the workspace): recorded, and the caller runs the prefill eagerly, unpadded (the padded
        arrays begin with the unpadded ones, so the copy already made serves it)."""
        try:
            self._plan_prefill_padded(batch + 1)
        except Exception as exc:
            self._prefill_graph_failed(bucket, batch, "planning", exc)
            return False
        padded = self._view("padded prefill", bucket, batch + 1)
        if not self._prefill_graph(padded, bucket, batch):
            self._forward(padded, bucket, self._prefill_attention)  # the capture failed: the same pass, eagerly
        return True

    def _prefill_graph_failed(self, rows: int, batch: int, stage: str, exc: Exception) -> None:
        """Record why the prefill graph of ``rows`` rows and ``batch`` request slots failed (that shape is eager from
        now on: :meth:`_prefill_bucket`), and warn once."""
        why = f"{stage}: {type(exc).__name__}: {exc}"[:500]
        self.prefill_graph_failures[(rows, batch)] = why
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
        the plan's schedule vector: a CUDA-graph plan (``enable_cuda_graph=True``) fixes every workspace offset
        and grid from ``qo_indptr[-1]`` (the bucket) and the batch size alone, and each prefill's plan copies its
        own schedule to those offsets before the replay; every buffer the pass touches was allocated in the
        constructor. A bucket, unlike an exact length, is met again, so it is captured on its first sight.
        At most :data:`_PREFILL_GRAPHS` are kept, the least recently replayed evicted first.
        """
        cache = self._prefill_graph_cache
        key = (rows, batch, *self.prefill_plan.info)
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
        :attr:`prefill_graph_failures`, when the capture fails: the graph is closed and the stream left out of
        capture mode (:meth:`CudaGraph.capture`), so the caller can run the pass eagerly."""
        from ..kernels.graph import CudaGraph

        cache = self._prefill_graph_cache
        if len(cache) >= _PREFILL_GRAPHS:  # the least recently replayed goes, after its last replay
            self.stream.synchronize()
            cache.pop(next(iter(cache))).close()
        graph = CudaGraph(self.stream_ptr)
        try:
            with self.cupy.cuda.using_allocator(_refuse_allocation), graph.capture():
                self._forward(v, rows, self._prefill_attention)
        except Exception as exc:  # e.g. a launch refused in capture, an allocation, instantiation refused
            graph.close()
            self._prefill_graph_failed(rows, batch, "capture", exc)
            return None
        except BaseException:  # interrupted: nothing else holds the graph
            graph.close()
            raise
        return graph
