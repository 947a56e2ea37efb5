"""The OpenAI API's request bodies checked field by field (:func:`parse_completion`, :func:`parse_chat`) and its
response objects built (:func:`completion_body`, :func:`chat_body`, the streaming chunks), with no HTTP and no
engine: the server (:mod:`fi_engine.serve.openai_server`) stands on it, and its tests read it alone.

A bad field is an :class:`APIError` naming it (``param``) with what was expected, which the server answers with
HTTP 400 and OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``. Fields the server cannot
honour (``suffix``, ...) are refused by name when set to anything but their
neutral value; fields that change nothing here (``user``, ``metadata``, ``store``, ...) and unknown fields are
ignored, as vLLM's server does. See docs/engine-text.md ("Serving") for every choice made where the API is silent.

Log-probabilities take OpenAI's two shapes: the chat's (``choices[i].logprobs.content[j]`` = ``{token, logprob,
bytes, top_logprobs: [{token, logprob, bytes}]}``, :func:`chat_logprobs`) and the legacy completions' (``tokens``,
``token_logprobs``, ``top_logprobs`` as one ``{token: logprob}`` per token, ``text_offset``,
:func:`completion_logprobs`). A logprob below -9999 (or not a number) is given as -9999.0, OpenAI's "very unlikely".
"""

from __future__ import annotations

import json
import math
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..runtime.sampling_params import MAX_LOGPROBS
from ..runtime.stepping import TokenLogprobs
from ..text.grammar import response_format_schema
from ..text.tool_calls import ToolCall
from ..values import show
from .client_json import JSONRefused, read_json

__all__ = ["APIError", "ParsedRequest", "error_body", "parse_body", "parse_chat", "parse_completion"]

MAX_N = 128  # choices per request (each is a request in the engine)
MAX_STOP = 64  # stop strings per request
MAX_STOP_IDS = 1024  # stop_token_ids per request
MAX_TEMPERATURE = 1e4  # as generation_config.json's bound: far past any useful value, finite in float32
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value
MAX_TOKEN_ID_DIGITS = 10  # a token id fits an int32 (the kernels' width): a longer logit_bias key is none
# A grammar's source (a JSON schema as JSON text, a regex, a Lark/GBNF grammar, guided_choice's list as JSON) and
# guided_choice's entries: llguidance's compile time grows faster than linearly with the size (a 95 KiB schema of
# optional properties takes 1.3 s to compile and check on one CPU core, a 190 KiB one 5.8 s), and it refuses a
# choice of more than 2,000 entries (its branching limit) and panics past 65,000 grammar symbols
MAX_GRAMMAR_BYTES = 64 * 1024
MAX_CHOICES = 2000
LOGPROB_FLOOR = -9999.0  # OpenAI's value for a token too unlikely to say (and what -inf is sent as)

Piece = Callable[[int], tuple[str, bytes]]
"""A token id's text and bytes as log-probabilities show it (:meth:`fi_engine.text.tokenizer.Tokenizer.token_piece`)."""


