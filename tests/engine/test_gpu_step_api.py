"""The engine's step API (``add_request`` / ``step`` / ``abort_request``, fi_engine.runtime.stepping's ``StepEngine``)
and per-request sampling on a GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy only, no torch or transformers).

A random SmolLM2-like float16 Llama (helpers.random_llama) is served eagerly, as the decode CUDA graph, and as the
graph with the next step prepared ahead (``_prepare_ahead``, whose prepared step requests added or aborted in
between must invalidate), and eagerly and as the graph prepared ahead with ``overlap_steps`` (each decode step left
running when ``step()`` returns, its tokens reported by the next call; a request aborted meanwhile takes none and
its slot and pages go to the next request at once):

(a) driving ``step()`` to the end gives exactly ``generate()``'s tokens (greedy; the same prefills and decode steps
    in the same order, so the same batches: bit-equal), and a request's own end-of-sequence id ends it ("stop");
(b) an abort mid-generation frees the slot and the pages at once (the allocator's count), the next step reports it,
    and a queued request is then admitted and served: its tokens are the engine's own greedy choice at every
    position (teacher forcing with the engine's ``prefill_logits``: the argmax, or within ``TOL`` of it at a near
    tie), as are those of the requests that went on;
(c) per-request sampling: in a batch mixing greedy and sampled requests (seeded and unseeded) the greedy ones get
    exactly the tokens of the all-greedy run of the same batch; sampled requests with ``top_k=1`` get the greedy
    tokens; a greedy batch launches no sampling kernel (softmax, sampler, merge gather); a seeded request run
    alone twice gives the same tokens, each among the engine's top tokens at its position;
(d) requests added while others decode are served correctly (teacher forcing, as in (b));
(e) with ``mixed_prefill`` (eagerly, and as the graph prepared ahead with ``overlap_steps``, as the server runs it),
    a prefill pass that admits requests while others decode decodes those too, and every token is still the
    engine's own greedy choice (teacher forcing, as in (b)).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cp = pytest.importorskip("cupy", reason="the engine needs CuPy (python -m pip install '.[engine]')")

from helpers.fake_engine import next_token  # noqa: E402
from helpers.random_llama import VOCAB, save_random_llama  # noqa: E402
from helpers.step_api import drain  # noqa: E402
from helpers.yardstick import prompts  # noqa: E402

from fi_engine.kernels import flashinfer as kernels  # noqa: E402
from fi_engine.models.llama import LlamaEngine  # noqa: E402
from fi_engine.runtime.sample.speculation import DraftPolicy  # noqa: E402
from fi_engine.runtime.sampling_params import SamplingParams  # noqa: E402
from fi_engine.runtime.stepping import StepEngine, StepOutput  # noqa: E402

pytestmark = pytest.mark.gpu

MODES = ("eager", "graph", "graph-ahead", "eager-overlap", "graph-ahead-overlap", "eager-mixed", "graph-overlap-mixed")
# This random model's logits have a standard deviation of ~24 (hidden 576 after a unit-weight norm, a tied head of
# unit-variance rows): a token fed from the wrong context lands units below the best, while the prefill and decode
# kernels (teacher forcing recomputes a decode step's logits with the prefill's) may differ by a few hundredths.
# A near tie within 1 % of a standard deviation may go either way.
TOL = 0.25


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_llama(tmp_path_factory.mktemp("smollm2-like"), "float16", 64, (9, 3), 576, 1536, False)


@pytest.fixture(scope="module", params=MODES)
def engine(request, checkpoint):
    mode = request.param
    graph = mode.startswith("graph")
    with LlamaEngine(checkpoint, max_batch=4, page_size=16, max_seq_len=256, cuda_graph=graph) as e:
        e.runner.prepare_ahead = mode.startswith("graph-ahead") or mode == "graph-overlap-mixed"
        e.overlap_steps = "overlap" in mode
        e.mixed_prefill = mode.endswith("mixed")
        yield e
        assert not e.has_unfinished  # every test leaves the engine idle


def tokens_of(outs: list[StepOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def check_own_greedy(engine, prompt: list[int], out: list[int]) -> None:
    """Every token of ``out`` is the engine's own greedy choice after ``prompt`` + the tokens before it (teacher
    forcing with prefill_logits), up to a near tie within ``TOL``."""
    lg = engine.prefill_logits([prompt + out[:-1]])[0]
    for t, tok in enumerate(out):
        row = lg[len(prompt) - 1 + t]
        assert row[tok] >= float(row.max()) - TOL, (t, tok, int(row.argmax()))


def free_pages(engine) -> int:
    return engine.scheduler.allocator.num_free


def capacity(engine) -> int:
    return engine.scheduler.allocator.capacity


# ------------------------------------------------------------------------------------------------------------ (a)


def test_the_engine_is_a_step_engine(engine):
    assert isinstance(engine, StepEngine)
    assert engine.step() == [] and not engine.has_unfinished


def test_step_to_the_end_gives_exactly_generates_tokens(engine):
    ps = prompts((3, 16, 29, 50, 7, 12), VOCAB, seed=3)  # six requests, four slots: two wait
    limits = [24, 9, 17, 30, 5, 12]
    want = engine.generate(ps, limits, eos_token_ids=())
    rids = [engine.add_request(p, m, eos_token_ids=()) for p, m in zip(ps, limits, strict=True)]
    seen = drain(engine)
    assert [tokens_of(seen[r]) for r in rids] == want.tokens
    assert [seen[r][-1].finish_reason for r in rids] == ["length"] * 6
    assert all(o.finish_reason is None for r in rids for o in seen[r][:-1])
    assert free_pages(engine) == capacity(engine)
    assert engine.generate(ps, limits, eos_token_ids=()).tokens == want.tokens  # generate after steps: the same


def test_overlapped_steps_report_a_decode_steps_tokens_with_the_next_call(engine):
    (p,) = prompts((10,), VOCAB, seed=12)
    want = engine.generate([p], 6, eos_token_ids=()).tokens[0]
    rid = engine.add_request(p, 6, eos_token_ids=())
    per_call = [[t for o in engine.step() for t in o.token_ids] for _ in range(7)]
    assert [t for call in per_call for t in call] == want
    if engine.overlap_steps:  # the prefill's token, then one per call: the step launched by the call before
        assert per_call == [[t] for t in want] + [[]] and engine._inflight is None
    else:  # the prefill's token and the first decode step's, then one per call
        assert per_call == [want[:2]] + [[t] for t in want[2:]] + [[], []]
    assert not engine.has_unfinished and rid not in engine._requests


def test_a_requests_own_eos_id_ends_it_with_stop(engine):
    ps = prompts((11, 20), VOCAB, seed=4)
    want = engine.generate(ps, 20, eos_token_ids=()).tokens
    stop = want[0][6]
    end = want[0].index(stop) + 1  # its first occurrence
    a = engine.add_request(ps[0], 20, eos_token_ids=[stop])
    b = engine.add_request(ps[1], 20, eos_token_ids=())
    seen = drain(engine)
    assert tokens_of(seen[a]) == want[0][:end] and seen[a][-1].finish_reason == "stop"
    assert len(tokens_of(seen[b])) == 20 and seen[b][-1].finish_reason == "length"
    assert tokens_of(seen[b])[:end] == want[1][:end]  # the same batches until a left
    check_own_greedy(engine, ps[1], tokens_of(seen[b]))


# ------------------------------------------------------------------------------------------------------------ (b)


def test_abort_mid_generation_frees_the_slot_and_pages_and_a_queued_request_is_served(engine):
    ps = prompts((40, 33, 9, 21, 14), VOCAB, seed=5)
    rids = [engine.add_request(p, 40, eos_token_ids=()) for p in ps]  # five requests, four slots
    got: dict[int, list[int]] = {r: [] for r in rids}
    for _ in range(6):
        for o in engine.step():
            got[o.rid].extend(o.token_ids)
    sched = engine.scheduler
    victim = sched.slots[1]
    assert victim is not None and victim.rid == rids[1] and len(sched.pending) == 1
    held = len(victim.pages)
    before = free_pages(engine)
    engine.abort_request(rids[1])
    assert free_pages(engine) == before + held  # at once, before any step
    assert sched.slots[1] is None and victim.finish_reason == "abort"
    out = engine.step()
    assert out[0] == StepOutput(rids[1], (), "abort")
    assert sched.slots[1] is not None and sched.slots[1].rid == rids[4]  # the queued one, in the freed slot
    for o in out[1:]:
        got[o.rid].extend(o.token_ids)
    engine.abort_request(rids[1])  # again: nothing
    for _ in range(3):
        for o in engine.step():
            got[o.rid].extend(o.token_ids)
    # nothing queued now: the step prepared ahead (graph-ahead) holds rids[3]'s row and must be made again
    assert not sched.pending
    engine.abort_request(rids[3])
    for rid, outs in drain(engine).items():
        assert rid != rids[1]
        got[rid].extend(tokens_of(outs))
    assert free_pages(engine) == capacity(engine)
    for i in (0, 2, 4):
        assert len(got[rids[i]]) == 40
        check_own_greedy(engine, ps[i], got[rids[i]])
    check_own_greedy(engine, ps[3], got[rids[3]])  # what it got before the abort


def test_abort_of_every_request_leaves_all_pages_free_and_the_engine_serving(engine):
    ps = prompts((30, 5, 17, 44, 8, 2), VOCAB, seed=6)
    rids = [engine.add_request(p, 60, eos_token_ids=()) for p in ps]
    engine.step()
    engine.step()
    for r in rids[::-1]:
        engine.abort_request(r)
    assert free_pages(engine) == capacity(engine) and not engine.has_unfinished
    assert sorted(o.rid for o in engine.step()) == rids
    want = engine.generate(ps[:2], 10, eos_token_ids=()).tokens  # the engine serves on, from a clean state
    for p, w in zip(ps[:2], want, strict=True):
        check_own_greedy(engine, p, w)


# ------------------------------------------------------------------------------------------------------------ (c)


@pytest.fixture
def sampling_calls(monkeypatch):
    """Counts of the sampling launches (softmax, the sampler, the merge gather) made by the engine."""
    counts = {"softmax": 0, "sample_rows": 0, "sample_top_k_top_p": 0}
    for name in counts:
        original = getattr(kernels, name)

        def counted(*a, _name=name, _f=original, **k):
            counts[_name] += 1
            return _f(*a, **k)

        monkeypatch.setattr(kernels, name, counted)
    return counts


def run_batch(engine, ps, limit, samplings):
    rids = [engine.add_request(p, limit, sampling=s, eos_token_ids=()) for p, s in zip(ps, samplings, strict=True)]
    seen = drain(engine)
    return [tokens_of(seen[r]) for r in rids]


def test_greedy_rows_of_a_mixed_batch_get_the_all_greedy_tokens(engine, sampling_calls):
    ps = prompts((12, 30, 7, 22), VOCAB, seed=7)
    greedy = run_batch(engine, ps, 16, [None] * 4)
    assert sampling_calls == {"softmax": 0, "sample_rows": 0, "sample_top_k_top_p": 0}  # no launch for greedy rows
    hot_seeded = SamplingParams(temperature=1.0, top_k=50, seed=11)
    hot_shared = SamplingParams(temperature=0.7, top_p=0.9)
    mixed = run_batch(engine, ps, 16, [None, hot_seeded, SamplingParams(), hot_shared])
    assert mixed[0] == greedy[0] and mixed[2] == greedy[2]
    # every step: one softmax, one sampler call per stream (the seeded request's own, the shared one)
    steps = sampling_calls["softmax"]
    assert steps >= 16 and sampling_calls["sample_rows"] == 2 * steps and sampling_calls["sample_top_k_top_p"] == 0
    assert all(len(out) == 16 and all(0 <= t < VOCAB for t in out) for out in mixed[1::2])
    lg = engine.prefill_logits([ps[1] + mixed[1][:-1]])[0]
    for t, tok in enumerate(mixed[1]):  # top_k=50: among the engine's own top 50, plus slack for near ties
        assert tok in np.argsort(lg[len(ps[1]) - 1 + t])[-64:], (t, tok)


def test_sampled_rows_with_top_k_one_get_the_greedy_tokens(engine):
    ps = prompts((9, 26, 15, 40), VOCAB, seed=8)
    greedy = run_batch(engine, ps, 12, [None] * 4)
    top1 = [
        SamplingParams(temperature=0.8, top_k=1, seed=1),
        None,
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=0.3, top_k=1, top_p=0.5, seed=2),
    ]
    assert run_batch(engine, ps, 12, top1) == greedy  # mixed streams and parameters
    assert run_batch(engine, ps, 12, [SamplingParams(temperature=1.0, top_k=1)] * 4) == greedy  # the shared stream
    uniform = engine.generate(ps, 12, eos_token_ids=(), sampling=SamplingParams(temperature=2.0, top_k=1, seed=3))
    assert uniform.tokens == greedy  # generate's single call over every row


def test_a_seeded_request_alone_reproduces_its_tokens(engine):
    # the logits' standard deviation of ~24 (see TOL) makes temperature 1 nearly greedy: 20 spreads the draws over
    # the top 5
    (p,) = prompts((13,), VOCAB, seed=9)
    s = SamplingParams(temperature=20.0, top_k=5, seed=1234)
    first = run_batch(engine, [p], 20, [s])[0]
    assert run_batch(engine, [p], 20, [s])[0] == first
    other = run_batch(engine, [p], 20, [SamplingParams(temperature=20.0, top_k=5, seed=4321)])[0]
    assert other != first  # 20 draws among 5 tokens: equal only with negligible probability
    lg = engine.prefill_logits([p + first[:-1]])[0]
    for t, tok in enumerate(first):
        assert tok in np.argsort(lg[len(p) - 1 + t])[-8:], (t, tok)  # the top 5, plus slack for float16 near ties
    again = engine.generate([p], 20, eos_token_ids=(), sampling=s)  # generate's own stream: reproducible too
    assert engine.generate([p], 20, eos_token_ids=(), sampling=s).tokens == again.tokens


def test_pipelined_decode_draws_what_one_step_at_a_time_draws(engine):
    """ServingLoop.pipelined_decode (the graph modes prepared ahead launch a step before reading the one in
    flight): a batch of greedy and seeded sampled rows with different parameters (the per-row path, whose
    parameters are staged in host memory) gets exactly the tokens of the same batch one step at a time, through
    the step API and through generate with one seeded stream; with an end-of-sequence id ending one request early."""
    ps = prompts((14, 29, 8, 21), VOCAB, seed=13)
    samplings = [
        None,
        SamplingParams(temperature=20.0, top_k=5, seed=21),
        SamplingParams(temperature=10.0, top_p=0.9, seed=22),
        SamplingParams(temperature=20.0, top_k=3, seed=23),
    ]
    runs = {}
    for pipelined in (True, False):
        engine.pipelined_decode = pipelined
        try:
            rids = [engine.add_request(p, 18, sampling=s, eos_token_ids=()) for p, s in zip(ps, samplings, strict=True)]
            seen = drain(engine)
            whole = engine.generate(ps, 18, eos_token_ids=(), sampling=SamplingParams(temperature=20.0, seed=5))
        finally:
            del engine.pipelined_decode  # the class's (True)
        runs[pipelined] = ([tokens_of(seen[r]) for r in rids], whole.tokens)
    assert runs[True] == runs[False]
    assert len({tuple(t) for t in runs[True][0][1:]}) == 3  # the sampled rows differ from each other
    stop = runs[True][0][0][5]  # the greedy request's 6th token ends it early; the others go on as before
    end = runs[True][0][0].index(stop) + 1
    rid = engine.add_request(ps[0], 18, eos_token_ids=[stop])
    others = [
        engine.add_request(p, 18, sampling=s, eos_token_ids=()) for p, s in zip(ps[1:], samplings[1:], strict=True)
    ]
    seen = drain(engine)
    assert tokens_of(seen[rid]) == runs[True][0][0][:end] and seen[rid][-1].finish_reason == "stop"
    got = [tokens_of(seen[r]) for r in others]
    # the graph pads the batch to its rows, so the others' logits do not change when one row leaves; eagerly the
    # batch shrinks (another GEMM shape): the same tokens until then
    assert [len(t) for t in got] == [18] * 3
    assert (
        got == runs[True][0][1:]
        if engine.runner.graph is not None
        else [t[:end] for t in got] == [t[:end] for t in runs[True][0][1:]]
    )


def test_each_decode_step_replays_the_smallest_graph_holding_its_requests(engine):
    """The decode graphs, one per batch size of ``decode_batches(4)`` = 1, 2, 4: three requests in slots 0-2 step
    as the graph of 4 rows, then, as the request in the highest slot leaves, as the graphs of 2 and 1; every token is
    the engine's own greedy choice (teacher forcing), so no graph reads another's rows or plan."""
    if engine.runner.graph is None:
        pytest.skip("eager steps run their rows unpadded")
    assert engine.decode_graph_batches == (1, 2, 4) and sorted(engine.runner.graphs) == [1, 2, 4]
    assert engine.runner.graph is engine.runner.graphs[4]
    replays: list[int] = []
    for n, g in engine.runner.graphs.items():
        g.launch = lambda n=n, launch=g.launch: (replays.append(n), launch())[1]
    try:
        ps = prompts((5, 9, 14), VOCAB, seed=17)
        limits = [20, 12, 4]  # slots 0, 1, 2: the last slot empties first
        rids = [engine.add_request(p, m, eos_token_ids=()) for p, m in zip(ps, limits, strict=True)]
        seen = drain(engine)
    finally:
        for g in engine.runner.graphs.values():
            del g.launch  # the class's method again
    # a prefill gives each request its first token; each decode step one more
    assert replays == [4] * 3 + [2] * 8 + [1] * 8
    for p, r, m in zip(ps, rids, limits, strict=True):
        out = tokens_of(seen[r])
        assert len(out) == m
        check_own_greedy(engine, p, out)


# ------------------------------------------------------------------------------------------------------------ (d)


def test_requests_added_while_others_decode_are_served(engine):
    ps = prompts((18, 6, 35, 11, 27, 3), VOCAB, seed=10)
    limits = [30, 25, 12, 20, 9, 15]
    got: dict[int, list[int]] = {}
    rids = []

    def step(times: int) -> None:
        for _ in range(times):
            for o in engine.step():
                got.setdefault(o.rid, []).extend(o.token_ids)

    rids += [engine.add_request(ps[0], limits[0], eos_token_ids=()), engine.add_request(ps[1], limits[1])]
    step(5)
    rids.append(engine.add_request(ps[2], limits[2], eos_token_ids=()))  # joins the decoding batch
    step(3)
    rids += [engine.add_request(p, m, eos_token_ids=()) for p, m in zip(ps[3:], limits[3:], strict=True)]
    step(1)  # admitted into the free slots, the others queued
    assert engine.scheduler.pending
    for rid, outs in drain(engine).items():
        got.setdefault(rid, []).extend(tokens_of(outs))
    assert free_pages(engine) == capacity(engine)
    for rid, p, m in zip(rids, ps, limits, strict=True):
        out = got[rid]
        assert len(out) == m or (rid == rids[1] and out[-1] == 2)  # rids[1] keeps the checkpoint's eos (id 2)
        check_own_greedy(engine, p, out)


# ------------------------------------------------------------------------------------------------------------ (e)


def test_a_mixed_prefill_pass_decodes_the_running_requests(engine):
    if not engine.mixed_prefill:
        pytest.skip("mixed_prefill is off in this mode")
    rider_counts: list[int] = []  # per prefill pass: the decoding requests it carried
    launch = engine.passes.prefill_launch

    def counted(sched, reqs, riders=(), all_logits=False, behind=False, graph_slots=None):
        rider_counts.append(len(riders))
        return launch(sched, reqs, riders, all_logits, behind, graph_slots)

    engine.passes.prefill_launch = counted
    try:
        ps = prompts((21, 4, 33, 17, 9), VOCAB, seed=23)
        limits = [28, 26, 14, 19, 11]
        got: dict[int, list[int]] = {}
        rids = [engine.add_request(ps[0], limits[0], eos_token_ids=())]
        for i in range(1, 5):  # each request joins a batch that is decoding: its prefill pass carries the others
            for _ in range(3):
                for o in engine.step():
                    got.setdefault(o.rid, []).extend(o.token_ids)
            rids.append(engine.add_request(ps[i], limits[i], eos_token_ids=()))
        for rid, outs in drain(engine).items():
            got.setdefault(rid, []).extend(tokens_of(outs))
    finally:
        del engine.passes.prefill_launch  # the class's method again
    assert rider_counts[0] == 0 and rider_counts[1:] and all(n >= 1 for n in rider_counts[1:]), rider_counts
    assert free_pages(engine) == capacity(engine)
    for rid, p, m in zip(rids, ps, limits, strict=True):
        assert len(got[rid]) == m
        check_own_greedy(engine, p, got[rid])


# ------------------------------------------------------------------------------------------------------------ (f)


def test_prefix_caching_serves_a_shared_system_prompt_with_the_same_tokens(engine):
    """Automatic prefix caching (Engine.prefix_caching) in every mode: a conversation's first turn fills the
    cache, then three turns that begin with the same 40-token system prompt, added together, each take its two full
    pages and are prefilled past them. Their tokens equal those of the same run with the cache off (the cached K/V
    are what their own prefill would have computed, from another pass shape), and each is the engine's own greedy
    choice by teacher forcing."""
    system = prompts((40,), VOCAB, seed=31)[0]
    turns = [system + p for p in prompts((5, 9, 17, 3), VOCAB, seed=32)]

    def run(on: bool) -> list[list[int]]:
        engine.prefix_caching = on
        first = engine.add_request(turns[0], 12, eos_token_ids=())
        got = drain(engine)
        rids = [engine.add_request(p, 12, eos_token_ids=()) for p in turns[1:]]
        got.update(drain(engine))
        return [tokens_of(got[r]) for r in (first, *rids)]

    try:
        off = run(False)
        before = engine.prefix_cache_stats.hits
        on = run(True)
        hits = engine.prefix_cache_stats.hits - before
    finally:
        engine.prefix_caching = False
    assert hits == 3 * 32, hits  # turns 1..3: the system prompt's two full pages of 16 tokens each
    assert on == off
    assert free_pages(engine) == capacity(engine)
    for p, out in zip(turns, on, strict=True):
        check_own_greedy(engine, p, out)


def test_chunked_prefill_gives_the_same_tokens_as_whole_prompts(engine):
    """Chunked prefill (Engine.chunked_prefill) in every mode, passes of 40 token rows: two requests decode, then
    prompts of 150 and 97 tokens arrive and are prefilled in chunks (beside the decoding ones where the mode mixes),
    each chunk continuing from the K/V the last one wrote. Every request's tokens equal those of the same run with
    whole prompts (the chunks' K/V are what one pass computes, from other pass shapes), and each is the engine's own
    greedy choice by teacher forcing; the prompt's passes never exceed 40 rows."""
    short = prompts((9, 14), VOCAB, seed=51)
    long = prompts((150, 97), VOCAB, seed=52)
    rows: list[int] = []
    launch = engine.passes.prefill_launch

    def counted(sched, reqs, riders=(), *args, **kwargs):  # the token rows of each pass (fill_prefill's nnz)
        rows.append(sum(len(r.prompt[r.cached : r.chunk_end]) for r in reqs if not r.output) + len(riders))
        return launch(sched, reqs, riders, *args, **kwargs)

    def run(on: bool) -> list[list[int]]:
        engine.chunked_prefill = on
        got: dict[int, list[int]] = {}
        rids = [engine.add_request(p, 24, eos_token_ids=()) for p in short]
        for _ in range(3):
            for o in engine.step():
                got.setdefault(o.rid, []).extend(o.token_ids)
        rids += [engine.add_request(p, 12, eos_token_ids=()) for p in long]
        for rid, outs in drain(engine).items():
            got.setdefault(rid, []).extend(tokens_of(outs))
        return [got[r] for r in rids]

    engine.max_num_batched_tokens = 40
    try:
        whole = run(False)
        engine.passes.prefill_launch = counted
        chunked = run(True)
    finally:
        engine.chunked_prefill = False
        engine.max_num_batched_tokens = engine.scheduler.max_prefill_tokens
        engine.passes.__dict__.pop("prefill_launch", None)  # the class's method again
    assert max(rows) <= 40 and len(rows) >= (150 + 97) // 40, rows
    assert chunked == whole
    assert free_pages(engine) == capacity(engine)
    for p, out in zip([*short, *long], chunked, strict=True):
        check_own_greedy(engine, p, out)


def test_speculative_decoding_gives_the_same_tokens(engine):
    """Speculative decoding by prompt lookup (Engine.speculative_tokens = 4) in every mode: prompts that repeat a
    block (their drafts: the block's continuation) and one that does not, with generate and the step API. Every
    request's tokens equal those of the same run without speculation (the verifying pass's greedy choices, from the
    prefill's kernels) and are the engine's own greedy choice by teacher forcing; passes ran and drafts were fed."""
    block = prompts((23,), VOCAB, seed=61)[0]
    ps = [block * 3, prompts((31,), VOCAB, seed=62)[0], block * 2 + block[:5]]

    def run(k: int) -> tuple[list[list[int]], list[list[int]]]:
        engine.speculative_tokens = k
        engine.speculation_policy = DraftPolicy()  # measured afresh: the first pass verifies
        stepped = [engine.add_request(p, 20, eos_token_ids=()) for p in ps]
        got = {rid: tokens_of(outs) for rid, outs in drain(engine).items()}
        return engine.generate(ps, 20, eos_token_ids=()).tokens, [got[r] for r in stepped]

    before = engine.speculation_stats.passes
    try:
        plain = run(0)
        fast = run(4)
    finally:
        engine.speculative_tokens = 0
    stats = engine.speculation_stats
    assert stats.passes > before and stats.drafted > 0, stats
    assert fast == plain
    assert free_pages(engine) == capacity(engine)
    for p, out in zip(ps, fast[0], strict=True):
        check_own_greedy(engine, p, out)


def test_speculative_decoding_samples_from_each_requests_distribution(engine):
    """Sampled requests with speculation on (prompts that repeat a block), beside a greedy one: ``top_k=1`` gives the
    greedy tokens exactly; each token of a ``top_k=3`` request is among the engine's three most likely at its
    position (teacher forcing, within ``TOL`` of the third's logit); drafts of the sampled requests were verified; a
    seeded request (never speculated: its draws stay its own) run twice gives the same tokens."""
    block = prompts((19,), VOCAB, seed=63)[0]
    ps = [block * 3, block * 2 + block[:7], block * 3 + block[:2]]
    greedy_run = engine.generate(ps, 16, eos_token_ids=()).tokens
    engine.speculative_tokens = 4
    engine.speculation_policy = DraftPolicy()  # measured afresh: the first pass verifies
    try:
        before = engine.speculation_stats.drafted
        rids = [engine.add_request(p, 16, sampling=SamplingParams(1.0, 1), eos_token_ids=()) for p in ps]
        got = {r: tokens_of(o) for r, o in drain(engine).items()}
        assert [got[r] for r in rids] == greedy_run
        top3 = engine.add_request(ps[0], 16, sampling=SamplingParams(1.0, 3), eos_token_ids=())
        other = engine.add_request(ps[1], 16, eos_token_ids=())  # a greedy request beside it
        out = {r: tokens_of(o) for r, o in drain(engine).items()}
        assert out[other] == greedy_run[1]
        drafted = engine.speculation_stats.drafted - before
        runs = []
        for _ in range(2):
            rid = engine.add_request(ps[2], 16, sampling=SamplingParams(1.0, 3, seed=11), eos_token_ids=())
            runs.append(tokens_of(drain(engine)[rid]))
    finally:
        engine.speculative_tokens = 0
    assert drafted > 0 and runs[0] == runs[1]
    logits = engine.prefill_logits([ps[0] + out[top3][:-1]])[0]
    for t, token in enumerate(out[top3]):
        row = logits[len(ps[0]) - 1 + t]
        assert row[token] >= np.sort(row)[-3] - TOL, (t, token)
    assert free_pages(engine) == capacity(engine)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """A second random model of the same vocabulary (another width: other weights). Random models with a tied head
    tend to choose alike (the last hidden state stays close to the input token's embedding), so its drafts are
    accepted about as often as the target's own: this run checks that a different model drafts the same way."""
    return save_random_llama(tmp_path_factory.mktemp("other-llama"), "float16", 64, (8, 2), 512, 768, False)


@pytest.mark.parametrize("draft_of", ["same", "other"])
def test_a_draft_model_gives_the_same_tokens(engine, checkpoint, other_checkpoint, draft_of):
    """Speculative decoding by a draft model (``Engine.draft_model``, 4 tokens a pass) in every mode, the draft
    engine made as vLLM's option makes it (eager or CUDA graph as the target): ``same``, the target's own checkpoint
    (its greedy drafts are the target's choices up to the prefill and decode kernels' rounding: at least 90 % of the
    draft tokens accepted), and ``other``, another random model. Prompts that
    do not repeat (prompt lookup would find nothing), with generate and the step API: every request's tokens equal
    those without speculation; the draft engine's prefix cache served the texts of its later drafts; every page of
    both engines is back; setting the draft model to None closes its engine."""
    ps = prompts((29, 41, 7), VOCAB, seed=64)
    plain = engine.generate(ps, 24, eos_token_ids=()).tokens
    draft = LlamaEngine(
        checkpoint if draft_of == "same" else other_checkpoint,
        max_batch=4,
        page_size=16,
        max_seq_len=256 + 4,
        cuda_graph=engine.cuda_graph,
    )
    engine.draft_model = draft
    before = dict(vars(engine.speculation_stats))
    try:
        engine.speculative_tokens = 4
        engine.speculation_policy = DraftPolicy()  # measured afresh: the first pass verifies
        assert engine.speculative_config["method"] == "draft_model"
        fast = engine.generate(ps, 24, eos_token_ids=()).tokens
        stepped = [engine.add_request(p, 24, eos_token_ids=()) for p in ps]
        got = {rid: tokens_of(outs) for rid, outs in drain(engine).items()}
    finally:
        engine.speculative_tokens = 0
        stats = {n: v - before[n] for n, v in vars(engine.speculation_stats).items()}
        hit_rate = draft.prefix_cache_stats.hit_rate
        draft_idle = free_pages(draft) == capacity(draft) and not draft.has_unfinished
        engine.draft_model = None
    assert fast == plain and [got[r] for r in stepped] == plain
    assert stats["passes"] > 0 and stats["drafted"] > 0, stats
    if draft_of == "same":
        assert stats["accepted"] >= 0.9 * stats["drafted"], stats
    print(f"{draft_of}: {stats}, draft prefix-cache hit rate {hit_rate:.2f}")
    assert hit_rate > (0.5 if draft_of == "same" else 0.0) and draft_idle  # (other: few drafts, fewer hits)
    assert draft._closed and engine.draft_model is None
    assert free_pages(engine) == capacity(engine)


def joint_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The sampler's distribution of one row, in float64 from its definition: the softmax at ``temperature`` over the
    tokens both among its ``top_k`` most likely and in its ``top_p`` nucleus, renormalized."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    out = np.zeros_like(p)
    mass = 0.0
    for rank, t in enumerate(np.argsort(-p, kind="stable")):
        if rank >= top_k or mass >= top_p:
            break
        out[t] = p[t]
        mass += p[t]
    return out / out.sum()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 8, 1.0), (0.7, 4, 1.0), (1.3, 8, 0.8), (0.9, 5, 0.6)]
)
def test_verifying_pass_rows_are_sampled_from_each_rows_distribution(temperature, top_k, top_p):
    """``kernels.sample_logit_rows`` (a sampled request's rows in a verifying pass): 20,000 rows of the same logits,
    each drawn with its own parameters in one call, follow the reference distribution: every frequency within 0.012
    of its probability (about 4 standard deviations at this count), no token outside the cut drawn."""
    logits = np.array([2.0, 1.5, 1.4, 0.3, -0.2, 0.9, -1.0, 0.0], dtype=np.float32)
    n = 20_000
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        tokens = kernels.sample_logit_rows(
            cp.asarray(np.repeat(logits[None, :], n, axis=0)),
            cp.full(n, temperature, cp.float32),
            cp.full(n, top_k, cp.int32),
            cp.full(n, top_p, cp.float32),
            kernels.generator(17),
            stream.ptr,
        ).get(stream=stream)
    want = joint_distribution(logits.astype(np.float64), temperature, top_k, top_p)
    got = np.bincount(tokens, minlength=len(logits)) / n
    assert np.abs(got - want).max() < 0.012, (got, want)
    assert not got[want == 0].any()


