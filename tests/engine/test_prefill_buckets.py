"""Bucketed prefill graphs of the Llama engine, no GPU: the bucket ladder, the padding request's index arrays (checked
value by value and with fi_ffi's own host validators), the graph keys, eviction, and the fallback to an eager
pass when a capture fails.

The engine-level tests run the loop's ``Passes.prefill``, the runner's ``StepGraphs`` (``_prefill_graph``,
``_capture_prefill``) and :class:`fi_engine.kernels.graph.CudaGraph` as they are, on an engine object made without its
constructor (which needs a GPU): only what touches the device is replaced (the forward pass, the plan, the head, the
token fetch, CuPy's copy) by recorders. The CUDA runtime is either the real one (cuda.bindings: with no driver every
capture fails at ``cudaStreamBeginCapture``) or a small stand-in that models capture mode and the thread's last error.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from helpers.fake_cuda_graphs import FakeRuntime

import fi_engine.kernels.graph as graph_module
from fi_engine.models import llama
from fi_engine.models.llama import Llama, LlamaEngine
from fi_engine.runtime.passes import Passes
from fi_engine.runtime.sample.speculator import Speculator
from fi_engine.runtime.sched.pages import PAD_PAGE, PageAllocator, pages_for
from fi_engine.runtime.sched.scheduler import Scheduler
from fi_engine.runtime.sched.step_arrays import fill_prefill, pad_prefill, prefill_layout
from fi_engine.runtime.worker import step_graphs
from fi_engine.runtime.worker.graph_shapes import bucket_for, prefill_buckets, prefill_slots
from fi_engine.runtime.worker.model_runner import ModelRunner
from fi_engine.runtime.worker.step_graphs import StepGraphs
from fi_engine.runtime.worker.step_io import StepIO
from fi_ffi.errors import CudaError
from fi_ffi.ops.attention import host_index as plan_checks
from fi_ffi.ops.page import check_append_positions, get_batch_indices_positions

PS = 16

# ---------------------------------------------------------------------------------------------- the ladder


def test_ladder_doubles_to_256_then_takes_quarter_octaves_up_to_the_buffer_rows():
    assert prefill_buckets(2048) == (16, 32, 64, 128, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536,
                                     1792, 2048)  # fmt: skip
    assert prefill_buckets(4096)[-5:] == (2048, 2560, 3072, 3584, 4096)
    assert prefill_buckets(300) == (16, 32, 64, 128, 256, 300)  # the last bucket is the engine's max rows
    assert prefill_buckets(16) == (16,)
    assert prefill_buckets(5) == (5,)


@pytest.mark.parametrize("top", [1, 7, 16, 17, 100, 255, 256, 257, 1000, 2048, 3000, 8192, 32768])
def test_ladder_properties(top):
    b = prefill_buckets(top)
    assert b[-1] == top and list(b) == sorted(set(b))
    for lo, hi in itertools.pairwise(b):
        if hi == top:
            continue  # the last step is cut at the buffer rows
        assert hi <= 2 * lo, (lo, hi)
        if lo >= 256:
            assert hi <= 1.25 * lo, (lo, hi)  # at most a quarter of the rows padded where GEMM time grows with rows
    # every row count maps to the smallest bucket holding it
    for rows in range(1, top + 1, max(1, top // 97)):
        k = bucket_for(rows, b)
        assert k >= rows and all(x < rows for x in b if x < k)


def test_bucket_for_boundaries_and_overflow():
    b = prefill_buckets(2048)
    assert [bucket_for(n, b) for n in (1, 16, 17, 256, 257, 320, 321, 2000, 2048)] == [
        16, 16, 32, 256, 320, 320, 384, 2048, 2048,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="2049 token rows exceed the largest prefill bucket 2048"):
        bucket_for(2049, b)


@pytest.mark.parametrize(
    ("rows", "buckets", "match"),
    [
        (16, [], "buckets: expected a non-empty sequence"),
        (16, (32, 16), "buckets: expected strictly ascending"),
        (16, (0, 16), "buckets: expected strictly ascending"),
        (16, (16.0, 32), r"buckets\[0\]: expected an int"),
        (0, (16,), "rows: expected at least 1 token row"),
        (1.5, (16,), "rows: expected an int"),
        (None, (16,), "rows: expected an int"),
    ],
)
def test_bucket_for_refuses_a_bad_ladder_or_row_count_by_name(rows, buckets, match):
    # an unsorted or float ladder would give a bucket below the rows (or a float one) without a word
    with pytest.raises((TypeError, ValueError), match=match):
        bucket_for(rows, buckets)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "16"])
def test_ladder_rejects_a_bad_size(bad):
    with pytest.raises((TypeError, ValueError), match="max_tokens"):
        prefill_buckets(bad)


# ---------------------------------------------------------------------------------------------- padding request


def scheduler(max_batch=4, num_pages=64, max_prefill_tokens=512):
    return Scheduler(PageAllocator(num_pages), PS, max_batch, 1024, max_prefill_tokens, 1000)


def padded_tables(lens, bucket, max_batch=4, num_pages=64, max_tokens=512):
    s = scheduler(max_batch, num_pages, max_tokens)
    reqs = [s.submit(list(range(10 * i + 1, 10 * i + 1 + n)), 4) for i, n in enumerate(lens)]
    assert s.admit() == reqs
    layout = prefill_layout(max_tokens, max_batch, num_pages + max_batch, padded=True)  # as the engine sizes it
    v = layout.views(np.full(layout.total, -7, np.int32))  # -7: never written
    nnz, pages = fill_prefill(reqs, PS, v)
    total = pad_prefill(v, nnz, bucket, len(reqs), pages, PS)
    return reqs, v, nnz, pages, total


def check_with_fi_ffi(v, batch, rows, pages):
    """fi_ffi's host validators (the plan's and the append's) accept the padded tables of ``batch`` requests."""
    qo, kv, last = v["qo_indptr"][: batch + 1], v["kv_indptr"][: batch + 1], v["kv_last_page_len"][:batch]
    plan_checks.check_indptr("qo_indptr", qo)
    seq = plan_checks.check_last_page_len("kv_last_page_len", last, kv, PS, lengths=True)
    bi, po = get_batch_indices_positions(qo, seq)
    assert np.array_equal(bi, v["batch_indices"][:rows]) and np.array_equal(po, v["positions"][:rows])
    check_append_positions(bi, po, v["kv_indices"][:pages], kv, last, PS, num_pages=64)
    return seq


