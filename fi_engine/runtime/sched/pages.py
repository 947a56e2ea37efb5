"""The KV cache's pages: ``num_pages`` pages of ``page_size`` tokens per layer, handed out by :class:`PageAllocator`
(or by the prefix cache, :class:`~fi_engine.runtime.sched.kv_cache.KVCacheManager`, which answers to the same calls).

Page 0 is reserved as the **padding page** (:data:`PAD_PAGE`): padded rows of a CUDA-graph batch append their
(ignored) K/V there and attend to its one token, so a padded row is an ordinary one-token request and the kernels
need no special case; a padded prefill's extra rows are likewise one ordinary prompt whose pages are all the padding
page (:func:`~fi_engine.runtime.sched.step_arrays.pad_prefill`). Real requests get pages ``1 .. num_pages - 1``.
"""

from __future__ import annotations

from collections.abc import Iterable

from ...values import integer

__all__ = ["PAD_PAGE", "OutOfPagesError", "PageAllocator", "pages_for"]

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