# ------------------------------------------------------------------------------------------------------------ (g)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def test_logprobs_are_the_log_softmax_of_the_engines_own_logits(engine):
    """``SamplingParams.logprobs``: each token's log-probability and the top 5 are those of the engine's own logits
    (teacher forcing with prefill_logits, whose kernels differ from the decode step's: the chosen token's within
    0.1, the other four within 0.25 -- on this random checkpoint a less likely token's log-probability moved 0.16
    between the two paths on an H100 when the decode step's GEMMs were the skinny GEMM's, chosen by timing), for a
    request alone and beside requests that ask nothing; a graph's rows too."""
    ps = prompts((14, 30, 7), VOCAB, seed=41)
    sp = SamplingParams(logprobs=5)
    rids = [engine.add_request(ps[0], 10, sampling=sp, eos_token_ids=())]
    rids += [engine.add_request(p, 10, eos_token_ids=()) for p in ps[1:]]
    got = drain(engine)
    outs = got[rids[0]]
    tokens = tokens_of(outs)
    entries = [e for o in outs for e in (o.logprobs or ())]
    assert len(entries) == len(tokens) == 10 and all(o.logprobs is None for r in rids[1:] for o in got[r])
    lg = engine.prefill_logits([ps[0] + tokens[:-1]])[0]
    for t, (tok, entry) in enumerate(zip(tokens, entries, strict=True)):
        ref = log_softmax(lg[len(ps[0]) - 1 + t])
        assert entry.logprob == pytest.approx(ref[tok], abs=0.1), t
        assert len(entry.top) == 5 and entry.top[0][1] >= entry.top[-1][1]
        worst = max(abs(v - ref[i]) for i, v in entry.top)
        assert worst < 0.25, (t, worst)
        assert entry.top[0][0] == tok or ref[entry.top[0][0]] - ref[tok] < TOL / 10  # greedy: the top one
    assert free_pages(engine) == capacity(engine)


