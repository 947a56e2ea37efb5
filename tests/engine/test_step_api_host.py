"""The step API's host side, on CPU: :meth:`Scheduler.abort`, per-request end-of-sequence ids and sampling in the
scheduler, how a step's rows choose their tokens (:func:`fi_engine.runtime.sample.sampler.draw_groups`), the argument
checks of ``add_request`` / ``abort_request`` / ``generate``, and the engine's ``step`` / ``generate`` loop itself
(:meth:`ServingLoop._advance`) with only the device work stood in for: ``_prefill`` and ``_decode_step`` record tokens
of a fixed rule through the real scheduler. The same on a GPU: tests/engine/test_gpu_step_api.py."""

from __future__ import annotations

import contextlib
import inspect
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from fi_engine.models.deepseek import DeepSeekEngine
from fi_engine.models.gemma2 import Gemma2Engine
from fi_engine.models.gpt_oss import GptOssEngine
from fi_engine.models.llama import LlamaEngine
from fi_engine.runtime import passes, serving
from fi_engine.runtime.engine import Engine
from fi_engine.runtime.sample.logits_processing import LogitsProcessor
from fi_engine.runtime.sample.sampler import Draws, Sampler, draw_groups
from fi_engine.runtime.sample.speculation import DraftPolicy
from fi_engine.runtime.sample.speculator import Speculator
from fi_engine.runtime.sampling_params import SamplingParams, sampling_arg
from fi_engine.runtime.sched.kv_cache import KVCacheManager
from fi_engine.runtime.sched.pages import PageAllocator, pages_for
from fi_engine.runtime.sched.request import Request
from fi_engine.runtime.sched.scheduler import Scheduler
from fi_engine.runtime.sched.step_arrays import decode_layout, fill_decode, fill_prefill, prefill_layout
from fi_engine.runtime.stepping import StepEngine, StepOutput
from fi_engine.runtime.worker.graph_shapes import decode_batches

PS = 16
EOS = 999


def make(num_pages=1 + 16, max_batch=3, eos=(EOS,)):
    return Scheduler(PageAllocator(num_pages), PS, max_batch, 256, 512, 1000, eos)


# ---------------------------------------------------------------------------------------------- Scheduler.abort


def test_abort_of_an_active_request_frees_its_slot_and_pages_for_the_next_admission():
    s = make(num_pages=1 + 6, max_batch=2)
    a = s.submit([1] * 20, 30)  # budget ceil(49 / 16) = 4 pages
    b = s.submit([2] * 5, 10)  # budget 1
    c = s.submit([3] * 40, 9)  # budget 3: waits for a's budget
    assert s.admit() == [a, b]
    s.record([a, b], [7, 7], prefill=True)
    rows = s.decode_rows(padded=True)
    s.record(rows, [8, 8])
    assert s.admit() == []  # c does not fit beside a
    held = list(a.pages)
    assert s.abort(a) is True
    assert a.finish_reason == "abort" and a.slot == -1 and a.pages == [] and s.slots[0] is None
    assert s.allocator.num_free == s.allocator.capacity - len(b.pages)
    assert s.admit() == [c] and c.slot == 0  # a's slot, and a's pages among c's
    assert set(c.pages) & set(held)
    assert s.abort(a) is False and a.finish_reason == "abort"  # twice: nothing changes
    s.abort(b)
    s.abort(c)
    assert s.allocator.num_free == s.allocator.capacity and not s.has_work


def test_abort_of_a_queued_request_takes_it_out_of_the_queue_only():
    s = make(max_batch=1)
    a, b, c = (s.submit([i + 1] * 3, 4) for i in range(3))
    s.admit()
    free = s.allocator.num_free
    assert s.abort(b) is True
    assert list(s.pending) == [c] and b.finish_reason == "abort" and b.pages == []
    assert s.allocator.num_free == free and s.slots == [a]


def test_abort_of_a_finished_or_foreign_request_changes_nothing():
    s, other = make(), make()
    a = s.submit([1, 2], 1)
    s.admit()
    s.record([a], [5], prefill=True)  # max_new_tokens 1: finished at the prefill
    assert a.finish_reason == "length"
    assert s.abort(a) is False and a.finish_reason == "length"
    stranger = other.submit([1], 3)
    mine = s.submit([1], 3)
    assert s.abort(stranger) is False and stranger.finish_reason is None and list(other.pending) == [stranger]
    assert list(s.pending) == [mine]
    with pytest.raises(TypeError, match="request: expected a fi_engine.runtime.sched.request.Request, got int"):
        s.abort(3)  # type: ignore[arg-type]


def test_abort_after_peek_rows_gives_back_the_page_given_ahead_and_drops_the_prepared_step():
    s = make(num_pages=1 + 8, max_batch=2)
    a, b = s.submit([1] * 15, 20), s.submit([2] * 3, 20)
    s.admit()
    s.record([a, b], [7, 7], prefill=True)  # a: 15 cached, its next two tokens need a second page
    rows = s.decode_rows(padded=True)
    peeked = s.peek_rows()  # the step after this one: a gets its second page now
    assert len(a.pages) == 2
    s.record(rows, [8, 8])
    assert s.same_rows(peeked)
    s.abort(a)
    assert not s.same_rows(peeked)  # the prepared step is made again
    assert s.allocator.num_free == s.allocator.capacity - len(b.pages)
    assert s.decode_rows(padded=True) == [None, b]


@pytest.mark.parametrize("padded", [False, True])
def test_aborts_mid_run_leave_the_others_served_and_every_page_back(padded):
    s = make(num_pages=1 + 10, max_batch=3)
    reqs = [s.submit([i + 1] * (3 + 7 * i), 25) for i in range(5)]
    step = 0
    while s.has_work:
        admitted = s.admit()
        if admitted:
            s.record(admitted, [100] * len(admitted), prefill=True)
        if step == 4:
            s.abort(reqs[1])  # active
            s.abort(reqs[4])  # queued
        if s.active:
            rows = s.decode_rows(padded)
            fill_decode(rows, PS, _decode_views(s))  # the tables stay valid around the freed slot
            s.record(rows, [0 if r is None else 100 + len(r.output) for r in rows])
            held = [p for r in s.active for p in r.pages]
            assert len(held) == len(set(held))
        step += 1
    assert [r.finish_reason for r in reqs] == ["length", "abort", "length", "length", "abort"]
    assert [len(r.output) for r in reqs if r.finish_reason == "length"] == [25, 25, 25]
    assert s.allocator.num_free == s.allocator.capacity and s.sampled == 0


def _decode_views(s: Scheduler) -> dict[str, np.ndarray]:

    layout = decode_layout(s.max_batch, s.allocator.num_pages + s.max_batch)
    return layout.views(np.zeros(layout.total, np.int32))


# ---------------------------------------------------------------------------------------------- per request


def test_a_request_ends_at_its_own_eos_ids_or_the_schedulers():
    s = make(eos=(EOS,))
    own = s.submit([1, 2], 10, eos_token_ids=[5])
    none = s.submit([1, 2], 3, eos_token_ids=())
    default = s.submit([1, 2], 10)
    s.admit()
    s.record([own, none, default], [EOS, EOS, 5], prefill=True)
    assert own.finish_reason is None  # the scheduler's eos is not its
    assert none.finish_reason is None
    assert default.finish_reason is None  # 5 is not the scheduler's
    s.record(s.decode_rows(padded=False), [5, EOS, EOS])
    assert (own.finish_reason, none.finish_reason, default.finish_reason) == ("eos", None, "eos")


@pytest.mark.parametrize(
    ("eos", "match"),
    [
        (5, r"eos_token_ids: expected a list of token ids \(or None: the model's\), got 5"),
        ("2", "eos_token_ids: expected a list of token ids"),
        ([1, "2"], r"eos_token_ids\[1\]: expected a token id in \[0, 1000\) \(an int\), got '2'"),
        ([True], r"eos_token_ids\[0\]: expected a token id in \[0, 1000\)"),
        ([1000], r"eos_token_ids\[0\]: expected a token id in \[0, 1000\) \(an int\), got 1000"),
        ([-1], r"eos_token_ids\[0\]"),
        ([2.0], r"eos_token_ids\[0\]"),
        ([[2]], r"eos_token_ids\[0\]"),
    ],
)
def test_submit_refuses_bad_eos_ids_by_name_and_queues_nothing(eos, match):
    s = make()
    with pytest.raises(ValueError, match=match):
        s.submit([1, 2], 4, eos_token_ids=eos)
    assert not s.pending


def test_submit_keeps_sampling_only_for_sampled_requests_and_counts_them_while_active():
    s = make()
    greedy = s.submit([1], 5, sampling=SamplingParams())
    plain = s.submit([1], 5)
    hot = s.submit([1], 5, sampling=SamplingParams(temperature=0.7), draws="stream")
    assert greedy.sampling is None and greedy.draws is None and plain.sampling is None
    assert hot.sampling == SamplingParams(temperature=0.7) and hot.draws == "stream"
    assert s.sampled == 0  # queued requests are not counted
    s.admit()
    assert s.sampled == 1
    s.abort(hot)
    assert s.sampled == 0
    with pytest.raises(
        TypeError, match="sampling: expected a fi_engine.runtime.sampling_params.SamplingParams or None"
    ):
        s.submit([1], 5, sampling={"temperature": 1.0})  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [{"temperature": 1}, 0.5, "greedy", SamplingParams])
def test_sampling_arg_names_the_argument(bad):
    with pytest.raises(
        TypeError, match=r"^sampling: expected a fi_engine.runtime.sampling_params.SamplingParams or None"
    ):
        sampling_arg(bad)
    assert sampling_arg(None) is None


@pytest.mark.parametrize(
    ("seed", "error", "match"),
    [(-1, ValueError, "-1"), (1 << 64, ValueError, "18446744073709551616"),
     (1 << 200, ValueError, "an int of 201 bits"), (True, TypeError, "bool"), (1.0, TypeError, "float"),
     ("7", TypeError, "str")],
)  # fmt: skip
def test_sampling_params_refuse_a_bad_seed_by_name(seed, error, match):
    with pytest.raises(error, match=rf"^seed: expected None or an int in \[0, 2\*\*64\), got {match}$"):
        SamplingParams(temperature=1.0, seed=seed)
    assert SamplingParams(seed=(1 << 64) - 1).seed == (1 << 64) - 1
    assert SamplingParams().seed is None


# ---------------------------------------------------------------------------------------------- draw_groups


def _req(rid: int, sampling: SamplingParams | None = None, draws: Draws | None = None) -> Request:
    return Request(rid, (1,), 4, 1, sampling=sampling, draws=draws)


def test_draw_groups_all_greedy_rows_need_no_sampling():
    assert draw_groups([_req(0), None, _req(1)]) == (False, [])
    assert draw_groups([None, None]) == (False, [])


