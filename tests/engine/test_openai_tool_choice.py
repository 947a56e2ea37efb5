"""``tool_choice`` for every model, and a JSON ``response_format`` beside tools, through the server on CPU: the
official ``openai`` client against the stand-in engine, which honours a request's grammar (the highest-logit token
it allows; a script's token wherever the grammar allows it, at temperature 0).

- SmolLM2's real chat template shows no tool-call format: a named function or "required" is served in the neutral
  JSON format under the grammar of the tools' schemas (the arguments object; an array of ``{"name", "parameters"}``
  calls), answered as OpenAI's ``tool_calls`` whole and streamed, with OpenAI's finish reasons ("stop" for a named
  function, "tool_calls" for "required"); "auto" is a 400 naming ``tool_choice``.
- Qwen3, Llama 3.1 and gpt-oss (a call format the server reads): "auto" beside a JSON format is one grammar of
  calls or the answer, and the reply is a call or content accordingly.
- An engine that cannot apply grammars: a forced call in a template's own format is served by the opener alone;
  in the neutral format it is a 400 naming ``tool_choice``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.json_schemas import PERSON, SCHEMAS, check_person, check_schema, json_schema
from helpers.serve import MODEL, WAIT, FamilyServing, Served, chat_message, forced_choice, require_serving
from helpers.text_checkpoints import TIME_TOOL, WEATHER_TOOL

from fi_engine.text.tool_calls import opener

openai = require_serving()
pytest.importorskip("llguidance")

TOOLS = [WEATHER_TOOL, TIME_TOOL]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PARIS = {"city": "Paris"}


class Family(FamilyServing):
    """A family's checkpoint served (``name``: its key in helpers.text_checkpoints.FAMILIES)."""

    def __init__(self, root: Path, name: str) -> None:
        super().__init__(root, name)
        self.name = name

    def prompt(self, messages: list[dict[str, Any]], lead: str = "", tools: Any = TOOLS) -> tuple[int, ...]:
        return super().prompt(messages, lead, tools)

    def reply(self, text: str) -> list[int]:
        """The tokens of a reply that ends with the checkpoint's first end-of-sequence token."""
        return [*self.tokens(text), self.codec.eos_token_ids[0]]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return Family(tmp_path_factory.mktemp("smollm2"), "smollm2")


def sse_events(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A streamed chat's events as the server sends them (``[DONE]`` left out)."""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=WAIT) as r:
        assert r.status_code == 200, r.read()
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def check_call_deltas(events: list[dict[str, Any]], calls: list[tuple[str, dict[str, Any]]], finish: str) -> None:
    """OpenAI's stream of a reply that is ``calls``: the role with ``"content": null``, then per call its index, id,
    type and name (arguments ``""``), then its arguments; no content; the finish last."""
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": None}
    pieces = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert all(not d.get("content") for d in deltas)
    assert len(pieces) == 2 * len(calls)
    for k, (name, arguments) in enumerate(calls):
        head, tail = pieces[2 * k], pieces[2 * k + 1]
        assert head["index"] == tail["index"] == k and head["id"].startswith("call_") and head["type"] == "function"
        assert head["function"] == {"name": name, "arguments": ""} and set(tail) == {"index", "function"}
        assert json.loads(tail["function"]["arguments"]) == arguments
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]] == [finish]


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_function_without_a_call_format_is_its_arguments_under_its_schema(
    smollm2: Family, stream: bool
) -> None:
    """The reply is the arguments object alone (no opener after the prompt), answered as OpenAI answers a call of a
    named function: ``tool_calls``, content None, finish "stop"."""
    s = smollm2.serve({smollm2.prompt(ASK): smollm2.reply(json.dumps(PARIS))})
    try:
        kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": forced_choice(True), "temperature": 0}
        message, finish = chat_message(s.client, stream, **kw)
        assert finish == "stop" and not message.content and len(message.tool_calls) == 1
        (call,) = message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == PARIS
        prompt, sampling = s.engine.added[-1][1], s.engine.added[-1][3]
        # the template's rendering as it is (SmolLM2's shows no tools: the grammar alone makes the reply a call)
        assert prompt == smollm2.prompt(ASK) and "get_weather" not in smollm2.codec.decode(prompt)
        assert "%json" in sampling.grammar and "city" in sampling.grammar
        if stream:
            check_call_deltas(sse_events(s.url, kw), [("get_weather", PARIS)], "stop")
    finally:
        s.close()


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("stream", [False, True])
def test_required_without_a_call_format_is_an_array_of_calls(smollm2: Family, parallel: bool, stream: bool) -> None:
    """The reply is ``[{"name": ..., "parameters": {...}}, ...]``: each item a call; without
    ``parallel_tool_calls`` the grammar closes the array after the first (the script's second call is refused)."""
    two = (
        '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {"tz": "CET"}}]'
    )
    s = smollm2.serve({smollm2.prompt(ASK): smollm2.reply(two)})
    try:
        kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "temperature": 0}
        kw["parallel_tool_calls"] = parallel
        message, finish = chat_message(s.client, stream, **kw)
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]
        want = [("get_weather", PARIS), ("get_time", {"tz": "CET"})][: 2 if parallel else 1]
        assert calls == want and finish == "tool_calls" and not message.content
        if stream:
            check_call_deltas(sse_events(s.url, kw), want, "tool_calls")
    finally:
        s.close()


