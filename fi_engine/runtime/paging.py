"""The host side of serving: pages, requests, batching, padding, and the index arrays the kernels read.

Nothing here touches a GPU, so it is tested on CPU (tests/engine/test_serving_host.py).

KV cache: ``num_pages`` pages of ``page_size`` tokens per layer. Page 0 is reserved as the **padding page**:
padded rows of a CUDA-graph batch append their (ignored) K/V there and attend to its one token, so a padded
row is an ordinary one-token request and the kernels need no special case; a padded prefill's extra rows are
likewise one ordinary prompt whose pages are all the padding page (:func:`pad_prefill`). Real requests get pages
``1 .. num_pages - 1`` from :class:`PageAllocator`.

A request's life (:class:`Scheduler`):

1. :meth:`Scheduler.submit` checks it and queues it. Its page **budget** is the most it can ever hold:
   ``ceil((len(prompt) + max_new_tokens - 1) / page_size)`` (the last generated token is never fed back).
2. :meth:`Scheduler.admit` moves queued requests into free batch slots while the free pages cover every
   admitted request's remaining budget, so decoding never runs out of pages (no preemption needed). The
   admitted requests get their prompt's pages and are prefilled together (:func:`fill_prefill`).
3. Each decode step feeds every active request its last token at position ``cached`` (the tokens whose K/V
   are in the cache): :meth:`Scheduler.decode_rows` gives it a new page when ``cached`` is a multiple of
   ``page_size``, :func:`fill_decode` writes the step's arrays.
4. :meth:`Scheduler.record` appends the sampled tokens (a request with a grammar advances its matcher past its
   token); a request that produced an end-of-sequence token (or its grammar's end) or its ``max_new_tokens``-th
   token finishes, leaves its slot and frees its pages.
5. :meth:`Scheduler.abort` ends a queued or active request at any time between steps: it leaves the queue or its
   slot and its pages go back at once (``finish_reason`` ``"abort"``).

Index arrays (FlashInfer's paged layout), for a batch of ``B`` rows: ``kv_indptr`` ``[B + 1]`` (row ``b``
owns ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]``), ``kv_indices`` (page ids), ``kv_last_page_len`` ``[B]``
(tokens in the last page, ``1..page_size``), plus per appended token its row (``batch_indices``) and position
(``positions``, also the RoPE position). All int32.
"""

from __future__ import annotations

import bisect
import operator
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np

from ..text.grammar import GrammarMatcher
from ..values import MAX_SIZE, arg_int, integer, show
from .sampling_params import SamplingParams, asks_processing, sampling_arg

__all__ = [
    "PAD_PAGE",
    "Layout",
    "OutOfPagesError",
    "PageAllocator",
    "Request",
    "Scheduler",
    "bucket_for",
    "decode_batches",
    "fill_decode",
    "fill_prefill",
    "pad_prefill",
    "pages_for",
    "prefill_buckets",
    "prefill_slots",
]

PAD_PAGE = 0


# More pages than any device's KV cache holds (2**24 pages of 16 tokens at >= 1 KiB per token: >= 256 GiB), and
# far below the kernels' int32 page ids; the allocator keeps a free list of this length.
MAX_PAGES = 1 << 24


class OutOfPagesError(RuntimeError):
    """The KV cache has fewer free pages than requested."""