def test_draw_groups_one_shared_stream_and_parameters_over_every_real_row_is_the_single_call():
    shared = Draws.seeded(3, shared=True)
    p = SamplingParams(temperature=0.8, top_k=5)
    rows = [_req(0, p, shared), None, _req(1, p, shared)]  # padding rows do not count
    assert draw_groups(rows) == (True, [(shared, [0, 2])])
    # unequal parameters, a greedy row among them, or an own stream: the per-row calls
    assert draw_groups([_req(0, p, shared), _req(1, SamplingParams(temperature=0.9), shared)])[0] is False
    assert draw_groups([_req(0, p, shared), _req(1)]) == (False, [(shared, [0])])
    own = Draws.seeded(3, shared=False)
    assert draw_groups([_req(0, p, own)]) == (False, [(own, [0])])  # alone, but its draws must not depend on its row


def test_draw_groups_gathers_each_streams_rows_in_order_of_first_appearance():
    shared, a, b = Draws.seeded(0, True), Draws.seeded(1, False), Draws.seeded(2, False)
    hot = SamplingParams(temperature=1.0)
    rows = [_req(0, hot, b), _req(1), _req(2, hot, shared), None, _req(3, hot, shared), _req(4, hot, a)]
    uniform, groups = draw_groups(rows)
    assert not uniform
    assert [(g, idx) for g, idx in groups] == [(b, [0]), (shared, [2, 4]), (a, [5])]


def test_draws_made_from_a_seed_start_at_offset_zero():
    d = Draws.seeded(1234, shared=False)
    assert d.generator.get_state() == (1234, 0) and d.shared is False


# ---------------------------------------------------------------------------------------------- the engine's step


STEP_METHODS = ("add_request", "abort_request", "step")


@pytest.mark.parametrize("engine", [Engine, LlamaEngine, Gemma2Engine, GptOssEngine, DeepSeekEngine])
def test_every_engine_class_has_the_step_protocols_methods_and_signatures(engine):
    """isinstance(engine, StepEngine) needs an engine (a GPU: tests/engine/test_gpu_step_api.py); here the class's
    methods have the protocol's parameters (names, kinds, defaults) and has_unfinished is a property."""
    for name in STEP_METHODS:
        want = inspect.signature(getattr(StepEngine, name))
        got = inspect.signature(getattr(engine, name))
        shape = [(p.name, p.kind, p.default) for p in got.parameters.values()]
        assert shape == [(p.name, p.kind, p.default) for p in want.parameters.values()], name
    assert isinstance(inspect.getattr_static(engine, "has_unfinished"), property)


def bare_engine(max_batch=3, num_pages=1 + 16, token_of=None, overlap=False, pipelined=False, mixed=False):
    """An engine without its constructor (no GPU): the host state the step API reads, and the device work
    (``_prefill_launch`` / ``_prefill_finish``, ``_decode_step``, ``_decode_launch``) stood in for by
    ``token_of(request)`` recorded through the real scheduler. ``overlap``: its ``overlap_steps`` (a launched decode
    step's tokens, computed from the state at its launch, wait in its ``_LaunchedStep`` for the real
    ``_decode_finish``; a launched pass's, from the state at its launch, for the stand-in ``_prefill_finish``).
    ``pipelined``: a stand-in decode graph, so that the real ``ServingLoop.pipelined_decode`` logic runs: each
    launch prepares the next step (``peek_rows``) as the real one does, and a step launched ahead of the one in
    flight takes the tokens the device would give it (``token_of`` of the request as it will be after the steps
    before it). ``mixed``: its ``mixed_prefill`` (a prefill pass's riders are recorded as a decode step records
    them)."""
    e = LlamaEngine.__new__(LlamaEngine)
    e._closed = False
    # the runner's side the loop reads (the real one needs a GPU): its sizes, device, graphs and switches
    e.runner = SimpleNamespace(
        graph=object() if pipelined else None,
        decode_graph_batches=decode_batches(max_batch) if pipelined else (),  # the decode graphs' rows (the ladder)
        comm=None,
        family=SimpleNamespace(llama_pass=True),
        prepare_ahead=pipelined,  # as the real runner's with a decode graph: the step after a prefill prepared too
        staged_wait_s=0.0,
        config=SimpleNamespace(vocab_size=1000, eos_token_ids=(EOS,)),
        max_batch=max_batch,
        page_size=PS,
        num_pages=num_pages,
        max_seq_len=256,
        max_prefill_tokens=512,
        device=0,
        stream_ptr=0,
        cupy=SimpleNamespace(cuda=SimpleNamespace(Device=lambda d: contextlib.nullcontext())),
        stream=_Stream(),
        stage_decode_ahead=lambda rows, ahead: None,
    )
    e.kv_cache = KVCacheManager(num_pages, PS)
    e.scheduler = Scheduler(e.kv_cache, PS, max_batch, 256, 512, 1000, (EOS,))
    e.sampler = Sampler(None, None, SimpleNamespace(), device=0, stream_ptr=0, max_batch=max_batch, vocab_size=1000)
    e.processor = LogitsProcessor(np, np.zeros((max_batch, 1000), np.float32), 1000, frozenset({EOS}))
    e.model_dir = None  # (no checkpoint: no grammar served)
    e._start_loop()
    e.overlap_steps, e.mixed_prefill = overlap, mixed
    e._ffi_stream = contextlib.nullcontext()
    e.steps = []  # ("prefill", rids) / ("mixed", riders' rids, rids) / ("decode", rids) in the order they ran
    e.behind = 0  # prefill passes launched behind a decode step in flight
    e.graph_slots = []  # each prefill pass's graph_slots (the step API's: max_batch, the graphs warm_serving captures)
    rule = token_of or (lambda r: 100 + len(r.output))

    layout = prefill_layout(e.max_prefill_tokens, max_batch, num_pages + max_batch, padded=True)
    arrays = layout.views(np.zeros(layout.total, np.int32))
    pass_tokens: dict[int, list[int]] = {}  # a launched pass's tokens (by id), chosen from the state at its launch

    def prefill_launch(sched, reqs, riders=(), all_logits=False, behind=False, graph_slots=None):
        e.graph_slots.append(graph_slots)
        e.passes.next_rows = None  # as the real prefill: its tokens overwrite the ids a prepared step would read
        ahead = 1 if behind else 0  # behind a decode step in flight: the riders one token further
        if riders:  # as the real mixed pass: each rider's next token needs its page
            sched.grow_pages(riders, ahead)
            e.steps.append(("mixed", [r.rid for r in riders], [r.rid for r in reqs]))
        else:
            e.steps.append(("prefill", [r.rid for r in reqs]))
        rows = [*riders, *reqs]
        e.filled = fill_prefill(rows, PS, arrays, ahead)  # (rows, pages); AssertionError for a page missing
        e.behind += behind
        launched = passes.LaunchedPass(list(riders), reqs, [r.slot for r in rows], _Done())
        seen = [SimpleNamespace(rid=r.rid, prompt=r.prompt, output=r.output + [0] * ahead) for r in riders]
        pass_tokens[id(launched)] = [rule(r) for r in (*seen, *reqs)]
        return launched, None

    def prefill_finish(sched, launched, behind=False):
        tokens = pass_tokens.pop(id(launched))
        k = len(launched.riders)
        sched.record(launched.riders, tokens[:k])
        sched.record(launched.admitted, tokens[k:], prefill=True)

    def decode_step(sched):
        rows = sched.decode_rows(padded=False)
        e.steps.append(("decode", [r.rid for r in rows if r is not None]))
        sched.record(rows, [rule(r) for r in rows])
        return 1.0, rows

    def decode_launch(sched, depth=1):
        prepared, e.passes.next_rows = e.passes.next_rows, None
        if prepared is not None and sched.same_rows(prepared):
            rows = prepared
        else:
            rows = sched.decode_rows(padded=e.runner.graph is not None)
            if e.runner.graph is not None:  # as the real launch: the first slots, the smallest graph holding them all
                rows = rows[: sched.graph_rows(rows, e.runner.decode_graph_batches)]
        e.steps.append(("decode", [r.rid for r in rows if r is not None]))

        def token(r):  # the request as the device sees it: the steps in flight before this one recorded
            seen = SimpleNamespace(rid=r.rid, prompt=r.prompt, output=r.output + [0] * (depth - 1))
            return rule(seen)

        ids = np.array([token(r) if r is not None else 0 for r in rows], np.int32)
        if e.runner.graph is not None:
            ahead = sched.peek_rows(depth)
            e.passes.next_rows = ahead[: sched.graph_rows(ahead, e.runner.decode_graph_batches)]
        return passes.LaunchedStep(rows, ids, _Done())

    e.passes.prefill_launch = prefill_launch
    e.passes.prefill_finish = prefill_finish
    e.passes.decode_step = decode_step
    e.passes.decode_launch = decode_launch
    return e


class _Done:
    def synchronize(self):
        return None


class _Stream:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def synchronize(self):
        return None


@pytest.fixture(autouse=True)
def _no_ffi_stream(monkeypatch):
    monkeypatch.setattr(serving, "stream_scope", lambda stream, device: contextlib.nullcontext())


def drain(e) -> dict[int, list]:
    """step() until nothing is unfinished: each request's tokens and finish reasons as reported."""
    seen: dict[int, list] = {}
    while e.has_unfinished:
        for o in e.step():
            assert isinstance(o, StepOutput)
            seen.setdefault(o.rid, []).append(o)
    return seen


def test_step_reports_each_requests_tokens_once_and_its_end_as_the_protocols_reason():
    e = bare_engine(token_of=lambda r: EOS if (r.rid == 1 and len(r.output) == 2) else 100 + len(r.output))
    ids = [e.add_request([1, 2, 3], 4), e.add_request([4] * 20, 6), e.add_request([5], 1)]
    assert ids == [0, 1, 2] and e.has_unfinished
    first = e.step()  # all three admitted: prefill tokens, then one decode step for those still active
    assert first == [
        StepOutput(0, (100, 101)),
        StepOutput(1, (100, 101)),
        StepOutput(2, (100,), "length"),  # max_new_tokens 1: ended at its prefill
    ]
    seen = drain(e)
    assert [o.token_ids for o in seen[0]] == [(102,), (103,)] and seen[0][-1].finish_reason == "length"
    assert [o.token_ids for o in seen[1]] == [(EOS,)] and seen[1][-1].finish_reason == "stop"  # eos -> "stop"
    assert 2 not in seen
    assert e.step() == [] and not e._requests  # finished requests are forgotten
    assert e.scheduler.allocator.num_free == e.scheduler.allocator.capacity


def test_step_drives_the_same_steps_as_generate():
    prompts = [[1] * 3, [2] * 20, [3] * 9, [4] * 33, [5]]
    limits = [5, 9, 2, 7, 4]
    a = bare_engine(max_batch=2)
    result = a.generate(prompts, limits, eos_token_ids=())
    b = bare_engine(max_batch=2)
    rids = [b.add_request(p, m, eos_token_ids=()) for p, m in zip(prompts, limits, strict=True)]
    got: dict[int, list[int]] = {}
    for outs in iter(b.step, None):
        for o in outs:
            got.setdefault(o.rid, []).extend(o.token_ids)
        if not b.has_unfinished:
            break
    assert [got[r] for r in rids] == result.tokens
    assert b.steps == a.steps  # the same prefills and decode steps, in the same order
    assert result.finish_reasons == ["length"] * 5 and result.decode_steps == sum(s[0] == "decode" for s in a.steps)


