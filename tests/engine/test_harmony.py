"""fi_engine.text.harmony and the "harmony" format of fi_engine.text.tool_calls: gpt-oss replies as harmony's guide
writes them (its examples: reasoning then an answer, reasoning then a call, a preamble before a call) and as a
server meets them (several calls, calls cut short, malformed headers and arguments), read whole, split in two at
every character and fed one character at a time: the same content, reasoning and calls each way, and no marker
(nor the start of one) in any piece let out."""

from __future__ import annotations

import json

import pytest

from fi_engine.text.harmony import MARKERS, HarmonyReader
from fi_engine.text.tool_calls import ToolCall, ToolCallParser, opener

WEATHER = '{"location": "San Francisco"}'
TIME = '{"timezone": "Europe/Paris"}'

# (the reply as the model writes it after the prompt's "<|start|>assistant", content, reasoning, (name, args) calls)
REPLIES = {
    "reasoning then the answer": (
        '<|channel|>analysis<|message|>User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.<|end|>'
        "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>",
        "2 + 2 = 4.",
        'User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.',
        [],
    ),
    "reasoning then a call (the recipient after the channel)": (
        "<|channel|>analysis<|message|>Need to use function get_weather.<|end|><|start|>assistant<|channel|>commentary "
        f"to=functions.get_weather <|constrain|>json<|message|>{WEATHER}<|call|>",
        "",
        "Need to use function get_weather.",
        [("get_weather", WEATHER)],
    ),
    "a call with the recipient before the channel (as the chat template renders one)": (
        f"<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{WEATHER}<|call|>",
        "",
        "",
        [("get_weather", WEATHER)],
    ),
    "a preamble to the user, then a call (<|constrain|> with no space before it)": (
        "<|channel|>analysis<|message|>{long chain of thought}<|end|><|start|>assistant<|channel|>commentary"
        "<|message|>**Action plan**:\n1. Generate an HTML file<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.generate_file<|constrain|>json<|message|>{"template": "basic_html"}<|call|>',
        "**Action plan**:\n1. Generate an HTML file",
        "{long chain of thought}",
        [("generate_file", '{"template": "basic_html"}')],
    ),
    "several calls (a call that is no stop token), reasoning joined by a newline": (
        "<|channel|>analysis<|message|>Two tools.<|end|>"
        f"<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{WEATHER}"
        "<|call|><|start|>assistant<|channel|>analysis<|message|>Now the time.<|end|>"
        f"<|start|>assistant<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{TIME}<|call|>",
        "",
        "Two tools.\nNow the time.",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    "a built-in tool's call is reasoning; text like markers stays content": (
        '<|channel|>analysis to=browser.search<|message|>{"query": "weather"}<|end|>'
        "<|start|>assistant<|channel|>final<|message|>Use <b>, 1 < 2, <|notamarker|> and <|end as text.<|return|>",
        "Use <b>, 1 < 2, <|notamarker|> and <|end as text.",
        '{"query": "weather"}',
        [],
    ),
    "cut short in the answer (max_tokens), ending in what could start a marker": (
        "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>The answer is <|",
        "The answer is <|",
        "Easy.",
        [],
    ),
    "cut short in the reasoning": ("<|channel|>analysis<|message|>Let me think about", "", "Let me think about", []),
    "cut short in a header": ("<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|chan", "", "Hm.", []),
    "a call cut short after its arguments": (
        f"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{WEATHER}",
        "",
        "",
        [("get_weather", WEATHER)],
    ),
    "malformed: a header without a body, a body without a header, text between messages": (
        "<|channel|>analysis<|end|>stray text<|start|>assistant<|message|>No channel: content.<|end|>\n"
        "<|start|>assistant<|channel|>final<|message|>Done.<|return|>",
        "No channel: content.\nDone.",
        "",
        [],
    ),
    "malformed: markers out of place (a body interrupted, messages without <|start|>, markers inside a body)": (
        "<|channel|>analysis<|message|>Think<|channel|>final<|message|>A<|constrain|>json<|start|>assistant"
        "<|channel|>final<|message|>B<|message|>!<|end|><|message|>C<|end|><|channel|>analysis<|message|>D<|return|>",
        "Ajson\nB!\nC",
        "Think\nD",
        [],
    ),
    "a reply not in harmony at all": ("Just plain text, no markers.", "Just plain text, no markers.", "", []),
}


def read(text: str, cuts: list[int]) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Feed ``text`` in pieces cut at ``cuts``: the content pieces, the reasoning pieces and the calls."""
    reader = HarmonyReader()
    content, reasoning, calls = [], [], []
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        parts = reader.feed(text[start:end])
        content.append(parts.content)
        reasoning.append(parts.reasoning)
        calls += parts.calls
    parts = reader.finish()
    return [*content, parts.content], [*reasoning, parts.reasoning], calls + parts.calls


def no_marker_in(pieces: list[str]) -> bool:
    """Whether no piece holds a marker or ends in the start of one (a tail the reader should have held back)."""
    return not any(m in p or any(p.endswith(m[:k]) for k in range(2, len(m))) for p in pieces for m in MARKERS)


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_replies_are_read_the_same_whole_split_anywhere_or_char_by_char(name: str) -> None:
    text, content, reasoning, calls = REPLIES[name]
    ways = [[], *([k] for k in range(1, len(text))), list(range(1, len(text)))]
    for cuts in ways:
        got_content, got_reasoning, got_calls = read(text, cuts)
        assert ("".join(got_content), "".join(got_reasoning), got_calls) == (content, reasoning, calls), cuts
        if cuts and not content.endswith("<|"):  # (that one ends in text that only looked like a marker's start)
            assert no_marker_in(got_content[:-1]) and no_marker_in(got_reasoning[:-1]), cuts


def test_the_answer_streams_as_it_comes() -> None:
    reader = HarmonyReader()
    assert reader.feed("<|channel|>analysis<|message|>Think") == ("", "Think", [])
    assert reader.feed("ing.<|end|><|start|>assistant<|channel|>fi") == ("", "ing.", [])
    assert reader.feed("nal<|message|>Hel") == ("Hel", "", [])
    assert reader.feed("lo <") == ("lo ", "", [])  # "<" may start a marker: held
    assert reader.feed("|ret") == ("", "", [])
    assert reader.feed("urn|>") == ("", "", [])
    assert reader.finish() == ("", "", [])
    call = HarmonyReader()
    assert call.feed(f"<|channel|>commentary to=functions.f <|constrain|>json<|message|>{WEATHER[:9]}").calls == []
    assert call.feed(WEATHER[9:] + "<|call|>") == ("", "", [("f", WEATHER)])  # a call goes out whole


@pytest.mark.parametrize(
    ("reply", "calls"),
    [
        (REPLIES["several calls (a call that is no stop token), reasoning joined by a newline"][0], 2),
        ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"location": <|call|>', 0),
        ("<|channel|>commentary to=functions.get_weather json<|message|>[1, 2]<|call|>", 0),  # not an object
        (f"<|channel|>commentary to=functions. json<|message|>{WEATHER}<|call|>", 0),  # no function name
        ("<|channel|>commentary to=functions.get_location json<|message|><|call|>", 1),  # no arguments: {}
        (f"<|channel|>commentary to=functions.get_weather<|message|>\n{WEATHER}\n<|call|>", 1),  # no type: JSON
    ],
)
def test_the_harmony_format_of_tool_calls(reply: str, calls: int) -> None:
    """ToolCallParser("harmony"): a call's arguments must be a JSON object (none: ``{}``); a call that is not one
    is dropped (addressed to a tool, it is no content either); the reasoning is taken apart."""
    parser = ToolCallParser("harmony")
    content, found = parser.feed(reply)
    rest, late = parser.finish()
    assert content == rest == "" and len(found + late) == len(parser.calls) == calls
    for call in parser.calls:
        assert isinstance(call, ToolCall) and isinstance(json.loads(call.arguments), dict)
    assert parser.take_reasoning() == ("Two tools.\nNow the time." if calls == 2 else "")
    assert parser.take_reasoning() == ""  # taken once


@pytest.mark.parametrize("name", [None, "get_weather"])
def test_a_forced_call_continues_its_opener(name: str | None) -> None:
    """tool_choice "required" (the header up to the function's name) and a named function (the whole header): the
    model's reply writes the rest."""
    start = opener("harmony", name)
    assert start.startswith("<|channel|>commentary to=functions.")
    rest = f"{'' if name else 'get_weather'}{'' if name else ' <|constrain|>json<|message|>'}{WEATHER}<|call|>"
    assert name is None or start.endswith("<|constrain|>json<|message|>")
    parser = ToolCallParser("harmony", start)
    content, calls = parser.feed(rest)
    assert content == "" and calls == [ToolCall("get_weather", json.dumps(json.loads(WEATHER)))]
    with pytest.raises(ValueError, match="^prefix: .* does not start a call in the harmony format"):
        ToolCallParser("harmony", "<|channel|>final<|message|>Hi")


def test_bad_text_is_named() -> None:
    with pytest.raises(TypeError, match="^text: expected a str, got int"):
        HarmonyReader().feed(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^function: expected a str"):
        opener("harmony", 5)  # type: ignore[arg-type]