def test_logprobs_come_with_speculation_from_the_verifying_passes_rows(engine):
    """With speculation on (prompt lookup, prompts that repeat a block), a request that asks for logprobs is
    speculated: passes ran, and each token's log-probability and top 3 are those of the engine's own logits
    (teacher forcing), its tokens the same as without speculation. Within 0.1 plus 1 % of the value: the repeated
    block makes the random model sure of its tokens (the others' log-probabilities reach -80 and below), and the
    verifying pass's hidden rows differ from prefill_logits' by the bfloat16 rounding of their different kernels, which
    moves a logit in proportion to its size (measured on an H100: 0.5 at -81 where the chosen token's was exact)."""
    block = prompts((23,), VOCAB, seed=65)[0]
    ps = [block * 3, block * 2 + block[:9]]
    sp = SamplingParams(logprobs=3)
    plain = engine.generate(ps, 20, eos_token_ids=()).tokens
    engine.speculative_tokens = 4
    engine.speculation_policy = DraftPolicy()
    before = engine.speculation_stats.passes
    try:
        rids = [engine.add_request(p, 20, sampling=sp, eos_token_ids=()) for p in ps]
        got = drain(engine)
    finally:
        engine.speculative_tokens = 0
    assert engine.speculation_stats.passes > before
    for p, rid, want in zip(ps, rids, plain, strict=True):
        tokens = tokens_of(got[rid])
        entries = [e for o in got[rid] for e in (o.logprobs or ())]
        assert tokens == want and len(entries) == len(tokens) == 20
        lg = engine.prefill_logits([p + tokens[:-1]])[0]
        for t, (tok, entry) in enumerate(zip(tokens, entries, strict=True)):
            ref = log_softmax(lg[len(p) - 1 + t])
            assert entry.logprob == pytest.approx(ref[tok], abs=0.1), t
            assert len(entry.top) == 3 and entry.top[0][0] == tok  # (greedy: the top one)
            assert all(v == pytest.approx(ref[i], abs=0.1 + 0.01 * abs(ref[i])) for i, v in entry.top), entry.top
    assert free_pages(engine) == capacity(engine)