def counting_ahead(e):
    """Count the decode steps ``e`` launches ahead of the one in flight (``depth=2``) in ``e.ahead``."""
    launch = e.passes.decode_launch
    e.ahead = 0

    def counted(sched, depth=1):
        e.ahead += depth == 2
        return launch(sched, depth)

    e.passes.decode_launch = counted
    return e


def eos_rule(r):
    """Request 1 ends with an end-of-sequence token after 2 tokens, request 3 after 5; others count up."""
    if (r.rid, len(r.output)) in ((1, 2), (3, 5)):
        return EOS
    return 100 + len(r.output)


@pytest.mark.parametrize("max_batch", [1, 2, 4])
def test_pipelined_generate_gives_the_same_tokens_as_one_step_at_a_time(max_batch):
    """ServingLoop.pipelined_decode (a decode graph on one GPU): generate launches a step before reading the
    tokens of the one in flight, and still gives every prompt the tokens and finish reason of the plain loop, with
    end-of-sequence tokens mid-batch, different token limits and more prompts than slots; steps were launched
    ahead (more than a third of them), every page goes back, and nothing stays in flight."""
    prompts = [[1] * 3, [2] * 20, [3] * 9, [4] * 33, [5], [6] * 15]
    limits = [5, 9, 2, 12, 4, 30]
    plain = bare_engine(max_batch=max_batch, token_of=eos_rule)
    want = plain.generate(prompts, limits, eos_token_ids=(EOS,))
    piped = counting_ahead(bare_engine(max_batch=max_batch, token_of=eos_rule, pipelined=True))
    got = piped.generate(prompts, limits, eos_token_ids=(EOS,))
    assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons
    assert "eos" in got.finish_reasons and "length" in got.finish_reasons
    decode_steps = sum(s[0] == "decode" for s in piped.steps)
    assert got.decode_steps == decode_steps and 3 * piped.ahead > decode_steps, (piped.ahead, decode_steps)
    assert piped.scheduler.allocator.num_free == piped.scheduler.allocator.capacity
    pipelined_off = bare_engine(max_batch=max_batch, token_of=eos_rule, pipelined=True)
    pipelined_off.pipelined_decode = False
    assert pipelined_off.generate(prompts, limits, eos_token_ids=(EOS,)).tokens == want.tokens


def tp_rank(e, pipelined: bool, clock_step: float = 1e-4):
    """``e`` as a tensor-parallel rank: a stand-in communicator, ``tp_pipelined_decode`` set to ``pipelined``, and a
    host clock of its own (each reading ``clock_step`` seconds on: ranks' host times differ), read by its loop."""
    e.runner.comm = object()
    e.tp_pipelined_decode = pipelined
    now = [0.0]

    def perf_counter() -> float:
        now[0] += clock_step
        return now[0]

    e.clock = SimpleNamespace(perf_counter=perf_counter)
    return e


@pytest.mark.parametrize("max_batch", [1, 3])
def test_pipelined_generate_under_tensor_parallelism_only_with_its_switch(max_batch, monkeypatch):
    """Under tensor parallelism generate launches no step ahead with ServingLoop.tp_pipelined_decode off; with it
    (the default), ranks launch steps ahead and give the tokens and finish reasons of the plain loop (end-of-
    sequence tokens mid-batch, token limits, prompts admitted as slots free), and two ranks whose host clocks and
    scheduler delays differ take the same steps in the same order (launched ahead or not): each rank's collectives
    then meet."""
    prompts = [[1] * 3, [2] * 20, [3] * 9, [4] * 33, [5], [6] * 15]
    limits = [5, 9, 2, 12, 4, 30]
    want = bare_engine(max_batch=max_batch, token_of=eos_rule).generate(prompts, limits, eos_token_ids=(EOS,))
    assert "eos" in want.finish_reasons
    off = counting_ahead(tp_rank(bare_engine(max_batch=max_batch, token_of=eos_rule, pipelined=True), False))
    assert not off.launch_policy.pipelines_decode()
    got = off.generate(prompts, limits, eos_token_ids=(EOS,))
    assert got.tokens == want.tokens and off.ahead == 0
    ranks = []
    for clock_step, delay in ((1e-4, 0.0), (3e-3, 4.0)):
        e = counting_ahead(
            tp_rank(bare_engine(max_batch=max_batch, token_of=eos_rule, pipelined=True), True, clock_step)
        )
        e.scheduler_delay_factor = delay  # (the step API's admission delay; generate admits at once)
        monkeypatch.setattr(serving, "time", e.clock)
        got = e.generate(prompts, limits, eos_token_ids=(EOS,))
        assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons
        decode_steps = sum(s[0] == "decode" for s in e.steps)
        assert 3 * e.ahead > decode_steps, (e.ahead, decode_steps)
        assert e.scheduler.allocator.num_free == e.scheduler.allocator.capacity
        ranks.append(e)
    assert ranks[0].steps == ranks[1].steps and ranks[0].ahead == ranks[1].ahead


def test_the_pipelined_decode_at_tp_needs_its_switch_staged_steps_and_no_speculation():
    """LaunchPolicy.pipelines_decode: one GPU with the decode graph pipelines whatever tp_pipelined_decode says;
    a tensor-parallel rank only with it, with steps staged ahead (ModelRunner.prepare_ahead), and without speculation
    (its policy weighs the rank's own host times); no rank without the decode graph or with pipelined_decode off."""
    e = bare_engine(pipelined=True)
    assert e.tp_pipelined_decode  # on by default
    e.tp_pipelined_decode = False
    assert e.launch_policy.pipelines_decode()
    e.runner.comm = object()
    assert not e.launch_policy.pipelines_decode()
    e.tp_pipelined_decode = True
    assert e.launch_policy.pipelines_decode()
    e.runner.prepare_ahead = False
    assert not e.launch_policy.pipelines_decode()
    e.runner.prepare_ahead = True
    e.speculator.proposer = object()
    assert not e.launch_policy.pipelines_decode()
    e.speculator.proposer = None
    e.pipelined_decode = False
    assert not e.launch_policy.pipelines_decode()
    e.pipelined_decode = True
    e.runner.graph = None
    assert not e.launch_policy.pipelines_decode()


@pytest.mark.parametrize("abort_after", [None, (3, 0), (5, 4)])
def test_pipelined_overlapped_steps_give_the_same_tokens_as_plain_steps(abort_after):
    """The step API with overlap_steps and a stand-in decode graph: step() launches the next decode step before
    reading the one in flight where nothing changes the rows between them; every request gets the tokens of the
    plain step API (end-of-sequence tokens, limits, more requests than slots), a request aborted between calls
    takes nothing of a step launched after its abort, and every page goes back."""
    prompts = [[1] * 3, [2] * 20, [3] * 9, [4] * 33, [5], [6] * 15]
    limits = [5, 9, 2, 12, 4, 30]
    plain = bare_engine(max_batch=2, token_of=eos_rule, overlap=True)
    piped = counting_ahead(bare_engine(max_batch=2, token_of=eos_rule, overlap=True, pipelined=True))
    same_tokens(plain, piped, prompts, limits, abort_after)
    assert piped.ahead > 0 and piped._inflight is None and not piped._requests
    assert piped.behind > 0  # a prefill pass launched behind a decode step in flight
    assert piped.scheduler.allocator.num_free == piped.scheduler.allocator.capacity
    # every pass of the overlapped step API is padded to max_batch request slots: one graph per bucket
    assert piped.graph_slots and set(piped.graph_slots) == {piped.max_batch}


@pytest.mark.parametrize("abort_after", [None, (4, 3)])
def test_a_decode_step_launched_behind_a_mixed_pass_gives_the_same_tokens(abort_after):
    """With mixed_prefill, overlap_steps and a stand-in decode graph, a prefill pass goes behind the decode step in
    flight (its riders fed that step's tokens, one position on), and where it gives every active request a token the
    decode step after it is launched at once, behind it (its rows one position on, its input tokens the pass's):
    every request gets the tokens of the plain step API with mixed passes, and every page goes back."""
    prompts = [[1] * 3, [2] * 20, [3] * 9, [4] * 33, [5], [6] * 15, [7] * 16, [8] * 31]
    limits = [5, 9, 2, 12, 4, 30, 17, 6]
    plain = bare_engine(max_batch=3, token_of=eos_rule, mixed=True)
    piped = counting_ahead(bare_engine(max_batch=3, token_of=eos_rule, overlap=True, pipelined=True, mixed=True))
    behind: list[bool] = []  # per admitting step: whether its decode step went behind the pass
    policy = piped.launch_policy
    rows_behind = policy.rows_behind_prefill
    policy.rows_behind_prefill = lambda sched: behind.append((rows := rows_behind(sched)) is not None) or rows
    same_tokens(plain, piped, prompts, limits, abort_after)
    assert any(step[0] == "mixed" for step in piped.steps) and sum(behind) >= 2, behind
    assert piped.behind >= 1  # a mixed pass launched behind a decode step in flight, its riders one token on
    assert piped._inflight is None and not piped._requests
    assert piped.scheduler.allocator.num_free == piped.scheduler.allocator.capacity


def test_no_empty_decode_step_is_launched_ahead_once_every_request_ended():
    """A step launched ahead of an end-of-sequence token is all padding once that request ends; the calls after
    the end wait for it and launch nothing more (each had launched another all-padding step)."""
    e = bare_engine(max_batch=2, token_of=eos_rule, overlap=True, pipelined=True)
    e.add_request([9] * 3, 1, eos_token_ids=(EOS,))
    e.add_request([1] * 3, 4, eos_token_ids=(EOS,))  # request 1: an end-of-sequence token after 2 tokens
    while e.has_unfinished:
        e.step()
    assert e._inflight is not None  # the step launched ahead of that token: every row padding now
    ran = len(e.steps)
    for _ in range(3):
        assert e.step() == []
    assert e.steps[ran:] == [] and e._inflight is None


def same_tokens(plain, piped, prompts, limits, abort_after):
    """Run the requests to their end on both engines: ``piped`` gives each the tokens ``plain`` does (end-of-sequence
    ids: ``eos_rule``'s), the one aborted after call ``abort_after[0]`` a prefix of them."""
    want, _ = run_to_the_end(plain, prompts, limits, abort_after=abort_after, eos=(EOS,))
    got, _ = run_to_the_end(piped, prompts, limits, abort_after=abort_after, eos=(EOS,))
    if abort_after is None:
        assert got == want
    else:  # the aborted request: a prefix of its plain tokens; the others: theirs
        i = abort_after[1]
        assert all(g == w for j, (g, w) in enumerate(zip(got, want, strict=True)) if j != i)
        assert got[i] == want[i][: len(got[i])]


def run_to_the_end(e, prompts, limits, abort_after=None, eos=()):
    """Add the requests, step until nothing is unfinished (aborting ``abort_after = (call, index)``'s request
    after that call); every request's tokens and the tokens each call reported."""
    rids = [e.add_request(p, m, eos_token_ids=eos) for p, m in zip(prompts, limits, strict=True)]
    got: dict[int, list[int]] = {r: [] for r in rids}
    calls = []
    while e.has_unfinished:
        outs = e.step()
        calls.append(outs)
        for o in outs:
            got[o.rid].extend(o.token_ids)
        if abort_after is not None and len(calls) == abort_after[0]:
            e.abort_request(rids[abort_after[1]])
    calls.append(e.step())
    for o in calls[-1]:
        got[o.rid].extend(o.token_ids)
    return [got[r] for r in rids], calls


