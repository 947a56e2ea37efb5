"""AWQ and GPTQ int4 weights on the host: reading one projection's packed 4-bit weight, zeros and scales from a
checkpoint in the layout its ``quantization_config`` names (:func:`read_int4_linear`), and dequantizing them to the
model's 16-bit type (:meth:`Int4Matrix.dequantized`), which is how the engine serves them: W16A16 after load, with the
memory and speed of 16-bit weights. A value module: nothing here touches a GPU.

A projection ``<p>`` (e.g. ``model.layers.0.self_attn.q_proj``) of ``k`` inputs and ``n`` outputs (a 16-bit
checkpoint's ``<p>.weight`` is ``[n, k]``) is stored as three tensors; ``G = ceil(k / group_size)`` groups of
``group_size`` consecutive inputs (one group of all ``k`` where ``group_size`` is -1) share a scale and a zero per
output column, and every weight is ``w[o, i] = (q[i, o] - z[i // group_size, o]) * s[i // group_size, o]``:

- AWQ (``version: "gemm"``, AutoAWQ's ``WQLinear_GEMM``): ``<p>.qweight`` int32 ``[k, n / 8]``, ``<p>.qzeros`` int32
  ``[G, n / 8]``, ``<p>.scales`` float16 ``[G, n]``. Eight 4-bit values of consecutive output columns share an int32,
  interleaved: bits ``4j .. 4j+3`` (``j = 0`` the lowest) hold column ``8c + AWQ_ORDER[j]`` of int32 column ``c``
  (:data:`AWQ_ORDER`). The zeros are packed the same way and stored as they are.
- GPTQ (AutoGPTQ / GPTQModel): ``<p>.qweight`` int32 ``[k / 8, n]``, packed along the inputs: bits ``4j .. 4j+3``
  of row ``r`` hold input ``8r + j``; ``<p>.qzeros`` int32 ``[G, n / 8]``, packed along the outputs in order (bits
  ``4j .. 4j+3`` of column ``c`` hold column ``8c + j``); ``<p>.scales`` float16 ``[G, n]``; ``<p>.g_idx`` int32
  ``[k]``, each input's group, checked to be ``i // group_size`` (as ``desc_act: false`` writes it, and
  ``desc_act: true`` with ``static_groups: true``; act-order groups are refused). The v1 layout
  (``checkpoint_format: "gptq"``, or none) stores every zero minus one, so its readers add one back (a symmetric
  checkpoint's zero 8 is stored as 7); ``gptq_v2`` stores the zeros as they are
  (:attr:`~fi_engine.checkpoint.quantization.Int4Scheme.zero_offset`).

Scales may be float16, bfloat16 or float32. ``(q - z) * s`` is exact in float32 for 16-bit scales (at most 5 by 11
significant bits) and rounds once to the model's type (to nearest even), as a 16-bit multiply of the same operands
would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .quantization import Int4Scheme
from .safetensors import Checkpoint, _float32, _to_16bit

__all__ = ["AWQ_ORDER", "Int4Matrix", "read_int4_linear"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AWQ's interleave: the 4-bit field ``j`` of an int32 (bits ``4j .. 4j+3``) holds column ``AWQ_ORDER[j]`` of the
eight columns the int32 packs."""

_AWQ_FIELD_OF_COLUMN = np.argsort(AWQ_ORDER)  # column c of the eight is in field _AWQ_FIELD_OF_COLUMN[c]
_SCALE_TYPES = ("float16", "bfloat16", "float32")
_WAY_OUT = "serve a bfloat16 copy of this checkpoint"
_LEVELS = np.arange(16, dtype=np.float32)  # the sixteen codes


