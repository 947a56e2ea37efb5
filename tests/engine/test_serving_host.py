"""Host logic of the Llama engine (fi_engine), no GPU: pages, batching, padding, finishing, index arrays,
config parsing, the safetensors reader, and that nothing on the engine's path imports torch.

The index arrays are cross-checked with fi_ffi's own host validators (the ones the plans and the debug append
check use), so a table the kernels would misread fails here.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers.hf_configs import LLAMA31_ROPE, LLAMA_SHAPE
from helpers.no_torch import TORCH_SPY

from fi_engine.checkpoint.config import LlamaConfig, RopeConfig
from fi_engine.checkpoint.safetensors import Checkpoint, read_header, write_safetensors
from fi_engine.runtime.sched.pages import PAD_PAGE, OutOfPagesError, PageAllocator
from fi_engine.runtime.sched.request import Request
from fi_engine.runtime.sched.scheduler import Scheduler
from fi_engine.runtime.sched.step_arrays import decode_layout, fill_decode, fill_prefill, kv_lengths, prefill_layout
from fi_engine.runtime.worker.graph_shapes import decode_batches
from fi_ffi.ops.attention import host_index as plan_checks
from fi_ffi.ops.page import check_append_positions, get_batch_indices_positions

PS = 16


# ---------------------------------------------------------------------------------------------- page allocator


def test_allocator_hands_out_distinct_pages_never_the_padding_page():
    a = PageAllocator(8)
    pages = a.alloc(3) + a.alloc(4)
    assert sorted(pages) == [1, 2, 3, 4, 5, 6, 7]
    assert PAD_PAGE not in pages
    assert a.num_free == 0 and a.capacity == 7


def test_allocator_reuses_freed_pages_first():
    a = PageAllocator(10)
    first = a.alloc(3)
    a.alloc(2)
    a.free(first)
    assert a.num_free == 7
    assert sorted(a.alloc(3)) == sorted(first)


def test_allocator_out_of_pages_allocates_nothing():
    a = PageAllocator(5)
    a.alloc(2)
    with pytest.raises(OutOfPagesError, match=r"2 free pages of 4, 3 requested.*num_pages="):
        a.alloc(3)
    assert a.num_free == 2
    assert len(a.alloc(2)) == 2


def test_allocator_rejects_double_free_and_foreign_pages_freeing_nothing():
    a = PageAllocator(6)
    pages = a.alloc(2)
    a.free(pages[:1])
    with pytest.raises(ValueError, match=f"page {pages[0]} is not allocated"):
        a.free(pages)  # pages[1] is fine, pages[0] was freed already: neither may be freed
    assert a.num_free == 4
    with pytest.raises(ValueError, match="page 0 is not allocated"):
        a.free([PAD_PAGE])
    with pytest.raises(ValueError, match="is not allocated"):
        a.free([pages[1], pages[1]])
    assert a.num_free == 4


@pytest.mark.parametrize("n", [0, 1, -3, True, 2.5])
def test_allocator_needs_more_than_the_padding_page(n):
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(n)


# ---------------------------------------------------------------------------------------------- scheduler


def make(num_pages=64, max_batch=4, max_seq_len=256, max_prefill_tokens=512, eos=(), vocab=1000):
    return Scheduler(PageAllocator(num_pages), PS, max_batch, max_seq_len, max_prefill_tokens, vocab, eos)


@pytest.mark.parametrize(
    ("prompt", "new", "match"),
    [
        ([], 4, r"prompts\[0\]: expected a non-empty list"),
        ([1, 2, 1000], 4, r"prompts\[0\]\[2\]: token id 1000 is outside the vocabulary \[0, 1000\)"),
        ([1, -1], 4, r"prompts\[0\]\[1\]: token id -1"),
        ([[1, 2]], 4, "expected a non-empty list"),
        (["a"], 4, "expected a non-empty list"),
        ([True], 4, "booleans"),
        ([1], 0, "max_new_tokens: expected an integer >= 1"),
        ([1] * 550, 51, "550 prompt tokens \\+ 51 new tokens exceed the engine's max_seq_len 600"),
        ([1] * 513, 1, "513 prompt tokens exceed max_prefill_tokens 512"),
    ],
)
def test_submit_rejects_requests_that_can_never_run(prompt, new, match):
    s = make(max_prefill_tokens=512, max_seq_len=600)
    with pytest.raises(ValueError, match=match):
        s.submit(prompt, new, name="prompts[0]")
    assert not s.pending


def test_submit_rejects_a_budget_larger_than_the_cache():
    s = make(num_pages=4)  # 3 usable pages = 48 tokens
    with pytest.raises(ValueError, match="needs up to 4 pages of 16 tokens but the KV cache has 3"):
        s.submit([1] * 40, 10)  # 49 tokens cached at most
    s.submit([1] * 40, 9)  # 48: fits


def test_admit_fills_free_slots_in_order_within_page_budgets():
    s = make(num_pages=1 + 8, max_batch=3)  # 8 usable pages
    r0 = s.submit([1] * 20, 13)  # budget ceil(32/16) = 2
    r1 = s.submit([2] * 5, 60)  # budget ceil(64/16) = 4
    r2 = s.submit([3] * 3, 40)  # budget 3: 2 + 4 + 3 > 8, must wait
    admitted = s.admit()
    assert admitted == [r0, r1]
    assert (r0.slot, r1.slot) == (0, 1)
    assert len(r0.pages) == 2 and len(r1.pages) == 1  # the prompt's pages only
    assert s.pending[0] is r2
    assert s.admit() == []  # still no room for r2's budget
    s.record([r0, r1], [7, 7], prefill=True)
    s.eos = frozenset({9})
    s.record([r0], [9])  # r0's decode step produced an end-of-sequence token
    assert r0.finish_reason == "eos" and r0.slot == -1 and r0.pages == []
    admitted = s.admit()
    assert admitted == [r2] and r2.slot == 0  # the lowest free slot, r0's


def test_admit_respects_the_prefill_token_limit():
    s = make(max_prefill_tokens=40)
    a = s.submit([1] * 30, 2)
    b = s.submit([1] * 20, 2)
    assert s.admit() == [a]
    s.record([a], [5], prefill=True)
    assert s.admit() == [b]


def test_can_admit_holds_the_queue_while_others_decode_until_the_oldest_waited_or_fills_the_slots():
    s = make(max_batch=3)
    assert not s.can_admit()  # nothing queued
    a = s.submit([1] * 4, 8)
    assert s.can_admit(hold_s=10.0)  # nobody decodes: a hold does not apply
    assert s.admit() == [a]
    b = s.submit([2] * 4, 8)
    t = b.queued_at
    assert s.can_admit() and s.can_admit(hold_s=0.0)  # no hold
    assert not s.can_admit(hold_s=0.5, now=t + 0.4)  # a decodes: b waits out the hold
    assert s.can_admit(hold_s=0.5, now=t + 0.5)
    c = s.submit([3] * 4, 8)
    assert s.can_admit(hold_s=0.5, now=t + 0.1)  # b and c fill both free slots: no reason to wait
    s.admit()
    s.submit([4] * 4, 8)
    assert s.slots.count(None) == 0 and not s.can_admit()  # no free slot
    assert c.slot == 2


def test_admit_beside_active_gives_the_riders_their_rows_or_admits_alone():
    s = make(max_batch=4, max_prefill_tokens=20)
    a = s.submit([1] * 4, 2)
    b = s.submit([1] * 4, 8)
    assert s.admit_beside_active() == ([a, b], [])  # nobody active: a plain admission
    s.record([a, b], [5, 5], prefill=True)  # a has 1 of its 2 tokens, b 1 of 8
    c = s.submit([2] * 18, 4)  # 18 prompt rows + 2 riders = 20: fits beside both
    assert s.admit_beside_active() == ([c], [a, b])
    s.record([c], [6], prefill=True)
    d = s.submit([3] * 18, 4)  # 18 + 3 riders > 20: admitted alone
    assert s.admit_beside_active() == ([d], [])
    s.record([d], [6], prefill=True)
    e = s.submit([4] * 4, 4)
    assert s.admit_beside_active(behind=True) == ([], [])  # every slot is taken
    s.abort(d)
    admitted, riders = s.admit_beside_active(behind=True)  # a's step in flight gives it its last token
    assert admitted == [e] and a not in riders and riders == [b, c]


def test_prefill_tables_match_fi_ffi_host_helpers():
    s = make()
    lens = [3, 16, 17, 40]
    reqs = [s.submit(list(range(10 * i, 10 * i + n)), 8) for i, n in enumerate(lens)]
    s.admit()
    layout = prefill_layout(512, 4, 64)
    flat = np.zeros(layout.total, np.int32)
    v = layout.views(flat)
    nnz, n_pages = fill_prefill(reqs, PS, v)
    assert nnz == sum(lens)
    assert n_pages == 1 + 1 + 2 + 3
    b = len(reqs)
    qo = v["qo_indptr"][: b + 1]
    kv = v["kv_indptr"][: b + 1]
    last = v["kv_last_page_len"][:b]
    assert qo.tolist() == [0, 3, 19, 36, 76]
    assert kv.tolist() == [0, 1, 2, 4, 7]
    assert last.tolist() == [3, 16, 1, 8]
    assert v["last_rows"][:b].tolist() == [2, 18, 35, 75]
    assert v["kv_indices"][:n_pages].tolist() == [p for r in reqs for p in r.pages]
    assert v["token_ids"][:nnz].tolist() == [t for r in reqs for t in r.prompt]
    # The library's own mapping of appended tokens to (request, position) and its plan-side checks agree.
    seq = plan_checks.check_last_page_len("kv_last_page_len", last, kv, PS, lengths=True)
    assert seq.tolist() == lens
    bi, po = get_batch_indices_positions(qo, seq)
    assert np.array_equal(bi, v["batch_indices"][:nnz]) and np.array_equal(po, v["positions"][:nnz])
    check_append_positions(bi, po, v["kv_indices"][:n_pages], kv, last, PS, num_pages=64)


def test_a_mixed_pass_feeds_each_decoding_request_its_last_token_beside_the_new_prompts():
    """A mixed prefill pass (ServingLoop.mixed_prefill): a decoding request is one row, its last token at position
    ``cached`` over the pages that hold ``cached + 1`` tokens, as its decode step would feed it; a new request its
    whole prompt. FlashInfer's own host helpers map the rows to the same (request, position) pairs and accept the
    appends."""
    s = make(max_batch=4)
    a = s.submit([1] * 15, 8)
    b = s.submit([2] * 5, 8)
    s.admit()
    s.record([a, b], [11, 12], prefill=True)  # a: 15 cached, its token 11 goes to position 15 (page 1's end)
    s.record([a, b], [13, 14])  # a: 16 cached, its next token opens page 2; b: 6 cached
    c = s.submit([3] * 18, 8)
    assert s.admit(reserve=2) == [c]
    s.grow_pages()  # what the mixed pass does first
    assert len(a.pages) == 2 and len(b.pages) == 1 and len(c.pages) == 2
    layout = prefill_layout(64, 4, 64)
    v = layout.views(np.zeros(layout.total, np.int32))
    nnz, n_pages = fill_prefill([a, b, c], PS, v)
    assert (nnz, n_pages) == (1 + 1 + 18, 2 + 1 + 2)
    assert v["token_ids"][:nnz].tolist() == [13, 14, *c.prompt]
    assert v["positions"][:nnz].tolist() == [16, 6, *range(18)]
    assert v["qo_indptr"][:4].tolist() == [0, 1, 2, 20]
    assert v["kv_indptr"][:4].tolist() == [0, 2, 3, 5]
    assert v["kv_last_page_len"][:3].tolist() == [1, 7, 2]
    assert v["last_rows"][:3].tolist() == [0, 1, 19]
    assert v["kv_indices"][:n_pages].tolist() == [*a.pages, *b.pages, *c.pages]
    qo, kv, last = v["qo_indptr"][:4], v["kv_indptr"][:4], v["kv_last_page_len"][:3]
    seq = plan_checks.check_last_page_len("kv_last_page_len", last, kv, PS, lengths=True)
    assert seq.tolist() == [17, 7, 18]
    bi, po = get_batch_indices_positions(qo, seq)
    assert np.array_equal(bi, v["batch_indices"][:nnz]) and np.array_equal(po, v["positions"][:nnz])
    check_append_positions(bi, po, v["kv_indices"][:n_pages], kv, last, PS, num_pages=64)


def test_a_mixed_pass_behind_a_decode_step_feeds_its_riders_one_position_on():
    """``ahead=1`` (a pass launched behind a decode step in flight): each decoding request is fed at the position
    after its last recorded token, with token 0 in place of the one in flight (gathered on the device), and
    ``grow_pages(riders, 1)`` gives it the page that position opens; a new request's prompt is as before."""
    s = make(max_batch=4)
    a = s.submit([1] * 14, 8)
    s.admit()
    s.record([a], [11], prefill=True)
    s.record([a], [12])  # 15 cached; the step in flight feeds 12 at 15 and gives the token fed at 16
    c = s.submit([3] * 5, 8)
    assert s.admit(reserve=1) == [c]
    assert len(a.pages) == 1
    s.grow_pages([a], ahead=1)
    assert len(a.pages) == 2 and len(c.pages) == 1  # position 16 opens a's second page; c is not a rider
    layout = prefill_layout(64, 4, 64)
    v = layout.views(np.zeros(layout.total, np.int32))
    nnz, n_pages = fill_prefill([a, c], PS, v, ahead=1)
    assert (nnz, n_pages) == (1 + 5, 2 + 1)
    assert v["token_ids"][:nnz].tolist() == [0, *c.prompt]
    assert v["positions"][:nnz].tolist() == [16, *range(5)]
    assert v["kv_last_page_len"][:2].tolist() == [1, 5]
    assert v["kv_indices"][:n_pages].tolist() == [*a.pages, *c.pages]