def test_overlapped_steps_run_the_same_steps_and_give_the_same_tokens_one_call_later():
    prompts = [[1] * 3, [2] * 20, [3] * 9, [4] * 33, [5]]
    limits = [5, 9, 2, 7, 4]
    plain, overlapped = bare_engine(max_batch=2), bare_engine(max_batch=2, overlap=True)
    want, plain_calls = run_to_the_end(plain, prompts, limits)
    got, calls = run_to_the_end(overlapped, prompts, limits)
    assert got == want and overlapped.steps == plain.steps  # the same prefills and decode steps, in order
    assert overlapped._inflight is None and not overlapped._requests
    assert overlapped.scheduler.allocator.num_free == overlapped.scheduler.allocator.capacity
    # the first call: both prefill tokens only (the decode step it launched reports next time)
    assert [o.token_ids for o in calls[0]] == [(100,), (100,)] and overlapped.scheduler is not None
    assert [o.token_ids for o in plain_calls[0]] == [(100, 101), (100, 101)]
    assert len(calls) == len(plain_calls) + 1


def test_a_request_aborted_while_its_step_runs_takes_no_token_and_its_slot_serves_the_next():
    prompts = [[1] * 4, [2] * 4, [3] * 4]
    e = bare_engine(max_batch=2, overlap=True)
    got, calls = run_to_the_end(e, prompts, [6, 6, 6], abort_after=(2, 0))
    # request 0: its prefill token and the token of the step the first call launched; the step the second call
    # launched was running when it was aborted: nothing of it is recorded
    assert got[0] == [100, 101]
    assert any(o == StepOutput(0, (), "abort") for o in calls[2])
    assert got[1] == [100 + i for i in range(6)] and got[2] == [100 + i for i in range(6)]
    assert e.steps[3] == ("prefill", [2])  # admitted at the call after the abort, into request 0's slot
    assert e.scheduler.allocator.num_free == e.scheduler.allocator.capacity and e._inflight is None


def test_every_request_aborted_while_a_step_runs_then_generate_serves_on():
    e = bare_engine(max_batch=2, overlap=True)
    a, b = e.add_request([1] * 3, 10), e.add_request([2] * 3, 10)
    e.step()
    assert e._inflight is not None
    e.abort_request(a)
    e.abort_request(b)
    assert not e.has_unfinished and e.scheduler.allocator.num_free == e.scheduler.allocator.capacity
    assert sorted(o.rid for o in e.step()) == [a, b] and e._inflight is None
    e.step()
    e.add_request([3] * 3, 2)
    e.step()
    last = e.add_request([4], 5)
    assert e._inflight is not None
    e.abort_request(last)
    e.step()  # reports nothing new for the aborted one; the other request's step finishes
    while e.has_unfinished:
        e.step()
    e.step()
    assert e._inflight is None
    assert e.generate([[5] * 2], 3, eos_token_ids=()).tokens == [[100, 101, 102]]


@pytest.mark.parametrize("mode", ["plain", "overlap", "pipelined-mixed"])
def test_a_request_that_ended_before_a_failure_in_the_same_step_is_reported_with_its_tokens(mode):
    """A failure midway through a step: the requests that ended before it in that step are reported with their
    tokens, the others aborted, every page back. ``pipelined-mixed``: the prefill pass that fails was being
    launched behind the decode step in flight (not recorded yet): that step is recorded before the error goes on."""
    overlap = mode != "plain"
    e = bare_engine(max_batch=2, overlap=overlap, pipelined=mode == "pipelined-mixed", mixed=mode == "pipelined-mixed")
    done = e.add_request([1] * 3, 2 if overlap else 1)
    first = e.step()  # overlap: its last token is in flight; plain: its only token was the prefill's
    assert [o.token_ids for o in first] == [(100,)] and first[0].finished is not overlap
    if not overlap:  # a request ending at its prefill, then a failure in the same call's decode step
        e.add_request([3] * 3, 5)
        done = e.add_request([2] * 3, 1)
    other = e.add_request([4] * 3, 5)

    def broken(*a, **k):
        raise RuntimeError("the device went away")

    if overlap:
        e.passes.prefill_launch = broken  # the step in flight is finished and recorded first, then the prefill fails
    else:
        e.passes.decode_step = broken
    with pytest.raises(RuntimeError, match="the device went away"):
        e.step()
    out = e.step()
    ended = out[0]
    assert ended.rid == done and ended.finish_reason == "length"
    assert ended.token_ids == ((101,) if overlap else (100,))
    assert StepOutput(other, (), "abort") in out
    assert done not in e._requests and not e.has_unfinished
    assert e.scheduler.allocator.num_free == e.scheduler.allocator.capacity and e._inflight is None


def test_a_step_left_running_is_waited_for_before_generate():
    e = bare_engine(max_batch=2, overlap=True)
    a = e.add_request([1] * 3, 10)
    e.step()
    e.abort_request(a)  # nothing unfinished, a step still in flight
    assert e._inflight is not None
    assert e.generate([[5] * 2], 2, eos_token_ids=()).tokens == [[100, 101]]
    assert e._inflight is None  # waited for (the stream synchronized) and dropped, not recorded


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_the_scheduler_delay_holds_arrivals_while_others_decode_until_they_waited_or_fill_the_slots(
    monkeypatch, overlap
):
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])  # paging's and serving's clock
    e = bare_engine(max_batch=4, overlap=overlap)
    e.scheduler_delay_factor = 2.0
    launch = e.passes.prefill_launch

    def one_second_prefill(sched, reqs, riders=(), all_logits=False, **kw):
        now[0] += 1.0
        return launch(sched, reqs, riders, all_logits, **kw)

    e.passes.prefill_launch = one_second_prefill
    a = e.add_request([1] * 3, 40)
    assert [o.rid for o in e.step()] == [a]  # nothing decoding: admitted at once (its prefill took 1 s)
    b = e.add_request([2] * 3, 40)
    now[0] += 0.5
    assert all(o.rid != b for o in e.step()) and e.scheduler.pending[0].rid == b  # waited 0.5 s < 2 x 1 s
    now[0] += 1.5
    assert b in [o.rid for o in e.step()] and not e.scheduler.pending  # waited 2 s: admitted
    c, d = e.add_request([3] * 3, 40), e.add_request([4] * 3, 40)  # they fill both free slots: no wait
    assert {c, d} <= {o.rid for o in e.step()}
    for r in (a, b, c, d):
        e.abort_request(r)
    e.step()
    e.scheduler_delay_factor = 0.0
    f = e.add_request([5] * 3, 40)
    e.step()
    g = e.add_request([6] * 3, 40)
    assert g in [o.rid for o in e.step()]  # no delay: admitted at the next step
    for r in (f, g):
        e.abort_request(r)
    e.step()
    e.step()
    e.scheduler_delay_factor = 100.0
    assert e.generate([[7] * 2, [8] * 2], 2, eos_token_ids=()).tokens == [[100, 101]] * 2  # generate: no delay


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_mixed_prefill_decodes_the_running_requests_in_the_prefill_pass(overlap):
    """With mixed_prefill a prefill that admits requests while others decode takes those along (one row each),
    and nothing else changes: every token recorded once, in order (the stand-in's rule gives each request 100, 101,
    ... so a token given twice or skipped shows), every page back at the end. generate never mixes."""
    e = bare_engine(max_batch=3, overlap=overlap, mixed=True)
    seen: dict[int, list] = {}

    def step():
        for o in e.step():
            seen.setdefault(o.rid, []).append(o)

    a = e.add_request([1] * 3, 12)
    step()
    step()
    b = e.add_request([2] * 14, 12)  # a is decoding: b's prefill pass decodes a too
    step()
    mixed = [s for s in e.steps if s[0] == "mixed"]
    assert mixed == [("mixed", [a], [b])]
    assert e.filled == (1 + 14, 1 + 1)  # a's one row (a's 1st page holds its token), b's 14 rows (one page)
    c = e.add_request([3] * 2, 5)
    while e.has_unfinished:
        step()
    assert [s for s in e.steps if s[0] == "mixed"][1:] == [("mixed", [a, b], [c])]
    for rid, m in ((a, 12), (b, 12), (c, 5)):
        got = [t for o in seen[rid] for t in o.token_ids]
        assert got == list(range(100, 100 + m)) and seen[rid][-1].finish_reason == "length"
    assert e.scheduler.allocator.num_free == e.scheduler.allocator.capacity
    e.steps.clear()
    assert e.generate([[4] * 2] * 5, 3, eos_token_ids=()).tokens == [[100, 101, 102]] * 5  # 5 prompts, 3 slots
    assert [s[0] for s in e.steps].count("prefill") == 2 and all(s[0] != "mixed" for s in e.steps)


def test_mixed_prefill_leaves_a_prompt_that_does_not_fit_beside_the_riders_to_a_pass_of_its_own():
    e = bare_engine(max_batch=4, mixed=True)
    e.scheduler.max_prefill_tokens = e.runner.max_prefill_tokens = 10  # a pass of 10 token rows at most
    a = e.add_request([1] * 3, 30)
    e.step()
    b = e.add_request([2] * 10, 30)  # 1 rider + 10 rows > 10: alone, as without mixed_prefill
    e.step()
    assert e.steps[-2:] == [("prefill", [b]), ("decode", [a, b])]
    c, d = e.add_request([3] * 4, 4), e.add_request([4] * 5, 4)  # 2 riders + 4 fit, + 5 do not: d waits a step
    e.step()
    assert e.steps[-2:] == [("mixed", [a, b], [c]), ("decode", [a, b, c])]
    e.step()
    assert e.steps[-2:] == [("mixed", [a, b, c], [d]), ("decode", [a, b, c, d])]
    for r in (a, b, c, d):
        e.abort_request(r)
    e.step()
    assert e.scheduler.allocator.num_free == e.scheduler.allocator.capacity


def test_abort_request_frees_at_once_and_the_next_step_reports_it_once():
    e = bare_engine(max_batch=2, num_pages=1 + 4)
    a = e.add_request([1] * 10, 40)  # budget 4 pages: the whole cache
    b = e.add_request([2] * 3, 5)  # queued behind a's budget
    e.step()
    assert e.scheduler.slots[0].rid == a and e.scheduler.pending[0].rid == b
    e.abort_request(a)
    assert e.scheduler.allocator.num_free == e.scheduler.allocator.capacity and e.scheduler.slots == [None, None]
    out = e.step()  # a's abort, then b admitted into the freed pages and served
    assert out[0] == StepOutput(a, (), "abort")
    assert out[1].rid == b and len(out[1].token_ids) == 2
    e.abort_request(a)  # finished: nothing
    e.abort_request(12345)  # unknown: nothing
    seen = drain(e)
    assert all(o.rid == b for outs in seen.values() for o in outs) and seen[b][-1].finish_reason == "length"
    e.abort_request(b)
    assert e.step() == []
    with pytest.raises(TypeError, match="rid: expected a request id"):
        e.abort_request("0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rid: expected a request id"):
        e.abort_request([0])  # type: ignore[arg-type]


