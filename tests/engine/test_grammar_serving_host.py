"""The engine's structured output (``SamplingParams.grammar``, the OpenAI ``response_format``) on CPU, over a real
trained byte-level BPE tokenizer (helpers.text_checkpoints) and llguidance:

- :class:`~fi_engine.runtime.sample.logits_processing.LogitsProcessor` with numpy standing in for CuPy: a grammar row's
  disallowed logits become -inf and its allowed ones stay bit for bit, the raw logprobs are those of the logits
  before the mask, other rows are untouched; :func:`~fi_engine.runtime.sample.logits_processing.mask_disallowed` unpacks
  every bit (bit 31 of a word included) as numpy's ``unpackbits`` does;
- :meth:`Scheduler.record <fi_engine.runtime.sched.scheduler.Scheduler.record>` advances each request's matcher and ends
it
  at its grammar's end-of-sequence id, even with ``ignore_eos`` (no EOS ids of its own); a token its grammar refuses
  ends it as ``"abort"``;
- the engine's serving loop (``step`` and ``generate``) with only the device pass stood in for (the stand-in
  model's logits, tests/helpers/fake_engine.py, through the engine's processor and scheduler, then the argmax):
  each request gets exactly the tokens the CPU stand-in engine gives it (``reference_run``), they parse as JSON and
  follow their schema; the engine makes its grammar tokenizer once from its checkpoint's ``tokenizer.json``, and
  refuses by name a grammar that does not compile or an engine without a tokenizer (nothing queued).

The same on a GPU, with the engine's own logits: tests/engine/test_gpu_grammar.py."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers.fake_engine import position_logprobs, reference_run, step_logits
from helpers.json_schemas import PERSON, SCHEMAS, check_schema, json_schema
from helpers.text_checkpoints import write_text_checkpoint

from fi_engine.models.llama import LlamaEngine
from fi_engine.runtime import serving
from fi_engine.runtime.sample.logits_processing import LogitsProcessor, mask_disallowed
from fi_engine.runtime.sample.sampler import Sampler
from fi_engine.runtime.sampling_params import SamplingParams
from fi_engine.runtime.sched.kv_cache import KVCacheManager
from fi_engine.runtime.sched.pages import PageAllocator
from fi_engine.runtime.sched.request import Request
from fi_engine.runtime.sched.scheduler import Scheduler
from fi_engine.text.codec import TextCodec
from fi_engine.text.grammar import GrammarTokenizer, response_format_grammar

pytest.importorskip("tokenizers")
pytest.importorskip("llguidance")

V = 345  # the model's logits: wider than the tokenizer's 330 ids (padded embedding rows), not a multiple of 32
ENGINE_EOS = 2  # the checkpoint config's eos_token_id (the tokenizer's EOS ids, generation_config's: 2 and 0)
PS = 16
MAX_NEW = 600  # the stand-in's pseudo-random model ends every SCHEMAS output well before


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_checkpoint(tmp_path_factory.mktemp("grammar") / "m")


@pytest.fixture(scope="module")
def codec(model_dir: Path) -> TextCodec:
    return TextCodec.from_dir(model_dir)


@pytest.fixture(scope="module")
def grammars(codec: TextCodec) -> GrammarTokenizer:
    return GrammarTokenizer(codec.tokenizer, codec.eos_token_ids)


@pytest.fixture(autouse=True)
def _no_ffi_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving, "stream_scope", lambda stream, device: contextlib.nullcontext())


def pool(codec: TextCodec) -> list[int]:
    return list(range(codec.tokenizer.vocab_size))


def grammar_of(schema: dict[str, Any]) -> str:
    grammar = response_format_grammar(json_schema(schema))
    assert grammar is not None
    return grammar


def grammar_request(grammars: GrammarTokenizer, schema: dict[str, Any], output: list[int], **kw: Any) -> Request:
    sp = SamplingParams(grammar=grammar_of(schema), **kw)
    r = Request(0, (5, 6, 7), 50, 4, asks=sp, grammar=grammars.matcher(sp.grammar or ""))
    for t in output:
        assert r.grammar is not None
        r.grammar.consume(t)
    r.output = list(output)
    return r


# ---------------------------------------------------------------------------------------------- the mask


def test_mask_disallowed_unpacks_every_bit_of_every_word() -> None:
    rng = np.random.default_rng(3)
    bits = rng.integers(-(1 << 31), 1 << 31, size=(3, 3), dtype=np.int64).astype(np.int32)
    bits[0, 0] = -1  # every bit of the first row's first word: a negative int32
    bits[1, 1] = np.int32(-(1 << 31))  # bit 31 alone (token 63)
    logits = rng.standard_normal((5, 70)).astype(np.float32)
    raw = logits.copy()
    mask_disallowed(np, logits, [4, 0, 2], bits)
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :70].astype(bool)
    for k, row in enumerate([4, 0, 2]):
        assert np.array_equal(logits[row][allowed[k]], raw[row][allowed[k]])
        assert np.all(logits[row][~allowed[k]] == -np.inf)
    assert allowed[0, :32].all() and allowed[1, 63] and not allowed[1, 32:63].any()  # sign bits: plain bits
    assert np.array_equal(logits[[1, 3]], raw[[1, 3]])  # rows not named: untouched


def test_a_grammar_rows_disallowed_logits_become_minus_inf_and_the_logprobs_stay_raw(
    codec: TextCodec, grammars: GrammarTokenizer
) -> None:
    brace = codec.tokenizer.encode("{", add_special_tokens=False)
    fresh = grammar_request(grammars, PERSON, [], logprobs=3)
    inside = grammar_request(grammars, SCHEMAS[2], brace)  # after "{": a key's quote or whitespace only
    biased = Request(1, (5,), 50, 4, asks=SamplingParams(logit_bias={40: 5.0}))
    rows = [fresh, None, inside, biased]
    raw = np.stack([step_logits(V, pool(codec), (i, 3), i, 0, None) for i in range(4)]).astype(np.float32)
    logits = raw.copy()
    proc = LogitsProcessor(np, logits, V, frozenset({ENGINE_EOS}))
    pending, changed = proc.apply(rows, 4)
    assert changed and pending is not None and pending.rows == [0]
    for i, r in ((0, fresh), (2, inside)):
        assert r.grammar is not None
        allowed = r.grammar.allowed_mask(V)
        assert 0 < allowed.sum() < codec.tokenizer.vocab_size and not allowed[codec.tokenizer.vocab_size :].any()
        assert np.array_equal(logits[i][allowed], raw[i][allowed]), i
        assert np.all(logits[i][~allowed] == -np.inf), i
    first = codec.tokenizer.decode([int(np.argmax(logits[0]))], skip_special_tokens=False)
    assert first.strip() in ("", "{")  # a JSON object's opening (or whitespace before it)
    assert np.array_equal(logits[1], raw[1])  # a padding row
    expect = raw[3].copy()
    expect[40] += np.float32(5.0)
    assert np.array_equal(logits[3], expect)  # a row without a grammar: its own control only
    proc.chosen(pending, np.asarray([int(np.argmax(logits[0])), 0, 0, 0]))
    (entry,) = pending.resolve()
    want = position_logprobs(raw[0].astype(np.float64), int(np.argmax(logits[0])), 3)
    assert abs(entry.logprob - want.logprob) < 1e-5  # of the raw logits, before the mask (vLLM's default)
    assert [t for t, _ in entry.top] == [t for t, _ in want.top]


# ---------------------------------------------------------------------------------------------- Scheduler.record


def scheduler() -> Scheduler:
    return Scheduler(PageAllocator(1 + 64), PS, 4, 1024, 512, V, (ENGINE_EOS,))


def test_record_advances_the_matcher_and_the_grammars_eos_ends_it_even_with_ignore_eos(
    codec: TextCodec, grammars: GrammarTokenizer
) -> None:
    sched = scheduler()
    sp = SamplingParams(grammar=response_format_grammar({"type": "json_object"}))
    body = codec.tokenizer.encode('{"a": 1}', add_special_tokens=False)
    r = sched.submit([5, 6], 50, sampling=sp, eos_token_ids=(), grammar=grammars.matcher(sp.grammar or ""))
    plain = sched.submit([5, 6], 50, eos_token_ids=())  # ignore_eos without a grammar: an EOS id is a token
    assert sched.admit() == [r, plain] and sched.processed == 1
    sched.record([r, plain], [body[0], ENGINE_EOS], prefill=True)
    assert r.grammar is not None and not r.grammar.is_finished and plain.finish_reason is None
    for t in body[1:]:
        sched.record(sched.decode_rows(padded=False), [t, 9])
    assert r.grammar.is_finished and r.finish_reason is None  # complete: only an EOS id may follow
    assert r.grammar.allowed_mask(V).nonzero()[0].tolist() == sorted(codec.eos_token_ids)
    sched.record(sched.decode_rows(padded=False), [0, ENGINE_EOS])  # id 0: the grammar's EOS, not the engine's
    assert r.finish_reason == "eos" and r.output == [*body, 0] and r.pages == [] and sched.processed == 0
    assert plain.finish_reason is None and plain.output.count(ENGINE_EOS) == 2
    sched.abort(plain)


def test_a_token_the_grammar_refuses_ends_that_request_as_abort(codec: TextCodec, grammars: GrammarTokenizer) -> None:
    sched = scheduler()
    sp = SamplingParams(grammar=response_format_grammar({"type": "json_object"}))
    r = sched.submit([5], 50, sampling=sp, grammar=grammars.matcher(sp.grammar or ""))
    other = sched.submit([6], 50)
    sched.admit()
    letter = codec.tokenizer.encode("x", add_special_tokens=False)[0]  # no JSON object starts so
    sched.record([r, other], [letter, letter], prefill=True)
    assert r.finish_reason == "abort" and r.output == [letter] and r.pages == [] and r.slot == -1
    assert other.finish_reason is None and sched.active == [other]  # the others go on


def test_a_grammar_that_fails_computing_its_mask_ends_that_request_alone(
    codec: TextCodec, grammars: GrammarTokenizer
) -> None:
    """A matcher whose grammar fails (here: llguidance's lexer limits, met at the first byte) leaves its row
    unmasked instead of failing the step; the token chosen for it is then refused, which aborts that request
    only, while a request with a sound grammar beside it is masked and goes on."""
    import llguidance

    sched = scheduler()
    pattern = str(llguidance.grammar_from("regex", "a{1000000}"))
    broken = grammars.matcher(pattern)  # (the server's check refuses this grammar; an engine given it goes on)
    with contextlib.suppress(ValueError):
        broken.consume(int(np.flatnonzero(broken.allowed_mask(V))[0]))
    with pytest.raises(ValueError):
        broken.bitmask(V)
    sound_sp = SamplingParams(grammar=response_format_grammar({"type": "json_object"}))
    bad = sched.submit([5], 50, sampling=SamplingParams(grammar=pattern), grammar=broken)
    good = sched.submit([6], 50, sampling=sound_sp, grammar=grammars.matcher(sound_sp.grammar or ""))
    sched.admit()
    raw = np.stack([step_logits(V, pool(codec), (i, 3), i, 0, None) for i in range(2)]).astype(np.float32)
    logits = raw.copy()
    pending, changed = LogitsProcessor(np, logits, V, frozenset({ENGINE_EOS})).apply([bad, good], 2)
    assert changed and pending is None
    assert np.array_equal(logits[0], raw[0])  # the failed grammar's row: unmasked
    assert good.grammar is not None and np.all(logits[1][~good.grammar.allowed_mask(V)] == -np.inf)
    brace = codec.tokenizer.encode("{", add_special_tokens=False)[0]
    sched.record([bad, good], [int(np.argmax(logits[0])), brace], prefill=True)
    assert bad.finish_reason == "abort" and good.finish_reason is None and sched.active == [good]


def test_submit_wants_a_matcher_exactly_where_the_sampling_sets_a_grammar(grammars: GrammarTokenizer) -> None:
    sched = scheduler()
    sp = SamplingParams(grammar=response_format_grammar({"type": "json_object"}))
    with pytest.raises(ValueError, match=r"^grammar: expected a GrammarMatcher of sampling\.grammar, got NoneType$"):
        sched.submit([5], 10, sampling=sp)
    with pytest.raises(ValueError, match=r"^grammar: expected None \(sampling sets no grammar\), got GrammarMatcher"):
        sched.submit([5], 10, grammar=grammars.matcher(sp.grammar or ""))
    assert not sched.has_work


# ---------------------------------------------------------------------------------------------- the serving loop


def bare_engine(model_dir: Any, codec: TextCodec, max_batch: int = 4, num_pages: int = 1 + 256) -> Any:
    """An engine without its constructor (no GPU): the host state the serving loop reads, its real scheduler and
    logits processor (numpy), and the device pass stood in for: each row's logits are the CPU stand-in's
    (``step_logits``), processed by the engine's processor where a row asks, and the argmax chosen."""
    e = LlamaEngine.__new__(LlamaEngine)
    e._closed = False
    e.model_dir = model_dir
    e.runner = SimpleNamespace(
        graph=None,
        comm=None,
        vocab_shard=None,
        family=SimpleNamespace(llama_pass=True),
        config=SimpleNamespace(vocab_size=V, eos_token_ids=(ENGINE_EOS,)),
        max_batch=max_batch,
        device=0,
        stream_ptr=0,
        cupy=SimpleNamespace(cuda=SimpleNamespace(Device=lambda d: contextlib.nullcontext())),
        stream=_Stream(),
    )
    e.kv_cache = KVCacheManager(num_pages, PS)
    e.scheduler = Scheduler(e.kv_cache, PS, max_batch, 1024, 512, V, (ENGINE_EOS,))
    e.sampler = Sampler(None, None, SimpleNamespace(), device=0, stream_ptr=0, max_batch=max_batch, vocab_size=V)
    e.processor = LogitsProcessor(np, np.zeros((max_batch, V), np.float32), V, frozenset({ENGINE_EOS}))
    e._start_loop()
    e._ffi_stream = contextlib.nullcontext()
    everything = pool(codec)

    def device_pass(sched: Scheduler, rows: list[Request]) -> list[int]:
        logits = e.processor.logits
        for i, r in enumerate(rows):
            logits[i] = step_logits(V, everything, r.prompt, len(r.output), 0, None)
        if sched.processed:
            e.processor.apply(rows, len(rows))
        return [int(t) for t in logits[: len(rows)].argmax(axis=1)]

    def prefill(sched: Scheduler, reqs: list[Request], all_logits: bool = False, riders: Any = ()) -> list[Any]:
        sched.record(reqs, device_pass(sched, reqs), prefill=True)
        return []

    def decode_step(sched: Scheduler) -> tuple[float, list[Request | None]]:
        rows = [r for r in sched.decode_rows(padded=False) if r is not None]
        sched.record(rows, device_pass(sched, rows))
        return 1.0, list(rows)

    e.passes.prefill = prefill
    e.passes.decode_step = decode_step
    return e


class _Stream(contextlib.nullcontext):  # type: ignore[type-arg]
    """The runner's stream as the loop uses it: entered for a step, synchronized after."""

    def synchronize(self) -> None:
        return None


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16], [17, 18, 19]]


