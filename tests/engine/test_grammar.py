"""fi_engine.text.grammar on CPU: the OpenAI ``response_format`` compiled by llguidance over a real (trained
byte-level BPE) tokenizer, the tokens it allows step by step, and its errors. Outputs driven by the tests'
stand-in logits (tests/helpers/fake_engine.py), greedy over the allowed tokens, must parse as JSON and validate
against their schema (``jsonschema`` when installed, else the keys and types checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from helpers.fake_engine import greedy_under_grammar
from helpers.json_schemas import PERSON, check_person, json_schema

from fi_engine.text.grammar import (
    MAX_WHITESPACE,
    GrammarTokenizer,
    response_format_grammar,
    response_format_schema,
)

pytest.importorskip("tokenizers")
pytest.importorskip("llguidance")


@pytest.fixture(scope="module")
def grammars(codec: Any) -> GrammarTokenizer:
    return GrammarTokenizer(codec.tokenizer, codec.eos_token_ids)


def texts(codec: Any, mask: np.ndarray) -> list[str]:
    return [codec.tokenizer.decode([int(i)], skip_special_tokens=False) for i in np.flatnonzero(mask)]


def test_json_object_starts_with_a_brace_and_ends_with_eos_only(codec: Any, grammars: GrammarTokenizer) -> None:
    vocab = codec.tokenizer.vocab_size
    matcher = grammars.matcher(response_format_grammar({"type": "json_object"}))
    first = matcher.allowed_mask(vocab)
    assert first.dtype == bool and first.shape == (vocab,)
    assert first.any() and all(t.startswith("{") for t in texts(codec, first))  # no text, no leading blank
    assert not matcher.is_finished
    for token in codec.encode('{"a": [1, "x"]}'):
        assert matcher.allowed_mask(vocab)[token]
        matcher.consume(token)
    done = matcher.allowed_mask(vocab)
    assert matcher.is_finished and matcher.is_accepting
    assert sorted(np.flatnonzero(done)) == sorted(codec.eos_token_ids)  # the checkpoint's EOS ids, nothing else
    matcher.consume(codec.eos_token_ids[0])
    assert matcher.is_finished


def test_a_token_the_grammar_forbids_is_refused_naming_response_format(codec: Any, grammars: GrammarTokenizer) -> None:
    matcher = grammars.matcher(response_format_grammar({"type": "json_object"}))
    (token,) = codec.encode("x")
    assert not matcher.allowed_mask(codec.tokenizer.vocab_size)[token]
    with pytest.raises(ValueError, match=r"^response_format: token \d+ is not allowed here"):
        matcher.consume(token)
    with pytest.raises(ValueError, match=r"^token: expected a token id in \[0, "):
        matcher.consume(codec.tokenizer.vocab_size)


def test_a_grammar_that_compiles_but_fails_at_its_first_token_is_refused(grammars: GrammarTokenizer) -> None:
    """``a{1000000}`` passes llguidance's validation, then exceeds its lexer's limits at the first byte read: the
    check takes a first token, so the request is refused before it reaches an engine."""
    import llguidance

    with pytest.raises(ValueError, match="^response_format: the schema cannot be used .*at its first token"):
        grammars.check(str(llguidance.grammar_from("regex", "a{1000000}")))
    grammars.check(str(llguidance.grammar_from("regex", "a{3}")))  # a bounded repeat the lexer takes


def test_a_grammar_past_llguidances_internal_limits_is_refused_without_its_panic(grammars: GrammarTokenizer) -> None:
    """Past 65,000 grammar symbols llguidance panics: its message carries the Rust assertion and a backtrace, which
    a client must not get; the refusal says the grammar is too large instead."""
    from fi_engine.text.grammar import _llguidance

    rules = 70_000
    lark = "start: " + " | ".join(f"r{i}" for i in range(rules)) + "\n" + "\n".join(f'r{i}: "x"' for i in range(rules))
    with pytest.raises(ValueError, match="response_format: .*too large or complex") as caught:
        grammars.check(str(_llguidance().grammar_from("lark", lark)))
    assert "panic" not in str(caught.value) and "backtrace" not in str(caught.value)


def test_padded_vocabulary_rows_are_never_allowed(codec: Any, grammars: GrammarTokenizer) -> None:
    """A model's logits may be wider than its tokenizer (embedding rows padded to a multiple of 64): those ids are
    never allowed, and the packed mask has one bit per id of the model's width."""
    vocab = codec.tokenizer.vocab_size
    matcher = grammars.matcher(response_format_grammar({"type": "json_object"}))
    for token in codec.encode('{"a": 1}'):
        matcher.consume(token)
    wide = matcher.allowed_mask(vocab + 70)
    assert wide.shape == (vocab + 70,) and not wide[vocab:].any()
    assert np.array_equal(wide[:vocab], matcher.allowed_mask(vocab))
    packed = matcher.bitmask(vocab + 70)
    assert packed.dtype == np.int32 and packed.shape == ((vocab + 70 + 31) // 32,)
    bits = np.unpackbits(packed.view(np.uint8), bitorder="little")
    assert np.array_equal(bits[: vocab + 70].astype(bool), wide) and not bits[vocab:].any()
    with pytest.raises(ValueError, match=r"^vocab_size: expected the model's vocabulary \(an int from the tokenizer's"):
        matcher.allowed_mask(vocab - 1)


@pytest.mark.parametrize("key", range(12))
def test_a_json_schema_is_followed_by_any_model(codec: Any, grammars: GrammarTokenizer, key: int) -> None:
    """Twelve pseudo-random models (one per key), greedy over the allowed tokens: each output parses and validates,
    keys and types as required."""
    text = greedy_under_grammar(
        codec, grammars, response_format_grammar(json_schema(PERSON)), key, codec.tokenizer.vocab_size + 6
    )
    check_person(json.loads(text))


def test_whitespace_between_tokens_is_bounded(codec: Any, grammars: GrammarTokenizer) -> None:
    """A model that favours blanks still gets on: at most MAX_WHITESPACE of them in a row."""
    matcher = grammars.matcher(response_format_grammar({"type": "json_object"}))
    (brace,) = codec.encode("{")
    (blank,) = codec.encode(" ")
    matcher.consume(brace)
    for _ in range(MAX_WHITESPACE):
        assert matcher.allowed_mask(codec.tokenizer.vocab_size)[blank]
        matcher.consume(blank)
    assert not matcher.allowed_mask(codec.tokenizer.vocab_size)[blank]


def test_text_is_no_grammar_and_the_schemas_are_what_the_api_means() -> None:
    assert response_format_grammar({"type": "text"}) is None and response_format_schema({"type": "text"}) is None
    assert response_format_schema({"type": "json_object"}) == {"type": "object"}
    assert response_format_schema(json_schema(PERSON)) == PERSON
    assert response_format_schema({"type": "json_schema", "json_schema": {"schema": PERSON}}) == PERSON  # name optional
    grammar = response_format_grammar(json_schema(PERSON))
    assert (
        isinstance(grammar, str) and json.loads(grammar)["grammars"][0]["json_schema"]["required"] == PERSON["required"]
    )


BAD_FORMATS = [
    ({"type": "json"}, ValueError, r'^response_format\.type: expected "text", "json_object" or "json_schema", got'),
    ({}, ValueError, r"^response_format\.type: expected"),
    ({"type": "json_schema"}, ValueError, r"^response_format\.json_schema: expected an object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, ValueError, r"^response_format\.json_schema\.schema:"),
    (json_schema([1]), ValueError, r"^response_format\.json_schema\.schema: expected an object"),  # type: ignore[arg-type]
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, ValueError, r"\.strict: expected true"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "name": 5}}, ValueError, r"\.name: expected a string"),
    ("json_object", TypeError, r'^response_format: expected an object such as \{"type": "json_object"\}'),
    (
        json_schema({"type": "number", "minimum": float("nan")}),
        ValueError,
        r"^response_format: the schema is not valid JSON",
    ),
]