def test_an_aborted_queued_request_is_reported_even_with_nothing_left_to_run():
    e = bare_engine()
    r = e.add_request([1, 2], 3)
    e.abort_request(r)
    assert not e.has_unfinished
    assert e.step() == [StepOutput(r, (), "abort")]
    assert e.step() == []


def test_a_request_whose_adapter_cannot_be_read_again_ends_alone_with_the_reason(tmp_path):
    """An adapter the host dropped is read from its folder again at admission; where the folder is gone, that request
    ends ("abort" and the reason as its error), and the steps go on serving the others, later ones included."""
    import shutil

    from helpers.lora_adapters import llama_shapes, write_adapter

    from fi_engine.lora.adapter import BaseShapes
    from fi_engine.lora.manager import LoraManager
    from fi_engine.lora.settings import LoraSettings

    shapes = llama_shapes(64, 96, 4, 2, 16)
    for name in "ab":
        write_adapter(tmp_path / name, shapes, 1, 4, modules=("q_proj",))
    settings = LoraSettings(1, 1, 8, (("a", str(tmp_path / "a")), ("b", str(tmp_path / "b"))))  # the host keeps b
    e = bare_engine(max_batch=3)
    e.lora = e.scheduler.adapters = LoraManager(settings, BaseShapes(1, "bfloat16", shapes), lambda slot, p: None)
    shutil.rmtree(tmp_path / "a")
    bad = e.add_request([1] * 5, 3, sampling=SamplingParams(lora="a"))
    good = e.add_request([2] * 5, 3, sampling=SamplingParams(lora="b"))
    plain = e.add_request([3] * 5, 3)
    out = e.step()
    (ended,) = [o for o in out if o.rid == bad]
    assert ended.finish_reason == "abort" and ended.token_ids == () and isinstance(ended.error, ValueError)
    assert "could not be read again from its folder" in str(ended.error) and str(tmp_path) not in str(ended.error)
    later = e.add_request([4] * 5, 3, sampling=SamplingParams(lora="a"))
    seen = drain(e)
    assert seen[good][-1].finish_reason == seen[plain][-1].finish_reason == "length"
    assert [o.finish_reason for o in seen[later]] == ["abort"] and bad not in seen
    result = e.generate([[5] * 5, [6] * 5], 3, lora=["a", None])  # generate: that prompt ends "abort", no tokens
    assert result.finish_reasons == ["abort", "length"] and result.tokens[0] == [] and e.scheduler.refused == []


def test_requests_added_between_steps_join_the_running_batch():
    e = bare_engine(max_batch=3)
    a = e.add_request([1] * 5, 8)
    e.step()
    e.step()
    b = e.add_request([2] * 7, 3)
    out = e.step()
    assert [o.rid for o in out] == [b, a]  # b's prefill token first, then the decode step in slot order (a, b)
    assert out[0].token_ids == (100, 101) and out[1].token_ids == (103,)
    assert e.steps[-2:] == [("prefill", [b]), ("decode", [a, b])]
    seen = drain(e)
    assert sum(len(o.token_ids) for o in seen[a]) == 8 - 4 and seen[b][-1].finish_reason == "length"


def test_a_failed_step_ends_every_request_and_the_next_step_reports_them():
    e = bare_engine()
    a, b = e.add_request([1] * 3, 10), e.add_request([2] * 3, 10)
    e.step()
    c = e.add_request([3], 4)

    def broken(sched):
        raise RuntimeError("the device went away")

    e.passes.decode_step = broken
    with pytest.raises(RuntimeError, match="the device went away"):
        e.step()
    assert not e.has_unfinished and e.scheduler.allocator.num_free == e.scheduler.allocator.capacity
    assert sorted(o.rid for o in e.step()) == [a, b, c]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda e: e.add_request([], 4), ValueError, r"^prompt: expected a non-empty list of token ids"),
        (lambda e: e.add_request([1, 1000], 4), ValueError, r"^prompt\[1\]: token id 1000 is outside"),
        (lambda e: e.add_request("12", 4), ValueError, r"^prompt: expected a non-empty list of token ids"),
        (lambda e: e.add_request([1], 0), ValueError, r"^max_new_tokens: expected an integer >= 1"),
        (lambda e: e.add_request([1], "4"), ValueError, r"^max_new_tokens: expected an integer >= 1"),
        (lambda e: e.add_request([1] * 250, 10), ValueError, r"^prompt: 250 prompt tokens \+ 10 new tokens exceed"),
        (lambda e: e.add_request([1], 4, sampling=0.7), TypeError, r"^sampling: expected a fi_engine"),
        (lambda e: e.add_request([1], 4, eos_token_ids=[1, None]), ValueError, r"^eos_token_ids\[1\]: expected"),
        (lambda e: e.add_request([1], 4, eos_token_ids=7), ValueError, r"^eos_token_ids: expected a list"),
    ],
)
def test_add_request_refuses_bad_arguments_by_name_and_queues_nothing(call, error, match):
    e = bare_engine()
    with pytest.raises(error, match=match):
        call(e)
    assert not e.has_unfinished and not e._requests


def test_add_request_gives_each_seeded_request_its_own_stream_and_unseeded_ones_the_engines():
    e = bare_engine()
    e.add_request([1], 4, sampling=SamplingParams(temperature=1.0, seed=5))
    e.add_request([1], 4, sampling=SamplingParams(temperature=1.0, seed=5))
    e.add_request([1], 4, sampling=SamplingParams(temperature=1.0))
    e.add_request([1], 4, sampling=SamplingParams(temperature=0.5))
    e.add_request([1], 4, sampling=SamplingParams(seed=5))  # greedy: no stream
    r = list(e.scheduler.pending)
    assert r[0].draws is not r[1].draws and not r[0].draws.shared and r[0].draws.generator.get_state() == (5, 0)
    assert r[2].draws is r[3].draws and r[2].draws.shared
    assert r[4].draws is None and r[4].sampling is None


def test_generate_refuses_while_step_requests_are_in_flight_and_cleans_up_a_refused_prompt():
    e = bare_engine()
    e.add_request([1], 4)
    with pytest.raises(ValueError, match=r"engine: 1 request\(s\) added with add_request are queued or active"):
        e.generate([[1]], 2)
    with pytest.raises(ValueError, match="before prefill_logits"):
        e.prefill_logits([[1]])
    e.abort_request(0)
    e.step()
    with pytest.raises(ValueError, match=r"prompts\[1\]\[0\]: token id 1000"):
        e.generate([[1], [1000]], 2)
    assert not e.has_unfinished  # prompts[0] was taken out again
    with pytest.raises(TypeError, match="sampling: expected"):
        e.generate([[1]], 2, sampling="hot")
    assert e.generate([[1], [2]], 3).tokens == [[100, 101, 102]] * 2


def test_an_interrupted_generate_leaves_nothing_queued_or_holding_pages():
    e = bare_engine(max_batch=2)
    calls = []

    def decode_step(sched):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        rows = sched.decode_rows(padded=False)
        sched.record(rows, [7] * len(rows))
        return 1.0, rows

    e.passes.decode_step = decode_step
    with pytest.raises(KeyboardInterrupt):
        e.generate([[1] * 5] * 4, 10, eos_token_ids=())
    s = e.scheduler
    assert not s.has_work and s.allocator.num_free == s.allocator.capacity
    calls.clear()  # a working device again: the engine serves on
    assert e.generate([[1]], 3, eos_token_ids=()).tokens == [[100, 7, 7]]


def test_aborting_active_and_queued_requests_gives_every_page_back():
    e = bare_engine(max_batch=4, num_pages=1 + 40)
    rids = [e.add_request([i + 1] * (5 + 9 * i), 30) for i in range(6)]
    e.step()
    e.step()
    s = e.scheduler
    assert len(s.active) == 4 and len(s.pending) == 2
    held = sum(len(r.pages) for r in s.active)
    assert held == sum(pages_for(len(r.prompt) + 2, PS) for r in s.active)  # prompt + 2 decode inputs
    for rid in rids:
        e.abort_request(rid)
    assert s.allocator.num_free == s.allocator.capacity
    assert sorted(o.rid for o in e.step()) == rids


# ---------------------------------------------------------------------------------------------- the mixed step


def test_a_mixed_step_hands_each_stream_its_rows_and_merges_the_samples_into_the_greedy_ids(monkeypatch):
    """Sampler._sample_mixed on the host, with the launches recorded: the per-row arrays it copies, the calls it
    makes (softmax once; one sampler per stream with that stream's rows as indices into its own output span), and
    the gather that merges them, replayed in numpy: greedy rows keep their argmax, sampled rows get their sample."""
    from fi_engine.kernels import flashinfer as kernels

    B, V = 6, 1000

    def buffer(address, shape=(1,)):
        return SimpleNamespace(data=SimpleNamespace(ptr=address), shape=shape)

    ids, choice, meta = 1 << 40, 2 << 40, 3 << 40
    copies, launches = [], []
    cupy = SimpleNamespace(cuda=SimpleNamespace(runtime=SimpleNamespace(memcpyAsync=lambda *a: copies.append(a[:3]))))
    rows = SimpleNamespace(gather_rows=lambda *a: launches.append(("gather", a)))  # the row kernels' stand-in
    e = Sampler(cupy, rows, SimpleNamespace(ids=buffer(ids)), device=0, stream_ptr=0, max_batch=B, vocab_size=V)
    e._probs, e._softmax_ws, e._valid = buffer(4 << 40), buffer(5 << 40, (64,)), None
    e._shosts, e._sturn = (np.zeros(e._slayout.total, np.int32), np.zeros(e._slayout.total, np.int32)), 0
    e._smeta, e._choice = buffer(meta), buffer(choice)
    monkeypatch.setattr(kernels, "softmax", lambda *a: launches.append(("softmax", a)))
    monkeypatch.setattr(kernels, "sample_rows", lambda *a: launches.append(("sample", a)))

    shared, own = Draws.seeded(1, True), Draws.seeded(2, False)
    hot = SamplingParams(temperature=0.5, top_k=7, top_p=0.8)
    wide = SamplingParams(temperature=2.0, top_k=5000)  # more than the vocabulary: all of it
    rows = [_req(0), _req(1, hot, shared), None, _req(3, wide, own), _req(4, hot, shared), _req(5)]
    n = len(rows)
    uniform, groups = draw_groups(rows)
    assert not uniform
    v = SimpleNamespace(logits="logits")
    e._sample_mixed(v, n, rows, groups)

    o, host = e._slayout.offsets, e._shosts[0]
    assert e._sturn == 1  # the next step stages into the other buffer (a step launched ahead may be in flight)
    assert copies[0][1] == host.__array_interface__["data"][0]
    assert host[o["temperature"] : o["temperature"] + n].view(np.float32).tolist() == [1, 0.5, 1, 2, 0.5, 1]
    assert host[o["top_k"] : o["top_k"] + n].tolist() == [V, 7, V, V, 7, V]
    assert np.allclose(host[o["top_p"] : o["top_p"] + n].view(np.float32), [1, 0.8, 1, 1, 0.8, 1])
    assert copies[0][0] == meta and copies[0][2] == 4 * e._slayout.total  # the arrays, in one copy
    assert copies[1] == (choice, ids, 4 * n)  # the argmax ids into the merge's source
    kinds = [k for k, _ in launches]
    assert kinds == ["softmax", "sample", "sample", "gather"]
    temperature = launches[0][1][3]
    assert (temperature.data_ptr, tuple(temperature.shape)) == (meta + 4 * o["temperature"], (n,))
    samples = np.full(2 * B, -1, np.int64)
    samples[:n] = [100 + i for i in range(n)]  # the argmax of each row
    for (_, (probs, out, top_k, top_p, indices, gen, _s, valid)), (draws, idx) in zip(
        launches[1:3], groups, strict=True
    ):
        start = (indices.data_ptr - meta) // 4 - o["indices"]
        assert tuple(indices.shape) == tuple(out.shape) == (len(idx),)
        assert host[o["indices"] + start : o["indices"] + start + len(idx)].tolist() == idx
        assert out.data_ptr == choice + 4 * (B + start) and gen is draws.generator and valid is None
        assert tuple(probs.shape) == (n, V) and top_k.data_ptr == meta + 4 * o["top_k"]
        assert top_p.data_ptr == meta + 4 * o["top_p"] and tuple(top_p.shape) == (n,)
        samples[B + start : B + start + len(idx)] = [900 + i for i in idx]  # what the sampler draws
    _, (rows_, src, src_ld, index, dst, dst_ld, width) = launches[3]
    assert (rows_, src, src_ld, index, dst, dst_ld, width) == (n, choice, 2, meta + 4 * o["source"], ids, 2, 2)
    source = host[o["source"] : o["source"] + n]
    assert samples[source].tolist() == [100, 901, 102, 903, 904, 105]  # greedy and padding rows keep the argmax