class APIError(Exception):
    """A request the server answers with an error: ``status`` (400 unless said), OpenAI's ``type``, the field
    at fault (``param``, None when none) and a machine-readable ``code``."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = "invalid_value",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code


def unknown_model(model: str, models: Sequence[str]) -> APIError:
    """The 404 of a ``model`` not served here (OpenAI's and vLLM's answer; the openai client's NotFoundError)."""
    served = ", ".join(map(repr, models))
    return APIError(
        f"model: {model!r} is not served here; this server serves {served} (GET /v1/models)",
        "model",
        status=404,
        code="model_not_found",
    )


def error_body(error: APIError) -> dict[str, Any]:
    """OpenAI's error object for ``error``."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


@dataclass
class ParsedRequest:
    """A checked request. ``prompts``: texts or token-id lists (completions; each gets ``n`` choices), or None
    for a chat (``messages`` then). Sampling fields are None where the request leaves them to the defaults.

    ``logprobs``: the top-N count of log-probabilities per generated token (completions' ``logprobs``, the chat's
    ``top_logprobs`` once ``logprobs`` is true: 0 when it is absent), None: none. ``echo`` (completions): the
    prompt's text (and, with ``logprobs``, its log-probabilities) leads each choice; ``max_tokens`` 0 then asks for
    the prompt's alone. ``max_tokens`` None: not sent (the server's default then fits the context: 16 for completions,
    as OpenAI's, and what the context leaves for a chat).

    ``tools`` (chat): the function tools as given; ``tool_choice``: ``"none"``, ``"auto"`` (the default with
    tools), ``"required"`` or ``"named"`` (the function ``tool_name``). ``include_reasoning`` (chat, vLLM's
    extension): a reasoning model's reasoning (a harmony reply's analysis channel) is answered as
    ``reasoning_content``; false drops it.

    ``response_format``: the JSON format the output must follow (``json_object`` or ``json_schema``, its shape
    checked; vLLM's ``guided_json`` and ``structured_outputs.json`` come as a ``json_schema``), None: free text.
    Beside tools that may be called, the reply is either calls or that JSON (a forced call: calls only).
    ``guide``: another grammar the output must follow, as llguidance's ``grammar_from`` takes it (``("regex",
    pattern)``, ``("choice", JSON list of strings)``, ``("grammar", Lark or GBNF text)``: vLLM's ``guided_regex``,
    ``guided_choice``, ``guided_grammar`` and ``structured_outputs``), None: none. ``grammar_field``: the request
    field that asked for the grammar (what its errors name; ``tool_choice`` where it forces a call, whose grammar
    the server builds from the tools).

    ``stop_token_ids`` (vLLM's): token ids that end a choice as its EOS ids do (beside them; with ``ignore_eos``
    alone). ``include_stop_str_in_output``: the stop string that ended a choice ends its text (and a stop token's
    text stays, as special tokens allow). ``continue_final_message`` (chat): the last message is continued, not
    answered (rendered without the generation prompt and cut after its text)."""

    model: str
    stream: bool
    include_usage: bool
    n: int
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list[str]
    ignore_eos: bool
    skip_special_tokens: bool
    prompts: list[str | list[int]] | None = None
    messages: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    add_generation_prompt: bool = True
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    echo: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "none"
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    include_reasoning: bool = True
    response_format: dict[str, Any] | None = None
    guide: tuple[str, str] | None = None
    grammar_field: str = "response_format"
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    continue_final_message: bool = False
    speculative_decoding: bool = True

    def seeds(self) -> list[int]:
        """One seed per choice: the request's ``seed`` + i (each choice samples its own), or fresh random ones;
        modulo 2**64 (a negative seed such as -1 is its two's complement, 2**64 - 1)."""
        base = self.seed if self.seed is not None else secrets.randbelow(2**63)
        return [(base + i) % 2**64 for i in range(self.n)]


def parse_body(raw: bytes) -> Any:
    """A request body's JSON (:func:`~fi_engine.serve.client_json.read_json`: strict, nesting and integers bounded),
    or an :class:`APIError` naming the top-level field that holds what was refused."""
    try:
        return read_json(raw)
    except JSONRefused as exc:
        field = exc.path[0] if exc.path and isinstance(exc.path[0], str) else None
        raise APIError(str(exc), field, code="invalid_value" if field else "invalid_json") from None


def _json_text(text: str, where: str, param: str) -> Any:
    """A JSON text inside a request (a tool call's ``arguments``, a schema given as text) read as the body is;
    an :class:`APIError` naming ``where`` and ``param`` otherwise."""
    try:
        return read_json(text, where)
    except JSONRefused as exc:
        raise APIError(str(exc), param) from None


def _grammar_size(where: str, key: str, text: str) -> None:
    """Refuse a grammar source longer than :data:`MAX_GRAMMAR_BYTES`, naming ``where`` (the field ``key``)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_GRAMMAR_BYTES:
        raise APIError(
            f"{where}: {size} bytes long; a grammar may be at most {MAX_GRAMMAR_BYTES} bytes (as JSON text, for a "
            "schema or a choice list) here; simplify it",
            key,
        )


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(f"{key}: expected true or false, got {show(value)}", key)
    return value


def _int(body: Mapping[str, Any], key: str, lo: int, hi: int, what: str = "") -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # JSON 16.0: an integer written as a float
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(f"{key}: expected an integer{what}, got {show(value)}", key)
    if not lo <= value <= hi:
        raise APIError(f"{key}: expected an integer in [{lo}, {hi}]{what}, got {show(value)}", key)
    return value


def _float(body: Mapping[str, Any], key: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(f"{key}: expected a number, got {show(value)}", key)
    given = value
    if isinstance(value, int) and abs(value) >= 2**1024:  # past any float: float() would raise OverflowError
        value = math.inf if value > 0 else -math.inf
    value = float(value)
    if not math.isfinite(value) or not (lo < value if lo_open else lo <= value) or value > hi:
        bounds = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        what = f"a finite number > {lo}" if hi == math.inf else f"a number in {bounds}"
        raise APIError(f"{key}: expected {what}, got {show(given)}", key)
    return value


def _logit_bias(body: Mapping[str, Any]) -> dict[int, float]:
    """``logit_bias``: an object of token ids (as strings, JSON's keys) to biases in [-100, 100]."""
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise APIError(f"logit_bias: expected an object of token ids to biases, got {show(value)}", "logit_bias")
    out = {}
    for key, bias in value.items():
        token = key.strip() if isinstance(key, str) else ""
        if not token.isdecimal() or len(token) > MAX_TOKEN_ID_DIGITS:
            raise APIError(
                f'logit_bias: keys are token ids (decimal strings such as "50256", at most {MAX_TOKEN_ID_DIGITS} '
                f"digits), got {show(key)}",
                "logit_bias",
            )
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not abs(bias) <= MAX_LOGIT_BIAS:
            raise APIError(f"logit_bias[{key}]: expected a bias in [-100, 100], got {show(bias)}", "logit_bias")
        out[int(token)] = float(bias)
    return out


def _neutral(body: Mapping[str, Any], key: str, neutral: Sequence[Any], what: str, fix: str = "leave it out") -> None:
    """Refuse ``key`` unless absent, null or one of its ``neutral`` values (the engine cannot honour it); the
    message says what to do instead (``fix``)."""
    value = body.get(key)
    if value is None or any(value == v and type(value) is type(v) for v in neutral):
        return
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and any(isinstance(v, (int, float)) and not isinstance(v, bool) and value == v for v in neutral)
    ):
        return
    raise APIError(f"{key}: {what} is not supported by this server; {fix}", key, code="unsupported_value")


def _token_ids(body: Mapping[str, Any], key: str) -> list[int]:
    """``key``: a list of token ids (ints >= 0; the server checks them against the vocabulary)."""
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_STOP_IDS:
        raise APIError(f"{key}: expected a list of at most {MAX_STOP_IDS} token ids, got {show(value)}", key)
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise APIError(f"{key}[{i}]: expected a token id (an integer >= 0), got {show(t)}", key)
    return list(dict.fromkeys(value))


# vLLM's fields this server cannot honour: refused unless at their neutral value (field, neutral values, what it
# is, what to do instead)
_REFUSED: tuple[tuple[str, tuple[Any, ...], str, str], ...] = (
    ("use_beam_search", (False,), "beam search", "leave it out (n choices are sampled independently)"),
    ("length_penalty", (1.0,), "length_penalty (a beam-search control)", "leave it out"),
    ("truncate_prompt_tokens", (), "truncating the prompt", "shorten the prompt before sending it"),
    ("allowed_token_ids", (), "allowed_token_ids", "use guided_choice, guided_regex or logit_bias instead"),
    ("bad_words", ([],), "bad_words", "use logit_bias against their tokens instead"),
    ("logits_processors", ([],), "logits_processors", "leave it out"),
    ("return_tokens_as_token_ids", (False,), "return_tokens_as_token_ids", "leave it out"),
    ("guided_whitespace_pattern", (), "guided_whitespace_pattern (JSON's whitespace is fixed here)", "leave it out"),
    ("priority", (0,), "request priority", "leave it out (requests are served first come, first served)"),
)
# the grammar fields, each alone: OpenAI's, then vLLM's
_GRAMMAR_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
_STRUCTURED = ("json", "regex", "choice", "grammar", "json_object")  # structured_outputs' kinds, one of them
_STRUCTURED_NEUTRAL = {
    "structural_tag": None,
    "whitespace_pattern": None,
    "disable_any_whitespace": False,
    "disable_additional_properties": False,
}


def _guidance(body: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None, tuple[str, str] | None]:
    """The grammar a request asks for, from whichever one field gives it: the field, its JSON format (a
    ``response_format``) or its other grammar (``(llguidance format, text)``); ``("response_format", None, None)``
    for free text."""
    response_format = _response_format(body)
    given = [k for k in (*_GRAMMAR_FIELDS, "structured_outputs") if body.get(k) is not None]
    if response_format is None and "response_format" in given:  # {"type": "text"}
        given.remove("response_format")
    if len(given) > 1:
        raise APIError(
            f"{given[1]}: give one of response_format, guided_json, guided_regex, guided_choice, guided_grammar "
            f"and structured_outputs, not {given[1]} with {given[0]}",
            given[1],
        )
    if not given or given[0] == "response_format":
        return "response_format", response_format, None
    key = given[0]
    if key != "structured_outputs":
        return (key, *_guide(key, key.removeprefix("guided_"), body[key]))
    spec = body[key]
    if not isinstance(spec, Mapping):
        raise APIError(f'structured_outputs: expected an object such as {{"regex": "..."}}, got {show(spec)}', key)
    for member, value in spec.items():
        if member in _STRUCTURED or member in ("disable_fallback", "backend", "_backend"):
            continue
        if member not in _STRUCTURED_NEUTRAL:
            raise APIError(f"structured_outputs.{member}: unknown; expected one of {', '.join(_STRUCTURED)}", key)
        if value is not None and value != _STRUCTURED_NEUTRAL[member]:
            raise APIError(
                f"structured_outputs.{member}: not supported by this server; leave it out",
                key,
                code="unsupported_value",
            )
    kinds = [k for k in _STRUCTURED if spec.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise APIError(f"structured_outputs: expected exactly one of {', '.join(_STRUCTURED)}, got {show(kinds)}", key)
    return (key, *_guide(key, kinds[0], spec[kinds[0]]))


def _guide(key: str, kind: str, value: Any) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """One grammar field's value (``kind``: json, regex, choice, grammar or json_object) as a JSON format or
    another grammar (see :func:`_guidance`)."""
    where = key if key.startswith("guided_") else f"{key}.{kind}"
    if kind == "json_object":
        if value is not True:
            raise APIError(f"{where}: expected true, got {show(value)}", key)
        return {"type": "json_object"}, None
    if kind == "json":
        schema = _json_text(value, where, key) if isinstance(value, str) else value
        if not isinstance(schema, Mapping):
            raise APIError(f"{where}: expected a JSON schema (an object, or its JSON text), got {show(value)}", key)
        _grammar_size(where, key, json.dumps(schema, ensure_ascii=False))
        return {"type": "json_schema", "json_schema": {"name": key, "schema": dict(schema)}}, None
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise APIError(f"{where}: expected a non-empty list of non-empty strings, got {show(value)}", key)
        if len(value) > MAX_CHOICES:
            raise APIError(f"{where}: {len(value)} choices; at most {MAX_CHOICES} are served", key)
        choices = json.dumps(value, ensure_ascii=False)
        _grammar_size(where, key, choices)
        return None, ("choice", choices)
    if not isinstance(value, str) or not value.strip():
        what = "a regular expression" if kind == "regex" else "a grammar (Lark or GBNF text)"
        raise APIError(f"{where}: expected {what}, got {show(value)}", key)
    _grammar_size(where, key, value)
    return None, (kind, value)


def _stop(body: Mapping[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise APIError(f"stop: expected a string or a list of strings, got {show(value)}", "stop")
    if len(items) > MAX_STOP:
        raise APIError(f"stop: expected at most {MAX_STOP} stop strings, got {len(items)}", "stop")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise APIError(f"stop[{i}]: expected a non-empty string, got {show(item)}", "stop")
    return list(items)


def _common(
    body: Mapping[str, Any], models: Sequence[str], max_tokens_keys: Sequence[str], least_tokens: int = 1
) -> dict[str, Any]:
    """The fields completions and chat share, checked (``max_tokens`` from ``least_tokens`` on)."""
    model = body.get("model")
    if model is None:
        model = models[0]  # as vLLM: a request without a model gets the one served
    if not isinstance(model, str):
        raise APIError(f"model: expected a model name (a string), got {show(model)}", "model")
    if model not in models:
        raise unknown_model(model, models)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise APIError("stream_options: only allowed with stream: true", "stream_options")
        if not isinstance(options, Mapping):
            raise APIError(f"stream_options: expected an object, got {show(options)}", "stream_options")
        include_usage = options.get("include_usage") or False
        if not isinstance(include_usage, bool):
            raise APIError(
                f"stream_options.include_usage: expected true or false, got {show(include_usage)}", "stream_options"
            )
    max_tokens = None
    for key in max_tokens_keys:
        value = _int(body, key, least_tokens, 2**31 - 1)
        if value is not None:
            max_tokens = value if max_tokens is None else min(max_tokens, value)
    n = _int(body, "n", 1, MAX_N)
    top_k = _int(body, "top_k", -1, 2**31 - 1, " (-1 or 0: no limit)")
    _neutral(body, "prompt_logprobs", (), "prompt_logprobs (for a prompt's logprobs, use echo with logprobs)")
    min_tokens = _int(body, "min_tokens", 0, 2**31 - 1) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise APIError(f"min_tokens: {min_tokens} exceeds max_tokens {max_tokens}", "min_tokens")
    for key, neutral, what, fix in _REFUSED:
        _neutral(body, key, neutral, what, fix)
    _bool(body, "spaces_between_special_tokens", True)  # a slow tokenizer's option: tokenizer.json decodes alike
    grammar_field, response_format, guide = _guidance(body)
    best_of = _int(body, "best_of", 1, MAX_N)
    if best_of is not None and best_of != (n or 1):
        raise APIError("best_of: only best_of equal to n is supported", "best_of", code="unsupported_value")
    return {
        "model": model,
        "stream": stream,
        "include_usage": include_usage,
        "n": n or 1,
        "max_tokens": max_tokens,
        "temperature": _float(body, "temperature", 0.0, MAX_TEMPERATURE),
        "top_p": _float(body, "top_p", 0.0, 1.0, lo_open=True),
        "top_k": None if top_k is None else max(top_k, 0),
        "seed": _int(body, "seed", -(2**63), 2**64 - 1),  # vLLM's int64 (UIs send -1) and uint64
        "stop": _stop(body),
        "ignore_eos": _bool(body, "ignore_eos", False),
        "skip_special_tokens": _bool(body, "skip_special_tokens", True),
        "min_p": _float(body, "min_p", 0.0, 1.0) or 0.0,
        "presence_penalty": _float(body, "presence_penalty", -2.0, 2.0) or 0.0,
        "frequency_penalty": _float(body, "frequency_penalty", -2.0, 2.0) or 0.0,
        "repetition_penalty": _float(body, "repetition_penalty", 0.0, math.inf, lo_open=True) or 1.0,
        "min_tokens": min_tokens,
        "logit_bias": _logit_bias(body),
        "response_format": response_format,
        "guide": guide,
        "grammar_field": grammar_field,
        "stop_token_ids": _token_ids(body, "stop_token_ids"),
        "include_stop_str_in_output": _bool(body, "include_stop_str_in_output", False),
        "speculative_decoding": _bool(body, "speculative_decoding", True),
    }


def _response_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """``response_format`` with its shape checked (:func:`~fi_engine.text.grammar.response_format_schema`), None
    when absent or text."""
    value = body.get("response_format")
    if value is None:
        return None
    try:
        schema = response_format_schema(value)
    except (ValueError, TypeError) as exc:
        raise APIError(str(exc), "response_format") from None
    if schema is not None:
        _grammar_size("response_format.json_schema.schema", "response_format", json.dumps(schema, ensure_ascii=False))
    return None if schema is None else dict(value)


def parse_completion(body: Any, models: Sequence[str]) -> ParsedRequest:
    """Check a ``/v1/completions`` body against the served ``models``; :class:`APIError` naming the field.

    ``prompt``: a string, a list of strings, a list of token ids, or a list of token-id lists (each prompt gets
    ``n`` choices, indexed prompt by prompt)."""
    body = _object(body)
    common = _common(body, models, ("max_tokens",), least_tokens=0)
    echo = _bool(body, "echo", False)
    if common["max_tokens"] == 0 and not echo:
        raise APIError(
            "max_tokens: 0 generates nothing; it is allowed with echo: true only (the prompt and its logprobs)",
            "max_tokens",
        )
    logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS, " (the top-N count)")
    _neutral(body, "suffix", (), "suffix")
    prompt = body.get("prompt")
    prompts: list[str | list[int]]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt:
        prompts = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                prompts.append(p)
            elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                prompts.append(list(p))
            else:
                raise APIError(
                    f"prompt[{i}]: expected a string or a non-empty list of token ids (integers), got {show(p)}",
                    "prompt",
                )
    else:
        raise APIError(
            f"prompt: expected a string, a list of strings, a list of token ids or a list of token-id lists, "
            f"got {show(prompt)}",
            "prompt",
        )
    if len(prompts) * common["n"] > MAX_N:
        raise APIError(f"prompt: {len(prompts)} prompts x n={common['n']} exceed {MAX_N} choices", "prompt")
    return ParsedRequest(prompts=prompts, logprobs=logprobs, echo=echo, **common)


def _content(value: Any, where: str) -> Any:
    """A message's content: a string, null, or a list of text parts (joined with newlines, as vLLM does)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise APIError(f"{where}: expected a string or a list of content parts, got {show(value)}", "messages")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, Mapping):
            raise APIError(f"{where}[{j}]: expected a content part object, got {show(part)}", "messages")
        if part.get("type") != "text":
            raise APIError(
                f"{where}[{j}].type: only text content parts are supported, got {show(part.get('type'))}",
                "messages",
                code="unsupported_value",
            )
        if not isinstance(part.get("text"), str):
            raise APIError(f"{where}[{j}].text: expected a string, got {show(part.get('text'))}", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


def parse_chat(body: Any, models: Sequence[str]) -> ParsedRequest:
    """Check a ``/v1/chat/completions`` body against the served ``models``; :class:`APIError` naming the field.

    ``messages``: a non-empty list of ``{"role": str, "content": str | [text parts] | null, ...}`` (other keys,
    e.g. ``name``, go to the chat template as they are). ``max_completion_tokens`` is ``max_tokens``'s newer name
    (the smaller wins when both are given). ``chat_template_kwargs`` (vLLM's extension): extra template
    variables such as ``{"enable_thinking": false}``."""
    body = _object(body)
    common = _common(body, models, ("max_tokens", "max_completion_tokens"))
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if not _bool(body, "logprobs", False):
        if top:
            raise APIError("top_logprobs: needs logprobs: true", "top_logprobs")
        top = None
    else:
        top = top or 0
    tools, tool_choice, tool_name = _tools(body)
    if common["guide"] is not None and tool_choice != "none":  # a call's text would break the grammar
        key = common["grammar_field"]
        raise APIError(
            f"{key}: a grammar ({key}) and tools that may be called exclude each other; send "
            'tool_choice: "none", no grammar, or a JSON format as response_format (served beside tools)',
            key,
            code="unsupported_value",
        )
    if tool_choice in ("required", "named"):  # the reply is a call: its grammar is the tools' (a JSON format aside)
        common["grammar_field"] = "tool_choice"
    _neutral(
        body, "chat_template", (), "a chat template of the request's own", "the checkpoint's is used; leave it out"
    )
    _neutral(body, "echo", (False,), "echo in a chat", "leave it out (the completions endpoint echoes the prompt)")
    _neutral(body, "documents", (), "documents", "put them in the messages")
    # OpenAI's deprecated function calling: an answer without the call asked for would be silently wrong
    tools_instead = 'send them as tools: [{"type": "function", "function": {...}}] (and tool_choice)'
    _neutral(body, "functions", (), "the deprecated functions field", tools_instead)
    _neutral(body, "function_call", (), "the deprecated function_call field", "send tool_choice with tools instead")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(f"messages: expected a non-empty list of messages, got {show(messages)}", "messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise APIError(f"messages[{i}]: expected a message object, got {show(message)}", "messages")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise APIError(
                f"messages[{i}].role: expected a role (a string such as 'user'), got {show(role)}", "messages"
            )
        checked.append(
            {
                **message,
                "content": _content(message.get("content"), f"messages[{i}].content"),
                **_message_tool_calls(message, i),
            }
        )
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise APIError(f"chat_template_kwargs: expected an object, got {show(kwargs)}", "chat_template_kwargs")
    reserved = {"messages", "tools", "documents", "add_generation_prompt"} & set(kwargs or {})
    if reserved:
        raise APIError(f"chat_template_kwargs: may not set {sorted(reserved)}", "chat_template_kwargs")
    continue_final = _bool(body, "continue_final_message", False)
    add_generation_prompt = _bool(body, "add_generation_prompt", not continue_final)
    if continue_final and add_generation_prompt:
        raise APIError(
            "continue_final_message: the last message is continued, so no generation prompt may follow it; send "
            "add_generation_prompt: false (or leave it out)",
            "continue_final_message",
        )
    if continue_final and not (isinstance(checked[-1]["content"], str) and checked[-1]["content"].strip()):
        raise APIError(
            "continue_final_message: the last message has no text to continue; give it some content",
            "continue_final_message",
        )
    return ParsedRequest(
        messages=checked,
        template_kwargs=dict(kwargs or {}),
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final,
        logprobs=top,
        tools=tools,
        tool_choice=tool_choice,
        tool_name=tool_name,
        parallel_tool_calls=_bool(body, "parallel_tool_calls", True),
        include_reasoning=_bool(body, "include_reasoning", True),
        **common,
    )


def _tools(body: Mapping[str, Any]) -> tuple[list[dict[str, Any]] | None, str, str | None]:
    """``tools`` (function tools: ``{"type": "function", "function": {"name", "description"?, "parameters"?}}``)
    and ``tool_choice`` (``"none"``, ``"auto"``, ``"required"`` or ``{"type": "function", "function": {"name"}}``
    naming one of them): the tools (None: none), the choice and the named function."""
    value = body.get("tools")
    if value is not None and not isinstance(value, list):
        raise APIError(f"tools: expected a list of tools, got {show(value)}", "tools")
    names = []
    for i, tool in enumerate(value or []):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(function, Mapping):
            raise APIError(
                f'tools[{i}]: expected {{"type": "function", "function": {{...}}}}, got {show(tool)}', "tools"
            )
        name = function.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
            raise APIError(
                f"tools[{i}].function.name: expected a name of letters, digits, _ and - (at most 64), got {show(name)}",
                "tools",
            )
        if not isinstance(function.get("parameters", {}), Mapping):
            raise APIError(f"tools[{i}].function.parameters: expected a JSON schema object", "tools")
        names.append(name)
    choice = body.get("tool_choice")
    if choice is None:
        return (value or None), ("auto" if names else "none"), None
    if choice in ("none", "auto", "required"):
        if choice != "none" and not names:
            raise APIError(f"tool_choice: {choice!r} needs tools", "tool_choice")
        return (value or None), choice, None
    function = choice.get("function") if isinstance(choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(choice, Mapping) or choice.get("type") != "function" or not isinstance(name, str):
        raise APIError(
            f'tool_choice: expected "none", "auto", "required" or {{"type": "function", "function": {{"name": ...}}}}, '
            f"got {show(choice)}",
            "tool_choice",
        )
    if name not in names:
        raise APIError(f"tool_choice: function {name!r} is not one of the tools ({names})", "tool_choice")
    return value, "named", name


def _message_tool_calls(message: Mapping[str, Any], i: int) -> dict[str, Any]:
    """An assistant message's ``tool_calls`` for the template: each call's ``function.arguments`` (JSON text, as
    OpenAI sends it) parsed into an object, as templates read it (as vLLM does); ``{}`` without calls."""
    calls = message.get("tool_calls")
    if calls is None:
        return {}
    if not isinstance(calls, list):
        raise APIError(f"messages[{i}].tool_calls: expected a list of tool calls, got {show(calls)}", "messages")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise APIError(
                f"messages[{i}].tool_calls[{j}]: expected a function call with a name, got {show(call)}", "messages"
            )
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            arguments = _json_text(arguments, f"messages[{i}].tool_calls[{j}].function.arguments", "messages")
        out.append({**call, "function": {**function, "arguments": arguments}})
    return {"tool_calls": out}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's ``usage`` object; with ``prompt_tokens_details.cached_tokens`` (the prompt tokens the engine found
    in its prefix cache) where the engine said how many (``cached_tokens`` not None, 0 included)."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


def _body(rid: str, kind: str, model: str, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    """A whole response object of type ``kind``, created now (seconds since the epoch)."""
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, "usage": usage}


Choice = tuple[str, str | None, dict[str, Any] | None]
"""One choice of a response: its text, finish reason and logprobs object (None: not asked)."""


def completion_body(rid: str, model: str, choices: Sequence[Choice], usage: dict[str, Any]) -> dict[str, Any]:
    """A ``text_completion`` object: ``choices`` as (text, finish reason, logprobs) in index order."""
    listed = [
        {"index": i, "text": text, "logprobs": logprobs, "finish_reason": why}
        for i, (text, why, logprobs) in enumerate(choices)
    ]
    return _body(rid, "text_completion", model, listed, usage)


def chat_body(
    rid: str,
    model: str,
    choices: Sequence[Choice],
    usage: dict[str, Any],
    tool_calls: Sequence[list[dict[str, Any]] | None] | None = None,
    reasoning: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion`` object: ``choices`` as (assistant text, finish reason, logprobs) in index order, each
    one's ``tool_calls`` where it called tools (its content then None when empty) and its ``reasoning_content``
    where ``reasoning`` gives it some."""
    listed = []
    for i, (text, why, logprobs) in enumerate(choices):
        calls = tool_calls[i] if tool_calls is not None else None
        message: dict[str, Any] = {"role": "assistant", "content": (text or None) if calls else text}
        if reasoning is not None and reasoning[i]:
            message["reasoning_content"] = reasoning[i]
        if calls:
            message["tool_calls"] = calls
        listed.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": why})
    return _body(rid, "chat.completion", model, listed, usage)


def tool_call_body(call: ToolCall, arguments: str | None = None) -> dict[str, Any]:
    """OpenAI's object of a function call, with a fresh id (``arguments``: in place of the call's own, e.g. ``""``
    for the first chunk of a streamed call)."""
    function = {"name": call.name, "arguments": call.arguments if arguments is None else arguments}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}


def _logprob(value: float) -> float:
    """A logprob as JSON can carry it: -9999.0 for anything lower (``-inf``) or not a number."""
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[TokenLogprobs], piece: Piece) -> dict[str, Any]:
    """The chat's ``logprobs`` object of generated tokens: ``{"content": [{token, logprob, bytes, top_logprobs}],
    "refusal": None}``, ``top_logprobs`` each entry's top N (``[]`` for 0)."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        text, raw = piece(token)
        return {"token": text, "logprob": _logprob(logprob), "bytes": list(raw)}

    content = [
        {**one(t, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]}
        for t, e in zip(token_ids, entries, strict=True)
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None], piece: Piece, offset: int = 0
) -> tuple[dict[str, Any], int]:
    """The legacy completions' ``logprobs`` object of ``token_ids`` (an echoed prompt's, whose first entry is None,
    then generated ones) and the text offset after them. ``top_logprobs`` holds each entry's top N and the token
    itself (so up to N + 1 keys, as OpenAI's); ``text_offset``: where each token's text starts in the choice's
    text, counting from ``offset`` (a stream's chunks continue where the previous one ended)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for token, entry in zip(token_ids, entries, strict=True):
        text = piece(token)[0]
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if entry is None:  # a prompt's first token: nothing precedes it
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_logprob(entry.logprob))
        top = {piece(i)[0]: _logprob(lp) for i, lp in entry.top}
        top.setdefault(text, _logprob(entry.logprob))
        top_logprobs.append(top)
    shaped = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs}
    return {**shaped, "text_offset": text_offset}, offset


def _chunk(
    rid: str, kind: str, model: str, created: int, choice: dict[str, Any] | None, usage: dict[str, Any] | None
) -> dict[str, Any]:
    """One streamed event of type ``kind`` with ``choice`` (None: the closing usage chunk, with no choice) and,
    where given, ``usage``."""
    out: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model}
    out["choices"] = [] if choice is None else [choice]
    if usage is not None:
        out["usage"] = usage
    return out


COMPLETION_CHUNK = "text_completion"
CHAT_CHUNK = "chat.completion.chunk"


def choice_chunk(
    kind: str,
    rid: str,
    model: str,
    created: int,
    index: int | None,
    content: dict[str, Any],
    finish: str | None,
    usage: dict[str, int] | None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed event of ``kind``: :data:`COMPLETION_CHUNK` (``content`` ``{"text": ...}``) or :data:`CHAT_CHUNK`
    (``{"delta": {...}}``); ``index`` None: the closing usage chunk, with no choice."""
    choice = None if index is None else {"index": index, **content, "logprobs": logprobs, "finish_reason": finish}
    return _chunk(rid, kind, model, created, choice, usage)
