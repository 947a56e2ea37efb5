"""Tool calls in a model's output, in the three formats the chat templates of the served families ask for:

- ``"hermes"`` (Qwen 2.5 / Qwen3, Hermes, SmolLM3): each call a JSON object ``{"name": ..., "arguments": {...}}``
  between ``<tool_call>`` and ``</tool_call>``, any number of them, text around them being the reply's content;
- ``"llama3_json"`` (Llama 3.1 / 3.2 / 3.3 with custom tools): the whole reply is the call, a JSON object
  ``{"name": ..., "parameters": {...}}`` (after ``<|python_tag|>`` when the model writes it and the text keeps
  special tokens); several calls separated by ``;``;
- ``"harmony"`` (gpt-oss): each call a message of its own, ``<|channel|>commentary to=functions.NAME
  <|constrain|>json<|message|>{...}<|call|>``, in a reply whose other messages are its reasoning and its answer
  (read by :class:`~fi_engine.text.harmony.HarmonyReader`: the text must keep those special tokens). Its content is
  the answer only; :meth:`~ToolCallParser.take_reasoning` gives the reasoning. A call whose arguments are not a
  JSON object is dropped: it was addressed to a tool, so its text is no content either;
- ``"json"`` (:data:`NEUTRAL`): the format of a model whose template shows none, which the server makes it write
  under a grammar (:mod:`fi_engine.text.tool_grammar`) when a request forces a call, as vLLM does: a named
  function's reply is its arguments object alone; ``tool_choice`` "required"'s a JSON array of calls, each
  ``{"name": ..., "parameters": {...}}``. The whole reply is read when it ends.

:func:`call_format` tells the format from the checkpoint's chat template; :class:`ToolCallParser` reads a reply
piece by piece as it streams (:meth:`~ToolCallParser.feed`, :meth:`~ToolCallParser.finish`): content is let out as
soon as it cannot be the start of a call, and each call once it is complete. A block that does not hold a valid
call (bad JSON, no name) is content, as written. :func:`opener` is the text that starts a call, for a server that
makes the model call a tool (``tool_choice`` "required" or a named function) by writing it after the prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .args import arg_text
from .harmony import CHANNEL, CONSTRAIN, FUNCTIONS, MESSAGE, HarmonyParts, HarmonyReader

__all__ = ["FORMATS", "NEUTRAL", "ToolCall", "ToolCallParser", "call_format", "opener"]

NEUTRAL = "json"  # the format of a forced call where the template shows none
FORMATS = ("hermes", "llama3_json", "harmony", NEUTRAL)
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's ``name`` and its ``arguments`` as JSON text of an object (what OpenAI's
    ``function.arguments`` holds)."""

    name: str
    arguments: str


def call_format(template: str) -> str | None:
    """The tool-call format a chat template (its jinja source) asks the model for, or None when it shows none."""
    template = arg_text("template", template)
    if CHANNEL in template:  # harmony marks every message's channel
        return "harmony"
    if HERMES_OPEN in template:
        return "hermes"
    if PYTHON_TAG in template or '"parameters"' in template:
        return "llama3_json"
    return None


def opener(fmt: str, function: str | None = None) -> str:
    """The text that starts a call in format ``fmt`` (of the function named ``function``, when given): written
    after the prompt, the model's reply continues it. The neutral format's is ``""``: its grammar alone makes the
    reply a call."""
    fmt = _format(fmt)
    if fmt == NEUTRAL:
        return ""
    if fmt == "harmony":  # the header of a call message; named, the whole header (the reply writes the arguments)
        head = f"{CHANNEL}commentary to={FUNCTIONS}"
        return head if function is None else f"{head}{arg_text('function', function)} {CONSTRAIN}json{MESSAGE}"
    key = "arguments" if fmt == "hermes" else "parameters"
    head = (
        ""
        if function is None
        else f"{json.dumps(arg_text('function', function), ensure_ascii=False)}, {json.dumps(key)}: "
    )
    call = '{"name": ' + head
    return f"{HERMES_OPEN}\n{call}" if fmt == "hermes" else call