def test_a_mixed_pass_refuses_a_decoding_request_without_the_page_its_token_needs():
    s = make(max_batch=2)
    a = s.submit([1] * 16, 8)
    s.admit()
    s.record([a], [11], prefill=True)  # 16 cached: position 16 needs a second page, not given yet
    layout = prefill_layout(64, 2, 64)
    with pytest.raises(AssertionError, match="holds 1 pages, its 17 tokens need 2"):
        fill_prefill([a], PS, layout.views(np.zeros(layout.total, np.int32)))


def test_admission_leaves_the_reserved_rows_of_a_mixed_pass_to_the_riders():
    s = Scheduler(PageAllocator(64), PS, 4, 256, 40, 1000)
    s.submit([1] * 10, 4)
    s.submit([2] * 10, 4)
    s.submit([3] * 10, 4)
    assert len(s.admit(reserve=15)) == 2  # 15 + 10 + 10 <= 40 < 15 + 30
    assert s.admit(reserve=31) == []  # 31 + 10 > 40: the third waits
    assert len(s.admit(reserve=30)) == 1


def test_decode_tables_pad_to_the_graph_batch_with_the_padding_page():
    s = make(max_batch=4)
    a = s.submit([1] * 16, 8)
    b = s.submit([2] * 5, 8)
    s.admit()
    s.record([a, b], [11, 12], prefill=True)
    layout = decode_layout(4, 64)
    v = layout.views(np.zeros(layout.total, np.int32))
    rows = s.decode_rows(padded=True)
    assert rows == [a, b, None, None]
    assert len(a.pages) == 2  # token 16 starts a new page
    b.lora_slot = 3  # (the scheduler's slot of its adapter, as admission sets it)
    v["lora_slots"][:] = 7  # what a step before wrote
    n_pages = fill_decode(rows, PS, v)
    assert v["token_ids"][:4].tolist() == [11, 12, 0, 0]
    assert v["lora_slots"][:4].tolist() == [-1, 3, -1, -1]  # no adapter for a, none for the padding rows
    assert v["positions"][:4].tolist() == [16, 5, 0, 0]
    assert v["batch_indices"][:4].tolist() == [0, 1, 2, 3]
    assert v["kv_indptr"][:5].tolist() == [0, 2, 3, 4, 5]
    assert v["kv_last_page_len"][:4].tolist() == [1, 6, 1, 1]
    assert v["kv_indices"][:n_pages].tolist() == [*a.pages, *b.pages, PAD_PAGE, PAD_PAGE]
    seq = plan_checks.check_last_page_len(
        "kv_last_page_len", v["kv_last_page_len"][:4], v["kv_indptr"][:5], PS, lengths=True
    )
    assert seq.tolist() == [17, 6, 1, 1]
    check_append_positions(
        v["batch_indices"][:4],
        v["positions"][:4],
        v["kv_indices"][:n_pages],
        v["kv_indptr"][:5],
        v["kv_last_page_len"][:4],
        PS,
        num_pages=64,
    )


