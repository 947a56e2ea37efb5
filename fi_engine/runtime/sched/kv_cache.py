"""Automatic prefix caching: the KV cache's pages, shared between requests whose prompts begin alike.

The KV cache is ``num_pages`` pages of ``page_size`` tokens; pages ``0 .. reserved - 1`` are never handed out (page
0 is the padding page, :mod:`.pages`). A **full** page whose K/V a request has written is named by a hash chain:
page ``k``'s hash digests page ``k - 1``'s hash, an ``extra_key`` (None today; room for a LoRA id or the hashes of a
prompt's images) and its ``page_size`` token ids (:func:`page_hashes`). Equal hashes mean equal tokens from the
prompt's first token on, so a page found by its hash holds exactly the K/V a new request would compute there.

Each page is in one of three states (:meth:`KVCacheManager.check` verifies it):

- **free**: no request holds it, it holds nothing the cache serves;
- **held**: one or more requests hold it (a reference count); a held full page may also be served by the cache;
- **idle**: no request holds it, but the cache serves it: it waits in a least-recently-used list and is evicted
  (its hash forgotten, the page reused) only when no free page is left.

A request's life with the cache (the scheduler drives it; :class:`KVCacheManager` keeps no per-request state):

1. :meth:`~KVCacheManager.match_prefix` looks its prompt up: the longest run of cached full pages from its start,
   never the whole prompt (its last token is always computed, so the pass yields the logits of its next token).
   The lookup changes nothing.
2. :meth:`~KVCacheManager.acquire` takes the matched pages (one more reference each) and fresh pages for the rest,
   all or nothing: on ``OutOfPagesError`` nothing has changed, so there is no error path to clean up.
   :meth:`~KVCacheManager.free_pages_needed` tells beforehand how many of :attr:`~KVCacheManager.num_free` it takes
   (matched idle pages leave the LRU list), for the scheduler's page budget.
3. After each pass that wrote its tokens, :meth:`~KVCacheManager.commit` registers the pages that became full
   (``num_computed_tokens`` may advance a whole prompt, a chunk ending inside a page, or one decode token; only
   full pages are registered), so they are shareable at once, while the request still runs. The pass must be
   enqueued on the stream every later pass runs on, so a request reading the pages runs after it.
4. When it ends, :meth:`~KVCacheManager.free` drops its references; its cached pages become idle, the others free.

**No copy-on-write**: a shared page is full and never written again: a request writes only at positions from its
``num_computed_tokens`` on, past every page it matched (the match always leaves the prompt's last token to
compute), and its last, partial page is always its own (fresh from :meth:`~KVCacheManager.allocate`).

Two requests that computed the same page each hold their own copy; the first committed is the one the cache
serves, the other is freed like any unshared page (or served in its place, if that one was evicted meanwhile).
A request's pages enter the LRU list last page first, so a chain is evicted from its end and its shared beginning
stays matchable longest (an evicted middle page cuts the chain there: the pages after it are unreachable until
they too are evicted).

With ``enable_prefix_caching=False`` nothing is ever cached: :meth:`~KVCacheManager.allocate` and
:meth:`~KVCacheManager.free` hand out the same pages in the same order as :class:`~.pages.PageAllocator`, whose
``alloc`` / ``free`` / ``num_free`` / ``capacity`` it also answers to, so a :class:`~.scheduler.Scheduler` takes either.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...values import MAX_SIZE, arg_int, flag, integer, show
from .pages import MAX_PAGES, OutOfPagesError

__all__ = ["HASH_BYTES", "KVCacheManager", "PrefixCacheStats", "page_hashes"]

# A page's hash: BLAKE2b with a 128-bit digest. Not Python's hash(): its 64 bits make a collision among millions of
# cached pages and billions of lookups a real chance (a collision serves another prompt's K/V: wrong output, or one
# user's text leaking into another's), and hash() of ints is trivially invertible, so a crafted prompt could
# collide on purpose. 128 bits of a cryptographic hash make an accidental collision astronomically unlikely
# (about 2**-64 after 2**32 pages). The digest never leaves the process, so no fixed seed is needed for stability.
HASH_BYTES = 16
_ROOT = bytes(HASH_BYTES)  # the parent of a prompt's first page
_TOKEN = np.dtype("<i4")  # token ids are hashed as little-endian int32 (the kernels' ids, below 2**31)
_KEY_DEPTH = 8  # nesting of an extra_key's tuples
_KEY_BYTES = 1 << 20  # an extra_key's text at the most (1 MiB)


@dataclass
class PrefixCacheStats:
    """Counters of a :class:`KVCacheManager`'s prefix cache since it was made; they only grow (Prometheus
    counters; :meth:`KVCacheManager.reset` keeps them) and count nothing while caching is off.

    ``requests``: admissions (:meth:`KVCacheManager.acquire` calls); ``queries``: their prompt tokens; ``hits``:
    those tokens found in cached pages (tokens); ``evictions``: idle cached pages reused for new ones (pages)."""

    requests: int = 0
    queries: int = 0
    hits: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        """``hits / queries``, the share of prompt tokens not computed again (0.0 before any query)."""
        return self.hits / self.queries if self.queries else 0.0


def page_hashes(token_ids: Sequence[int] | np.ndarray, page_size: int, extra_key: Any = None) -> list[bytes]:
    """The hash chain of ``token_ids``' full pages: ``len(token_ids) // page_size`` digests of :data:`HASH_BYTES`
    bytes; page ``k``'s digests page ``k - 1``'s (16 zero bytes for the first page), ``extra_key`` and its
    ``page_size`` token ids. Two prompts share the first ``k`` digests exactly when they share the first
    ``k * page_size`` tokens and their ``extra_key``.

    ``token_ids``: ints in ``[0, 2**31)``; ``extra_key``: None, or an int, str or bytes, or a tuple of them (a
    LoRA adapter's id, a prompt's image hashes). TypeError/ValueError naming the argument otherwise."""
    page_size = arg_int("page_size", page_size, 1, MAX_SIZE)
    key = _key_bytes(extra_key)
    return list(_chain(_ROOT, key, _token_bytes("token_ids", token_ids), page_size))


def _chain(parent: bytes, key: bytes, data: bytes, page_size: int) -> Iterator[bytes]:
    """The hashes of the full pages of ``data`` (int32 token ids as bytes), the first one's parent ``parent``;
    lazily, so a lookup stops hashing at its first miss."""
    step = page_size * _TOKEN.itemsize
    for start in range(0, len(data) - step + 1, step):
        parent = hashlib.blake2b(parent + key + data[start : start + step], digest_size=HASH_BYTES).digest()
        yield parent


def _token_bytes(name: str, token_ids: object) -> bytes:
    """``token_ids`` (a 1-D sequence or array of ints in ``[0, 2**31)``) as little-endian int32 bytes; else
    TypeError/ValueError naming ``name``."""
    try:
        arr = np.asarray(token_ids)
    except (TypeError, ValueError, OverflowError):  # ragged nesting, or an object numpy refuses
        arr = np.asarray(None)
    if arr.ndim != 1 or not (arr.dtype.kind in "iu" or (arr.size == 0 and arr.dtype.kind == "f")):
        raise TypeError(f"{name}: expected a 1-D list of int token ids, got {show(token_ids)}")
    if arr.size and (arr.min() < 0 or arr.max() > MAX_SIZE):
        j = int(np.argmax((arr < 0) | (arr > MAX_SIZE)))
        raise ValueError(f"{name}[{j}]: expected a token id in [0, 2**31), got {int(arr[j])}")
    return arr.astype(_TOKEN, copy=False).tobytes()


def _key_bytes(extra_key: object) -> bytes:
    """``extra_key`` as the bytes every page hash of its prompt digests: its ``repr`` (exact for these types),
    length-prefixed; None: no key. TypeError/ValueError naming ``extra_key`` for anything else."""
    if extra_key is None:
        return bytes(4)
    _check_key(extra_key, 0)
    try:
        text = repr(extra_key).encode("utf-8", "surrogatepass")
    except ValueError:  # an int past Python's limit of digits for str()
        text = b""
    if not text or len(text) > _KEY_BYTES:
        raise ValueError(f"extra_key: expected a key of at most {_KEY_BYTES} bytes as text, got {show(extra_key)}")
    return len(text).to_bytes(4, "little") + text


def _check_key(value: object, depth: int) -> None:
    # exact types: a subclass (an IntEnum, a str subclass) could give another repr for an equal value
    if type(value) is tuple and depth < _KEY_DEPTH:
        for v in value:
            _check_key(v, depth + 1)
    elif type(value) not in (int, bool, str, bytes, type(None)):
        raise TypeError(
            f"extra_key: expected None, or an int, str or bytes, or a tuple of them (at most {_KEY_DEPTH} deep), "
            f"got {show(value)}"
        )


def _page_ids(name: str, pages: object) -> list[int]:
    """``pages`` as a list of ints (numpy integers too), else TypeError naming ``name``."""
    if isinstance(pages, (str, bytes)) or not isinstance(pages, Iterable):
        raise TypeError(f"{name}: expected a list of page ids, got {show(pages)}")
    out = list(pages)
    for i, p in enumerate(out):
        if type(p) is not int:
            if isinstance(p, bool) or not isinstance(p, (int, np.integer)):
                raise TypeError(f"{name}[{i}]: expected a page id (an int), got {show(p)}")
            out[i] = int(p)
    return out


class KVCacheManager:
    """The KV cache's pages: the free ones, a reference count per page, and the prefix cache of full pages, found by
    their hash chain and evicted least recently used (the page states and a request's life: :mod:`.kv_cache`).

    Args:
        num_pages: pages in the KV cache, the reserved ones included.
        page_size: tokens per page.
        reserved: pages ``0 .. reserved - 1`` are never handed out (page 0: the padding page).
        enable_prefix_caching: False: nothing is cached, and it hands out pages as :class:`~.pages.PageAllocator`.

    Pages go out lowest id first and freed pages are reused first, as PageAllocator's; cached pages are reused only
    when no free page is left, least recently used first. ``stats``: the prefix cache's counters
    (:class:`PrefixCacheStats`).
    """

    def __init__(
        self, num_pages: int, page_size: int, *, reserved: int = 1, enable_prefix_caching: bool = True
    ) -> None:
        self.reserved = arg_int("reserved", reserved, 0, MAX_PAGES - 1)
        self.num_pages = arg_int("num_pages", num_pages, self.reserved + 1, MAX_PAGES)
        self.page_size = arg_int("page_size", page_size, 1, MAX_SIZE)
        self._caching = flag("enable_prefix_caching", enable_prefix_caching)
        self.stats = PrefixCacheStats()
        self._clear()

    def _clear(self) -> None:
        self._refs = [0] * self.num_pages  # requests holding each page
        self._free = list(range(self.num_pages - 1, self.reserved - 1, -1))  # pop() gives the lowest id first
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages no one holds, least recently used first
        self._hash_of: dict[int, bytes] = {}  # page -> its hash, for every committed full page held or idle
        self._page_of: dict[bytes, int] = {}  # hash -> the page the cache serves for it

    # ---- sizes

    @property
    def enable_prefix_caching(self) -> bool:
        """Whether full pages are cached (fixed when it is made)."""
        return self._caching

    @property
    def capacity(self) -> int:
        """Pages requests can ever hold (all but the reserved ones)."""
        return self.num_pages - self.reserved

    @property
    def num_free(self) -> int:
        """Pages :meth:`allocate` can hand out now: the free ones and the idle cached ones (evicted first)."""
        return len(self._free) + len(self._idle)

    @property
    def num_cached(self) -> int:
        """Pages the cache serves (held or idle)."""
        return len(self._page_of)

    @property
    def num_idle(self) -> int:
        """Cached pages no request holds (evictable)."""
        return len(self._idle)

    # ---- pages out and back

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh pages (one reference each), all or none: OutOfPagesError if fewer than ``n`` are free
        (:attr:`num_free`). Free pages go first; then idle cached pages are evicted, least recently used first."""
        n = integer("n", n, 0)
        if n > self.num_free:
            raise OutOfPagesError(
                f"the KV cache has {self.num_free} free pages of {self.capacity} ({len(self._idle)} of them idle "
                f"cached pages), {n} requested; allocate more pages (num_pages=) or serve fewer or shorter requests"
            )
        return self._take(n)

    def alloc(self, n: int) -> list[int]:
        """:meth:`allocate` under :class:`~.pages.PageAllocator`'s name, so a :class:`~.scheduler.Scheduler` takes
        either."""
        return self.allocate(n)

    def _take(self, n: int) -> list[int]:
        """``n <= num_free`` pages, one reference each: free ones (lowest id first), then evicted idle ones."""
        k = min(n, len(self._free))
        pages = self._free[len(self._free) - k :]
        del self._free[len(self._free) - k :]
        pages.reverse()
        for _ in range(n - k):
            page, _ = self._idle.popitem(last=False)
            del self._page_of[self._hash_of.pop(page)]
            pages.append(page)
        self.stats.evictions += n - k
        for p in pages:
            self._refs[p] = 1
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference to each of ``pages`` (a request's, when it ends). A page no one holds any more becomes
        idle if the cache serves it, else free. ValueError naming ``pages``, nothing freed, for a page not held that
        many times (a double free, or a page not from this manager)."""
        pages = _page_ids("pages", pages)
        counts: dict[int, int] = {}
        for p in pages:
            counts[p] = counts.get(p, 0) + 1
            if not self.reserved <= p < self.num_pages or self._refs[p] < counts[p]:
                raise ValueError(f"pages: page {p} is not allocated (double free, or not from this manager)")
        # last page first: the free list hands the first page out next (as PageAllocator), and a request's chain
        # enters the LRU list from its end, so its end is evicted first
        for p in reversed(pages):
            self._refs[p] -= 1
            if self._refs[p] == 0:
                h = self._hash_of.get(p)
                # a copy of a page the cache serves is freed; one whose cached twin was evicted takes its place
                if h is not None and self._page_of.setdefault(h, p) == p:
                    self._idle[p] = None  # the most recently used end
                else:
                    self._hash_of.pop(p, None)
                    self._free.append(p)

    # ---- the prefix cache

    def match_prefix(self, token_ids: Sequence[int] | np.ndarray, extra_key: Any = None) -> tuple[list[int], int]:
        """The longest run of cached full pages that begins ``token_ids`` (a prompt) under ``extra_key``, and the
        tokens they hold (``len(pages) * page_size``). Never the whole prompt: at most ``(len(token_ids) - 1) //
        page_size`` pages, so its last token is computed and gives the logits of the next. A lookup only: nothing
        is held or counted; pass the pages to :meth:`acquire` before any other call changes the cache.
        TypeError/ValueError naming the argument for token ids or a key :func:`page_hashes` refuses."""
        data = _token_bytes("token_ids", token_ids)
        key = _key_bytes(extra_key)
        most = max(len(data) // _TOKEN.itemsize - 1, 0) // self.page_size
        pages: list[int] = []
        if self._caching:
            for h in _chain(_ROOT, key, data[: most * self.page_size * _TOKEN.itemsize], self.page_size):
                page = self._page_of.get(h)
                if page is None:
                    break
                pages.append(page)
        return pages, len(pages) * self.page_size

    def free_pages_needed(self, prefix: Sequence[int], num_new: int) -> int:
        """How many of :attr:`num_free` ``acquire(prefix, num_new)`` takes: ``num_new`` plus the pages of ``prefix``
        that are idle (they stop being evictable once held)."""
        prefix = self._cached_prefix(prefix)
        return integer("num_new", num_new, 0) + sum(self._refs[p] == 0 for p in prefix)

    def acquire(self, prefix: Sequence[int], num_new: int, *, num_tokens: int) -> list[int]:
        """Admit a request: hold the cached pages ``prefix`` (from :meth:`match_prefix`) and ``num_new`` fresh
        pages; returns its pages, ``prefix`` then the fresh ones. All or nothing: OutOfPagesError, nothing changed,
        when fewer than ``num_new`` pages would be free. ``num_tokens``: its prompt's tokens, counted in
        :attr:`stats` with the ``len(prefix) * page_size`` found cached (which must be fewer).

        ValueError naming ``prefix`` for a page the cache does not serve now (a match made before pages were
        allocated may be stale: match again), or one named twice."""
        prefix = self._cached_prefix(prefix)
        num_new = integer("num_new", num_new, 0)
        num_tokens = integer("num_tokens", num_tokens, 0)
        hits = len(prefix) * self.page_size
        if prefix and hits >= num_tokens:
            raise ValueError(f"num_tokens: {num_tokens} prompt tokens, but prefix holds {hits} (match_prefix's cap)")
        idle = [p for p in prefix if self._refs[p] == 0]
        if num_new > self.num_free - len(idle):
            raise OutOfPagesError(
                f"the KV cache has {self.num_free - len(idle)} free pages besides the prefix's, {num_new} requested; "
                f"wait for requests to end, or allocate more pages (num_pages=)"
            )
        for p in idle:
            del self._idle[p]
        for p in prefix:
            self._refs[p] += 1
        if self._caching:
            self.stats.requests += 1
            self.stats.queries += num_tokens
            self.stats.hits += hits
        return prefix + self._take(num_new)

    def _cached_prefix(self, prefix: object) -> list[int]:
        pages = _page_ids("prefix", prefix)
        for i, p in enumerate(pages):
            h = self._hash_of.get(p)
            if h is None or self._page_of.get(h) != p:
                raise ValueError(
                    f"prefix[{i}]: page {p} is not a page the cache serves now (a match is stale once pages were "
                    f"allocated or freed: call match_prefix again)"
                )
        if len(set(pages)) != len(pages):
            raise ValueError(f"prefix: names a page twice ({show(pages)}); pass match_prefix's pages")
        return pages

    def commit(
        self,
        pages: Sequence[int],
        token_ids: Sequence[int] | np.ndarray,
        num_computed_tokens: int,
        extra_key: Any = None,
    ) -> int:
        """Register a request's pages that its first ``num_computed_tokens`` tokens fill (their K/V written by a
        pass already enqueued), so later requests can share them; returns how many pages the cache newly serves.

        ``pages``: the request's pages (it holds them), in order; ``token_ids``: its tokens (prompt, then output;
        only ``token_ids[:num_computed_tokens]`` are read, and of those only the pages not registered before, so a
        decode step's call costs one page's hash at the most); ``extra_key``: the one its prefix was matched with.
        Only full pages count: a chunk of a chunked prefill ending inside a page leaves that page for a later call.
        No-op (0) with caching off. TypeError/ValueError naming the argument, nothing registered, on bad input."""
        done = integer("num_computed_tokens", num_computed_tokens, 0)
        for name, seq in (("pages", pages), ("token_ids", token_ids)):
            if isinstance(seq, (str, bytes)) or not isinstance(seq, (Sequence, np.ndarray)):
                raise TypeError(f"{name}: expected a list, got {show(seq)}")
        ps = self.page_size
        if done > min(len(pages) * ps, len(token_ids)):
            raise ValueError(
                f"num_computed_tokens: {done} tokens exceed the request's {len(token_ids)} tokens or what its "
                f"{len(pages)} pages of {ps} hold"
            )
        key = _key_bytes(extra_key)
        if not self._caching:
            return 0
        full = done // ps
        start = full  # the registered pages begin the list: walk back to the last of them
        while start > 0 and self._held(pages, start - 1) not in self._hash_of:
            start -= 1
        if start == full:  # no page filled since the last call (most decode steps)
            return 0
        parent = self._hash_of[int(pages[start - 1])] if start else _ROOT
        data = _token_bytes("token_ids", token_ids[start * ps : full * ps])
        new = 0
        for i, h in enumerate(_chain(parent, key, data, ps), start):
            page = int(pages[i])
            self._hash_of[page] = h
            if h not in self._page_of:
                self._page_of[h] = page
                new += 1
        return new

    def _held(self, pages: Sequence[int], i: int) -> int:
        p = pages[i]
        if type(p) is not int:
            if isinstance(p, bool) or not isinstance(p, (int, np.integer)):
                raise TypeError(f"pages[{i}]: expected a page id (an int), got {show(p)}")
            p = int(p)
        if not self.reserved <= p < self.num_pages or not self._refs[p]:
            raise ValueError(f"pages[{i}]: page {p} is not held (not allocated, or already freed)")
        return p

    def reset(self) -> bool:
        """Forget every cached page (after the weights change, the cached K/V are wrong); returns True. False, and
        nothing changes, while any request holds pages: their K/V would be registered by later commits (end or
        abort the requests first). :attr:`stats` is kept."""
        if any(self._refs):
            return False
        self._clear()
        return True

    def check(self) -> None:
        """AssertionError naming the first broken rule of the bookkeeping (for tests): every page but the reserved
        ones is exactly one of free, idle and held; a free page has no hash; the cache's pages have their hashes;
        an idle page is one the cache serves; with caching off, nothing is hashed."""
        free, idle = set(self._free), set(self._idle)
        held = {p for p in range(self.num_pages) if self._refs[p]}
        served = set(self._page_of.values())
        rules = [
            (len(free) == len(self._free), "a page is twice in the free list"),
            (min(self._refs) >= 0, "a reference count is negative"),
            (not (free & idle or free & held or idle & held), "a page is in two states"),
            (free | idle | held == set(range(self.reserved, self.num_pages)), "a page is in no state, or reserved"),
            (not free & self._hash_of.keys(), "a free page keeps a hash"),
            (all(self._hash_of.get(p) == h for h, p in self._page_of.items()), "a cached page lost its hash"),
            (idle <= served and self._hash_of.keys() <= held | idle, "an idle page is not served, or a stray hash"),
            (self._caching or not self._hash_of, "a page is hashed with caching off"),
        ]
        for ok, broken in rules:
            if not ok:
                raise AssertionError(f"KVCacheManager: {broken}")