BOUNDED = [  # tools whose arguments any model ends within a few hundred tokens (helpers.json_schemas)
    {"type": "function", "function": {"name": name, "parameters": schema}}
    for name, schema in zip(("person", "pair", "color"), SCHEMAS, strict=False)
]


@pytest.mark.parametrize("named", [True, False], ids=["named", "required"])
def test_any_model_answers_a_forced_choice_with_valid_calls(smollm2: Family, named: bool) -> None:
    """No script: the stand-in's pseudo-random model, sampled at temperature 1 under the grammar (four seeds):
    every reply is a call of a tool offered (the named one), its arguments valid."""
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in BOUNDED}
    s = smollm2.serve({})
    try:
        for seed in range(4):
            choice = {"type": "function", "function": {"name": "pair"}} if named else "required"
            out = s.client.chat.completions.create(
                model=MODEL,
                messages=ASK,
                tools=BOUNDED,
                tool_choice=choice,
                parallel_tool_calls=False,  # (a pseudo-random model would add calls up to max_tokens)
                temperature=1.0,
                seed=seed,
                max_tokens=600,
            ).choices[0]
            assert out.finish_reason == ("stop" if named else "tool_calls") and out.message.tool_calls, out
            for call in out.message.tool_calls:
                assert call.function.name == "pair" or not named
                check_schema(json.loads(call.function.arguments), schemas[call.function.name])
    finally:
        s.close()


def test_a_named_call_cut_by_max_tokens_is_its_arguments_so_far(smollm2: Family) -> None:
    s = smollm2.serve({smollm2.prompt(ASK): smollm2.reply(json.dumps(PARIS))})
    try:
        kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": forced_choice(True), "temperature": 0}
        out = s.client.chat.completions.create(**kw, max_tokens=4).choices[0]
        (call,) = out.message.tool_calls
        assert out.finish_reason == "length" and not out.message.content and call.function.name == "get_weather"
        assert 0 < len(call.function.arguments) < len(json.dumps(PARIS))
        assert json.dumps(PARIS).startswith(call.function.arguments)
    finally:
        s.close()


def test_auto_without_a_call_format_is_a_400_naming_tool_choice(smollm2: Family) -> None:
    """Neither the default "auto" nor "auto" beside a JSON format can be told from text without a call format: a
    400 naming ``tool_choice`` that says what to send; "none" is served as text."""
    s = smollm2.serve({smollm2.prompt(ASK): smollm2.reply("It is sunny.")})
    try:
        for extra in ({}, {"tool_choice": "auto"}, {"response_format": {"type": "json_object"}}):
            with pytest.raises(openai.BadRequestError) as caught:
                s.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, **extra)
            error = caught.value.body
            assert error["param"] == "tool_choice" and error["code"] == "unsupported_value"
            assert '"required" or a named function' in error["message"] and "template" in error["message"]
        assert not s.engine.added
        out = s.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none")
        assert out.choices[0].message.content == "It is sunny." and out.choices[0].message.tool_calls is None
    finally:
        s.close()


def test_a_tools_schema_the_grammar_cannot_use_is_a_400_naming_tools(smollm2: Family) -> None:
    bad = {"type": "function", "function": {"name": "bad", "parameters": {"type": "string", "pattern": "(unclosed"}}}
    s = smollm2.serve({})
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            s.client.chat.completions.create(model=MODEL, messages=ASK, tools=[*TOOLS, bad], tool_choice="required")
        assert caught.value.body["param"] == "tools"
        assert caught.value.body["message"].startswith("tools[2].function.parameters: the schema cannot be used")
        assert not s.engine.added
    finally:
        s.close()


