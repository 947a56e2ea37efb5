"""AWQ and GPTQ int4 weights: reading one projection's packed 4-bit weight, zeros and scales from a checkpoint in the
layout its ``quantization_config`` names (:func:`read_int4_linear`), laying them out for the engine's int4 GEMV
(:meth:`Int4Matrix.gemv_layout`, how the engine serves them by default: half a byte a weight), or dequantizing them
to the model's 16-bit type (:meth:`Int4Matrix.dequantized`: W16A16 after load, with the memory and speed of 16-bit
weights). A value module: nothing here touches a GPU unless handed CuPy (``xp``), which the engine's loader does to
unpack and lay out the weights on the GPU.

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

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .quantization import Int4Scheme
from .safetensors import Checkpoint, _float32, _to_16bit

__all__ = ["AWQ_ORDER", "GEMV_ROWS", "GEMV_TILE", "Int4Matrix", "decode_gemv_layout", "read_int4_linear"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AWQ's interleave: the 4-bit field ``j`` of an int32 (bits ``4j .. 4j+3``) holds column ``AWQ_ORDER[j]`` of the
eight columns the int32 packs."""

_AWQ_FIELD_OF_COLUMN = np.argsort(AWQ_ORDER)  # column c of the eight is in field _AWQ_FIELD_OF_COLUMN[c]
_SCALE_TYPES = ("float16", "bfloat16", "float32")
_WAY_OUT = "serve a bfloat16 copy of this checkpoint"
_LEVELS = np.arange(16, dtype=np.float32)  # the sixteen codes


def array_module(a: Any) -> Any:
    """The array module of ``a``: numpy for a numpy array, else the package its type comes from (CuPy for a CuPy
    array: the readers and the layout below run on either, the engine's loader on the GPU)."""
    return np if isinstance(a, np.ndarray) else sys.modules[type(a).__module__.split(".")[0]]