def test_padding_request_fills_the_bucket_on_the_padding_page():
    reqs, v, nnz, pages, total = padded_tables([3, 20], 32)
    a, b = reqs
    assert (nnz, pages) == (23, 3)
    assert total == 4  # 9 padding rows: one padding-page entry
    assert v["qo_indptr"][:4].tolist() == [0, 3, 23, 32]
    assert v["kv_indptr"][:4].tolist() == [0, 1, 3, 4]
    assert v["kv_last_page_len"][:3].tolist() == [3, 4, 9]
    assert v["kv_indices"][:4].tolist() == [*a.pages, *b.pages, PAD_PAGE]
    assert v["token_ids"][:32].tolist() == [*a.prompt, *b.prompt] + [0] * 9
    assert v["positions"][:32].tolist() == [0, 1, 2, *range(20), *range(9)]
    assert v["batch_indices"][:32].tolist() == [0] * 3 + [1] * 20 + [2] * 9
    assert v["last_rows"][:2].tolist() == [2, 22]  # the real requests' last rows only
    assert v["last_rows"][2] == -7 and v["qo_indptr"][4] == -7  # nothing beyond the padding request written
    assert check_with_fi_ffi(v, 3, 32, total).tolist() == [3, 20, 9]  # kv_len == qo_len for every request
    assert PAD_PAGE not in a.pages + b.pages


def test_padding_request_over_several_pages_repeats_the_padding_page():
    reqs, v, nnz, pages, total = padded_tables([5], 64)  # 59 padding rows: 4 entries of page 0, 11 in the last
    assert (nnz, pages, total) == (5, 1, 5)
    assert v["qo_indptr"][:3].tolist() == [0, 5, 64]
    assert v["kv_indptr"][:3].tolist() == [0, 1, 5]
    assert v["kv_last_page_len"][:2].tolist() == [5, 11]
    assert v["kv_indices"][:5].tolist() == [reqs[0].pages[0]] + [PAD_PAGE] * 4
    assert v["positions"][5:64].tolist() == list(range(59))
    assert check_with_fi_ffi(v, 2, 64, total).tolist() == [5, 59]


def test_a_prompt_that_fills_its_bucket_gets_an_empty_padding_request():
    _, v, nnz, pages, total = padded_tables([16, 16], 32)  # the plan's batch (and the graph's key) stays B + 1
    assert (nnz, pages, total) == (32, 2, 2)
    assert v["qo_indptr"][:4].tolist() == [0, 16, 32, 32]
    assert v["kv_indptr"][:4].tolist() == [0, 1, 2, 2]
    assert v["kv_last_page_len"][:3].tolist() == [16, 16, 0]  # 0: a request without pages
    assert check_with_fi_ffi(v, 3, 32, total).tolist() == [16, 16, 0]


