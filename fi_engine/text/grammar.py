"""Structured output: the OpenAI API's ``response_format`` as a grammar, and the tokens it allows at each step.

``llguidance`` (the ``serve`` extra; imported on first use) compiles a JSON schema into a grammar over the
checkpoint's own tokens. It needs no torch (one abi3 wheel of Rust code), computes a step's token mask in tens of
microseconds, and takes the ``tokenizer.json`` the engine already reads.

- :func:`response_format_grammar`: ``{"type": "text"}`` -> None (no grammar); ``{"type": "json_object"}`` -> any
  JSON object; ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"?}}`` -> that schema. The result
  is the grammar's serialized form (llguidance's grammar JSON text): a plain string that travels in
  :class:`~fi_engine.runtime.sampling_params.SamplingParams` and between processes.
- :class:`GrammarTokenizer`: the tokenizer as llguidance sees it (built once per tokenizer: its token trie), which
  checks a grammar (:meth:`~GrammarTokenizer.check`) and starts a :class:`GrammarMatcher` per request.
- :func:`lark_json` and :meth:`GrammarTokenizer.lark_text`: the parts of a grammar written in Lark (llguidance's
  syntax) around JSON values, such as a tool call's (:mod:`fi_engine.text.tool_grammar`).
- :class:`GrammarMatcher`: one request's place in its grammar: the tokens allowed next
  (:meth:`~GrammarMatcher.allowed_mask`, or the packed :meth:`~GrammarMatcher.bitmask`), :meth:`~GrammarMatcher.consume`
  the chosen one, and :attr:`~GrammarMatcher.is_finished` once only an end-of-sequence token may follow.

Every fault of a format or a schema is a ValueError (TypeError for a value of the wrong kind) naming
``response_format``: the server answers it with a 400.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..values import show
from .args import arg_mapping, arg_text, arg_token_ids
from .optional import require
from .tokenizer import Tokenizer

__all__ = [
    "MAX_WHITESPACE",
    "GrammarMatcher",
    "GrammarTokenizer",
    "lark_json",
    "response_format_grammar",
    "response_format_schema",
]

_FORMAT = "response_format"
_INSTALL = "install it with: python -m pip install llguidance (or the server's extra: python -m pip install '.[serve]')"
# JSON's whitespace between tokens, at most this many characters per gap: room for a newline and an indentation, as
# a model that pretty-prints writes them, but no endless run of blanks (a small model under "any whitespace" can
# fall into one and spend its whole max_tokens there)
MAX_WHITESPACE = 20
_UNUSABLE = f"{_FORMAT}: the schema cannot be used (its grammar does not compile)"
MAX_VOCAB = 1 << 24  # the widest logits a mask is made for (the largest vocabularies have about 260k ids)
_JSON_OPTIONS = {"whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{MAX_WHITESPACE}}}"}


def _llguidance() -> Any:
    return require("llguidance", "response_format (structured output)", _INSTALL)


def _said(message: str, limit: int = 400) -> str:
    """llguidance's error ``message`` as a user may read it: cut at ``limit`` characters, and an internal limit it hit
    (a Rust panic, whose text carries a backtrace of the library's own source) said plainly instead."""
    if message.lstrip().startswith("panic") or "<backtrace>" in message:
        return "the grammar is too large or complex for the grammar compiler (llguidance); simplify it"
    return message[:limit]


def response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema an OpenAI ``response_format`` asks for: None for ``{"type": "text"}``, ``{"type": "object"}``
    for ``json_object``, ``json_schema.schema`` for ``json_schema`` (``name`` and ``strict`` checked, not used: every
    schema is enforced strictly). Checks the format's shape only (no ``llguidance`` needed); a schema llguidance
    cannot compile is found by :meth:`GrammarTokenizer.check`."""
    if not isinstance(response_format, Mapping):
        raise TypeError(f'{_FORMAT}: expected an object such as {{"type": "json_object"}}, got {show(response_format)}')
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ValueError(f'{_FORMAT}.type: expected "text", "json_object" or "json_schema", got {show(kind)}')
    spec = _member(response_format, "json_schema", Mapping, '{"name": ..., "schema": {...}, "strict": true}')
    _member(spec, "json_schema.name", str, "a string", optional=True)
    _member(spec, "json_schema.strict", bool, "true or false", optional=True)
    schema = _member(spec, "json_schema.schema", Mapping, '{"type": "object", "properties": {...}} (a JSON schema)')
    return dict(schema)


def _member(parent: Mapping[str, Any], path: str, kind: type, expected: str, optional: bool = False) -> Any:
    """``parent``'s member named by ``path``'s last part, checked to be a ``kind`` (or absent when ``optional``);
    ValueError naming ``response_format.<path>`` otherwise."""
    value = parent.get(path.rpartition(".")[2])
    if isinstance(value, kind) or (optional and value is None):
        return value
    raise ValueError(
        f"{_FORMAT}.{path}: expected {'an object ' if kind is Mapping else ''}{expected}, got {show(value)}"
    )


def _schema_text(schema: Mapping[str, Any], where: str) -> str:
    """``schema`` as JSON text; ValueError naming ``where`` when it is not JSON."""
    try:
        return json.dumps(schema, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as exc:  # NaN, a non-string key, too deep
        raise ValueError(f"{where}: the schema is not valid JSON ({str(exc)[:200]})") from None


def _schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar (llguidance's serialized form) of a JSON ``schema`` (a mapping), whitespace between tokens at
    most :data:`MAX_WHITESPACE` characters; ValueError naming ``response_format`` when it is not JSON."""
    text = _schema_text(schema, _FORMAT)
    return str(_llguidance().LLMatcher.grammar_from_json_schema(text, overrides=_JSON_OPTIONS))


def lark_json(schema: Mapping[str, Any], where: str = _FORMAT) -> str:
    """A Lark rule's body (llguidance's grammar syntax) that matches a JSON value following ``schema``, whitespace
    bounded as :func:`response_format_grammar`'s: ``%json {...}``, a JSON document of its own (its ``$ref`` s
    resolve inside it). TypeError/ValueError naming ``where`` when the schema is not a JSON object."""
    where = arg_text("where", where)
    if arg_mapping(where, schema, "a JSON schema") is None:
        raise TypeError(f"{where}: expected a JSON schema (a dict with str keys), got None")
    return "%json " + _schema_text({**schema, "x-guidance": _JSON_OPTIONS}, where)


def response_format_grammar(response_format: Any) -> str | None:
    """The grammar of an OpenAI ``response_format`` (its :func:`response_format_schema` compiled),
    or None for ``"text"``."""
    schema = response_format_schema(response_format)
    return None if schema is None else _schema_grammar(schema)


class GrammarTokenizer:
    """A :class:`~fi_engine.text.tokenizer.Tokenizer` as llguidance sees it, with the ids that end a sequence
    (``eos_token_ids``: what a grammar allows once it is complete). Build one per tokenizer and keep it: it indexes
    every token's bytes (milliseconds for a small vocabulary, up to about a second for 150k tokens)."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Sequence[int]) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: expected a fi_engine.text.tokenizer.Tokenizer, got {type(tokenizer).__name__}")
        eos = arg_token_ids("eos_token_ids", eos_token_ids, tokenizer.vocab_size)
        if not eos:
            raise ValueError("eos_token_ids: a grammar needs the ids that end a sequence (the checkpoint's EOS ids)")
        self.vocab_size = tokenizer.vocab_size
        self.eos_token_ids = tuple(eos)
        llg = _llguidance()
        self._llg = llg
        self._tokens = tokenizer
        self._tokenizer = llg.LLTokenizer(
            _as_llguidance_reads(tokenizer.backend_json()), n_vocab=self.vocab_size, eos_token=eos
        )

    def check(self, grammar: str) -> None:
        """ValueError naming ``response_format`` unless ``grammar`` (from :func:`response_format_grammar`)
        compiles for this tokenizer (an unknown type, a malformed keyword, a pattern llguidance cannot read) and
        takes a first token: a grammar can compile and still fail at its first step (a regex such as
        ``a{1000000}`` exceeds llguidance's lexer limits only once a byte is read), so a throwaway matcher
        computes the first mask and consumes the first token it allows."""
        failed, messages = self._llg.LLMatcher.validate_grammar_with_warnings(_text(grammar), self._tokenizer)
        if failed:
            raise ValueError(f"{_UNUSABLE}: {_said('; '.join(messages))}")
        probe = self.matcher(grammar)
        allowed = np.flatnonzero(probe.allowed_mask(self.vocab_size))
        if allowed.size:
            try:
                probe.consume(int(allowed[0]))
            except ValueError as exc:
                raise ValueError(f"{_UNUSABLE} at its first token: {_said(str(exc), 300)}") from None

    def lark_text(self, text: str, markers: Sequence[str] = ()) -> str:
        """``text`` as a Lark expression that matches it: each of ``markers`` in it (a format's marker tokens) that this
        tokenizer holds as an added token of its own as that token (``<[id]>``: a model writes ``<tool_call>`` as
        its one token, whose bytes llguidance marks apart, so a quoted string does not match it), the rest quoted;
        ``""`` for no text."""
        text = arg_text("text", text)
        if isinstance(markers, (str, bytes)) or not isinstance(markers, Sequence):
            raise TypeError(f"markers: expected a sequence of marker texts, got {show(markers)}")
        found = [arg_text(f"markers[{i}]", m) for i, m in enumerate(markers)]
        found = [m for m in sorted(set(found), key=len, reverse=True) if m]
        parts = re.split(f"({'|'.join(map(re.escape, found))})", text) if found else [text]
        pieces, plain = [], ""
        for part in parts:
            token = self._tokens.token_id(part) if part in found else None
            if token is None or not self._tokenizer.is_special_token(token):
                plain += part
                continue
            pieces += [json.dumps(plain), f"<[{token}]>"] if plain else [f"<[{token}]>"]
            plain = ""
        return " ".join([*pieces, json.dumps(plain)] if plain else pieces)

    def matcher(self, grammar: str) -> GrammarMatcher:
        """A request's :class:`GrammarMatcher` at the start of ``grammar`` (ValueError naming ``response_format``
        when it does not compile)."""
        return GrammarMatcher(self, _text(grammar))


def _as_llguidance_reads(tokenizer_json: str) -> str:
    """``tokenizer.json``'s text with a byte-level BPE's decoder said plainly: some converters (transformers' from a
    GGUF file) write a byte-level vocabulary's decoder as a sequence of ``ByteFallback``, ``Fuse``, a ``▁`` replacement
    and ``ByteLevel``. The first three change nothing in such a vocabulary (it has no ``<0x..>`` or ``▁`` tokens), but
    llguidance reads ``ByteFallback`` as a SentencePiece vocabulary and takes each token's characters literally:
    ``Ċ`` (a newline's byte-level form) as the letter, allowed inside a JSON string, where the text has a newline.
    Where the pre-tokenizer is byte-level and the sequence holds a ``ByteLevel`` decoder, that decoder alone is given;
    anything else is given as it is."""
    spec = json.loads(tokenizer_json)
    decoder, pre = spec.get("decoder") or {}, spec.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if decoder.get("type") != "Sequence" or not any(p.get("type") == "ByteLevel" for p in pres if p):
        return tokenizer_json
    byte_level = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
    if not byte_level:
        return tokenizer_json
    spec["decoder"] = byte_level[0]
    return json.dumps(spec)


def _text(grammar: Any) -> str:
    if not isinstance(grammar, str):
        raise TypeError(f"grammar: expected a grammar's text (a str), got {type(grammar).__name__}")
    return grammar


class GrammarMatcher:
    """One request's place in its grammar: which tokens may come next, advanced by each chosen token.

    The engine's calls per step, for a request with a grammar: :meth:`allowed_mask` (or :meth:`bitmask`) before
    choosing its token, then :meth:`consume` of the token chosen. Once :attr:`is_finished`, only the tokenizer's
    end-of-sequence ids are allowed (and consuming one of them ends the grammar)."""

    def __init__(self, tokenizer: GrammarTokenizer, grammar: str) -> None:
        llg = tokenizer._llg
        self._matcher = llg.LLMatcher(tokenizer._tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError(f"{_UNUSABLE}: {_said(self._matcher.get_error())}")
        self._vocab_size = tokenizer.vocab_size
        self.eos_token_ids = tokenizer.eos_token_ids  # what it allows once the grammar is complete
        self._words = (tokenizer.vocab_size + 31) // 32

    def bitmask(self, vocab_size: int) -> np.ndarray:
        """The tokens allowed next as packed bits: int32 ``[ceil(vocab_size / 32)]``, token ``t`` allowed when bit
        ``t % 32`` of word ``t // 32`` is set (llguidance's and FlashInfer's layout). ``vocab_size``: the model's
        logits width, at least the tokenizer's; ids past the tokenizer's (padded embedding rows) are never allowed."""
        if (
            isinstance(vocab_size, bool)
            or not isinstance(vocab_size, int)
            or not self._vocab_size <= vocab_size <= MAX_VOCAB
        ):
            raise ValueError(
                f"vocab_size: expected the model's vocabulary (an int from the tokenizer's {self._vocab_size} to "
                f"{MAX_VOCAB}), got {vocab_size!r:.80}"
            )
        out = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        own = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.int32)[: self._words]
        out[: own.size] = own
        tail = self._vocab_size % 32
        if tail:  # the tokenizer's last word: clear the bits past its vocabulary
            out[self._words - 1] &= np.int32((1 << tail) - 1)
        self._raise_on_error()
        return out

    def allowed_mask(self, vocab_size: int) -> np.ndarray:
        """The tokens allowed next: bool ``[vocab_size]`` (see :meth:`bitmask` for ``vocab_size``)."""
        packed = self.bitmask(vocab_size).view(np.uint8)
        return np.unpackbits(packed, bitorder="little")[:vocab_size].astype(bool)

    def consume(self, token: int) -> None:
        """Advance past ``token`` (the one chosen, from the allowed ones); ValueError naming ``response_format``
        when the grammar does not allow it."""
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < self._vocab_size:
            raise ValueError(f"token: expected a token id in [0, {self._vocab_size}), got {token!r:.80}")
        if not self._matcher.consume_token(int(token)):
            raise ValueError(
                f"{_FORMAT}: token {int(token)} is not allowed here: {_said(self._matcher.get_error(), 300)}"
            )

    @property
    def is_finished(self) -> bool:
        """Whether the output is complete: nothing but an end-of-sequence id may follow (or one was consumed)."""
        return bool(self._matcher.is_stopped())

    @property
    def is_accepting(self) -> bool:
        """Whether the output so far is complete for the grammar (it may still go on, e.g. a number's digits)."""
        return bool(self._matcher.is_accepting())

    def _raise_on_error(self) -> None:
        if self._matcher.is_error():
            raise ValueError(f"{_FORMAT}: the grammar failed: {_said(self._matcher.get_error(), 300)}")
