"""A checkpoint's chat template, found and rendered as transformers (5.x) finds and renders it.

Where the template is (first found wins, as transformers' ``from_pretrained`` resolves it):

1. ``chat_template.jinja`` (the default template) and ``additional_chat_templates/*.jinja`` (named ones);
2. ``tokenizer_config.json``'s ``chat_template``: a string, or a list of ``{"name", "template"}`` objects;
3. ``chat_template.json`` (``{"chat_template": ...}``, the legacy processor file).

Several named templates: ``template=`` picks one by name; otherwise ``tool_use`` when tools are passed and the
checkpoint has one, else ``default``.

Rendering: a jinja2 ``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension (``break``/``continue``) and a ``{% generation %}`` block that renders its body;
``tojson`` is ``json.dumps`` with ``ensure_ascii=False`` (no HTML escaping, ``indent``/``separators``/
``sort_keys`` accepted); globals ``raise_exception(message)`` and ``strftime_now(format)``. The template sees
``messages`` (message keys whose value is None dropped; a message's reasoning under ``reasoning_content``,
``thinking`` or ``reasoning`` is given under ``reasoning_content`` and ``thinking`` too), ``tools``,
``documents``, ``add_generation_prompt``, the named special tokens (``bos_token``, ``eos_token``, ...) and any
extra keyword (``enable_thinking=False``, ...), which overrides a special token of the same name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ..values import arg_flag, show
from .args import arg_mapping, arg_records, arg_text
from .model_files import checkpoint_dir, read_json, read_text
from .optional import require

__all__ = ["ChatTemplate"]

# a message's reasoning, under the names templates read it by (the first is the one most templates read)
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# lists and dicts inside one another in what the template sees: far past any real message or tool schema, and far
# below Python's recursion limit (the copy below and the template's own walk recurse once per level)
MAX_NESTING = 100


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    """``value`` rebuilt from JSON types only (dict with str keys, list, str, int, float, bool, None), so the
    sandboxed template sees no object with methods of its own; TypeError naming ``where`` for anything else,
    ValueError for lists and dicts nested more than :data:`MAX_NESTING` deep (a list that holds itself too)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if depth >= MAX_NESTING and isinstance(value, (Mapping, list, tuple)):
        raise ValueError(f"{where}: lists and dicts nested more than {MAX_NESTING} deep; flatten the data")
    # subclasses (str/int enums, numpy's float64) carry methods of their own: keep their plain value only
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {type(key).__name__} key {show(key)}")
            out[str(key)] = _plain(item, f"{where}[{show(key)}]", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise TypeError(
        f"{where}: expected JSON data (dict, list, str, int, float, bool, None), got {type(value).__name__}"
    )


def _messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` checked and copied as the template will see them."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages: expected a list of message dicts ({{'role': ..., 'content': ...}}), got "
            f"{type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages: the conversation is empty; pass at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}]: needs a string 'role' ('system', 'user', 'assistant', 'tool')")
        plain = _plain({k: v for k, v in message.items() if v is not None}, f"messages[{i}]")
        reasoning = next((plain[key] for key in REASONING_KEYS if plain.get(key) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        out.append(plain)
    return out


def _environment() -> Any:
    """The jinja2 environment chat templates are written for (see the module's docstring)."""
    jinja2 = require("jinja2", "rendering a chat template")
    sandbox = require("jinja2.sandbox", "rendering a chat template")
    ext = require("jinja2.ext", "rendering a chat template")
    nodes = require("jinja2.nodes", "rendering a chat template")

    class GenerationBlock(ext.Extension):  # type: ignore[misc, name-defined]
        """``{% generation %}...{% endgeneration %}`` marks the assistant's text for training masks; rendering
        a prompt only needs its body."""

        tags = {"generation"}  # noqa: RUF012 (jinja2 reads this class attribute)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: Any) -> None:
        raise jinja2.exceptions.TemplateError(str(message))

    def tojson(
        value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class ChatTemplate:
    """A checkpoint's chat template(s), compiled on first use.

    Attributes:
        templates: name -> jinja source; a checkpoint with one template has it under ``"default"``.
        source: where they were read from (a file path, for messages).
    """

    def __init__(self, templates: Mapping[str, str], source: str) -> None:
        if not isinstance(templates, Mapping):
            raise TypeError(f"templates: expected a dict of name -> jinja source, got {type(templates).__name__}")
        if not templates:
            raise ValueError("templates: empty; pass at least one, e.g. {'default': source}")
        for name, text in templates.items():
            if not isinstance(name, str) or not isinstance(text, str):
                raise TypeError(f"templates: names and sources must be str, got {show(name)}: {type(text).__name__}")
        self.templates = dict(templates)
        self.source = arg_text("source", source)
        self._compiled: dict[str, Any] = {}
        self._env: Any = None

    @classmethod
    def find(cls, model_dir: Any, tokenizer_config: Mapping[str, Any] | None = None) -> ChatTemplate | None:
        """The template(s) of ``model_dir`` (see the module's docstring for where they are looked for), or None
        when the checkpoint has none. ``tokenizer_config``: the parsed ``tokenizer_config.json`` when the caller
        already holds it (read from ``model_dir`` otherwise)."""
        root = checkpoint_dir(model_dir)
        tokenizer_config = arg_mapping("tokenizer_config", tokenizer_config, "the parsed tokenizer_config.json")
        templates: dict[str, str] = {}
        default = read_text(root / "chat_template.jinja")
        if default is not None:
            templates["default"] = default
        extra_dir = root / "additional_chat_templates"
        if extra_dir.is_dir():
            for path in sorted(extra_dir.glob("*.jinja")):
                text = read_text(path)
                if text is not None:
                    templates[path.name.removesuffix(".jinja")] = text
        if templates:
            return cls(templates, str(root / "chat_template.jinja") if default is not None else str(extra_dir))
        config_path = root / "tokenizer_config.json"
        if tokenizer_config is None:
            tokenizer_config = read_json(config_path, "the tokenizer's settings and chat template") or {}
        if tokenizer_config.get("chat_template") is not None:
            return cls(_templates_from(tokenizer_config["chat_template"], config_path), str(config_path))
        legacy_path = root / "chat_template.json"
        legacy = read_json(legacy_path, "{'chat_template': the jinja source}")
        if legacy is not None:
            return cls(_templates_from(legacy.get("chat_template"), legacy_path), str(legacy_path))
        return None

    def pick(self, template: str | None = None, has_tools: bool = False) -> str:
        """The name of the template to render: ``template`` when given, else ``tool_use`` (with tools, when
        present), else ``default``; ValueError listing the names otherwise."""
        names = sorted(self.templates)
        if template is not None:
            if not isinstance(template, str) or template not in self.templates:
                raise ValueError(f"template: {show(template)} is not a chat template of {self.source}; it has {names}")
            return template
        if has_tools and "tool_use" in self.templates:
            return "tool_use"
        if "default" in self.templates:
            return "default"
        raise ValueError(
            f"template: {self.source} holds several chat templates and none named 'default'; pick one by name ({names})"
        )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text of ``messages`` (dicts with ``role`` and ``content``).

        ``tools``: JSON schemas of the functions the model may call (``{"type": "function", "function": {...}}``);
        ``documents``: retrieval documents (``{"title", "text"}``); ``special_tokens``: the named special tokens
        (``Tokenizer.special_tokens``); ``kwargs``: extra template variables. ValueError when the template
        refuses the messages (its ``raise_exception``) or fails, naming the template's file.
        """
        chat = _messages(messages)
        generation_prompt = arg_flag("add_generation_prompt", add_generation_prompt)
        tool_list = _plain(arg_records("tools", tools, "tool schemas"), "tools")
        document_list = _plain(arg_records("documents", documents, "documents"), "documents")
        tokens = arg_mapping("special_tokens", special_tokens, "the named special tokens") or {}
        for key, value in tokens.items():
            arg_text(f"special_tokens[{key!r}]", value)
        variables = {**tokens, **_plain(kwargs, "kwargs")}
        name = self.pick(template, has_tools=tools is not None)
        compiled = self._compile(name)
        try:
            return str(
                compiled.render(
                    messages=chat,
                    tools=tool_list,
                    documents=document_list,
                    add_generation_prompt=generation_prompt,
                    **variables,
                )
            )
        except Exception as exc:  # the template is data: whatever it raises is about what it was given
            raise ValueError(
                f"messages: the chat template ({name}) of {self.source} refused them: {type(exc).__name__}: "
                f"{str(exc)[:300]}"
            ) from None

    def _compile(self, name: str) -> Any:
        found = self._compiled.get(name)
        if found is None:
            jinja2 = require("jinja2", "rendering a chat template")
            if self._env is None:
                self._env = _environment()
            try:
                found = self._env.from_string(self.templates[name])
            except jinja2.exceptions.TemplateSyntaxError as exc:
                raise ValueError(
                    f"{self.source}: the chat template ({name}) is not valid jinja (line {exc.lineno}: {exc.message}); "
                    f"fix the template or pass one of your own"
                ) from None
            self._compiled[name] = found
        return found


def _templates_from(value: Any, source: Path) -> dict[str, str]:
    """``chat_template`` as stored in a JSON file: a string, or a list of ``{"name": ..., "template": ...}``."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and value:
        out = {}
        for i, item in enumerate(value):
            if not (
                isinstance(item, Mapping)
                and isinstance(item.get("name"), str)
                and isinstance(item.get("template"), str)
            ):
                raise ValueError(
                    f"model_dir: {source}: chat_template[{i}] must be an object with string 'name' and 'template', "
                    f"got {show(item)}"
                )
            out[item["name"]] = item["template"]
        return out
    raise ValueError(
        f"model_dir: {source}: chat_template must be a string (the jinja source) or a non-empty list of "
        f"{{'name', 'template'}} objects, got {type(value).__name__}"
    )