def check_answer(codec: TextCodec, tokens: list[int], schema: dict[str, Any]) -> None:
    assert tokens[-1] in codec.eos_token_ids
    check_schema(json.loads(codec.decode(tokens[:-1])), schema)


def test_step_gives_each_request_the_stand_in_engines_tokens_and_they_follow_their_schema(
    model_dir: Path, codec: TextCodec, grammars: GrammarTokenizer
) -> None:
    e = bare_engine(model_dir, codec)
    asked = []
    for i, (prompt, schema) in enumerate(zip(PROMPTS, SCHEMAS, strict=True)):
        sp = SamplingParams(grammar=grammar_of(schema))
        eos = () if i % 2 else None  # ignore_eos on every other one
        asked.append((e.add_request(prompt, MAX_NEW, sampling=sp, eos_token_ids=eos), prompt, schema, sp, eos))
    plain = e.add_request([20, 21], 5)  # asks nothing: the rule's tokens, untouched by its neighbours' masks
    built = e.grammar_tokenizer
    assert built is not None and built.eos_token_ids == codec.eos_token_ids  # made once, from model_dir
    got: dict[int, list[int]] = {}
    finish: dict[int, str | None] = {}
    while e.has_unfinished:
        for out in e.step():
            got.setdefault(out.rid, []).extend(out.token_ids)
            finish[out.rid] = out.finish_reason
    assert e.grammar_tokenizer is built and e.scheduler.processed == 0
    for rid, prompt, schema, sp, eos in asked:
        want = reference_run(
            V, pool(codec), prompt, MAX_NEW, sp, eos=(ENGINE_EOS,) if eos is None else (), grammars=grammars
        )
        assert got[rid] == want.tokens, rid
        assert finish[rid] == "stop", rid  # the grammar's end, with ignore_eos too
        check_answer(codec, got[rid], schema)
    assert got[plain] == [int(np.argmax(step_logits(V, pool(codec), [20, 21], k, 0, None))) for k in range(5)]


