"""The OpenAI API's log-probabilities, ``echo`` and sampling controls, end to end on CPU: the official ``openai``
client against the server over the stand-in engine (helpers.fake_engine), whose tokens and logprobs follow pure
functions (``reference_run``) that the tests play too. Each field must reach the engine (``engine.added``), change
the output where it should (the reference with and without it differ) and come back in OpenAI's own shapes, typed
by the client, streamed or whole; a field an engine cannot honour is a 400 naming it."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import httpx
import pytest
from helpers.fake_engine import reference_run, rule_token
from helpers.serve import MODEL, WAIT, Served, require_server_stack, run_doc_example

from fi_engine.runtime.sampling_params import SamplingParams
from fi_engine.runtime.stepping import TokenLogprobs

openai = require_server_stack()

TOL = 1e-12  # logprobs are float64 in the stand-in and travel as JSON's shortest round-trip repr: exact but for ulps


def reference(codec, pool, prompt, max_tokens, sampling=None, script=None):  # type: ignore[no-untyped-def]
    """What the stand-in engine gives the request (its EOS ids: the checkpoint's)."""
    vocab = codec.tokenizer.vocab_size
    return reference_run(vocab, pool, prompt, max_tokens, sampling, codec.eos_token_ids, script)


def piece(codec, token: int) -> tuple[str, list[int]]:  # type: ignore[no-untyped-def]
    text, raw = codec.tokenizer.token_piece(token)
    return text, list(raw)


def assert_chat_entries(codec, got: list[Any], tokens: list[int], want: list[TokenLogprobs], top: int) -> None:  # type: ignore[no-untyped-def]
    """Chat ``logprobs.content`` entries (typed by the client) against the reference, token by token."""
    from openai.types.chat import ChatCompletionTokenLogprob

    assert len(got) == len(tokens) == len(want)
    for entry, token, ref in zip(got, tokens, want, strict=True):
        assert isinstance(entry, ChatCompletionTokenLogprob)
        assert (entry.token, entry.bytes) == piece(codec, token)
        assert abs(entry.logprob - ref.logprob) < TOL
        assert len(entry.top_logprobs) == top == len(ref.top)
        for alt, (tid, lp) in zip(entry.top_logprobs, ref.top, strict=True):
            assert (alt.token, alt.bytes) == piece(codec, tid) and abs(alt.logprob - lp) < TOL
        if top:
            assert entry.top_logprobs[0].logprob >= entry.logprob - TOL  # the most likely comes first


def assert_legacy(codec, got: Any, tokens: list[int], want: list[TokenLogprobs | None], top: int, text: str) -> None:  # type: ignore[no-untyped-def]
    """A completions ``logprobs`` object (legacy shape) against the reference: the tokens' texts (which join to the
    choice's text), their logprobs, the top dicts (the top N and the token itself) and the text offsets."""
    from openai.types.completion_choice import Logprobs

    assert isinstance(got, Logprobs)
    assert got.tokens == [piece(codec, t)[0] for t in tokens] and "".join(got.tokens) == text
    offsets = [sum(len(s) for s in got.tokens[:j]) for j in range(len(tokens))]
    assert got.text_offset == offsets
    for j, (token, ref) in enumerate(zip(tokens, want, strict=True)):
        if ref is None:
            assert got.token_logprobs[j] is None and got.top_logprobs[j] is None
            continue
        assert abs(got.token_logprobs[j] - ref.logprob) < TOL
        expected = {piece(codec, i)[0]: lp for i, lp in ref.top}
        expected.setdefault(piece(codec, token)[0], ref.logprob)
        assert got.top_logprobs[j].keys() == expected.keys() and len(ref.top) == top
        assert all(abs(got.top_logprobs[j][k] - v) < TOL for k, v in expected.items())


# ---- chat: logprobs + top_logprobs ------------------------------------------------------------------------------


@pytest.mark.parametrize("top", [0, 3, 20])
def test_chat_logprobs_have_openais_shape_and_the_engines_values(served: Served, codec, pool, top) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": "Hello there"}]
    kw: dict[str, Any] = {} if top == 0 else {"top_logprobs": top}  # logprobs alone: no alternatives
    out = served.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True, **kw
    )
    prompt = codec.encode_chat(messages)
    ref = reference(codec, pool, prompt, 8, SamplingParams(logprobs=top))
    assert served.engine.added[-1][3].logprobs == top and served.engine.added[-1][3].prompt_logprobs is None
    choice = out.choices[0]
    assert choice.message.content == codec.decode(ref.tokens)
    assert choice.logprobs is not None and choice.logprobs.refusal is None
    assert_chat_entries(codec, choice.logprobs.content, ref.tokens, ref.logprobs, top)


