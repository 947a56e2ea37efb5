"""Choosing each request's next token from the float32 logits, with each request's own
:class:`SamplingParams` (greedy argmax, or top-k / top-p sampling from a Philox stream), and the engine's part that
runs it on the device (:class:`Sampler`: the argmax over the whole vocabulary or combined over the ranks'
vocabulary shards, the logits gathered for sampling, the tokens shared between tensor-parallel ranks).

A step's rows choose in one of three ways (:func:`draw_groups` decides on the host):

- every row greedy: the argmax alone (what a greedy step always cost: one launch, none in a CUDA graph, which
  holds it);
- every real row sampled with the same parameters from one shared stream (``generate(sampling=...)``, or
  unseeded requests alike): softmax and one sampling call over all rows, row ``b`` drawing Philox subsequence
  ``b``, with the parameters as scalars;
- otherwise (a mix): the argmax for every row, then softmax with a per-row temperature and one sampling call per
  stream, with per-row ``top_k`` / ``top_p`` arrays and the stream's rows as ``indices``, into a scratch buffer
  that a row gather merges into the token ids (greedy rows keep their argmax). A request with its own seed is a
  stream alone: always output row 0 of its own call, so its draws do not depend on the rest of the batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from ...kernels import flashinfer as kernels
from ...kernels.copies import D2D, H2D, host_address
from ..sampling_params import SamplingParams
from ..sched.request import Request
from ..sched.step_arrays import Layout

__all__ = [
    "Draws",
    "Sampler",
    "SamplingParams",
    "draw_groups",
]  # SamplingParams' home is sampling_params; importable here too


@dataclass(eq=False)
class Draws:
    """The Philox stream (a :class:`fi_ffi.Generator`) the sampled tokens of one or more requests draw from.

    ``shared``: several requests draw from it, each output row its own subsequence (``generate``'s call, the
    engine's stream of unseeded requests); False: one request's own (a seed given to ``add_request``), always drawn
    as the only row of its call (subsequence 0), so its draws depend on its seed and its token count only.
    """

    generator: Any
    shared: bool

    @classmethod
    def seeded(cls, seed: int, shared: bool) -> Draws:
        """A stream starting at ``(seed, offset 0)`` (``seed`` an int in ``[0, 2**64)``)."""
        return cls(kernels.generator(seed), shared)


def draw_groups(rows: Sequence[Request | None]) -> tuple[bool, list[tuple[Draws, list[int]]]]:
    """How a step's ``rows`` (None: a padding row; a request without ``sampling``: greedy) choose their tokens:
    ``(uniform, groups)``, ``groups`` the sampled rows' indices per stream (:class:`Draws`), in order of first
    appearance; ``uniform`` when one shared stream samples every real row with equal parameters (one call over all
    rows, scalar parameters). No groups: every row is greedy."""
    groups: dict[int, tuple[Draws, list[int]]] = {}
    real = 0
    first: SamplingParams | None = None
    same = True
    for i, r in enumerate(rows):
        if r is None:
            continue
        real += 1
        if r.sampling is None:
            continue
        if first is None:
            first = r.sampling
        elif r.sampling != first:
            same = False
        group = groups.get(id(r.draws))
        if group is None:
            groups[id(r.draws)] = (r.draws, [i])
        else:
            group[1].append(i)
    out = list(groups.values())
    uniform = len(out) == 1 and out[0][0].shared and same and len(out[0][1]) == real
    return uniform, out


def _sample_layout(max_batch: int) -> Layout:
    """The per-row sampling arrays of a mixed step (one host-to-device copy): float32 ``temperature`` and ``top_p``,
    int32 ``top_k`` (read at each call's ``indices``), the streams' rows one after another (``indices``), and each
    row's place in the merge buffer (``source``: itself for a greedy row, ``max_batch + j`` for the ``j``-th
    sampled row)."""
    return Layout({name: max_batch for name in ("temperature", "top_k", "top_p", "indices", "source")})


class Sampler:
    """The engine's sampling part: each row's token into ``buffers.ids`` from the float32 logits the LM head wrote
    (``buffers.logits``, or with a vocabulary shard this rank's columns in ``buffers.head``). Made by the engine once
    its buffers exist (:meth:`of`); what it reads of the engine is fixed then. The sampling buffers (probabilities,
    workspace, the per-row arrays) are made on the first sampled step, outside any graph capture.

    The engine calls :meth:`draws` when a request is added, :meth:`pick` after each step's LM head (:meth:`argmax`
    inside the decode graph), and :meth:`share_ids` once the step's tokens are chosen.

    ``rows``: the row kernels it gathers and takes greedy tokens with (the engine's Dense's ``rows``,
    :class:`~fi_engine.kernels.row_kernels.RowKernels`); ``shards``: with a vocabulary shard, the shards' argmax and
    logits reassembly (its ``shards``, :class:`~fi_engine.kernels.shard_kernels.ShardKernels`).
    """

    def __init__(
        self,
        cupy: Any,
        rows: Any,
        buffers: SimpleNamespace,
        *,
        device: int,
        stream_ptr: int,
        max_batch: int,
        vocab_size: int,
        vocab_shard: Any = None,
        comm: Any = None,
        shards: Any = None,
    ) -> None:
        self.cupy, self.rows, self.buffers = cupy, rows, buffers
        self.shards = shards
        self.device, self.stream_ptr = device, stream_ptr
        self.max_batch, self.vocab_size = max_batch, vocab_size
        self.vocab_shard, self.comm = vocab_shard, comm
        # greedy ids need no broadcast from rank 0 when they come from the shards' combined argmax (share_ids);
        # off until a 2-GPU run has checked the tokens and measured the step (bench_llama_tp.py, variant "agree"):
        # set to `self.vocab_shard is not None` to try it
        self.ids_agree = False
        self._shared_draws: Draws | None = None  # the unseeded requests' Philox stream, made on first use
        self._probs: Any = None  # the sampling buffers (_sampling_state), made on the first sampled step
        self._gathered: Any = None  # [N, max_batch, V/N] float32 (vocabulary shards), made on the first sampled step
        self._softmax_ws: Any = None
        self._valid: Any = None
        self._slayout: Layout = _sample_layout(max_batch)
        self._shosts: tuple[np.ndarray, ...] = ()
        self._sturn = 0
        self._smeta: Any = None
        self._smeta_mem: Any = None
        self._choice: Any = None

    @classmethod
    def of(cls, eng: Any) -> Sampler:
        """The sampler of engine ``eng``, whose buffers, stream and vocabulary shard exist."""
        return cls(
            eng.cupy,
            eng.dense.rows,
            eng.buffers,
            device=eng.device,
            stream_ptr=eng.stream_ptr,
            max_batch=eng.max_batch,
            vocab_size=eng.config.vocab_size,
            vocab_shard=eng.vocab_shard,
            comm=eng.comm,
            shards=eng.dense.shards,
        )

    def draws(self, sampling: SamplingParams | None) -> Draws | None:
        """The stream a request added with ``sampling`` draws from (None: greedy): its own for a seed, else the
        engine's shared stream (seeded at random once)."""
        if sampling is None or sampling.greedy:
            return None
        if sampling.seed is not None:
            return Draws.seeded(sampling.seed, shared=False)
        if self._shared_draws is None:
            self._shared_draws = Draws.seeded(secrets.randbits(64), shared=True)
        return self._shared_draws

    def pick(
        self, v: SimpleNamespace, n: int, rows: Sequence[Request | None] | None, argmax_done: bool = False
    ) -> bool:
        """Choose each of the ``n`` rows' token into ``ids`` from ``logits``. ``rows``: the step's requests by row
        (None: all greedy, known without looking); ``argmax_done``: ``ids`` holds the argmax already (the decode
        graph's). Returns whether any row sampled (tensor parallelism then shares rank 0's tokens)."""
        uniform, groups = (False, []) if rows is None else draw_groups(rows)
        if not groups:
            if not argmax_done:
                self.argmax(n)
            return False
        self._sampling_state()
        if self.vocab_shard is not None:
            self._gather_logits(n)
        if uniform:
            draws, idx = groups[0]
            first = rows[idx[0]] if rows is not None else None
            assert first is not None and first.sampling is not None
            self._sample_uniform(v, n, first.sampling, draws)
        else:
            if not argmax_done:
                self.argmax(n)
            self._sample_mixed(v, n, rows or [], groups)
        return True

    def _sampling_state(self) -> None:
        """Make the sampling buffers on the first sampled step (outside any graph capture)."""
        if self._probs is not None:
            return
        cp, b, vocab = self.cupy, self.max_batch, self.vocab_size
        self._probs = cp.empty((b, vocab), np.float32)
        self._softmax_ws = cp.empty((kernels.softmax_workspace_bytes(b, vocab),), np.uint8)
        self._valid = cp.empty((b,), np.bool_) if kernels.sampling_needs_valid() else None
        # two host staging buffers, in turn: a decode step launched ahead (ServingLoop.pipelined_decode) stages its
        # parameters while the copy out of the step before it may still be queued behind that step's graph
        total = self._slayout.total
        self._smeta_mem = cp.cuda.alloc_pinned_memory(8 * total)
        self._shosts = tuple(np.frombuffer(self._smeta_mem, np.int32, total, 4 * total * i) for i in (0, 1))
        self._sturn = 0
        self._smeta = cp.zeros(self._slayout.total, np.int32)
        self._choice = cp.zeros(2 * b, np.int32)  # the argmax ids, then the sampled tokens: the merge's source

    def _describe(self, ptr: int, shape: tuple[int, ...], dtype: str, owner: Any) -> Any:
        return kernels.descriptor(ptr, shape, dtype, self.device, owner=owner)

    def _top_k(self, sampling: SamplingParams) -> int:
        """The kernel's top-k: the whole vocabulary for 0 (no limit) or a larger k."""
        vocab = self.vocab_size
        return vocab if sampling.top_k == 0 else min(sampling.top_k, vocab)

    def _sample_uniform(self, v: SimpleNamespace, n: int, sampling: SamplingParams, draws: Draws) -> None:
        """Every row from one stream with one set of parameters (scalars): row ``b`` draws subsequence ``b``."""
        vocab = self.vocab_size
        valid = None if self._valid is None else self._describe(self._valid.data.ptr, (n,), "bool", self._valid)
        kernels.sample_top_k_top_p(
            v.logits,
            self._describe(self._probs.data.ptr, (n, vocab), "float32", self._probs),
            self._describe(self._softmax_ws.data.ptr, self._softmax_ws.shape, "uint8", self._softmax_ws),
            v.ids,
            self._top_k(sampling),
            float(sampling.top_p),
            float(sampling.temperature),
            draws.generator,
            self.stream_ptr,
            valid,
        )

    def _sample_mixed(
        self, v: SimpleNamespace, n: int, rows: Sequence[Request | None], groups: list[tuple[Draws, list[int]]]
    ) -> None:
        """Rows of several streams or parameters, greedy ones among them (``ids`` holds every row's argmax): softmax
        with per-row temperatures, one sampling call per stream into ``choice[max_batch:]``, then the rows gathered
        from ``choice`` (the argmax for greedy rows, their sample for the others) back into ``ids``."""
        cp, b, vocab, s = self.cupy, self.max_batch, self.vocab_size, self.stream_ptr
        lay, host = self._slayout, self._shosts[self._sturn]
        self._sturn = 1 - self._sturn
        o = lay.offsets
        temperature = host[o["temperature"] : o["temperature"] + n].view(np.float32)
        top_p = host[o["top_p"] : o["top_p"] + n].view(np.float32)
        top_k = host[o["top_k"] : o["top_k"] + n]
        source = host[o["source"] : o["source"] + n]
        temperature[:] = 1.0  # greedy and padding rows: any valid value (their probabilities are not drawn from)
        top_p[:] = 1.0
        top_k[:] = vocab
        source[:] = np.arange(n, dtype=np.int32)
        at = 0
        spans = []
        for draws, idx in groups:
            host[o["indices"] + at : o["indices"] + at + len(idx)] = idx
            for j, i in enumerate(idx):
                r = rows[i]
                assert r is not None and r.sampling is not None
                temperature[i] = r.sampling.temperature
                top_p[i] = r.sampling.top_p
                top_k[i] = self._top_k(r.sampling)
                source[i] = b + at + j
            spans.append((draws, at, len(idx)))
            at += len(idx)
        meta, ids = self._smeta.data.ptr, self.buffers.ids.data.ptr
        cp.cuda.runtime.memcpyAsync(meta, host_address(host), 4 * lay.total, H2D, s)
        choice = self._choice.data.ptr
        cp.cuda.runtime.memcpyAsync(choice, ids, 4 * n, D2D, s)
        probs = self._describe(self._probs.data.ptr, (n, vocab), "float32", self._probs)
        workspace = self._describe(self._softmax_ws.data.ptr, self._softmax_ws.shape, "uint8", self._softmax_ws)
        kernels.softmax(
            v.logits, probs, workspace, self._describe(meta + 4 * o["temperature"], (n,), "float32", self._smeta), s
        )
        k = self._describe(meta + 4 * o["top_k"], (n,), "int32", self._smeta)
        p = self._describe(meta + 4 * o["top_p"], (n,), "float32", self._smeta)
        for draws, start, m in spans:
            out = self._describe(choice + 4 * (b + start), (m,), "int32", self._choice)
            indices = self._describe(meta + 4 * (o["indices"] + start), (m,), "int32", self._smeta)
            valid = None
            if self._valid is not None:
                valid = self._describe(self._valid.data.ptr + start, (m,), "bool", self._valid)
            kernels.sample_rows(probs, out, k, p, indices, draws.generator, s, valid)
        # ids[r] = choice[source[r]]: an int32 is two 16-bit elements for the row gather
        self.rows.gather_rows(n, choice, 2, meta + 4 * o["source"], ids, 2, 2)

    def argmax(self, rows: int) -> None:
        """Greedy tokens into ``ids`` from what the LM head (``ModelRunner.head``) wrote; with a vocabulary shard each
        rank's argmax (value, global id) is all-gathered and combined (the same token on every rank)."""
        b, vs = self.buffers, self.vocab_shard
        if vs is None:
            v = self.vocab_size
            self.rows.argmax(rows, b.logits.data.ptr, v, v, b.ids.data.ptr)
            return
        self.shards.argmax_shard(rows, b.head.data.ptr, vs.valid, vs.rows, vs.start, b.pairs.data.ptr)
        self.comm.all_gather(b.pairs[:rows], b.pairs_all[: vs.parts * rows * 2], stream=self.stream_ptr)
        self.shards.combine_argmax(rows, b.pairs_all.data.ptr, vs.parts, b.ids.data.ptr)

    def _gather_logits(self, rows: int) -> None:
        """With a vocabulary shard: every rank's logits columns into the whole ``logits [rows, V]`` (sampling)."""
        vs, b = self.vocab_shard, self.buffers
        assert vs is not None
        if self._gathered is None:  # made on the first sampled step, outside any graph capture
            self._gathered = self.cupy.empty(vs.parts * self.max_batch * vs.rows, np.float32)
        self.comm.all_gather(b.head[:rows], self._gathered[: vs.parts * rows * vs.rows], stream=self.stream_ptr)
        v = self.vocab_size
        self.shards.unshard_columns(rows, self._gathered.data.ptr, vs.rows, v, b.logits.data.ptr, v)

    def share_ids(self, sampled: bool) -> None:
        """With TP: every rank takes rank 0's tokens (they compute the same ones; this makes it certain, and the
        engine's unseeded stream is seeded differently on each rank). Not needed for greedy tokens from vocabulary
        shards (``sampled`` False): every rank combines the same all-gathered (value, id) pairs with the same
        kernel, so the ids agree bit for bit without a collective (one NCCL call and its host time saved per
        step)."""
        if self.comm is not None and (sampled or not self.ids_agree):
            self.comm.broadcast(self.buffers.ids, root=0, stream=self.stream_ptr)
