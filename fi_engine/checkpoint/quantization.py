"""What a checkpoint's ``quantization_config`` says, read by name (:func:`fp8_scheme`), and which of it the Llama
family serves (:func:`llama_fp8_scheme`: FP8 weights of dense models).

The FP8 layouts people serve on one H100 write it three ways (the keys as their configs spell them):

- ``quant_method: "fp8"`` (transformers' FP8 config; Qwen3-FP8, DeepSeek-V3): e4m3 weights, ``activation_scheme``
  ``"dynamic"`` (or ``"static"`` with ``input_scale`` tensors); with ``weight_block_size: [128, 128]`` one float32
  scale per 128x128 block (``*.weight_scale_inv``), without it one per tensor (``*.weight_scale``);
- ``quant_method: "compressed-tensors"`` (Llama-3.1-8B-Instruct-FP8 style): ``config_groups`` whose ``weights``
  are ``{num_bits: 8, type: "float", strategy: "channel" | "tensor"}`` (``*.weight_scale`` ``[n, 1]`` or a
  scalar), ``input_activations`` ``{dynamic: true, strategy: "token"}``, an ``ignore`` list (``lm_head``);
- ``quant_method: "fbgemm_fp8"``: per-channel ``*.weight_scale`` ``[n, 1]``, ``modules_to_not_convert``.

A value module: nothing here touches a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Fp8Scheme", "fp8_scheme", "llama_fp8_scheme"]


@dataclass(frozen=True)
class Fp8Scheme:
    """An FP8 checkpoint's layout: ``scales`` ``"tensor"``, ``"channel"`` or ``"block"`` (``block`` its
    ``(rows, columns)``), ``activations`` ``"dynamic"`` or ``"static"``, ``method`` the ``quant_method`` it came
    from."""

    method: str
    scales: Literal["tensor", "channel", "block"]
    activations: Literal["dynamic", "static"]
    block: tuple[int, int] | None = None

    def describe(self) -> str:
        """The layout in words, as the engine's refusal names it."""
        size = f" {self.block[0]}x{self.block[1]}" if self.block else ""
        return f"FP8 (e4m3) weights with per-{self.scales}{size} scales, {self.activations} activation scales"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fp8_scheme(q: Any, source: str) -> Fp8Scheme | None:
    """The :class:`Fp8Scheme` of ``quantization_config`` value ``q`` (from ``source``, named in errors), or None
    where it is not one of the FP8 layouts above. ValueError naming the key for an FP8 config that is malformed
    (a block size that is not two positive ints, an activation scheme or strategy no published layout uses)."""
    if not isinstance(q, dict):
        raise ValueError(f"{source}: quantization_config: expected an object, got {_show(q)}")
    method = q.get("quant_method")
    if method == "fp8":
        act = q.get("activation_scheme", "dynamic")
        if act not in ("dynamic", "static"):
            raise ValueError(
                f"{source}: quantization_config.activation_scheme: expected 'dynamic' or 'static', got {_show(act)}"
            )
        block = q.get("weight_block_size")
        if block is None:
            return Fp8Scheme("fp8", "tensor", act)
        if (
            not isinstance(block, list)
            or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):
            raise ValueError(
                f"{source}: quantization_config.weight_block_size: expected two positive ints (e.g. [128, 128]), "
                f"got {_show(block)}"
            )
        return Fp8Scheme("fp8", "block", act, (block[0], block[1]))
    if method == "fbgemm_fp8":
        return Fp8Scheme("fbgemm_fp8", "channel", "dynamic")
    if method == "compressed-tensors":
        groups = q.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ValueError(f"{source}: quantization_config.config_groups: expected an object of groups, got "
                             f"{_show(groups)}")  # fmt: skip
        schemes: set[tuple[Any, Any]] = set()
        for name, group in groups.items():
            weights = group.get("weights") if isinstance(group, dict) else None
            where = f"{source}: quantization_config.config_groups.{name}.weights"
            if not isinstance(weights, dict):
                raise ValueError(f"{where}: expected an object, got {_show(weights)}")
            if weights.get("num_bits") != 8 or weights.get("type") != "float":
                return None  # int8 / int4 weights: not FP8 (refused by the caller by quant_method and bits)
            strategy = weights.get("strategy")
            if strategy not in ("channel", "tensor", "block"):
                raise ValueError(f"{where}.strategy: expected 'channel', 'tensor' or 'block', got {_show(strategy)}")
            acts = group.get("input_activations") or {}
            schemes.add((strategy, "dynamic" if not isinstance(acts, dict) or acts.get("dynamic", True) else "static"))
        if len(schemes) != 1:
            raise ValueError(
                f"{source}: quantization_config.config_groups: groups of different schemes {sorted(schemes)}"
            )
        strategy, act = schemes.pop()
        return Fp8Scheme("compressed-tensors", strategy, act)
    return None


def llama_fp8_scheme(d: dict[str, Any], source: str) -> Fp8Scheme | None:
    """The FP8 layout a Llama-family config ``d`` (from ``source``) declares, which the engine serves
    (:mod:`~fi_engine.checkpoint.fp8_weights`: e4m3 projections, 16-bit embedding, norms and LM head), or None without a
    ``quantization_config``. ValueError naming the key and the way out for what it does not serve: another
    quantization, FP8 MoE checkpoints (their experts are grouped GEMMs over 16-bit weights), compressed-tensors'
    block strategy (its block size lives in each group), static activation scales are accepted and unused (the
    activations stay 16-bit)."""
    q = d.get("quantization_config")
    if q is None:
        return None
    scheme = fp8_scheme(q, source)
    if scheme is None:
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise ValueError(
            f"{source}: quantization_config (quant_method {_show(method)}) is not supported: this engine serves "
            f"float16/bfloat16 weights and FP8 (e4m3) ones; save the model in bfloat16 or float16"
        )
    moe = any(d.get(key) for key in ("num_local_experts", "num_experts", "n_routed_experts"))
    if moe:
        raise ValueError(
            f"{source}: quantization_config (quant_method {_show(scheme.method)}): {scheme.describe()} in a "
            f"mixture-of-experts model; this engine serves FP8 weights for dense models only (its expert GEMMs "
            f"read 16-bit weights). Serve a bfloat16 copy: dequantize with transformers and save_pretrained in "
            f"bfloat16, then drop quantization_config"
        )
    if scheme.scales == "block" and scheme.block is None:
        raise ValueError(
            f"{source}: quantization_config: compressed-tensors' block strategy is not served yet; its "
            f"'fp8' (weight_block_size) form is. Re-export the checkpoint with quant_method 'fp8' or in bfloat16"
        )
    return scheme