def test_eager_decode_rows_are_the_active_requests_only():
    s = make(max_batch=4)
    reqs = [s.submit([1, 2], 5) for _ in range(3)]
    s.admit()
    s.record(reqs, [3, 4, 5], prefill=True)
    s.record(reqs[1:2], [6])  # pretend request 1 ran a step alone
    s.eos = frozenset({99})
    s.record([reqs[1]], [99])
    assert s.decode_rows(padded=False) == [reqs[0], reqs[2]]
    assert s.decode_rows(padded=True) == [reqs[0], None, reqs[2], None]


def test_layout_regions_are_aligned_and_disjoint():
    layout = decode_layout(5, 37)
    offsets = sorted(layout.offsets.items(), key=lambda kv: kv[1])
    for (name, off), (_, nxt) in zip(offsets, [*offsets[1:], ("end", layout.total)], strict=True):
        assert off % 32 == 0 and off + layout.sizes[name] <= nxt
    assert layout.end("kv_indices", 3) == layout.offsets["kv_indices"] + 3


def run_simulation(s: Scheduler, prompts, limits, token_of, padded):
    """Drive the scheduler as the engine does, with ``token_of(request, step)`` as the model; check every
    step's tables with fi_ffi's validators. Returns the requests and the number of decode steps."""
    reqs = [s.submit(p, m) for p, m in zip(prompts, limits, strict=True)]
    dl = decode_layout(s.max_batch, s.allocator.num_pages + s.max_batch)
    pl = prefill_layout(s.max_prefill_tokens, s.max_batch, s.allocator.num_pages)
    dv = dl.views(np.zeros(dl.total, np.int32))
    pv = pl.views(np.zeros(pl.total, np.int32))
    steps = 0
    while s.has_work:
        admitted = s.admit()
        if admitted:
            fill_prefill(admitted, PS, pv)
            s.record(admitted, [token_of(r, 0) for r in admitted], prefill=True)
        if s.active:
            rows = s.decode_rows(padded)
            n_pages = fill_decode(rows, PS, dv)
            n = len(rows)
            lens = plan_checks.check_last_page_len(
                "kv_last_page_len", dv["kv_last_page_len"][:n], dv["kv_indptr"][: n + 1], PS, lengths=True
            )
            assert lens.tolist() == [1 if r is None else r.cached + 1 for r in rows]
            check_append_positions(
                dv["batch_indices"][:n],
                dv["positions"][:n],
                dv["kv_indices"][:n_pages],
                dv["kv_indptr"][: n + 1],
                dv["kv_last_page_len"][:n],
                PS,
                num_pages=s.allocator.num_pages,
            )
            held = [p for r in s.active for p in r.pages]
            assert len(held) == len(set(held)) and PAD_PAGE not in held  # no page shared between requests
            steps += 1
            s.record(rows, [0 if r is None else token_of(r, len(r.output)) for r in rows])
    return reqs, steps


