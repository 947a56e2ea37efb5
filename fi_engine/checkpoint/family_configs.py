"""Readers of the settings a Llama-architecture family keeps beside the shared fields, for the families' own config
readers (each in its module: :mod:`fi_engine.models.gemma2`, :mod:`fi_engine.models.gpt_oss`).

:meth:`~fi_engine.checkpoint.config.LlamaConfig.shared` reads what such families share with Llama (sizes, heads,
norms' epsilon, rotary base, embedding tying); a family keeps what differs in ``LlamaConfig.family``. Keys are
transformers'; a key absent from ``config.json`` takes the family's transformers class default, since
``save_pretrained`` leaves out values equal to the defaults. The readers here raise ValueError naming the key.

Layer types (:func:`layer_windows`): ``layer_types`` (a list of ``"sliding_attention"`` / ``"full_attention"``, one
per layer) when the config has it, else the built-in pattern of Gemma 2 and gpt-oss: even layers (0, 2, ...) slide,
odd layers attend to the whole context. A sliding layer attends to the last ``sliding_window`` tokens, the query's
own included (transformers' mask keeps key ``j`` for query ``i`` when ``i - sliding_window < j <= i``), which is
FlashInfer's ``window_left = sliding_window - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..values import MAX_SIZE, arg_int, show

__all__ = ["layer_windows"]

SLIDING, FULL = "sliding_attention", "full_attention"
MAX_LAYERS = 1 << 20  # layer_windows lists a window per layer


def number(d: dict[str, Any], key: str, source: str, default: float | None, allow_zero: bool = False) -> float:
    """``d[key]`` (absent: ``default``) as a finite float > 0 (``allow_zero``: 0 or null too, both 0.0: off)."""
    value = d.get(key, default)
    if value is None and allow_zero:
        return 0.0
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(float(value) if not isinstance(value, int) or abs(value) < 1 << 1000 else math.inf)
        or not (value > 0 or (allow_zero and value == 0))
    ):
        raise ValueError(
            f"{source}: {key} must be a finite number > 0{' (or null: off)' if allow_zero else ''}, got {show(value)}"
        )
    return float(value)


def positive_int(d: dict[str, Any], key: str, source: str, default: int) -> int:
    """``d[key]`` (absent: ``default``) as an int in ``[1, 2**31)``."""
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 1 << 31:
        raise ValueError(f"{source}: {key} must be a positive integer below 2**31 (an int32), got {show(value)}")
    return value


def layer_windows(d: dict[str, Any], num_layers: int, sliding_window: int, source: str) -> tuple[int, ...]:
    """Each layer's ``window_left``: ``sliding_window - 1`` for a sliding layer, -1 for a full one."""
    if not isinstance(source, str):
        raise TypeError(f"source: expected a str naming where the config came from, got {type(source).__name__}")
    if not isinstance(d, dict):
        raise TypeError(f"d: expected the config.json object (a dict) from {source}, got {type(d).__name__}")
    if isinstance(num_layers, int) and not isinstance(num_layers, bool) and num_layers > MAX_LAYERS:
        raise ValueError(  # a config's num_hidden_layers: the built-in pattern would list that many layers
            f"{source}: num_hidden_layers ({num_layers}) is past the {MAX_LAYERS} layers a family of sliding windows "
            f"reads here (num_layers)"
        )
    num_layers = arg_int("num_layers", num_layers, 1, MAX_LAYERS)
    sliding_window = arg_int("sliding_window", sliding_window, 1, (1 << 31) - 1)
    types = d.get("layer_types")
    if types is None:
        types = [SLIDING if (i + 1) % 2 else FULL for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers or any(t not in (SLIDING, FULL) for t in types):
        raise ValueError(
            f"{source}: layer_types must list num_layers={num_layers} entries (one per layer), each {SLIDING!r} or "
            f"{FULL!r}; "
            f"got {show(types)}"
        )
    return tuple(sliding_window - 1 if t == SLIDING else -1 for t in types)


def flag(d: dict[str, Any], key: str, source: str, default: bool) -> bool:
    """``d[key]`` (absent: ``default``) as a JSON boolean."""
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{source}: {key} must be true or false, got {show(value)}")
    return value


def check_dict(d: Any, source: Any) -> None:
    """TypeError unless ``d`` is a dict and ``source`` a str (a family reader's first check)."""
    if not isinstance(source, str):
        raise TypeError(f"source: expected a str naming where the config came from, got {type(source).__name__}")
    if not isinstance(d, dict):
        raise TypeError(f"d: expected the config.json object (a dict) from {source}, got {type(d).__name__}")


def refuse_quantized(d: dict[str, Any], source: str, fix: str = "save the model in bfloat16 or float16") -> None:
    """Refuse a ``quantization_config`` (a family serving 16-bit weights only), naming ``fix``."""
    q = d.get("quantization_config")
    if q is None:
        return
    method = q.get("quant_method") if isinstance(q, dict) else q
    raise ValueError(f"{source}: quantization_config (quant_method {show(method)}) is not supported; {fix}")


def rope_settings(d: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings under either spelling (``rope_scaling`` + ``rope_theta``, or ``rope_parameters``)."""
    merged: dict[str, Any] = {}
    if "rope_theta" in d:
        merged["rope_theta"] = d["rope_theta"]
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(d.get(key), dict):
            merged.update(d[key])
    return merged


def silu_without_biases(d: dict[str, Any], source: str, family: str, shown: Callable[[Any], str] = show) -> None:
    """Refuse (ValueError naming ``family``) an activation other than SiLU and attention or MLP biases: the Llama
    and DeepSeek projections and MLPs have neither; ``shown`` writes the activation's value in the message."""
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {shown(act)} is not supported ({family} uses 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key, False):
            raise ValueError(f"{source}: {key}=true is not supported ({family} projections have no bias)")


def size(d: dict[str, Any], key: str, source: str, default: int | None = None) -> int:
    """``d[key]`` (absent: ``default``; no default: required) as an int in ``[1, MAX_SIZE]`` (the kernels' int32)."""
    value = d.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"{source}: missing {key!r} (a positive integer)")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise ValueError(
            f"{source}: {key} must be a positive integer no larger than {MAX_SIZE} (the kernels' int32), got "
            f"{show(value)}"
        )
    return value


def eos_ids(value: Any, vocab_size: int, source: str) -> tuple[int, ...]:
    """``eos_token_id`` (a token id, a list of them, or None: none) as a tuple of ids below ``vocab_size``."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size for v in items):
        raise ValueError(
            f"{source}: eos_token_id must be a token id in [0, vocab_size={vocab_size}) or a list of them, got "
            f"{show(value)}"
        )
    return tuple(items)
