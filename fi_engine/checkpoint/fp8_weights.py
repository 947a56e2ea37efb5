"""FP8 (e4m3) weights on the host: the e4m3 code table, rounding to e4m3, and reading a projection's e4m3 weight
and scales from a checkpoint in the layouts published FP8 checkpoints use (:func:`read_fp8_linear`), as the GPU
side (:mod:`~fi_engine.kernels.fp8_linear`) takes them. A value module: nothing here touches a GPU.

Where the scales are, per :class:`~fi_engine.checkpoint.quantization.Fp8Scheme` (``<p>`` a projection's prefix, e.g.
``model.layers.0.self_attn.q_proj``):

- per tensor (``quant_method: "fp8"`` without ``weight_block_size``, compressed-tensors ``strategy: "tensor"``):
  ``<p>.weight_scale``, one float (shape ``[]`` or ``[1]``);
- per channel (compressed-tensors ``strategy: "channel"``, ``fbgemm_fp8``): ``<p>.weight_scale`` ``[n, 1]``;
- per block (``quant_method: "fp8"`` with ``weight_block_size: [bn, bk]``, Qwen3-FP8 / DeepSeek-V3 style):
  ``<p>.weight_scale_inv`` ``[ceil(n / bn), ceil(k / bk)]`` -- despite its name the factor the weight is
  multiplied by (``w = e4m3 * weight_scale_inv``), as transformers' and vLLM's loaders read it.

Scales may be float32, bfloat16 or float16; they become float32. Activation scales (``<p>.input_scale``, static
schemes) are not read: the engine keeps 16-bit activations (W8A16), so its error is the weights' alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .quantization import Fp8Scheme
from .safetensors import Checkpoint, _float32, _to_16bit

__all__ = ["E4M3", "Fp8Matrix", "dequantize_e4m3", "quantize_e4m3", "read_fp8_linear"]


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 0x7
    value = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7.0))
    value[(codes & 0x7F) == 0x7F] = np.nan  # e4m3fn: no infinity, one NaN per sign
    return (sign * value).astype(np.float32)


E4M3 = _e4m3_table()
"""float32 ``[256]``: the value of each e4m3fn code (bias 7, subnormals below 2**-6, 0x7f / 0xff NaN, +-448 the
largest)."""

_FINITE = np.flatnonzero(~np.isnan(E4M3) & (np.arange(256) != 0x80))  # one zero: +0
_ORDER = _FINITE[np.argsort(E4M3[_FINITE], kind="stable")]  # the finite codes by value


def dequantize_e4m3(bits: np.ndarray) -> np.ndarray:
    """The float32 values of e4m3 codes ``bits`` (a uint8 array, any shape); TypeError naming ``bits`` else."""
    if not isinstance(bits, np.ndarray) or bits.dtype != np.uint8:
        raise TypeError(f"bits: expected a numpy uint8 array of e4m3 codes, got {_kind(bits)}")
    return E4M3[bits]


def _kind(value: Any) -> str:
    return f"a {value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__


def quantize_e4m3(values: np.ndarray) -> np.ndarray:
    """``values`` (a numpy array of numbers, any shape) rounded to the nearest e4m3 code (ties to the even code,
    saturating at +-448; NaN to 0x7f; zero, and what rounds to it, to +0): uint8 of the same shape. Tests and
    benchmarks write FP8 checkpoints with it."""
    if not isinstance(values, np.ndarray) or values.dtype.kind not in "fiu":
        raise TypeError(f"values: expected a numpy array of numbers, got {_kind(values)}")
    v = values.astype(np.float32)
    table = E4M3[_ORDER]
    clipped = np.clip(np.nan_to_num(v, nan=0.0), -448.0, 448.0)
    hi = np.clip(np.searchsorted(table, clipped, side="left"), 1, table.size - 1)
    lo = hi - 1
    below, above = table[lo], table[hi]
    pick_hi = (above - clipped < clipped - below) | (
        (above - clipped == clipped - below) & ((_ORDER[hi] & 1) == 0)  # a tie: the even mantissa
    )
    out = np.where(pick_hi, _ORDER[hi], _ORDER[lo]).astype(np.uint8)
    out[np.isnan(v)] = 0x7F
    return out


@dataclass(frozen=True)
class Fp8Matrix:
    """One linear layer's e4m3 weight ``[n, k]`` (uint8 codes, row-major) and its float32 ``scales``: ``[n]`` one
    per output row (``block`` None), or ``[ceil(n / bn), ceil(k / bk)]`` one per ``block = (bn, bk)``."""

    weight: np.ndarray
    scales: np.ndarray
    block: tuple[int, int] | None

    def rows(self, lo: int, hi: int) -> Fp8Matrix:
        """Output rows ``[lo, hi)`` with their scales (a column-parallel shard); ValueError where a bound cuts a
        block of scales (a bound inside the matrix not on a multiple of its rows)."""
        n = self.weight.shape[0]
        if not 0 <= lo < hi <= n:
            raise ValueError(f"rows: expected 0 <= lo < hi <= {n}, got [{lo}, {hi})")
        if self.block is None:
            return Fp8Matrix(np.ascontiguousarray(self.weight[lo:hi]), self.scales[lo:hi].copy(), None)
        bn = self.block[0]
        if lo % bn or (hi % bn and hi != n):
            raise ValueError(f"rows [{lo}, {hi}) cut a block of {bn} rows that shares one scale")
        return Fp8Matrix(np.ascontiguousarray(self.weight[lo:hi]), self.scales[lo // bn : -(-hi // bn)].copy(),
                         self.block)  # fmt: skip

    def columns(self, lo: int, hi: int) -> Fp8Matrix:
        """Input columns ``[lo, hi)`` with their scales (a row-parallel shard); ValueError where a bound cuts a
        block of scales."""
        k = self.weight.shape[1]
        if not 0 <= lo < hi <= k:
            raise ValueError(f"columns: expected 0 <= lo < hi <= {k}, got [{lo}, {hi})")
        weight = np.ascontiguousarray(self.weight[:, lo:hi])
        if self.block is None:
            return Fp8Matrix(weight, self.scales.copy(), None)
        bk = self.block[1]
        if lo % bk or (hi % bk and hi != k):
            raise ValueError(f"columns [{lo}, {hi}) cut a block of {bk} columns that shares one scale")
        return Fp8Matrix(weight, np.ascontiguousarray(self.scales[:, lo // bk : -(-hi // bk)]), self.block)

    @staticmethod
    def stacked(parts: Sequence[Fp8Matrix]) -> Fp8Matrix:
        """``parts`` (the same columns and scale layout) stacked along rows (q, k and v; gate and up); ValueError
        where a part's rows do not fill whole blocks (all but the last: the family's check refuses such a model
        first, naming the projection)."""
        block = parts[0].block
        if any(p.block != block or p.weight.shape[1] != parts[0].weight.shape[1] for p in parts):
            raise ValueError("parts: expected matrices of the same columns and scale blocks")
        if block is not None and any(p.weight.shape[0] % block[0] for p in parts[:-1]):
            raise ValueError(f"parts: a part's rows do not fill whole blocks of {block[0]} rows")
        weight = np.concatenate([p.weight for p in parts])
        return Fp8Matrix(weight, np.ascontiguousarray(np.concatenate([p.scales for p in parts])), block)

    def dequantized(self, dtype: str = "float32") -> np.ndarray:
        """The weight ``[n, k]`` it stands for, each code's value times its scale: float32, or that float32 product
        rounded once to ``"float16"`` (a float16 array) or ``"bfloat16"`` (its bits, uint16) as the engine uploads
        it -- the values DeepSeek's ``fp8_cast_bf16.py`` and transformers' FP8 dequantization write (a float32
        multiply, then a cast to nearest even). ValueError where a value is not finite in ``dtype`` (a scale too
        large for float16, or an e4m3 NaN code)."""
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype: expected 'float32', 'float16' or 'bfloat16', got {dtype!r}")
        n, k = self.weight.shape
        if self.block is None:
            full = self.scales[:, None]
        else:
            bn, bk = self.block
            full = np.repeat(np.repeat(self.scales, bn, axis=0), bk, axis=1)[:n, :k]
        values = dequantize_e4m3(np.asarray(self.weight)) * full
        if dtype == "float32":
            return values
        out = _to_16bit(values, dtype)
        if not np.isfinite(_float32(out, dtype)).all():
            raise ValueError(f"the dequantized weight has values that are not finite in {dtype} (NaN codes, or scales "
                             f"too large for it)")  # fmt: skip
        return out


def _scale(ckpt: Checkpoint, name: str, shapes: Sequence[tuple[int, ...]], want: str) -> np.ndarray:
    """Tensor ``name`` as float32, its shape one of ``shapes``; finite and > 0 (ValueError naming it otherwise)."""
    if name not in ckpt:
        raise ValueError(f"model: the FP8 checkpoint has no {name!r} ({want}); is quantization_config right?")
    info = ckpt.info(name)
    if info.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model: tensor {name!r} is {info.dtype}; scales are float32, bfloat16 or float16")
    if tuple(info.shape) not in [tuple(s) for s in shapes]:
        expected = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(f"model: tensor {name!r} has shape {list(info.shape)}, expected {expected} ({want})")
    values = _float32(ckpt.array(name), info.dtype)
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise ValueError(f"model: tensor {name!r} holds a scale that is not a finite positive number")
    return values


def read_fp8_linear(
    ckpt: Checkpoint, scheme: Fp8Scheme, prefix: str, shape: tuple[int, int], *, gemv: bool = True
) -> Fp8Matrix:
    """Projection ``prefix``'s weight ``shape`` ``(n, k)`` read from ``ckpt`` in ``scheme``'s layout: its
    ``<prefix>.weight`` (F8_E4M3, shape checked) and scales (see the module docstring); a per-tensor scale becomes
    one per row. Projections that share a GEMM (q, k and v; gate and up) stack with :meth:`Fp8Matrix.stacked`.
    ``gemv``: the weight feeds the FP8 GEMV (:func:`upload_fp8_linear`), which needs ``k`` a multiple of 16; False
    for a weight the caller dequantizes (:meth:`Fp8Matrix.dequantized`). ValueError naming the tensor, what was
    expected and the fix: a weight that is not e4m3, a missing or misshapen scale, a non-finite or non-positive
    one, ``k`` not a multiple of 16 (with ``gemv``: the GEMV reads 16 codes at a time)."""
    n, k = shape
    name = prefix + ".weight"
    info = ckpt.info(name)
    if info.dtype != "float8_e4m3fn":
        raise ValueError(
            f"model: tensor {name!r} is {info.dtype}; quantization_config says FP8, so the projections must be "
            f"F8_E4M3 (is it in an `ignore` list? only lm_head may be)"
        )
    if gemv and k % 16:
        raise ValueError(f"model: tensor {name!r}: {k} columns; the FP8 GEMV needs a multiple of 16")
    weight = ckpt.array(name, (n, k))
    if scheme.scales == "block":
        assert scheme.block is not None
        bn, bk = scheme.block
        shape_of_scales = (-(-n // bn), -(-k // bk))
        scales = _scale(ckpt, prefix + ".weight_scale_inv", [shape_of_scales], f"{bn}x{bk} block scales")
    elif scheme.scales == "channel":
        scales = _scale(ckpt, prefix + ".weight_scale", [(n, 1), (n,)], "one scale per output channel").reshape(n)
    else:
        s = _scale(ckpt, prefix + ".weight_scale", [(), (1,)], "one scale per tensor")
        scales = np.full(n, s.reshape(()), np.float32)
    return Fp8Matrix(np.ascontiguousarray(weight), np.ascontiguousarray(scales, np.float32), scheme.block)


def upload_fp8_linear(dense: Any, matrix: Fp8Matrix, upload: Any) -> int:
    """Upload ``matrix`` with ``upload`` (numpy -> a device array the engine keeps alive), register it with ``dense``
    (:meth:`~fi_engine.kernels.quantized_weights.QuantizedWeights.add_fp8_weight`) and return the weight's device
    address, which the engine's GEMM calls then pass as ``w``."""
    w = upload(matrix.weight)
    s = upload(matrix.scales)
    n, k = matrix.weight.shape
    dense.quantized.add_fp8_weight(int(w.data.ptr), n, k, int(s.data.ptr), matrix.block)
    return int(w.data.ptr)
