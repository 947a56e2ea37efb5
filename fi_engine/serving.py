"""The serving loop and its scheduler: prompts queued as requests (:mod:`~fi_engine.paging`), admitted into free
batch slots and prefilled together, then one decode step after another over every active request until each ends
(an end-of-sequence token or its token limit), its pages freed; :class:`GenerationResult` with the tokens and the
timings. The loop is the same for every model family: what a step runs on the device is the engine's
(:mod:`~fi_engine.step_graphs` for the CUDA graphs, the family definition's forward, :mod:`~fi_engine.sampling`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fi_ffi import stream_scope

from .paging import PageAllocator, Request, Scheduler, fill_decode, fill_prefill, pad_prefill, pages_for
from .sampling_params import SamplingParams
from .state import EngineState
from .storage import _D2D, _D2H, _H2D, _address

__all__ = ["GenerationResult"]


@dataclass
class GenerationResult:
    """Tokens per prompt (in the order given) and timings.

    ``decode_steps``: decode steps run; ``decode_tokens``: tokens they produced; ``decode_s``: their wall time;
    ``step_host_us``: host time of each step (building the index arrays, planning, launching, and handling the
    sampled tokens; the wait for the GPU excluded).
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    step_host_us: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: generated tokens per second of decode-step wall time."""
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def host_us_per_step(self) -> float:
        """Median host time per decode step, in microseconds."""
        return float(np.median(self.step_host_us)) if self.step_host_us else 0.0


class ServingLoop(EngineState):
    """The engine's public serving calls (:meth:`generate`, :meth:`prefill_logits`, :meth:`warm_prefill`) and the
    prefill and decode steps they run."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        *,
        eos_token_ids: Sequence[int] | None = None,
        sampling: SamplingParams | None = None,
    ) -> GenerationResult:
        """Generate tokens for each prompt (lists of token ids) until an end-of-sequence token (kept in the
        output) or ``max_new_tokens`` (one value, or one per prompt).

        ``eos_token_ids``: default the checkpoint's ``eos_token_id``; ``()`` to always run to
        ``max_new_tokens``. Returns the tokens in prompt order, with timings. Sampled generation starts a new
        Philox stream from ``sampling.seed`` (offset 0) on every call, so the same call reproduces its tokens.
        """
        self._check_open()
        sampling = sampling or SamplingParams()
        self._gen = None  # a fresh generator per call (seed, offset 0): reproducible generations
        self._next_rows = None
        sched = self._scheduler(eos_token_ids)
        reqs = self._submit(sched, prompts, max_new_tokens)
        result = GenerationResult([], [])
        cp = self._cp
        # TVM-FFI's current stream is the engine's for the whole call: every op is given that stream, and finds it
        # current already (one query instead of a set and a restore around each of the ~10 kernels per layer)
        with cp.cuda.Device(self.device), self.stream, stream_scope(self._s, self.device):
            try:
                while sched.has_work:
                    admitted = sched.admit()
                    if admitted:
                        t = time.perf_counter()
                        self._prefill(sched, admitted, sampling)
                        result.prefill_s += time.perf_counter() - t
                    if sched.active:
                        t = time.perf_counter()
                        result.step_host_us.append(self._decode_step(sched, sampling))
                        result.decode_s += time.perf_counter() - t
                        result.decode_steps += 1
            finally:
                self.stream.synchronize()
        result.tokens = [list(r.output) for r in reqs]
        result.finish_reasons = [r.finish_reason or "" for r in reqs]
        result.decode_tokens = sum(len(r.output) - 1 for r in reqs)
        return result

    def prefill_logits(self, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Float32 logits ``[len(prompt), vocab]`` of every position of every prompt (a check against a
        reference implementation; the prompts are prefilled in batches, then their pages freed)."""
        self._check_open()
        sched = self._scheduler(())
        reqs = self._submit(sched, prompts, 1)
        out: dict[int, np.ndarray] = {}
        with self._cp.cuda.Device(self.device), self.stream, stream_scope(self._s, self.device):
            while sched.has_work:
                admitted = sched.admit()
                for r, logits in zip(
                    admitted, self._prefill(sched, admitted, SamplingParams(), all_logits=True), strict=True
                ):
                    out[r.rid] = logits
        return [out[r.rid] for r in reqs]

    def warm_prefill(self, lengths: Sequence[int], batch: int = 1) -> list[tuple[int, int]]:
        """Capture, before serving, the prefill graphs that prefills of ``lengths`` token rows in all, of ``batch``
        requests each, will replay, so that no request pays a capture (a bucket met the first time costs about
        one eager prefill more than a replay; benchmarks/RESULTS.md. Each length runs one prefill of ``batch``
        dummy prompts (token 0, ``lengths[i]`` tokens together) with one new token and frees their pages; lengths
        of one bucket capture it once. Nothing is captured where prefill graphs do not apply (``prefill_graphs =
        False``, MoE layers, tensor parallelism, the subclass engines) or a capture fails (a warning says so).

        Args:
            lengths: token rows per prefill, each in ``[batch, max_prefill_tokens]``, at most
                ``batch * (max_seq_len - 1)`` (each dummy prompt leaves room for its token), and with pages for
                all ``batch`` prompts at once in the KV cache (``num_pages - 1``).
            batch: requests per prefill, in ``[1, max_batch]``.

        Returns:
            the ``(bucket rows, requests)`` of every prefill graph the engine now holds, in replay order.
        """
        self._check_open()
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch: expected requests per prefill in [1, {self.max_batch}], got {batch!r:.40}")
        if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or not lengths:
            raise ValueError(f"lengths: expected a non-empty list of token-row counts, got {lengths!r:.60}")
        top = min(self.max_prefill_tokens, batch * (self.max_seq_len - 1))
        for i, n in enumerate(lengths):
            if isinstance(n, bool) or not isinstance(n, int) or not batch <= n <= top:
                raise ValueError(
                    f"lengths[{i}]: expected token rows in [{batch}, {top}] (at least one per request; at most "
                    f"max_prefill_tokens, and max_seq_len - 1 per request), got {n!r:.40}"
                )
        runs = []
        for i, n in enumerate(lengths):
            prompts = [[0] * (n // batch + (1 if r < n % batch else 0)) for r in range(batch)]
            # the scheduler admits the batch together only if the KV cache holds it (page 0 is the padding
            # page); short of pages it would prefill fewer requests at a time and capture another shape
            need = sum(pages_for(len(p), self.page_size) for p in prompts)
            if need > self.num_pages - 1:
                raise ValueError(
                    f"lengths[{i}]: {n} token rows of {batch} requests need {need} KV pages, the cache has "
                    f"{self.num_pages - 1} (they would not be prefilled together)"
                )
            runs.append(prompts)
        for prompts in runs:
            self.generate(prompts, 1, eos_token_ids=())
        return [(int(key[0]), int(key[1])) for key in self._prefill_graph_cache]

    def _scheduler(self, eos_token_ids: Sequence[int] | None) -> Scheduler:
        eos = self.config.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
        return Scheduler(
            PageAllocator(self.num_pages),
            self.page_size,
            self.max_batch,
            self.max_seq_len,
            self.max_prefill_tokens,
            self.config.vocab_size,
            eos,
        )

    @staticmethod
    def _submit(
        sched: Scheduler, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int]
    ) -> list[Request]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts: expected a non-empty list of prompts (lists of token ids)")
        if isinstance(max_new_tokens, Sequence):
            if len(max_new_tokens) != len(prompts):
                raise ValueError(
                    f"max_new_tokens: expected one value per prompt ({len(prompts)}), got {len(max_new_tokens)}"
                )
            limits = list(max_new_tokens)
        else:
            limits = [max_new_tokens] * len(prompts)
        return [sched.submit(p, m, name=f"prompts[{i}]") for i, (p, m) in enumerate(zip(prompts, limits, strict=True))]

    def _prefill(
        self, sched: Scheduler, reqs: list[Request], sampling: SamplingParams, all_logits: bool = False
    ) -> list[np.ndarray]:
        cp, c, b, s = self._cp, self.config, self._buf, self._s
        batch = len(reqs)
        self._next_rows = None  # the prefill's tokens overwrite `ids`: a step prepared before it cannot run
        ph = self._ph
        nnz, n_pages = fill_prefill(reqs, self.page_size, ph)
        bucket = self._prefill_bucket(nnz, batch)
        if bucket is not None:  # the padding request fills the rows up to the bucket (paging.pad_prefill)
            n_pages = pad_prefill(ph, nnz, bucket, batch, n_pages, self.page_size)
        n = self._playout.end("kv_indices", n_pages)
        cp.cuda.runtime.memcpyAsync(self._pmeta.data.ptr, _address(self._phost), 4 * n, _H2D, s)
        v = self._view("prefill", nnz, batch)  # the real rows and requests: the last-row gather, head, sampling
        if bucket is None or not self._prefill_padded(nnz, batch, bucket):
            self._plan_prefill(batch)
            self._forward(v, nnz, self._prefill_attention)
        full = None
        if all_logits:  # a check, not serving: allocated here
            hr = self._head_rows
            part = cp.empty((nnz, hr), np.float32)
            self.dense.linear(
                nnz, self._normed.data.ptr, c.hidden_size, self._lm_head, hr, c.hidden_size, part.data.ptr, hr,
                self._ab, self._f32,
            )  # fmt: skip
            full = part
            self._finish_logits(part.data.ptr, nnz, hr)
            if self.vocab_shard is not None:  # every rank's columns, then [nnz, V] on the host
                full = cp.empty((self.tensor_parallel, nnz, hr), np.float32)
                self.comm.all_gather(part, full, stream=s)
        h = c.hidden_size
        self.dense.gather_rows(batch, self._normed.data.ptr, h, v.last_rows, b.last.data.ptr, h, h)
        self._head(batch, b.last.data.ptr)
        self._pick(v, batch, sampling)
        tokens = self._fetch_ids(batch, sampling)
        sched.record(reqs, tokens, prefill=True)
        if full is None:
            return []
        host = full.get(stream=self.stream)
        if host.ndim == 3:  # [ranks, nnz, V/N]: the columns side by side, the padding dropped
            host = np.concatenate(list(host), axis=1)[:, : c.vocab_size]
        bounds = ph["qo_indptr"][: batch + 1].tolist()
        return [host[bounds[i] : bounds[i + 1]] for i in range(batch)]

    def _fetch_ids(self, rows: int, sampling: SamplingParams) -> list[int]:
        """Copy the chosen tokens to the host and wait for the stream (the one synchronization per step)."""
        self._share_ids(sampling)
        self._cp.cuda.runtime.memcpyAsync(_address(self._ids_host), self._buf.ids.data.ptr, 4 * rows, _D2H, self._s)
        self.stream.synchronize()
        return self._ids_host[:rows].tolist()

    def _decode_step(self, sched: Scheduler, sampling: SamplingParams) -> float:
        """One decode step for every active request; returns its host time in microseconds (with a graph, the
        next step's preparation included, which runs while the GPU computes this step)."""
        t0 = time.perf_counter()
        graph = self.graph
        prepared, self._next_rows = self._next_rows, None
        if prepared is not None and sched.same_rows(prepared):
            # prepared during the previous step (index arrays and plan enqueued behind it); its input tokens are
            # that step's output, still in `ids` in slot order: copied on the device
            rows = prepared
            n = len(rows)
            token_ids = self._dmeta.data.ptr + 4 * self._dlayout.offsets["token_ids"]
            self._cp.cuda.runtime.memcpyAsync(token_ids, self._buf.ids.data.ptr, 4 * n, _D2D, self._s)
        else:
            rows = sched.decode_rows(padded=graph is not None)
            n = len(rows)
            self._upload_decode(n, fill_decode(rows, self.page_size, self._dh), cuda_graph=graph is not None)
        v = self._view("decode", n, n)
        if graph is not None:
            if not self._graph_checked:
                # FlashInfer keeps a CUDA-graph schedule's layout fixed for a fixed batch; the graph relies on it.
                if self._decode_plan.info != self._graph_plan_info:
                    raise RuntimeError(
                        "a CUDA-graph decode plan changed its schedule layout; the captured graph cannot replay it"
                    )
                self._graph_checked = True
            graph.launch()
            if not sampling.greedy:
                self._pick(v, n, sampling)
        else:
            if self._fuses(n):
                self._fused_step(v, n)
            else:
                self._forward(v, n, self._decode_attention)
                self._head(n, self._normed.data.ptr)
            self._pick(v, n, sampling)
        self._share_ids(sampling)
        self._cp.cuda.runtime.memcpyAsync(_address(self._ids_host), self._buf.ids.data.ptr, 4 * n, _D2H, self._s)
        if graph is not None and self._prepare_ahead:
            # the next step, as it will be unless a request ends with an end-of-sequence token or a prefill comes
            # first (then it is dropped and made again): staged and planned while the GPU runs this one
            self._staged.synchronize()  # this step's copies out of the staging buffers are done
            ahead = sched.peek_rows()
            self._upload_decode(n, fill_decode(ahead, self.page_size, self._dh, ahead=1), cuda_graph=True)
            self._next_rows = ahead
        t2 = time.perf_counter()
        self.stream.synchronize()
        t3 = time.perf_counter()
        sched.record(rows, self._ids_host[:n].tolist())
        return ((t2 - t0) + (time.perf_counter() - t3)) * 1e6

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("engine: closed")
