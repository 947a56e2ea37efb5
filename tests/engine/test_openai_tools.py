"""Function calling through the server, end to end on CPU: the official ``openai`` client against the stand-in
engine over checkpoints with the real chat templates of Qwen3 (Hermes-style ``<tool_call>`` blocks) and Llama 3.1
(JSON calls). The template must render the tools into the prompt the engine gets; the stand-in replies with the
text such a model writes (a script per prompt); the answer must hold OpenAI's tool calls, typed by the client,
whole and streamed, for every ``tool_choice`` and ``parallel_tool_calls``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.serve import MODEL, WAIT, FamilyServing, Served, chat_message, forced_choice, require_serving
from helpers.text_checkpoints import TIME_TOOL, WEATHER_TOOL

from fi_engine.text.tool_calls import opener

openai = require_serving()

TOOLS = [WEATHER_TOOL, TIME_TOOL]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

# family -> (the call format, how its models write a call of get_weather(city="Paris"), two calls)
WRITES = {
    "qwen3": (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>',
    ),
    "llama3.1": (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"tz": "CET"}}',
    ),
}


class Family(FamilyServing):
    """A family's checkpoint served, and what its models write."""

    def __init__(self, root: Path, family: str) -> None:
        super().__init__(root, family)
        self.format, self.one_call, self.two_calls = WRITES[family]

    def prompt(self, messages: list[dict[str, Any]], lead: str = "", tools: Any = TOOLS) -> tuple[int, ...]:
        return super().prompt(messages, lead, tools)

    def reply(self, text: str) -> list[int]:
        """The tokens of a reply that ends with the checkpoint's end-of-turn token."""
        return [*self.tokens(text), self.codec.eos_token_ids[0]]


