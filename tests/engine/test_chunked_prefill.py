"""Chunked prefill in the scheduler, on CPU: a prompt cut to a pass's token rows (``Scheduler.chunk_tokens``), its
chunks continued from the K/V the last one wrote, no token and no decode row until its last chunk, the decoding
requests riding beside the chunks, and the prefix cache registering a chunk's full pages. The serving loop's passes
over it: tests/engine/test_step_api_host.py (``test_chunked_*``); on a GPU: tests/engine/test_gpu_step_api.py."""

from __future__ import annotations

import numpy as np
import pytest

from fi_engine.runtime.sampling_params import SamplingParams
from fi_engine.runtime.sched.kv_cache import KVCacheManager
from fi_engine.runtime.sched.pages import PageAllocator
from fi_engine.runtime.sched.scheduler import Scheduler
from fi_engine.runtime.sched.step_arrays import fill_prefill, prefill_layout

PS = 16
EOS = 999


def scheduler(chunk: int = 0, max_prefill: int = 64, pages: int = 64, cache: bool = False, batch: int = 4) -> Scheduler:
    pool = KVCacheManager(pages, PS, enable_prefix_caching=True) if cache else PageAllocator(pages)
    s = Scheduler(pool, PS, batch, 512, max_prefill, 1000, (EOS,))
    s.prefix_caching = cache
    s.chunk_tokens = chunk
    return s


def arrays(s: Scheduler) -> dict[str, np.ndarray]:
    layout = prefill_layout(s.max_prefill_tokens, s.max_batch, s.allocator.num_pages)
    return layout.views(np.zeros(layout.total, np.int32))


def test_a_prompt_past_max_prefill_tokens_needs_chunking() -> None:
    with pytest.raises(ValueError, match="max_prefill_tokens 64; turn chunked prefill on"):
        scheduler().submit(list(range(1, 101)), 4)
    s = scheduler(chunk=64)
    assert len(s.submit(list(range(1, 101)), 4).prompt) == 100
    # a prompt whose logprobs are asked is computed in one pass: never cut
    with pytest.raises(ValueError, match="prompt logprobs need it prefilled in one pass"):
        s.submit(list(range(1, 101)), 4, sampling=SamplingParams(prompt_logprobs=1))


def test_a_long_prompt_is_prefilled_chunk_by_chunk_and_takes_its_token_from_the_last() -> None:
    s = scheduler(chunk=40)
    prompt = tuple(range(1, 101))
    r = s.submit(prompt, 3)
    v = arrays(s)
    seen_ids: list[int] = []
    seen_positions: list[int] = []
    ends = []
    while True:
        batch = s.admit()
        assert batch == [r]
        nnz, _ = fill_prefill(batch, PS, v)
        assert nnz <= 40
        seen_ids += v["token_ids"][:nnz].tolist()
        seen_positions += v["positions"][:nnz].tolist()
        # its KV: the pages up to its chunk's last token, the last page as full as that token makes it
        assert v["kv_indptr"][1] == -(-(seen_positions[-1] + 1) // PS)
        assert v["kv_last_page_len"][0] == seen_positions[-1] % PS + 1
        s.record(batch, [7], prefill=True)
        ends.append(r.cached)
        if r.output:
            break
        assert r.output == [] and not r.decoding and s.chunks_pending
        assert s.decode_slots() == [None] * 4 and s.decode_rows(padded=False) == []  # no decode row yet
        assert s.can_admit(hold_s=1e9)  # a chunk left is never held back by the scheduler delay
    assert ends == [40, 80, 100] and r.output == [7] and r.decoding and not s.chunks_pending
    assert seen_ids == list(prompt) and seen_positions == list(range(100))  # the chunks are the whole prompt
    assert s.decode_rows(padded=False) == [r]


def test_the_decoding_requests_ride_beside_a_chunk_within_the_budget() -> None:
    s = scheduler(chunk=32)
    a = s.submit([5, 6, 7], 10)
    s.admit()
    s.record([a], [11], prefill=True)
    long = s.submit(list(range(1, 81)), 4)
    short = s.submit([1, 2, 3, 4], 4)
    admitted, riders = s.admit_beside_active()
    assert riders == [a] and admitted == [long]  # 1 rider row + 31 prompt rows; nothing left for `short`
    v = arrays(s)
    nnz, _ = fill_prefill([*riders, *admitted], PS, v)
    assert nnz == 32 and long.chunk_end == 31
    s.record(riders, [12])
    s.record(admitted, [0], prefill=True)
    assert a.output == [11, 12] and long.cached == 31 and not long.output
    admitted, riders = s.admit_beside_active()  # the next pass: the chunk goes on, the rider rides again
    assert riders == [a] and admitted == [long] and long.chunk_end == 62
    s.record(riders, [13])
    s.record(admitted, [0], prefill=True)
    admitted, riders = s.admit_beside_active()  # its last 18 tokens leave room for the queued prompt
    assert riders == [a] and admitted == [long, short] and long.chunk_end is None and short.chunk_end is None
    nnz, _ = fill_prefill([*riders, *admitted], PS, v)
    assert nnz == 1 + 18 + 4
    s.record(riders, [14])
    s.record(admitted, [21, 31], prefill=True)
    assert long.output == [21] and short.output == [31] and s.decode_rows(padded=False) == [a, long, short]


def test_without_chunking_a_prompt_waits_for_a_pass_with_room() -> None:
    s = scheduler(max_prefill=32)
    a = s.submit([5, 6, 7], 10)
    s.admit()
    s.record([a], [11], prefill=True)
    b = s.submit(list(range(1, 33)), 4)  # 32 rows: not beside a rider's one
    admitted, riders = s.admit_beside_active()
    assert admitted == [b] and riders == [] and b.chunk_end is None  # alone, whole


def test_a_chunk_registers_its_full_pages_in_the_prefix_cache() -> None:
    s = scheduler(chunk=40, cache=True)
    prompt = list(range(1, 101))
    r = s.submit(prompt, 2)
    s.record(s.admit(), [0], prefill=True)  # chunk 1: tokens 0..39, pages 0 and 1 full
    assert s.allocator.match_prefix(prompt)[1] == 32  # a prompt like it would find them
    while not r.output:
        s.record(s.admit(), [9], prefill=True)
    assert s.allocator.match_prefix(prompt)[1] == 96  # every full page of the prompt
