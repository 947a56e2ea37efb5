"""What an engine holds on the device besides its weights, allocated once in the constructor (no allocation per
step, which is also what makes a capture valid): the Llama pass's activation buffers and paged KV cache, the per-step
index arrays (page-locked host staging and their device twins), and :func:`step_views`, the descriptors of one
forward pass's operands over those buffers. The weights are the family definition's (its ``load``,
:mod:`~fi_engine.runtime.family`).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from ..checkpoint.config import LlamaConfig
from ..kernels import flashinfer as kernels
from .sched.step_arrays import Layout, decode_layout, prefill_layout
from .state import RunnerState

__all__ = ["step_views"]


class Storage(RunnerState):
    """Allocation of the runner's buffers and step arrays, and the step views over them."""

    def allocate_layers(self) -> None:
        """The Llama pass's buffers (``buffers``): activations of ``max(max_prefill_tokens, max_batch)`` rows, the
        last-row gather, logits and ids of ``max_batch`` rows, the paged KV cache ``[layers, 2, pages, page_size,
        Hk, D]`` (with its per-layer descriptors), the vocabulary shard's and the fused all-reduce's; then the step
        arrays (:meth:`allocate_steps`). A family's ``allocate`` calls it, or lays out its own."""
        from ..kernels.dense import GEMV_MAX_ROWS

        cp, c = self.cupy, self.config
        storage = np.float16 if self.dtype == "float16" else np.uint16
        rows = max(self.max_prefill_tokens, self.max_batch)
        hq, hk, d, h = c.num_qo_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        self.qkv_width = (hq + 2 * hk) * d
        b = self.buffers = SimpleNamespace(
            h=cp.empty((rows, h), storage),
            x=cp.empty((rows, h), storage),
            qkv=cp.empty((rows, self.qkv_width), storage),
            attn=cp.empty((rows, hq * d), storage),
            gu=cp.empty((rows, 2 * c.intermediate_size), storage),
            act=cp.empty((rows, c.intermediate_size), storage),
            last=cp.empty((self.max_batch, h), storage),
            h_alt=cp.empty((GEMV_MAX_ROWS, h), storage),  # the fused step's second residual buffer (_fused_step)
            logits=cp.empty((self.max_batch, c.vocab_size), np.float32),
            ids=cp.empty(self.max_batch, np.int32),
            # one byte per element with an FP8 cache (kv_cache_dtype="fp8_e4m3": e4m3 bits), else the model's dtype
            kv=cp.zeros((c.num_layers, 2, self.num_pages, self.page_size, hk, d), np.uint8 if self.kv_fp8 else storage),
        )
        self._allocate_attention_caches()
        if self.vocab_shard is not None:
            # this rank's logits columns, and every rank's shard argmax (value bits, index); the whole logits are
            # only gathered (into `logits`) for sampling
            b.head = cp.empty((self.max_batch, self.head_rows), np.float32)
            b.pairs = cp.empty((self.max_batch, 2), np.int32)
            b.pairs_all = cp.empty(self.tensor_parallel * self.max_batch * 2, np.int32)
        # where the normalized rows live: x (normalized in place), or x2 when the fused all-reduce writes them
        if self.allreduce is not None and self.allreduce.fused:
            b.x2 = cp.empty((rows, h), storage)
        self.normed = b.x2 if hasattr(b, "x2") else b.x
        self.allocate_steps()

    def _allocate_attention_caches(self) -> None:
        """Descriptors of each layer's K and V cache in ``buffers.kv``."""
        c, b = self.config, self.buffers
        kv_shape = (self.num_pages, self.page_size, c.num_kv_heads, c.head_dim)
        dtype = self.kv_dtype
        self.k_cache = [
            kernels.descriptor(b.kv[i, 0].data.ptr, kv_shape, dtype, self.device, owner=b.kv)
            for i in range(c.num_layers)
        ]
        self.v_cache = [
            kernels.descriptor(b.kv[i, 1].data.ptr, kv_shape, dtype, self.device, owner=b.kv)
            for i in range(c.num_layers)
        ]

    def allocate_steps(self) -> None:
        """The per-step index arrays (host staging and device), the token-id buffers and the sampling state:
        what every architecture's serving loop shares."""
        cp = self.cupy
        max_pages = self.num_pages  # every request's pages at once, plus padding rows' page 0
        max_pages += self.max_batch
        self._dlayout = decode_layout(self.max_batch, max_pages)
        # with room for a padded prefill's padding request (the prefill graphs' buckets: paging.pad_prefill)
        self._playout = prefill_layout(self.max_prefill_tokens, self.max_batch, max_pages, padded=True)
        self._dmeta, self._dhost = self._meta(self._dlayout.total)
        self._pmeta, self._phost = self._meta(self._playout.total)
        self.decode_arrays = self._dlayout.views(self._dhost)
        self.prefill_arrays = self._playout.views(self._phost)
        self._ids_mem = cp.cuda.alloc_pinned_memory(12 * self.max_batch)
        self._ids_host = np.frombuffer(self._ids_mem, np.int32, self.max_batch)  # a prefill's tokens, by slot
        self._prefill_done = cp.cuda.Event(disable_timing=True)  # the end of their copy
        # a decode step's tokens, in turn: two steps may be in flight (ServingLoop.pipelined_decode), each copying
        # into its own buffer and marking its copy's end with its own event
        self._decode_ids = (
            np.frombuffer(self._ids_mem, np.int32, self.max_batch, 4 * self.max_batch),
            np.frombuffer(self._ids_mem, np.int32, self.max_batch, 8 * self.max_batch),
        )
        self._decode_done = (cp.cuda.Event(disable_timing=True), cp.cuda.Event(disable_timing=True))
        self._decode_turn = 0
        self._views: dict[tuple[Any, ...], SimpleNamespace] = {}
        # `prepare_ahead`: the graph loop prepares the next decode step (index arrays copied, attention planned)
        # while the GPU runs this one (ModelRunner.stage_decode_ahead); `_staged` marks the end of the last copy out
        # of the host staging buffers. The runner turns it on where the family allows it (ModelFamily.plans_ahead).
        self._staged = cp.cuda.Event(disable_timing=True)
        self.staged_wait_s = 0.0  # the last staging's wait for `_staged` (ServingLoop._advance_pipelined)
        self.prepare_ahead = False

    def _meta(self, n: int) -> tuple[Any, np.ndarray]:
        """A device int32 buffer of ``n`` entries and its page-locked host staging twin."""
        mem = self.cupy.cuda.alloc_pinned_memory(4 * n)
        host = np.frombuffer(mem, np.int32, n)
        host[:] = 0
        self.device_arrays.append(mem)
        return self.cupy.zeros(n, np.int32), host

    def _view(self, kind: str, rows: int, batch: int) -> SimpleNamespace:
        """:func:`step_views` over the engine's buffers, made once per shape."""
        key = (kind, rows, batch)
        v = self._views.get(key)
        if v is None:
            if len(self._views) > 256:
                self._views.clear()
            b = self.buffers
            meta, layout = (self._dmeta, self._dlayout) if kind == "decode" else (self._pmeta, self._playout)
            arrays = {
                "h": b.h,
                "x": b.x,
                "x2": self.normed,
                "qkv": b.qkv,
                "attn": b.attn,
                "gu": b.gu,
                "act": b.act,
                "logits": b.logits,
                "ids": b.ids,
                "meta": meta,
            }
            v = self._views[key] = step_views(
                self.config,
                self.dtype,
                self.device,
                {k: a.data.ptr for k, a in arrays.items()},
                layout,
                kind,
                rows,
                batch,
                arrays,
            )

        return v