def _call(value: Any, needs_arguments: bool = False) -> ToolCall | None:
    """A call from a parsed JSON value: an object with a string ``name`` and an object (or, unless
    ``needs_arguments``, absent) ``arguments`` / ``parameters``; None otherwise."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    if needs_arguments and "arguments" not in value and "parameters" not in value:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(value["name"], json.dumps(args, ensure_ascii=False))


def _neutral_calls(text: str, function: str | None) -> list[ToolCall] | None:
    """The calls of a reply in the neutral format: the arguments object of ``function``, or (None) a non-empty JSON
    array of ``{"name", "parameters"}`` objects; None unless it is that."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if function is not None:
        call = _call({"name": function, "arguments": value})
        return None if call is None else [call]
    if not isinstance(value, list) or not value:
        return None
    calls = [call for item in value if (call := _call(item)) is not None]
    return calls if len(calls) == len(value) else None


def _json_calls(text: str) -> list[ToolCall] | None:
    """The calls of a Llama 3 reply: JSON objects separated by ``;`` (and whitespace); None unless all are. Each
    must have its arguments: an object with a name alone is an answer in JSON (a response_format's, say)."""
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    at = 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] == ";"):
            at += 1
        if at == len(text):
            return calls or None
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        call = _call(value, needs_arguments=True)
        if call is None:
            return None
        calls.append(call)