def test_pick_launches_only_the_argmax_for_greedy_rows_and_one_call_for_a_uniform_batch(monkeypatch):
    from fi_engine.kernels import flashinfer as kernels

    e = Sampler(None, None, SimpleNamespace(), device=0, stream_ptr=0, max_batch=4, vocab_size=1000)
    ptr = SimpleNamespace(data=SimpleNamespace(ptr=1 << 40), shape=(64,))
    e._probs, e._softmax_ws, e._valid = ptr, ptr, None
    calls: list[tuple] = []
    e.argmax = lambda n: calls.append(("argmax", n))  # type: ignore[method-assign]
    monkeypatch.setattr(kernels, "sample_top_k_top_p", lambda *a: calls.append(("uniform", a[4:8])))
    e._sample_mixed = lambda v, n, rows, groups: calls.append(("mixed", n))
    v = SimpleNamespace(logits=None, ids=None)
    assert e.pick(v, 4, None) is False and calls == [("argmax", 4)]  # greedy: the argmax alone
    calls.clear()
    assert e.pick(v, 4, None, argmax_done=True) is False and calls == []  # the graph's argmax: nothing more
    assert e.pick(v, 2, [_req(0), _req(1)], argmax_done=True) is False and calls == []
    shared = Draws.seeded(9, True)
    p = SamplingParams(temperature=0.5, top_k=3, top_p=0.9)
    assert e.pick(v, 4, [_req(0, p, shared), None, _req(2, p, shared), None]) is True
    assert calls == [("uniform", (3, 0.9, 0.5, shared.generator))]  # no argmax, one call, scalar parameters
    calls.clear()
    assert e.pick(v, 2, [_req(0, p, shared), _req(1)]) is True
    assert calls == [("argmax", 2), ("mixed", 2)]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"overlap_steps": "yes"}, TypeError, "overlap_steps: expected True or False, got 'yes'"),
        ({"mixed_prefill": 1}, TypeError, "mixed_prefill: expected True or False, got 1"),
        ({"warm_serving": "no"}, TypeError, "warm_serving: expected True or False, got str"),
        ({"scheduler_delay_factor": -1}, ValueError, r"scheduler_delay_factor: expected a number in \[0, 100\]"),
        ({"scheduler_delay_factor": float("nan")}, ValueError, "scheduler_delay_factor: expected a number"),
        ({"scheduler_delay_factor": True}, ValueError, "scheduler_delay_factor: expected a number"),
        ({"scheduler_delay_factor": "2"}, ValueError, "scheduler_delay_factor: expected a number"),
        ({"scheduler_delay_factor": None}, ValueError, "scheduler_delay_factor: expected a number"),
    ],
)
def test_open_engine_checks_the_serving_settings_before_the_checkpoint(tmp_path, kwargs, error, match):
    from fi_engine.models.registry import open_engine

    with pytest.raises(error, match=match):
        open_engine(tmp_path / "no-checkpoint-here", **kwargs)


def test_the_serving_settings_refuse_a_bad_value_and_keep_the_last_good_one():
    e = bare_engine(overlap=True)
    e.scheduler_delay_factor = 2
    assert e.scheduler_delay_factor == 2.0 and isinstance(e.scheduler_delay_factor, float)
    with pytest.raises(TypeError, match="overlap_steps: expected True or False, got 1"):
        e.overlap_steps = 1  # type: ignore[assignment]
    e.mixed_prefill = True
    with pytest.raises(TypeError, match="mixed_prefill: expected True or False, got None"):
        e.mixed_prefill = None  # type: ignore[assignment]
    assert e.mixed_prefill is True
    for bad in (None, -0.5, 101, float("inf"), "3"):
        with pytest.raises(ValueError, match=r"scheduler_delay_factor: expected a number in \[0, 100\]"):
            e.scheduler_delay_factor = bad  # type: ignore[assignment]
    assert e.overlap_steps is True and e.scheduler_delay_factor == 2.0


# ---------------------------------------------------------------------------------------------- prefix caching


def cached_scheduler(num_pages=1 + 16, max_batch=3):
    s = Scheduler(KVCacheManager(num_pages, PS), PS, max_batch, 256, 512, 1000, (EOS,))
    s.prefix_caching = True
    return s


def test_a_prompt_sharing_full_pages_with_a_finished_one_takes_them_and_is_prefilled_past_them():
    s = cached_scheduler()
    system = list(range(1, 2 * PS + 1))  # two full pages
    a = s.submit([*system, 7, 8, 9], 2)
    s.admit()
    s.record([a], [50], prefill=True)  # its pass wrote the prompt: its two full pages are registered
    s.record(s.decode_rows(padded=False), [51])  # ends at max_new_tokens: its pages go back, the full ones cached
    assert a.finished and s.allocator.num_free == s.allocator.capacity
    b = s.submit([*system, 4, 5], 3)
    assert s.admit() == [b]
    assert b.cached == b.hit == 2 * PS and len(b.pages) == 3  # the two cached pages, then its own third
    arrays = prefill_layout(512, 3, 1 + 16 + 3).views(np.zeros(prefill_layout(512, 3, 20).total, np.int32))
    nnz, pages = fill_prefill([b], PS, arrays)
    assert nnz == 2 and pages == 3  # only the tokens past the cached pages are computed, attending to all three
    assert arrays["token_ids"][:2].tolist() == [4, 5] and arrays["positions"][:2].tolist() == [2 * PS, 2 * PS + 1]
    assert s.allocator.stats.hits == 2 * PS and s.allocator.stats.queries == len(a.prompt) + len(b.prompt)


def test_a_shared_prefix_is_matched_while_its_first_request_still_decodes_and_never_the_whole_prompt():
    s = cached_scheduler()
    prompt = list(range(1, PS + 1))  # exactly one page: the match leaves its last token to compute
    a = s.submit([*prompt, 99], 5)
    s.admit()
    s.record([a], [50], prefill=True)
    b = s.submit(prompt, 2)
    c = s.submit([*prompt, 99, 50, 3], 2)
    assert s.admit() == [b, c]
    assert b.cached == 0  # one page = the whole prompt: its last token is computed, so nothing is taken
    assert c.cached == PS and c.pages[0] == a.pages[0]  # a's first page, shared while a runs
    for r in (a, b, c):
        s.abort(r)
    assert s.allocator.num_free == s.allocator.capacity
    s.allocator.check()


def test_without_prefix_caching_the_pool_hands_out_what_a_page_allocator_does():
    plain = make(num_pages=1 + 16)
    pool = Scheduler(KVCacheManager(1 + 16, PS), PS, 3, 256, 512, 1000, (EOS,))
    for s in (plain, pool):
        reqs = [s.submit([i + 1] * (5 + 9 * i), 20) for i in range(4)]
        s.admit()
        s.record(s.active, [100] * len(s.active), prefill=True)
        s.abort(reqs[1])
        s.admit()
    assert [r.pages for r in plain.active] == [r.pages for r in pool.active]
    with pytest.raises(ValueError, match="prefix_caching: the scheduler's page pool caches nothing"):
        plain.prefix_caching = True
    with pytest.raises(TypeError, match="prefix_caching: expected True or False, got 'yes'"):
        pool.prefix_caching = "yes"  # type: ignore[assignment]


def test_the_step_api_with_prefix_caching_gives_the_same_tokens_and_prefills_fewer_rows():
    prompts = [[1] * (3 * PS) + [2, 3], [1] * (3 * PS) + [4], [1] * (2 * PS) + [5] * 7]
    runs = {}
    for on in (False, True):
        e = bare_engine(max_batch=2)
        e.prefix_caching = on
        rows = []
        for p in prompts:  # one after another: each finds what the ones before it left
            rid = e.add_request(p, 3, eos_token_ids=())
            out = drain(e)
            rows.append(e.filled[0])
            runs[on] = [*runs.get(on, []), [t for o in out[rid] for t in o.token_ids]]
            runs[on, "cached"] = [*runs.get((on, "cached"), []), out[rid][0].num_cached_tokens]
            assert all(o.num_cached_tokens is None for o in out[rid][1:])  # on the first output only
        runs[on, "rows"] = rows
        assert e.scheduler.allocator.num_free == e.scheduler.allocator.capacity
    assert runs[True] == runs[False]  # the stand-in's tokens depend on the prompt and output only
    assert runs[True, "cached"] == [0, 3 * PS, 2 * PS] and runs[False, "cached"] == [None] * 3
    assert runs[False, "rows"] == [len(p) for p in prompts]
    assert runs[True, "rows"] == [3 * PS + 2, 1, 7]  # past the 3 and 2 pages the first prompt left cached


def test_prefix_caching_is_refused_where_the_prefill_attention_reads_no_paged_cache():
    e = bare_engine()
    e.runner.family = SimpleNamespace(llama_pass=False)
    with pytest.raises(ValueError, match="prefix_caching: SimpleNamespace's prefill attention reads only"):
        e.prefix_caching = True
    e.runner.family, e.runner.comm = SimpleNamespace(llama_pass=True), object()
    with pytest.raises(ValueError, match="prefix_caching: not with tensor parallelism yet"):
        e.prefix_caching = True
    with pytest.raises(TypeError, match="prefix_caching: expected True or False, got 1"):
        e.prefix_caching = 1  # type: ignore[assignment]
    assert e.prefix_caching is False


