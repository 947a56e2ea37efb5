"""The index arrays of a step's rows, as the attention kernels read a paged KV cache (FlashInfer's paged layout),
written on the host from the requests' pages (:func:`fill_decode`, :func:`fill_prefill`, :func:`pad_prefill`), and
their :class:`Layout` in one flat int32 buffer (one host-to-device copy per step).

For a batch of ``B`` rows: ``kv_indptr`` ``[B + 1]`` (row ``b`` owns ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]``),
``kv_indices`` (page ids), ``kv_last_page_len`` ``[B]`` (tokens in the last page, ``1..page_size``), plus per
appended token its row (``batch_indices``) and position (``positions``, also the RoPE position); a prefill also
``qo_indptr`` ``[B + 1]`` (each request's token rows) and ``last_rows`` (each request's last row); and per token row
the GPU slot of its request's LoRA adapter (``lora_slots``, -1 for none: :mod:`fi_engine.lora.batch`). All int32.
Nothing here touches a GPU (tests/engine/test_serving_host.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...lora.batch import NO_ADAPTER, row_slots
from ...values import arg_int, show
from .pages import PAD_PAGE, pages_for
from .request import Request

__all__ = ["Layout", "fill_decode", "fill_prefill", "kv_lengths", "pad_prefill"]


class Layout:
    """Named int32 regions at fixed offsets of one flat buffer (one host-to-device copy per step).

    Offsets are rounded up to 32 entries (128 bytes) so every region is aligned for vector loads.
    """

    def __init__(self, sizes: dict[str, int]) -> None:
        self.offsets: dict[str, int] = {}
        self.sizes = dict(sizes)
        at = 0
        for name, n in sizes.items():
            self.offsets[name] = at
            at += -(-n // 32) * 32
        self.total = at

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Full-size views of each region of ``flat`` (int32, at least :attr:`total` entries)."""
        return {k: flat[o : o + self.sizes[k]] for k, o in self.offsets.items()}

    def end(self, name: str, used: int) -> int:
        """Entries of the flat buffer up to the first ``used`` entries of region ``name`` (for partial copies)."""
        return self.offsets[name] + used


def decode_layout(max_rows: int, max_pages: int) -> Layout:
    """The decode step's regions; ``kv_indices`` last, so a copy can stop after the pages in use."""
    return Layout(
        {
            "token_ids": max_rows,
            "positions": max_rows,
            "batch_indices": max_rows,
            "kv_indptr": max_rows + 1,
            "kv_last_page_len": max_rows,
            "lora_slots": max_rows,
            "kv_indices": max_pages,
        }
    )


def prefill_layout(max_tokens: int, max_rows: int, max_pages: int, padded: bool = False) -> Layout:
    """The prefill's regions for up to ``max_tokens`` token rows of ``max_rows`` requests holding ``max_pages``
    pages; ``kv_indices`` last. ``padded``: also room for :func:`pad_prefill`'s padding request (one more request,
    and up to ``ceil(max_tokens / page_size)`` more page ids, which ``max_tokens`` bounds for any page size)."""
    extra = 1 if padded else 0
    return Layout(
        {
            "token_ids": max_tokens,
            "positions": max_tokens,
            "batch_indices": max_tokens,
            "qo_indptr": max_rows + extra + 1,
            "kv_indptr": max_rows + extra + 1,
            "kv_last_page_len": max_rows + extra,
            "last_rows": max_rows,
            "rider_slots": max_rows,
            "lora_slots": max_tokens,
            "kv_indices": max_pages + (max_tokens if padded else 0),
        }
    )