def unpadded_tables():
    """The tables fill_prefill writes for prompts of 3 and 20 tokens in an engine's padded layout (512 rows, 4
    requests, 68 pages; -7 where nothing is written): ``(views, nnz, pages)``, not yet padded."""
    s = scheduler()
    reqs = [s.submit(list(range(1, 1 + n)), 4) for n in (3, 20)]
    assert s.admit() == reqs
    layout = prefill_layout(512, 4, 64 + 4, padded=True)
    v = layout.views(np.full(layout.total, -7, np.int32))
    nnz, pages = fill_prefill(reqs, PS, v)
    return v, nnz, pages


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(bucket=513), r"bucket: expected an int in \[0, 512\]"),  # past the layout's token rows
        (dict(nnz=22), r"nnz: 22 rows, but qo_indptr\[2\] .* is 23"),
        (dict(pages=4), r"pages: 4 ids, but kv_indptr\[2\] .* is 3"),
        (dict(batch=5), r"batch: expected an int in \[0, 4\]"),
        (dict(batch=-1), r"batch: expected an int in \[0, 4\]"),
        (dict(page_size=0), "page_size"),
        (dict(bucket=32.0), "bucket: expected an int"),
    ],
)
def test_padding_refuses_what_would_write_past_the_layout_or_disagree_with_fill_prefill(change, match):
    # unchecked, these wrote past the views (numpy slices stop silently) or put the padding request in a real one's
    v, nnz, pages = unpadded_tables()
    before = {k: a.copy() for k, a in v.items()}
    args = {**dict(nnz=nnz, bucket=32, batch=2, pages=pages, page_size=PS), **change}
    with pytest.raises((TypeError, ValueError), match=match):
        pad_prefill(v, **args)
    assert all(np.array_equal(before[k], v[k]) for k in v)  # nothing written


def test_empty_requests_pad_the_request_count_to_the_slots():
    v, nnz, pages = unpadded_tables()
    total = pad_prefill(v, nnz, 32, 2, pages, PS, requests=5)  # 4 slots (the layout's max_batch) + padding
    assert total == 4
    assert v["qo_indptr"][:6].tolist() == [0, 3, 23, 32, 32, 32]
    assert v["kv_indptr"][:6].tolist() == [0, 1, 3, 4, 4, 4]
    assert v["kv_last_page_len"][:5].tolist() == [3, 4, 9, 0, 0]  # the empty requests: no page
    assert check_with_fi_ffi(v, 5, 32, total).tolist() == [3, 20, 9, 0, 0]
    with pytest.raises(ValueError, match=r"requests: expected an int in \[3, 5\]"):
        pad_prefill(v, nnz, 32, 2, pages, PS, requests=6)  # past the layout's requests
    with pytest.raises(ValueError, match=r"requests: expected an int in \[3, 5\]"):
        pad_prefill(v, nnz, 32, 2, pages, PS, requests=2)  # fewer than the real ones and the padding request


@pytest.mark.parametrize(
    ("batch", "max_batch", "slots"),
    [(1, 64, 1), (2, 64, 3), (3, 64, 3), (4, 64, 7), (7, 64, 7), (8, 64, 15), (33, 64, 63), (64, 64, 64), (5, 6, 6)],
)
def test_prefill_slots_are_a_power_of_two_less_one_up_to_max_batch(batch, max_batch, slots):
    assert prefill_slots(batch, max_batch) == slots


@pytest.mark.parametrize(
    ("args", "match"),
    [((0, 4), "batch: expected an int"), ((5, 4), "batch: 5 requests exceed max_batch 4"), ((1, 0), "max_batch")],
)
def test_prefill_slots_refuse_a_bad_count(args, match):
    with pytest.raises(ValueError, match=match):
        prefill_slots(*args)


def test_padding_fits_the_engine_layout_at_its_limits():
    # a full batch of one-token prompts padded to the largest bucket: the most requests and padding pages at once
    max_batch, max_tokens = 4, 512
    _, v, nnz, pages, total = padded_tables([1] * max_batch, max_tokens, max_batch, 64, max_tokens)
    assert total == pages + pages_for(max_tokens - nnz, PS)
    assert v["qo_indptr"][max_batch + 1] == max_tokens
    check_with_fi_ffi(v, max_batch + 1, max_tokens, total)
    with pytest.raises(ValueError, match="bucket: 3 rows cannot hold the prefill's 4 token rows"):
        pad_prefill(v, 4, 3, max_batch, pages, PS)


# ---------------------------------------------------------------------------------------------- the engine's path