def test_chat_without_logprobs_has_none(served: Served) -> None:
    out = served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, logprobs=False, top_logprobs=0
    )
    assert out.choices[0].logprobs is None and served.engine.added[-1][3].logprobs is None


def test_chat_logprobs_streamed_travel_with_their_text(codec, pool) -> None:  # type: ignore[no-untyped-def]
    """A chunk carries the logprobs of the tokens it delivers, and a chunk goes out only with text (or the end):
    a character split over byte tokens (é, 🙂) is held back until complete, and the logprobs of tokens that brought
    no text yet wait for the next chunk. So the tokens' bytes so far are always the text so far, or run ahead of it
    by the start of one held-back character (tokens taken together with earlier ones, when the client reads
    several steps' tokens at once) -- never behind."""
    prompt = codec.encode_chat([{"role": "user", "content": "Q"}])
    script = codec.encode("Hé 🙂 you are fine")
    s = Served(codec, pool, scripts={tuple(prompt): script})
    try:
        chunks = list(
            s.client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Q"}],
                max_tokens=40,
                temperature=0,
                logprobs=True,
                top_logprobs=2,
                stream=True,
            )
        )
        ref = reference(codec, pool, prompt, 40, SamplingParams(logprobs=2), script)
        assert ref.tokens == script
        entries, text = [], ""
        for c in chunks[1:]:  # the first: the role
            text += c.choices[0].delta.content or ""
            assert c.choices[0].logprobs is not None  # every chunk with text has its tokens' logprobs
            entries += c.choices[0].logprobs.content
            raw, settled = bytes(b for e in entries for b in e.bytes), text.encode()
            assert raw.startswith(settled) and len(raw) - len(settled) < 4, (raw, text)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hé 🙂 you are fine"
        assert_chat_entries(codec, entries, ref.tokens, ref.logprobs, 2)
        whole = s.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Q"}], max_tokens=40, temperature=0, logprobs=True,
            top_logprobs=2,
        )  # fmt: skip
        assert [e.model_dump() for e in whole.choices[0].logprobs.content] == [e.model_dump() for e in entries]
    finally:
        s.close()


def test_n_choices_each_get_their_own_logprobs(served: Served, codec, pool) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": "Hi"}]
    out = served.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, n=2, seed=3, temperature=1.0, logprobs=True, top_logprobs=1
    )
    prompt = codec.encode_chat(messages)
    for i, choice in enumerate(out.choices):
        ref = reference(codec, pool, prompt, 5, SamplingParams(1.0, 0, 1.0, 3 + i, logprobs=1))
        assert choice.message.content == codec.decode(ref.tokens)
        assert_chat_entries(codec, choice.logprobs.content, ref.tokens, ref.logprobs, 1)


# ---- completions: logprobs N, echo ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 5])
def test_completion_logprobs_have_the_legacy_shape(served: Served, codec, pool, n) -> None:  # type: ignore[no-untyped-def]
    out = served.client.completions.create(model=MODEL, prompt="Hello there", max_tokens=7, temperature=0, logprobs=n)
    prompt = codec.encode("Hello there")
    ref = reference(codec, pool, prompt, 7, SamplingParams(logprobs=n))
    assert out.choices[0].text == codec.decode(ref.tokens)
    assert_legacy(codec, out.choices[0].logprobs, ref.tokens, ref.logprobs, n, out.choices[0].text)


def test_completion_logprobs_streamed_continue_their_offsets(served: Served, codec, pool) -> None:  # type: ignore[no-untyped-def]
    chunks = list(
        served.client.completions.create(
            model=MODEL, prompt=[7, 8, 9], max_tokens=9, temperature=0, logprobs=2, stream=True
        )
    )
    tokens, offsets, texts = [], [], []
    for c in chunks:
        lp = c.choices[0].logprobs
        assert lp is not None and "".join(lp.tokens) == c.choices[0].text
        tokens += lp.tokens
        offsets += lp.text_offset
        texts.append(c.choices[0].text)
    assert offsets == [sum(len(t) for t in tokens[:j]) for j in range(len(tokens))] and len(tokens) == 9
    whole = served.client.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=9, temperature=0, logprobs=2)
    assert whole.choices[0].logprobs.tokens == tokens and whole.choices[0].text == "".join(texts)
    assert whole.choices[0].logprobs.text_offset == offsets


