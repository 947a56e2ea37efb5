"""Where the server must answer as OpenAI's API and vLLM's server do, end to end on CPU (the official ``openai``
client against the stand-in engine): vLLM's request fields (grammars, stop token ids, ``include_stop_str_in_output``,
``continue_final_message``, negative seeds), context-length refusals in OpenAI's words and a default completion
budget that fits the context, API keys and CORS, and the shapes of streamed chunks and server errors."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from helpers.fake_engine import expected_tokens
from helpers.json_schemas import PERSON, check_person
from helpers.serve import MODEL, WAIT, Served, require_serving

openai = require_serving()
httpx = pytest.importorskip("httpx")

CONTEXT = 4096  # the stand-in's max_seq_len, the server's max_model_len


def post(url: str, path: str, body: Any, **kw: Any) -> Any:
    return httpx.post(f"{url}{path}", json=body, timeout=WAIT, **kw)


def events(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A streamed answer's events as sent (JSON objects, ``[DONE]`` left out)."""
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=WAIT) as r:
        assert r.status_code == 200, r.read()
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# ---- seed ----------------------------------------------------------------------------------------------------------


def test_a_seed_of_minus_one_is_accepted_and_reproducible(served: Served, codec, pool) -> None:  # type: ignore[no-untyped-def]
    """UIs send -1; vLLM takes any int64. It is reduced modulo 2**64, as the engine's seeds are."""
    texts = [
        served.client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=8, temperature=1.0, seed=-1)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert served.engine.added[-1][3].seed == 2**64 - 1 == served.engine.added[-2][3].seed
    assert texts[0] == texts[1] == codec.decode(expected_tokens([5, 6], 8, pool, seed=2**64 - 1))
    low = served.client.completions.create(model=MODEL, prompt=[5], max_tokens=1, seed=-(2**63))
    assert low.choices[0].finish_reason == "length" and served.engine.added[-1][3].seed == 2**63


# ---- context length ----------------------------------------------------------------------------------------------


def test_max_tokens_past_the_context_is_refused_in_openais_words(served: Served) -> None:
    prompt = [5] * 4000
    with pytest.raises(openai.BadRequestError) as info:
        served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=200)
    error = info.value
    assert error.code == "context_length_exceeded" and error.param == "max_tokens"
    assert error.body["message"] == (
        f"This model's maximum context length is {CONTEXT} tokens. However, you requested 4200 tokens (4000 in the "
        "prompt, 200 in the completion). Please reduce the length of the prompt or completion."
    )
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as info:
        served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=CONTEXT)
    assert info.value.param == "max_tokens" and "in the messages, 4096 in the completion)" in info.value.body["message"]
    assert re.search(
        r"maximum context length is \d+ tokens\. However, you requested \d+ tokens", info.value.body["message"]
    )
    assert served.engine.added == []  # refused before the engine


def test_a_prompt_longer_than_the_context_is_refused_naming_it(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        served.client.completions.create(model=MODEL, prompt=[5] * 5000)  # no max_tokens: the prompt alone
    assert info.value.param == "prompt" and info.value.code == "context_length_exceeded"
    assert info.value.body["message"] == (
        f"This model's maximum context length is {CONTEXT} tokens. However, your prompt resulted in 5000 tokens. "
        "Please reduce the length of the prompt."
    )
    with pytest.raises(openai.BadRequestError) as info:
        served.client.completions.create(model=MODEL, prompt=[5] * 5000, max_tokens=4)
    assert info.value.param == "prompt" and "(5000 in the prompt, 4 in the completion)" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a " * 5000}])
    assert info.value.param == "messages" and "However, your messages resulted in" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        served.client.completions.create(model=MODEL, prompt=[5] * CONTEXT)  # no room for one token
    assert "which leaves no room for the completion" in info.value.body["message"]


def test_the_default_completion_budget_shrinks_to_fit_the_context(served: Served, codec) -> None:  # type: ignore[no-untyped-def]
    """Without max_tokens: completions get 16 tokens, or what the context leaves; a chat what the context
    leaves (as OpenAI and vLLM): never a refusal for a budget the client did not send."""
    out = served.client.completions.create(model=MODEL, prompt=[5] * 4090, temperature=0)
    assert served.engine.added[-1][2] == 6 and out.usage.completion_tokens == 6
    assert out.choices[0].finish_reason == "length"
    served.client.completions.create(model=MODEL, prompt=[5] * 100)
    assert served.engine.added[-1][2] == 16
    messages = [{"role": "user", "content": "Hello there"}]
    served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=None, temperature=0)
    assert served.engine.added[-1][2] == CONTEXT - len(codec.encode_chat(messages))


