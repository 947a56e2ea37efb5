"""fi_engine.serve.client_json: the server's one reading of a client's JSON, bounded in nesting and digits and
strict about NaN and lone surrogates, each refusal naming the path to the value; what the bounds allow is read as
``json`` reads it, a long prompt of token ids as fast as a bare parse allows."""

from __future__ import annotations

import json
import sys

import pytest

from fi_engine.serve.client_json import MAX_DEPTH, MAX_INT_DIGITS, JSONRefused, place, read_json


def nest(depth: int) -> str:
    return "[" * depth + "]" * depth


REFUSED = [  # (text, path, words)
    ('{"max_tokens": ' + "1" * 5000 + "}", ("max_tokens",), "an integer of 5000 digits"),  # past Python's limit
    ('{"max_tokens": ' + "1" * 2000 + "}", ("max_tokens",), "an integer of 2000 digits"),  # past ours only
    ('{"p": [1, "a", -' + "9" * 1001 + "]}", ("p", 2), "1001 digits"),  # in a list of mixed kinds
    ("-" + "9" * (MAX_INT_DIGITS + 1), (), "at most 1000 are read"),
    ('{"m": [{"x": ' + nest(MAX_DEPTH - 2) + "}]}", ("m", 0, "x") + (0,) * (MAX_DEPTH - 3), "nested more than 64"),
    ('{"t": NaN}', ("t",), "NaN, which is not JSON"),
    ('{"p": [1, 2, -Infinity]}', ("p", 2), "-Infinity"),
    ('{"s": "\\ud800"}', ("s",), "a lone UTF-16 surrogate"),
    ('["ok", "\\udfff"]', (1,), "a lone UTF-16 surrogate"),
    ('{"k\\udc00": 1}', ("k\udc00",), "a lone UTF-16 surrogate in a key"),
    (b'{"s": "\xed\xa0\x80"}', ("s",), "a lone UTF-16 surrogate"),  # an encoded one
    (b"\xff", (), "not UTF-8 text"),
    ("[1, 2", (), "not valid JSON"),
]


@pytest.mark.parametrize(("text", "path", "words"), REFUSED)
def test_a_value_past_a_bound_is_refused_with_its_path(text: str | bytes, path: tuple, words: str) -> None:
    with pytest.raises(JSONRefused) as caught:
        read_json(text, "the body")
    assert caught.value.path == path and words in str(caught.value)
    assert str(caught.value).startswith("the body")
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("limit", [None, 30_000], ids=["recursion-limit-as-is", "recursion-limit-raised"])
def test_nesting_past_the_parsers_own_recursion_is_refused(limit: int | None) -> None:
    """5,000 levels. Where json's C parser gives up on them (a RecursionError: CPython 3.11 at its default recursion
    limit), the refusal names the top-level key and the character where the nesting passed the bound; where it reads
    them whole (a raised limit here; CPython 3.12 on the GPU machine by default), the full path to the first value
    past it. A JSONRefused either way, saying how deep."""
    old = sys.getrecursionlimit()
    if limit is not None:
        sys.setrecursionlimit(limit)
    try:
        with pytest.raises(JSONRefused) as caught:
            read_json('{"a": [' + nest(5000) + "]}", "the body")
    finally:
        sys.setrecursionlimit(old)
    path, text = caught.value.path, str(caught.value)
    assert text.startswith("the body") and "more than 64 deep" in text
    if path == ("a",):
        assert "(at character 69)" in text
    else:
        assert path == ("a",) + (0,) * (MAX_DEPTH - 1) and "(64 levels)" in text, path[:4]
    if limit is not None:
        assert path != ("a",), "with the limit raised the parser reads the whole document"


ALLOWED = [
    "9" * MAX_INT_DIGITS,
    '{"m": [{"x": ' + nest(MAX_DEPTH - 3) + "}]}",
    '{"s": "\\ud83d\\ude00 \\u00e9", "k\\u00e9": [true, false, null, 1.5e300]}',
    '{"s": "' + "1" * 5000 + '"}',  # digits in a text are no integer
    '{"p": [' + ", ".join(str(2**64 - i) for i in range(100)) + "]}",
    "[]",
    "{}",
]


@pytest.mark.parametrize("text", ALLOWED)
def test_what_the_bounds_allow_is_read_as_json_reads_it(text: str) -> None:
    assert read_json(text) == json.loads(text) and read_json(text.encode()) == json.loads(text)


def test_a_program_that_lifted_pythons_digit_limit_gets_the_bound_all_the_same() -> None:
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        with pytest.raises(JSONRefused, match="an integer of 100000 digits"):
            read_json("[" + "7" * 100_000 + "]")
        assert read_json("[12, 34]") == [12, 34]
    finally:
        sys.set_int_max_str_digits(before)


def test_place_names_a_path_as_a_field_reference() -> None:
    assert place(("messages", 0, "content")) == "messages[0].content"
    assert place(("tools", 1, "not an id")) == "tools[1]['not an id']"
    assert place(()) == "the document"
    assert place(("a",) + (0,) * 20) == "a[0][0][0][0][0][0][0]... (21 levels)"
    assert len(place(("x" * 10_000,))) < 100


def test_arguments_of_the_wrong_type_are_refused_by_name() -> None:
    from fi_engine.serve.openai_protocol import APIError, parse_body

    with pytest.raises(TypeError, match="data: expected JSON text"):
        read_json(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="path: expected a tuple"):
        place(["a"])  # type: ignore[arg-type]
    with pytest.raises(APIError) as caught:  # the server's use: a 400 naming the top-level field
        parse_body(b'{"n": ' + b"1" * 2000 + b"}")
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "n", "invalid_value")
    with pytest.raises(APIError) as caught:
        parse_body(b"{")
    assert (caught.value.param, caught.value.code) == (None, "invalid_json")