def test_a_stop_string_ends_the_logprobs_at_the_token_that_completed_it(codec, pool) -> None:  # type: ignore[no-untyped-def]
    prompt = codec.encode("Q")
    script = codec.encode("Hello world. STOP and more text after it")
    s = Served(codec, pool, scripts={tuple(prompt): script})
    try:
        for stream in (False, True):
            kw: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "stop": "STOP", "logprobs": 1}
            if stream:
                chunks = list(s.client.completions.create(**kw, temperature=0, stream=True))
                text = "".join(c.choices[0].text for c in chunks)
                tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
            else:
                out = s.client.completions.create(**kw, temperature=0)
                text, tokens = out.choices[0].text, out.choices[0].logprobs.tokens
            assert text == "Hello world. "
            # every token generated, up to the one that completed the stop string (its text cut, its logprob kept)
            k = next(k for k in range(len(script)) if "STOP" in codec.decode(script[: k + 1]))
            assert tokens == [piece(codec, t)[0] for t in script[: k + 1]]
    finally:
        s.close()


def test_echo_leads_with_the_prompt_and_its_logprobs(served: Served, codec, pool) -> None:  # type: ignore[no-untyped-def]
    text = "Hello, how are you"
    out = served.client.completions.create(model=MODEL, prompt=text, max_tokens=4, temperature=0, echo=True, logprobs=3)
    prompt = codec.encode(text)
    ref = reference(codec, pool, prompt, 4, SamplingParams(logprobs=3, prompt_logprobs=3))
    sampling = served.engine.added[-1][3]
    assert (sampling.logprobs, sampling.prompt_logprobs) == (3, 3)
    choice = out.choices[0]
    assert choice.text == text + codec.decode(ref.tokens)
    assert ref.prompt_logprobs is not None and ref.prompt_logprobs[0] is None
    assert_legacy(codec, choice.logprobs, prompt + ref.tokens, [*ref.prompt_logprobs, *ref.logprobs], 3, choice.text)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), 4)


def test_echo_without_logprobs_gives_the_text_only(served: Served, codec, pool) -> None:  # type: ignore[no-untyped-def]
    out = served.client.completions.create(model=MODEL, prompt=[40, 41, 42], max_tokens=3, temperature=0, echo=True)
    ref = reference(codec, pool, [40, 41, 42], 3)
    assert out.choices[0].text == codec.decode([40, 41, 42]) + codec.decode(ref.tokens)
    assert out.choices[0].logprobs is None and served.engine.added[-1][3].prompt_logprobs is None


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_scores_the_prompt_alone(served: Served, codec, pool, stream) -> None:  # type: ignore[no-untyped-def]
    """How evaluation harnesses score a multiple-choice answer: the prompt's logprobs, nothing generated."""
    texts = ["The quick brown fox", "The lazy dog"]
    kw: dict[str, Any] = {"model": MODEL, "prompt": texts, "max_tokens": 0, "echo": True, "logprobs": 1}
    if stream:
        chunks = list(served.client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        per = {i: [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i] for i in range(2)}
        assert all(len(v) == 1 for v in per.values())  # one chunk each: the prompt, finished
        choices = [per[0][0], per[1][0]]
        usage = chunks[-1].usage
    else:
        out = served.client.completions.create(**kw)
        choices, usage = out.choices, out.usage
    prompts = [codec.encode(t) for t in texts]
    assert (usage.prompt_tokens, usage.completion_tokens) == (sum(map(len, prompts)), 0)
    for text, prompt, choice in zip(texts, prompts, choices, strict=True):
        ref = reference(codec, pool, prompt, 1, SamplingParams(logprobs=1, prompt_logprobs=1))
        assert choice.text == text and choice.finish_reason == "length"
        assert_legacy(codec, choice.logprobs, prompt, list(ref.prompt_logprobs), 1, text)
    assert [a[2] for a in served.engine.added[-2:]] == [1, 1]  # one token each, left out of the answer


# ---- the sampling controls ----------------------------------------------------------------------------------------


def test_every_control_reaches_the_engine(served: Served) -> None:
    served.client.completions.create(
        model=MODEL,
        prompt=[5, 6],
        max_tokens=6,
        temperature=0.5,
        presence_penalty=0.25,
        frequency_penalty=-0.5,
        logit_bias={"17": 3, "9": -100},
        extra_body={"min_p": 0.1, "repetition_penalty": 1.3, "min_tokens": 2},
    )
    s = served.engine.added[-1][3]
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_p, s.min_tokens) == (
        0.25, -0.5, 1.3, 0.1, 2,
    )  # fmt: skip
    assert s.logit_bias == ((9, -100.0), (17, 3.0)) and s.logprobs is None
    assert s.speculative_decoding is True  # (the default: speculated where the engine speculates)