@pytest.mark.parametrize("padded", [False, True])
def test_requests_finish_at_different_steps_and_free_their_pages(padded):
    s = make(num_pages=1 + 12, max_batch=3, eos=(500,))
    prompts = [[1] * 3, [2] * 16, [3] * 30, [4] * 7, [5] * 1]
    limits = [40, 5, 20, 33, 2]

    def token_of(r, i):  # request 3 emits eos as its 10th token
        return 500 if (r.rid == 3 and i == 9) else 100 + r.rid

    reqs, steps = run_simulation(s, prompts, limits, token_of, padded)
    assert [len(r.output) for r in reqs] == [40, 5, 20, 10, 2]
    assert [r.finish_reason for r in reqs] == ["length", "length", "length", "eos", "length"]
    assert reqs[3].output[-1] == 500
    assert s.allocator.num_free == s.allocator.capacity  # every page came back
    assert all(slot is None for slot in s.slots) and not s.pending
    assert steps >= 39


@pytest.mark.parametrize("ladder", [False, True])
@pytest.mark.parametrize("eos_at", [None, 9])
def test_the_step_prepared_ahead_equals_the_step_made_after_recording(eos_at, ladder):
    """The engine's graph loop prepares step n + 1 while step n runs (peek_rows, fill_decode(ahead=1)) and uses it
    when the slots are unchanged after recording step n, with step n's tokens as its input ids: its tables must
    equal the ones decode_rows + fill_decode make then, and no page may leak. ``ladder``: both cut to the rows of
    the smallest decode graph holding their requests, as the engine's serving loop cuts them (one graph per batch
    size of decode_batches)."""
    s = make(num_pages=1 + 12, max_batch=3, eos=(500,))
    batches = decode_batches(s.max_batch) if ladder else (s.max_batch,)
    cut = []  # the graph rows of each step
    prompts = [[1] * 3, [2] * 16, [3] * 30, [4] * 7, [5] * 1]
    limits = [40, 5, 20, 33, 2]
    reqs = [s.submit(p, m) for p, m in zip(prompts, limits, strict=True)]
    layout = decode_layout(s.max_batch, s.allocator.num_pages + s.max_batch)
    now = layout.views(np.zeros(layout.total, np.int32))
    ahead = layout.views(np.zeros(layout.total, np.int32))
    peeked, used, steps = None, 0, 0

    def token_of(r):
        return 500 if (r.rid == 3 and len(r.output) == eos_at) else 100 + len(r.output)

    while s.has_work:
        admitted = s.admit()
        if admitted:
            s.record(admitted, [token_of(r) for r in admitted], prefill=True)
            peeked = None  # a prefill writes the ids buffer: nothing prepared survives it
        if not s.active:
            continue
        valid = peeked is not None and s.same_rows(peeked)
        rows = s.decode_rows(padded=True)  # allocates nothing after a valid peek: the pages came with it
        rows = rows[: s.graph_rows(rows, batches)]
        cut.append(len(rows))
        n_pages = fill_decode(rows, PS, now)
        if valid:
            used += 1
            assert rows == peeked
            n = len(rows)
            ids = [0 if r is None else r.output[-1] for r in rows]
            assert [a for a, r in zip(ahead["token_ids"][:n], rows, strict=True) if r is not None] == [
                0 for r in rows if r is not None
            ]
            ahead["token_ids"][:n] = ids  # what the engine's device copy does (padding rows: any token)
            for name in ("token_ids", "positions", "batch_indices", "kv_last_page_len"):
                assert ahead[name][:n].tolist() == now[name][:n].tolist(), name
            assert ahead["kv_indptr"][: n + 1].tolist() == now["kv_indptr"][: n + 1].tolist()
            assert ahead["kv_indices"][:n_pages].tolist() == now["kv_indices"][:n_pages].tolist()
        tokens = [0 if r is None else token_of(r) for r in rows]
        peeked = s.peek_rows()
        peeked = peeked[: s.graph_rows(peeked, batches)]
        fill_decode(peeked, PS, ahead, ahead=1)
        s.record(rows, tokens)
        steps += 1
    assert [len(r.output) for r in reqs] == [40, 5, 20, 10 if eos_at else 33, 2]
    assert s.allocator.num_free == s.allocator.capacity  # every page came back, the ones given ahead too
    # only steps after an admission or an eos fall back (the ladder changes graphs as requests come and go, and the
    # prepared steps still serve: a request leaving at its token limit was foreseen by peek_rows)
    assert used >= steps - 8
    assert {1, 3} <= set(cut) if ladder else set(cut) == {3}