class Recorder:
    """The engine's device work, recorded: each forward pass (rows, eager or in capture), plans, syncs."""

    def __init__(self, rt: FakeRuntime | None) -> None:
        self.rt = rt
        self.forwards: list[tuple[int, bool]] = []
        self.adapters: list[bool] = []  # per forward pass: whether it took the LoRA adapters' launches (step_lora)
        self.plans: list[dict] = []
        self.syncs = 0
        self.refuse_in_capture = False


def bare_engine(rt: FakeRuntime | None, max_batch=4, max_tokens=512):
    """A LlamaEngine without its constructor, over a ModelRunner without its own: the host state the loop's _prefill and
    the runner's run_prefill read, recorders for the device work."""
    e = LlamaEngine.__new__(LlamaEngine)
    r = e.runner = ModelRunner.__new__(ModelRunner)
    r.family = Llama()
    r.num_pages = num_pages = pages_for(max_tokens, PS) + max_batch + 1
    rec = Recorder(rt)
    r.prefill_graphs = True
    r.moe_layers = []
    r.comm = None
    r.page_size = PS
    r.max_batch = max_batch
    r.max_prefill_tokens = max_tokens
    r.prefill_buckets = prefill_buckets(max_tokens)
    r.step_graphs = StepGraphs(r)
    r.prefill_graph_failures = {}
    e.passes = Passes(e)  # (no decode step staged ahead)
    e.speculator = Speculator(e)  # (no speculation)
    r.stream_ptr = 1234
    r.config = SimpleNamespace(hidden_size=8, vocab_size=1000)
    io = r.io = StepIO.__new__(StepIO)  # the step arrays' host side, its device buffers stood in for
    io.runner = r
    io.prefill_layout = prefill_layout(max_tokens, max_batch, num_pages + max_batch, padded=True)
    io._prefill_host = np.zeros(io.prefill_layout.total, np.int32)
    r.prefill_arrays = io.prefill_arrays = io.prefill_layout.views(io._prefill_host)
    io.prefill_meta = SimpleNamespace(data=SimpleNamespace(ptr=0x1000))
    r.buffers = SimpleNamespace(
        last=SimpleNamespace(data=SimpleNamespace(ptr=0x2000)), ids=SimpleNamespace(data=SimpleNamespace(ptr=0x2400))
    )
    r.normed = SimpleNamespace(data=SimpleNamespace(ptr=0x2800))
    copies: list[int] = []
    r.cupy = SimpleNamespace(
        cuda=SimpleNamespace(
            runtime=SimpleNamespace(memcpyAsync=lambda dst, src, n, kind, s: copies.append(n)),
            using_allocator=lambda allocator: contextlib.nullcontext(),
        )
    )
    r.stream = SimpleNamespace(synchronize=lambda: setattr(rec, "syncs", rec.syncs + 1))

    def forward(v, rows, attention):
        capturing = rt is not None and rt.capturing
        if capturing and rec.refuse_in_capture:
            rt.refuse_launch()
            raise CudaError("cudaLaunchKernel", 901, "cudaErrorStreamCaptureInvalidated", "operation not permitted", "")
        rec.forwards.append((rows, capturing))
        rec.adapters.append(r.step_lora is not None)

    def plan(batch, cuda_graph):
        ph = r.prefill_arrays
        qo = ph["qo_indptr"][: batch + 1].copy()
        kv = ph["kv_indptr"][: batch + 1].copy()
        last = ph["kv_last_page_len"][:batch].copy()
        plan_checks.check_indptr("qo_indptr", qo)  # what the plan call checks first
        plan_checks.check_last_page_len("kv_last_page_len", last, kv, PS, lengths=True)
        rec.plans.append({"batch": batch, "qo": qo.tolist(), "cuda_graph": cuda_graph})
        # a CUDA-graph plan's schedule vector depends on (total rows, batch) only (FlashInfer's scheduler)
        r.prefill_plan = SimpleNamespace(info=(int(qo[-1]), batch, int(cuda_graph)))

    r.forward = forward
    r.plan_prefill = lambda batch: plan(batch, False)
    r.plan_prefill_padded = lambda batch: plan(batch, True)
    r.view = lambda kind, rows, batch: SimpleNamespace(kind=kind, rows=rows, batch=batch, last_rows=0x3000)
    r.dense = SimpleNamespace(rows=SimpleNamespace(gather_rows=lambda *a: None))
    r.head = lambda rows, x: None
    e.sampler = SimpleNamespace(pick=lambda v, rows, sampling: False, share_ids=lambda sampled: None)
    io._ids_host = np.full(max_batch, 7, np.int32)  # the tokens the pass "chose", one per slot
    io._prefill_done = SimpleNamespace(record=lambda stream: None)
    e.scheduler = Scheduler(PageAllocator(r.num_pages), PS, max_batch, max_tokens + 2, max_tokens, 1000)
    return e, rec


