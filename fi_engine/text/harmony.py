"""OpenAI's harmony format, in which gpt-oss models answer: a reply read as its messages, sorted into the answer,
the reasoning and the tool calls, piece by piece as it streams.

A harmony reply is a run of messages ``<|start|>{header}<|message|>{body}<|end|>``. Its first message continues the
prompt's ``<|start|>assistant`` (so it opens with its header's ``<|channel|>``), and the last ends with one of the
two stop tokens instead of ``<|end|>``: ``<|return|>`` (the answer is done) or ``<|call|>`` (a tool is to be
called). A header names the message's channel (``<|channel|>analysis``, ``commentary`` or ``final``) and, for a
call, its recipient (``to=functions.NAME``, before or after the channel) and the arguments' type (``json`` or
``<|constrain|>json``), e.g. ``<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>``.

:class:`HarmonyReader` takes the reply's text with these markers in it (the text of its tokens, the markers kept:
they are special tokens, which a detokenizer leaves out by default) and sorts each message's body by its header:

- a recipient ``functions.NAME``: a call of the function ``NAME``, its body the arguments (given whole, once the
  message ends);
- any other recipient (harmony's built-in tools, which the model calls from its reasoning) or the ``analysis``
  channel: reasoning, the model's chain of thought (harmony's guide: not to be shown to end users as the answer);
- any other message (``final``, a ``commentary`` preamble to the user, a message without a channel): content.

Content and reasoning are let out as they come, but for a tail that may still become a marker; a message that
follows another of the same kind is joined to it by a newline. The markers themselves are never let out. What is
not in the format is read leniently: a body that another message's ``<|start|>`` or ``<|channel|>`` interrupts
ends there; a header that ends without ``<|message|>`` is dropped, but a reply with no marker at all is content;
text between messages is dropped.
"""

from __future__ import annotations

from typing import NamedTuple

from .args import arg_text

__all__ = ["MARKERS", "HarmonyParts", "HarmonyReader"]

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CONSTRAIN, RETURN, CALL = "<|constrain|>", "<|return|>", "<|call|>"
MARKERS = (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)
"""The special tokens that mark a harmony reply's structure (a detokenizer keeps them for the reader)."""
ENDS = (END, RETURN, CALL)  # the markers that end a message
FUNCTIONS = "functions."  # the namespace of the functions a request offers (the chat template's)


class HarmonyParts(NamedTuple):
    """What a piece of a reply settled: its ``content`` and ``reasoning`` text, and its ``calls`` completed, as
    (function name, arguments as the model wrote them) pairs."""

    content: str
    reasoning: str
    calls: list[tuple[str, str]]


def _route(header: str) -> tuple[str, str]:
    """Where the body of a message with ``header`` goes, and the function it calls: ``("call", NAME)``,
    ``("reasoning", "")`` or ``("content", "")``. The channel is the text after ``<|channel|>`` up to a space or a
    marker; the recipient a ``to=`` word anywhere in the header (as harmony's own parser reads them)."""
    channel = None
    at = header.find(CHANNEL)
    if at != -1:
        rest = header[at + len(CHANNEL) :]
        end = next((i for i, c in enumerate(rest) if c.isspace() or c == "<"), len(rest))
        channel, header = rest[:end], header[:at] + " " + rest[end:]
    words = header.replace(CONSTRAIN, " ").split()
    recipient = next((w.removeprefix("to=") for w in words if w.startswith("to=")), None)
    if recipient is not None and recipient.startswith(FUNCTIONS):
        return "call", recipient.removeprefix(FUNCTIONS)
    if recipient is not None or channel == "analysis":
        return "reasoning", ""
    return "content", ""


def _is_header(text: str) -> bool:
    """Whether ``text`` reads as a message header (it names a channel or a recipient)."""
    return CHANNEL in text or "to=" in text


def _next_marker(text: str) -> tuple[int, str | None]:
    """Where the first marker in ``text`` starts and which it is; ``(i, None)``: none, and ``text[i:]`` (possibly
    empty) is a tail that may still become one."""
    at = text.find("<")
    while at != -1:
        for marker in MARKERS:
            if text.startswith(marker, at):
                return at, marker
        if any(marker.startswith(text[at:]) for marker in MARKERS):
            return at, None
        at = text.find("<", at + 1)
    return len(text), None