def test_decode_batches_double_up_to_max_batch():
    assert decode_batches(1) == (1,)
    assert decode_batches(2) == (1, 2)
    assert decode_batches(32) == (1, 2, 4, 8, 16, 32)
    assert decode_batches(48) == (1, 2, 4, 8, 16, 32, 48)
    for m in range(1, 300):
        ladder = decode_batches(m)
        assert ladder[-1] == m and list(ladder) == sorted(set(ladder))
        assert all(b <= 2 * a for a, b in itertools.pairwise(ladder))  # at most half a graph is padding
    with pytest.raises(ValueError, match="max_batch"):
        decode_batches(0)


def test_graph_rows_hold_the_last_occupied_slot():
    r = object()
    batches = (1, 2, 4, 8)
    assert Scheduler.graph_rows([r] + [None] * 7, batches) == 1
    assert Scheduler.graph_rows([None] * 8, batches) == 1  # nothing occupied: the smallest graph
    assert Scheduler.graph_rows([None, r] + [None] * 6, batches) == 2
    assert Scheduler.graph_rows([r, None, r] + [None] * 5, batches) == 4  # slot 2 needs 3 rows: the graph of 4
    assert Scheduler.graph_rows([None] * 4 + [r] + [None] * 3, batches) == 8
    assert Scheduler.graph_rows([None] * 7 + [r], batches) == 8
    with pytest.raises(ValueError, match="exceeds the largest decode graph"):
        Scheduler.graph_rows([None] * 8 + [r], batches)


