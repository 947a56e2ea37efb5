"""fi_engine.serve.engine_process.EngineProcess on CPU: the tests' stand-in engine (tests/helpers/fake_engine.py) built
and stepped in a real child process (spawned), served through GenerationService as the GPU engine is by
``fi-engine serve``: every request gets exactly the tokens the engine in-process gives it, refusals arrive as the
engine's own ValueError (over HTTP a 400), requests are added without waiting for the child (its answers come with
the outputs; a request cancelled before the answer ends at once), cancellation frees the slot, an engine error and
a child that cannot start are named, and closing ends the child."""

from __future__ import annotations

import time

import pytest
from helpers.fake_engine import FakeStepEngine, expected_tokens, reference_run
from helpers.text_checkpoints import write_text_checkpoint

from fi_engine.runtime.sampling_params import SamplingParams
from fi_engine.runtime.stepping import StepEngine, StepOutput
from fi_engine.serve.engine_process import EngineProcess
from fi_engine.serve.service import GenerationService, ServiceError

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

WAIT = 30.0
FAKE = "helpers.fake_engine:FakeStepEngine"


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fi_engine.text.codec import TextCodec

    return TextCodec.from_dir(write_text_checkpoint(tmp_path_factory.mktemp("text") / "m"))


@pytest.fixture(scope="module")
def pool(codec) -> list[int]:  # type: ignore[no-untyped-def]
    return sorted(set(codec.encode("The quick brown fox jumps over the lazy dog.")))


def test_requests_through_the_child_get_the_engines_tokens(codec, pool) -> None:  # type: ignore[no-untyped-def]
    vocab = codec.tokenizer.vocab_size
    with EngineProcess(FAKE, vocab, pool=pool, max_batch=4) as engine:
        assert isinstance(engine, StepEngine) and engine.max_batch == 4
        prompts = [codec.encode(f"prompt {i}") for i in range(10)]  # more than the slots: queued in the child
        with GenerationService(engine, codec) as service:
            streams = [service.submit(p, max_new_tokens=5 + i) for i, p in enumerate(prompts)]
            results = [s.result(WAIT) for s in streams]
    for i, (p, r) in enumerate(zip(prompts, results, strict=True)):
        assert list(r.token_ids) == expected_tokens(p, 5 + i, pool) and r.finish_reason == "length"
        assert r.text == codec.decode(list(r.token_ids))


def test_logprobs_cross_the_process_intact(codec, pool) -> None:  # type: ignore[no-untyped-def]
    """StepOutput's logprobs and prompt logprobs travel from the child with their tokens (and a control that
    changes the choice reaches the engine there)."""
    vocab = codec.tokenizer.vocab_size
    prompt = codec.encode("Hello there")
    sampling = SamplingParams(logprobs=3, prompt_logprobs=2, logit_bias=((pool[2], 4.0),))
    with EngineProcess(FAKE, vocab, pool=pool) as engine, GenerationService(engine, codec) as service:
        got = service.submit(prompt, 6, sampling).result(WAIT)
    want = reference_run(vocab, pool, prompt, 6, sampling)
    assert want.tokens != expected_tokens(prompt, 6, pool)  # the bias changed them
    assert (
        list(got.token_ids) == want.tokens and want.logprobs is not None and list(got.logprobs or ()) == want.logprobs
    )
    assert got.prompt_logprobs == want.prompt_logprobs and len(got.prompt_logprobs or ()) == len(prompt)


def test_a_refused_prompt_fails_its_stream_alone(codec, pool) -> None:  # type: ignore[no-untyped-def]
    with EngineProcess(FAKE, codec.tokenizer.vocab_size, pool=pool, max_seq_len=12) as engine:
        with pytest.raises(ValueError):
            FakeStepEngine(codec.tokenizer.vocab_size, max_seq_len=12).add_request(list(range(3, 13)), 8)
        with GenerationService(engine, codec) as service:
            bad = service.submit(list(range(3, 13)), max_new_tokens=8)  # 10 + 8 > 12
            good = service.submit(codec.encode("ok"), max_new_tokens=2)
            with pytest.raises(ValueError, match="exceed max_seq_len 12"):
                bad.result(WAIT)
            with pytest.raises(ValueError, match="exceed max_seq_len 12"):  # what the server answers 400 with
                bad.accepted(WAIT)
            assert good.accepted(WAIT) and len(good.result(WAIT).token_ids) == 2
        # the prompt tokens counted are those the engine took
        assert service.metrics.prompt_tokens == len(codec.encode("ok"))


def test_add_requests_nowait_returns_at_once_and_the_answers_come_with_the_outputs(codec, pool) -> None:  # type: ignore[no-untyped-def]
    """The child takes messages between its steps (0.4 s each here): ``add_requests_nowait`` returns within 0.1 s
    while one runs; ``step()`` then gives each request taken an output with no tokens and no finish reason before
    its tokens, and the refused one a single ``"abort"`` whose ``error`` is the engine's ValueError, by name."""
    vocab = codec.tokenizer.vocab_size
    with EngineProcess(FAKE, vocab, pool=pool, max_seq_len=12, step_delay_s=0.4) as engine:
        running = engine.add_request([3], 2)
        while not any(o.rid == running and o.token_ids for o in engine.step()):
            pass  # the child is stepping
        t0 = time.perf_counter()
        good, bad = engine.add_requests_nowait([([4, 5], 3, None, None), (list(range(3, 13)), 8, None, None)])
        assert time.perf_counter() - t0 < 0.1
        seen: dict[int, list[StepOutput]] = {}
        deadline = time.monotonic() + WAIT
        while engine.has_unfinished:
            assert time.monotonic() < deadline, "the requests did not end"
            for o in engine.step():
                seen.setdefault(o.rid, []).append(o)
    assert seen[good][0] == StepOutput(good, ())  # taken, before any token
    assert [t for o in seen[good] for t in o.token_ids] == expected_tokens([4, 5], 3, pool)
    assert seen[good][-1].finish_reason == "length" and all(o.error is None for o in seen[good])
    (refusal,) = seen[bad]
    assert refusal.token_ids == () and refusal.finish_reason == "abort"
    assert isinstance(refusal.error, ValueError) and "exceed max_seq_len 12" in str(refusal.error)


