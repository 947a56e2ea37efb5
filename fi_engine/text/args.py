"""Argument checks the text layer's modules share: a text, a sequence of token ids, optional JSON-like
lists and mappings; each refuses a bad value with TypeError/ValueError naming the argument.

Its own module so that :mod:`.tokenizer`, :mod:`.chat`, :mod:`.detokenize` and :mod:`.generation_config` stand
on it without importing one another.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..values import show

__all__ = ["arg_mapping", "arg_records", "arg_text", "arg_token_ids"]


def arg_text(name: str, value: Any) -> str:
    """``value`` if it is a str, else TypeError naming ``name``."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
    return value


def arg_token_ids(name: str, value: Any, vocab_size: int) -> list[int]:
    """``value`` (a sequence of ints, numpy's included) as a list of ints in ``[0, vocab_size)``, else
    TypeError/ValueError naming ``name`` (and the index of the bad id)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{name}: expected a sequence of token ids (ints), got {type(value).__name__}")
    if isinstance(value, np.ndarray) and value.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of token ids, got an array of shape {value.shape}")
    out = []
    for i, token in enumerate(value):
        if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
            raise TypeError(f"{name}[{i}]: expected an int token id, got {type(token).__name__}")
        if not 0 <= token < vocab_size:
            raise ValueError(f"{name}[{i}]: token id {show(int(token))} is outside the vocabulary [0, {vocab_size})")
        out.append(int(token))
    return out


def arg_mapping(name: str, value: Any, what: str) -> Mapping[str, Any] | None:
    """``value`` if it is None or a mapping with str keys, else TypeError naming ``name`` (``what`` describes it)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"{name}: expected {what} (a dict with str keys) or None, got {show(value)}")
    return value


def arg_records(name: str, value: Any, what: str) -> list[Mapping[str, Any]] | None:
    """``value`` if it is None or a list/tuple of mappings, as a list; else TypeError naming ``name``."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list of {what} (dicts) or None, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise TypeError(f"{name}[{i}]: expected {what} as a dict, got {type(item).__name__}")
    return list(value)