def test_same_rows_of_a_cut_step_need_the_other_slots_empty():
    s = make(num_pages=1 + 12, max_batch=4)
    a, b = (s.submit([1] * 3, 10) for _ in range(2))
    s.admit()
    assert s.slots == [a, b, None, None]
    assert s.same_rows([a, b]) and s.same_rows([a, b, None]) and s.same_rows([a, b, None, None])
    assert not s.same_rows([a]) and not s.same_rows([b, a]) and not s.same_rows([a, b, None, None, None])
    c = s.submit([1] * 3, 10)
    s.admit()
    assert s.slots[2] is c and not s.same_rows([a, b])  # a request admitted past the cut rows


def test_a_request_that_fits_only_alone_waits_for_the_others():
    s = make(num_pages=1 + 4, max_batch=4)  # 4 usable pages
    reqs, _ = run_simulation(s, [[1] * 10, [2] * 10], [50, 50], lambda r, i: 7, padded=False)
    assert [len(r.output) for r in reqs] == [50, 50]


def test_max_new_tokens_one_finishes_at_prefill():
    s = make()
    reqs, steps = run_simulation(s, [[1, 2, 3]], [1], lambda r, i: 5, padded=True)
    assert reqs[0].output == [5] and steps == 0
    assert s.allocator.num_free == s.allocator.capacity