def prefill(e, lens, lora_slots=None):
    """One engine prefill of prompts of ``lens`` tokens (through the real _prefill); ``lora_slots``: each prompt's
    LoRA adapter slot (-1: the base model; None: every prompt the base model's)."""
    s = Scheduler(PageAllocator(e.num_pages), PS, e.max_batch, e.max_prefill_tokens + 2, e.max_prefill_tokens, 1000)
    reqs = [s.submit([1 + i] * n, 2) for i, n in enumerate(lens)]
    assert s.admit() == reqs
    for r, slot in zip(reqs, lora_slots or [-1] * len(reqs), strict=True):
        r.lora_slot = slot  # (as the scheduler's admission gives it, from the engine's adapters)
    e.passes.prefill(s, reqs)
    assert [r.output for r in reqs] == [[7]] * len(reqs)


@pytest.fixture
def fake_rt(monkeypatch):
    rt = FakeRuntime()
    monkeypatch.setattr(graph_module, "_rt", lambda: rt)
    return rt


def test_lengths_in_one_bucket_replay_the_graph_captured_at_the_first(fake_rt):
    e, rec = bare_engine(fake_rt)
    for n in (20, 32, 17, 25):  # all in bucket 32
        prefill(e, [n])
    assert rec.forwards == [(32, True)]  # captured once, at the first sight; no eager pass
    # (bucket, requests, *the plan's schedule vector, a row takes a LoRA adapter)
    assert list(e.runner.step_graphs.prefill_cache) == [(32, 1, 32, 2, 1, False)]
    assert len(fake_rt.launched) == 4 and len(set(fake_rt.launched)) == 1
    # every plan: the padding request appended (batch 2), the rows ending at the bucket, a CUDA-graph plan
    assert [p["qo"] for p in rec.plans] == [[0, 20, 32], [0, 32, 32], [0, 17, 32], [0, 25, 32]]
    assert all(p["batch"] == 2 and p["cuda_graph"] for p in rec.plans)
    prefill(e, [33])  # a new bucket: a second graph
    prefill(e, [5, 6])  # two requests in bucket 16: a graph of 3 request slots (the third one empty)
    assert list(e.runner.step_graphs.prefill_cache) == [
        (32, 1, 32, 2, 1, False),
        (64, 1, 64, 2, 1, False),
        (16, 3, 16, 4, 1, False),
    ]
    assert rec.plans[-1] == {"batch": 4, "qo": [0, 5, 11, 16, 16], "cuda_graph": True}
    launched = len(fake_rt.launched)
    prefill(e, [2, 3, 4])  # three requests in bucket 16: the same graph, every slot real
    assert rec.forwards == [(32, True), (64, True), (16, True)] and len(fake_rt.launched) == launched + 1
    assert rec.plans[-1] == {"batch": 4, "qo": [0, 2, 5, 9, 16], "cuda_graph": True}
    assert list(e.runner.step_graphs.prefill_cache)[-1] == (16, 3, 16, 4, 1, False)
    assert not e.prefill_graph_failures


class StandInSlots:
    """The runner's LoRA slots as run_prefill asks them: whether a pass takes the segment form (``segment``: every
    pass of more than ``min_rows`` rows), and the row slots it is told before and after an eager pass."""

    def __init__(self, segment: bool = False, min_rows: int = 64) -> None:
        self.segment, self.min_rows, self.told = segment, min_rows, []

    def takes_segment_form(self, rows):
        return self.segment and rows > self.min_rows

    def begin_step(self, slots):
        self.told.append(None if slots is None else slots.tolist())


def test_a_prefill_takes_the_adapters_launches_only_where_a_row_takes_one_and_its_graph_is_keyed_by_it(fake_rt):
    e, rec = bare_engine(fake_rt)
    e.runner.lora = StandInSlots()  # an engine serving adapters (the pass reads the runner's step_lora)
    for slots in ([-1], [0], [-1], [0], [-1, 2]):
        prefill(e, [20] * len(slots), slots)
    # a graph captured with the adapters' launches and one without, each replayed by the prefills of its kind
    assert rec.forwards == [(32, True), (32, True), (64, True)] and rec.adapters == [False, True, True]
    assert list(e.runner.step_graphs.prefill_cache) == [
        (32, 1, 32, 2, 1, False), (32, 1, 32, 2, 1, True), (64, 3, 64, 4, 1, True),
    ]  # fmt: skip
    assert fake_rt.launched[2] == fake_rt.launched[0] != fake_rt.launched[1] == fake_rt.launched[3]
    e.runner.prefill_graphs = False  # eagerly: the same choice
    for slots in ([-1, -1], [-1, 1]):
        prefill(e, [20] * len(slots), slots)
    assert rec.forwards[-2:] == [(40, False), (40, False)] and rec.adapters[-2:] == [False, True]