def pages_for(tokens: int, page_size: int) -> int:
    """Pages needed to hold ``tokens`` tokens (``tokens >= 0``, ``page_size >= 1``)."""
    tokens = integer("tokens", tokens, 0)
    page_size = integer("page_size", page_size, 1)
    if tokens >= 1 << 63 or page_size >= 1 << 31:
        raise ValueError(f"tokens, page_size: expected tokens < 2**63 and page_size < 2**31, got {tokens}, {page_size}")
    return -(-tokens // page_size)


class PageAllocator:
    """Hands out page ids ``reserved .. num_pages - 1``; freed pages are reused first (LIFO, warm in cache)."""

    def __init__(self, num_pages: int, reserved: int = 1) -> None:
        if isinstance(reserved, bool) or not isinstance(reserved, int) or not 0 <= reserved < MAX_PAGES:
            raise ValueError(f"reserved: expected an integer in [0, {MAX_PAGES}), got {reserved!r}")
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or not reserved < num_pages <= MAX_PAGES:
            raise ValueError(
                f"num_pages: expected an integer in ({reserved}, {MAX_PAGES}] (page {PAD_PAGE} is the padding page; "
                f"no device holds more), got {num_pages!r}"
            )
        self.num_pages = num_pages
        self.reserved = reserved
        self._free = list(range(num_pages - 1, reserved - 1, -1))  # pop() gives the lowest id first
        self._used = bytearray(num_pages)

    @property
    def capacity(self) -> int:
        """Pages requests can ever hold (all but the reserved ones)."""
        return self.num_pages - self.reserved

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        """``n`` page ids, all or none: OutOfPagesError if fewer than ``n`` are free."""
        if n > len(self._free):
            raise OutOfPagesError(
                f"the KV cache has {len(self._free)} free pages of {self.capacity}, {n} "
                f"requested; allocate more pages (num_pages=) or serve fewer or shorter requests"
            )
        if n <= 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        pages.reverse()
        for p in pages:
            self._used[p] = 1
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Give pages back. ValueError (nothing freed) for a page that is not allocated (double free)."""
        pages = list(pages)
        seen = set()
        for p in pages:
            if not (self.reserved <= p < self.num_pages) or not self._used[p] or p in seen:
                raise ValueError(f"pages: page {p} is not allocated (double free, or not from this allocator)")
            seen.add(p)
        for p in reversed(pages):
            self._used[p] = 0
            self._free.append(p)


@dataclass(eq=False)
class Request:
    """One prompt being served. ``output`` holds the generated tokens (the first comes from the prefill).

    ``sampling``: how its tokens are chosen (None: greedy argmax); ``draws``: the random stream its sampled tokens
    draw from (the engine's :class:`~fi_engine.runtime.sampling.Draws`; None when greedy); ``eos``: the tokens that end
    it (None: the scheduler's); ``grammar``: where its ``sampling.grammar`` is set, the matcher of its output so
    far (the tokens allowed next: :class:`~fi_engine.runtime.logits_processing.LogitsProcessor`)."""

    rid: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    budget_pages: int
    output: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V are in the cache
    # chunked prefill: where the prompt's pass in flight (or the last recorded) ends, short of the prompt's end; None
    # once its last chunk is admitted (or its prompt was prefilled whole). A request whose chunk is set takes no
    # token from its pass and is no decode row (Scheduler.admit; Scheduler.chunk_tokens)
    chunk_end: int | None = None
    draft: tuple[int, ...] = ()  # speculative decoding: the tokens fed after its last one in the pass being staged
    speculative: bool = True  # speculative decoding may draft for it (its sampling's speculative_decoding)
    drafted: int = 0  # speculative decoding: draft tokens verified since its last output (the step API's), and ...
    accepted: int = 0  # ... how many of them were accepted
    hit: int = 0  # prompt tokens found in the prefix cache at admission (their K/V computed by an earlier request)
    asks: SamplingParams | None = None  # its sampling where it sets logprobs or a control (asks_processing)
    logprobs: list[Any] = field(default_factory=list)  # a TokenLogprobs per output token, where asks.logprobs is set
    prompt_logprobs: tuple[Any, ...] | None = None  # None, then a TokenLogprobs per prompt token (asks.prompt_logprobs)
    slot: int = -1  # row in the batch while active
    finish_reason: str | None = None  # "eos", "length" or "abort" once finished
    sampling: SamplingParams | None = None
    draws: Any = None
    eos: frozenset[int] | None = None
    queued_at: float = 0.0  # time.perf_counter() when it was submitted
    grammar: GrammarMatcher | None = None  # its place in its sampling's grammar (None: no grammar)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def decoding(self) -> bool:
        """Whether it is a decode row: its prompt's prefill is, or will be once the pass in flight ends, complete
        (not cut short by chunked prefill)."""
        return self.chunk_end is None

    def position(self, ahead: int = 0) -> int:
        """The position of the token it is fed next: its last token's (``cached`` once its tokens are recorded),
        or ``ahead`` positions further where that many passes giving it a token are in flight, not recorded."""
        return len(self.prompt) + len(self.output) - 1 + ahead


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
    return t, p


# Bucketed prefill graphs (LlamaEngine._prefill_graph): a prefill's token rows are padded up to a bucket so every
# prompt length in a bucket replays one CUDA graph. Below _COARSE_UNTIL rows a prefill's GPU time barely depends
# on its rows (launch-bound kernels, GEMMs far from filling the GPU), so padding there is free and the ladder
# doubles (fewer graphs to capture); above it the GEMMs' time grows with the rows, so the ladder takes quarter
# octaves (x1.25, x1.2, x1.17, x1.14): at most 25 % padded rows, about 12 % on average, for 4 graphs per octave.
_MIN_BUCKET = 16
_COARSE_UNTIL = 256


def prefill_buckets(max_tokens: int) -> tuple[int, ...]:
    """The token-row buckets of padded prefill graphs, ascending, the last one ``max_tokens`` (the engine's
    buffer rows): 16, 32, 64, 128, 256 (doubling), then quarter octaves 320, 384, 448, 512, 640, 768, 896,
    1024, 1280, ... (see the comment above); a bucket above ``max_tokens`` becomes ``max_tokens``."""
    max_tokens = integer("max_tokens", max_tokens, 1)
    if max_tokens >= 1 << 31:
        bits = max_tokens.bit_length()
        raise ValueError(f"max_tokens: expected token rows below 2**31 (the kernels' int32), got {bits} bits")
    ladder: list[int] = []
    n = _MIN_BUCKET
    while n < max_tokens:
        ladder.append(n)
        if n < _COARSE_UNTIL:
            n *= 2
        else:
            octave = 1 << (n.bit_length() - 1)  # the power of two at or below n: steps of a quarter of it
            n += octave // 4
    ladder.append(max_tokens)
    return tuple(ladder)


def decode_batches(max_batch: int) -> tuple[int, ...]:
    """The batch sizes the decode step is captured at as CUDA graphs, ascending: the powers of two below
    ``max_batch``, then ``max_batch`` itself (1, 2, 4, 8, 16, 32, 48 for 48). A step replays the smallest graph
    holding every occupied slot (:meth:`Scheduler.graph_rows`), as vLLM and SGLang pad to their capture sizes:
    with one graph of ``max_batch`` rows, a server's step at low load ran ``max_batch`` rows (a one-row step of an
    8B model is the fused GEMV step, a 32-row one cuBLASLt's GEMMs and 32 rows of attention; a MoE step's padding
    rows route to experts of their own). Doubling keeps the padding at most half the rows, where a decode step's
    time barely depends on its rows, with one graph per octave to capture."""
    max_batch = arg_int("max_batch", max_batch, 1, MAX_SIZE)
    ladder = []
    n = 1
    while n < max_batch:
        ladder.append(n)
        n *= 2
    ladder.append(max_batch)
    return tuple(ladder)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket of ``buckets`` (ascending, from :func:`prefill_buckets`) holding ``rows`` token rows
    (``rows >= 1``). Raises ValueError when ``rows`` exceeds the largest bucket; TypeError/ValueError naming
    ``rows`` or ``buckets`` when one is no int or no non-empty ascending sequence of ints in ``[1, 2**31)``."""
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)):
        raise TypeError(f"rows: expected an int, got {type(rows).__name__}")
    if rows < 1:
        raise ValueError(f"rows: expected at least 1 token row, got {int(rows)}")
    ladder = _ladder("buckets", buckets, MAX_SIZE)
    i = bisect.bisect_left(ladder, rows)
    if i == len(ladder):
        raise ValueError(f"rows: {rows} token rows exceed the largest prefill bucket {ladder[-1]}")
    return ladder[i]