def _fields(packed: Any) -> Any:
    """uint8 ``[..., m, 8]``: the eight 4-bit fields of each int32 of ``packed`` ``[..., m]``, the lowest bits first.
    Unpacked a byte at a time (the int32 little-endian, as safetensors stores it: byte ``b`` holds fields ``2b``
    and ``2b + 1``), a quarter of the memory traffic of shifting whole words."""
    xp = array_module(packed)
    as_bytes = xp.ascontiguousarray(packed, dtype="<i4").view(np.uint8).reshape(*packed.shape, 4)
    out = xp.empty((*as_bytes.shape, 2), np.uint8)
    xp.bitwise_and(as_bytes, 0xF, out=out[..., 0])
    xp.right_shift(as_bytes, 4, out=out[..., 1])
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

    def rows(self, start: int, stop: int) -> Int4Matrix:
        """Output rows ``[start, stop)`` (a column-parallel shard), their zeros and scales with them."""
        xp = array_module(self.codes)
        return Int4Matrix(
            xp.ascontiguousarray(self.codes[start:stop]),
            xp.ascontiguousarray(self.zeros[:, start:stop]),
            xp.ascontiguousarray(self.scales[:, start:stop]),
            self.group_size,
        )

    def columns(self, start: int, stop: int) -> Int4Matrix:
        """Inputs ``[start, stop)`` (a row-parallel shard) and their groups' zeros and scales. ValueError where the
        shard does not begin and end on group boundaries (its groups would be cut), naming the group size."""
        g = self.group_size
        k = self.codes.shape[1]
        if start % g or (stop % g and stop != k):
            raise ValueError(
                f"the inputs [{start}, {stop}) do not begin and end on the {g}-input groups of the int4 weight"
            )
        lo, hi = start // g, -(-stop // g)
        if g == k:  # one group of the whole row: the shard keeps it, the same scale over fewer inputs
            lo, hi, g = 0, 1, stop - start
        xp = array_module(self.codes)
        return Int4Matrix(
            xp.ascontiguousarray(self.codes[:, start:stop]),
            xp.ascontiguousarray(self.zeros[lo:hi]),
            xp.ascontiguousarray(self.scales[lo:hi]),
            g,
        )

    @staticmethod
    def stacked(parts: list[Int4Matrix]) -> Int4Matrix:
        """The matrices' output rows one after the other (q, k and v; gate and up). ValueError where their inputs
        or group sizes differ."""
        first = parts[0]
        for m in parts[1:]:
            if m.codes.shape[1] != first.codes.shape[1] or m.group_size != first.group_size:
                raise ValueError(
                    f"int4 weights of {m.codes.shape[1]} inputs in groups of {m.group_size} cannot be stacked with "
                    f"ones of {first.codes.shape[1]} in groups of {first.group_size}"
                )
        xp = array_module(first.codes)
        return Int4Matrix(
            xp.concatenate([m.codes for m in parts]),
            xp.concatenate([m.zeros for m in parts], axis=1),
            xp.concatenate([m.scales for m in parts], axis=1),
            first.group_size,
        )

    @staticmethod
    def interleaved(first: Int4Matrix, second: Int4Matrix) -> Int4Matrix:
        """Two matrices of the same shape stacked with their output rows interleaved by 8 (8 of ``first``, the same 8
        of ``second``, ...): the gate and up rows as the int4 GEMV's SiLU form pairs them
        (:attr:`~fi_engine.kernels.int4_linear.Int4Weight.half_n`). ValueError where the shapes or group sizes
        differ, or the rows are no multiple of 8."""
        n, k = first.codes.shape
        if second.codes.shape != (n, k) or second.group_size != first.group_size or n % 8:
            raise ValueError(
                f"int4 weights of {list(first.codes.shape)} and {list(second.codes.shape)} (groups of "
                f"{first.group_size}, {second.group_size}) cannot be interleaved by 8 rows"
            )
        xp = array_module(first.codes)

        def rows8(a: Any, b: Any, axis: int) -> Any:  # [.., n, ..] twice -> [.., 2 n, ..], 8 rows of each in turn
            shape = (*a.shape[:axis], n // 8, 8, *a.shape[axis + 1 :])
            both = xp.stack([a.reshape(shape), b.reshape(shape)], axis=axis + 1)
            return xp.ascontiguousarray(both.reshape((*a.shape[:axis], 2 * n, *a.shape[axis + 1 :])))

        return Int4Matrix(
            rows8(first.codes, second.codes, 0),
            rows8(first.zeros, second.zeros, 1),
            rows8(first.scales, second.scales, 1),
            first.group_size,
        )

    def gemv_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """The weight as the engine's int4 GEMV reads it (``csrc/int4_decode.cuh``, whose opening comment is the
        layout's definition): ``(weights, records)``, uint8 ``[ceil(n / 16), k / 128, 1024]`` (tile-major: each
        kilobyte the 128-input tile of 16 rows, row r's 64 bytes at 64 r, the codes reordered for the tensor cores'
        fragments, two to a byte; rows past ``n`` zero) and uint32 ``[n, G]`` (each group's float32 scale rounded to
        16 significant bits -- 16-bit scales are exact -- with the group's zero in its low 8 bits).
        ValueError where the GEMV cannot take the shape (the caller dequantizes instead): ``k`` not a multiple of
        128, or groups that are neither the whole row nor a power of two of at least 64 inputs."""
        n, k = self.codes.shape
        g = self.group_size
        if k % GEMV_TILE or not (g == k or (g >= 64 and g & (g - 1) == 0 and k % g == 0)):
            raise ValueError(
                f"the int4 GEMV takes k a multiple of {GEMV_TILE} in groups of a power of two >= 64 inputs or one "
                f"group a row; got k {k} in groups of {g}"
            )
        xp = array_module(self.codes)
        tiles, strips = k // GEMV_TILE, -(-n // GEMV_ROWS)
        # codes [n, tile, half, t, q, e] (input 128 tile + 64 half + 16 t + 4 q + e) -> [n, tile, t, half, v, field]
        a = self.codes.reshape(n, tiles, 2, 4, 4, 4).transpose(0, 1, 3, 2, 4, 5)
        fields = a[:, :, :, :, xp.asarray(_FIELD_STEP), xp.asarray(_FIELD_E)]
        pairs = fields.reshape(n, tiles, 4, 4, 4, 2)  # (fields 2b, 2b + 1) -> byte b of word 2 half + v
        rows = xp.zeros((strips * GEMV_ROWS, tiles, 64), np.uint8)  # each row's tiles of 64 bytes, rows past n zero
        rows[:n] = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8).reshape(n, tiles, 64)
        weights = rows.reshape(strips, GEMV_ROWS, tiles, 64).transpose(0, 2, 1, 3).reshape(strips, tiles, 1024)
        bits = xp.ascontiguousarray(self.scales.T, np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x80) & 0xFFFFFF00).astype(np.uint32)  # to nearest (a carry moves into the exponent)
        records = rounded | self.zeros.T.astype(np.uint32)
        return xp.ascontiguousarray(weights), xp.ascontiguousarray(records)


GEMV_TILE = 128
"""The inputs of one tile of the int4 GEMV's layout (:meth:`Int4Matrix.gemv_layout`): ``k`` is a multiple of it."""
GEMV_ROWS = 16
"""The rows of one tile of the int4 GEMV's layout (a tile: 16 rows of 128 inputs, a kilobyte)."""

# field f (0..7) of word v (of a half) holds step 2 v + _STEP[f] and input e = _E[f] of that step (csrc/int4_decode.cuh)
_STEP = np.array([0, 0, 1, 1, 0, 0, 1, 1])
_E = np.array([0, 2, 0, 2, 1, 3, 1, 3])
_FIELD_STEP = 2 * np.arange(2)[:, None] + _STEP[None, :]  # [v, field] -> step q of the half
_FIELD_E = np.broadcast_to(_E, (2, 8))


