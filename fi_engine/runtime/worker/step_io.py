"""What crosses between the host and the device at every step, a part of the model runner
(:class:`~fi_engine.runtime.worker.model_runner.ModelRunner` holds one, ``runner.io``, made when its buffers exist:
``allocate_steps``): the step's index arrays in (written on the host into page-locked staging buffers,
:mod:`~fi_engine.runtime.sched.step_arrays`, and copied to their device twins in one copy), the chosen tokens out
(page-locked buffers and the events that mark each copy's end), and :func:`step_views`, the descriptors of one forward
pass's operands over the runner's buffers. Allocated once (no allocation per step, which is also what keeps a captured
graph valid).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from ...checkpoint.config import LlamaConfig
from ...kernels import flashinfer as kernels
from ...kernels.copies import D2D, D2H, H2D, host_address
from ..sched.step_arrays import Layout, decode_layout, prefill_layout
from .state import RunnerState

__all__ = ["step_views"]


class StepIO:
    """The step arrays, token copies and step views of ``runner`` (its ``buffers`` made already)."""

    def __init__(self, runner: RunnerState) -> None:
        self.runner = runner
        r, cp = runner, runner.cupy
        max_pages = r.num_pages  # every request's pages at once, plus padding rows' page 0
        max_pages += r.max_batch
        self.decode_layout = decode_layout(r.max_batch, max_pages)
        # with room for a padded prefill's padding request (the prefill graphs' buckets: step_arrays.pad_prefill)
        self.prefill_layout = prefill_layout(r.max_prefill_tokens, r.max_batch, max_pages, padded=True)
        self.decode_meta, self._decode_host = self._meta(self.decode_layout.total)
        self.prefill_meta, self._prefill_host = self._meta(self.prefill_layout.total)
        self.decode_arrays = self.decode_layout.views(self._decode_host)
        self.prefill_arrays = self.prefill_layout.views(self._prefill_host)
        self._ids_mem = cp.cuda.alloc_pinned_memory(12 * r.max_batch)
        self._ids_host = np.frombuffer(self._ids_mem, np.int32, r.max_batch)  # a prefill's tokens, by slot
        self._prefill_done = cp.cuda.Event(disable_timing=True)  # the end of their copy
        # a decode step's tokens, in turn: two steps may be in flight (ServingLoop.pipelined_decode), each copying
        # into its own buffer and marking its copy's end with its own event
        self._decode_ids = (
            np.frombuffer(self._ids_mem, np.int32, r.max_batch, 4 * r.max_batch),
            np.frombuffer(self._ids_mem, np.int32, r.max_batch, 8 * r.max_batch),
        )
        self._decode_done = (cp.cuda.Event(disable_timing=True), cp.cuda.Event(disable_timing=True))
        self._decode_turn = 0
        self._views: dict[tuple[Any, ...], SimpleNamespace] = {}
        # the end of the last copy out of the decode staging buffers: the graph loop prepares the next decode step
        # (index arrays copied, attention planned) while the GPU runs this one (ModelRunner.stage_decode_ahead)
        self.staged = cp.cuda.Event(disable_timing=True)

    def _meta(self, n: int) -> tuple[Any, np.ndarray]:
        """A device int32 buffer of ``n`` entries and its page-locked host staging twin."""
        r = self.runner
        mem = r.cupy.cuda.alloc_pinned_memory(4 * n)
        host = np.frombuffer(mem, np.int32, n)
        host[:] = 0
        r.device_arrays.append(mem)
        return r.cupy.zeros(n, np.int32), host

    # ---- index arrays in

    def copy_decode(self, n_pages: int) -> None:
        """The decode arrays to the device, up to the first ``n_pages`` page ids (``kv_indices`` is last)."""
        r = self.runner
        n = self.decode_layout.end("kv_indices", n_pages)
        r.cupy.cuda.runtime.memcpyAsync(
            self.decode_meta.data.ptr, host_address(self._decode_host), 4 * n, H2D, r.stream_ptr
        )

    def copy_prefill(self, n_pages: int) -> None:
        """The prefill arrays to the device, up to the first ``n_pages`` page ids."""
        r = self.runner
        n = self.prefill_layout.end("kv_indices", n_pages)
        r.cupy.cuda.runtime.memcpyAsync(
            self.prefill_meta.data.ptr, host_address(self._prefill_host), 4 * n, H2D, r.stream_ptr
        )

    def prefill_region(self, name: str) -> int:
        """The device address of the prefill arrays' region ``name``."""
        return int(self.prefill_meta.data.ptr + 4 * self.prefill_layout.offsets[name])

    def feed_staged_decode(self, rows: int) -> None:
        """A decode step staged ahead takes its input tokens from the step or pass before it, still in
        ``buffers.ids`` in slot order: copied on the device into its ``token_ids``."""
        r = self.runner
        token_ids = self.decode_meta.data.ptr + 4 * self.decode_layout.offsets["token_ids"]
        r.cupy.cuda.runtime.memcpyAsync(token_ids, r.buffers.ids.data.ptr, 4 * rows, D2D, r.stream_ptr)

    # ---- tokens out

    def send_prefill_tokens(self, width: int) -> Any:
        """Copy the pass's chosen tokens (``buffers.ids``, one per slot up to ``width``) to the host behind it on the
        stream; returns the event marking the copy's end (:meth:`prefill_tokens` reads them once it has passed)."""
        r = self.runner
        r.cupy.cuda.runtime.memcpyAsync(
            host_address(self._ids_host), r.buffers.ids.data.ptr, 4 * width, D2H, r.stream_ptr
        )
        self._prefill_done.record(r.stream)
        return self._prefill_done

    def prefill_tokens(self, slots: Sequence[int]) -> list[int]:
        """The tokens the last prefill pass chose for ``slots`` (after its copy: :meth:`send_prefill_tokens`)."""
        return self._ids_host[list(slots)].tolist()

    def send_decode_tokens(self, rows: int) -> tuple[np.ndarray, Any]:
        """Copy the step's chosen tokens (``buffers.ids``) to the host behind it on the stream, into the next of
        the two decode token buffers (two steps may be in flight); returns that buffer and the event marking the
        copy's end."""
        r = self.runner
        turn = self._decode_turn
        self._decode_turn = 1 - turn
        ids, done = self._decode_ids[turn], self._decode_done[turn]
        r.cupy.cuda.runtime.memcpyAsync(host_address(ids), r.buffers.ids.data.ptr, 4 * rows, D2H, r.stream_ptr)
        done.record(r.stream)
        return ids, done

    # ---- the step views

    def view(self, kind: str, rows: int, batch: int) -> SimpleNamespace:
        """:func:`step_views` over the runner's buffers, made once per shape."""
        key = (kind, rows, batch)
        v = self._views.get(key)
        if v is None:
            if len(self._views) > 256:
                self._views.clear()
            r = self.runner
            b = r.buffers
            meta, layout = (
                (self.decode_meta, self.decode_layout) if kind == "decode" else (self.prefill_meta, self.prefill_layout)
            )
            arrays = {
                "h": b.h,
                "x": b.x,
                "x2": r.normed,
                "qkv": b.qkv,
                "attn": b.attn,
                "gu": b.gu,
                "act": b.act,
                "logits": b.logits,
                "ids": b.ids,
                "meta": meta,
            }
            v = self._views[key] = step_views(
                r.config,
                r.dtype,
                r.device,
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
    arrays are regions of ``meta``; ``token_ids`` and ``last_rows`` are raw addresses (read by the gather kernel), as is
    ``lora_slots`` (each row's LoRA slot, read by the adapters' kernels).
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
        lora_slots=meta + 4 * layout.offsets["lora_slots"],  # each row's adapter slot (fi_engine.lora.device)
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