def fill_prefill(
    requests: Sequence[Request], page_size: int, v: dict[str, np.ndarray], ahead: int = 0
) -> tuple[int, int]:
    """Write the prefill arrays of ``requests`` (pages already held) into the views ``v``: each request's tokens
    whose K/V are not in the cache yet, at their positions. For a request just admitted that is its whole prompt
    (positions ``0..n-1``), from past its cached prefix, to the end of its chunk where it is prefilled in chunks
    (``Request.chunk_end``); for one that is decoding (a mixed pass, ``ServingLoop.mixed_prefill``) its last token
    at its position ``len(prompt) + len(output) - 1`` (``cached``), attending to the tokens before it as a decode
    step would. ``ahead=1``: the decoding requests' last tokens come from a decode step in flight, not recorded
    yet: each is fed one position further, with token id 0 in place of the token (the caller writes it).

    Row ``b`` is ``requests[b]``; its tokens are rows ``qo_indptr[b]:qo_indptr[b+1]``, its KV the pages that hold
    its tokens up to its last row's; ``last_rows[b]`` is its last token's row (whose logits give its next token).
    Returns ``(nnz, pages)``: tokens and page ids written.
    """
    ids: list[int] = []
    positions: list[int] = []
    rows: list[int] = []
    indices: list[int] = []
    qo = [0]
    kv = [0]
    last_page_len: list[int] = []
    for b, r in enumerate(requests):
        new: Sequence[int]
        if r.output:  # decoding: its last token, one row (and its draft's, speculating: ServingLoop)
            start = r.position(ahead)
            new = (0,) if ahead else (r.output[-1], *r.draft)
        else:  # admitted: its prompt from the first token not in the cache (a prefix cache hit: past the hit, a
            start = r.cached  # chunk of chunked prefill: past the chunks before), to its end or its chunk's
            new = r.prompt[start : r.chunk_end]
        end = start + len(new)
        need = pages_for(end, page_size)
        if not new or len(r.pages) < need:
            raise AssertionError(f"request {r.rid}: holds {len(r.pages)} pages, its {end} tokens need {need}")
        ids.extend(new)
        positions.extend(range(start, end))
        rows.extend([b] * len(new))
        indices.extend(r.pages[:need])
        qo.append(len(ids))
        kv.append(len(indices))
        last_page_len.append((end - 1) % page_size + 1)
    t, p, n = len(ids), len(indices), len(requests)
    v["token_ids"][:t] = ids
    v["positions"][:t] = positions
    v["batch_indices"][:t] = rows
    v["kv_indices"][:p] = indices
    v["qo_indptr"][: n + 1] = qo
    v["kv_indptr"][: n + 1] = kv
    v["kv_last_page_len"][:n] = last_page_len
    v["last_rows"][:n] = qo[1:]
    v["last_rows"][:n] -= 1
    if "lora_slots" in v:  # each row its request's adapter slot (-1: none)
        row_slots([r.lora_slot for r in requests], np.diff(qo), v["lora_slots"])
    return t, p


def pad_prefill(
    v: dict[str, np.ndarray],
    nnz: int,
    bucket: int,
    batch: int,
    pages: int,
    page_size: int,
    requests: int | None = None,
) -> int:
    """Append the **padding request** to a prefill that :func:`fill_prefill` wrote (``nnz`` token rows of ``batch``
    requests, ``pages`` page ids) so that its rows fill ``bucket``; returns the page ids written in all.
    ``requests``: the prefill's requests in all once padded (default ``batch + 1``): past the padding request, empty
    requests (no row, no page) up to that count, so the plan's batch size (and the graph's shape) is ``requests``.

    The padding request is request ``batch``: rows ``nnz .. bucket - 1`` (``P = bucket - nnz``, possibly 0),
    token 0 at positions ``0 .. P - 1``, and a KV of ``P`` tokens held by ``ceil(P / page_size)`` entries that
    are all :data:`PAD_PAGE`. So it is an ordinary causal prompt (``kv_len == qo_len``: every row attends to
    something, nothing outside FlashInfer's prefill contract) whose K/V land only on the padding page, which no
    real request reads; its output rows are ignored, and ``last_rows`` keeps naming the real requests' rows.
    ``qo_indptr[batch + 1] == bucket`` fixes the plan's ``total_num_rows``, hence a CUDA-graph plan's layout.

    ``v``: the views of a :func:`prefill_layout` made with ``padded=True`` (1-D int32 arrays by name). Raises
    TypeError/ValueError naming the argument (or ``v[name]``) that is no int, is out of range, disagrees with
    what :func:`fill_prefill` wrote (``qo_indptr[batch] == nnz``, ``kv_indptr[batch] == pages``), or would write
    past one of ``v``'s arrays; nothing is written then.
    """
    if not isinstance(v, dict):
        raise TypeError(f"v: expected the dict of a prefill layout's views, got {type(v).__name__}")
    rows_keys = ("token_ids", "positions", "batch_indices", *(("lora_slots",) if "lora_slots" in v else ()))
    for key in (*rows_keys, "qo_indptr", "kv_indptr", "kv_last_page_len", "kv_indices"):
        a = v.get(key)
        if not isinstance(a, np.ndarray) or a.dtype != np.int32 or a.ndim != 1:
            raise TypeError(f"v[{key!r}]: expected a 1-D int32 numpy array (a prefill layout's view), got {show(a)}")
    rows_room = min(len(v[key]) for key in rows_keys)
    requests_room = min(len(v["qo_indptr"]) - 1, len(v["kv_indptr"]) - 1, len(v["kv_last_page_len"]))
    kv_indices = v["kv_indices"]
    page_size = arg_int("page_size", page_size, 1, (1 << 31) - 1)
    nnz = arg_int("nnz", nnz, 0, rows_room)
    bucket = arg_int("bucket", bucket, 0, rows_room)
    if bucket < nnz:
        raise ValueError(f"bucket: {bucket} rows cannot hold the prefill's {nnz} token rows")
    batch = arg_int("batch", batch, 0, requests_room - 1)  # the padding request is request `batch`
    requests = batch + 1 if requests is None else arg_int("requests", requests, batch + 1, requests_room)
    pages = arg_int("pages", pages, 0, len(kv_indices))
    if int(v["qo_indptr"][batch]) != nnz:
        raise ValueError(
            f"nnz: {nnz} rows, but qo_indptr[{batch}] (what fill_prefill wrote) is {v['qo_indptr'][batch]}"
        )
    if int(v["kv_indptr"][batch]) != pages:
        raise ValueError(
            f"pages: {pages} ids, but kv_indptr[{batch}] (what fill_prefill wrote) is {v['kv_indptr'][batch]}"
        )
    p = bucket - nnz
    need = pages_for(p, page_size)
    if pages + need > len(kv_indices):
        raise ValueError(f"pages: {pages} + {need} padding page ids exceed v['kv_indices'] ({len(kv_indices)})")
    v["token_ids"][nnz:bucket] = 0
    v["positions"][nnz:bucket] = np.arange(p, dtype=np.int32)
    v["batch_indices"][nnz:bucket] = batch
    v["kv_indices"][pages : pages + need] = PAD_PAGE
    v["qo_indptr"][batch + 1 : requests + 1] = bucket
    v["kv_indptr"][batch + 1 : requests + 1] = pages + need
    v["kv_last_page_len"][batch] = (p - 1) % page_size + 1 if p else 0
    v["kv_last_page_len"][batch + 1 : requests] = 0  # the empty requests: no page
    if "lora_slots" in v:  # the padding rows take no adapter
        v["lora_slots"][nnz:bucket] = NO_ADAPTER
    return pages + need


