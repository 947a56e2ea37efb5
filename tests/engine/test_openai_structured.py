"""The OpenAI API's ``response_format`` (structured output), end to end on CPU: the official ``openai`` client
against the server over the stand-in engine (helpers.fake_engine), which honours a request's grammar by choosing
the highest-logit token the grammar allows at each step. The answers must parse as JSON and validate against the
request's schema, chat and completions, whole and streamed; a bad format or schema is a 400 naming
``response_format``; requests without one keep their tokens."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from helpers.json_schemas import PERSON, check_person, json_schema
from helpers.serve import MODEL, WAIT, Served, require_server_stack, run_doc_example

openai = require_server_stack()
pytest.importorskip("llguidance")

MAX_TOKENS = 600  # the stand-in's pseudo-random model writes long blanks and names; its output ends well before


def chat(served: Served, content: str, **kw: Any) -> Any:
    return served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS, **kw
    )


def streamed_chat_text(served: Served, content: str, **kw: Any) -> tuple[str, str | None]:
    """A streamed chat answer's text and finish reason."""
    text, finish = "", None
    for chunk in chat(served, content, stream=True, **kw):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def test_chat_json_schema_answers_parse_and_validate(served: Served) -> None:
    out = chat(served, "Who?", temperature=0, response_format=json_schema(PERSON))
    choice = out.choices[0]
    assert choice.finish_reason == "stop"  # the grammar's end: an EOS id, not the length limit
    check_person(json.loads(choice.message.content))
    grammar = served.engine.added[-1][3].grammar
    assert (
        isinstance(grammar, str) and json.loads(grammar)["grammars"][0]["json_schema"]["required"] == PERSON["required"]
    )


def test_chat_json_schema_streamed_is_the_same_answer(served: Served) -> None:
    whole = chat(served, "Who?", temperature=0, response_format=json_schema(PERSON)).choices[0].message.content
    text, finish = streamed_chat_text(served, "Who?", temperature=0, response_format=json_schema(PERSON))
    assert text == whole and finish == "stop"
    check_person(json.loads(text))


def test_twelve_schema_requests_all_parse_and_validate(served: Served) -> None:
    """Different prompts and seeds (sampled at temperature 1 from the allowed tokens): every answer follows the
    schema."""
    for i in range(12):
        out = chat(served, f"Person number {i}", temperature=1.0, seed=i, response_format=json_schema(PERSON))
        assert out.choices[0].finish_reason == "stop"
        check_person(json.loads(out.choices[0].message.content))
    assert all(a[3].grammar is not None for a in served.engine.added[-12:])


def test_completions_take_response_format_whole_and_streamed(served: Served) -> None:
    """The legacy completions endpoint takes ``response_format`` too (vLLM's extension: the client's
    ``extra_body``)."""
    body = {"response_format": {"type": "json_object"}}
    out = served.client.completions.create(
        model=MODEL, prompt="An object:", max_tokens=MAX_TOKENS, temperature=0, extra_body=body
    )
    value = json.loads(out.choices[0].text)
    assert isinstance(value, dict) and out.choices[0].finish_reason == "stop"
    stream = served.client.completions.create(
        model=MODEL, prompt="An object:", max_tokens=MAX_TOKENS, temperature=0, extra_body=body, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == out.choices[0].text
    schema_body = {"response_format": json_schema(PERSON)}
    out = served.client.completions.create(
        model=MODEL, prompt="A person:", max_tokens=MAX_TOKENS, temperature=0, extra_body=schema_body
    )
    check_person(json.loads(out.choices[0].text))


def test_the_grammar_ends_a_reply_the_model_would_run_on(codec: Any, pool: list[int]) -> None:
    """A model that writes an object and then a stray brace: without a format the reply is not JSON; with
    ``json_object`` only EOS is allowed after the object, so the reply is the object and stops there."""
    messages = [{"role": "user", "content": "An object"}]
    prompt = codec.encode_chat(messages)
    s = Served(codec, pool, scripts={tuple(prompt): codec.encode('{"n": 1}} and more')})
    try:
        free = s.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
        with pytest.raises(json.JSONDecodeError):
            json.loads(free.choices[0].message.content)
        shaped = s.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=40, temperature=0, response_format={"type": "json_object"}
        )
        assert shaped.choices[0].message.content == '{"n": 1}' and shaped.choices[0].finish_reason == "stop"
    finally:
        s.close()


