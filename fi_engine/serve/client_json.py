"""JSON as the server reads it from clients: a request's body, and the JSON texts inside one (a tool call's
``arguments``, a ``guided_json`` schema given as text), each read once by :func:`read_json` with bounds that keep
every later step (the field checks, the chat template, the grammar compiler) inside Python's limits:

- at most :data:`MAX_DEPTH` arrays and objects inside one another (the recursive steps after it, such as the chat
  template's, stay far from Python's recursion limit);
- integers of at most :data:`MAX_INT_DIGITS` digits (Python refuses to convert more than 4,300, and converting
  takes time quadratic in the digits);
- strict JSON (RFC 8259): no ``NaN``/``Infinity``, no lone UTF-16 surrogate (``"\\ud800"``, which no UTF-8 text
  can hold: the tokenizer and the response's encoding would refuse it later); bytes that are no text in UTF-8 (or
  UTF-16/32, which ``json`` detects) are refused too.

The reading is one pass of ``json``'s C parser and one over the containers it made (a flat list, such as a prompt's
token ids, checked as a whole at C speed), so that a long body costs little more than parsing it: the server
reads large bodies in a worker thread, and the interpreter lock it holds is the other clients' wait.

A value past a bound is a :class:`JSONRefused` (a ValueError) naming where it is, as a path from the document's
root (``messages[0].content``, :func:`place`), which the server answers with a 400 naming the request's field.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from ..values import show

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "JSONRefused", "place", "read_json"]

# Arrays and objects inside one another: OpenAI's structured outputs allow a schema 10 levels deep (about 25 JSON
# levels once it sits in a request's tools or response_format); 64 leaves room past that, and the recursive steps
# after the reading (the chat template's copy of the messages, jinja's tojson, the grammar compiler) stay hundreds of
# frames below Python's recursion limit.
MAX_DEPTH = 64
# Digits of one integer: a 64-bit id has 20, a 128-bit one 39; 1,000 passes any integer a client means, stays below
# Python's 4,300-digit conversion limit, and converts in microseconds.
MAX_INT_DIGITS = 1000
_INT_BOUND = 10**MAX_INT_DIGITS  # the least integer of more digits
# Python's own limit on the digits of an integer it converts from text (4,300 unless the program changed it): past
# it the parser fails, and the document is parsed again with a hook that says where; a program that lifted the
# limit gets the hook on every integer (converting a million digits takes minutes)
_PYTHON_DIGITS = 4300

Path = tuple[str | int, ...]
"""Where a value is in a document: the keys and indices from its root."""


class JSONRefused(ValueError):
    """A JSON text the server does not read: not JSON, or past a bound. ``path``: where (``()``: the whole text,
    or a place not known)."""

    def __init__(self, message: str, path: Path = ()) -> None:
        super().__init__(message)
        self.path = path


class _Refused:
    """A value refused while parsing (``NaN``, a huge integer), left in its place to be found with its path."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def _integer(text: str) -> int | _Refused:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        return _Refused(f"an integer of {digits} digits; at most {MAX_INT_DIGITS} are read")
    return int(text)


def _constant(name: str) -> _Refused:
    return _Refused(f"{name}, which is not JSON (write a number, or null)")


_SUSPECT = frozenset({int, str, _Refused})  # the kinds of value _fault may refuse
_NUMBERS = frozenset({int, bool})  # values of these kinds alone are checked by their max and min
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')  # a string or a bracket, for finding where a text nests too deep


def place(path: Path, root: str = "") -> str:
    """``path`` as a field reference after ``root``: ``messages[0].content``; keys that are no identifier in
    brackets, long paths cut after their first 8 steps."""
    if not isinstance(path, tuple) or not all(isinstance(step, (str, int)) for step in path):
        raise TypeError(f"path: expected a tuple of keys (str) and indices (int), got {show(path)}")
    out = root
    for step in path[:8]:
        if isinstance(step, int):
            out += f"[{step}]"
        elif step.isidentifier() and len(step) <= 64:
            out += f".{step}" if out else step
        else:
            out += f"[{show(step)}]"
    if len(path) > 8:
        out += f"... ({len(path)} levels)"
    return out or "the document"