# ---- grammars: vLLM's fields ------------------------------------------------------------------------------------

CHOICES = ["Paris", "London", "New York"]


def grammar_requests() -> list[tuple[str, dict[str, Any], Any]]:
    """(what, extra body, check of the text) for each way vLLM asks for a grammar."""
    person = PERSON

    def is_person(text: str) -> bool:
        check_person(json.loads(text))
        return True

    return [
        ("guided_json", {"guided_json": person}, is_person),
        ("guided_json text", {"guided_json": json.dumps(person)}, is_person),
        ("guided_choice", {"guided_choice": CHOICES}, lambda t: t in CHOICES),
        ("guided_regex", {"guided_regex": r"[0-9]{3}-[a-z]{2,4}"}, re.compile(r"[0-9]{3}-[a-z]{2,4}").fullmatch),
        ("guided_grammar lark", {"guided_grammar": 'start: "yes" | "no"'}, lambda t: t in ("yes", "no")),
        ("guided_grammar gbnf", {"guided_grammar": 'root ::= "up" | "down"'}, lambda t: t in ("up", "down")),
        ("structured_outputs.choice", {"structured_outputs": {"choice": CHOICES}}, lambda t: t in CHOICES),
        ("structured_outputs.regex", {"structured_outputs": {"regex": "ab+c"}}, re.compile("ab+c").fullmatch),
        ("structured_outputs.json", {"structured_outputs": {"json": person}}, is_person),
    ]


