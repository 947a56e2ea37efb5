"""The parts of a Hugging Face ``config.json`` the engine needs, parsed and checked.

:meth:`LlamaConfig.from_dict` reads the Llama family's model types (:data:`LLAMA_MODEL_TYPES`): ``llama``;
``qwen3`` (Llama plus a per-head RMSNorm of q and k before RoPE, ``head_dim`` given explicitly); ``mixtral`` and
``qwen3_moe`` (a mixture-of-experts MLP in every layer: :class:`MoEConfig`; Qwen3-MoE with Qwen3's q/k norm).
Settings these architectures have but the engine does not implement (sliding windows, attention biases, dense
layers between MoE layers) are refused by name rather than ignored. Another family of the Llama architecture reads
its config in its own module (``fi_engine.models.<family>``): :meth:`LlamaConfig.shared` for the fields every
such family has, plus its own settings (in ``LlamaConfig.family``); which model types are served, and by which
family, is the registry's to say (``fi_engine.models.registry``), not this module's.

Both spellings of the rotary settings are read: ``rope_theta`` + ``rope_scaling`` (transformers 4.x) and
``rope_parameters`` (transformers 5.x, ``rope_theta`` inside). Supported rotary types: ``default`` (plain RoPE)
and ``llama3`` (Llama 3.1 frequency scaling); anything else is a ValueError, since silently using plain RoPE
would give wrong logits. Likewise the experts per layer: ``num_local_experts`` (Mixtral, and Qwen3-MoE from
transformers 5.x) or ``num_experts`` (Qwen3-MoE from transformers 4.x).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..values import MAX_SIZE, arg_int, model_dir_fspath, show
from .family_configs import eos_ids, rope_settings, silu_without_biases, size

__all__ = ["LLAMA_MODEL_TYPES", "LlamaConfig", "MoEConfig", "RopeConfig", "YarnRope"]

# the model types LlamaConfig.from_dict reads: the Llama family's (fi_engine.models.llama), q/k norms and experts
LLAMA_MODEL_TYPES = ("llama", "qwen3", "mixtral", "qwen3_moe")
_QK_NORM = ("qwen3", "qwen3_moe")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings.

    Attributes:
        theta: the frequency base (``rope_theta``).
        llama3: True for Llama 3.1 scaling (then the four fields below are used), False for plain RoPE.
        factor: ``rope_scale`` of the Llama 3.1 formula (low frequencies are divided by it).
        low_freq_factor, high_freq_factor: the blend band of the Llama 3.1 formula.
        original_max_position_embeddings: the pre-training context, in tokens (``old_context_len``).
    """

    theta: float = 10000.0
    llama3: bool = False
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: float = 8192.0


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts MLP of every layer.

    Attributes:
        num_experts: experts per layer (``num_local_experts``, or ``num_experts`` as transformers 4 writes
            Qwen3-MoE configs).
        top_k: experts per token (``num_experts_per_tok``).
        intermediate_size: each expert's intermediate size (Mixtral ``intermediate_size``, Qwen3-MoE
            ``moe_intermediate_size``).
        renormalize: the chosen softmax probabilities are renormalized to sum to 1 (Mixtral always; Qwen3-MoE
            ``norm_topk_prob``).
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool

    @classmethod
    def from_dict(
        cls,
        d: Any,
        source: str = "config",
        *,
        default_experts: int | None = None,
        size_key: str = "intermediate_size",
        renormalize: bool = True,
    ) -> MoEConfig:
        """The experts of config dict ``d``: ``num_local_experts`` or ``num_experts`` (absent: ``default_experts``,
        None: refused), ``num_experts_per_tok`` (at most the experts), each expert's intermediate size under
        ``size_key``; ``renormalize`` as the family does. ValueError names the key."""
        _check_dict(d, source)
        if default_experts is not None:
            default_experts = arg_int("default_experts", default_experts, 1, MAX_SIZE)
        if size_key not in ("intermediate_size", "moe_intermediate_size"):  # the keys transformers' configs use
            raise ValueError(f"size_key: expected 'intermediate_size' or 'moe_intermediate_size', got {show(size_key)}")
        if not isinstance(renormalize, bool):
            raise TypeError(f"renormalize: expected True or False, got {type(renormalize).__name__}")
        experts = _num_experts(d, source, default_experts)
        return cls(experts, _topk(d, experts, source), size(d, size_key, source), renormalize)