@pytest.mark.parametrize("overlap,pipelined", [(False, False), (True, False), (True, True)])
def test_chunked_prefill_gives_the_running_streams_a_token_every_chunk_pass(overlap, pipelined):
    def run(chunked: bool):
        e = bare_engine(max_batch=3, num_pages=1 + 24, overlap=overlap, pipelined=pipelined, mixed=True)
        e.max_num_batched_tokens = 40
        e.chunked_prefill = chunked
        rows = []
        launch = e.passes.prefill_launch

        def counted(sched, reqs, riders=(), *args, **kwargs):  # each pass's token rows, as fill_prefill wrote them
            out = launch(sched, reqs, riders, *args, **kwargs)
            rows.append(e.filled[0])
            return out

        e.passes.prefill_launch = counted
        a = e.add_request([1, 2, 3], 24)
        first = {o.rid: len(o.token_ids) for o in e.step()}
        long = e.add_request(list(range(1, 121)), 3)
        per_call = [first]
        tokens: dict[int, list[int]] = {a: [], long: []}
        while e.has_unfinished:
            per_call.append({o.rid: len(o.token_ids) for o in e.step()})
            for r in e.scheduler.active:
                tokens[r.rid] = list(r.output)
        return e, a, long, rows, per_call, tokens

    e, a, long, rows, per_call, tokens = run(True)
    passes = [s for s in e.steps if s[0] == "mixed" and long in s[2]]
    assert len(passes) == 4 and all(s[1] == [a] for s in passes)  # 39 + 39 + 39 + 3 prompt rows, `a` in each
    assert max(rows) <= 40
    first, last = e.steps.index(passes[0]), e.steps.index(passes[-1])
    assert all(s[0] == "mixed" for s in e.steps[first : last + 1])  # no decode step holds the prompt back
    # while its chunks run, every step() call gives the running stream one token and the prompt none (the first
    # call may also take the decode step in flight before the first chunk)
    assert [c.get(long) for c in per_call[2:4]] == [None, None] and all(c[a] == 1 for c in per_call[2:4])
    assert sum(c.get(long, 0) for c in per_call) == 3 and sum(c.get(a, 0) for c in per_call) == 24
    *_, rows_off, _, tokens_off = run(False)
    assert max(rows_off) == 121 and tokens_off == tokens  # the prompt whole beside the rider: the same tokens


# speculative decoding (Engine.speculative_tokens; the drafts themselves: tests/engine/test_speculation.py)


def repeating(history) -> int:
    """The stand-in model: it repeats its text with a period of 7 tokens (its first token while shorter; prompt
    lookup predicts it all) and ends (EOS) once the text holds 50 tokens."""
    return EOS if len(history) >= 50 else int(history[-7] if len(history) >= 7 else history[0])


class _Choices:
    """What a verifying pass's ``full.argmax(axis=1).astype(...).get(stream=...)`` reads: each row's choice."""

    def __init__(self, choices):
        self.choices = np.array(choices, dtype=np.int32)

    def argmax(self, axis):
        return self

    def astype(self, dtype):
        return self

    def get(self, stream=None):
        return self.choices


def speculating_engine(model, k: int, pass_cost: float = 1.0, overlap: bool = False, pipelined: bool = False):
    e = bare_engine(
        max_batch=3,
        num_pages=1 + 24,
        token_of=lambda r: model([*r.prompt, *r.output]),
        overlap=overlap,
        pipelined=pipelined,
    )
    layout = prefill_layout(e.max_prefill_tokens, 3, 64, padded=True)
    e.runner.prefill_arrays = layout.views(np.zeros(layout.total, np.int32))
    passes = []

    def run_prefill(rows, riders_behind, slots, ahead, all_logits=False, last_head=True):
        assert all_logits and not last_head and riders_behind == 0 and ahead == 0
        fill_prefill(rows, PS, e.runner.prefill_arrays)  # (AssertionError for a draft position without its page)
        choices = []
        for r in rows:
            history = [*r.prompt, *r.output]
            choices.append(model(history))
            for d in r.draft:  # the row of each draft token: the choice after it
                history.append(d)
                choices.append(model(history))
        passes.append([len(r.draft) for r in rows])
        return None, 0, _Choices(choices)

    e.runner.run_prefill = run_prefill
    e.speculative_tokens = k
    fixed_costs(e, pass_cost)
    return e, passes


def fixed_costs(e, pass_cost: float, policy=None) -> None:
    """The device's time stands in too: ``e``'s policy (``policy``, or a fresh one) has a decode step cost 1 and a
    pass ``pass_cost``, and keeps them (the stand-ins' own times are noise)."""
    policy = DraftPolicy() if policy is None else policy
    policy.decode_s, policy.verify_s = 1.0, pass_cost
    policy.timed = lambda verify, seconds: None
    e.speculation_policy = policy


def step_to_the_end(e, rids) -> tuple[list[list[int]], int]:
    """``e.step()`` until nothing is unfinished: the tokens of each request of ``rids`` (in that order), and the
    calls it took."""
    got: dict[int, list[int]] = {r: [] for r in rids}
    steps = 0
    while e.has_unfinished:
        for o in e.step():
            got[o.rid] += o.token_ids
        steps += 1
    return [got[r] for r in rids], steps


@pytest.mark.parametrize(("overlap", "pipelined"), [(False, False), (True, False), (True, True)])
def test_speculation_gives_the_same_tokens_in_fewer_steps(overlap, pipelined) -> None:
    prompts = [[1, 2, 3, 4, 5, 6, 7] * 2, [9, 8, 7, 6, 5, 4, 3, 2], [11, 12, 13]]

    def run(k: int):
        e, passes = speculating_engine(repeating, k, overlap=overlap, pipelined=pipelined)
        rids = [e.add_request(p, 40) for p in prompts]
        got: dict[int, list[int]] = {r: [] for r in rids}
        steps = 0
        e.reported = [0, 0]  # the draft tokens and accepted ones the outputs reported
        while e.has_unfinished:
            for o in e.step():
                got[o.rid] += o.token_ids
                if o.num_draft_tokens is not None:
                    e.reported[0] += o.num_draft_tokens
                    e.reported[1] += o.num_accepted_tokens
            steps += 1
        return [got[r] for r in rids], steps, passes, e

    plain, plain_steps, none, _ = run(0)
    fast, fast_steps, passes, e = run(4)
    assert e.reported == [e.speculation_stats.drafted, e.speculation_stats.accepted]  # every verified draft reported
    assert fast == plain and not none
    assert plain[0][-1] == EOS and len(plain[1]) == 40  # one ends by its end-of-sequence token, one by its limit
    stats = e.speculation_stats
    assert stats.passes == len(passes) > 0 and stats.drafted == sum(map(sum, passes))
    # the texts repeat: the drafts are accepted, but the short prompt's first ones (its text repeats its first token
    # until it holds 7) and the drafts past the end-of-sequence token (this run: 81 of 107)
    assert stats.acceptance_rate > 0.7 and stats.tokens == stats.accepted + sum(map(len, passes))
    assert fast_steps <= 0.9 * plain_steps  # (the short prompt drafts little once its first drafts fail)
    assert e.scheduler.allocator.num_free == e.scheduler.allocator.capacity  # every page back


class _DeviceRows(np.ndarray):
    """A verifying pass's logits as the stand-in's device array: numpy, with CuPy's ``get``."""

    def get(self, stream=None):
        return np.asarray(self)


def test_a_request_that_asks_for_logprobs_is_speculated_and_gets_each_rows_logprobs() -> None:
    """A pass's rows give a request that asks for logprobs (and no control) its tokens' log-probabilities: the
    log-softmax of each row's raw logits at the token it took, and the top N, as a decode step gives them; a request
    that sets a control keeps the step from verifying."""
    vocab = 1000
    e, _ = speculating_engine(repeating, 4)
    e.runner.cupy = SimpleNamespace(
        asarray=np.asarray, arange=np.arange, log=np.log, exp=np.exp, argsort=np.argsort,
        take_along_axis=np.take_along_axis, asnumpy=np.asarray, cuda=e.runner.cupy.cuda,
    )  # fmt: skip
    rows_seen: list[np.ndarray] = []

    def run_prefill(rows, riders_behind, slots, ahead, all_logits=False, last_head=True):
        fill_prefill(rows, PS, e.runner.prefill_arrays)
        logits = []
        for r in rows:
            history = [*r.prompt, *r.output]
            for d in (None, *r.draft):
                if d is not None:
                    history.append(d)
                choice = repeating(history)
                row = -0.25 * np.abs(np.arange(vocab, dtype=np.float32) - choice)  # its peak at the choice
                row[(choice * 7) % vocab] += 0.1 * (len(history) % 5)  # and some other shape per position
                logits.append(row)
        full = np.stack(logits).view(_DeviceRows)
        rows_seen.append(np.asarray(full))
        return None, 0, full

    e.runner.run_prefill = run_prefill
    e.runner.vocab_shard = None
    e.processor = LogitsProcessor(e.runner.cupy, None, vocab, frozenset({EOS}))
    rid = e.add_request([1, 2, 3, 4, 5, 6, 7] * 2, 30, sampling=SamplingParams(logprobs=2))
    req = e._requests[rid]
    while e.has_unfinished:
        e.step()
    stats = e.speculation_stats
    # (the stand-in's prefill and decode steps give no logprobs: the entries are the passes' own, one per token taken)
    assert stats.passes > 0 and len(req.logprobs) == stats.tokens > stats.passes
    seen = np.concatenate(rows_seen)
    m = seen.max(axis=1, keepdims=True)
    ref = seen - (np.log(np.exp(seen - m).sum(axis=1, keepdims=True)) + m)  # float64 log-softmax of each row
    by_row = {}
    for row in ref:  # each row's choice (its argmax) with its log-probability and its top 2
        order = np.argsort(-row, kind="stable")[:2]
        by_row.setdefault(int(order[0]), []).append([(int(t), float(row[t])) for t in order])
    for lp in req.logprobs:  # each entry is some row's: its token the row's argmax, the values within 1e-5
        token = lp.top[0][0]
        assert any(
            abs(lp.logprob - top[0][1]) < 1e-5
            and [t for t, _ in lp.top] == [t for t, _ in top]
            and all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(lp.top, top, strict=True))
            for top in by_row[token]
        ), lp
    # a request that sets a control keeps the step from verifying
    passes = e.speculation_stats.passes
    e.add_request([1, 2, 3, 4, 5, 6, 7] * 2, 20, sampling=SamplingParams(min_tokens=3))
    while e.has_unfinished:
        e.step()
    assert e.speculation_stats.passes == passes


def test_a_request_that_asks_for_no_speculation_is_never_drafted_for() -> None:
    e, _ = speculating_engine(repeating, 4)
    off = e.add_request([1, 2, 3, 4, 5, 6, 7] * 2, 30, sampling=SamplingParams(speculative_decoding=False))
    on = e.add_request([1, 2, 3, 4, 5, 6, 7] * 2, 30)
    fed: list[dict[int, int]] = []
    run_prefill = e.runner.run_prefill

    def watched(rows, *args, **kwargs):
        fed.append({r.rid: len(r.draft) for r in rows})
        return run_prefill(rows, *args, **kwargs)

    e.runner.run_prefill = watched
    while e.has_unfinished:
        e.step()
    assert fed and all(f.get(off, 0) == 0 for f in fed) and any(f.get(on, 0) > 0 for f in fed)
    with pytest.raises(TypeError, match="speculative_decoding: expected True or False, got str"):
        SamplingParams(speculative_decoding="no")


