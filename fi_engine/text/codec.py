"""Text in, text out: a checkpoint's tokenizer, chat template and generation defaults behind one object.

>>> codec = TextCodec.from_dir("SmolLM2-135M-Instruct")
>>> prompt = codec.encode_chat([{"role": "user", "content": "Hi"}])     # token ids, generation prompt added
>>> stream = codec.detokenizer(prompt, stop=["\\n\\n"])
>>> text = "".join(stream.push(t) for t in generated_ids) + stream.finish()

The engine's loop, its streaming API and its server use this module; none of it needs a GPU. ``tokenizers`` and
``jinja2`` (the ``engine`` extra) are imported on first use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .chat import ChatTemplate
from .detokenize import IncrementalDetokenizer
from .generation_config import GenerationDefaults
from .model_files import checkpoint_dir
from .tokenizer import Tokenizer

__all__ = ["TextCodec"]


def kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("None" if k is type(None) else f"{k.__module__}.{k.__qualname__}" for k in kinds)


class TextCodec:
    """A checkpoint's text side.

    Attributes:
        tokenizer: its :class:`~fi_engine.text.tokenizer.Tokenizer`.
        chat_template: its :class:`~fi_engine.text.chat.ChatTemplate`, or None (a base model without one).
        generation: its :class:`~fi_engine.text.generation_config.GenerationDefaults` (EOS ids, sampling defaults).
    """

    def __init__(
        self, tokenizer: Tokenizer, chat_template: ChatTemplate | None, generation: GenerationDefaults
    ) -> None:
        for name, value, kind in (
            ("tokenizer", tokenizer, Tokenizer),
            ("chat_template", chat_template, (ChatTemplate, type(None))),
            ("generation", generation, GenerationDefaults),
        ):
            if not isinstance(value, kind):
                raise TypeError(f"{name}: expected a {kind_name(kind)}, got {type(value).__name__}")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.generation = generation

    @classmethod
    def from_dir(cls, model_dir: Any) -> TextCodec:
        """Read ``model_dir``'s ``tokenizer.json`` (required), ``tokenizer_config.json``, chat template files and
        ``generation_config.json`` (each optional; a malformed one is a ValueError naming the file)."""
        root: Path = checkpoint_dir(model_dir)
        tokenizer = Tokenizer.from_dir(root)
        template = ChatTemplate.find(root, tokenizer.config)
        eos = tokenizer.eos_token_id
        generation = GenerationDefaults.from_dir(root, () if eos is None else (eos,))
        return cls(tokenizer, template, generation)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a generation (generation config's, then the tokenizer's EOS)."""
        return self.generation.eos_token_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of plain ``text`` (a completion prompt); ``add_special_tokens`` adds BOS where the tokenizer
        does."""
        return self.tokenizer.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of token ``ids`` at once (for a stream of them, :meth:`detokenizer`)."""
        return self.tokenizer.decode(ids, skip_special_tokens)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text of ``messages`` through the checkpoint's chat template (see
        :meth:`ChatTemplate.render`; ``kwargs`` are extra template variables such as ``enable_thinking``).
        ValueError when the checkpoint has no chat template."""
        if self.chat_template is None:
            raise ValueError(
                f"messages: {self.tokenizer.source.parent} has no chat template (chat_template.jinja, or "
                f"chat_template in tokenizer_config.json); send a plain prompt instead, or add the template"
            )
        return self.chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=self.tokenizer.special_tokens,
            **kwargs,
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered chat (the template writes the special tokens, so none are added), as
        transformers' ``apply_chat_template(..., tokenize=True)`` gives them."""
        text = self.render_chat(messages, add_generation_prompt, tools, **kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def detokenizer(
        self,
        prompt_ids: Sequence[int] = (),
        stop: str | Sequence[str] = (),
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
        keep_special_tokens: Sequence[str] = (),
    ) -> IncrementalDetokenizer:
        """A fresh :class:`~fi_engine.text.detokenize.IncrementalDetokenizer` for one request's generated tokens."""
        return IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids,
            skip_special_tokens=skip_special_tokens,
            stop=stop,
            min_tokens=min_tokens,
            keep_special_tokens=keep_special_tokens,
        )