def test_a_prefill_in_the_adapters_segment_form_runs_eagerly_told_its_row_slots(fake_rt):
    e, rec = bare_engine(fake_rt)
    e.runner.lora = lora = StandInSlots(segment=True, min_rows=30)  # (DeviceSlots.prefill_segment_gemm on)
    prefill(e, [20], [1])  # 20 rows: not past min_rows, the graph as before
    prefill(e, [20, 20], [1, -1])  # 40 rows: eagerly, unpadded, the rows' slots told before the pass, None after
    assert rec.forwards == [(32, True), (40, False)]
    assert lora.told == [[1] * 20 + [-1] * 20, None]


def test_graphs_off_moe_and_failed_shapes_prefill_eagerly_unpadded(fake_rt):
    e, rec = bare_engine(fake_rt)
    e.prefill_graphs = False
    prefill(e, [20])
    e.prefill_graphs = True
    e.runner.moe_layers = [object()]  # MoE layers route on the host: never captured
    prefill(e, [21])
    assert rec.forwards == [(20, False), (21, False)]
    assert rec.plans == [
        {"batch": 1, "qo": [0, 20], "cuda_graph": False},
        {"batch": 1, "qo": [0, 21], "cuda_graph": False},
    ]
    assert not e.runner.step_graphs.prefill_cache and not fake_rt.launched


def test_a_capture_refused_midway_falls_back_to_the_same_pass_eagerly(fake_rt):
    e, rec = bare_engine(fake_rt)
    rec.refuse_in_capture = True
    with pytest.warns(RuntimeWarning, match=r"32 token rows and 1 request slots failed \(capture: CudaError: "):
        prefill(e, [20])
    # the padded pass ran eagerly right after, out of capture mode, with the thread's last error cleared
    assert rec.forwards == [(32, False)]
    assert not fake_rt.capturing and fake_rt.last_error == 0 and not fake_rt.live
    assert "cudaErrorStreamCaptureInvalidated" in e.prefill_graph_failures[(32, 1)]
    assert not e.runner.step_graphs.prefill_cache
    # that shape is eager (and unpadded) from now on, without a second warning; other shapes still capture
    rec.refuse_in_capture = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prefill(e, [25])
        prefill(e, [20, 1])
    assert rec.forwards == [(32, False), (25, False), (32, True)]
    assert rec.plans[1] == {"batch": 1, "qo": [0, 25], "cuda_graph": False}


def test_a_mixed_pass_whose_capture_failed_stays_eager_for_its_bucket_at_max_batch_slots(fake_rt):
    """A mixed pass (decoding requests riding in the prefill) pads its requests to max_batch slots: a failed capture
    is remembered under that shape, so the next mixed pass of the bucket, whatever its request count, runs eagerly
    without trying again."""
    e, rec = bare_engine(fake_rt, max_batch=4)
    s = Scheduler(PageAllocator(e.num_pages), PS, 4, e.max_prefill_tokens + 2, e.max_prefill_tokens, 1000)
    a = s.submit([1] * 5, 8)
    s.admit()
    s.record([a], [7], prefill=True)  # decoding: it rides in the next passes
    b = s.submit([2] * 20, 4)
    assert s.admit(reserve=1) == [b]
    rec.refuse_in_capture = True
    with pytest.warns(RuntimeWarning, match=r"32 token rows and 4 request slots failed \(capture: "):
        e.passes.prefill(s, [b], riders=[a])
    assert set(e.prefill_graph_failures) == {(32, 4)} and a.output == [7, 7] and b.output == [7]
    rec.refuse_in_capture = False
    c = s.submit([3] * 18, 4)
    assert s.admit(reserve=2) == [c]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e.passes.prefill(s, [c], riders=[a, b])  # 20 rows, 3 requests: the same bucket at max_batch slots
    assert rec.forwards[-1] == (20, False) and not e.runner.step_graphs.prefill_cache


