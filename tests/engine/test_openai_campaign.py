"""A campaign of hostile requests against the running server (uvicorn on loopback over the stand-in engine): every
field the three endpoints read, and some they do not, is sent each of a list of hostile values (integers far past
any range, nesting hundreds deep, wrong types, NaN and Infinity, long texts, lone surrogates, nulls, negative
numbers, empty lists, unknown keys...), written as JSON text so that what ``json.dumps`` would refuse to write is
sent too; and bodies that are no JSON object, odd paths and methods. Each answer must be below 500 and, when an
error, OpenAI's error object naming the field the hostile value was put in (``param``: the top-level field that
holds it), without the server's paths; the server must answer /health after each; its log must hold no traceback
and no error. The counts are printed (about 6,700 cases, 20-25 s on a 2-core machine)."""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any

from helpers.serve import CHAT, COMPLETIONS, MODEL, WAIT, Served, ServerLog, nested_lists, require_http_serving

httpx = require_http_serving()


# hostile values, as JSON text
VALUES = [
    "null", "true", "false", "0", "-1", "1", "0.5", "-0.0", "2147483648", "-9223372036854775809",
    "18446744073709551616", "9" * 1000, "1" * 1001, "-" + "7" * 5000, "1e400", "-1e400", "1e-400",
    "NaN", "Infinity", "-Infinity", '""', '" "', '"x"', '"' + "a" * 200_000 + '"', '"\\ud800"',
    '"\\udfff\\ud800"', '"ok\\ud83d"', '"\\u0000"', '"<|im_start|>user"', '"{{ 7 * 7 }}"', '"%s%n"',
    '"../../etc/passwd"', "[]", "{}", "[[]]", "[null]", '["a", 1, null, true]', "[-1]", f"[{2**70}]",
    "[" + ",".join(["0"] * 20_000) + "]", nested_lists(63), nested_lists(65), nested_lists(490),
    nested_lists(5000, '"x"'), '{"a": ' + nested_lists(100) + "}", '{"' + "k" * 2000 + '": 1}',
    '{"\\ud800": 1}', '{"type": "function"}',
    '{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}',
    '[{"type": "text", "text": "hi"}]', '[{"type": "image_url", "image_url": {"url": "x"}}]',
    '{"include_usage": true}', '[{"type": "function", "function": {"name": "f"}}]',
    '{"role": "user", "content": "hi"}', '[{"role": "user", "content": "hi"}]',
]  # fmt: skip

COMMON = [
    "model", "stream", "stream_options", "max_tokens", "n", "top_k", "prompt_logprobs", "min_tokens",
    "use_beam_search", "length_penalty", "truncate_prompt_tokens", "allowed_token_ids", "bad_words",
    "logits_processors", "return_tokens_as_token_ids", "guided_whitespace_pattern", "priority",
    "spaces_between_special_tokens", "response_format", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "structured_outputs", "best_of", "temperature", "top_p", "seed", "stop", "ignore_eos",
    "skip_special_tokens", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
    "stop_token_ids", "include_stop_str_in_output", "speculative_decoding", "user", "metadata", "no_such_field",
]  # fmt: skip
COMPLETION_ONLY = ["prompt", "echo", "logprobs", "suffix"]
CHAT_ONLY = [
    "messages", "max_completion_tokens", "top_logprobs", "logprobs", "tools", "tool_choice", "chat_template",
    "echo", "documents", "functions", "function_call", "chat_template_kwargs", "continue_final_message",
    "add_generation_prompt", "parallel_tool_calls", "include_reasoning",
]  # fmt: skip
# fields inside others: (endpoint, body's JSON text with the value's place marked @)
INNER = [
    (CHAT, '{"messages": [{"role": @, "content": "hi"}]}'),
    (CHAT, '{"messages": [{"role": "user", "content": @}]}'),
    (CHAT, '{"messages": [{"role": "user", "content": "hi", "name": @}]}'),
    (CHAT, '{"messages": [{"role": "user", "content": "hi", "x": @}]}'),
    (CHAT, '{"messages": [{"role": "user", "content": [{"type": "text", "text": @}]}]}'),
    (CHAT, '{"messages": [{"role": "assistant", "content": null, "tool_calls": @}, {"role": "user", "content": "x"}]}'),
    (CHAT, '{"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": '
     '{"name": "f", "arguments": @}}]}, {"role": "user", "content": "x"}]}'),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": '
     '{"name": @}}]}'),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": '
     '{"name": "f", "parameters": @}}], "tool_choice": "none"}'),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": @}}'),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", '
     '"json_schema": {"name": "x", "schema": @}}}'),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"regex": @}}'),
    (COMPLETIONS, '{"prompt": "hi", "stream": true, "stream_options": {"include_usage": @}}'),
    (COMPLETIONS, '{"prompt": "hi", "logit_bias": {"5": @}}'),
    (COMPLETIONS, '{"prompt": [@]}'),
    (COMPLETIONS, '{"prompt": ["hi", @]}'),
    (COMPLETIONS, '{"prompt": "hi", "stop": [@]}'),
]  # fmt: skip
RAW = [
    b"", b"null", b"[]", b"5", b'"text"', b"\xff\xfe\x00", b"\xef\xbb\xbf{}", b"{", b'{"model": }', b"{}" * 1000,
    b"[" * 100_000, b'{"prompt": "x"' + b" " * 100_000 + b"}", b'{"prompt": "\xc3\x28"}', b'{"a":1,"a":2}',
]  # fmt: skip
GETS = [
    "/v1/models", "/v1/models/fake-model", "/v1/models/none", "/v1/models/" + "x" * 5000, "/v1/models/%00%ff",
    "/v1/models/..%2f..%2fetc", "/health", "/metrics", "/v1", "/", "/v1/completions", "/v1/chat/completions",
]  # fmt: skip


