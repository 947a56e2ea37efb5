"""The grammar that makes a chat reply a call of the request's tools: ``tool_choice`` "required" or a named function,
and "auto" beside a JSON ``response_format`` (the reply then calls tools or answers in that format). Lark text in
llguidance's syntax, compiled and matched as a response_format's grammar is (:mod:`fi_engine.text.grammar`).

The calls are written in the format the server reads the reply in (:mod:`fi_engine.text.tool_calls`):

- the chat template's own (``hermes``, ``llama3_json``, ``harmony``). A forced call's start is already written
  after the prompt (:func:`~fi_engine.text.tool_calls.opener`); the grammar holds the rest: the function's name
  among the tools' ("required"), its arguments, the call's end (``}\\n</tool_call>``, ``}``; harmony's
  ``<|call|>`` is an end-of-sequence id) and, with ``parallel_tool_calls``, more calls after a separator
  (``\\n``, ``; ``; harmony's call ends the reply, so one). The JSON around the arguments has the one form the
  templates show (``{"name": "f", "arguments": {...}}``); marker tokens (``<tool_call>``, ``<|message|>``) are
  matched as the tokenizer's own tokens;
- ``"json"`` (:data:`~fi_engine.text.tool_calls.NEUTRAL`, a template that shows none), as vLLM's: a named function's
  reply is its arguments object alone; "required"'s a JSON array ``[{"name": "f", "parameters": {...}}, ...]`` of
  one call, or with ``parallel_tool_calls`` of one or more.

A named function gets one call. Each function's arguments follow its ``parameters`` schema (absent: ``{}``; a
schema without a ``type`` is an object's), a JSON document of its own (its ``$ref`` s resolve inside it), with the
whitespace a response_format's JSON may have. Beside a response_format, a Llama 3 JSON reply is one call or the
answer, both JSON objects and so one schema's alternatives (its parts' ``$defs`` moved to its root).

Errors are ValueErrors naming the request field at fault: ``tools[i].function.parameters`` for a schema llguidance
cannot use, ``response_format`` for the response's, ``tool_choice`` for the rest.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..values import arg_flag, show
from .args import arg_mapping
from .grammar import GrammarTokenizer, lark_json
from .harmony import CHANNEL, CONSTRAIN, MESSAGE
from .tool_calls import FORMATS, HERMES_CLOSE, HERMES_OPEN, NEUTRAL, opener

__all__ = ["CACHED", "tool_call_grammar"]

CACHED = 64  # the tool-call grammars kept, built and checked, for the requests that ask for them again

# format -> (the text after a call's arguments, the text between two calls (None: one call a reply), its markers)
_LAYOUTS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "hermes": ("}\n" + HERMES_CLOSE, "\n", (HERMES_OPEN, HERMES_CLOSE)),
    "llama3_json": ("}", "; ", ()),
    "harmony": ("", None, (CHANNEL, CONSTRAIN, MESSAGE)),
    NEUTRAL: ("}", ", ", ()),  # "required": the array's items; a named function's reply is its arguments alone
}
# the arguments of a function without parameters: OpenAI's "empty parameter list"
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def tool_call_grammar(
    grammars: GrammarTokenizer,
    fmt: str,
    tools: Sequence[Mapping[str, Any]],
    *,
    function: str | None = None,
    parallel: bool = True,
    response: Mapping[str, Any] | None = None,
) -> str:
    """The grammar of a reply in format ``fmt`` that calls ``tools`` (OpenAI's ``{"type": "function", "function":
    {"name", "parameters"?}}`` objects, as the server checked them): of the function named ``function``
    (``tool_choice`` a named function), else of any of them ("required"), after the
    :func:`~fi_engine.text.tool_calls.opener` the server wrote; ``parallel``: more than one call may follow (not of
    a named function). ``response`` (``tool_choice`` "auto" beside a JSON ``response_format``: its schema): the
    whole reply instead, either calls (started by the model itself) or a JSON value following ``response``.
    Checked against ``grammars``' tokenizer; the last :data:`CACHED` grammars are kept (an agent sends the same
    tools at every turn, and checking a grammar of 20 tools takes tens of milliseconds)."""
    if not isinstance(grammars, GrammarTokenizer):
        raise TypeError(f"grammars: expected a fi_engine.text.grammar.GrammarTokenizer, got {type(grammars).__name__}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {show(fmt)}")
    parallel = arg_flag("parallel", parallel)
    arg_mapping("response", response, "a JSON schema")
    if function is not None and not isinstance(function, str):
        raise TypeError(f"function: expected a function's name (a str) or None, got {show(function)}")
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TypeError(f"tools: expected a list of function tools, got {show(tools)}")
    for i, tool in enumerate(tools):
        spec = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise ValueError(
                f'tools[{i}]: expected {{"type": "function", "function": {{"name": ...}}}}, got {show(tool)}'
            )
    try:  # the arguments as JSON text, in their order (a schema's properties are written in theirs)
        key = json.dumps([list(tools), response], allow_nan=False)
    except (TypeError, ValueError, RecursionError):  # not JSON: built (and refused) uncached
        return _grammar(grammars, fmt, tools, function, parallel, response)
    return _cached(grammars, fmt, key, function, parallel)


@functools.lru_cache(maxsize=CACHED)
def _cached(grammars: GrammarTokenizer, fmt: str, key: str, function: str | None, parallel: bool) -> str:
    """:func:`_grammar` of the tools and response in ``key`` (their JSON text), kept (a refusal is not)."""
    tools, response = json.loads(key)
    return _grammar(grammars, fmt, tools, function, parallel, response)


def _grammar(
    grammars: GrammarTokenizer,
    fmt: str,
    tools: Sequence[Mapping[str, Any]],
    function: str | None,
    parallel: bool,
    response: Mapping[str, Any] | None,
) -> str:
    """:func:`tool_call_grammar`'s grammar, built and checked."""
    names = [tool["function"]["name"] for tool in tools]
    if response is not None and (function is not None or fmt == NEUTRAL):
        raise ValueError('tool_choice: a response_format beside tools is served with "auto", in a call format')
    if function is not None and function not in names:
        raise ValueError(f"tool_choice: function {show(function)} is not one of the tools ({names})")
    tail, separator, markers = _LAYOUTS[fmt]
    called = range(len(tools)) if function is None else [names.index(function)]

    def text(piece: str) -> str:
        return grammars.lark_text(piece, markers)

    def call(lead: str) -> str:
        """One call's alternatives (one per function called), from where ``lead`` (what every one starts with, the
        opener written after the prompt) left it."""
        ways = (filter(None, (text(_head(fmt, names[i])[len(lead) :]), f"args_{i}", text(tail))) for i in called)
        return " | ".join(" ".join(way) for way in ways)

    more = f" ({text(separator)} call)*" if parallel and separator is not None and function is None else ""
    args = [f"args_{i}: {_arguments(tools[i], i)}" for i in called]
    if fmt == NEUTRAL and function is not None:
        start, rules = f"args_{called[0]}", args
    elif fmt == NEUTRAL:
        start, rules = f'"[" call{more} "]"', [*args, f"call: {call('')}"]
    elif response is not None and fmt == "llama3_json":
        # a call and the answer both open a JSON object, which llguidance's lexer cannot hold two ways at once: one
        # schema whose alternatives they are (so one call, no more)
        start, rules = "value", [f"value: {lark_json(_call_or(response, tools, called))}"]
    elif response is not None:
        start, rules = f"call{more} | response", [*args, f"call: {call('')}", f"response: {lark_json(response)}"]
    else:
        start = f"first{more}"
        rules = [*args, f"first: {call(opener(fmt, function))}", *([f"call: {call('')}"] if more else [])]
    grammar = "\n".join([f"start: {start}", *rules])
    _check(grammars, grammar, tools, called, response)
    return grammar