def _ladder(name: str, buckets: object, top: int) -> tuple[int, ...]:
    """``buckets`` as a tuple of ints if it is a non-empty, strictly ascending sequence of token-row counts in
    ``[1, top]``, else TypeError/ValueError naming ``name`` (a bucket past the buffer rows would pad a prefill
    past them)."""
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence) or not buckets:
        raise TypeError(f"{name}: expected a non-empty sequence of token-row counts, got {show(buckets)}")
    ladder = tuple(buckets)
    if set(map(type, ladder)) != {int}:  # (a few us a prefill) the slow path names the one that is no int
        ladder = tuple(arg_int(f"{name}[{i}]", b, 1, top) for i, b in enumerate(ladder))
    if ladder[0] < 1 or ladder[-1] > top or not all(map(operator.lt, ladder, ladder[1:])):
        raise ValueError(f"{name}: expected strictly ascending token-row counts in [1, {top}], got {show(ladder)}")
    return ladder


def prefill_slots(batch: int, max_batch: int) -> int:
    """The real-request slots of a padded prefill of ``batch`` requests (:func:`pad_prefill`): the next power of
    two above ``batch``, less one (1, 3, 7, 15, ...), at most ``max_batch``. A prefill graph serves any batch up to
    its slots, so a bucket has a few graphs instead of one per batch size: the first prefill of a new shape costs a
    capture (about 40 ms for a 135M model on an H100, where a replay takes 2-14), and a server's admissions come in
    every size."""
    batch = arg_int("batch", batch, 1, MAX_SIZE)
    max_batch = arg_int("max_batch", max_batch, 1, MAX_SIZE)
    if batch > max_batch:
        raise ValueError(f"batch: {batch} requests exceed max_batch {max_batch}")
    return min((1 << batch.bit_length()) - 1, max_batch)


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
    for key in ("token_ids", "positions", "batch_indices", "qo_indptr", "kv_indptr", "kv_last_page_len", "kv_indices"):
        a = v.get(key)
        if not isinstance(a, np.ndarray) or a.dtype != np.int32 or a.ndim != 1:
            raise TypeError(f"v[{key!r}]: expected a 1-D int32 numpy array (a prefill layout's view), got {show(a)}")
    rows_room = min(len(v["token_ids"]), len(v["positions"]), len(v["batch_indices"]))
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
    for r in rows:
        if r is None:
            ids.append(0)
            pos.append(0)
            last.append(1)
            indices.append(PAD_PAGE)
        else:
            at = r.position(ahead)
            if len(r.pages) * page_size <= at:
                raise AssertionError(f"request {r.rid}: {len(r.pages)} pages cannot hold token {at}")
            ids.append(r.output[-1] if not ahead else 0)
            pos.append(at)
            last.append(at % page_size + 1)
            indices.extend(r.pages)
        indptr.append(len(indices))
    n = len(rows)
    v["token_ids"][:n] = ids
    v["positions"][:n] = pos
    v["batch_indices"][:n] = range(n)
    v["kv_indptr"][: n + 1] = indptr
    v["kv_last_page_len"][:n] = last
    v["kv_indices"][: len(indices)] = indices
    return len(indices)