def test_a_refused_instantiation_falls_back_and_frees_the_graph(monkeypatch):
    rt = FakeRuntime(instantiate_error=1)  # cudaErrorInvalidValue
    monkeypatch.setattr(graph_module, "_rt", lambda: rt)
    e, rec = bare_engine(rt)
    with pytest.warns(RuntimeWarning, match="cudaGraphInstantiate"):
        prefill(e, [40])
    assert rec.forwards == [(64, True), (64, False)]  # captured, not instantiated, then run eagerly
    assert not rt.live and rt.last_error == 0 and not e.runner.step_graphs.prefill_cache
    assert (64, 1) in e.prefill_graph_failures


@pytest.mark.cpu_only  # with a driver the capture starts, and the fake engine's host buffers would be captured
def test_without_a_driver_the_capture_fails_at_its_start_and_the_prefill_runs_eagerly():
    """The real cuda.bindings runtime on this GPU-less machine: cudaStreamBeginCapture fails."""
    pytest.importorskip("cuda.bindings.runtime")
    e, rec = bare_engine(None)
    with pytest.warns(RuntimeWarning, match=r"16 token rows and 1 request slots failed .*cudaStreamBeginCapture"):
        prefill(e, [3])
    assert rec.forwards == [(16, False)]
    assert set(e.prefill_graph_failures) == {(16, 1)} and not e.runner.step_graphs.prefill_cache


def test_graphs_are_bounded_and_the_least_recently_replayed_goes(fake_rt, monkeypatch):
    monkeypatch.setattr(step_graphs, "_PREFILL_GRAPHS", 16)  # the bound's rule, at fewer shapes than the real 64
    e, rec = bare_engine(fake_rt, max_batch=32, max_tokens=2048)
    keep = step_graphs._PREFILL_GRAPHS
    buckets = e.prefill_buckets
    assert len(buckets) >= keep
    for k in buckets[:keep]:
        prefill(e, [k])  # keep graphs: the cache is full
    prefill(e, [buckets[0] - 1])  # the first bucket replayed again: the second one is the oldest now
    assert rec.syncs == keep + 1 and len(fake_rt.launched) == keep + 1  # each prefill's tokens waited for once
    prefill(e, [1, 1])  # two new shapes (16 rows, 3 and 7 request slots) evict the second and third buckets
    prefill(e, [1, 1, 1, 1])
    cached = [key[:2] for key in e.runner.step_graphs.prefill_cache]
    assert len(cached) == keep
    assert (buckets[0], 1) in cached and (buckets[1], 1) not in cached and (buckets[2], 1) not in cached
    assert rec.syncs == keep + 3 + 2  # a replay may still run: the stream is waited for before each eviction
    assert len(fake_rt.live) == 2 * keep  # the evicted graphs were destroyed (graph + executable each)


def test_padded_prefill_views_describe_logits_and_tokens_of_the_real_requests_only():
    c = SimpleNamespace(
        num_qo_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32, intermediate_size=64, vocab_size=100
    )
    layout = prefill_layout(64, 4, 40, padded=True)
    names = ("h", "x", "qkv", "attn", "gu", "act", "logits", "ids", "meta")
    base = {name: 0x10000 * (i + 1) for i, name in enumerate(names)}
    v = llama.step_views(c, "float16", 0, base, layout, "padded prefill", 32, 5)  # 4 requests + the padding one
    assert v.q.shape == (32, 4, 8) and v.positions.shape == (32,)
    assert v.qo_indptr.shape == (6,) and v.kv_indptr.shape == (6,) and v.kv_last_page_len.shape == (5,)
    assert v.logits.shape == (4, 100) and v.ids.shape == (4,)  # the buffers hold max_batch (4) rows
    plain = llama.step_views(c, "float16", 0, base, layout, "prefill", 32, 4)
    assert plain.logits.shape == (4, 100) and plain.qo_indptr.shape == (5,)
    assert plain.last_rows == v.last_rows  # the last-row gather reads the same region either way


def test_a_failed_cuda_graph_plan_prefills_eagerly_unpadded(fake_rt):
    """E.g. FA2's split-KV scratch of a long bucket larger than the workspace: the plan call raises."""
    e, rec = bare_engine(fake_rt)
    padded_plan = e.runner.plan_prefill_padded

    def refuse(batch):
        raise RuntimeError("Out of workspace memory")

    e.runner.plan_prefill_padded = refuse
    failed = r"32 token rows and 1 request slots failed \(planning: RuntimeError: Out of"
    with pytest.warns(RuntimeWarning, match=failed):
        prefill(e, [20])
    assert rec.forwards == [(20, False)]  # the unpadded pass on the same device arrays (they begin alike)
    assert rec.plans == [{"batch": 1, "qo": [0, 20], "cuda_graph": False}]
    assert list(e.prefill_graph_failures) == [(32, 1)] and not fake_rt.live
    e.runner.plan_prefill_padded = padded_plan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prefill(e, [30])  # the same shape: eager, no second warning
        prefill(e, [40])  # another bucket: captured
    assert rec.forwards == [(20, False), (30, False), (64, True)]