def test_sampling_controls_choose_what_the_reference_chooses_from_the_engines_logits(engine):
    """Greedy requests with controls, in one batch with one that has none: each token is what the stand-in's
    reference (helpers.fake_engine.next_token: vLLM's order of bias, min_tokens, penalties) picks from the
    engine's own logits at that position, up to a near tie (TOL) of the controlled logits. Biases of -100 on the
    first position's best token and +100 on its runner-up (this random model's logits spread over hundreds) make the
    runner-up the first token; min_tokens holds the end-of-sequence token back (here the
    first position's best, so that it would otherwise end the request at once)."""
    ps = prompts((12, 9, 20, 16), VOCAB, seed=43)
    first = engine.prefill_logits([ps[1], ps[2]])
    best, runner_up = (int(i) for i in np.argsort(first[0][-1])[[-1, -2]])
    assert first[0][-1][best] - first[0][-1][runner_up] < 200  # (the biases swap them)
    eos = int(np.argmax(first[1][-1]))
    controls = [
        SamplingParams(repetition_penalty=1.6, frequency_penalty=0.8, presence_penalty=0.5),
        SamplingParams(logit_bias={best: -100.0, runner_up: 100.0}),
        SamplingParams(min_tokens=6),
        None,
    ]
    rids = [engine.add_request(p, 9, sampling=sp, eos_token_ids=(eos,)) for p, sp in zip(ps, controls, strict=True)]
    got = {r: tokens_of(o) for r, o in drain(engine).items()}
    assert got[rids[1]][0] == runner_up
    assert eos not in got[rids[2]][:6] and len(got[rids[2]]) >= 7
    for rid, p, sp in zip(rids, ps, controls, strict=True):
        out = got[rid]
        if sp is None:
            check_own_greedy(engine, p, out)
            continue
        lg = engine.prefill_logits([p + out[:-1]])[0]
        for t, tok in enumerate(out):
            x = lg[len(p) - 1 + t].astype(np.float64)
            want = next_token(x, sp, p, out[:t], [eos])
            if tok != want:  # only a near tie of the controlled logits may go either way
                y = x.copy()
                for token, bias in sp.logit_bias:
                    y[token] += bias
                assert abs(y[tok] - y[want]) < TOL * sp.repetition_penalty, (rid, t, tok, want)
    assert free_pages(engine) == capacity(engine)