def test_generate_gives_each_prompt_its_own_matcher(
    model_dir: Path, codec: TextCodec, grammars: GrammarTokenizer
) -> None:
    e = bare_engine(model_dir, codec)
    sp = SamplingParams(grammar=grammar_of(SCHEMAS[1]))
    result = e.generate(PROMPTS[:3], MAX_NEW, sampling=sp, eos_token_ids=())
    assert result.finish_reasons == ["eos"] * 3
    for prompt, tokens in zip(PROMPTS[:3], result.tokens, strict=True):
        assert tokens == reference_run(V, pool(codec), prompt, MAX_NEW, sp, grammars=grammars).tokens
        check_answer(codec, tokens, SCHEMAS[1])


def test_a_grammar_that_does_not_compile_is_refused_by_name_and_nothing_queued(
    model_dir: Path, codec: TextCodec
) -> None:
    e = bare_engine(model_dir, codec)
    bad = SamplingParams(grammar=json.dumps({"grammars": [{"json_schema": {"type": "objectx"}}]}))
    with pytest.raises(ValueError, match=r"^response_format: the schema cannot be used .*objectx"):
        e.add_request([5], 10, sampling=bad)
    with pytest.raises(ValueError, match=r"^response_format: the schema cannot be used"):
        e.generate([[5], [6]], 10, sampling=bad)
    assert not e.has_unfinished and e.scheduler.allocator.num_free == e.scheduler.allocator.capacity


