"""The scheduler: requests in, batches out (:class:`Scheduler`). Nothing here touches a GPU, so it is tested on CPU
(tests/engine/test_serving_host.py).

A request's life:

1. :meth:`Scheduler.submit` checks it and queues it. Its page **budget** is the most it can ever hold:
   ``ceil((len(prompt) + max_new_tokens - 1) / page_size)`` (the last generated token is never fed back).
2. :meth:`Scheduler.admit` moves queued requests into free batch slots while the free pages cover every
   admitted request's remaining budget, so decoding never runs out of pages (no preemption needed). The
   admitted requests get their prompt's pages and are prefilled together
   (:func:`~fi_engine.runtime.sched.step_arrays.fill_prefill`).
3. Each decode step feeds every active request its last token at position ``cached`` (the tokens whose K/V
   are in the cache): :meth:`Scheduler.decode_rows` gives it a new page when ``cached`` is a multiple of
   ``page_size``, :func:`~fi_engine.runtime.sched.step_arrays.fill_decode` writes the step's arrays.
4. :meth:`Scheduler.record` appends the sampled tokens (a request with a grammar advances its matcher past its
   token); a request that produced an end-of-sequence token (or its grammar's end) or its ``max_new_tokens``-th
   token finishes, leaves its slot and frees its pages.
5. :meth:`Scheduler.abort` ends a queued or active request at any time between steps: it leaves the queue or its
   slot and its pages go back at once (``finish_reason`` ``"abort"``).
"""

from __future__ import annotations

import bisect
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, cast

import numpy as np

from ...text.grammar import GrammarMatcher
from ...values import arg_flag, arg_int, show
from ..sampling_params import SamplingParams, asks_processing, sampling_arg
from .pages import OutOfPagesError, pages_for
from .request import Request

__all__ = ["Scheduler"]


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
    (:class:`~fi_engine.runtime.sched.kv_cache.KVCacheManager`, which documents each call)."""

    enable_prefix_caching: bool

    def match_prefix(self, token_ids: Sequence[int], extra_key: Any = None) -> tuple[list[int], int]: ...
    def free_pages_needed(self, prefix: Sequence[int], num_new: int) -> int: ...
    def acquire(self, prefix: Sequence[int], num_new: int, *, num_tokens: int) -> list[int]: ...
    def commit(
        self, pages: Sequence[int], token_ids: Sequence[int], num_computed_tokens: int, extra_key: Any = None
    ) -> int: ...


class AdapterSlots(Protocol):
    """What the scheduler asks of the LoRA adapters an engine serves (:class:`~fi_engine.lora.manager.LoraManager`,
    which documents each call): an adapter's key by name, and a GPU slot per request while it is active."""

    def key(self, name: object) -> Any: ...
    def acquire(self, key: Any) -> int | None: ...  # ValueError: the adapter cannot be copied in (its request ends)
    def release(self, slot: int) -> None: ...


def _prefilled_whole(sampling: SamplingParams | None) -> bool:
    """Whether a request of ``sampling`` has its prompt prefilled in one pass: its prompt logprobs are asked (each
    position needs its row of one pass; never cut by chunked prefill)."""
    return sampling is not None and sampling.prompt_logprobs is not None


