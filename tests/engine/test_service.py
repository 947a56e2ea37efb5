"""The streaming service (fi_engine.serve.service) on CPU, over the stand-in engine (helpers.fake_engine) and a real
tokenizer (helpers.text_checkpoints): streams and their text, stop strings, EOS, cancellation freeing the slot,
the queue limit, engine errors reaching every stream, close(), one engine thread, async iteration."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time

import pytest
from helpers.fake_engine import FakeStepEngine, expected_tokens
from helpers.text_checkpoints import write_text_checkpoint

from fi_engine.runtime.sampling_params import SamplingParams
from fi_engine.serve.metrics import ServingMetrics
from fi_engine.serve.service import GenerationService, QueueFullError, ServiceClosedError, ServiceError, StreamDelta
from fi_engine.serve.shared_queue import SharedQueue

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

WAIT = 10.0  # seconds any wait in these tests may take before it counts as a hang


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fi_engine.text.codec import TextCodec

    return TextCodec.from_dir(write_text_checkpoint(tmp_path_factory.mktemp("text") / "m"))


@pytest.fixture(scope="module")
def pool(codec) -> list[int]:  # type: ignore[no-untyped-def]
    """Plain tokens of the tokenizer (no special token): what the stand-in generates from."""
    return sorted(set(codec.encode("The quick brown fox jumps over the lazy dog. Hello, how are you today?")))


def engine_for(codec, pool, **kw) -> FakeStepEngine:  # type: ignore[no-untyped-def]
    return FakeStepEngine(codec.tokenizer.vocab_size, pool=pool, eos_token_ids=codec.eos_token_ids, **kw)


def wait_until(predicate, what: str = "the condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def test_a_stream_gives_the_engines_tokens_and_their_text(codec, pool) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(codec, pool)
    with GenerationService(engine, codec) as service:
        stream = service.submit("Hello there", max_new_tokens=12)
        deltas = list(stream)
    prompt = codec.encode("Hello there")
    want = expected_tokens(prompt, 12, pool)
    assert [t for d in deltas for t in d.token_ids] == want
    assert "".join(d.text for d in deltas) == codec.decode(want)
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
    assert (deltas[-1].prompt_tokens, deltas[-1].completion_tokens) == (len(prompt), 12)
    result = stream.result(WAIT)  # the whole request, though it was iterated
    assert result.token_ids == tuple(want) and result.finish_reason == "length" and result.stop_string is None
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads


def test_a_stop_string_ends_the_request_in_the_engine_and_cuts_the_text(codec, pool) -> None:  # type: ignore[no-untyped-def]
    prompt = codec.encode("Q")
    script = codec.encode("Hello world. STOP and more text after it")
    engine = engine_for(codec, pool, scripts={tuple(prompt): script}, step_delay_s=0.001)
    with GenerationService(engine, codec) as service:
        stream = service.submit(prompt, max_new_tokens=40, stop=["STOP", "never"])
        result = stream.result(WAIT)
    assert result.text == "Hello world. " and result.finish_reason == "stop" and result.stop_string == "STOP"
    assert len(result.token_ids) < len(script)  # the engine was told to stop
    assert engine.aborted == [0] and not engine.has_unfinished


def test_an_eos_token_ends_the_request_and_is_not_in_the_text(codec, pool) -> None:  # type: ignore[no-untyped-def]
    prompt = codec.encode("Q")
    eos = codec.eos_token_ids[0]
    script = [*codec.encode("Fine."), eos, *codec.encode(" more")]
    engine = engine_for(codec, pool, scripts={tuple(prompt): script})
    with GenerationService(engine, codec) as service:
        result = service.submit(prompt, max_new_tokens=40).result(WAIT)
    assert result.finish_reason == "stop" and result.text == "Fine." and result.token_ids[-1] == eos
    assert result.stop_string is None and engine.aborted == []


def test_split_utf8_characters_are_never_emitted_broken(codec, pool) -> None:  # type: ignore[no-untyped-def]
    prompt = codec.encode("Q")
    text = "emoji 😀 and 世界 ✓"
    script = codec.encode(text)
    assert any("\ufffd" in codec.decode([t]) for t in script)  # the edge case is real
    engine = engine_for(codec, pool, scripts={tuple(prompt): script})
    with GenerationService(engine, codec) as service:
        stream = service.submit(prompt, max_new_tokens=len(script))
        deltas = []
        while True:  # one delta per step: read as they come (a slow reader would get them merged)
            d = next(stream)
            deltas.append(d)
            if d.finish_reason:
                break
    assert "".join(d.text for d in deltas) == text
    assert all("\ufffd" not in d.text for d in deltas)


def test_a_slow_reader_gets_the_steps_tokens_merged_and_decoded_once(codec, pool) -> None:  # type: ignore[no-untyped-def]
    """Without stop strings the engine thread hands over ids only; a reader that comes late gets every step's
    tokens in one delta, their text decoded then (once), and result() after a partial read still has it all."""
    prompt = codec.encode("Q")
    text = "emoji 😀 and 世界 ✓ done"
    script = codec.encode(text)
    engine = engine_for(codec, pool, scripts={tuple(prompt): script})
    with GenerationService(engine, codec) as service:
        stream = service.submit(prompt, max_new_tokens=len(script))
        assert stream.deferred
        stream.result(WAIT)  # the whole generation is queued before anything is read
        first = next(stream)
        assert first.finish_reason == "length" and list(first.token_ids) == script and first.text == text
        assert stream.result(WAIT).text == text  # decoded once, kept
        with_stop = service.submit(prompt, max_new_tokens=len(script), stop="never seen")
        assert not with_stop.deferred and with_stop.result(WAIT).text == text


def test_cancel_aborts_in_the_engine_and_frees_the_slot(codec, pool) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(codec, pool, max_batch=1, step_delay_s=0.002)
    with GenerationService(engine, codec) as service:
        long = service.submit([5, 6], max_new_tokens=100_000)
        behind = service.submit([7, 8], max_new_tokens=3)  # waits for the only slot
        first = next(long)
        assert first.token_ids and first.finish_reason is None
        long.cancel()
        rest = list(long)
        assert rest[-1].finish_reason == "abort"
        assert behind.result(WAIT).finish_reason == "length"  # served: the slot was freed
        assert long.result(WAIT).completion_tokens < 1000
    assert engine.aborted == [0]
    long.cancel()  # once ended: nothing happens


def test_a_request_cancelled_before_the_engine_takes_it_never_runs(codec, pool) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(codec, pool, max_batch=1, step_delay_s=0.01)
    with GenerationService(engine, codec) as service:
        first = service.submit([5], max_new_tokens=20)
        queued = [service.submit([6 + i], max_new_tokens=20) for i in range(3)]
        for s in queued:
            s.cancel()
        assert all(s.result(WAIT).finish_reason == "abort" for s in queued)
        assert first.result(WAIT).finish_reason == "length"
        assert service.unfinished == 0


def test_the_queue_limit_refuses_then_takes_again(codec, pool) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(codec, pool, max_batch=2, step_delay_s=0.01)
    with GenerationService(engine, codec, max_queue=1) as service:
        streams = [service.submit([i + 1], max_new_tokens=5) for i in range(3)]
        with pytest.raises(QueueFullError, match="max_batch \\+ max_queue"):
            service.submit([9], max_new_tokens=5)
        with pytest.raises(QueueFullError):  # all or none
            service.submit_many([[9], [10]], 5)
        assert service.metrics.rejected == 2
        for s in streams:
            s.result(WAIT)
        assert service.submit([9], max_new_tokens=2).result(WAIT).completion_tokens == 2


def test_a_shared_queue_holds_the_limit_over_several_services(codec, pool) -> None:  # type: ignore[no-untyped-def]
    """Two services (two API servers' worth) with one shared count: max_batch + max_queue over both together."""
    queues = SharedQueue.create(2)
    engines = [engine_for(codec, pool, max_batch=1, step_delay_s=0.01) for _ in range(2)]
    a = GenerationService(engines[0], codec, max_queue=2, shared_queue=queues[0])
    b = GenerationService(engines[1], codec, max_queue=2, shared_queue=queues[1])
    with a, b:
        held = [a.submit([1], max_new_tokens=10_000), b.submit_many([[2], [3]], 10_000)]  # 3 = 1 + 2 taken
        assert queues[0].total == 3
        with pytest.raises(QueueFullError, match="3 requests are unfinished over the 2 API servers"):
            a.submit([4], max_new_tokens=2)  # a has one of its own only: the limit is over both
        assert a.metrics.rejected == 1 and b.metrics.rejected == 0
        held[0].cancel()
        assert held[0].result(WAIT).finish_reason == "abort"
        wait_until(lambda: queues[1].total == 2)
        late = b.submit([5], max_new_tokens=2)  # the place a freed, taken by b
        with pytest.raises(QueueFullError):
            a.submit([4], max_new_tokens=2)
        for st in [late, *held[1]]:
            st.cancel()
        wait_until(lambda: queues[0].total == 0)
    failing = GenerationService(engine_for(codec, pool, fail_at_step=2), codec, shared_queue=queues[0])
    with failing:
        stream = failing.submit([6], max_new_tokens=50)
        with pytest.raises(ServiceError):
            stream.result(WAIT)
    assert queues[0].total == 0  # an engine error gives its requests' places back
    with pytest.raises(TypeError, match="^shared_queue"):
        GenerationService(engine_for(codec, pool), codec, shared_queue=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^count: expected an int in \[1, 64\]"):
        SharedQueue.create(0)


def test_shared_metrics_render_the_sum_of_their_slots() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    metrics = ServingMetrics.shared(3)
    for i, m in enumerate(metrics):
        for _ in range(i + 1):
            m.response(200)
            m.tokens(prompt=2, generated=5)
            m.first_token(0.03)
            m.request_finished("length", 0.2)
        m.queue(waiting=i, running=2 * i)
    metrics[2].response(429)
    metrics[2].request_rejected()
    text = metrics[0].render()
    assert text == metrics[2].render()  # any process answers /metrics with the same sums
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in parser.text_string_to_metric_families(text) for s in f.samples}  # fmt: skip
    assert value[("fi_engine_generation_tokens_total", ())] == 30 and value[("fi_engine_prompt_tokens_total", ())] == 12
    assert value[("fi_engine_requests_total", (("finish_reason", "length"),))] == 6
    assert value[("fi_engine_http_responses_total", (("code", "200"),))] == 6
    assert value[("fi_engine_http_responses_total", (("code", "429"),))] == 1
    assert value[("fi_engine_requests_rejected_total", ())] == 1
    assert (value[("fi_engine_requests_waiting", ())], value[("fi_engine_requests_running", ())]) == (3, 6)
    assert value[("fi_engine_time_to_first_token_seconds_count", ())] == 6
    assert value[("fi_engine_time_to_first_token_seconds_bucket", (("le", "0.04"),))] == 6
    per_server = [value[("fi_engine_api_server_http_responses_total", (("api_server", str(i)),))] for i in range(3)]
    assert per_server == [1, 2, 4]
    assert metrics[1].generation_tokens == 10 and metrics[1].finished == {"length": 2}  # its own slot
    assert "api_server" not in ServingMetrics().render()  # one server: no per-server family
    with pytest.raises(ValueError, match="ServingMetrics.shared"):
        pickle.dumps(ServingMetrics())
    with pytest.raises(ValueError, match="^reason: expected one of stop, length, abort"):
        metrics[0].request_finished("done", 1.0)


def test_an_engine_error_reaches_every_stream_and_closes_the_service(codec, pool) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(codec, pool, max_batch=2, fail_at_step=3)
    service = GenerationService(engine, codec)
    # all five queued at once: one by one, the engine could reach its failing step (and close the service) before
    # the last submit on a loaded machine
    streams = service.submit_many([[i + 1] for i in range(5)], max_new_tokens=50)
    for s in streams:
        with pytest.raises(ServiceError, match="fails at step 3") as info:
            list(s)
        assert isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(ServiceError):
            s.result(WAIT)
    with pytest.raises(ServiceClosedError, match="engine error"):
        service.submit([1], max_new_tokens=1)
    assert not service.healthy
    service.close(timeout=1)


def test_a_prompt_the_engine_refuses_fails_its_stream_alone(codec, pool) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(codec, pool, max_seq_len=8)
    with GenerationService(engine, codec) as service:
        bad = service.submit(list(range(3, 10)), max_new_tokens=5)
        good = service.submit([3], max_new_tokens=5)
        with pytest.raises(ValueError, match="max_seq_len"):
            bad.accepted(WAIT)
        with pytest.raises(ValueError, match="max_seq_len"):
            next(bad)
        assert good.accepted(WAIT) and good.result(WAIT).completion_tokens == 5
        assert service.unfinished == 0


def test_close_lets_running_requests_finish_within_the_grace(codec, pool) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(codec, pool, step_delay_s=0.002)
    service = GenerationService(engine, codec)
    streams = [service.submit([i + 1], max_new_tokens=10) for i in range(6)]
    service.close(timeout=WAIT)
    assert [s.result(0).finish_reason for s in streams] == ["length"] * 6
    assert not service._thread.is_alive()
    with pytest.raises(ServiceClosedError, match="closed"):
        service.submit([1], max_new_tokens=1)
    service.close()  # again: nothing happens


def test_close_cancels_what_outlives_the_grace(codec, pool) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(codec, pool, max_batch=2, step_delay_s=0.005)
    service = GenerationService(engine, codec)
    streams = [service.submit([i + 1], max_new_tokens=100_000) for i in range(4)]
    streams[0].accepted(WAIT)
    t0 = time.monotonic()
    service.close(timeout=0.05)
    assert time.monotonic() - t0 < WAIT
    assert [s.result(0).finish_reason for s in streams] == ["abort"] * 4
    assert not engine.has_unfinished or engine.active == 0
    assert sorted(engine.aborted) == [0, 1, 2, 3]


def test_async_streams_share_one_engine_loop(codec, pool) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(codec, pool, max_batch=8)

    async def main(service: GenerationService) -> list[list[int]]:
        async def one(i: int) -> list[int]:
            stream = service.submit([i + 1, i + 2], max_new_tokens=6 + i % 5)
            await stream.aaccepted()
            return [t async for d in stream for t in d.token_ids]

        return await asyncio.gather(*(one(i) for i in range(40)))

    with GenerationService(engine, codec) as service:
        got = asyncio.run(asyncio.wait_for(main(service), WAIT))
    assert got == [expected_tokens([i + 1, i + 2], 6 + i % 5, pool) for i in range(40)]
    assert engine.most_active == 8  # batched together


def test_threads_get_exactly_their_tokens(codec, pool) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(codec, pool, max_batch=16)
    results: dict[int, tuple[int, ...]] = {}
    with GenerationService(engine, codec, max_queue=200) as service:

        def client(i: int) -> None:
            results[i] = service.submit([i % 50 + 1, i], max_new_tokens=4 + i % 7).result(WAIT).token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
    assert results == {i: tuple(expected_tokens([i % 50 + 1, i], 4 + i % 7, pool)) for i in range(100)}


def test_sampling_reaches_the_engine_per_request(codec, pool) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(codec, pool)
    s1, s2 = SamplingParams(0.7, 0, 1.0, 11), SamplingParams(0.7, 0, 1.0, 12)
    with GenerationService(engine, codec) as service:
        a, b = service.submit_many([[4], [4]], 8, [s1, s2])
        ra, rb = a.result(WAIT), b.result(WAIT)
    assert [x[3] for x in engine.added] == [s1, s2]
    assert ra.token_ids == tuple(expected_tokens([4], 8, pool, seed=11)) != rb.token_ids


def test_without_a_codec_ids_flow_and_text_is_refused(pool) -> None:  # type: ignore[no-untyped-def]
    engine = FakeStepEngine(400, pool=pool)
    with GenerationService(engine) as service:
        result = service.submit([1, 2], max_new_tokens=3).result(WAIT)
        assert result.token_ids == tuple(expected_tokens([1, 2], 3, pool)) and result.text == ""
        with pytest.raises(TypeError, match="prompt: a text prompt needs a codec"):
            service.submit("hi", max_new_tokens=3)
        with pytest.raises(ValueError, match="stop: stop strings"):
            service.submit([1], max_new_tokens=3, stop="x")


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"prompt": []}, ValueError, "prompt"),
        ({"prompt": None}, TypeError, "prompt"),
        ({"prompt": [1, "a"]}, TypeError, "prompt\\[1\\]"),
        ({"prompt": [1, 10**9]}, ValueError, "prompt\\[1\\]"),
        ({"prompt": [True]}, TypeError, "prompt\\[0\\]"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": 1.5}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": True}, ValueError, "max_new_tokens"),
        ({"sampling": {"temperature": 1}}, TypeError, "sampling"),
        ({"stop": [""]}, ValueError, "stop\\[0\\]"),
        ({"stop": 5}, TypeError, "stop"),
        ({"eos_token_ids": "2"}, TypeError, "eos_token_ids"),
        ({"eos_token_ids": [-1]}, ValueError, "eos_token_ids\\[0\\]"),
        ({"skip_special_tokens": 1}, TypeError, "skip_special_tokens"),
    ],
)
def test_bad_arguments_are_refused_by_name(codec, pool, kwargs, error, names) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(codec, pool)
    with GenerationService(engine, codec) as service:
        call = {"prompt": [1], "max_new_tokens": 2, **kwargs}
        with pytest.raises(error, match=f"^{names}"):
            service.submit(**call)
        assert service.unfinished == 0 and engine.added == []


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"engine": object()}, TypeError, "engine"),
        ({"codec": "tok"}, TypeError, "codec"),
        ({"max_queue": -1}, ValueError, "max_queue"),
        ({"max_queue": 1.0}, ValueError, "max_queue"),
        ({"metrics": {}}, TypeError, "metrics"),
    ],
)
def test_bad_service_arguments_are_refused_by_name(codec, pool, kwargs, error, names) -> None:  # type: ignore[no-untyped-def]
    call = {"engine": engine_for(codec, pool), "codec": codec, **kwargs}
    with pytest.raises(error, match=f"^{names}"):
        GenerationService(call.pop("engine"), call.pop("codec"), **call)


def test_metrics_count_tokens_requests_and_latencies(codec, pool) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(codec, pool)
    with GenerationService(engine, codec) as service:
        for i in range(3):
            service.submit([i + 1, 2], max_new_tokens=5).result(WAIT)
        m = service.metrics
    assert m.prompt_tokens == 6 and m.generation_tokens == 15 and m.finished == {"length": 3}
    assert m.ttft.count == 3 and m.itl.count == 12 and m.latency.count == 3
    assert isinstance(StreamDelta((), "", None, 0, 0), StreamDelta)