def warm_engine():
    e, _ = bare_engine(None, max_batch=4, max_tokens=512)
    e._closed = False
    e.runner.max_seq_len = 300
    calls = []
    e.generate = lambda prompts, new, eos_token_ids=None: calls.append(([len(p) for p in prompts], new, eos_token_ids))
    e.runner.step_graphs.prefill_cache = {(64, 3, 7, 8): None, (512, 1, 9): None}  # what the prefills captured
    return e, calls


def test_warm_prefill_runs_one_prefill_of_dummy_prompts_per_length():
    e, calls = warm_engine()
    assert e.warm_prefill([40, 7], batch=3) == [(64, 3), (512, 1)]
    assert calls == [([14, 13, 13], 1, ()), ([3, 2, 2], 1, ())]
    e.warm_prefill([299])  # the most one request can hold with its token
    assert calls[-1] == ([299], 1, ())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([],), "lengths: expected a non-empty list"),
        (("64",), "lengths: expected a non-empty list"),
        ((64,), "lengths: expected a non-empty list"),
        (([16, 0],), r"lengths\[1\]: expected token rows in \[1, 299\]"),
        (([300],), r"lengths\[0\]: expected token rows in \[1, 299\] .*max_seq_len - 1 per request"),
        (([2.0],), r"lengths\[0\]"),
        (([True],), r"lengths\[0\]"),
        (([513], 2), r"lengths\[0\]: expected token rows in \[2, 512\]"),
        (([16], 0), r"batch: expected requests per prefill in \[1, 4\]"),
        (([16], 5), r"batch: expected requests per prefill in \[1, 4\]"),
        (([16], True), "batch"),
        (([1], 2), r"lengths\[0\]: expected token rows in \[2, "),
    ],
)
def test_warm_prefill_refuses_bad_arguments_by_name(args, match):
    e, calls = warm_engine()
    with pytest.raises(ValueError, match=match):
        e.warm_prefill(*args)
    assert not calls
    e._closed = True
    with pytest.raises(ValueError, match="engine: closed"):
        e.warm_prefill([16])


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ((16, 1024), r"prefill_buckets: expected strictly ascending token-row counts in \[1, 512\]"),  # past the rows
        ((16, 256), r"prefill_buckets: expected the last bucket to be max_prefill_tokens \(512\)"),  # 300 rows: none
        ((512, 16), "prefill_buckets: expected strictly ascending"),
        ((16.0, 512), r"prefill_buckets\[0\]: expected an int"),
        ([], "prefill_buckets: expected a non-empty sequence"),
        (None, "prefill_buckets: expected a non-empty sequence"),
        ("512", "prefill_buckets: expected a non-empty sequence"),
    ],
)
def test_the_engine_refuses_a_bucket_ladder_that_could_not_serve_every_prefill(bad, match):
    # a bucket past max_prefill_tokens would pad a prefill past the activation buffers' rows
    e, _ = bare_engine(None, max_tokens=512)
    with pytest.raises((TypeError, ValueError), match=match):
        e.prefill_buckets = bad
    assert e.prefill_buckets == prefill_buckets(512)  # unchanged
    e.prefill_buckets = [64, np.int64(300), 512]
    assert e.prefill_buckets == (64, 300, 512) and all(type(b) is int for b in e.prefill_buckets)


def test_fused_decode_takes_a_bool_only():
    e, _ = bare_engine(None)
    for value, expected in ((False, False), (True, True), (0, False), (1, True)):
        e.fused_decode = value
        assert e.fused_decode is expected
    for bad in ("no", None, 2, 1.0, np.bool_(False)):
        with pytest.raises(TypeError, match="fused_decode: expected a bool"):
            e.fused_decode = bad
    assert e.fused_decode is True  # unchanged


def test_warm_prefill_refuses_lengths_the_kv_cache_cannot_hold_at_once():
    # short of pages the scheduler would prefill fewer requests at a time: another (bucket, batch) captured
    e, calls = warm_engine()
    e.runner.num_pages = 10  # 9 pages for requests: 144 tokens of 16
    with pytest.raises(
        ValueError, match=r"lengths\[1\]: 200 token rows of 2 requests need 14 KV pages, the cache has 9"
    ):
        e.warm_prefill([64, 200], batch=2)
    assert not calls  # nothing run: every length is checked first
    e.warm_prefill([144])
    assert calls == [([144], 1, ())]