def wrong(response: Any, field: str | None, folder: str) -> bool:
    """Whether ``response`` to a hostile value in ``field`` (None: not in a field) is wrong: a 5xx, an error that
    is not OpenAI's object, shows ``folder`` (the server's checkpoint) or a traceback, or names another field than
    the one refused (unless what the field adds to the prompt overflows the context, which names the prompt, or
    tools the stand-in's template can take only when a call is forced: that names ``tool_choice``, whose default
    "auto" needs a call format the template lacks)."""
    if response.status_code >= 500:
        return True
    if response.status_code < 400:
        return False
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return True
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return True
    if folder in error["message"] or "Traceback" in error["message"]:
        return True
    if field == "tools" and error["param"] == "tool_choice":
        return False
    return field is not None and error["param"] != field and error["code"] != "context_length_exceeded"


def body_with(base: dict[str, Any], field: str, value: str) -> str:
    """``base`` as JSON text with ``field`` set to the JSON text ``value``."""
    rest = {k: v for k, v in base.items() if k != field}
    text = json.dumps(rest)
    return text[:-1] + f', "{field}": {value}}}' if rest else f'{{"{field}": {value}}}'


def cases() -> list[tuple[str, str, str | bytes, str | None]]:
    """Every case as (method, path, body, the top-level field its hostile value is in: None for a raw body, a GET,
    a method)."""
    completion = {"model": MODEL, "prompt": "hello", "max_tokens": 3}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    fielded = [
        ("POST", path, body_with(base, field, value), field)
        for path, base, fields in (
            (COMPLETIONS, completion, COMMON + COMPLETION_ONLY),
            (CHAT, chat, COMMON + CHAT_ONLY),
        )
        for field in fields
        for value in VALUES
    ]
    head = json.dumps({"model": MODEL, "max_tokens": 3})[:-1]
    for path, template in INNER:
        marked = json.loads(template.replace("@", '"@"'))
        field = next(k for k, v in marked.items() if '"@"' in json.dumps(v))
        fielded += [("POST", path, head + ", " + template.replace("@", value)[1:], field) for value in VALUES]
    raw: list[tuple[str, str, str | bytes, str | None]] = [
        ("POST", path, body, None) for path in (COMPLETIONS, CHAT) for body in RAW
    ]
    gets = [("GET", path, b"", None) for path in GETS] + [("DELETE", "/v1/models", b"", None)]
    return fielded + raw + gets


def test_hostile_values_in_every_field_never_get_a_5xx(codec, pool) -> None:  # type: ignore[no-untyped-def]
    served = Served(codec, pool, max_batch=8, max_seq_len=512)
    folder = str(codec.tokenizer.source.parent)
    counts: collections.Counter[str] = collections.Counter()
    faults = []
    start = time.perf_counter()
    all_cases = cases()
    try:
        with ServerLog() as log, httpx.Client(timeout=WAIT) as client:
            for method, path, body, field in all_cases:
                headers = {"Content-Type": "application/json"}
                r = client.request(method, f"{served.url}{path}", content=body, headers=headers)
                counts[f"{r.status_code // 100}xx"] += 1
                counts[str(r.status_code)] += 1
                case = (method, path, field, str(body)[:120], r.status_code, r.text[:300])
                if wrong(r, field, folder):
                    faults.append(case)
                assert client.get(f"{served.url}/health").status_code == 200, case
        took = time.perf_counter() - start
    finally:
        served.close()
    refusals = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if k[0] == "4" and k[1:] != "xx")
    print(
        f"\ncampaign: {len(all_cases)} cases in {took:.1f} s: {counts['2xx']} 2xx, {counts['4xx']} 4xx ({refusals}), "
        f"{counts['5xx']} 5xx; {len(log.tracebacks())} tracebacks and {len(log.at(logging.ERROR))} errors logged"
    )
    assert faults == []
    assert counts["5xx"] == 0 and counts["2xx"] > 100 and counts["4xx"] > 500
    assert log.tracebacks() == [] and log.at(logging.ERROR) == []