def test_cancel_frees_the_slot_in_the_child(codec, pool) -> None:  # type: ignore[no-untyped-def]
    vocab = codec.tokenizer.vocab_size
    engine = EngineProcess(FAKE, vocab, pool=pool, max_batch=1, step_delay_s=0.005)
    with engine, GenerationService(engine, codec) as service:
        long = service.submit(codec.encode("long"), max_new_tokens=10_000)
        next(long)  # running
        long.cancel()
        assert long.result(WAIT).finish_reason == "abort"
        after = service.submit(codec.encode("next"), max_new_tokens=3)  # the one slot is free again
        assert after.result(WAIT).finish_reason == "length"


def test_a_request_cancelled_before_the_child_answered_its_add_is_ended_there(codec, pool) -> None:  # type: ignore[no-untyped-def]
    """The service adds without waiting: a stream cancelled before the child's answer (the child is inside a 0.3 s
    step) ends with "abort" at once, the child aborts it when the add arrives (the abort follows it on the same
    connection), and its one slot serves the next request."""
    vocab = codec.tokenizer.vocab_size
    engine = EngineProcess(FAKE, vocab, pool=pool, max_batch=1, step_delay_s=0.3)
    with engine, GenerationService(engine, codec) as service:
        warm = service.submit(codec.encode("warm"), max_new_tokens=2)
        next(warm)  # the child is stepping
        early = service.submit(codec.encode("early"), max_new_tokens=10_000)
        early.cancel()
        assert early.result(WAIT).finish_reason == "abort" and early.result(WAIT).token_ids == ()
        assert warm.result(WAIT).finish_reason == "length"
        after = service.submit(codec.encode("next"), max_new_tokens=3)  # the slot was never held by "early"
        assert after.result(WAIT).token_ids == tuple(expected_tokens(codec.encode("next"), 3, pool))


def test_an_engine_error_in_the_child_reaches_the_streams(codec, pool) -> None:  # type: ignore[no-untyped-def]
    engine = EngineProcess(FAKE, codec.tokenizer.vocab_size, pool=pool, fail_at_step=3)
    with engine, GenerationService(engine, codec) as service:
        stream = service.submit(codec.encode("x"), max_new_tokens=50)
        with pytest.raises(ServiceError, match="engine process: RuntimeError"):
            stream.result(WAIT)


def test_a_child_that_cannot_build_its_engine_is_named() -> None:
    with pytest.raises(TypeError, match="no_such_argument"):  # the engine's own error, as itself
        EngineProcess(FAKE, 100, no_such_argument=1)
    with pytest.raises(ModuleNotFoundError, match="no_such_module_here"):
        EngineProcess("no_such_module_here:Engine")
    with pytest.raises(RuntimeError, match="engine process: AttributeError"):
        EngineProcess("helpers.fake_engine:NoSuchEngine")
    with pytest.raises(TypeError, match="factory: expected 'module:callable'"):
        EngineProcess("no colon")


def test_close_ends_the_child(codec, pool) -> None:  # type: ignore[no-untyped-def]
    engine = EngineProcess(FAKE, codec.tokenizer.vocab_size, pool=pool)
    proc = engine._proc
    engine.close()
    engine.close()  # idempotent
    assert not proc.is_alive() and proc.exitcode == 0
    with pytest.raises(ValueError, match="engine: closed"):
        engine.step()


def test_the_server_over_the_child_answers_a_refused_prompt_400_and_serves_the_rest(codec, pool) -> None:  # type: ignore[no-untyped-def]
    """Over an engine process the service adds without waiting; the HTTP layer still waits for the child's answer
    before it starts a response: a prompt the engine refuses (longer than its max_seq_len) is a 400 naming the
    prompt, streamed or not, and a request beside it is served."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from helpers.serve import RunningServer

    from fi_engine.serve.openai_server import build_app

    engine = EngineProcess(FAKE, codec.tokenizer.vocab_size, pool=pool, max_seq_len=64)
    with engine, GenerationService(engine, codec) as service:
        server = RunningServer(build_app(service, "m", close_timeout=1.0), 5.0)
        try:
            for stream in (False, True):
                body = {"model": "m", "prompt": [5] * 60, "max_tokens": 10, "stream": stream}
                bad = httpx.post(f"{server.url}/v1/completions", json=body, timeout=WAIT)
                assert bad.status_code == 400, bad.text
                error = bad.json()["error"]
                assert error["param"] == "prompt" and "exceed max_seq_len 64" in error["message"]
            good = {"model": "m", "prompt": [5, 6], "max_tokens": 4, "temperature": 0}
            ok = httpx.post(f"{server.url}/v1/completions", json=good, timeout=WAIT)
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        finally:
            server.stop()