@pytest.mark.parametrize("what,extra,check", grammar_requests(), ids=[r[0] for r in grammar_requests()])
@pytest.mark.parametrize("stream", [False, True])
def test_vllms_grammar_fields_are_followed(
    served: Served, what: str, extra: dict[str, Any], check: Any, stream: bool
) -> None:
    pytest.importorskip("llguidance")
    temperature = 1.0  # sampled among the tokens the grammar allows
    for seed in range(3):
        kw: dict[str, Any] = {
            "model": MODEL,
            "max_tokens": 600,
            "temperature": temperature,
            "seed": seed,
            "extra_body": extra,
        }
        messages = [{"role": "user", "content": f"Answer {seed}"}]
        if stream:
            chunks = list(served.client.chat.completions.create(messages=messages, stream=True, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert finish == ["stop"]
        else:
            choice = served.client.chat.completions.create(messages=messages, **kw).choices[0]
            text = choice.message.content
            assert choice.finish_reason == "stop"
        assert check(text), (what, text)
        assert served.engine.added[-1][3].grammar is not None
    out = served.client.completions.create(
        model=MODEL, prompt="Q:", max_tokens=600, temperature=temperature, extra_body=extra
    )
    assert check(out.choices[0].text) and out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "vllm,openai_format",
    [
        ({"structured_outputs": {"json_object": True}}, {"type": "json_object"}),
        ({"guided_json": PERSON}, {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}),
    ],
)
def test_vllms_json_fields_ask_for_response_formats_grammar(served: Served, vllm: Any, openai_format: Any) -> None:
    pytest.importorskip("llguidance")
    grammars = []
    for extra in (vllm, {"response_format": openai_format}):
        served.client.completions.create(model=MODEL, prompt="An object:", max_tokens=2, extra_body=extra)
        grammars.append(served.engine.added[-1][3].grammar)
    assert grammars[0] is not None and grammars[0] == grammars[1]


def test_a_grammar_llguidance_refuses_is_a_400_naming_its_field(served: Served) -> None:
    pytest.importorskip("llguidance")
    for extra, param in [
        ({"guided_regex": "[a-"}, "guided_regex"),
        ({"guided_grammar": "root ::= ("}, "guided_grammar"),
        ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs"),
        ({"guided_json": {"type": "no-such-type"}}, "guided_json"),
        ({"guided_regex": "a{1000000}"}, "guided_regex"),  # compiles, then fails at its first token
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            served.client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body=extra)
        assert info.value.param == param and info.value.body["message"].startswith(param), info.value.body["message"]
    assert served.engine.added == []


# ---- stop token ids and stop strings ------------------------------------------------------------------------------


def test_stop_token_ids_end_the_choice_as_eos_does(codec, pool) -> None:  # type: ignore[no-untyped-def]
    tok = codec.tokenizer
    marker = tok.token_id("<|im_start|>")  # a special token other than the EOS ids
    assert marker is not None and marker in tok.special_ids() and marker not in codec.eos_token_ids
    head, tail = tok.encode("Hello world.", add_special_tokens=False), tok.encode(" The END", add_special_tokens=False)
    s = Served(codec, pool, scripts={(7, 8): [*head, marker, *tail, codec.eos_token_ids[0]]})
    try:
        out = s.client.completions.create(model=MODEL, prompt=[7, 8], max_tokens=50, temperature=0)
        assert out.choices[0].text == "Hello world. The END"  # the marker is skipped, not a stop
        body = {"stop_token_ids": [marker]}
        for stream in (False, True):
            got = s.client.completions.create(
                model=MODEL, prompt=[7, 8], max_tokens=50, temperature=0, stream=stream, extra_body=body
            )
            chunks = list(got) if stream else [got]
            text = "".join(c.choices[0].text for c in chunks)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
            assert text == "Hello world." and finish == ["stop"]
            assert chunks[-1].usage is None or chunks[-1].usage.completion_tokens == len(head) + 1
        with_eos_ignored = s.client.completions.create(
            model=MODEL, prompt=[7, 8], max_tokens=50, extra_body={**body, "ignore_eos": True}
        )
        assert with_eos_ignored.choices[0].text == "Hello world."  # ignore_eos leaves the stop ids on
        # a plain token's text would end the output, where a stop token's is left out: refused unless kept
        plain = tail[0]
        with pytest.raises(openai.BadRequestError) as info:
            s.client.completions.create(
                model=MODEL, prompt=[7, 8], max_tokens=50, extra_body={"stop_token_ids": [plain]}
            )
        assert info.value.param == "stop_token_ids" and "include_stop_str_in_output: true" in info.value.body["message"]
        kept = s.client.completions.create(
            model=MODEL,
            prompt=[7, 8],
            max_tokens=50,
            extra_body={"stop_token_ids": [plain], "include_stop_str_in_output": True},
        )
        assert kept.choices[0].text == "Hello world." + tok.decode([plain]) and kept.choices[0].finish_reason == "stop"
        with pytest.raises(openai.BadRequestError, match="skip_special_tokens false"):
            s.client.completions.create(
                model=MODEL, prompt=[7, 8], max_tokens=50, extra_body={**body, "skip_special_tokens": False}
            )
    finally:
        s.close()


def test_stop_token_ids_add_to_the_engines_own_eos_ids(codec, pool) -> None:  # type: ignore[no-untyped-def]
    """``stop_token_ids`` end a choice in addition to every id that ends it without them: the engine's own EOS ids
    (its config's) as well as the checkpoint's generation config's."""
    tok = codec.tokenizer
    engine_only = next(t for t in sorted(tok.special_ids()) if t not in codec.eos_token_ids)
    head, tail = tok.encode("Hello world.", add_special_tokens=False), tok.encode(" The END", add_special_tokens=False)
    s = Served(codec, pool, scripts={(7, 8): [*head, engine_only, *tail, codec.eos_token_ids[0]]})
    try:
        s.engine.eos_token_ids = (*codec.eos_token_ids, engine_only)
        asked = {"stop_token_ids": [tail[-1]], "include_stop_str_in_output": True}  # a later token of the script
        for body in ({}, asked):
            out = s.client.completions.create(model=MODEL, prompt=[7, 8], max_tokens=50, extra_body=body)
            assert out.choices[0].text == "Hello world." and out.choices[0].finish_reason == "stop", body
    finally:
        s.close()


@pytest.mark.parametrize("stream", [False, True])
def test_include_stop_str_in_output_keeps_the_stop_string(codec, pool, stream: bool) -> None:  # type: ignore[no-untyped-def]
    reply = codec.tokenizer.encode("Hello world. The END is near.", add_special_tokens=False)
    s = Served(codec, pool, scripts={(7, 9): [*reply, codec.eos_token_ids[0]]})
    try:
        texts = []
        for include in (False, True):
            got = s.client.completions.create(
                model=MODEL,
                prompt=[7, 9],
                max_tokens=50,
                stop=["END"],
                stream=stream,
                extra_body={"include_stop_str_in_output": include},
            )
            chunks = list(got) if stream else [got]
            texts.append("".join(c.choices[0].text for c in chunks))
            assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
        assert texts == ["Hello world. The ", "Hello world. The END"]
    finally:
        s.close()


# ---- continue_final_message --------------------------------------------------------------------------------------


def test_continue_final_message_continues_the_last_message(served: Served, codec) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": "Tell a story"}, {"role": "assistant", "content": "Once upon a time"}]
    served.client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=4,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    rendered = codec.render_chat(messages, False)
    assert rendered.rstrip().endswith("<|im_end|>")  # the template closes the turn; the server leaves it open
    want = rendered[: rendered.rindex("Once upon a time") + len("Once upon a time")]
    assert served.engine.added[-1][1] == tuple(codec.tokenizer.encode(want, add_special_tokens=False))
    served.client.chat.completions.create(  # add_generation_prompt may be left out with it
        model=MODEL, messages=messages, max_tokens=4, extra_body={"continue_final_message": True}
    )
    assert served.engine.added[-1][1] == served.engine.added[-2][1]


def test_spaces_between_special_tokens_is_taken(served: Served) -> None:
    """A slow tokenizer's decoding option: tokenizer.json decodes alike either way (as vLLM's fast path)."""
    for value in (True, False):
        out = served.client.completions.create(
            model=MODEL, prompt=[5], max_tokens=3, temperature=0, extra_body={"spaces_between_special_tokens": value}
        )
        assert out.usage.completion_tokens == 3


# ---- API key and CORS --------------------------------------------------------------------------------------------


def test_an_api_key_guards_v1_and_leaves_health_and_metrics_open(codec, pool) -> None:  # type: ignore[no-untyped-def]
    s = Served(codec, pool, app_kw={"api_key": "sk-local-123"})
    try:
        for key in ("sk-local-12", "sk-local-1234", "none"):
            client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=key, max_retries=0, timeout=WAIT)
            with pytest.raises(openai.AuthenticationError) as info:
                client.completions.create(model=MODEL, prompt=[5], max_tokens=2)
            assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
            assert "incorrect API key" in info.value.body["message"]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-local-123"}):
            r = httpx.post(f"{s.url}/v1/completions", json={"prompt": [5]}, headers=headers, timeout=WAIT)
            error = r.json()["error"]
            assert r.status_code == 401 and error["type"] == "invalid_request_error" and error["param"] is None
            assert error["code"] == "invalid_api_key" and ("no API key" in error["message"]) == (not headers)
            assert "sk-local" not in r.text  # the key is never echoed
        assert s.engine.added == []
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sk-local-123", max_retries=0, timeout=WAIT)
        assert client.completions.create(model=MODEL, prompt=[5], max_tokens=2).usage.completion_tokens == 2
        assert [m.id for m in client.models.list().data] == [MODEL]
        assert httpx.get(f"{s.url}/health", timeout=WAIT).status_code == 200
        assert httpx.get(f"{s.url}/metrics", timeout=WAIT).status_code == 200
    finally:
        s.close()