def _fields(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[..., m, 8]``: the eight 4-bit fields of each int32 of ``packed`` ``[..., m]``, the lowest bits first.
    Unpacked a byte at a time (the int32 little-endian, as safetensors stores it: byte ``b`` holds fields ``2b``
    and ``2b + 1``), a quarter of the memory traffic of shifting whole words."""
    as_bytes = np.ascontiguousarray(packed, dtype="<i4").view(np.uint8).reshape(*packed.shape, 4)
    out = np.empty((*as_bytes.shape, 2), np.uint8)
    np.bitwise_and(as_bytes, 0xF, out=out[..., 0])
    np.right_shift(as_bytes, 4, out=out[..., 1])
    return out.reshape(*packed.shape, 8)


@dataclass(frozen=True)
class Int4Matrix:
    """One linear layer's int4 weight, unpacked: ``codes`` uint8 ``[n, k]`` (a 16-bit weight's layout: output rows,
    input columns; 0..15), ``zeros`` uint8 ``[G, n]`` (each group's zero, GPTQ v1's stored-minus-one undone: 0..16)
    and ``scales`` float32 ``[G, n]`` as the checkpoint lays them out, ``group_size`` (``k`` for one group)."""

    codes: np.ndarray
    zeros: np.ndarray
    scales: np.ndarray
    group_size: int

    def dequantized(self, dtype: str = "float32") -> np.ndarray:
        """The weight ``[n, k]`` it stands for, ``(q - z) * s``: float32, or rounded once to ``"float16"`` (a float16
        array) or ``"bfloat16"`` (its bits, uint16) as the engine uploads it. ValueError where a value is not finite
        in ``dtype`` (a scale too large for it).

        Each output row's group has sixteen possible values, one per code: they are computed first (``[n, G, 16]``,
        exactly in float32, then rounded), and every weight is looked up among its group's -- one gather over the
        weight instead of float32 arithmetic and a rounding pass over it."""
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype: expected 'float32', 'float16' or 'bfloat16', got {dtype!r}")
        n, k = self.codes.shape
        g, groups = self.group_size, self.zeros.shape[0]
        table = (_LEVELS - self.zeros.T[:, :, None].astype(np.float32)) * self.scales.T[:, :, None]
        if dtype != "float32":
            table = _to_16bit(table, dtype)
        codes = self.codes
        if groups * g != k:  # GPTQ's last group is short: pad it with code 0 (the padding is cut off below)
            codes = np.pad(codes, ((0, 0), (0, groups * g - k)))
        out = np.take_along_axis(table, codes.reshape(n, groups, g), axis=2).reshape(n, groups * g)[:, :k]

        def finite(a: np.ndarray) -> bool:
            return bool(np.isfinite(_float32(a, dtype) if dtype == "bfloat16" else a).all())

        if not finite(table) and not finite(out):  # a value no code takes may be past the type's range
            raise ValueError(f"the dequantized weight has values that are not finite in {dtype} (scales too large)")
        return np.ascontiguousarray(out)


def _tensor(ckpt: Checkpoint, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...], want: str) -> np.ndarray:
    """Tensor ``name`` of one of ``dtypes`` and of ``shape``; ValueError naming it, what was expected and the fix."""
    if name not in ckpt:
        raise ValueError(f"model: the int4 checkpoint has no {name!r} ({want}); is quantization_config right?")
    info = ckpt.info(name)
    if info.dtype not in dtypes:
        raise ValueError(f"model: tensor {name!r} is {info.dtype}; expected {' or '.join(dtypes)} ({want})")
    if tuple(info.shape) != shape:
        raise ValueError(f"model: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)} ({want})")
    return np.asarray(ckpt.array(name))


def read_int4_linear(ckpt: Checkpoint, scheme: Int4Scheme, prefix: str, shape: tuple[int, int]) -> Int4Matrix:
    """The int4 projection ``prefix`` of ``shape`` ``(n, k)`` (outputs, inputs: a 16-bit ``<prefix>.weight``'s)
    read from ``ckpt`` in ``scheme``'s layout (the module docstring) and unpacked. ValueError naming the tensor, what
    was expected and the fix: a tensor missing, of another dtype or shape, ``n`` (or GPTQ's ``k``) not a multiple of 8,
    a scale that is not finite, a GPTQ ``g_idx`` that is not ``i // group_size``."""
    n, k = shape
    awq = scheme.method == "awq"
    g = k if scheme.group_size == -1 else scheme.group_size
    groups = -(-k // g)
    if n % 8 or (not awq and k % 8):
        packed = "outputs" if n % 8 else "inputs"
        raise ValueError(
            f"model: {prefix!r} has {n} outputs and {k} inputs; int4 packs eight {packed} to an int32, so they must "
            f"be a multiple of 8; {scheme.method.upper()} cannot hold this shape"
        )
    if awq:  # [k, n/8, 8] (input i, column 8c + AWQ_ORDER[j]) -> [n/8, 8, k] with the eight columns in order
        fields = _fields(_tensor(ckpt, prefix + ".qweight", ("int32",), (k, n // 8), "AWQ-packed weights"))
        codes = fields.transpose(1, 2, 0)[:, _AWQ_FIELD_OF_COLUMN, :].reshape(n, k)
    else:  # [k/8, n, 8] (input 8r + j, column o) -> [n, k/8, 8]
        fields = _fields(_tensor(ckpt, prefix + ".qweight", ("int32",), (k // 8, n), "GPTQ-packed weights"))
        codes = np.ascontiguousarray(fields.transpose(1, 0, 2)).reshape(n, k)
    zero_fields = _fields(_tensor(ckpt, prefix + ".qzeros", ("int32",), (groups, n // 8), "packed zeros"))
    zeros = (zero_fields[..., _AWQ_FIELD_OF_COLUMN] if awq else zero_fields).reshape(groups, n) + scheme.zero_offset
    scale_name = prefix + ".scales"
    raw = _tensor(ckpt, scale_name, _SCALE_TYPES, (groups, n), "one scale per group and output")
    scales = _float32(raw, ckpt.info(scale_name).dtype)
    if not np.isfinite(scales).all():
        raise ValueError(f"model: tensor {scale_name!r} holds a scale that is not finite")
    if not awq and prefix + ".g_idx" in ckpt:
        g_idx = _tensor(ckpt, prefix + ".g_idx", ("int32", "int64"), (k,), "each input's group")
        if not np.array_equal(g_idx, np.arange(k) // g):
            raise ValueError(
                f"model: tensor {prefix + '.g_idx'!r} does not give input i the group i // {g} (act-order groups, "
                f"which this engine does not serve); {_WAY_OUT}"
            )
    return Int4Matrix(np.ascontiguousarray(codes), zeros.astype(np.uint8), scales, g)
