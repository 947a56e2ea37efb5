"""What a checkpoint's ``quantization_config`` says, read by name (:func:`fp8_scheme`, :func:`int4_scheme`), and
which of it the Llama architecture serves (:func:`llama_fp8_scheme`, :func:`llama_int4_scheme`: FP8 weights of dense
and mixture-of-experts models, the experts read as stored by the FP8 grouped GEMV where it takes their scale blocks,
else dequantized to 16-bit at load; int4 weights of dense models), and :func:`served_fp8_scheme`, the FP8 layouts a
family's own scheme builds on (DeepSeek's: ``fi_engine.models.deepseek_config.deepseek_fp8_scheme``).

The FP8 layouts people serve on one H100 write it three ways (the keys as their configs spell them):

- ``quant_method: "fp8"`` (transformers' FP8 config; Qwen3-FP8, DeepSeek-V3): e4m3 weights, ``activation_scheme``
  ``"dynamic"`` (or ``"static"`` with ``input_scale`` tensors); with ``weight_block_size: [128, 128]`` one float32
  scale per 128x128 block (``*.weight_scale_inv``), without it one per tensor (``*.weight_scale``);
- ``quant_method: "compressed-tensors"`` (Llama-3.1-8B-Instruct-FP8 style): ``config_groups`` whose ``weights``
  are ``{num_bits: 8, type: "float", strategy: "channel" | "tensor"}`` (``*.weight_scale`` ``[n, 1]`` or a
  scalar), ``input_activations`` ``{dynamic: true, strategy: "token"}``, an ``ignore`` list (``lm_head``);
- ``quant_method: "fbgemm_fp8"``: per-channel ``*.weight_scale`` ``[n, 1]``, ``modules_to_not_convert``.

The int4 layouts (4-bit integers with a float16 scale and a 4-bit zero per group of ``group_size`` inputs of each
output column; :mod:`~fi_engine.checkpoint.int4_weights` reads their tensors):

- ``quant_method: "awq"`` (AutoAWQ, and GPTQModel's AWQ export): ``bits`` (or ``w_bit``) 4, ``group_size`` (or
  ``q_group_size``), ``zero_point: true``, ``version: "gemm"`` (AWQ's GEMM packing; ``gemv``, ``gemv_fast``,
  ``exllama``, ``ipex`` and ``marlin`` pack otherwise), ``modules_to_not_convert`` (modules left 16-bit);
- ``quant_method: "gptq"`` (AutoGPTQ, GPTQModel, transformers' GPTQConfig): ``bits`` 4, ``group_size`` (-1: one group
  over all the inputs), ``desc_act`` (act-order: the inputs quantized in another order; their groups, ``g_idx``, stay
  ``i // group_size`` only with ``static_groups: true``), ``sym``, ``checkpoint_format``
  (GPTQModel also writes it as ``format``): ``"gptq"`` (or absent: AutoGPTQ's v1 layout, which stores every zero
  minus one) or ``"gptq_v2"`` (the zeros as they are), ``lm_head`` (the LM head quantized too), ``dynamic``
  (per-module overrides), ``pack_dtype`` (the packing integer, ``"int32"``).

A value module: nothing here touches a GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..moved import old_name

__all__ = [
    "Fp8Scheme",
    "Int4Scheme",
    "fp8_scheme",
    "grouped_gemv_block",
    "int4_scheme",
    "llama_fp8_scheme",
    "llama_int4_scheme",
]


def grouped_gemv_block(block: object) -> bool:
    """Whether the FP8 grouped GEMV (:mod:`~fi_engine.kernels.fp8_moe_gemv`) takes scales of layout ``block``: None
    (per row or tensor), or ``(rows, columns)`` of positive ints, rows a multiple of 16 and columns a power of two
    >= 128 (the published 128x128)."""
    if block is None:
        return True
    if block.__class__ is not tuple or len(block) != 2 or any(b.__class__ is not int or b <= 0 for b in block):
        return False
    rows, columns = block
    return rows % 16 == 0 and columns >= 128 and columns & (columns - 1) == 0


@dataclass(frozen=True)
class Fp8Scheme:
    """An FP8 checkpoint's layout: ``scales`` ``"tensor"``, ``"channel"`` or ``"block"`` (``block`` its
    ``(rows, columns)``), ``activations`` ``"dynamic"`` or ``"static"``, ``method`` the ``quant_method`` it came
    from; ``dequantized`` names the weights the engine dequantizes to the model's 16-bit type as it reads them
    (``"experts"`` for a mixture-of-experts model whose scale blocks the FP8 grouped GEMV does not take; for
    DeepSeek, ``"MLA, dense-MLP and shared-expert projections"`` beside its routed experts kept e4m3, or ``"every
    projection"``), ``""`` where every projection stays e4m3 on the GPU; ``stored_experts``: a mixture-of-experts
    model's (routed) experts stay e4m3 too, read as stored by the FP8 grouped GEMV
    (:mod:`~fi_engine.kernels.fp8_moe_gemv`); ``dequantized_with_experts``: what ``dequantized`` becomes where the
    experts are dequantized at load too (:meth:`experts_dequantized`)."""

    method: str
    scales: Literal["tensor", "channel", "block"]
    activations: Literal["dynamic", "static"]
    block: tuple[int, int] | None = None
    dequantized: str = ""
    stored_experts: bool = False
    dequantized_with_experts: str = "experts"

    def describe(self) -> str:
        """The layout in words, as the start-up line and the engine's refusals name it."""
        size = f" {self.block[0]}x{self.block[1]}" if self.block else ""
        words = f"FP8 (e4m3) weights with per-{self.scales}{size} scales, {self.activations} activation scales"
        if self.stored_experts:
            words += " (experts read as stored by the FP8 grouped GEMV)"
        return words + (f" ({self.dequantized} dequantized to 16-bit at load)" if self.dequantized else "")

    def grouped_gemv_takes(self) -> bool:
        """Whether the FP8 grouped GEMV takes experts of these scales: per row or tensor, or blocks of a multiple
        of 16 rows by a power of two >= 128 columns (the published 128x128)."""
        return grouped_gemv_block(self.block)

    def experts_for(self, hidden: int, intermediate: int, ranks: int = 1) -> Fp8Scheme:
        """This scheme as it serves a mixture-of-experts model whose experts are ``hidden`` by ``intermediate``
        (the whole model's), split ``ranks`` ways by intermediate columns: itself where the FP8 grouped GEMV reads
        each rank's share as stored, else with those experts dequantized at load (``stored_experts`` False,
        ``dequantized`` ``"experts"``). The GEMV reads 16 codes at a time (hidden and the share multiples of 16),
        its blocks of scales must be whole in every expert's gate, up and down (the share and hidden multiples of
        the block's rows), and a share that starts inside a block of scale columns would cut one (with ``ranks``
        > 1, the share a multiple of the block's columns)."""
        if not self.stored_experts:
            return self
        share = intermediate // ranks
        fits = hidden % 16 == 0 and share % 16 == 0
        if self.block is not None:
            bn, bk = self.block
            fits = fits and share % bn == 0 and hidden % bn == 0 and (ranks == 1 or share % bk == 0)
        return self if fits else self.experts_dequantized()

    def experts_dequantized(self) -> Fp8Scheme:
        """This scheme with a mixture-of-experts model's experts dequantized to the 16-bit type at load as well
        (shapes the FP8 grouped GEMV cannot read, or the engine's switch
        :attr:`~fi_engine.runtime.worker.model_runner.ModelRunner.fp8_experts_as_stored` off): ``stored_experts``
        False, ``dequantized`` ``dequantized_with_experts``; itself where the experts are not kept e4m3."""
        if not self.stored_experts:
            return self
        return dataclasses.replace(self, stored_experts=False, dequantized=self.dequantized_with_experts)

    def shard_refusal(
        self, stacks: Sequence[Sequence[tuple[str, int]]], row_parallel: Sequence[tuple[str, int]], ranks: int
    ) -> str | None:
        """Why projections kept e4m3 cannot be split ``ranks`` ways (1: one GPU), or None where they can.
        ``stacks``: the projections cut by output rows, as ``(name, rows)`` in the order each stack holds them
        (``[q, k, v]``, ``[gate, up]``); ``row_parallel``: ``(name, columns)`` of those cut by input columns (o,
        down). A rank's rows must be whole blocks of scale rows -- on one GPU too, for a projection stacked before
        another; with ``ranks`` > 1, a rank's columns whole blocks of scale columns and a multiple of 16 (the FP8
        GEMV reads 16 codes at a time)."""
        for stack in stacks:
            for place, (name, rows) in enumerate(stack):
                share, last = rows // ranks, place == len(stack) - 1
                if self.block is None or share % self.block[0] == 0:
                    continue
                if ranks > 1:
                    return (f"{name}: a {ranks}-way shard of its {rows} rows ({share}) cuts a block of "
                            f"{self.block[0]} rows that share one scale")  # fmt: skip
                if not last:
                    return (f"{name}: its {rows} rows end inside a block of {self.block[0]} rows that share one "
                            f"scale, so it cannot be stacked with the projection after it")  # fmt: skip
        if ranks == 1:
            return None
        for name, columns in row_parallel:
            share = columns // ranks
            if share % 16:
                return (f"{name}: a {ranks}-way shard of its {columns} columns ({share}) is not a multiple of 16 (the "
                        f"FP8 GEMV reads 16 codes at a time)")  # fmt: skip
            if self.block is not None and share % self.block[1]:
                return (f"{name}: a {ranks}-way shard of its {columns} columns ({share}) cuts a block of "
                        f"{self.block[1]} columns that share one scale")  # fmt: skip
        return None


@dataclass(frozen=True)
class Int4Scheme:
    """An AWQ or GPTQ int4 checkpoint's layout: ``method`` ``"awq"`` or ``"gptq"`` (its ``quant_method``),
    ``group_size`` the inputs sharing a scale and a zero (-1: all of them, one group), ``zero_offset`` what is added
    to every stored zero (1 for GPTQ's v1 layout, which stores each zero minus one; 0 for AWQ and ``gptq_v2``),
    ``modules_to_not_convert`` (AWQ's list of modules left 16-bit, as the config names them)."""

    method: Literal["awq", "gptq"]
    group_size: int
    zero_offset: int = 0
    modules_to_not_convert: tuple[str, ...] = ()

    def describe(self) -> str:
        """The layout in words, as the start-up line and the refusals name it."""
        name = "AWQ" if self.method == "awq" else "GPTQ" if self.zero_offset else "GPTQ v2"
        groups = "one group per column" if self.group_size == -1 else f"groups of {self.group_size}"
        return f"{name} int4 weights ({groups}), read as stored by the int4 GEMV"


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


_BF16_WAY_OUT = (  # the way out of every int4 refusal
    "serve a bfloat16 copy (dequantize with transformers, save_pretrained in bfloat16, drop quantization_config)"
)
_GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> the offset of the stored zeros


def _key(q: dict[str, Any], keys: tuple[str, ...], default: Any) -> tuple[str, Any]:
    """The first of ``keys`` that ``q`` holds and its value (none: the first key and ``default``)."""
    for key in keys:
        if key in q:
            return key, q[key]
    return keys[0], default


def int4_scheme(q: Any, source: str) -> Int4Scheme | None:
    """The :class:`Int4Scheme` of ``quantization_config`` value ``q`` (from ``source``, named in errors), or None
    where its ``quant_method`` is neither ``"awq"`` nor ``"gptq"``. ValueError naming the key and the way out for
    what the engine does not read (the module docstring's keys): ``bits`` other than 4, a ``group_size`` that is
    neither a positive int nor -1, AWQ packed other than ``version: "gemm"`` or without zero points, GPTQ with
    ``desc_act: true`` without ``static_groups: true`` (act-order groups), a ``checkpoint_format`` other than
    ``"gptq"`` / ``"gptq_v2"``, per-module ``dynamic`` overrides, a ``pack_dtype`` other than int32; and a malformed
    value."""
    if not isinstance(q, dict):
        raise ValueError(f"{source}: quantization_config: expected an object, got {_show(q)}")
    method = q.get("quant_method")
    if method not in ("awq", "gptq"):
        return None
    where = f"{source}: quantization_config"
    key, bits = _key(q, ("bits", "w_bit"), None)
    if type(bits) is not int or bits != 4:
        raise ValueError(
            f"{where}.{key}: {_show(bits)}; this engine serves {method.upper()} checkpoints of 4-bit weights only; "
            f"use a 4-bit ({method.upper()}-Int4) checkpoint or {_BF16_WAY_OUT}"
        )
    key, group = _key(q, ("group_size", "q_group_size"), None)
    if isinstance(group, bool) or not isinstance(group, int) or not (group > 0 or group == -1) or group >= 1 << 31:
        raise ValueError(f"{where}.{key}: expected a positive int (e.g. 128) or -1 (one group), got {_show(group)}")
    if method == "awq":
        key, version = _key(q, ("version", "format"), "gemm")
        if not isinstance(version, str) or version.lower() != "gemm":
            raise ValueError(
                f"{where}.{key}: {_show(version)}; this engine reads AWQ's GEMM packing (version 'gemm') only; "
                f"re-quantize with AutoAWQ's version='gemm' or {_BF16_WAY_OUT}"
            )
        zero_point = q.get("zero_point", True)
        if zero_point is not True:
            raise ValueError(
                f"{where}.zero_point: {_show(zero_point)}; AWQ's GEMM layout has a zero point per group "
                f"(zero_point: true); re-quantize with zero_point=True or {_BF16_WAY_OUT}"
            )
        skip = q.get("modules_to_not_convert")
        if skip is None:
            skip = []
        if not isinstance(skip, list) or not all(isinstance(m, str) and m for m in skip):
            raise ValueError(f"{where}.modules_to_not_convert: expected null or a list of module names, got "
                             f"{_show(skip)}")  # fmt: skip
        return Int4Scheme("awq", group, 0, tuple(skip))
    desc_act, static = q.get("desc_act", False), q.get("static_groups", False)
    if not isinstance(desc_act, bool) or not isinstance(static, bool):
        key, value = ("desc_act", desc_act) if not isinstance(desc_act, bool) else ("static_groups", static)
        raise ValueError(f"{where}.{key}: expected true or false, got {_show(value)}")
    if desc_act and not static:  # static groups keep input i in group i // group_size whatever the order
        raise ValueError(
            f"{where}.desc_act: true (without static_groups); act-order GPTQ checkpoints (each input's group "
            f"given by g_idx) are not served; use a checkpoint quantized with desc_act=False (or static_groups=True) "
            f"or {_BF16_WAY_OUT}"
        )
    if q.get("is_marlin_format"):
        raise ValueError(f"{where}.is_marlin_format: true; Marlin-packed GPTQ is not served; {_BF16_WAY_OUT}")
    key, fmt = _key(q, ("checkpoint_format", "format"), "gptq")
    if not isinstance(fmt, str) or fmt not in _GPTQ_FORMATS:
        raise ValueError(
            f"{where}.{key}: {_show(fmt)}; this engine reads the 'gptq' and 'gptq_v2' layouts; re-save the model "
            f"with GPTQModel's format='gptq' or {_BF16_WAY_OUT}"
        )
    sym = q.get("sym", True)
    if not isinstance(sym, bool):
        raise ValueError(f"{where}.sym: expected true or false, got {_show(sym)}")
    if q.get("dynamic"):
        raise ValueError(
            f"{where}.dynamic: {_show(q['dynamic'])}; per-module overrides of the quantization are not served; "
            f"re-quantize without them or {_BF16_WAY_OUT}"
        )
    pack = q.get("pack_dtype", "int32")
    if pack != "int32":
        raise ValueError(
            f"{where}.pack_dtype: {_show(pack)}; this engine reads int4 packed eight to an int32; re-save the model "
            f"with GPTQModel's pack_dtype=torch.int32 or {_BF16_WAY_OUT}"
        )
    return Int4Scheme("gptq", group, _GPTQ_FORMATS[fmt])


def _is_moe(d: dict[str, Any]) -> bool:
    return any(d.get(key) for key in ("num_local_experts", "num_experts", "n_routed_experts"))


def llama_int4_scheme(d: dict[str, Any], source: str) -> Int4Scheme | None:
    """The AWQ or GPTQ int4 layout a Llama-family config ``d`` (from ``source``) declares, which the engine serves
    for dense models by dequantizing the weights to the embedding's 16-bit type as it reads them
    (:mod:`~fi_engine.checkpoint.int4_weights`), or None (no ``quantization_config``, or another method: the FP8
    reader's to serve or refuse). ValueError naming the key and the way out: :func:`int4_scheme`'s refusals, and int4
    mixture-of-experts checkpoints (their experts are read as 16-bit tensors)."""
    q = d.get("quantization_config")
    if q is None:
        return None
    scheme = int4_scheme(q, source)
    if scheme is not None and _is_moe(d):
        raise ValueError(
            f"{source}: quantization_config (quant_method {_show(scheme.method)}): {scheme.describe()} in a "
            f"mixture-of-experts model; this engine serves int4 weights for dense models only; {_BF16_WAY_OUT}"
        )
    return scheme


def served_fp8_scheme(d: dict[str, Any], source: str, served: str) -> Fp8Scheme | None:
    """The FP8 layout of config ``d``'s ``quantization_config`` (None without one); ValueError naming the key for
    another quantization (``served``: what the family serves, in words) and for compressed-tensors' block strategy."""
    q = d.get("quantization_config")
    if q is None:
        return None
    scheme = fp8_scheme(q, source)
    if scheme is None:
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise ValueError(
            f"{source}: quantization_config (quant_method {_show(method)}) is not supported: this engine serves "
            f"{served}; save the model in bfloat16 or float16"
        )
    if scheme.scales == "block" and scheme.block is None:
        raise ValueError(
            f"{source}: quantization_config: compressed-tensors' block strategy is not served yet; its "
            f"'fp8' (weight_block_size) form is. Re-export the checkpoint with quant_method 'fp8' or in bfloat16"
        )
    return scheme


def llama_fp8_scheme(d: dict[str, Any], source: str) -> Fp8Scheme | None:
    """The FP8 layout a Llama-family config ``d`` (from ``source``) declares, which the engine serves
    (:mod:`~fi_engine.checkpoint.fp8_weights`: e4m3 projections, 16-bit embedding, norms and LM head; a
    mixture-of-experts model's experts e4m3 as well, read by the FP8 grouped GEMV: ``stored_experts``, or, where
    it does not take their scale blocks, dequantized to the 16-bit type at load: ``dequantized`` ``"experts"``), or
    None without a ``quantization_config``. Static activation scales are
    accepted and unused (the activations stay 16-bit). ValueError naming the key and the way out for what it does
    not serve: another quantization, compressed-tensors' block strategy (its block size lives in each group)."""
    scheme = served_fp8_scheme(d, source, "float16/bfloat16 weights, FP8 (e4m3) ones and AWQ/GPTQ int4 ones")
    if scheme is not None and _is_moe(d):
        if scheme.grouped_gemv_takes():
            return dataclasses.replace(scheme, stored_experts=True)
        return dataclasses.replace(scheme, dequantized="experts")
    return scheme


# END


def __getattr__(name: str) -> Any:
    """A name that left this module for a family's (``fi_engine.moved.NAMES``), with a DeprecationWarning."""
    return old_name(__name__, name)