class ToolCallParser:
    """Read a reply in format ``fmt`` as it comes.

    ``prefix``: text the reply continues that the model did not write itself (an :func:`opener` put after the
    prompt), read first and never given back as content. ``function`` (the neutral format only): the named function
    whose arguments object the reply is; None: the reply is an array of calls. :meth:`feed` takes the next piece
    of text and returns the content that is settled and the calls completed; :meth:`finish` returns the rest at
    the end of the reply. The pieces of content joined are the reply with its calls taken out.
    """

    def __init__(self, fmt: str, prefix: str = "", function: str | None = None) -> None:
        self.fmt = _format(fmt)
        prefix = arg_text("prefix", prefix)
        self._function = None if function is None else arg_text("function", function)
        if self._function is not None and self.fmt != NEUTRAL:
            raise ValueError(
                f"function: only the neutral format ({NEUTRAL!r}) takes one; in {fmt!r} the prefix names it"
            )
        if prefix and self.fmt == NEUTRAL:
            raise ValueError(f"prefix: the neutral format's reply has no opener, got {prefix!r:.80}; pass ''")
        self.calls: list[ToolCall] = []  # every call so far
        self._held = ""  # text not settled yet
        self._inside = False  # hermes: within a <tool_call> block; llama3_json: the reply is a call
        self._decided = False  # llama3_json: whether the reply's first character was seen
        self._harmony = HarmonyReader() if self.fmt == "harmony" else None
        self._reasoning: list[str] = []  # harmony: reasoning read and not yet taken
        # the part of a call the prefix wrote (hermes, llama3_json), and the function it names: a call cut short
        # after it is the model's own text, and of a named function its arguments so far (OpenAI's answer at length)
        self._forced_body = ""
        self._forced_name: str | None = None
        if prefix:
            content, _ = self.feed(prefix)
            if content:
                raise ValueError(f"prefix: {prefix!r:.80} does not start a call in the {fmt} format")
            if self._harmony is None and self._inside:
                self._forced_body, self._forced_name = self._held, _named(self._held)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content settled and the calls completed by the next piece ``text``."""
        if self._harmony is not None:
            return self._harmony_parts(self._harmony.feed(text))
        self._held += arg_text("text", text)
        if self.fmt == NEUTRAL:  # all of it is the call: read when it ends
            return "", []
        if self.fmt == "llama3_json":
            return self._feed_json(), []
        content, calls = [], []
        while True:
            if self._inside:
                end = self._held.find(HERMES_CLOSE)
                if end == -1:
                    break
                block, self._held = self._held[:end], self._held[end + len(HERMES_CLOSE) :]
                self._inside = False
                call = self._block(block)
                if call is None:
                    content.append(HERMES_OPEN + block + HERMES_CLOSE)
                else:
                    calls.append(call)
                continue
            start = self._held.find(HERMES_OPEN)
            if start == -1:
                keep = _partial_tail(self._held, HERMES_OPEN)
                content.append(self._held[: len(self._held) - keep])
                self._held = self._held[len(self._held) - keep :]
                break
            content.append(self._held[:start])
            self._held = self._held[start + len(HERMES_OPEN) :]
            self._inside = True
        self.calls += calls
        return self._content("".join(content)), calls

    def finish(self, cut_short: bool = False) -> tuple[str, list[ToolCall]]:
        """The content and calls left at the end of the reply (``cut_short``: it ended at its length limit). A call
        that never ended is content, but for a call the prefix started: cut short, of a named function, a call
        with the arguments written so far (OpenAI's answer when ``max_tokens`` ends a forced call); else the text
        the model wrote after the prefix. Harmony: a call cut short whose arguments parse is a call. The neutral
        format: its calls, else (cut short, of a named function) the call with the arguments so far, else the text
        as content."""
        if self._harmony is not None:
            return self._harmony_parts(self._harmony.finish())
        held, self._held = self._held, ""
        if self.fmt == NEUTRAL:
            calls = _neutral_calls(held, self._function)
            if calls is None and cut_short and self._function is not None:
                calls = [ToolCall(self._function, held)]
            if calls is None:
                return held, []
            self.calls += calls
            return "", calls
        if self.fmt == "llama3_json":
            if not self._inside:
                return held, []
            calls = _json_calls(held.removeprefix(PYTHON_TAG))
            if calls is None:
                return self._unended(held, held, cut_short)
            self.calls += calls
            return "", calls
        if not self._inside:
            return self._content(held), []
        self._inside = False
        call = self._block(held)  # a last call without its closing tag (the reply ended at EOS)
        if call is None:
            return self._unended(held, HERMES_OPEN + held, cut_short)
        self.calls.append(call)
        return "", [call]

    def _unended(self, held: str, as_content: str, cut_short: bool) -> tuple[str, list[ToolCall]]:
        """What :meth:`finish` answers for a call that never ended (or does not parse), ``held`` its text
        (``as_content``: as the reply wrote it)."""
        if not self._forced_body or not held.startswith(self._forced_body):
            return as_content, []
        written = held[len(self._forced_body) :]
        if self._forced_name is None or not cut_short:
            return written, []
        call = ToolCall(self._forced_name, written)
        self.calls.append(call)
        return "", [call]

    def take_reasoning(self) -> str:
        """The reasoning read since the last call (harmony's analysis channel); ``""`` in the formats without one."""
        reasoning, self._reasoning = "".join(self._reasoning), []
        return reasoning

    def _harmony_parts(self, parts: HarmonyParts) -> tuple[str, list[ToolCall]]:
        """A harmony piece's content and calls (each a JSON object's arguments, ``{}`` where the model wrote none);
        its reasoning kept for :meth:`take_reasoning`."""
        self._reasoning.append(parts.reasoning)
        calls = [c for name, args in parts.calls if (c := _call({"name": name, "arguments": args.strip() or "{}"}))]
        self.calls += calls
        return parts.content, calls

    def _content(self, text: str) -> str:
        """Content as given, but none of the blank text between and after calls (their separators)."""
        return "" if self.calls and not text.strip() else text

    def _block(self, block: str) -> ToolCall | None:
        try:
            return _call(json.loads(block))
        except json.JSONDecodeError:
            return None

    def _feed_json(self) -> str:
        """llama3_json: the reply is a call when its first character (past whitespace and the python tag) is
        ``{``; then all of it waits for :meth:`finish`, else it is content at once."""
        if not self._decided:
            head = self._held.lstrip()
            if not head or (PYTHON_TAG.startswith(head) and head != PYTHON_TAG):
                return ""  # nothing to decide on yet
            head = head.removeprefix(PYTHON_TAG).lstrip()
            if not head:
                return ""
            self._decided, self._inside = True, head.startswith("{")
        if self._inside:
            return ""
        held, self._held = self._held, ""
        return held


def _named(body: str) -> str | None:
    """The function a call's opening text ``body`` names (``{"name": "f", "arguments": ``), or None where it
    names none yet (``{"name": ``)."""
    try:
        value = json.loads(body.removeprefix(PYTHON_TAG).strip() + " null}")
    except json.JSONDecodeError:
        return None
    name = value.get("name") if isinstance(value, dict) else None
    return name if isinstance(name, str) and name else None


def _format(fmt: Any) -> str:
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r:.80}")
    return fmt


def _partial_tail(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag`` (held back: it may become the tag)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
