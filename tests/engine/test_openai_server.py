"""The OpenAI-compatible server (fi_engine.serve.openai_server) on loopback, over the stand-in engine
(helpers.fake_engine) and a real tokenizer: the official ``openai`` client on every endpoint, streamed and not;
bad requests answered 400 naming the field; a full queue 429; a client that hangs up cancels its request in
the engine; 200 concurrent clients each get exactly their tokens; /metrics parses as Prometheus text; /health;
graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import pytest
from helpers.fake_engine import expected_tokens
from helpers.serve import MODEL, WAIT, Served, require_server_stack
from helpers.text_checkpoints import write_text_checkpoint

openai = require_server_stack()
httpx = pytest.importorskip("httpx")


def post(url: str, path: str, body: Any, **kw: Any) -> Any:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json"}, timeout=WAIT, **kw)


def wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# ---- every endpoint through the official client ----------------------------------------------------------------


def test_models_lists_the_served_name(served: Served) -> None:
    models = served.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    listed = httpx.get(f"{served.url}/v1/models", timeout=WAIT).json()["data"][0]
    assert listed["max_model_len"] == 4096 and "quantization" not in listed  # 16-bit weights: nothing to report


def test_models_reports_quantized_weights(codec, pool) -> None:  # type: ignore[no-untyped-def]
    from fi_engine.serve.openai_server import build_app
    from fi_engine.serve.service import GenerationService

    server = Served(codec, pool, max_batch=8, quantization="awq")
    try:
        listed = httpx.get(f"{server.url}/v1/models", timeout=WAIT).json()["data"]
        assert [(m["id"], m["quantization"]) for m in listed] == [(MODEL, "awq")]
    finally:
        server.close()
    with GenerationService(server.engine, codec) as service, pytest.raises(TypeError, match="quantization: expected"):
        build_app(service, MODEL, quantization=4)  # type: ignore[arg-type]


def test_completion_text_and_usage(served: Served, codec, pool) -> None:  # type: ignore[no-untyped-def]
    out = served.client.completions.create(model=MODEL, temperature=0, prompt="Hello there", max_tokens=9)
    prompt = codec.encode("Hello there")
    assert out.choices[0].text == codec.decode(expected_tokens(prompt, 9, pool))
    assert out.choices[0].finish_reason == "length" and out.object == "text_completion" and out.model == MODEL
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(prompt),
        9,
        len(prompt) + 9,
    )
    assert served.engine.added[-1][2] == 9


def test_completion_default_max_tokens_is_16(served: Served) -> None:
    out = served.client.completions.create(model=MODEL, temperature=0, prompt=[5, 6, 7])
    assert out.usage.completion_tokens == 16 and served.engine.added[-1][1] == (5, 6, 7)


def test_completion_streamed_with_usage(served: Served, codec, pool) -> None:  # type: ignore[no-untyped-def]
    chunks = list(
        served.client.completions.create(
            model=MODEL,
            prompt="Hello there",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    prompt = codec.encode("Hello there")
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == codec.decode(expected_tokens(prompt, 12, pool))
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == len(prompt)


def test_chat_applies_the_template(served: Served, codec, pool) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = served.client.chat.completions.create(model=MODEL, temperature=0, messages=messages, max_tokens=7)
    prompt = codec.encode_chat(messages)
    assert served.engine.added[-1][1] == tuple(prompt)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == codec.decode(expected_tokens(prompt, 7, pool))
    assert out.object == "chat.completion" and out.usage.prompt_tokens == len(prompt)


def test_chat_streamed(served: Served, codec, pool) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    chunks = list(
        served.client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_completion_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    prompt = codec.encode_chat([{"role": "user", "content": "Hi\nthere"}])
    assert served.engine.added[-1][1] == tuple(prompt)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == codec.decode(expected_tokens(prompt, 10, pool))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].object == "chat.completion.chunk"


def test_sampling_fields_reach_the_engine(served: Served) -> None:
    served.client.completions.create(
        model=MODEL, prompt=[5], max_tokens=2, temperature=0.5, top_p=0.9, seed=41, extra_body={"top_k": 7}
    )
    sampling = served.engine.added[-1][3]
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (0.5, 0.9, 7, 41)


def test_n_choices_sample_with_their_own_seeds(served: Served, pool) -> None:  # type: ignore[no-untyped-def]
    out = served.client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=6, n=3, seed=10, temperature=1.0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [s[3].seed for s in served.engine.added[-3:]] == [10, 11, 12]
    texts = [c.text for c in out.choices]
    assert len(set(texts)) == 3 and out.usage.completion_tokens == 18 and out.usage.prompt_tokens == 2


def test_a_list_of_prompts_gets_a_choice_each(served: Served, codec, pool) -> None:  # type: ignore[no-untyped-def]
    out = served.client.completions.create(model=MODEL, temperature=0, prompt=[[5, 6], [7]], max_tokens=4)
    assert [c.text for c in out.choices] == [codec.decode(expected_tokens(p, 4, pool)) for p in ([5, 6], [7])]
    assert out.usage.prompt_tokens == 3


def test_stop_strings_cut_the_text_streamed_or_not(codec, pool) -> None:  # type: ignore[no-untyped-def]
    prompt = codec.encode("Q")
    script = codec.encode("Hello world. STOP and more text after it")
    s = Served(codec, pool, scripts={tuple(prompt): script})
    try:
        out = s.client.completions.create(model=MODEL, temperature=0, prompt=prompt, max_tokens=40, stop="STOP")
        assert out.choices[0].text == "Hello world. " and out.choices[0].finish_reason == "stop"
        chunks = list(
            s.client.completions.create(
                model=MODEL, temperature=0, prompt=prompt, max_tokens=40, stop=["STOP"], stream=True
            )
        )
        assert "".join(c.choices[0].text for c in chunks) == "Hello world. "
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert len(s.engine.aborted) == 2  # the engine stopped both at the stop string
    finally:
        s.close()


def test_ignore_eos_generates_past_the_eos_token(codec, pool) -> None:  # type: ignore[no-untyped-def]
    prompt = codec.encode("Q")
    eos = codec.eos_token_ids[0]
    s = Served(codec, pool, scripts={tuple(prompt): [*codec.encode("ab"), eos, *codec.encode("cd")]})
    try:
        out = s.client.completions.create(model=MODEL, temperature=0, prompt=prompt, max_tokens=40)
        assert out.choices[0].finish_reason == "stop" and out.choices[0].text == "ab"
        out = s.client.completions.create(
            model=MODEL, temperature=0, prompt=prompt, max_tokens=40, extra_body={"ignore_eos": True}
        )
        assert out.choices[0].text == "abcd" and s.engine.added[-1][0] == 1
    finally:
        s.close()


# ---- bad requests: 400 naming the field, never 500 -------------------------------------------------------------

BAD = [
    (b"{not json", None, "not valid JSON"),
    (b"\xff\xfe", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    ({"model": 5, "prompt": "x"}, "model", "model name"),
    ({"prompt": "x", "temperature": -1}, "temperature", "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "number"),
    ({"prompt": "x", "temperature": 1e309}, "temperature", None),
    ({"prompt": "x", "top_p": 0}, "top_p", "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p", "top_p"),
    ({"prompt": "x", "top_k": -2}, "top_k", "top_k"),
    ({"prompt": "x", "top_k": 1.5}, "top_k", "top_k"),
    ({"prompt": "x", "n": 0}, "n", "n:"),
    ({"prompt": "x", "n": 1000}, "n", "n:"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens", "max_tokens"),
    ({"prompt": "x", "max_tokens": 2**70}, "max_tokens", "max_tokens"),
    ({"prompt": "x", "seed": -(2**63) - 1}, "seed", "[-9223372036854775808, 18446744073709551615]"),
    ({"prompt": "x", "seed": 2**64}, "seed", "seed"),
    ({"prompt": "x", "seed": True}, "seed", "seed"),
    ({"prompt": "x", "stop": [""]}, "stop", "stop[0]"),
    ({"prompt": "x", "stop": 5}, "stop", "stop"),
    ({"prompt": "x", "stop": ["a"] * 100}, "stop", "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream", "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
    ({"prompt": "x", "stream": True, "stream_options": 3}, "stream_options", "stream_options"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "[0, 20]"),
    ({"prompt": "x", "logprobs": True}, "logprobs", "integer"),
    ({"prompt": "x", "echo": "yes"}, "echo", "true or false"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "echo"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty", "[-2.0, 2.0]"),
    ({"prompt": "x", "frequency_penalty": "1"}, "frequency_penalty", "number"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ({"prompt": "x", "min_p": 1.5}, "min_p", "[0.0, 1.0]"),
    ({"prompt": "x", "min_tokens": -1}, "min_tokens", "min_tokens"),
    ({"prompt": "x", "min_tokens": 20, "max_tokens": 5}, "min_tokens", "exceeds max_tokens 5"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ({"prompt": "x", "logit_bias": {"five": 1}}, "logit_bias", "token ids"),
    ({"prompt": "x", "logit_bias": [5]}, "logit_bias", "object"),
    ({"prompt": "x", "logit_bias": {"100000": 1}}, "logit_bias", "outside the vocabulary"),
    ({"prompt": "x", "prompt_logprobs": 1}, "prompt_logprobs", "echo"),
    ({"prompt": "x", "suffix": "y"}, "suffix", "not supported"),
    ({"prompt": "x", "best_of": 3}, "best_of", "best_of"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos", "ignore_eos"),
    ({}, "prompt", "prompt"),
    ({"prompt": None}, "prompt", "prompt"),
    ({"prompt": []}, "prompt", "prompt"),
    ({"prompt": [[]]}, "prompt", "prompt[0]"),
    ({"prompt": [1.5]}, "prompt", "prompt[0]"),
    ({"prompt": [[1, "a"]]}, "prompt", "prompt[0]"),
    ({"prompt": {"text": "x"}}, "prompt", "prompt"),
    ({"prompt": [10**6]}, "prompt", "outside the vocabulary"),
    ({"prompt": [-1]}, "prompt", "outside the vocabulary"),
    ({"prompt": ""}, "prompt", "encodes to no token"),
    ({"prompt": [5] * 5000}, "prompt", "maximum context length is 4096 tokens"),
    ({"prompt": [5], "max_tokens": 2**31 - 1}, "max_tokens", "maximum context length is 4096 tokens"),
    ({"prompt": "x", "stop_token_ids": 5}, "stop_token_ids", "list of at most"),
    ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids", "stop_token_ids[0]"),
    ({"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids", "outside the vocabulary"),
    ({"prompt": "x", "include_stop_str_in_output": 1}, "include_stop_str_in_output", "true or false"),
    ({"prompt": "x", "spaces_between_special_tokens": "no"}, "spaces_between_special_tokens", "true or false"),
    ({"prompt": "x", "guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"prompt": "x", "guided_json": [1]}, "guided_json", "JSON schema"),
    ({"prompt": "x", "guided_choice": []}, "guided_choice", "non-empty list"),
    ({"prompt": "x", "guided_choice": ["a", 1]}, "guided_choice", "non-empty list"),
    ({"prompt": "x", "guided_regex": ""}, "guided_regex", "regular expression"),
    ({"prompt": "x", "guided_grammar": 5}, "guided_grammar", "grammar"),
    ({"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "give one of"),
    ({"prompt": "x", "response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "give one"),
    ({"prompt": "x", "structured_outputs": "a"}, "structured_outputs", "an object"),
    ({"prompt": "x", "structured_outputs": {}}, "structured_outputs", "exactly one of"),
    ({"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"prompt": "x", "structured_outputs": {"regexp": "a"}}, "structured_outputs", "structured_outputs.regexp"),
    ({"prompt": "x", "structured_outputs": {"regex": "a", "structural_tag": {}}}, "structured_outputs", "not supp"),
    ({"prompt": "x", "use_beam_search": True}, "use_beam_search", "beam search"),
    ({"prompt": "x", "length_penalty": 2}, "length_penalty", "not supported"),
    ({"prompt": "x", "truncate_prompt_tokens": 8}, "truncate_prompt_tokens", "shorten the prompt"),
    ({"prompt": "x", "allowed_token_ids": [5]}, "allowed_token_ids", "guided_choice"),
    ({"prompt": "x", "bad_words": ["x"]}, "bad_words", "logit_bias"),
    ({"prompt": "x", "logits_processors": ["m.f"]}, "logits_processors", "not supported"),
    ({"prompt": "x", "return_tokens_as_token_ids": True}, "return_tokens_as_token_ids", "not supported"),
    ({"prompt": "x", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
    ({"prompt": "x", "priority": 1}, "priority", "first come"),
]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def named_tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


X = [{"role": "user", "content": "x"}]
BAD_CHAT = [
    ({"messages": X, "continue_final_message": True, "add_generation_prompt": True}, "continue_final_message", None),
    (
        {"messages": [*X, {"role": "assistant", "content": " "}], "continue_final_message": True},
        "continue_final_message",
        "no text",
    ),
    ({"messages": X, "continue_final_message": "yes"}, "continue_final_message", "true or false"),
    ({"messages": X, "chat_template": "{{ messages }}"}, "chat_template", "the checkpoint's is used"),
    ({"messages": X, "echo": True}, "echo", "completions endpoint"),
    ({"messages": X, "documents": [{"text": "d"}]}, "documents", "not supported"),
    ({"messages": X, "functions": [{"name": "f", "parameters": {}}]}, "functions", "send them as tools"),
    ({"messages": X, "function_call": "auto"}, "function_call", "send tool_choice with tools instead"),
    ({"messages": X, "tools": [TOOL], "guided_regex": "a+"}, "guided_regex", "exclude each other"),
    ({}, "messages", "messages"),
    ({"messages": []}, "messages", "messages"),
    ({"messages": "hi"}, "messages", "messages"),
    ({"messages": [5]}, "messages", "messages[0]"),
    ({"messages": [{"content": "hi"}]}, "messages", "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages", "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", "type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages", "text"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools", "tools[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": {"f": 1}}, "tools", "list of tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [TOOL], "tool_choice": "any"}, "tool_choice", None),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice", "needs tools"),
    (
        {"messages": [{"role": "user", "content": "x"}], "tools": [TOOL], "tool_choice": named_tool("other")},
        "tool_choice",
        "not one of the tools",
    ),
    (
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "a b"}}]},
        "tools",
        "tools[0].function.name",
    ),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [TOOL]}, "tool_choice", "needs a tool-call format"),
    (
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]},
        "messages",
        "messages[0].tool_calls[0].function.arguments",
    ),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs", "logprobs: true"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs", "true or false"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens", None),
    (
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
        "response_format",
        "response_format.json_schema: expected an object",
    ),
    ({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": []}, "chat_template_kwargs", None),
    (
        {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"messages": 1}},
        "chat_template_kwargs",
        None,
    ),
]


def _check_400(response: Any, param: str | None, words: str | None) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    if words:
        assert words in error["message"]
    if param and error["code"] != "context_length_exceeded":  # OpenAI's own words there; the param names it
        assert error["message"].startswith(param) or param in error["message"]


def test_bad_requests_are_400_naming_the_field(served: Served) -> None:
    for body, param, words in BAD:
        if isinstance(body, dict):
            body = {"model": MODEL, **body} if "model" not in body else body
        _check_400(post(served.url, "/v1/completions", body), param, words)
    for body, param, words in BAD_CHAT:
        _check_400(post(served.url, "/v1/chat/completions", {"model": MODEL, **body}), param, words)
    for body, param, words in BAD[:3]:
        _check_400(post(served.url, "/v1/chat/completions", body), param, words)
    assert served.service.unfinished == 0 and served.service.healthy


def test_the_openai_client_sees_a_bad_request_error(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=0)
    assert info.value.status_code == 400 and info.value.param == "n" and info.value.code == "invalid_value"


def test_an_unknown_model_is_404_model_not_found(served: Served) -> None:
    """OpenAI's and vLLM's answer: the client raises NotFoundError; the body is OpenAI's error naming ``model``."""
    with pytest.raises(openai.NotFoundError) as info:
        served.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404 and info.value.param == "model" and info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        served.client.completions.create(model="other", prompt="x")
    r = post(served.url, "/v1/completions", {"model": "other", "prompt": "x"})
    error = r.json()["error"]
    assert (
        r.status_code == 404
        and error["type"] == "invalid_request_error"
        and "'other' is not served" in error["message"]
    )
    assert served.engine.added == []


