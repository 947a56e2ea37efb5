"""Choosing each request's next token from the float32 logits: :class:`SamplingParams` (greedy argmax, or
top-k / top-p sampling with a seeded Philox generator) and the engine's part that runs it on the device
(:class:`Sampling`: the argmax over the whole vocabulary or combined over the ranks' vocabulary shards, the logits
gathered for sampling, the tokens shared between tensor-parallel ranks).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from . import kernels
from .sampling_params import SamplingParams
from .state import EngineState

__all__ = ["SamplingParams"]  # its home is sampling_params (a value both the engine parts share); kept importable here


class Sampling(EngineState):
    """The engine's sampling: each row's token into ``ids`` from what the LM head (:meth:`Engine._head`) wrote.
    The sampling state (probabilities, workspace, generator) is made on the first sampled step, outside any
    graph capture."""

    def _pick(self, v: SimpleNamespace, rows: int, sampling: SamplingParams) -> None:
        """Choose each row's token into ``ids`` from ``logits`` (greedy: argmax)."""
        if sampling.greedy:
            self._argmax(rows)
            return
        if self.vocab_shard is not None:
            self._gather_logits(rows)
        if self._probs is None:  # made on the first sampled (non-greedy) step, outside any graph capture
            self._probs = self._cp.empty((self.max_batch, self.config.vocab_size), np.float32)
            nbytes = kernels.softmax_workspace_bytes(self.max_batch, self.config.vocab_size)
            self._softmax_ws = self._cp.empty((nbytes,), np.uint8)
            self._valid = self._cp.empty((self.max_batch,), np.bool_) if kernels.sampling_needs_valid() else None
        if self._gen is None or self._gen_seed != sampling.seed:
            self._gen, self._gen_seed = kernels.generator(sampling.seed), sampling.seed
        probs = kernels.descriptor(
            self._probs.data.ptr, (rows, self.config.vocab_size), "float32", self.device, owner=self._probs
        )
        top_k = sampling.top_k if sampling.top_k > 0 else self.config.vocab_size
        workspace = kernels.descriptor(
            self._softmax_ws.data.ptr, self._softmax_ws.shape, "uint8", self.device, owner=self._softmax_ws
        )
        valid = (
            None
            if self._valid is None
            else kernels.descriptor(self._valid.data.ptr, (rows,), "bool", self.device, owner=self._valid)
        )
        kernels.sample_top_k_top_p(
            v.logits,
            probs,
            workspace,
            v.ids,
            top_k,
            float(sampling.top_p),
            float(sampling.temperature),
            self._gen,
            self._s,
            valid,
        )

    def _argmax(self, rows: int) -> None:
        """Greedy tokens into ``ids`` from what :meth:`_head` wrote; with a vocabulary shard each rank's argmax
        (value, global id) is all-gathered and combined (the same token on every rank)."""
        b, vs = self._buf, self.vocab_shard
        if vs is None:
            v = self.config.vocab_size
            self.dense.argmax(rows, b.logits.data.ptr, v, v, b.ids.data.ptr)
            return
        self.dense.argmax_shard(rows, b.head.data.ptr, vs.valid, vs.rows, vs.start, b.pairs.data.ptr)
        self.comm.all_gather(b.pairs[:rows], b.pairs_all[: vs.parts * rows * 2], stream=self._s)
        self.dense.combine_argmax(rows, b.pairs_all.data.ptr, vs.parts, b.ids.data.ptr)

    def _gather_logits(self, rows: int) -> None:
        """With a vocabulary shard: every rank's logits columns into the whole ``logits [rows, V]`` (sampling)."""
        vs, b = self.vocab_shard, self._buf
        assert vs is not None
        if self._gathered is None:  # made on the first sampled step, outside any graph capture
            self._gathered = self._cp.empty(vs.parts * self.max_batch * vs.rows, np.float32)
        self.comm.all_gather(b.head[:rows], self._gathered[: vs.parts * rows * vs.rows], stream=self._s)
        v = self.config.vocab_size
        self.dense.unshard_columns(rows, self._gathered.data.ptr, vs.rows, v, b.logits.data.ptr, v)

    def _share_ids(self, sampling: SamplingParams) -> None:
        """With TP: every rank takes rank 0's tokens (they compute the same ones; this makes it certain). Not
        needed for greedy tokens from vocabulary shards: every rank combines the same all-gathered (value, id)
        pairs with the same kernel, so the ids agree bit for bit without a collective (one NCCL call and its
        host time saved per step)."""
        if self.comm is not None and not (sampling.greedy and self._ids_agree):
            self.comm.broadcast(self._buf.ids, root=0, stream=self._s)