# ---------------------------------------------------------------------------------------------- config


BASE = LLAMA_SHAPE
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_config_llama31_rope_scaling_transformers4_style():
    c = LlamaConfig.from_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3, "eos_token_id": [1, 2]})
    assert c.rope == LLAMA31_ROPE
    assert c.head_dim == 64 and c.num_kv_heads == 4 and c.eos_token_ids == (1, 2)


def test_config_llama31_rope_parameters_transformers5_style():
    c = LlamaConfig.from_dict({**BASE, "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}})
    assert c.rope.llama3 and c.rope.theta == 500000.0 and c.rope.factor == 8.0


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"rope_scaling": None, "rope_theta": 10000.0},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    ],
)
def test_config_without_rope_scaling_is_plain_rope(extra):
    c = LlamaConfig.from_dict({**BASE, **extra})
    assert c.rope == RopeConfig(theta=10000.0)


def test_config_unsupported_rope_type_is_an_error():
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        LlamaConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="rope factor must be a finite number > 0"):
        LlamaConfig.from_dict({**BASE, "rope_scaling": {**LLAMA3, "factor": 0}})


def test_config_tied_embeddings_and_head_dim():
    assert LlamaConfig.from_dict({**BASE, "tie_word_embeddings": True}).tie_word_embeddings
    assert not LlamaConfig.from_dict(BASE).tie_word_embeddings  # transformers' default
    c = LlamaConfig.from_dict({**BASE, "head_dim": 128, "num_key_value_heads": None})
    assert c.head_dim == 128 and c.num_kv_heads == 16 and c.eos_token_ids == ()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden_size": None}, "missing 'hidden_size'"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
        ({"model_type": "mistral"}, "model_type 'mistral' is not a Llama-family type"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
        ({"eos_token_id": "x"}, "eos_token_id must be a token id"),
        ({"rope_scaling": [1]}, "rope_scaling must be an object"),
    ],
)
def test_config_errors_name_the_key(change, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_dict({**BASE, **change})


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json does not exist"):
        LlamaConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        LlamaConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="cannot read"):
        LlamaConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    assert LlamaConfig.from_dir(tmp_path).vocab_size == 32000


# ---------------------------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip_f16_and_bf16_bits(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 8)).astype(np.float16)
    bits = rng.integers(0, 1 << 16, size=(5,), dtype=np.uint16)
    write_safetensors(tmp_path / "model-00001.safetensors", {"a": a}, metadata={"format": "pt"})
    write_safetensors(
        tmp_path / "model-00002.safetensors", {"b": (bits, "bfloat16"), "empty": np.zeros((0, 4), np.float32)}
    )
    ck = Checkpoint(tmp_path)
    assert ck.info("a").dtype == "float16" and ck.info("b").dtype == "bfloat16"
    assert np.array_equal(ck.array("a", (3, 8)), a)
    got = ck.array("b")
    assert got.dtype == np.uint16 and np.array_equal(got, bits)
    assert ck.array("empty").shape == (0, 4)
    with pytest.raises(ValueError, match=r"tensor 'a' has shape \[3, 8\], expected \[8, 3\]"):
        ck.array("a", (8, 3))
    with pytest.raises(ValueError, match="has no tensor 'lm_head.weight'"):
        ck.array("lm_head.weight")