def test_speculative_decoding_can_be_turned_off_per_request(served: Served) -> None:
    served.client.completions.create(
        model=MODEL, prompt=[5, 6], max_tokens=3, extra_body={"speculative_decoding": False}
    )
    assert served.engine.added[-1][3].speculative_decoding is False
    with pytest.raises(openai.BadRequestError, match="speculative_decoding"):
        served.client.completions.create(
            model=MODEL, prompt=[5, 6], max_tokens=3, extra_body={"speculative_decoding": "off"}
        )


CONTROLS = {  # request fields (the token "T" stands for a pool token also in the prompt) and the field under test
    "bias up": ({"logit_bias": {"T": 5}}, "logit_bias"),
    "bias down": ({"logit_bias": {"321": -100}}, "logit_bias"),
    "frequency": ({"logit_bias": {"T": 5}, "frequency_penalty": 2.0}, "frequency_penalty"),
    "presence": ({"logit_bias": {"T": 5}, "presence_penalty": 2.0}, "presence_penalty"),
    "repetition": ({"logit_bias": {"T": 5}, "repetition_penalty": 3.0}, "repetition_penalty"),
    "min_p": ({"temperature": 2.0, "min_p": 0.2}, "min_p"),
}


@pytest.mark.parametrize("case", sorted(CONTROLS))
@pytest.mark.parametrize("stream", [False, True])
def test_each_control_changes_the_tokens_as_the_reference_does(served: Served, codec, pool, case, stream) -> None:  # type: ignore[no-untyped-def]
    """The engine gets the control, the answer is the reference's tokens with it, and those differ from the
    reference's without it (for min_p: with one that drops nothing), so the control did reach the choice."""
    t = pool[5]
    prompt = [t, 41, t, 7]
    fields, tested = CONTROLS[case]
    if "logit_bias" in fields:
        fields = {**fields, "logit_bias": {str(t) if k == "T" else k: v for k, v in fields["logit_bias"].items()}}
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "top_p": 1, "seed": 4, **fields}
    extra = {"top_k": 0} | {k: body.pop(k) for k in ("min_p", "repetition_penalty") if k in body}
    if stream:
        chunks = served.client.completions.create(**body, extra_body=extra, stream=True)
        text = "".join(c.choices[0].text for c in chunks)
    else:
        text = served.client.completions.create(**body, extra_body=extra).choices[0].text
    sampling = served.engine.added[-1][3]
    bias = tuple(sorted((int(k), float(v)) for k, v in fields.get("logit_bias", {}).items()))
    assert sampling == SamplingParams(
        fields.get("temperature", 0.0), 0, 1.0, 4, logit_bias=bias, min_p=fields.get("min_p", 0.0),
        **{k: fields[k] for k in ("frequency_penalty", "presence_penalty", "repetition_penalty") if k in fields},
    )  # fmt: skip
    want = reference(codec, pool, prompt, 12, sampling).tokens
    without = replace(sampling, **{tested: 1e-12 if tested == "min_p" else getattr(SamplingParams(), tested)})
    assert want != reference(codec, pool, prompt, 12, without).tokens
    assert text == codec.decode(want)