def step_views(
    c: LlamaConfig,
    dtype: str,
    device: int,
    base: dict[str, int],
    layout: Layout,
    kind: str,
    rows: int,
    batch: int,
    owners: dict[str, Any] | None = None,
) -> SimpleNamespace:
    """Descriptors of one forward pass's operands: the first ``rows`` token rows of the activation buffers
    (``base``: their device addresses, plus ``meta``, the index arrays laid out by ``layout``) and the index
    arrays of a ``batch``-request step (``kind``: "decode", "prefill", or "padded prefill": a prefill of ``batch
    - 1`` request slots, real or empty, and the padding request of
    :func:`~fi_engine.runtime.sched.step_arrays.pad_prefill`, so ``logits`` and ``ids``, one row per slot, cover ``batch
    - 1`` rows).

    q, k and v are strided views into the fused QKV rows ``[rows, (Hq + 2 Hk) * D]`` (no copy); the int32 index
    arrays are regions of ``meta``; ``token_ids`` and ``last_rows`` are raw addresses (read by the gather kernel).
    """
    own = owners or {}
    hq, hk, d, h = c.num_qo_heads, c.num_kv_heads, c.head_dim, c.hidden_size
    w = (hq + 2 * hk) * d
    item = 2  # float16 / bfloat16
    qkv, meta = base["qkv"], base["meta"]

    def t(
        name: str,
        shape: tuple[int, ...],
        dt: str = dtype,
        at: int | None = None,
        strides: tuple[int, ...] | None = None,
    ) -> Any:
        return kernels.descriptor(base[name] if at is None else at, shape, dt, device, strides, owner=own.get(name))

    def region(name: str, n: int) -> Any:
        return t("meta", (n,), "int32", meta + 4 * layout.offsets[name])

    # rows of logits and tokens: one per real request (the buffers hold max_batch; the padding request has none)
    chosen = batch - 1 if kind == "padded prefill" else batch

    v = SimpleNamespace(
        h=t("h", (rows, h)),
        x=t("x", (rows, h)),
        x2=t("x2" if "x2" in base else "x", (rows, h)),  # the normalized rows (x itself without a fused all-reduce)
        q=t("qkv", (rows, hq, d), strides=(w, d, 1)),
        k=t("qkv", (rows, hk, d), at=qkv + item * hq * d, strides=(w, d, 1)),
        v=t("qkv", (rows, hk, d), at=qkv + item * (hq + hk) * d, strides=(w, d, 1)),
        attn=t("attn", (rows, hq, d)),
        gu=t("gu", (rows, 2 * c.intermediate_size)),
        act=t("act", (rows, c.intermediate_size)),
        token_ids=meta + 4 * layout.offsets["token_ids"],
        positions=region("positions", rows),
        batch_indices=region("batch_indices", rows),
        kv_indptr=region("kv_indptr", batch + 1),
        kv_last_page_len=region("kv_last_page_len", batch),
        kv_indices=region("kv_indices", layout.sizes["kv_indices"]),
        logits=t("logits", (chosen, c.vocab_size), "float32"),
        ids=t("ids", (chosen,), "int32"),
        prepared={},  # the engine's launches packed once over these views (a kind, or a weight's address -> call)
        kind=kind,
    )
    if kind in ("prefill", "padded prefill"):
        v.qo_indptr = region("qo_indptr", batch + 1)
        v.last_rows = meta + 4 * layout.offsets["last_rows"]
    return v