def test_safetensors_damaged_files_are_value_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"w": np.ones((4, 4), np.float16)})
    good = path.read_bytes()
    path.write_bytes(good[:-1])
    with pytest.raises(ValueError, match="do not hold"):
        read_header(path)
    path.write_bytes(good[:5])
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(path)
    path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="does not fit the file"):
        read_header(path)
    path.write_bytes((4).to_bytes(8, "little") + b"\xff\xff\xff\xff")
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        read_header(path)
    header = json.dumps({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 2]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0")
    with pytest.raises(ValueError, match="unsupported dtype 'F99'"):
        read_header(path)
    header = json.dumps({"w": {"dtype": "F16", "shape": [-1], "data_offsets": [0, 2]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0")
    with pytest.raises(ValueError, match="shape must be a list of non-negative integers"):
        read_header(path)


def test_checkpoint_needs_safetensors_files_and_unique_names(tmp_path):
    with pytest.raises(ValueError, match=r"no \*.safetensors file"):
        Checkpoint(tmp_path)
    write_safetensors(tmp_path / "a.safetensors", {"w": np.ones(2, np.float16)})
    write_safetensors(tmp_path / "b.safetensors", {"w": np.ones(2, np.float16)})
    with pytest.raises(ValueError, match="tensor 'w' is in both a.safetensors and b.safetensors"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ("{not json", r"index\.json is not a readable index \(JSONDecodeError: .*\); expected a JSON object with a"),
        ("[]", r"is not a readable index \(TypeError: .*\); expected a JSON object"),
        ('{"metadata": {}}', r"is not a readable index \(KeyError: 'weight_map'\)"),
        ('{"weight_map": []}', r"is not a readable index \(AttributeError: .*\)"),
        ("[" * 100_000, r"is not a readable index \(RecursionError: .*\)"),
        (
            '{"weight_map": {"w": "a.safetensors", "x": "b.safetensors", "y": "c.safetensors"}}',
            r"lacks 2 of the 3 files its model\.safetensors\.index\.json names \(b\.safetensors, c\.safetensors\); "
            r"download them",
        ),
    ],
)
def test_checkpoint_files_are_checked_against_the_index(tmp_path: Path, index: str, message: str) -> None:
    write_safetensors(tmp_path / "a.safetensors", {"w": np.ones(2, np.float16)})
    assert Checkpoint.files(tmp_path) == [tmp_path / "a.safetensors"]  # no index: the files there
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"w": "a.safetensors"}}')
    assert Checkpoint.files(tmp_path) == [tmp_path / "a.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=rf"^model: {re.escape(str(tmp_path))}.*{message}"):
        Checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------- no torch


def test_engine_path_never_imports_torch(tmp_path):
    """Import the engine and its CLI entry, parse a checkpoint, run the host loop: no ``import torch`` is even
    attempted (a meta-path hook records attempts, so this bites whether or not torch is installed)."""
    write_safetensors(tmp_path / "model.safetensors", {"model.embed_tokens.weight": np.zeros((8, 4), np.float16)})
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "rope_scaling": LLAMA3}))
    code = TORCH_SPY + textwrap.dedent(f"""
        import fi_engine.models.llama, fi_engine.kernels.flashinfer, fi_ffi.cli
        from fi_engine import paging
        from fi_engine.checkpoint.safetensors import Checkpoint
        from fi_engine.checkpoint.config import LlamaConfig
        cfg = LlamaConfig.from_dir({str(tmp_path)!r})
        Checkpoint({str(tmp_path)!r}).array("model.embed_tokens.weight", (8, 4))
        s = paging.Scheduler(paging.PageAllocator(9), 16, 2, 64, 64, cfg.vocab_size, ())
        import numpy as np
        layout = paging.decode_layout(2, 16)
        v = layout.views(np.zeros(layout.total, np.int32))
        for p in ([1, 2, 3], [4] * 20):
            s.submit(p, 4)
        reqs = s.admit()
        s.record(reqs, [5, 6], prefill=True)
        while s.active:
            rows = s.decode_rows(True)
            paging.fill_decode(rows, 16, v)
            s.record(rows, [7] * len(rows))
        assert "torch" not in sys.modules, "torch was imported"
        assert not attempts, attempts
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_generate_reports_a_missing_checkpoint(tmp_path, capsys):
    from fi_engine import cli

    assert cli.main(["generate", "--model", str(tmp_path), "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "fi-engine generate: model_dir:" in err and "config.json does not exist" in err


@pytest.mark.parametrize("ids", ["1,x", ",", ""])
def test_cli_generate_rejects_malformed_prompt_ids(ids, capsys):
    from fi_ffi import cli

    assert cli.main(["generate", "--model", "m", "--prompt-ids", ids]) == 2  # a usage error, no traceback
    assert "--prompt-ids" in capsys.readouterr().err


def test_kv_lengths_are_each_rows_tokens_from_the_page_table() -> None:
    # requests at positions 0, 15, 16 and 40 (1, 16, 17 and 41 tokens with the one fed) and a padding row, page 16
    ps = 16
    rows = [  # (each request's pages just cover its tokens, as the scheduler gives them)
        Request(rid=i, prompt=(5,) * n, max_new_tokens=4, budget_pages=3, output=[9], pages=list(range(1, n // ps + 2)))
        for i, n in enumerate((0, 15, 16, 40))
    ]
    v = decode_layout(8, 64).views(np.zeros(decode_layout(8, 64).total, np.int32))
    fill_decode([*rows, None], ps, v)
    out = np.full(8, -7, np.int32)
    lens = kv_lengths(v["kv_indptr"], v["kv_last_page_len"], 5, ps, out)
    assert lens.tolist() == [1, 16, 17, 41, 1] and lens.base is out and out[5:].tolist() == [-7] * 3