class Scheduler:
    """Requests in, batches out: admission, slots, page growth, finishing (see the module docstring).

    Args:
        allocator: the KV cache's pages: a :class:`PageAllocator`, or a
            :class:`~fi_engine.runtime.sched.kv_cache.KVCacheManager`, which can also cache prompt prefixes
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
    Pages are cached under the request's LoRA adapter (``Request.lora_key``): a prefix computed with one adapter
    never serves a request of another, nor of the base model.

    ``adapters`` (None: no LoRA adapters): the engine's adapters (:class:`AdapterSlots`); a request naming one is
    admitted once its adapter has a GPU slot (every slot held by other adapters' active requests: it waits, and the
    requests behind it with it), which it holds until it leaves. One whose adapter can no longer be read (its folder
    gone since the host dropped its copy) is aborted at admission alone: ``finish_reason`` ``"abort"``, the reason in
    ``Request.error``, listed in :attr:`refused` until the serving loop reports it.
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
        self.adapters: AdapterSlots | None = None
        # requests aborted at admission (Request.error says why), for the serving loop to report (then cleared)
        self.refused: list[Request] = []

    @property
    def prefix_caching(self) -> bool:
        """Whether admission matches prompts against the cached pages and passes register full pages (see above)."""
        return self._prefix_caching

    @prefix_caching.setter
    def prefix_caching(self, on: bool) -> None:
        on = arg_flag("prefix_caching", on)
        if on and not getattr(self.allocator, "enable_prefix_caching", False):
            raise ValueError(
                "prefix_caching: the scheduler's page pool caches nothing; make it a "
                "fi_engine.runtime.sched.kv_cache.KVCacheManager with enable_prefix_caching=True"
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
        lora: str | None = None,
    ) -> Request:
        """Queue a request; ValueError naming ``name`` (or ``max_new_tokens``, ``eos_token_ids``) if it can never be
        served, TypeError naming ``sampling`` if it is no :class:`SamplingParams`. ``sampling`` (None or greedy: the
        argmax) with ``draws``, the stream its samples draw from; ``eos_token_ids``: the tokens that end this
        request (None: the scheduler's; ``()``: none, it runs to ``max_new_tokens``); ``grammar``: the request's
        own matcher at the start of ``sampling.grammar`` (which needs one: ValueError naming ``grammar`` without);
        ``lora``: the LoRA adapter it is served with (a name :attr:`adapters` knows, else ValueError naming
        ``lora``; None: the base model). A request with an adapter is never drafted for (speculative decoding's
        drafts come from the base model, or a draft model, without it)."""
        sampling = sampling_arg(sampling)
        lora_key = None
        if lora is not None:
            if self.adapters is None:
                raise ValueError(f"lora: {show(lora)}, but this engine serves no LoRA adapters; open it with lora=...")
            lora_key = self.adapters.key(lora)
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
            speculative=(sampling is None or sampling.speculative_decoding) and lora is None,
            lora=lora,
            lora_key=lora_key,
        )
        self._next_id += 1
        self.pending.append(r)
        return r

    def submit_all(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        sampling: SamplingParams | None,
        eos_token_ids: Sequence[int] | None,
        draws: Any,
        grammar: Callable[[], GrammarMatcher | None] = lambda: None,
        loras: Sequence[str | None] | None = None,
    ) -> list[Request]:
        """:meth:`submit` every prompt of ``prompts`` (each with its limit of ``max_new_tokens``: one value, or one per
        prompt), all or none: a prompt refused takes the ones queued before it out again (ValueError naming
        ``prompts`` or ``max_new_tokens`` for lists that do not match). ``grammar``: makes each request's own grammar
        matcher (``sampling.grammar``'s, else None); ``loras``: each prompt's LoRA adapter (None: the base model's;
        ValueError naming it where it is not one per prompt)."""
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
        if loras is None:
            loras = [None] * len(prompts)
        elif isinstance(loras, (str, bytes)) or not isinstance(loras, Sequence) or len(loras) != len(prompts):
            raise ValueError(f"lora: expected one adapter name or None per prompt ({len(prompts)}), got {show(loras)}")
        reqs: list[Request] = []
        try:
            for i, (p, m, lora) in enumerate(zip(prompts, limits, loras, strict=True)):
                reqs.append(
                    self.submit(
                        p,
                        m,
                        name=f"prompts[{i}]",
                        sampling=sampling,
                        eos_token_ids=eos_token_ids,
                        draws=draws,
                        grammar=grammar(),
                        lora=lora,
                    )
                )
        except BaseException:
            for r in reqs:
                self.abort(r)
            raise
        return reqs

    @contextlib.contextmanager
    def whole_prompts(self) -> Iterator[None]:
        """Within: every prompt is prefilled whole, in one pass, without the prefix cache (the engine's
        ``prefill_logits`` needs every row's logits; a warm-up's dummy prompts must run the shapes they were made
        for)."""
        on, self._prefix_caching = self._prefix_caching, False
        chunk, self._chunk_tokens = self._chunk_tokens, 0
        try:
            yield
        finally:
            self._prefix_caching = on
            self._chunk_tokens = chunk

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
            raise TypeError(
                f"request: expected a fi_engine.runtime.sched.request.Request, got {type(request).__name__}"
            )
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
        if r.lora_slot >= 0 and self.adapters is not None:
            self.adapters.release(r.lora_slot)
        r.lora_slot = -1
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
            prefix, cached = cache.match_prefix(r.prompt, r.lora_key) if cache is not None and not whole else ([], 0)
            left = len(r.prompt) - cached
            room = (self.max_prefill_tokens if whole else budget) - tokens
            if left > room and (whole or not (self._chunk_tokens or left > self.max_prefill_tokens)):
                break  # (a prompt past max_prefill_tokens, accepted with chunking on, is cut even with it off now)
            # the pages it may come to hold that the pool must give: its budget beyond the matched pages, and the
            # matched pages no request holds (they leave the pool's evictable ones)
            need = r.budget_pages if cache is None else cache.free_pages_needed(prefix, r.budget_pages - len(prefix))
            if self.allocator.num_free - outstanding < need:
                break
            if r.lora_key is not None:  # its adapter into a GPU slot (copied in if new there), or it waits for one
                assert self.adapters is not None
                try:
                    lora_slot = self.adapters.acquire(r.lora_key)
                except ValueError as exc:  # its adapter's folder is unreadable now: this request ends, no other
                    self.pending.popleft()
                    r.finish_reason, r.error = "abort", exc
                    self.refused.append(r)
                    continue
                if lora_slot is None:
                    break
                r.lora_slot = lora_slot
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
        of :class:`~fi_engine.runtime.sample.logits_processing.LogitsProcessor` rules out: a fault of the matcher) ends
        that request as ``"abort"``, its tokens kept, rather than failing the step of every request.
        """
        for r, t in zip(rows, tokens, strict=True):
            if r is None or r.finish_reason is not None:
                continue
            if prefill and r.chunk_end is not None:  # a chunk of its prompt: no token yet
                r.cached = r.chunk_end
                if self._prefix_caching:
                    cast(PrefixCache, self.allocator).commit(r.pages, r.prompt, r.cached, r.lora_key)
                continue
            token = int(t)
            r.cached = len(r.prompt) if prefill else r.cached + 1
            r.output.append(token)
            if self._prefix_caching and (prefill or r.cached % self.page_size == 0):  # a page filled: shareable now
                cast(PrefixCache, self.allocator).commit(r.pages, (*r.prompt, *r.output), r.cached, r.lora_key)
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