def decode_gemv_layout(weights: np.ndarray, records: np.ndarray, k: int) -> np.ndarray:
    """float32 ``[n, k]``: what :meth:`Int4Matrix.gemv_layout`'s ``(weights, records)`` stand for, each weight
    ``(code - zero) * scale`` read back from the layout (the reference the GPU kernels' tests compare with).
    ValueError naming the argument that does not fit the layout: ``records`` not uint32 ``[n, G]`` with ``G``
    dividing ``k``, ``weights`` not uint8 ``[ceil(n / 16), k / 128, 1024]``, ``k`` no multiple of 128."""
    if k.__class__ is not int or k <= 0 or k % GEMV_TILE:
        raise ValueError(f"k: expected a positive multiple of {GEMV_TILE}, got {k!r:.40}")
    if (
        not isinstance(records, np.ndarray)
        or records.dtype != np.uint32
        or records.ndim != 2
        or not records.shape[0]
        or not records.shape[1]
        or k % records.shape[1]
    ):
        raise ValueError(f"records: expected a uint32 array [n, G] with G dividing {k}, got {records!r:.60}")
    n, tiles = records.shape[0], k // GEMV_TILE
    strips = -(-n // GEMV_ROWS)
    if not isinstance(weights, np.ndarray) or weights.dtype != np.uint8 or weights.shape != (strips, tiles, 1024):
        raise ValueError(
            f"weights: expected a uint8 array [{strips}, {tiles}, 1024] (Int4Matrix.gemv_layout's for {n} rows), "
            f"got {weights!r:.60}"
        )
    weights = weights.reshape(strips, tiles, GEMV_ROWS, 64).transpose(0, 2, 1, 3).reshape(-1, k // 2)[:n]
    low, high = weights & 0xF, weights >> 4
    fields = np.stack([low, high], axis=-1).reshape(n, tiles, 4, 2, 2, 8)  # [n, tile, t, half, v, field]
    laid = np.empty((n, tiles, 4, 2, 4, 4), np.uint8)  # [n, tile, t, half, q, e]
    laid[:, :, :, :, _FIELD_STEP, _FIELD_E] = fields
    codes = laid.transpose(0, 1, 3, 2, 4, 5).reshape(n, k)
    groups = records.shape[1]
    scales = (records & 0xFFFFFF00).view(np.float32)
    zeros = (records & 0xFF).astype(np.float32)
    per_input = np.repeat(np.arange(groups), k // groups)
    return (codes.astype(np.float32) - zeros[:, per_input]) * scales[:, per_input]


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


def read_int4_linear(
    ckpt: Checkpoint, scheme: Int4Scheme, prefix: str, shape: tuple[int, int], xp: Any = None
) -> Int4Matrix:
    """The int4 projection ``prefix`` of ``shape`` ``(n, k)`` (outputs, inputs: a 16-bit ``<prefix>.weight``'s)
    read from ``ckpt`` in ``scheme``'s layout (the module docstring) and unpacked with array module ``xp`` (None:
    numpy; or CuPy: the packed tensors are copied to the GPU as stored and unpacked there, the matrix's arrays
    CuPy's).
    ValueError naming the tensor, what was expected and the fix: a tensor missing, of another dtype or shape, ``n``
    (or GPTQ's ``k``) not a multiple of 8, a scale that is not finite, a GPTQ ``g_idx`` that is not
    ``i // group_size``."""
    xp = np if xp is None else xp
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
    order = xp.asarray(_AWQ_FIELD_OF_COLUMN)
    if awq:  # [k, n/8, 8] (input i, column 8c + AWQ_ORDER[j]) -> [n/8, 8, k] with the eight columns in order
        fields = _fields(xp.asarray(_tensor(ckpt, prefix + ".qweight", ("int32",), (k, n // 8), "AWQ-packed weights")))
        codes = fields.transpose(1, 2, 0)[:, order, :].reshape(n, k)
    else:  # [k/8, n, 8] (input 8r + j, column o) -> [n, k/8, 8]
        qweight = _tensor(ckpt, prefix + ".qweight", ("int32",), (k // 8, n), "GPTQ-packed weights")
        codes = xp.ascontiguousarray(_fields(xp.asarray(qweight)).transpose(1, 0, 2)).reshape(n, k)
    packed_zeros = _tensor(ckpt, prefix + ".qzeros", ("int32",), (groups, n // 8), "packed zeros")
    zero_fields = _fields(xp.asarray(packed_zeros))
    zeros = (zero_fields[..., order] if awq else zero_fields).reshape(groups, n) + scheme.zero_offset
    scale_name = prefix + ".scales"
    raw = xp.asarray(_tensor(ckpt, scale_name, _SCALE_TYPES, (groups, n), "one scale per group and output"))
    scales = _float32(raw, ckpt.info(scale_name).dtype)
    if not bool(xp.isfinite(scales).all()):
        raise ValueError(f"model: tensor {scale_name!r} holds a scale that is not finite")
    if not awq and prefix + ".g_idx" in ckpt:
        g_idx = _tensor(ckpt, prefix + ".g_idx", ("int32", "int64"), (k,), "each input's group")
        if not np.array_equal(g_idx, np.arange(k) // g):
            raise ValueError(
                f"model: tensor {prefix + '.g_idx'!r} does not give input i the group i // {g} (act-order groups, "
                f"which this engine does not serve); {_WAY_OUT}"
            )
    return Int4Matrix(xp.ascontiguousarray(codes), zeros.astype(np.uint8), scales, g)