@pytest.mark.parametrize("min_tokens", [0, 3])
def test_min_tokens_holds_back_the_end_of_sequence(codec, pool, min_tokens) -> None:  # type: ignore[no-untyped-def]
    eos = codec.eos_token_ids[0]
    prompt = codec.encode("Q")
    script = [*codec.encode("ab"), eos, *codec.encode("cd ef gh")]
    s = Served(codec, pool, scripts={tuple(prompt): script})
    try:
        out = s.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body={"min_tokens": min_tokens}
        )
        ref = reference(codec, pool, prompt, 8, SamplingParams(min_tokens=min_tokens), script)
        if min_tokens:
            assert eos not in ref.tokens[:min_tokens] and len(ref.tokens) > len(script[: script.index(eos) + 1])
        else:
            assert ref.tokens == script[: script.index(eos) + 1]
        assert out.choices[0].text == codec.decode(ref.tokens)
        assert out.choices[0].finish_reason == ("stop" if ref.tokens[-1] == eos else "length")
    finally:
        s.close()


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_hold_back_the_stop_strings_too(codec, pool, stream) -> None:  # type: ignore[no-untyped-def]
    prompt = codec.encode("Q")
    first = codec.encode("Hello STOP you")
    s = Served(codec, pool, scripts={tuple(prompt): first + codec.encode(" are fine. STOP and more")})
    try:
        for least, want in [(0, "Hello "), (len(first), "Hello STOP you are fine. ")]:
            kw: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "stop": "STOP", "temperature": 0}
            kw["extra_body"] = {"min_tokens": least}
            if stream:
                text = "".join(c.choices[0].text for c in s.client.completions.create(**kw, stream=True))
            else:
                text = s.client.completions.create(**kw).choices[0].text
            assert text == want
    finally:
        s.close()


def test_logit_bias_ids_are_checked_against_the_vocabulary(served: Served, codec) -> None:  # type: ignore[no-untyped-def]
    vocab = codec.tokenizer.vocab_size
    with pytest.raises(openai.BadRequestError) as info:
        served.client.completions.create(model=MODEL, prompt="x", logit_bias={str(vocab): 1})
    assert info.value.param == "logit_bias" and f"outside the vocabulary [0, {vocab})" in info.value.message
    assert served.engine.added == []


# ---- an engine that cannot honour a field ------------------------------------------------------------------------

REFUSED = [  # (endpoint, body, param, the engine's field) of an engine refusing min_p and prompt logprobs
    ("/v1/completions", {"prompt": "x", "min_p": 0.1, "temperature": 0.5}, "min_p", "min_p"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 0, "max_tokens": 0}, "echo", "prompt_logprobs"),
]
SERVED = [  # what an engine refusing nothing serves
    {"prompt": "x", "echo": True, "logprobs": 0, "max_tokens": 0},
    {"prompt": "x", "logprobs": 1},
    {"prompt": "x", "logit_bias": {"5": 1}},
    {"prompt": "x", "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1},
    {"prompt": "x", "min_p": 0.1, "temperature": 0.7},
    {"prompt": "x", "min_tokens": 1},
]


def test_a_field_the_engine_cannot_honour_is_a_400_naming_it(codec, pool) -> None:  # type: ignore[no-untyped-def]
    """An engine's refusal of a field (a ValueError ``"<field>: ..."``, as the GPU engine's of logprobs and controls
    with a vocabulary split over tensor-parallel ranks; here the stand-in's) is a 400 naming the request's field;
    then with none refused, every field is served."""
    s = Served(codec, pool, refuses=("min_p", "prompt_logprobs"))
    try:
        for path, body, param, field in REFUSED:
            r = httpx.post(f"{s.url}{path}", content=json.dumps({"model": MODEL, **body}), timeout=WAIT)
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["param"] == param and error["code"] == "unsupported_value", (body, error)
            assert f"{field}: not supported by this engine" in error["message"]
        s.engine.refuses = frozenset()
        for body in SERVED:
            r = httpx.post(f"{s.url}/v1/completions", content=json.dumps({"model": MODEL, **body}), timeout=WAIT)
            assert r.status_code == 200, (body, r.text)
        ok = s.client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0.7, top_p=0.9, seed=1)
        assert ok.usage.completion_tokens == 2 and s.service.unfinished == 0
    finally:
        s.close()


def test_the_reference_keeps_the_rule_for_requests_without_the_new_fields(codec, pool) -> None:  # type: ignore[no-untyped-def]
    """The stand-in's logits favour the rule's token, so a request that only asks for logprobs keeps its tokens,
    and its chosen token is the most likely one."""
    prompt = [3, 4, 5]
    run = reference(codec, pool, prompt, 6, SamplingParams(logprobs=1))
    assert run.tokens == [rule_token(prompt, k, pool) for k in range(6)]
    assert all(e.top[0] == (t, e.logprob) for t, e in zip(run.tokens, run.logprobs, strict=True))


def test_the_docs_example_runs(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/engine-text.md's client example of these fields, against the stand-in server."""
    run_doc_example("### Log-probabilities, `echo`", served.url)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 9 and float(printed[-1]) < 0  # 8 tokens with their alternatives, then the prompt's score
    assert [a[3].min_tokens for a in served.engine.added] == [0, 0, 8]