class HarmonyReader:
    """Read a harmony reply as it comes (see the module's docstring).

    :meth:`feed` takes the reply's next piece of text (from where the prompt ended: the first message's header
    first) and returns what it settled; :meth:`finish` returns the rest at the end of the reply (a call cut short is
    given with its arguments as far as they go). The pieces' content joined, and their reasoning joined, are the
    reply's answer and reasoning.
    """

    def __init__(self) -> None:
        self._held = ""  # text not read yet (a tail that may become a marker)
        self._state = "header"  # "header", "body" or "between" (after a message's end)
        self._header = ""  # the current message's header so far
        self._route = ""  # the current body's: "content", "reasoning" or "call"
        self._function = ""  # the function the current body calls
        self._arguments = ""  # the current call's body so far
        self._fresh = False  # no text of the current body let out yet
        self._said: set[str] = set()  # the routes with text let out (a later message's text is joined by "\n")
        self._messages = 0  # messages whose body began
        self._out: dict[str, list[str]] = {"content": [], "reasoning": []}
        self._calls: list[tuple[str, str]] = []

    def feed(self, text: str) -> HarmonyParts:
        """The content, reasoning and calls the next piece ``text`` settles."""
        self._held += arg_text("text", text)
        while True:
            at, marker = _next_marker(self._held)
            self._text(self._held[:at])
            if marker is None:
                self._held = self._held[at:]
                break
            self._held = self._held[at + len(marker) :]
            self._marker(marker)
        return self._parts()

    def finish(self) -> HarmonyParts:
        """What is left at the end of the reply: a held tail (text: it can no longer become a marker) and the
        message it ends (a header without a body is dropped, unless the reply had no marker at all)."""
        held, self._held = self._held, ""
        self._text(held)
        self._end()
        return self._parts()

    def _parts(self) -> HarmonyParts:
        content, reasoning = "".join(self._out["content"]), "".join(self._out["reasoning"])
        parts = HarmonyParts(content, reasoning, self._calls)
        self._out = {"content": [], "reasoning": []}
        self._calls = []
        return parts

    def _text(self, text: str) -> None:
        if not text:
            return
        if self._state == "header":
            self._header += text
        elif self._state == "body" and self._route == "call":
            self._arguments += text
        elif self._state == "body":
            if self._fresh and self._route in self._said:
                self._out[self._route].append("\n")
            self._fresh = False
            self._said.add(self._route)
            self._out[self._route].append(text)
        # between messages: dropped (harmony has no text there)

    def _marker(self, marker: str) -> None:
        if self._state == "header":
            if marker == MESSAGE:
                self._begin(self._header)
            elif marker in (CHANNEL, CONSTRAIN):
                self._header += marker  # part of the header (read when it ends)
            elif marker == START:
                self._header = ""  # a header that never got its body: the next one starts over
            else:
                self._end()
            return
        if self._state == "body" and marker in (MESSAGE, CONSTRAIN):
            return  # not text, and meaningless inside a body: dropped
        self._end()  # any other marker ends a body (and is all a message's end means between messages)
        if marker in (START, CHANNEL):  # the next message's header (a <|channel|> one, as the reply's first opens)
            self._state, self._header = "header", ("" if marker == START else CHANNEL)
        elif marker == MESSAGE:  # a body with no header at all: content
            self._begin("")
        else:
            self._state = "between"

    def _begin(self, header: str) -> None:
        self._route, self._function = _route(header)
        self._state, self._header, self._arguments, self._fresh = "body", "", "", True
        self._messages += 1

    def _end(self) -> None:
        """The current message ends: a call is complete; a header without a body is dropped, but for the text of a
        reply with no marker at all (a model that did not answer in harmony), which is content."""
        if self._state == "body" and self._route == "call":
            self._calls.append((self._function, self._arguments))
        elif self._state == "header" and not self._messages and not _is_header(self._header):
            self._state, self._route, self._fresh = "body", "content", True
            self._text(self._header)
        self._state, self._header = "between", ""
