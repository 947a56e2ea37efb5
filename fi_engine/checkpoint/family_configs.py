"""The family-specific settings of Gemma 2 (``gemma2``) and gpt-oss (``gpt_oss``) checkpoints, parsed and checked.

:class:`~fi_engine.checkpoint.config.LlamaConfig` reads what these share with Llama (sizes, heads, norms' epsilon,
rotary
base, embedding tying) and keeps what differs in its ``family`` field: a :class:`Gemma2Settings` or a
:class:`GptOssSettings`. Keys are transformers' (``Gemma2Config``, ``GptOssConfig``); a key absent from
``config.json`` takes that class's default, since ``save_pretrained`` leaves out values equal to the defaults.

Layer types: ``layer_types`` (a list of ``"sliding_attention"`` / ``"full_attention"``, one per layer) when the
config has it, else both families' built-in pattern: even layers (0, 2, ...) slide, odd layers attend to the whole
context. A sliding layer attends to the last ``sliding_window`` tokens, the query's own included (transformers'
mask keeps key ``j`` for query ``i`` when ``i - sliding_window < j <= i``), which is FlashInfer's
``window_left = sliding_window - 1``.

Refused by name (ValueError naming the key): quantized checkpoints (``quantization_config``: the published gpt-oss
checkpoints store their experts in MXFP4; the message says how to get a bfloat16 copy), activations other than
each family's, gpt-oss without attention biases, and rotary types other than ``default`` (Gemma 2) or
``default``/``yarn`` (gpt-oss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..values import arg_int, show

__all__ = ["Gemma2Settings", "GptOssSettings", "YarnRope", "gemma2_settings", "gpt_oss_settings", "layer_windows"]

SLIDING, FULL = "sliding_attention", "full_attention"
MXFP4_HELP = (
    "this engine serves bfloat16 gpt-oss weights only; make a bfloat16 copy once with transformers: "
    "GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True), "
    "torch_dtype=torch.bfloat16).save_pretrained(out_dir), then load out_dir"
)


@dataclass(frozen=True)
class YarnRope:
    """YaRN rotary scaling (transformers' ``rope_type="yarn"``); see :meth:`inv_freq` for the formula."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None

    def scale(self) -> float:
        """The factor cos and sin are multiplied by (transformers' ``attention_factor``)."""
        if self.attention_factor is not None:
            return self.attention_factor

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)
        return get_mscale(self.factor)

    def inv_freq(self, theta: float, dim: int) -> Any:
        """float32 ``[dim / 2]`` inverse frequencies: the plain ones (``theta ** (-2j / dim)``) where a frequency
        turns fewer than ``beta_slow`` times over the original context, those divided by ``factor`` where it turns
        more than ``beta_fast`` times, and a linear blend between (the correction range, floored/ceiled when
        ``truncate``)."""
        import numpy as np

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
                2 * math.log(theta)
            )

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        pos = (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
        extrapolation, interpolation = 1.0 / pos, 1.0 / (np.float32(self.factor) * pos)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
        keep = 1 - ramp  # 1: the plain frequency (extrapolate), 0: divided by factor (interpolate)
        return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


@dataclass(frozen=True)
class Gemma2Settings:
    """Gemma 2: ``sm_scale = query_pre_attn_scalar ** -0.5``; soft caps (0: off) of the attention logits and of the
    final logits (``cap * tanh(x / cap)``); ``windows[i]`` is layer ``i``'s ``window_left`` (-1: whole context)."""

    query_pre_attn_scalar: float
    attn_logit_softcapping: float
    final_logit_softcapping: float
    sliding_window: int
    windows: tuple[int, ...]


@dataclass(frozen=True)
class GptOssSettings:
    """gpt-oss: ``windows[i]`` as in :class:`Gemma2Settings`; ``yarn``: the rotary scaling (None: plain RoPE);
    ``swiglu_limit``: the clamp of the experts' gate and up values; ``alpha``: the gate's sigmoid slope (1.702,
    fixed in transformers)."""

    sliding_window: int
    windows: tuple[int, ...]
    yarn: YarnRope | None
    swiglu_limit: float
    alpha: float = 1.702


def _number(d: dict[str, Any], key: str, source: str, default: float | None, allow_zero: bool = False) -> float:
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


def _positive_int(d: dict[str, Any], key: str, source: str, default: int) -> int:
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
    num_layers = arg_int("num_layers", num_layers, 1, 1 << 20)
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


def _flag(d: dict[str, Any], key: str, source: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{source}: {key} must be true or false, got {show(value)}")
    return value


def _check_dict(d: Any, source: Any) -> None:
    if not isinstance(source, str):
        raise TypeError(f"source: expected a str naming where the config came from, got {type(source).__name__}")
    if not isinstance(d, dict):
        raise TypeError(f"d: expected the config.json object (a dict) from {source}, got {type(d).__name__}")


def refuse_quantized(d: dict[str, Any], source: str) -> None:
    q = d.get("quantization_config")
    if q is None:
        return
    method = q.get("quant_method") if isinstance(q, dict) else q
    extra = f"; {MXFP4_HELP}" if d.get("model_type") == "gpt_oss" else "; save the model in bfloat16 or float16"
    raise ValueError(f"{source}: quantization_config (quant_method {show(method)}) is not supported{extra}")


def gemma2_settings(d: dict[str, Any], num_layers: int, source: str) -> Gemma2Settings:
    """Gemma 2's settings (defaults: ``Gemma2Config``'s)."""
    _check_dict(d, source)
    refuse_quantized(d, source)
    act = d.get("hidden_activation", d.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"{source}: hidden_activation {show(act)} is not supported (Gemma 2 uses 'gelu_pytorch_tanh')")
    if _flag(d, "attention_bias", source, False):
        raise ValueError(f"{source}: attention_bias=true is not supported (Gemma 2 projections have no bias)")
    window = _positive_int(d, "sliding_window", source, 4096)
    return Gemma2Settings(
        query_pre_attn_scalar=_number(d, "query_pre_attn_scalar", source, 256),
        attn_logit_softcapping=_number(d, "attn_logit_softcapping", source, 50.0, allow_zero=True),
        final_logit_softcapping=_number(d, "final_logit_softcapping", source, 30.0, allow_zero=True),
        sliding_window=window,
        windows=layer_windows(d, num_layers, window, source),
    )


def gpt_oss_settings(d: dict[str, Any], num_layers: int, source: str) -> GptOssSettings:
    """gpt-oss's settings (defaults: ``GptOssConfig``'s)."""
    _check_dict(d, source)
    refuse_quantized(d, source)
    if not _flag(d, "attention_bias", source, True):
        raise ValueError(f"{source}: attention_bias=false is not supported (gpt-oss projections carry biases)")
    window = _positive_int(d, "sliding_window", source, 128)
    return GptOssSettings(
        sliding_window=window,
        windows=layer_windows(d, num_layers, window, source),
        yarn=yarn(d, source),
        swiglu_limit=_number(d, "swiglu_limit", source, 7.0),
    )


def rope_settings(d: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings under either spelling (``rope_scaling`` + ``rope_theta``, or ``rope_parameters``)."""
    merged: dict[str, Any] = {}
    if "rope_theta" in d:
        merged["rope_theta"] = d["rope_theta"]
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(d.get(key), dict):
            merged.update(d[key])
    return merged


def yarn(d: dict[str, Any], source: str) -> YarnRope | None:
    """The YaRN settings of a gpt-oss config; None for plain RoPE."""
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ValueError(f"{source}: {key} must be an object or null, got {show(d[key])}")
    r = rope_settings(d)
    kind = r.get("rope_type", r.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(
            f"{source}: rope_type (or type) {show(kind)} is not supported for gpt_oss; supported: 'default', 'yarn'"
        )
    optional = {k: _number(r, k, source, None) for k in ("attention_factor", "mscale", "mscale_all_dim") if r.get(k)}
    truncate = r.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ValueError(f"{source}: rope truncate must be true or false, got {show(truncate)}")
    original = r.get("original_max_position_embeddings")
    if original is None:
        original = d.get("max_position_embeddings", 4096)
    return YarnRope(
        factor=_number(r, "factor", source, None),
        original_max_position_embeddings=_positive_int(
            {"original_max_position_embeddings": original}, "original_max_position_embeddings", source, 4096
        ),
        beta_fast=_number(r, "beta_fast", source, 32.0),
        beta_slow=_number(r, "beta_slow", source, 1.0),
        truncate=truncate,
        **optional,
    )