def test_a_draft_stops_at_the_request_limit_and_speculation_is_checked(monkeypatch) -> None:
    e, passes = speculating_engine(repeating, 8)
    rid = e.add_request([1, 2, 3, 4, 5, 6, 7] * 2, 5)
    out: list[int] = []
    while e.has_unfinished:
        out += [t for o in e.step() if o.rid == rid for t in o.token_ids]
    assert out == [1, 2, 3, 4, 5] and all(n <= 3 for p in passes for n in p)  # at most 5 - 1 - len(output) drafted
    with pytest.raises(ValueError, match="speculative_tokens: expected an int in"):
        e.speculative_tokens = 17
    e.runner.family.llama_pass = False
    with pytest.raises(ValueError, match="speculative_tokens: .*Llama family's reads the paged cache"):
        e.speculative_tokens = 2
    assert Engine.speculative_tokens.__doc__ == Speculator.speculative_tokens.__doc__


def wandering(history) -> int:
    """A stand-in model whose text does not repeat itself: its suffixes recur (50 token ids), their continuations
    rarely do."""
    return 100 + (sum(history[-3:]) * 31 + len(history) * 17) % 50


def test_speculation_stops_verifying_drafts_that_are_not_accepted() -> None:
    def run(k: int):
        e, passes = speculating_engine(wandering, k)
        # (a pass giving nothing every 16 steps: 2 / 16 of the time)
        fixed_costs(e, 3.0, DraftPolicy(explore=16, explore_budget=0.2))
        tokens, steps = step_to_the_end(e, [e.add_request([1, 2, 3, 4, 5], 60) for _ in range(2)])
        return tokens, steps, passes, e

    plain, plain_steps, _, _ = run(0)
    fast, steps, passes, e = run(4)
    assert fast == plain
    # the first passes find the drafts rejected; then a pass (three decode steps' time here) is not worth its
    # expected tokens, and only every 16th step declined explores
    assert e.speculation_stats.acceptance_rate < 0.2 and 0 < len(passes) <= 12, (len(passes), e.speculation_stats)
    assert steps >= plain_steps - len(passes) * 4


def test_the_speculative_config_is_vllms_ngram_one_checked_by_key() -> None:
    e = bare_engine()
    assert e.speculative_config is None and e.speculative_tokens == 0
    e.speculative_config = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    assert e.speculative_tokens == 3
    assert e.speculative_config == {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_max": 2,
        "prompt_lookup_min": 1,
    }
    for config, error, message in [
        ({"method": "eagle", "num_speculative_tokens": 2}, ValueError, r"\['method'\]: 'ngram' .* or 'draft_model'"),
        ({"method": "ngram"}, ValueError, "'num_speculative_tokens' is required"),
        ({"num_speculative_tokens": 2, "draft": "x"}, ValueError, "unknown key 'draft'"),
        (
            {"num_speculative_tokens": 2, "model": "x"},
            ValueError,
            "'draft_model' method needs the draft model's engine",
        ),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, ValueError, "the 'ngram' method takes none"),
        ({"model": "x", "num_speculative_tokens": 2, "prompt_lookup_max": 2}, ValueError, "a size of the 'ngram'"),
        ({"model": 3, "num_speculative_tokens": 2}, TypeError, r"\['model'\]: expected the draft model's checkpoint"),
        ({"num_speculative_tokens": 17}, ValueError, r"\['num_speculative_tokens'\]: expected an int in"),
        ({"num_speculative_tokens": 2.5}, TypeError, "expected an int"),
        ({"num_speculative_tokens": 2, "prompt_lookup_max": 2, "prompt_lookup_min": 3}, ValueError, "_min"),
        ([("num_speculative_tokens", 2)], TypeError, "expected None or a mapping"),
    ]:
        with pytest.raises(error, match=message):
            e.speculative_config = config
        assert e.speculative_tokens in (0, 3)  # a refused config leaves speculation off or as it was
    e.speculative_config = None
    assert e.speculative_config is None and e.speculative_tokens == 0
    # the policy: kept while speculation is off and on again with the same count, made afresh for another
    e.speculative_tokens = 3
    policy = e.speculation_policy
    e.speculative_tokens = 0
    e.speculative_tokens = 3
    assert e.speculation_policy is policy
    e.speculative_tokens = 2
    assert e.speculation_policy is not policy
    mine = DraftPolicy(explore=4)
    e.speculation_policy = mine
    assert e.speculation_policy is mine
    e.speculative_tokens = 2
    assert e.speculation_policy is mine
    with pytest.raises(TypeError, match="speculation_policy: expected a DraftPolicy, got dict"):
        e.speculation_policy = {}


# speculative decoding by a draft model (Engine.draft_model): the draft engine is a second stand-in engine whose
# generate runs the real step loop and scheduler (its prefix cache included)


def draft_engine(model):
    d = bare_engine(max_batch=3, num_pages=1 + 40, token_of=lambda r: model([*r.prompt, *r.output]))
    d.runner.close = lambda: setattr(d, "closed_runner", True)
    d.model_dir = "draft-checkpoint"  # (no tokenizer.json there: the vocabulary sizes are compared)
    return d


def unrepeating(history) -> int:
    """A stand-in model whose text does not repeat (as :func:`wandering`) and whose token does not depend on the
    last one (the pipelined stand-in feeds a step launched ahead a placeholder for the token of the step in flight)."""
    return 100 + (sum(history[-4:-1]) * 31 + len(history) * 17) % 50


def off_by_one_in_three(history) -> int:
    """A draft model that agrees with :func:`unrepeating` except at every third position."""
    return unrepeating(history) + (1 if len(history) % 3 == 0 else 0)


@pytest.mark.parametrize(("overlap", "pipelined"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("drafter", [unrepeating, off_by_one_in_three])
def test_a_draft_model_gives_the_same_tokens_in_fewer_steps(overlap, pipelined, drafter) -> None:
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2] * 3, [11, 12, 13]]

    def run(k: int, draft=None):
        e, passes = speculating_engine(unrepeating, 0, overlap=overlap, pipelined=pipelined)
        if draft is not None:
            e.draft_model = draft
        e.speculative_tokens = k
        fixed_costs(e, 1.0)
        tokens, steps = step_to_the_end(e, [e.add_request(p, 40) for p in prompts])
        return tokens, steps, passes, e

    plain, plain_steps, _, _ = run(0)
    ngram, _, ngram_passes, _ = run(4)
    draft = draft_engine(drafter)
    fast, fast_steps, passes, e = run(4, draft)
    assert e.speculative_config == {"method": "draft_model", "model": "draft-checkpoint", "num_speculative_tokens": 4}
    assert fast == plain == ngram  # every way, the target's own tokens
    stats = e.speculation_stats
    assert stats.passes == len(passes) > 0 and stats.drafted == sum(map(sum, passes))
    if drafter is unrepeating:  # a draft model that agrees with the target: every draft token accepted
        assert stats.accepted == stats.drafted and fast_steps <= 0.4 * plain_steps
    else:  # one disagreement in three positions: some accepted, some not
        assert 0.3 < stats.acceptance_rate < 0.8 and fast_steps <= 0.6 * plain_steps
    assert stats.drafted > sum(map(sum, ngram_passes))  # (prompt lookup finds little in this text)
    # the draft engine's prefix cache served each request's text from its earlier drafts
    assert draft.prefix_caching and draft.prefix_cache_stats.hit_rate > 0.5, draft.prefix_cache_stats
    assert not draft.has_unfinished and draft.scheduler.allocator.num_free == draft.scheduler.allocator.capacity
    e.close = e.speculator.close  # (the stand-in runner has no close of its own)
    e.close()
    assert getattr(draft, "closed_runner", False) and e.draft_model is None and e.speculative_tokens == 0


def test_a_draft_model_is_checked_when_set(tmp_path) -> None:
    e = bare_engine()
    with pytest.raises(TypeError, match="draft_model: expected None or an engine"):
        e.draft_model = "a checkpoint"
    with pytest.raises(ValueError, match="draft_model: an engine cannot draft for itself"):
        e.draft_model = e
    big = draft_engine(wandering)
    big.runner.config = SimpleNamespace(vocab_size=1001, eos_token_ids=(EOS,))
    with pytest.raises(ValueError, match=r"its vocabulary \(1001 tokens\) does not fit this model's \(1000\)"):
        e.draft_model = big
    busy = draft_engine(wandering)
    busy.speculative_tokens = 2
    with pytest.raises(ValueError, match="the draft engine speculates itself"):
        e.draft_model = busy
    # the checkpoints' tokenizers, where both have one
    for name, vocab in (("target", {"a": 0, "b": 1}), ("draft", {"a": 1, "b": 0})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    e.model_dir = tmp_path / "target"
    other = draft_engine(wandering)
    other.model_dir = tmp_path / "draft"
    with pytest.raises(ValueError, match="draft tokenizer's 'a' is token 1, the target's 0"):
        e.draft_model = other
    assert e.draft_model is None
    other.model_dir = tmp_path / "target"  # (the same tokenizer)
    e.draft_model = other
    assert e.draft_model is other and other.prefix_caching
    with pytest.raises(ValueError, match="the 'ngram' method while a draft model is set"):
        e.speculative_config = {"method": "ngram", "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match=r"\['model'\]: 'elsewhere' is not the draft model set"):
        e.speculative_config = {"model": "elsewhere", "num_speculative_tokens": 2}
    e.speculative_config = {"model": str(tmp_path / "target"), "num_speculative_tokens": 2}
    assert e.speculative_config == {
        "method": "draft_model",
        "model": str(tmp_path / "target"),
        "num_speculative_tokens": 2,
    }
    replacement = draft_engine(wandering)
    e.draft_model = replacement  # the old one closed, the drafts now the new one's
    assert getattr(other, "closed_runner", False) and e.speculative_config["model"] == "draft-checkpoint"


def test_the_policy_times_only_steps_that_follow_one_another() -> None:
    """Other work before a step (a prefill pass, the caller's time between generate calls) is not its cost:
    ``Speculator.untimed`` (called as a prefill pass is launched) charges a pass waiting for its next step as it stands,
    and the next record starts the clock instead of giving a sample."""
    e = bare_engine()
    e.speculative_tokens = 2
    policy = e.speculation_policy
    e.speculator._recorded_at = (
        time.perf_counter() - 5.0
    )  # a record 5 s ago (then a prefill pass, or the caller's time)
    e.speculator._pass_s = 0.3  # a pass waiting for the step after it
    e.speculator.untimed()
    assert policy.verify_s == 0.3 and e.speculator._recorded_at is None and e.speculator._pass_s is None
    e.speculator.recorded(verify=False)  # the first record after: the clock starts, no sample of 5 s
    assert policy.decode_s is None and e.speculator._recorded_at is not None
    e.speculator.recorded(verify=False)
    assert policy.decode_s is not None and policy.decode_s < 1.0