def fill_decode(rows: Sequence[Request | None], page_size: int, v: dict[str, np.ndarray], ahead: int = 0) -> int:
    """Write one decode step's arrays for ``rows`` (None: a padding row) into the views ``v``; returns the
    number of page ids written.

    Row ``i`` feeds its request's last token at its position ``len(prompt) + len(output) - 1`` (``cached`` once its
    tokens are recorded; padding: token 0 at position 0 on :data:`PAD_PAGE`) and attends to the tokens up to it,
    so its pages must already cover them (:meth:`Scheduler.decode_rows`).

    ``ahead=1``: the step after a pass in flight that gives the request a token (a decode step, or the prefill
    pass that gives an admitted request its first: :meth:`Scheduler.peek_rows`): one position further, and token
    id 0 in place of the token the pass in flight has not produced yet (the caller writes it); ``ahead=2``: the
    step after two in flight (``ServingLoop.pipelined_decode``), two positions further.
    """
    ids: list[int] = []
    pos: list[int] = []
    last: list[int] = []
    indptr = [0]
    indices: list[int] = []
    adapters: list[int] = []  # each row's LoRA slot, the scheduler's own ints (row_slots' checks: ~40 us a step)
    for r in rows:
        if r is None:
            ids.append(0)
            pos.append(0)
            last.append(1)
            indices.append(PAD_PAGE)
            adapters.append(NO_ADAPTER)
        else:
            at = r.position(ahead)
            if len(r.pages) * page_size <= at:
                raise AssertionError(f"request {r.rid}: {len(r.pages)} pages cannot hold token {at}")
            ids.append(r.output[-1] if not ahead else 0)
            pos.append(at)
            last.append(at % page_size + 1)
            indices.extend(r.pages)
            adapters.append(r.lora_slot)
        indptr.append(len(indices))
    n = len(rows)
    v["token_ids"][:n] = ids
    v["positions"][:n] = pos
    v["batch_indices"][:n] = range(n)
    v["kv_indptr"][: n + 1] = indptr
    v["kv_last_page_len"][:n] = last
    v["kv_indices"][: len(indices)] = indices
    if "lora_slots" in v:  # each row its request's adapter slot; a padding row none
        v["lora_slots"][:n] = adapters
    return len(indices)


def kv_lengths(
    kv_indptr: np.ndarray, kv_last_page_len: np.ndarray, rows: int, page_size: int, out: np.ndarray
) -> np.ndarray:
    """The KV length in tokens of each of a step's first ``rows`` rows, from its page table: ``(pages - 1) *
    page_size + kv_last_page_len`` (a padding row's is 1), written into ``out[:rows]`` (int32, a buffer the caller
    keeps: no allocation per step) and returned."""
    lens = out[:rows]
    np.subtract(kv_indptr[1 : rows + 1], kv_indptr[:rows], out=lens)
    lens -= 1
    lens *= page_size
    lens += kv_last_page_len[:rows]
    return lens