def test_an_api_key_holds_under_a_root_path_and_off_the_routes(served: Served) -> None:
    """Behind a proxy (uvicorn ``--root-path /api``: the prefix stands in front of the ASGI path) the key is still
    asked for, and so it is on a path without a route (404 only with the key), ``/health`` alone left open."""
    from starlette.testclient import TestClient

    from fi_engine.serve.openai_server import build_app

    app = build_app(served.service, MODEL, api_key="k1")
    for root in ("", "/api"):
        client = TestClient(app, root_path=root)  # (no lifespan: the service stays the fixture's)
        assert client.get(f"{root}/v1/models").status_code == 401, root
        assert client.get(f"{root}/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200, root
        assert client.get(f"{root}/v2/nothing").status_code == 401, root
        assert client.get(f"{root}/v2/nothing", headers={"Authorization": "Bearer k1"}).status_code == 404, root
        assert client.get(f"{root}/health").status_code == 200, root


def test_cors_preflights_are_answered_for_any_origin_by_default(served: Served) -> None:
    headers = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = httpx.options(f"{served.url}/v1/chat/completions", headers=headers, timeout=WAIT)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in r.headers
    r = httpx.get(f"{served.url}/v1/models", headers={"Origin": "https://app.example"}, timeout=WAIT)
    assert r.headers["access-control-allow-origin"] == "*"


def test_cors_origins_are_limited_and_a_preflight_needs_no_key(codec, pool) -> None:  # type: ignore[no-untyped-def]
    s = Served(codec, pool, app_kw={"api_key": "k", "allowed_origins": ["https://ok.example"]})
    try:
        ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        r = httpx.options(f"{s.url}/v1/completions", headers={"Origin": "https://ok.example", **ask}, timeout=WAIT)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ok.example"
        r = httpx.options(f"{s.url}/v1/completions", headers={"Origin": "https://evil.example", **ask}, timeout=WAIT)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = httpx.get(f"{s.url}/v1/models", headers={"Origin": "https://ok.example"}, timeout=WAIT)
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://ok.example"
    finally:
        s.close()
    s = Served(codec, pool, app_kw={"allowed_origins": []})
    try:
        r = httpx.get(f"{s.url}/v1/models", headers={"Origin": "https://app.example"}, timeout=WAIT)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    finally:
        s.close()


def test_build_app_refuses_a_bad_key_or_origins(served: Served) -> None:
    from fi_engine.serve.openai_server import build_app

    for kw, error, words in [
        ({"api_key": "two words"}, ValueError, "api_key"),
        ({"api_key": ""}, ValueError, "api_key"),
        ({"api_key": 5}, TypeError, "api_key"),
        ({"allowed_origins": "*"}, TypeError, "allowed_origins"),
        ({"allowed_origins": ["*", ""]}, ValueError, "allowed_origins[1]"),
    ]:
        with pytest.raises(error, match=re.escape(words)):
            build_app(served.service, MODEL, **kw)


# ---- shapes: streamed usage, server errors ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_with_include_usage_every_chunk_has_a_usage_null_but_the_last(served: Served, path: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 5, "stream": True}
    body |= {"prompt": [5]} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    sent = events(served.url, path, body | {"stream_options": {"include_usage": True}})
    assert sent[:-1] and all("usage" in e and e["usage"] is None for e in sent[:-1])
    assert sent[-1]["choices"] == [] and sent[-1]["usage"]["completion_tokens"] == 5
    assert all("usage" not in e for e in events(served.url, path, body))


def test_an_engine_failure_is_a_server_error(codec, pool) -> None:  # type: ignore[no-untyped-def]
    s = Served(codec, pool, fail_at_step=1)
    try:
        r = post(s.url, "/v1/completions", {"model": MODEL, "prompt": [5], "max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        with pytest.raises(openai.InternalServerError):
            s.client.completions.create(model=MODEL, prompt=[5], max_tokens=4)
    finally:
        s.close()