@dataclass(frozen=True)
class LlamaConfig:
    """A Llama-architecture decoder's shape and settings (see :meth:`from_dict` for the keys read)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    model_type: str = "llama"
    qk_norm: bool = False  # Qwen3: RMSNorm of each q and k head (weights [head_dim]) before RoPE
    moe: MoEConfig | None = None  # Mixtral, Qwen3-MoE, gpt-oss: the MLP of every layer
    family: Any = None  # a family's own settings (e.g. fi_engine.models.gemma2.Gemma2Settings); None for Llama's
    fp8: Any = (
        None  # the checkpoint's FP8 weight layout (fi_engine.checkpoint.quantization.Fp8Scheme); None: 16-bit weights
    )
    int4: Any = None  # the AWQ/GPTQ int4 layout (fi_engine.checkpoint.quantization.Int4Scheme), dequantized at load

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> LlamaConfig:
        """Read ``model_dir/config.json``."""
        data, path = read_config_json(model_dir)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> LlamaConfig:
        """Parse a config dict of the Llama family (:data:`LLAMA_MODEL_TYPES`; ``model_type`` absent: ``llama``).
        Keys: ``vocab_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
        ``num_attention_heads``, ``num_key_value_heads`` (default: the attention heads), ``head_dim`` (default
        ``hidden_size / num_attention_heads``), ``rms_norm_eps``, the rotary keys (module docstring),
        ``tie_word_embeddings`` (default False, as transformers), ``max_position_embeddings``, ``eos_token_id``
        (int, list or absent); the experts' keys (:class:`MoEConfig`) and ``quantization_config`` (FP8 layouts in
        ``fp8``, AWQ/GPTQ int4 ones in ``int4``)."""
        _check_dict(d, source)
        model_type = d.get("model_type", "llama")
        if model_type not in LLAMA_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {show(model_type)} is not a Llama-family type (LlamaConfig reads "
                f"{', '.join(repr(t) for t in LLAMA_MODEL_TYPES)}); the engine's other families read their own "
                f"configs: fi_engine.models.registry.read_config picks the reader and names every model_type served"
            )
        from .quantization import llama_fp8_scheme, llama_int4_scheme

        int4 = llama_int4_scheme(d, source)
        fp8 = None if int4 is not None else llama_fp8_scheme(d, source)
        if d.get("use_sliding_window", False) or (model_type == "mixtral" and d.get("sliding_window") is not None):
            raise ValueError(
                f"{source}: sliding-window attention (use_sliding_window / sliding_window) is not supported by this "
                f"engine; every layer attends to the whole context"
            )
        silu_without_biases(d, source, "Llama", repr)
        shared = cls.shared(d, source, moe=_moe(d, model_type, source))
        return dataclasses.replace(shared, qk_norm=model_type in _QK_NORM, fp8=fp8, int4=int4)

    @classmethod
    def shared(
        cls, d: Any, source: str = "config", *, moe: MoEConfig | None = None, rope: RopeConfig | None = None
    ) -> LlamaConfig:
        """The fields every Llama-architecture family shares, read from config dict ``d`` (the keys of
        :meth:`from_dict` but the experts' and ``quantization_config``; ``model_type`` as given, default
        ``llama``), with none of the Llama family's refusals: a family's own reader (in its module
        ``fi_engine.models.<family>``) builds on it, checks its own settings, and keeps them in ``family``
        (``dataclasses.replace``). ``moe``: the family's experts (None: a dense MLP); ``rope``: the family's
        rotary settings (None: read here, plain or Llama 3.1). ValueError names the key."""
        _check_dict(d, source)
        if moe is not None and not isinstance(moe, MoEConfig):
            raise TypeError(f"moe: expected a MoEConfig or None, got {type(moe).__name__}")
        if rope is not None and not isinstance(rope, RopeConfig):
            raise TypeError(f"rope: expected a RopeConfig or None, got {type(rope).__name__}")
        model_type = d.get("model_type", "llama")
        if not isinstance(model_type, str):
            raise ValueError(f"{source}: model_type must be a string, got {show(model_type)}")
        hidden = size(d, "hidden_size", source)
        heads = size(d, "num_attention_heads", source)
        kv_heads = size(d, "num_key_value_heads", source, heads)
        if heads % kv_heads:
            raise ValueError(
                f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        if d.get("head_dim") is None and hidden % heads:
            raise ValueError(
                f"{source}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) "
                f"and no head_dim is given"
            )
        head_dim = size(d, "head_dim", source, hidden // heads)
        eps = _positive(d, "rms_norm_eps", source, 1e-6, what="rms_norm_eps")
        tie = d.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ValueError(f"{source}: tie_word_embeddings must be true or false, got {tie!r}")
        return cls(
            model_type=model_type,
            moe=moe,
            vocab_size=size(d, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=size(d, "intermediate_size", source),
            num_layers=size(d, "num_hidden_layers", source),
            num_qo_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(eps),
            rope=_rope(d, source) if rope is None else rope,
            tie_word_embeddings=tie,
            max_position_embeddings=size(d, "max_position_embeddings", source, 2048),
            eos_token_ids=eos_ids(d.get("eos_token_id"), size(d, "vocab_size", source), source),
        )


def _check_dict(d: Any, source: Any) -> None:
    if not isinstance(source, str):
        raise TypeError(f"source: expected a str naming where the config came from, got {type(source).__name__}")
    if not isinstance(d, dict):
        raise ValueError(f"d: expected a JSON object (a dict) from {source}, got {type(d).__name__}")


def _moe(d: dict[str, Any], model_type: str, source: str) -> MoEConfig | None:
    if model_type == "mixtral":
        return MoEConfig.from_dict(d, source, default_experts=8)
    if model_type != "qwen3_moe":
        return None
    if size(d, "decoder_sparse_step", source, 1) != 1 or d.get("mlp_only_layers"):
        raise ValueError(
            f"{source}: dense MLP layers between the MoE layers (decoder_sparse_step > 1 or mlp_only_layers) are "
            f"not supported; every layer must be a MoE layer"
        )
    if d.get("shared_expert_intermediate_size"):
        raise ValueError(f"{source}: shared experts are not supported (shared_expert_intermediate_size)")
    renorm = d.get("norm_topk_prob", False)
    if not isinstance(renorm, bool):
        raise ValueError(f"{source}: norm_topk_prob must be true or false, got {renorm!r}")
    return MoEConfig.from_dict(d, source, size_key="moe_intermediate_size", renormalize=renorm)


def _num_experts(d: dict[str, Any], source: str, default: int | None = None) -> int:
    """The experts per layer under either name transformers writes: ``num_local_experts`` (Mixtral; Qwen3-MoE from
    transformers 5, whose config stores ``num_experts`` under that name) or ``num_experts`` (Qwen3-MoE from
    transformers 4)."""
    present = [key for key in ("num_local_experts", "num_experts") if d.get(key) is not None]
    if not present:
        if default is None:
            raise ValueError(f"{source}: missing 'num_local_experts' or 'num_experts' (experts per layer)")
        return default
    values = {key: size(d, key, source) for key in present}
    if len(set(values.values())) > 1:
        raise ValueError(
            f"{source}: num_local_experts ({values['num_local_experts']}) and num_experts ({values['num_experts']}) "
            f"disagree; keep one of them"
        )
    return values[present[0]]


def _topk(d: dict[str, Any], experts: int, source: str) -> int:
    k = size(d, "num_experts_per_tok", source)
    if k > experts:
        raise ValueError(f"{source}: num_experts_per_tok ({k}) exceeds the {experts} experts")
    return k


def _positive(params: dict[str, Any], key: str, source: str, default: float | None = None, *, what: str = "") -> float:
    """``params[key]`` as a finite float > 0 (a float64 holds it)."""
    value = params.get(key, default)
    name = what or f"rope {key}"
    number = math.nan
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an int past float64
            number = math.inf
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(f"{source}: {name} must be a finite number > 0, got {show(value)}")
    return number


def _rope(d: dict[str, Any], source: str) -> RopeConfig:
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{source}: {name} must be an object or null, got {value!r}")
    merged = rope_settings(d)  # both checked above; rope_parameters (transformers 5.x) overrides rope_scaling
    kind = merged.get("rope_type", merged.get("type", "default"))
    theta = _positive(merged, "rope_theta", source, 10000.0, what="rope_theta")
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "llama3":
        factor = _positive(merged, "factor", source)
        low = _positive(merged, "low_freq_factor", source)
        high = _positive(merged, "high_freq_factor", source)
        if high <= low:
            raise ValueError(f"{source}: rope high_freq_factor ({high}) must exceed low_freq_factor ({low})")
        old = _positive(merged, "original_max_position_embeddings", source)
        return RopeConfig(
            theta=theta,
            llama3=True,
            factor=factor,
            low_freq_factor=low,
            high_freq_factor=high,
            original_max_position_embeddings=old,
        )
    raise ValueError(
        f"{source}: rope type {kind!r} is not supported; supported: 'default' (no scaling) and "
        f"'llama3' (Llama 3.1 scaling)"
    )


def yarn_ramp(
    dim: int, base: float, original_max_positions: float, beta_fast: float, beta_slow: float, truncate: bool
) -> tuple[float, float]:
    """YaRN's correction range over the ``dim / 2`` rotary frequencies (``base ** (-2j / dim)``): ``(low, high)``,
    the indices where a frequency turns ``beta_fast`` and ``beta_slow`` times over ``original_max_positions``
    tokens (floored and ceiled when ``truncate``), clamped to ``[0, dim - 1]`` and never of zero width; the
    inverse frequencies blend linearly between the plain ones below ``low`` and the interpolated ones above
    ``high`` (transformers' ``_compute_yarn_parameters``)."""

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max_positions / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    return low, high


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude scale for a context stretched ``factor`` times: ``0.1 * mscale * ln(factor) + 1`` (1.0 for
    ``factor <= 1``; transformers' ``get_mscale``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class YarnRope:
    """YaRN rotary scaling (transformers' ``rope_type="yarn"``), as the families that use it read it (gpt-oss,
    DeepSeek); see :meth:`inv_freq` for the formula. ``mscale``, ``mscale_all_dim``: None or 0.0 where the config
    gives none (both off)."""

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
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def inv_freq(self, theta: float, dim: int) -> Any:
        """float32 ``[dim / 2]`` inverse frequencies: the plain ones (``theta ** (-2j / dim)``) where a frequency
        turns fewer than ``beta_slow`` times over the original context, those divided by ``factor`` where it turns
        more than ``beta_fast`` times, and a linear blend between (the correction range, floored/ceiled when
        ``truncate``). gpt-oss's cos/sin cache reads these; DeepSeek's computes its own in float64."""
        import numpy as np

        low, high = yarn_ramp(
            dim, theta, self.original_max_position_embeddings, self.beta_fast, self.beta_slow, self.truncate
        )
        pos = (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
        extrapolation, interpolation = 1.0 / pos, 1.0 / (np.float32(self.factor) * pos)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
        keep = 1 - ramp  # 1: the plain frequency (extrapolate), 0: divided by factor (interpolate)
        return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def read_config_json(model_dir: Any) -> tuple[Any, Path]:
    """The parsed ``model_dir/config.json`` and its path; TypeError/ValueError naming ``model_dir`` (a path that
    is not one, a NUL byte, a missing or unreadable file, JSON too deep or with a number past the digit limit)."""
    model_dir_fspath(model_dir)
    path = Path(model_dir) / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(
            f"model_dir: {path} does not exist; pass a Hugging Face checkpoint directory (config.json + *.safetensors)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"model_dir: cannot read {path}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer past Python's digit limit
        raise ValueError(f"model_dir: {path} is not valid JSON or holds a number no config needs ({exc})") from None
    except RecursionError:
        raise ValueError(
            f"model_dir: {path} nests its JSON too deeply to parse; a config.json is a flat object of settings"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"model_dir: {path} holds a JSON {type(data).__name__}; a config.json is an object of settings"
        )
    return data, path