def read_json(data: bytes | str, what: str = "the request body") -> Any:
    """The value of the JSON text ``data`` (bytes: UTF-8) within this module's bounds; :class:`JSONRefused` naming
    ``what`` and where otherwise (TypeError for a ``data`` that is no text)."""
    if not isinstance(data, (bytes, str)):
        raise TypeError(f"data: expected JSON text (bytes or str), got {type(data).__name__}")
    limit = sys.get_int_max_str_digits()
    hooked = limit == 0 or limit > _PYTHON_DIGITS
    try:
        try:
            value = _parse(data, hooked)
        except ValueError as exc:
            if type(exc) is not ValueError or hooked:  # not an integer past Python's limit
                raise
            value = _parse(data, hooked=True)  # that integer in its place, to be found with its path
    except UnicodeDecodeError as exc:
        why = f"byte {exc.start}: {exc.reason}"
        raise JSONRefused(f"{what} is not UTF-8 text ({why}); send JSON in UTF-8") from None
    except json.JSONDecodeError as exc:
        raise JSONRefused(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # deeper than the C parser goes (about 1,000 levels): find where it passed the bound
        path, at = _too_deep(data.decode("utf-8", "replace") if isinstance(data, bytes) else data)
        raise JSONRefused(
            f"{what}: {place(path) + ' ' if path else ''}nests arrays and objects more than {MAX_DEPTH} deep "
            f"(at character {at})",
            path,
        ) from None
    if _past_bounds(value):
        path, why = _first_refused(value, 1, ())  # type: ignore[misc]  # _past_bounds found one
        raise JSONRefused(f"{what}: {place(path)} holds {why}", path)
    return value


def _parse(data: bytes | str, hooked: bool) -> Any:
    """``json.loads`` of ``data`` with ``NaN``/``Infinity`` left as refused values, and integers of more than
    :data:`MAX_INT_DIGITS` digits too where ``hooked`` (else Python converts them, within its own limit)."""
    if hooked:
        return json.loads(data, parse_constant=_constant, parse_int=_integer)
    return json.loads(data, parse_constant=_constant)


def _fault(value: Any) -> str | None:
    """What is wrong with ``value`` (a scalar of a parsed document), or None."""
    kind = type(value)
    if kind is _Refused:
        return value.why  # type: ignore[no-any-return]
    if kind is str:
        return "a lone UTF-16 surrogate" if _lone_surrogate(value) else None
    if kind is int and not -_INT_BOUND < value < _INT_BOUND:
        return f"an integer of {len(str(abs(value)))} digits; at most {MAX_INT_DIGITS} are read"
    return None


def _lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (an ASCII text, most of them, is known not to at once)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _flat_fault(items: Any, kinds: set[type]) -> bool:
    """Whether a container's scalar ``items`` (of ``kinds``; containers among them are skipped) hold a value
    :func:`_fault` refuses. Integers alone are checked by their max and min, texts first all at once for ASCII
    (which holds no surrogate), both at C speed."""
    if kinds <= _NUMBERS:
        return bool(items) and (max(items) >= _INT_BOUND or min(items) <= -_INT_BOUND)
    if kinds & _SUSPECT == {str} and "".join(v for v in items if type(v) is str).isascii():
        return False
    return any(_fault(v) is not None for v in items if type(v) in _SUSPECT)


def _past_bounds(value: Any) -> bool:
    """Whether ``value`` (a parsed document) holds a value past a bound: nested too deep, or one that
    :func:`_fault` refuses. One pass over its containers, without paths; :func:`_first_refused` then says where."""
    if type(value) not in (list, dict):
        return _fault(value) is not None
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if type(node) is dict:
            if not "".join(node).isascii() and any(_lone_surrogate(k) for k in node):
                return True
            items = node.values()
        else:
            items = node
        kinds = set(map(type, items))
        if kinds & _SUSPECT and _flat_fault(items, kinds):
            return True
        if list in kinds or dict in kinds:
            if depth >= MAX_DEPTH:
                return True
            stack.extend((v, depth + 1) for v in items if type(v) is list or type(v) is dict)
    return False


def _first_refused(value: Any, depth: int, path: Path) -> tuple[Path, str] | None:
    """The path and the fault of the first value past a bound in ``value`` at ``depth`` (its containers counted
    from the root's 1) and ``path``, or None (recursion bounded by :data:`MAX_DEPTH`)."""
    if type(value) not in (list, dict):
        fault = _fault(value)
        return None if fault is None else (path, fault)
    if depth > MAX_DEPTH:
        return path, f"arrays and objects nested more than {MAX_DEPTH} deep"
    items = value.items() if type(value) is dict else enumerate(value)
    for key, item in items:
        if type(key) is str and _lone_surrogate(key):
            return (*path, key), "a lone UTF-16 surrogate in a key"
        found = _first_refused(item, depth + 1, (*path, key))
        if found is not None:
            return found
    return None


def _too_deep(text: str) -> tuple[Path, int]:
    """Where ``text`` (JSON too deep for the parser) first nests past :data:`MAX_DEPTH`: the top-level key it is
    under, when the document is an object (else ``()``), and the character offset."""
    depth, key, last = 0, None, None
    for token in _TOKENS.finditer(text):
        mark = token.group()
        if mark == "[" or mark == "{":
            if depth == 1:
                key = last
            depth += 1
            if depth > MAX_DEPTH:
                return ((key,) if isinstance(key, str) and text.lstrip().startswith("{") else ()), token.start()
        elif mark == "]" or mark == "}":
            depth -= 1
        elif depth == 1:
            last = json.loads(mark)
    return (), len(text)