@pytest.fixture(scope="module", params=sorted(WRITES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    return Family(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture
def answered(family: Family) -> Iterator[Any]:
    """A server whose engine replies to ASK (with the tools) with one call, and to ASK without tools with text."""
    s = family.serve(
        {
            family.prompt(ASK): family.reply(family.one_call),
            family.prompt(ASK, tools=None): family.reply("It is sunny."),
        }
    )
    yield s
    s.close()


def assert_weather_call(call: Any) -> None:
    from openai.types.chat import ChatCompletionMessageToolCall

    assert isinstance(call, ChatCompletionMessageToolCall) and call.type == "function"
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_the_template_renders_the_tools_and_the_call_comes_back(family: Family, answered: Served) -> None:
    out = answered.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0)
    prompt = answered.engine.added[-1][1]
    assert prompt == family.prompt(ASK) and "get_weather" in family.codec.decode(prompt)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert_weather_call(choice.message.tool_calls[0])


def test_without_tools_the_reply_is_text(family: Family, answered: Served) -> None:
    out = answered.client.chat.completions.create(model=MODEL, messages=ASK, temperature=0)
    assert out.choices[0].message.content == "It is sunny." and out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason == "stop"


def test_a_streamed_call_comes_as_openais_deltas(family: Family, answered: Served) -> None:
    from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCall

    chunks = list(
        answered.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, stream=True)
    )
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert all(isinstance(d, ChoiceDeltaToolCall) and d.index == 0 for d in deltas)
    head, *rest = deltas
    assert head.id.startswith("call_") and head.type == "function" and head.function.name == "get_weather"
    assert head.function.arguments == "" and all(d.id is None and d.function.name is None for d in rest)
    assert json.loads("".join(d.function.arguments for d in rest)) == {"city": "Paris"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    # the client's own accumulator puts the message together
    with answered.client.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS, temperature=0) as stream:
        final = stream.get_final_completion()
    assert_weather_call(final.choices[0].message.tool_calls[0])


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("stream", [False, True])
def test_parallel_calls_or_the_first_only(family: Family, parallel: bool, stream: bool) -> None:
    asked = [{"role": "user", "content": "Weather and time in Paris?"}]
    s = family.serve({family.prompt(asked): family.reply(family.two_calls)})
    try:
        kw: dict[str, Any] = {"model": MODEL, "messages": asked, "tools": TOOLS, "parallel_tool_calls": parallel}
        if stream:
            with s.client.chat.completions.stream(**kw) as events:
                message = events.get_final_completion().choices[0].message
        else:
            message = s.client.chat.completions.create(**kw).choices[0].message
        names = [c.function.name for c in message.tool_calls]
        assert names == (["get_weather", "get_time"] if parallel else ["get_weather"])
        assert len({c.id for c in message.tool_calls}) == len(names)
    finally:
        s.close()


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_choices_make_the_reply_a_call(family: Family, named: bool, stream: bool) -> None:
    """The server writes the start of a call after the prompt (of the named function, or of any), and the model's
    reply continues it under the grammar of the rest of the call (the stand-in follows its script where the grammar
    allows it: greedy). The finish is OpenAI's: "stop" for a named function's call, "tool_calls" for "required"."""
    lead = opener(family.format, "get_weather" if named else None)
    assert family.one_call.startswith(lead)  # the model's reply writes the rest
    s = family.serve({family.prompt(ASK, lead): family.reply(family.one_call.removeprefix(lead))})
    try:
        kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": forced_choice(named), "temperature": 0}
        message, finish = chat_message(s.client, stream, **kw)
        assert finish == ("stop" if named else "tool_calls")
        assert isinstance(s.engine.added[-1][3].grammar, str)  # the call's grammar went with the request
        assert s.engine.added[-1][1] == family.prompt(ASK, lead)
        assert_weather_call(message.tool_calls[0])
    finally:
        s.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_cut_by_max_tokens_is_a_call_with_its_arguments_so_far(family: Family, stream: bool) -> None:
    """``max_tokens`` ending a call of the named function: finish ``"length"`` and the call with the arguments the
    model wrote so far (OpenAI's answer), none of the server's opener as content."""
    lead = opener(family.format, "get_weather")
    rest = family.one_call.removeprefix(lead)
    s = family.serve({family.prompt(ASK, lead): family.reply(rest)})
    try:
        kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": forced_choice(True), "max_tokens": 3}
        kw["temperature"] = 0
        if stream:  # (the client's stream helper refuses to assemble a reply cut at length: read the chunks)
            content, names, arguments, finish = "", [], "", None
            for chunk in s.client.chat.completions.create(**kw, stream=True):
                delta = chunk.choices[0].delta
                content += delta.content or ""
                for call in delta.tool_calls or []:
                    names += [call.function.name] if call.function.name else []
                    arguments += call.function.arguments or ""
                finish = chunk.choices[0].finish_reason or finish
        else:
            message, finish = chat_message(s.client, False, **kw)
            content = message.content or ""
            (call,) = message.tool_calls
            names, arguments = [call.function.name], call.function.arguments
        assert finish == "length" and content == "" and names == ["get_weather"]
        assert 0 < len(arguments) < len(rest) and rest.startswith(arguments)
    finally:
        s.close()


def test_a_forced_calls_stream_opens_with_null_content(family: Family) -> None:
    """OpenAI's first chunk of a reply that is a call: the role and ``"content": null``; a reply that may be text
    opens with ``""``."""
    import httpx

    lead = opener(family.format, "get_weather")
    s = family.serve({family.prompt(ASK, lead): family.reply(family.one_call.removeprefix(lead))})
    try:
        firsts = []
        for choice in (forced_choice(True), "auto"):
            body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": choice, "stream": True}
            with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=WAIT) as r:
                first = next(line for line in r.iter_lines() if line.startswith("data: "))
            firsts.append(json.loads(first.removeprefix("data: "))["choices"][0]["delta"])
        assert firsts == [{"role": "assistant", "content": None}, {"role": "assistant", "content": ""}]
    finally:
        s.close()


def test_tool_choice_none_renders_the_tools_but_reads_no_call(family: Family, answered: Served) -> None:
    out = answered.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none")
    assert answered.engine.added[-1][1] == family.prompt(ASK)  # as vLLM: the tools are still in the prompt
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == family.one_call.strip()


def test_a_conversation_with_calls_and_their_results_renders(family: Family) -> None:
    """The assistant's earlier call (arguments as OpenAI sends them: JSON text) and the tool's result go through
    the template, the arguments as an object (as templates read them)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
    ]
    as_template_reads = [*messages[:1], {**messages[1], "tool_calls": [{**call, "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]}, messages[2]]  # fmt: skip
    prompt = family.prompt(as_template_reads)
    s = family.serve({prompt: family.reply("It is sunny in Paris.")})
    try:
        out = s.client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
        assert s.engine.added[-1][1] == prompt and "sunny" in family.codec.decode(prompt)
        assert out.choices[0].message.content == "It is sunny in Paris." and out.choices[0].finish_reason == "stop"
    finally:
        s.close()


def test_logprobs_come_with_a_streamed_call(family: Family, answered: Served) -> None:
    """Every generated token's logprob arrives once, whether its text became content or a call."""
    chunks = list(
        answered.client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, temperature=0, stream=True, logprobs=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens == len(family.reply(family.one_call))
    raw = b"".join(bytes(e.bytes) for e in entries)
    assert raw.startswith(family.one_call.encode())  # then the end-of-turn token's text