class PagePool(Protocol):
    """What the scheduler asks of the KV cache's pages: :class:`PageAllocator`'s calls."""

    @property
    def capacity(self) -> int: ...
    @property
    def num_free(self) -> int: ...
    def alloc(self, n: int) -> list[int]: ...
    def free(self, pages: Iterable[int]) -> None: ...


class PrefixCache(PagePool, Protocol):
    """What the scheduler asks of a page pool that caches prompt prefixes
    (:class:`~fi_engine.runtime.kv_cache.KVCacheManager`, which documents each call)."""

    enable_prefix_caching: bool

    def match_prefix(self, token_ids: Sequence[int], extra_key: Any = None) -> tuple[list[int], int]: ...
    def free_pages_needed(self, prefix: Sequence[int], num_new: int) -> int: ...
    def acquire(self, prefix: Sequence[int], num_new: int, *, num_tokens: int) -> list[int]: ...
    def commit(
        self, pages: Sequence[int], token_ids: Sequence[int], num_computed_tokens: int, extra_key: Any = None
    ) -> int: ...


def _prefilled_whole(sampling: SamplingParams | None) -> bool:
    """Whether a request of ``sampling`` has its prompt prefilled in one pass: its prompt logprobs are asked (each
    position needs its row of one pass; never cut by chunked prefill)."""
    return sampling is not None and sampling.prompt_logprobs is not None