def test_an_engine_without_a_tokenizer_refuses_a_grammar_by_name(tmp_path: Path, codec: TextCodec) -> None:
    e = bare_engine(tmp_path, codec)  # random weights: a checkpoint without tokenizer.json
    sp = SamplingParams(grammar=grammar_of(PERSON))
    with pytest.raises(ValueError, match=r"^grammar: this engine has no tokenizer to match a grammar against \("):
        e.add_request([5], 10, sampling=sp)
    assert not e.has_unfinished and e.grammar_tokenizer is None
    assert e.add_request([5], 2) == 0  # a request without a grammar is served as before
    while e.has_unfinished:
        e.step()


def test_the_grammar_tokenizer_a_server_sets_is_checked_and_used(
    model_dir: Path, codec: TextCodec, grammars: GrammarTokenizer
) -> None:
    e = bare_engine(Path("/nonexistent"), codec)  # nothing to make one from: the one set is used
    with pytest.raises(TypeError, match=r"^grammar_tokenizer: expected a fi_engine\.text\.grammar\.GrammarTokenizer"):
        e.grammar_tokenizer = codec.tokenizer
    narrow = bare_engine(model_dir, codec)
    narrow.processor.vocab_size = 300
    with pytest.raises(
        ValueError, match=r"^grammar_tokenizer: its tokenizer has 330 tokens, more than the model's 300"
    ):
        narrow.grammar_tokenizer = grammars
    e.grammar_tokenizer = grammars
    rid = e.add_request([5, 6], MAX_NEW, sampling=SamplingParams(grammar=grammar_of(SCHEMAS[2])))
    tokens: list[int] = []
    while e.has_unfinished:
        tokens += [t for out in e.step() if out.rid == rid for t in out.token_ids]
    check_answer(codec, tokens, SCHEMAS[2])
