"""What a checkpoint's ``quantization_config`` says, read by name (:func:`fp8_scheme`), and the refusal the Llama
family gives quantized checkpoints until it serves them (:func:`refuse_quantized_llama`).

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

__all__ = ["Fp8Scheme", "fp8_scheme", "refuse_quantized_llama"]


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


def refuse_quantized_llama(d: dict[str, Any], source: str) -> None:
    """Refuse a Llama-family checkpoint with a ``quantization_config``, naming what it is: the engine serves
    16-bit weights only (the grouped and dense GEMVs read bfloat16/float16). An FP8 layout is recognized and named
    (:func:`fp8_scheme`), with the way to serve it today: a 16-bit copy of the dequantized weights."""
    q = d.get("quantization_config")
    if q is None:
        return
    scheme = fp8_scheme(q, source)
    if scheme is not None:
        raise ValueError(
            f"{source}: quantization_config (quant_method {_show(scheme.method)}): {scheme.describe()}; this engine "
            f"does not serve FP8 weights yet (issue 32). Serve a bfloat16 copy: load the checkpoint with "
            f"transformers and save_pretrained(..., torch_dtype=bfloat16) after dequantizing, then drop "
            f"quantization_config"
        )
    method = q.get("quant_method") if isinstance(q, dict) else q
    raise ValueError(
        f"{source}: quantization_config (quant_method {_show(method)}) is not supported: this engine serves "
        f"float16/bfloat16 weights; save the model in bfloat16 or float16"
    )