def _head(fmt: str, name: str) -> str:
    """The text of a call of ``name`` before its arguments: its :func:`~fi_engine.text.tool_calls.opener` (the
    neutral format's: an array item's)."""
    return f'{{"name": {json.dumps(name, ensure_ascii=False)}, "parameters": ' if fmt == NEUTRAL else opener(fmt, name)


def _parameters(tool: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Tool ``i``'s arguments schema: its ``parameters``, an object's where they name no type (none: ``{}``)."""
    parameters = tool["function"].get("parameters")
    if parameters is None:
        return dict(_NO_PARAMETERS)
    if not isinstance(parameters, Mapping):
        raise ValueError(f"tools[{i}].function.parameters: expected a JSON schema object, got {show(parameters)}")
    return dict(parameters) if "type" in parameters else {"type": "object", **parameters}


def _arguments(tool: Mapping[str, Any], i: int) -> str:
    """The Lark rule body of tool ``i``'s arguments (a JSON document of its own)."""
    return lark_json(_parameters(tool, i), f"tools[{i}].function.parameters")


_DEFINITIONS = ("$defs", "definitions")  # where a schema's ``$ref`` s point (``#/$defs/X``)


def _call_or(response: Mapping[str, Any], tools: Sequence[Mapping[str, Any]], called: Sequence[int]) -> dict[str, Any]:
    """One schema of a Llama 3 JSON call (``{"name": <one of the tools>, "parameters": {...}}``) or the response:
    every part's definitions moved to its root, where their ``$ref`` s point (ValueError naming the part whose
    definition of a name differs from another's)."""
    root: dict[str, dict[str, Any]] = {key: {} for key in _DEFINITIONS}

    def hoisted(schema: Mapping[str, Any], where: str) -> dict[str, Any]:
        schema = dict(schema)
        for key in _DEFINITIONS:
            for name, definition in (schema.pop(key, None) or {}).items():
                if root[key].setdefault(name, definition) != definition:
                    raise ValueError(f"{where}: its {key} {name!r} differs from another schema's of the same name")
        return schema

    ways = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tools[i]["function"]["name"]},
                "parameters": hoisted(_parameters(tools[i], i), f"tools[{i}].function.parameters"),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for i in called
    ]
    return {"anyOf": [*ways, hoisted(response, "response_format")], **{k: v for k, v in root.items() if v}}


def _check(
    grammars: GrammarTokenizer,
    grammar: str,
    tools: Sequence[Mapping[str, Any]],
    called: Sequence[int],
    response: Mapping[str, Any] | None,
) -> None:
    """:meth:`GrammarTokenizer.check` of each schema alone (each function's arguments, then the response's: a
    schema can fail at its own first token, which the whole grammar reaches later), naming the one at fault, then
    of ``grammar``, naming ``tool_choice``."""
    parts = [(f"tools[{i}].function.parameters", _arguments(tools[i], i)) for i in called]
    if response is not None:
        parts.append(("response_format", lark_json(response)))
    for where, body in [*parts, ("tool_choice", "")]:
        try:
            grammars.check(f"start: value\nvalue: {body}" if body else grammar)
        except ValueError as exc:
            raise ValueError(f"{where}: {_reason(exc)}") from None


def _reason(exc: ValueError) -> str:
    """A grammar's fault as :meth:`GrammarTokenizer.check` said it, without its ``response_format:`` head."""
    return str(exc).removeprefix("response_format: ")