class Scheduler:
    """Requests in, batches out: admission, slots, page growth, finishing (see the module docstring).

    Args:
        allocator: the KV cache's pages: a :class:`PageAllocator`, or a
            :class:`~fi_engine.runtime.kv_cache.KVCacheManager`, which can also cache prompt prefixes
            (:attr:`prefix_caching`).
        page_size: tokens per page.
        max_batch: batch slots (the largest decode CUDA graph's rows).
        max_seq_len: the most tokens (prompt + generated) one request may reach.
        max_prefill_tokens: the most prompt tokens prefilled together (the engine's buffer rows).
        vocab_size: token ids must be below it.
        eos_token_ids: tokens that end a request (they are kept in its output), unless it was submitted with its own.

    ``sampled``: how many active requests sample (not greedy), so a step of greedy rows only knows it at once;
    ``processed``: how many ask for log-probabilities or a sampling control (``Request.asks``).

    ``prefix_caching`` (default False; settable where the allocator caches: a KVCacheManager made with
    ``enable_prefix_caching=True``): an admitted prompt takes the cached full pages its beginning matches (their K/V
    already computed) and is prefilled from the first token past them; a request's full pages are registered in the
    cache after each pass that wrote them (a finished request's too, so a conversation's next turn finds them).
    """

    def __init__(
        self,
        allocator: PagePool,
        page_size: int,
        max_batch: int,
        max_seq_len: int,
        max_prefill_tokens: int,
        vocab_size: int,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.max_prefill_tokens = max_prefill_tokens
        self.vocab_size = vocab_size
        self.eos = frozenset(eos_token_ids)
        self.pending: deque[Request] = deque()
        self.slots: list[Request | None] = [None] * max_batch
        self.sampled = 0
        self.processed = 0
        self._next_id = 0
        self._prefix_caching = False
        self._chunk_tokens = 0

    @property
    def prefix_caching(self) -> bool:
        """Whether admission matches prompts against the cached pages and passes register full pages (see above)."""
        return self._prefix_caching

    @prefix_caching.setter
    def prefix_caching(self, on: bool) -> None:
        if not isinstance(on, bool):
            raise TypeError(f"prefix_caching: expected True or False, got {type(on).__name__}")
        if on and not getattr(self.allocator, "enable_prefix_caching", False):
            raise ValueError(
                "prefix_caching: the scheduler's page pool caches nothing; make it a "
                "fi_engine.runtime.kv_cache.KVCacheManager with enable_prefix_caching=True"
            )
        self._prefix_caching = on

    @property
    def chunk_tokens(self) -> int:
        """Chunked prefill: the most token rows of one prefill pass (the decoding requests riding in it and the
        prompts' tokens), 1 to ``max_prefill_tokens``; a prompt that does not fit what is left is prefilled in chunks
        over several passes, each continuing from the K/V the last one wrote, and takes its first token from the pass
        of its last chunk. 0 (the default): off; a prompt is prefilled in one pass and may not exceed
        ``max_prefill_tokens``. A prompt longer than ``max_prefill_tokens``, accepted while it was on, is still
        prefilled in chunks after it is turned off."""
        return self._chunk_tokens

    @chunk_tokens.setter
    def chunk_tokens(self, tokens: int) -> None:
        self._chunk_tokens = arg_int("chunk_tokens", tokens, 0, self.max_prefill_tokens)

    @property
    def chunks_pending(self) -> bool:
        """Whether an active request's prompt has chunks left to prefill (the next admission continues it)."""
        return any(r is not None and not r.decoding for r in self.slots)

    # ---- requests in

    def submit(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        name: str = "prompt",
        *,
        sampling: SamplingParams | None = None,
        eos_token_ids: Iterable[int] | None = None,
        draws: Any = None,
        grammar: GrammarMatcher | None = None,
    ) -> Request:
        """Queue a request; ValueError naming ``name`` (or ``max_new_tokens``, ``eos_token_ids``) if it can never be
        served, TypeError naming ``sampling`` if it is no :class:`SamplingParams`. ``sampling`` (None or greedy: the
        argmax) with ``draws``, the stream its samples draw from; ``eos_token_ids``: the tokens that end this
        request (None: the scheduler's; ``()``: none, it runs to ``max_new_tokens``); ``grammar``: the request's
        own matcher at the start of ``sampling.grammar`` (which needs one: ValueError naming ``grammar`` without)."""
        sampling = sampling_arg(sampling)
        wants = sampling is not None and sampling.grammar is not None
        if wants != isinstance(grammar, GrammarMatcher):
            expected = "a GrammarMatcher of sampling.grammar" if wants else "None (sampling sets no grammar)"
            raise ValueError(f"grammar: expected {expected}, got {type(grammar).__name__}")
        eos = None if eos_token_ids is None else self._eos_ids(eos_token_ids)
        arr = np.asarray(prompt)
        if arr.ndim != 1 or arr.size == 0 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise ValueError(f"{name}: expected a non-empty list of token ids, got {prompt!r:.80}")
        if arr.dtype == bool:
            raise ValueError(f"{name}: expected integer token ids, got booleans")
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(f"{name}[{j}]: token id {int(arr[j])} is outside the vocabulary [0, {self.vocab_size})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
        n = int(arr.size)
        if n + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"{name}: {n} prompt tokens + {max_new_tokens} new tokens exceed the engine's "
                f"max_seq_len {self.max_seq_len}; shorten it or raise max_seq_len"
            )
        whole = _prefilled_whole(sampling)
        if n > self.max_prefill_tokens and (whole or not self._chunk_tokens):
            fix = "raise max_prefill_tokens" if whole else "turn chunked prefill on or raise max_prefill_tokens"
            why = f"its prompt logprobs need it prefilled in one pass; {fix}" if whole else fix
            raise ValueError(f"{name}: {n} prompt tokens exceed max_prefill_tokens {self.max_prefill_tokens}; {why}")
        budget = pages_for(n + max_new_tokens - 1, self.page_size)
        if budget > self.allocator.capacity:
            raise ValueError(
                f"{name}: needs up to {budget} pages of {self.page_size} tokens but the KV cache has "
                f"{self.allocator.capacity}; raise num_pages or lower max_new_tokens"
            )
        greedy = sampling is None or sampling.greedy
        asking = asks_processing(sampling)
        r = Request(
            self._next_id,
            tuple(int(t) for t in arr),
            max_new_tokens,
            budget,
            sampling=None if greedy else sampling,
            draws=None if greedy else draws,
            eos=eos,
            queued_at=time.perf_counter(),
            asks=sampling if asking else None,
            grammar=grammar,
            speculative=sampling is None or sampling.speculative_decoding,
        )
        self._next_id += 1
        self.pending.append(r)
        return r

    def _eos_ids(self, ids: Iterable[int]) -> frozenset[int]:
        """``ids`` as a set of token ids in the vocabulary; ValueError naming ``eos_token_ids`` otherwise."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise ValueError(f"eos_token_ids: expected a list of token ids (or None: the model's), got {show(ids)}")
        out = []
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size:
                raise ValueError(
                    f"eos_token_ids[{i}]: expected a token id in [0, {self.vocab_size}) (an int), got {show(t)}"
                )
            out.append(int(t))
        return frozenset(out)

    def abort(self, request: Request) -> bool:
        """End ``request`` now if it is queued or active here: it leaves the queue, or its slot and all its pages
        (those :meth:`peek_rows` gave ahead too) go back to the allocator; ``finish_reason`` becomes ``"abort"``.
        Returns whether it did; a finished request, or one this scheduler does not hold: False, nothing changes.
        A step prepared ahead with it (:meth:`peek_rows`) no longer matches the slots (:meth:`same_rows`)."""
        if not isinstance(request, Request):
            raise TypeError(f"request: expected a fi_engine.runtime.paging.Request, got {type(request).__name__}")
        if request.finished:
            return False
        if 0 <= request.slot < len(self.slots) and self.slots[request.slot] is request:
            request.finish_reason = "abort"
            self._leave(request)
            return True
        for i, r in enumerate(self.pending):  # by identity (a Request compares so too, but say it)
            if r is request:
                del self.pending[i]
                request.finish_reason = "abort"
                return True
        return False

    def _leave(self, r: Request) -> None:
        """A finished request leaves its slot; its pages go back."""
        self.allocator.free(r.pages)
        r.pages = []
        self.slots[r.slot] = None
        r.slot = -1
        if r.sampling is not None:
            self.sampled -= 1
        if r.asks is not None:
            self.processed -= 1

    # ---- batches out

    @property
    def active(self) -> list[Request]:
        """Requests in the batch, in slot order."""
        return [r for r in self.slots if r is not None]

    @property
    def decoding(self) -> bool:
        """Whether an active request is a decode row (not all of them are prompts with chunks left)."""
        return any(r is not None and r.decoding for r in self.slots)

    @property
    def has_work(self) -> bool:
        return bool(self.pending) or any(r is not None for r in self.slots)

    def admit(self, reserve: int = 0) -> list[Request]:
        """The requests of the next prefill pass: first the active prompts with chunks left (chunked prefill, in slot
        order), each its next chunk; then queued requests, in order, moved into free slots while their page budgets
        and the pass's token rows allow, each given its prompt's pages. Returns them (to prefill together).
        ``reserve``: token rows of the pass already taken (the decoding requests that ride in a mixed pass,
        ``ServingLoop.mixed_prefill``). The pass's rows are ``max_prefill_tokens``, or :attr:`chunk_tokens` with
        chunked prefill on, where the last prompt admitted may be cut to the rows left (``Request.chunk_end``)."""
        budget = self._chunk_tokens or self.max_prefill_tokens
        admitted: list[Request] = []
        tokens = reserve
        for r in self.slots:  # prompts prefilled in chunks go on where their last chunk ended
            if r is not None and not r.decoding and tokens < budget:
                tokens += self._cut(r, r.cached, budget - tokens)
                admitted.append(r)
        free_slots = [i for i, s in enumerate(self.slots) if s is None]
        outstanding = sum(r.budget_pages - len(r.pages) for r in self.slots if r is not None)
        cache = cast(PrefixCache, self.allocator) if self._prefix_caching else None
        while self.pending and free_slots and tokens < budget:
            r = self.pending[0]
            whole = _prefilled_whole(r.asks)  # (computed whole, so never matched in the cache either)
            prefix, cached = cache.match_prefix(r.prompt) if cache is not None and not whole else ([], 0)
            left = len(r.prompt) - cached
            room = (self.max_prefill_tokens if whole else budget) - tokens
            if left > room and (whole or not (self._chunk_tokens or left > self.max_prefill_tokens)):
                break  # (a prompt past max_prefill_tokens, accepted with chunking on, is cut even with it off now)
            # the pages it may come to hold that the pool must give: its budget beyond the matched pages, and the
            # matched pages no request holds (they leave the pool's evictable ones)
            need = r.budget_pages if cache is None else cache.free_pages_needed(prefix, r.budget_pages - len(prefix))
            if self.allocator.num_free - outstanding < need:
                break
            self.pending.popleft()
            new = pages_for(len(r.prompt), self.page_size) - len(prefix)
            if cache is None:
                r.pages = self.allocator.alloc(new)
            else:
                r.pages = cache.acquire(prefix, new, num_tokens=len(r.prompt))  # (prefix [] for a whole prompt)
                r.cached = r.hit = cached
            outstanding += r.budget_pages - len(r.pages)
            r.slot = free_slots.pop(0)
            self.slots[r.slot] = r
            if r.sampling is not None:
                self.sampled += 1
            if r.asks is not None:
                self.processed += 1
            admitted.append(r)
            tokens += self._cut(r, r.cached, room)
        if self.pending and not admitted and not self.active:
            raise OutOfPagesError(
                f"request {self.pending[0].rid} cannot be admitted into an empty batch "
                f"({self.allocator.num_free} free pages)"
            )
        return admitted

    @staticmethod
    def _cut(r: Request, start: int, rows: int) -> int:
        """Set ``r``'s next pass to compute its prompt from ``start`` for at most ``rows`` tokens (its chunk's end,
        or None where that reaches the prompt's end); returns the tokens it computes."""
        end = min(len(r.prompt), start + rows)
        r.chunk_end = end if end < len(r.prompt) else None
        return end - start

    def can_admit(self, hold_s: float = 0.0, now: float | None = None) -> bool:
        """Whether :meth:`admit` would give a prefill pass work now: a prompt has chunks left (chunked prefill; never
        held), or a queued request would be taken: one is queued, a slot is free, and the queue is not held.
        ``hold_s`` (seconds; the serving loop's scheduler delay, ``scheduler_delay_factor`` times its last prefill's
        time): while others decode, queued requests wait until the oldest has waited that long or they
        would fill every free slot (vLLM's scheduler delay), so a burst of arrivals is prefilled in a few larger
        passes instead of one small pass per step. ``now``: the clock (``time.perf_counter``) reading to judge by."""
        if self.chunks_pending:
            return True
        if not self.pending or None not in self.slots:
            return False
        if hold_s <= 0 or not self.active or len(self.pending) >= self.slots.count(None):
            return True
        waited = (time.perf_counter() if now is None else now) - self.pending[0].queued_at
        return waited >= hold_s

    def admit_beside_active(self, behind: bool = False) -> tuple[list[Request], list[Request]]:
        """Admission for a mixed prefill pass (``ServingLoop.mixed_prefill``): the active requests ride in the pass,
        one token row each of ``max_prefill_tokens``, and queued prompts are admitted into the rows left. Returns
        ``(admitted, riders)``; where the first queued prompt does not fit beside the riders, it is admitted alone
        (:meth:`admit`) and ``riders`` is empty. ``behind``: the pass goes behind a decode step not yet recorded,
        so a request that step gives its last token (its ``max_new_tokens``-th) rides no more."""
        riders = [r for r in self.active if r.decoding and (not behind or len(r.output) + 1 < r.max_new_tokens)]
        admitted = self.admit(reserve=len(riders)) if riders else []
        if admitted:
            return admitted, riders
        return self.admit(), []

    def decode_rows(self, padded: bool) -> list[Request | None]:
        """The next decode step's rows, after giving each active request the page its next token needs.

        ``padded``: all ``max_batch`` slots (None for an empty one), which a decode CUDA graph's rows begin with
        (:meth:`graph_rows`); otherwise the active requests only, in slot order.
        """
        self.grow_pages()
        if padded:
            return self.decode_slots()
        return [r for r in self.slots if r is not None and r.decoding]

    def decode_slots(self) -> list[Request | None]:
        """The slots as a decode step's padded rows: a request whose prompt has chunks left (chunked prefill) is an
        empty row."""
        return [r if r is not None and r.decoding else None for r in self.slots]

    def grow_pages(self, requests: Iterable[Request | None] | None = None, ahead: int = 0) -> None:
        """Give each active request (or each of ``requests``: decoding ones) the page its next token needs, if it
        lacks it (within its budget, reserved at admission): before a decode step or a mixed pass feeds it that
        token, at position ``cached`` (``len(prompt) + len(output) - 1``), or ``ahead`` positions further where
        that many passes giving it a token are in flight (:func:`fill_prefill`'s ``ahead``)."""
        for r in self.slots if requests is None else requests:
            if r is not None and r.decoding:
                while len(r.pages) * self.page_size <= r.position(ahead):
                    r.pages.extend(self.allocator.alloc(1))

    def peek_rows(self, ahead: int = 1) -> list[Request | None]:
        """The padded rows of the decode step after the ``ahead`` passes in flight (decode steps issued from
        :meth:`decode_rows`, or the prefill pass of the requests just admitted, not yet :meth:`record`-ed; 1 or 2),
        as they will be if no request ends with an end-of-sequence token: a request whose passes in flight give its
        ``max_new_tokens``-th token is None. Gives each continuing request the pages that step needs (within its
        budget: it would get them from :meth:`decode_rows` then). Compare the result with :attr:`slots` once all
        but one of those passes are recorded (:meth:`same_rows`) before using it."""
        rows = [None if r is None or len(r.output) + ahead >= r.max_new_tokens else r for r in self.decode_slots()]
        self.grow_pages(rows, ahead)
        return rows

    def same_rows(self, rows: Sequence[Request | None]) -> bool:
        """True when ``rows`` (from :meth:`peek_rows`, possibly cut to :meth:`graph_rows` of them) are the slots
        now: the same request (or None) in each of the first ``len(rows)`` slots, and no request in the others."""
        n = len(rows)
        slots = self.decode_slots()
        return (
            n <= len(slots)
            and all(a is b for a, b in zip(rows, slots[:n], strict=True))
            and all(r is None for r in slots[n:])
        )

    @staticmethod
    def graph_rows(rows: Sequence[Request | None], batches: Sequence[int]) -> int:
        """The rows of the smallest decode graph of ``batches`` (ascending, the last ``max_batch``:
        :func:`decode_batches`) holding every request of the padded ``rows`` (slot order, None: an empty slot):
        the graph's rows are the first slots, so a request in slot ``i`` needs ``i + 1`` of them."""
        last = next((i for i in range(len(rows) - 1, -1, -1) if rows[i] is not None), 0)
        i = bisect.bisect_left(batches, last + 1)
        if i == len(batches):
            raise ValueError(f"rows: a request in slot {last} exceeds the largest decode graph ({batches[-1]} rows)")
        return batches[i]

    def record(self, rows: Sequence[Request | None], tokens: Sequence[int], *, prefill: bool = False) -> None:
        """Take the sampled token of each row (padding rows ignored); finish requests that are done.

        ``prefill``: the rows were just prefilled (their prompts are now cached); otherwise they ran one
        decode step (one more token cached). A row whose request ended while its step ran (aborted after a step
        was launched ahead: ``ServingLoop.overlap_steps``) takes nothing.

        A request with a grammar (``Request.grammar``) advances its matcher past its token; the end-of-sequence id
        that completes its grammar ends it (``"eos"``, even where its own ``eos`` is empty: ``ignore_eos`` could
        only repeat that id, the one token its grammar then allows). A token the matcher refuses (which the mask
        of :class:`~fi_engine.runtime.logits_processing.LogitsProcessor` rules out: a fault of the matcher) ends
        that request as ``"abort"``, its tokens kept, rather than failing the step of every request.
        """
        for r, t in zip(rows, tokens, strict=True):
            if r is None or r.finish_reason is not None:
                continue
            if prefill and r.chunk_end is not None:  # a chunk of its prompt: no token yet
                r.cached = r.chunk_end
                if self._prefix_caching:
                    cast(PrefixCache, self.allocator).commit(r.pages, r.prompt, r.cached)
                continue
            token = int(t)
            r.cached = len(r.prompt) if prefill else r.cached + 1
            r.output.append(token)
            if self._prefix_caching and (prefill or r.cached % self.page_size == 0):  # a page filled: shareable now
                cast(PrefixCache, self.allocator).commit(r.pages, (*r.prompt, *r.output), r.cached)
            end = None if r.grammar is None else _grammar_end(r.grammar, token)
            if end is None and token in (self.eos if r.eos is None else r.eos):
                end = "eos"
            elif end is None and len(r.output) >= r.max_new_tokens:
                end = "length"
            if end is not None:
                r.finish_reason = end
                self._leave(r)


def _grammar_end(matcher: GrammarMatcher, token: int) -> str | None:
    """Advance ``matcher`` past ``token``: ``"eos"`` when that token is an end-of-sequence id completing its grammar,
    ``"abort"`` when the grammar refuses it (see :meth:`Scheduler.record`), else None."""
    try:
        matcher.consume(token)
    except ValueError:
        return "abort"
    return "eos" if matcher.is_finished and token in matcher.eos_token_ids else None