def test_prompt_logprobs_are_the_log_softmax_of_the_prompts_own_rows(engine):
    """``SamplingParams.prompt_logprobs`` (the OpenAI API's ``echo`` with ``logprobs``): on the first output, None and
    then each prompt token's log-probability under the row before it, and the top 3: those of prefill_logits (the
    same kernels: within 1e-3), with the prefix cache on (such a prompt is computed whole) and a request beside it."""
    ps = prompts((37, 21), VOCAB, seed=47)
    engine.prefix_caching = True
    try:
        engine.add_request(ps[0], 2, eos_token_ids=())  # fills the cache with the first prompt's pages
        drain(engine)
        rid = engine.add_request(ps[0], 1, sampling=SamplingParams(prompt_logprobs=3), eos_token_ids=())
        other = engine.add_request(ps[1], 4, eos_token_ids=())
        got = drain(engine)
    finally:
        engine.prefix_caching = False
    first = got[rid][0]
    assert first.num_cached_tokens == 0 and all(o.prompt_logprobs is None for o in got[other])
    entries = first.prompt_logprobs
    assert entries is not None and entries[0] is None and len(entries) == len(ps[0])
    lg = engine.prefill_logits([ps[0]])[0]
    for i in range(1, len(ps[0])):
        ref = log_softmax(lg[i - 1])
        e = entries[i]
        assert e is not None and e.logprob == pytest.approx(ref[ps[0][i]], abs=1e-3), i
        assert [t for t, _ in e.top] == [int(t) for t in np.argsort(-ref, kind="stable")[:3]]
    assert free_pages(engine) == capacity(engine)