@pytest.fixture(scope="module", params=["qwen3", "llama3.1", "gpt-oss"])
def formatted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    return Family(tmp_path_factory.mktemp(request.param), request.param)


# how each family writes a call of get_weather(city="Paris")
CALL = {
    "qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "llama3.1": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "gpt-oss": '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}',
}
FORMAT = {"qwen3": "hermes", "llama3.1": "llama3_json", "gpt-oss": "harmony"}
ADA = '{"name": "Ada", "age": 36, "member": true, "tier": "gold"}'


@pytest.fixture
def either(formatted: Family) -> Iterator[Served]:
    """A server whose engine calls get_weather when asked the weather, and answers in JSON when asked who."""
    who = [{"role": "user", "content": "Who is Ada?"}]
    s = formatted.serve(
        {formatted.prompt(ASK): formatted.reply(CALL[formatted.name]), formatted.prompt(who): formatted.reply(ADA)}
    )
    yield s
    s.close()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field", ["response_format", "guided_json"])
def test_a_json_format_beside_tools_is_a_call_or_the_answer(either: Served, stream: bool, field: str) -> None:
    """ "auto" with a JSON format (as the OpenAI Agents SDK sends an agent's output type beside its tools): one
    grammar of calls or the answer; the reply is a call (finish "tool_calls") or content in that format ("stop")."""
    s = either
    body = {"response_format": json_schema(PERSON)} if field == "response_format" else {"guided_json": PERSON}
    kw: dict[str, Any] = {"model": MODEL, "tools": TOOLS, "temperature": 0, "extra_body": body}
    message, finish = chat_message(s.client, stream, messages=ASK, **kw)
    assert finish == "tool_calls" and not message.content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [("get_weather", PARIS)]
    grammar = s.engine.added[-1][3].grammar
    assert "response" in grammar or "anyOf" in grammar  # the answer's schema is in the call's grammar
    message, finish = chat_message(s.client, stream, messages=[{"role": "user", "content": "Who is Ada?"}], **kw)
    assert finish == "stop" and not message.tool_calls
    check_person(json.loads(message.content))


def test_a_forced_call_beside_a_json_format_is_the_call(formatted: Family) -> None:
    """A forced call's reply is a call whatever the format asked: its grammar is the tools' alone."""
    lead = opener(FORMAT[formatted.name])
    s = formatted.serve({formatted.prompt(ASK, lead): formatted.reply(CALL[formatted.name].removeprefix(lead))})
    try:
        out = s.client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            temperature=0,
            response_format=json_schema(PERSON),
        )
        (call,) = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and json.loads(call.function.arguments) == PARIS
        assert "tier" not in s.engine.added[-1][3].grammar  # the response's schema is not in it
    finally:
        s.close()


def test_a_guided_regex_beside_tools_is_still_refused(either: Served) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        either.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, extra_body={"guided_regex": "a+"})
    assert (
        caught.value.body["param"] == "guided_regex"
        and "a JSON format as response_format" in caught.value.body["message"]
    )


def test_an_engine_without_grammars_serves_a_formats_forced_call_by_its_opener(formatted: Family) -> None:
    """An engine refusing grammars (the GPU engine with a vocabulary split over tensor-parallel ranks): a forced
    call in the template's own format is submitted again without one (the opener makes the reply a call)."""
    lead = opener(FORMAT[formatted.name], "get_weather")
    s = formatted.serve({formatted.prompt(ASK, lead): formatted.reply(CALL[formatted.name].removeprefix(lead))})
    s.engine.refuses = frozenset({"grammar"})
    try:
        kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": forced_choice(True), "temperature": 0}
        message, finish = chat_message(s.client, False, **kw)
        assert finish == "stop" and json.loads(message.tool_calls[0].function.arguments) == PARIS
        assert s.engine.added[-1][3].grammar is None
    finally:
        s.close()


def test_an_engine_without_grammars_refuses_a_neutral_forced_call_naming_tool_choice(smollm2: Family) -> None:
    s = smollm2.serve({})
    s.engine.refuses = frozenset({"grammar"})
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            s.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required")
        assert caught.value.body["param"] == "tool_choice" and caught.value.body["code"] == "unsupported_value"
        assert "grammar: not supported by this engine" in caught.value.body["message"]
    finally:
        s.close()