def test_text_format_is_no_grammar_and_keeps_the_tokens(served: Served) -> None:
    plain = chat(served, "Hello", temperature=0, max_completion_tokens=6)
    text = chat(served, "Hello", temperature=0, max_completion_tokens=6, response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content
    assert served.engine.added[-1][3].grammar is None and served.engine.added[-2][3].grammar is None


BAD = [
    ({"type": "json"}, 'response_format.type: expected "text", "json_object" or "json_schema"'),
    ({"type": "json_schema"}, "response_format.json_schema: expected an object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema: expected"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": 1}}, "strict: expected true or false"),
    ("json_object", "response_format: expected an object"),
    (json_schema({"type": "objectx"}), "response_format: the schema cannot be used (its grammar does not compile)"),
    (
        json_schema({"type": "string", "pattern": "(unclosed"}),
        "response_format: the schema cannot be used (its grammar does not compile)",
    ),
]


@pytest.mark.parametrize(("value", "words"), BAD)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_bad_response_format_is_400_naming_it(served: Served, path: str, value: Any, words: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "response_format": value, "max_tokens": 4}
    body |= {"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}
    response = httpx.post(served.url + path, json=body, timeout=WAIT)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format" and words in error["message"], error
    assert not served.engine.added  # refused before the engine


def test_tools_beside_a_json_format_need_a_call_format_for_auto(served: Served) -> None:
    """A JSON format beside tools is served as calls or the answer (tests/engine/test_openai_tool_choice.py), which
    a template with no call format cannot tell apart: "auto" (the default) is a 400 naming ``tool_choice`` and
    saying what to send; with "none" the format alone is served."""
    from helpers.text_checkpoints import WEATHER_TOOL

    with pytest.raises(openai.BadRequestError) as caught:
        chat(served, "x", tools=[WEATHER_TOOL], response_format={"type": "json_object"})
    assert caught.value.body["param"] == "tool_choice" and caught.value.body["code"] == "unsupported_value"
    assert '"required"' in caught.value.body["message"] and not served.engine.added
    out = chat(
        served, "x", tools=[WEATHER_TOOL], tool_choice="none", response_format={"type": "json_object"}, temperature=0
    )
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_an_engine_refusing_grammars_refuses_by_name(codec: Any, pool: list[int]) -> None:
    """An engine's refusal of a grammar (``"grammar: ..."``: the GPU engine's of a checkpoint without
    ``tokenizer.json``, or with a vocabulary split over tensor-parallel ranks; here the stand-in's) reaches the
    client as a 400 naming ``response_format``."""
    s = Served(codec, pool, refuses=("grammar",))
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            chat(s, "x", response_format={"type": "json_object"})
    finally:
        s.close()
    assert caught.value.body["param"] == "response_format" and caught.value.body["code"] == "unsupported_value"
    assert "grammar: not supported by this engine" in caught.value.body["message"]


def test_the_server_hands_its_grammar_tokenizer_to_the_engine(served: Served) -> None:
    """The server's :class:`~fi_engine.text.grammar.GrammarTokenizer` (built at the first ``response_format``) is
    handed to an engine that has none, so the tokenizer's index is built once: the engine, its own tokenizer taken
    away, still serves the request with the server's."""
    served.engine.tokenizer = None  # (the engine could no longer make one of its own)
    out = chat(served, "Who?", temperature=0, response_format=json_schema(PERSON)).choices[0]
    assert served.engine.grammar_tokenizer is not None and out.finish_reason == "stop"
    check_person(json.loads(out.message.content))


def test_the_docs_example_runs(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/engine-text.md's structured-output example as written, pointed at the stand-in server: it prints the
    parsed object, which has the schema's keys and types."""
    import ast

    run_doc_example("### Structured output", served.url)
    answer = ast.literal_eval(capsys.readouterr().out.strip())  # the dict json.loads gave, as print shows it
    assert set(answer) == {"name", "age"} and served.engine.added[-1][3].grammar is not None
    assert isinstance(answer["name"], str) and len(answer["name"]) <= 40
    assert type(answer["age"]) is int and 0 <= answer["age"] <= 150


def test_the_grammars_end_ends_the_answer_even_with_ignore_eos(served: Served) -> None:
    """Once the grammar is complete only EOS ids are allowed, so ``ignore_eos`` could only repeat them: the answer
    ends there (``"stop"``) and is the same as without it."""
    kw: dict[str, Any] = {"temperature": 0, "response_format": json_schema(PERSON)}
    plain = chat(served, "Who?", **kw).choices[0]
    ignoring = chat(served, "Who?", extra_body={"ignore_eos": True}, **kw).choices[0]
    assert served.engine.added[-1][3].grammar is not None
    assert ignoring.finish_reason == "stop" and ignoring.message.content == plain.message.content
    check_person(json.loads(ignoring.message.content))