def test_a_model_is_retrieved_by_name(served: Served) -> None:
    model = served.client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "fi_engine")
    assert httpx.get(f"{served.url}/v1/models/{MODEL}", timeout=WAIT).json() == served.client.models.list().data[
        0
    ].model_dump(exclude_none=True)
    with pytest.raises(openai.NotFoundError) as info:
        served.client.models.retrieve("org/other")  # a name with a slash, as Hugging Face ids have
    assert info.value.code == "model_not_found" and info.value.param == "model" and "'org/other'" in info.value.message


def test_a_model_name_with_a_slash_is_retrieved(codec, pool) -> None:  # type: ignore[no-untyped-def]
    served = Served(codec, pool, max_batch=2, model_name="org/model-1.5B")
    try:
        got = httpx.get(f"{served.url}/v1/models/org/model-1.5B", timeout=WAIT).json()
        assert got["id"] == "org/model-1.5B" and got["max_model_len"] == 4096
    finally:
        served.close()


def test_unknown_paths_and_methods_answer_openai_errors(served: Served) -> None:
    r = httpx.get(f"{served.url}/v1/engines", timeout=WAIT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{served.url}/v1/completions", timeout=WAIT)
    assert r.status_code == 405 and "error" in r.json()


def test_a_template_that_refuses_the_messages_is_400(tmp_path, pool) -> None:  # type: ignore[no-untyped-def]
    from fi_engine.text.codec import TextCodec

    root = write_text_checkpoint(tmp_path / "m")
    (root / "chat_template.jinja").write_text(
        "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    codec = TextCodec.from_dir(root)
    s = Served(codec, pool)
    try:
        body = {"model": MODEL, "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}
        _check_400(post(s.url, "/v1/chat/completions", body), "messages", "System role not supported")
    finally:
        s.close()


# ---- limits, disconnects, concurrency ---------------------------------------------------------------------------


def test_a_full_queue_is_429(codec, pool) -> None:  # type: ignore[no-untyped-def]
    s = Served(codec, pool, max_queue=1, max_batch=1, step_delay_s=0.01)
    try:
        streams = [s.service.submit([5], max_new_tokens=50) for _ in range(2)]  # the slot and the queue taken
        with pytest.raises(openai.RateLimitError) as info:
            s.client.completions.create(model=MODEL, temperature=0, prompt="x", max_tokens=3)
        assert info.value.status_code == 429 and info.value.response.headers["retry-after"] == "1"
        assert info.value.body["code"] == "rate_limit_exceeded"
        for st in streams:
            st.cancel()
        wait_for(lambda: s.service.unfinished == 0, "the queue to empty")
        assert (
            s.client.completions.create(model=MODEL, temperature=0, prompt="x", max_tokens=3).usage.completion_tokens
            == 3
        )
    finally:
        s.close()


def test_a_client_that_hangs_up_mid_stream_cancels_its_request(codec, pool) -> None:  # type: ignore[no-untyped-def]
    s = Served(codec, pool, max_batch=1, step_delay_s=0.002, max_seq_len=1 << 20)
    try:
        body = {"model": MODEL, "prompt": [5], "max_tokens": 100_000, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=WAIT) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one event, then hang up
        wait_for(lambda: s.engine.aborted == [0], "the engine to see the abort")
        # the slot is free: the next request is served
        assert (
            s.client.completions.create(model=MODEL, temperature=0, prompt=[6], max_tokens=3).usage.completion_tokens
            == 3
        )
    finally:
        s.close()


def test_a_client_that_hangs_up_before_a_whole_answer_cancels_its_request(codec, pool) -> None:  # type: ignore[no-untyped-def]
    s = Served(codec, pool, max_batch=1, step_delay_s=0.002, max_seq_len=1 << 20)
    try:
        host, port = s.url.removeprefix("http://").split(":")
        body = json.dumps({"model": MODEL, "prompt": [5], "max_tokens": 100_000}).encode()
        with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
            head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for(lambda: s.engine.steps > 3, "the request to run")
        wait_for(lambda: s.engine.aborted == [0], "the engine to see the abort")
        assert s.service.unfinished == 0
    finally:
        s.close()


def test_200_concurrent_clients_each_get_exactly_their_tokens(codec, pool) -> None:  # type: ignore[no-untyped-def]
    # steps of 20 ms, as a GPU's are: the requests arrive while steps run, so the 32 slots fill (with instant steps
    # how full they get depends on the machine's speed, the test's own clients included)
    s = Served(codec, pool, max_batch=32, max_queue=256, step_delay_s=0.02)
    prompts = [[i % 97 + 1, i // 97 + 1] for i in range(200)]

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=WAIT)

        async def one(i: int) -> str:
            limit = 3 + i % 9
            if i % 2:
                out = await client.completions.create(model=MODEL, temperature=0, prompt=prompts[i], max_tokens=limit)
                return out.choices[0].text
            chunks = await client.completions.create(
                model=MODEL, temperature=0, prompt=prompts[i], max_tokens=limit, stream=True
            )
            return "".join([c.choices[0].text async for c in chunks])

        try:
            return await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            await client.close()

    try:
        got = asyncio.run(main())
        want = [codec.decode(expected_tokens(prompts[i], 3 + i % 9, pool)) for i in range(200)]
        assert got == want
        assert len(s.engine.added) == 200 and sorted(a[0] for a in s.engine.added) == list(range(200))
        assert s.engine.aborted == [] and s.engine.most_active == 32
        assert s.service.metrics.generation_tokens == sum(3 + i % 9 for i in range(200))
    finally:
        s.close()


# ---- /metrics, /health, shutdown --------------------------------------------------------------------------------


def test_metrics_parse_as_prometheus_text(served: Served) -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    for i in range(3):
        served.client.completions.create(model=MODEL, temperature=0, prompt=[i + 1, 2], max_tokens=4)
    post(served.url, "/v1/completions", {"model": "nope", "prompt": "x"})
    post(served.url, "/v1/completions", {"model": MODEL, "prompt": "x", "n": 0})
    r = httpx.get(f"{served.url}/metrics", timeout=WAIT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in parser.text_string_to_metric_families(r.text)}
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("fi_engine_requests_total", (("finish_reason", "length"),))] == 3
    assert value[("fi_engine_generation_tokens_total", ())] == 12
    assert value[("fi_engine_prompt_tokens_total", ())] == 6
    assert value[("fi_engine_http_responses_total", (("code", "200"),))] == 3
    assert value[("fi_engine_http_responses_total", (("code", "400"),))] == 1
    assert value[("fi_engine_http_responses_total", (("code", "404"),))] == 1
    assert value[("fi_engine_time_to_first_token_seconds_count", ())] == 3
    assert value[("fi_engine_time_to_first_token_seconds_bucket", (("le", "+Inf"),))] == 3
    assert value[("fi_engine_inter_token_latency_seconds_count", ())] == 9
    assert families["fi_engine_requests_waiting"].type == "gauge"
    assert families["fi_engine_time_to_first_token_seconds"].type == "histogram"


def test_health_is_200_then_503_after_an_engine_error(codec, pool) -> None:  # type: ignore[no-untyped-def]
    s = Served(codec, pool, fail_at_step=2)
    try:
        assert httpx.get(f"{s.url}/health", timeout=WAIT).status_code == 200
        r = post(s.url, "/v1/completions", {"model": MODEL, "prompt": [5], "max_tokens": 10})
        error = r.json()["error"]  # a fault of the server's: OpenAI's 500 shape, no code
        assert r.status_code == 500 and error["type"] == "server_error" and error["code"] is None
        assert "fails at step 2" in r.json()["error"]["message"]
        assert httpx.get(f"{s.url}/health", timeout=WAIT).status_code == 503
        r = post(s.url, "/v1/completions", {"model": MODEL, "prompt": [5], "max_tokens": 10})
        assert r.status_code == 503 and "engine error" in r.json()["error"]["message"]
    finally:
        s.close()


def test_shutdown_lets_open_streams_finish(codec, pool) -> None:  # type: ignore[no-untyped-def]
    s = Served(codec, pool, step_delay_s=0.01, graceful_s=10.0)
    texts: list[str] = []

    def client() -> None:
        chunks = s.client.completions.create(model=MODEL, temperature=0, prompt=[5], max_tokens=30, stream=True)
        texts.append("".join(c.choices[0].text for c in chunks))

    t = threading.Thread(target=client)
    t.start()
    wait_for(lambda: s.engine.steps > 2, "the stream to start")
    s.server.stop()
    t.join(WAIT)
    assert texts == [s.service.codec.decode(expected_tokens([5], 30, pool))]
    assert not s.service.healthy and not s.service._thread.is_alive()  # the lifespan closed the service
    s.service.close()


def test_the_openai_client_example_of_engine_text_md_runs(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    # docs/engine-text.md's example as written, pointed at this server: a chat answer, then a streamed one
    from helpers.env import REPO

    text = (REPO / "docs" / "engine-text.md").read_text()
    code = next(b.split("```", 1)[0] for b in text.split("```python\n")[1:] if "from openai import OpenAI" in b)
    assert 'base_url="http://localhost:8000/v1"' in code and 'model = "./SmolLM2-135M-Instruct"' in code
    assert "stream=True" in code
    code = code.replace("http://localhost:8000/v1", f"{served.url}/v1")
    exec(compile(code.replace('"./SmolLM2-135M-Instruct"', repr(MODEL)), "engine-text.md", "exec"), {})
    out = capsys.readouterr().out
    answer, streamed = out.split("CompletionUsage(", 1)  # the answer, its usage, then the streamed text
    assert answer.strip() and "completion_tokens=" in streamed, out
    assert streamed.split(")", 1)[1].strip(), out
    added = served.engine.added
    assert len(added) == 2 and added[0][2] == 64 and added[1][2] == 32  # max_tokens of each request
