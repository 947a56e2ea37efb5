"""Requests in, batches out: the requests, the scheduler and the KV cache's pages, on the host (nothing here touches a
GPU; tests/engine/test_serving_host.py, test_kv_cache.py, test_chunked_prefill.py).

- :mod:`~fi_engine.runtime.sched.request`: ``Request``, one prompt being served (its tokens, pages, slot, what it
  asked for).
- :mod:`~fi_engine.runtime.sched.scheduler`: ``Scheduler``: submission, admission into batch slots, a step's rows,
  page growth, the tokens recorded, the ends.
- :mod:`~fi_engine.runtime.sched.pages`: ``PageAllocator``, the KV cache's pages (page 0: the padding page);
  :mod:`~fi_engine.runtime.sched.kv_cache`: ``KVCacheManager``, the same pages shared between prompts that begin
  alike (automatic prefix caching).
- :mod:`~fi_engine.runtime.sched.step_arrays`: a step's rows as the attention kernels' paged index arrays, and their
  ``Layout`` in one host-to-device copy.
"""

__all__: list[str] = []
