"""A checkpoint's ``generation_config.json``: the token ids that end a generation and its default sampling.

The end-of-sequence ids are ``generation_config.json``'s ``eos_token_id`` (an int or a list of ints; Llama 3
Instruct lists ``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``), then the tokenizer's ``eos_token`` when
not among them; without ``generation_config.json``, ``config.json``'s ``eos_token_id`` takes its place (as
transformers derives a generation config from the model config).

Sampling defaults are the values the checkpoint sets, None where it sets none (the engine's or the request's
own default applies there): ``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``,
``repetition_penalty``. ``do_sample: false`` means greedy whatever the temperature says, as in transformers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..values import MAX_SIZE, show
from .args import arg_text, arg_token_ids
from .model_files import checkpoint_dir, read_json

__all__ = ["GenerationDefaults"]

# the largest temperature (and repetition penalty) taken: far past any useful value, but finite, so that the
# sampler's arithmetic stays in float32
MAX_TEMPERATURE = 1e4


def _token_ids(value: Any, source: str, name: str) -> tuple[int, ...]:
    """An ``*_token_id`` field: null, an int or a list of ints (each >= 0)."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= MAX_SIZE:
            raise ValueError(
                f"{source}: {name} must be a token id (an int in [0, 2**31)) or a list of them, got {show(value)}"
            )
        out.append(int(item))
    return tuple(out)


def _number(d: Mapping[str, Any], key: str, source: str, low: float, high: float, integer: bool = False) -> Any:
    """``d[key]`` as a number in ``[low, high]`` (an int when ``integer``), or None when absent or null."""
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"{source}: {key} must be {'an integer' if integer else 'a number'}, got {show(value)}")
    # compared as given (an int past float's range is out of range, not an OverflowError)
    if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        raise ValueError(f"{source}: {key} must lie in [{low}, {high}], got {show(value)}")
    return value if integer else float(value)


@dataclass(frozen=True)
class GenerationDefaults:
    """What a checkpoint says about generating.

    Attributes:
        eos_token_ids: the ids that end a generation, in the order found (generation config first), no repeats.
        bos_token_id, pad_token_id: as the generation config (or model config) gives them, else None.
        do_sample: False for greedy decoding; None when unset.
        temperature: > 0 (0 is accepted as greedy), None when unset.
        top_p: in (0, 1], None when unset. top_k: >= 0 (0 disables it), None when unset.
        max_new_tokens: > 0, None when unset. repetition_penalty: > 0, None when unset.
        source: where the values came from, as errors name it (``"model_dir: <path>"``, or ``"defaults"``).
    """

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    source: str = "defaults"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str, tokenizer_eos_ids: Iterable[int] = ()) -> GenerationDefaults:
        """Parse a generation config object ``d`` (``source`` names it in errors); ``tokenizer_eos_ids`` are
        appended to its ``eos_token_id`` where missing."""
        if not isinstance(d, Mapping):
            raise TypeError(f"d: expected a generation config (a dict), got {type(d).__name__}")
        source = arg_text("source", source)
        eos = list(dict.fromkeys(_token_ids(d.get("eos_token_id"), source, "eos_token_id")))
        for token in arg_token_ids("tokenizer_eos_ids", tokenizer_eos_ids, MAX_SIZE + 1):
            if token not in eos:
                eos.append(token)
        bos = _token_ids(d.get("bos_token_id"), source, "bos_token_id")
        pad = _token_ids(d.get("pad_token_id"), source, "pad_token_id")
        do_sample = d.get("do_sample")
        if do_sample is not None and not isinstance(do_sample, bool):
            raise ValueError(f"{source}: do_sample must be true or false, got {show(do_sample)}")
        top_p = _number(d, "top_p", source, 0.0, 1.0)
        if top_p == 0:
            raise ValueError(f"{source}: top_p must lie in (0, 1], got 0")
        max_new = _number(d, "max_new_tokens", source, 1, MAX_SIZE, integer=True)
        penalty = _number(d, "repetition_penalty", source, 0.0, MAX_TEMPERATURE)
        if penalty == 0:
            raise ValueError(f"{source}: repetition_penalty must be > 0, got 0")
        return cls(
            eos_token_ids=tuple(eos),
            bos_token_id=bos[0] if bos else None,
            pad_token_id=pad[0] if pad else None,
            do_sample=do_sample,
            temperature=_number(d, "temperature", source, 0.0, MAX_TEMPERATURE),
            top_p=top_p,
            top_k=_number(d, "top_k", source, 0, MAX_SIZE, integer=True),
            max_new_tokens=max_new,
            repetition_penalty=penalty,
            source=source,
        )

    @classmethod
    def from_dir(cls, model_dir: Any, tokenizer_eos_ids: Iterable[int] = ()) -> GenerationDefaults:
        """Read ``model_dir/generation_config.json`` (or, without it, the ids in ``config.json``); neither file
        is required. ValueError naming ``model_dir`` and the file for a malformed one."""
        root = checkpoint_dir(model_dir)
        path: Path = root / "generation_config.json"
        found = read_json(path, "the checkpoint's generation settings")
        if found is None:
            path = root / "config.json"
            model = read_json(path, "the model's configuration") or {}
            # only the token ids: a model config's sampling fields are transformers' defaults, not the checkpoint's
            found = {key: model[key] for key in ("eos_token_id", "bos_token_id", "pad_token_id") if key in model}
        return cls.from_dict(found, f"model_dir: {path}", tokenizer_eos_ids)