@pytest.mark.parametrize(("value", "kind", "message"), BAD_FORMATS)
def test_a_malformed_response_format_is_refused_by_name(value: Any, kind: type, message: str) -> None:
    with pytest.raises(kind, match=message):
        response_format_grammar(value)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "objectx"},
        {"type": "string", "pattern": "(unclosed"},
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    ],
)
def test_a_schema_llguidance_cannot_compile_is_a_value_error_naming_response_format(
    grammars: GrammarTokenizer, schema: dict[str, Any]
) -> None:
    grammar = response_format_grammar(json_schema(schema))
    assert grammar is not None
    with pytest.raises(
        ValueError, match=r"^response_format: the schema cannot be used \(its grammar does not compile\): "
    ):
        grammars.check(grammar)
    with pytest.raises(
        ValueError, match=r"^response_format: the schema cannot be used \(its grammar does not compile\): "
    ):
        grammars.matcher(grammar)


def test_the_grammar_tokenizer_checks_its_arguments(codec: Any) -> None:
    with pytest.raises(TypeError, match=r"^tokenizer: expected a fi_engine\.text\.tokenizer\.Tokenizer, got str"):
        GrammarTokenizer("gpt2", [0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^eos_token_ids: a grammar needs the ids that end a sequence"):
        GrammarTokenizer(codec.tokenizer, [])
    with pytest.raises(ValueError, match=r"^eos_token_ids\[0\]: token id \d+ is outside the vocabulary"):
        GrammarTokenizer(codec.tokenizer, [codec.tokenizer.vocab_size])
    with pytest.raises(TypeError, match=r"^grammar: expected a grammar's text \(a str\), got dict"):
        GrammarTokenizer(codec.tokenizer, [0]).matcher({"type": "object"})  # type: ignore[arg-type]


def test_without_llguidance_the_error_names_the_package_and_the_install_command() -> None:
    """In a fresh interpreter whose ``llguidance`` import fails: importing the module and reading a format's shape
    work; compiling one is a ModuleNotFoundError naming the package, what needs it and the pip command."""
    code = (
        "import sys; sys.modules['llguidance'] = None\n"
        "from fi_engine.text.grammar import response_format_grammar, response_format_schema\n"
        "assert response_format_schema({'type': 'json_object'}) == {'type': 'object'}\n"
        "try:\n"
        "    response_format_grammar({'type': 'json_object'})\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    message = out.stdout.strip()
    assert message.startswith("response_format (structured output) needs the 'llguidance' package, which is not")
    assert "python -m pip install llguidance" in message and "'.[serve]'" in message


def test_a_byte_level_vocabulary_behind_a_sequence_decoder_is_read_as_bytes(codec: Any, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A byte-level BPE whose ``tokenizer.json`` gives its decoder as ``ByteFallback``, ``Fuse``, a ``▁`` replacement
    and ``ByteLevel`` (as transformers writes one converted from a GGUF file) is matched on its tokens' bytes: a token
    holding a newline (``Ċ`` in the vocabulary) is no character a JSON string may hold, where llguidance given the
    sequence took ``Ċ`` for a letter."""
    from fi_engine.text.tokenizer import Tokenizer

    spec = json.loads(codec.tokenizer.backend_json())
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        ],
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = Tokenizer.from_dir(tmp_path)
    newline = [t for t in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([t], skip_special_tokens=False)]
    assert newline  # (the test vocabulary has such tokens)
    grammars = GrammarTokenizer(tokenizer, codec.eos_token_ids)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    matcher = grammars.matcher(response_format_grammar(json_schema(schema)))
    for t in tokenizer.encode('{"a": "x', add_special_tokens=False):
        matcher.consume(t)
    allowed = matcher.allowed_mask(tokenizer.vocab_size)
    assert not allowed[newline].any() and allowed.any()
