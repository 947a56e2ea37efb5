"""MXFP4 weights on the host: the e2m1 code table, MXFP4 blocks and scales decoded to bfloat16
(:func:`dequantize_mxfp4`), and a mixture-of-experts weight read from a checkpoint's ``*_blocks`` / ``*_scales``
tensors in the layout the published gpt-oss checkpoints use (:func:`read_mxfp4_experts`), dequantized one expert at a
time. A value module: nothing here touches a GPU.

The format (OCP Microscaling, MXFP4), as the gpt-oss checkpoints store it:

- a row of ``K`` values is cut into ``K / 32`` blocks of 32 values; a block is 16 bytes (``*_blocks``, ``U8``,
  ``[..., K / 32, 16]``), two 4-bit codes per byte: value ``2j`` of the block in the **low** nibble of byte ``j``,
  value ``2j + 1`` in the high nibble;
- a code is e2m1: bit 3 the sign, bits 2-1 the exponent (bias 1), bit 0 the mantissa; its magnitudes are 0, 0.5, 1,
  1.5, 2, 3, 4, 6 (codes 0-7; 8-15 the same negated, 8 is -0; no infinity, no NaN): :data:`E2M1`;
- each block has one e8m0 scale (``*_scales``, ``U8``, ``[..., K / 32]``): byte ``s`` stands for ``2 ** (s - 127)``
  (255 is e8m0's NaN);
- a value is ``E2M1[code] * 2 ** (s - 127)``: at most two significant bits and an exponent of at least -128, so
  bfloat16 holds it exactly (subnormal below 2**-126), unless it exceeds bfloat16's range (``s`` 253 with
  ``|E2M1[code]| >= 4``, 254 with ``>= 2``, 255): such blocks are refused (ValueError), never decoded to
  infinities.

gpt-oss's experts (transformers' ``GptOssExperts``; prefix ``model.layers.N.mlp.experts.``, ``E`` experts, hidden
``H``, intermediate ``I``):

- ``gate_up_proj_blocks`` ``[E, 2I, H / 32, 16]`` with ``gate_up_proj_scales`` ``[E, 2I, H / 32]``: row ``r`` of
  expert ``e`` holds output ``r`` of its gate/up projection over the ``H`` inputs (``nn.Linear``'s ``[out, in]``),
  the rows interleaving gate and up (``2j`` gate ``j``, ``2j + 1`` up ``j``);
- ``down_proj_blocks`` ``[E, H, I / 32, 16]`` with ``down_proj_scales`` ``[E, H, I / 32]``;
- everything else stays bfloat16 (``quantization_config.modules_to_not_convert``: attention, router, embedding, LM
  head; the experts' biases ``gate_up_proj_bias [E, 2I]`` and ``down_proj_bias [E, H]`` too).

A bfloat16 gpt-oss checkpoint (transformers' conversion, or a dequantizing load saved again) holds the same values
transposed: ``gate_up_proj [E, H, 2I]`` (``x @ gate_up_proj[e]``, the interleaving kept along the columns) and
``down_proj [E, I, H]``. :func:`read_mxfp4_experts` returns exactly that tensor, so the engine serves an MXFP4
checkpoint as it serves that bfloat16 copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .safetensors import Checkpoint

__all__ = [
    "E2M1",
    "Mxfp4Scheme",
    "declares_mxfp4",
    "dequantize_mxfp4",
    "mxfp4_scheme",
    "read_mxfp4_blocks",
    "read_mxfp4_experts",
]

BLOCK = 32  # values per block (one scale each)


def _e2m1_table() -> np.ndarray:
    codes = np.arange(16)
    sign = np.where(codes & 0x8, -1.0, 1.0)
    exp, man = (codes >> 1) & 0x3, codes & 0x1
    magnitude = np.where(exp == 0, man * 0.5, 2.0 ** (exp - 1.0) * (1 + man / 2))  # exp 0: subnormal, 0 or 0.5
    return (sign * magnitude).astype(np.float32)


E2M1 = _e2m1_table()
"""float32 ``[16]``: the value of each e2m1 code (0, 0.5, 1, 1.5, 2, 3, 4, 6, then the same negated: code 8 is -0)."""


def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bits of float32 ``values`` whose low 16 bits are zero (truncation is then exact)."""
    return (values.view(np.uint32) >> 16).astype(np.uint16)


def _pair_table() -> tuple[np.ndarray, np.ndarray]:
    """For each ``(scale s, byte b)``, index ``s << 8 | b``: the bfloat16 bits of the byte's two values (low nibble
    first) as one uint32's memory, and whether the pair is past bfloat16 (an infinity, or ``s`` 255: NaN)."""
    s = np.arange(256, dtype=np.float64)[:, None]
    b = np.arange(256)[None, :]
    scale = np.ldexp(1.0, (s - 127).astype(np.int64))  # float64 holds 2**-127 .. 2**128 exactly
    with np.errstate(over="ignore"):  # past float32's range: infinity, flagged below
        low = (E2M1[b & 0xF].astype(np.float64) * scale).astype(np.float32)
        high = (E2M1[b >> 4].astype(np.float64) * scale).astype(np.float32)
    pairs = np.stack([_bfloat16_bits(low), _bfloat16_bits(high)], axis=-1)  # [256, 256, 2]
    bad = ~(np.isfinite(low) & np.isfinite(high))
    bad[255, :] = True
    return np.ascontiguousarray(pairs).reshape(-1).view(np.uint32), bad.reshape(-1)


_PAIRS, _PAST_RANGE = _pair_table()  # 256 KiB: a table lookup per byte decodes two values exactly
_RISKY = int(np.flatnonzero(_PAST_RANGE)[0]) >> 8  # the smallest scale byte with a block past range (253)


def _array_of(name: str, value: Any, dtype: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype != dtype:
        got = f"a {value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
        raise TypeError(f"{name}: expected a numpy {np.dtype(dtype)} array, got {got}")
    return value


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 ``blocks`` with their ``scales`` decoded to bfloat16 (module docstring: the format).

    Args:
        blocks: uint8 ``[..., G, 16]``: ``G`` blocks of 32 e2m1 codes per row, two per byte (low nibble first).
        scales: uint8 ``[..., G]`` (``blocks``' shape without its last axis): each block's e8m0 scale.

    Returns:
        uint16 ``[..., G * 32]``: the bfloat16 bits of every value, exact (a value is ``E2M1[code] * 2 ** (s -
        127)``), in the rows' order.

    TypeError naming the argument where it is not a uint8 numpy array; ValueError where the shapes disagree or a
    block's values lie past bfloat16's range (scale byte 255, e8m0's NaN; 254 or 253 with codes of magnitude 2 or 4
    and more).
    """
    blocks = _array_of("blocks", blocks, np.uint8)
    scales = _array_of("scales", scales, np.uint8)
    if blocks.ndim < 2 or blocks.shape[-1] != BLOCK // 2 or scales.shape != blocks.shape[:-1]:
        raise ValueError(
            f"blocks, scales: expected blocks [..., G, 16] (16 bytes: 32 codes per block) and scales [..., G] (one "
            f"per block), got {list(blocks.shape)} and {list(scales.shape)}"
        )
    index = (scales.astype(np.uint16)[..., None] << 8) | blocks  # [..., G, 16]: (scale, byte) -> its two values
    top = scales >= _RISKY  # the only scales whose blocks may be past bfloat16's range
    if top.any():
        past = _PAST_RANGE[index[top]].any(axis=-1)
        if past.any():
            s = int(scales[top][past][0])
            raise ValueError(
                f"scales: a block of scale byte {s} holds values past bfloat16's range (2 ** {s - 127} times an e2m1 "
                f"value up to 6{'; 255 is e8m0 NaN' if s == 255 else ''}); the tensor is damaged or not MXFP4"
            )
    return _PAIRS[index].view(np.uint16).reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)


def read_mxfp4_experts(ckpt: Checkpoint, name: str, shape: tuple[int, int, int]) -> np.ndarray:
    """The bfloat16 expert weight ``name`` of a bfloat16 checkpoint, ``shape`` ``(E, K, N)`` (``x @ w[e]``: ``K``
    inputs, ``N`` outputs), read from its MXFP4 form: ``name + "_blocks"`` ``[E, N, K / 32, 16]`` and ``name +
    "_scales"`` ``[E, N, K / 32]`` (uint8 both), dequantized one expert at a time.

    Returns uint16 ``[E, K, N]`` (bfloat16 bits, as :meth:`Checkpoint.array` returns a bfloat16 tensor) as a
    transposed view of the ``[E, N, K]`` array the blocks decode to (each expert's ``[out, in]`` matrix): no copy is
    made here; ``np.ascontiguousarray`` makes one where a caller needs ``[E, K, N]`` in memory, and transposing back
    gives the ``[out, in]`` matrices without one. Host memory: that array (2 bytes a value, about 4x the MXFP4 bytes)
    and one expert's decoding.

    For gpt-oss: ``experts.gate_up_proj`` with ``(E, H, 2I)``, ``experts.down_proj`` with ``(E, I, H)``.
    ValueError naming the tensor: missing, not uint8, a shape other than the one ``shape`` implies (``K`` must be a
    multiple of 32), a block past bfloat16's range (:func:`dequantize_mxfp4`).
    """
    e, k, n = shape
    blocks, scales = read_mxfp4_blocks(ckpt, name, shape)
    scales_name = name + "_scales"
    out = np.empty((e, n, k), np.uint16)
    for x in range(e):  # one expert's bytes decoded at a time: its index array and values are the only temporaries
        try:
            out[x] = dequantize_mxfp4(np.asarray(blocks[x]), np.asarray(scales[x]))  # [N, K]
        except ValueError as exc:
            raise ValueError(f"model: tensor {scales_name!r}, expert {x}: {exc}") from None
    return out.transpose(0, 2, 1)


def read_mxfp4_blocks(ckpt: Checkpoint, name: str, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The MXFP4 form of expert weight ``name`` as stored, ``shape`` ``(E, K, N)`` as :func:`read_mxfp4_experts`
    takes it: ``(blocks [E, N, K / 32, 16], scales [E, N, K / 32])``, uint8 arrays (memory-mapped where the
    checkpoint is), each checked as :func:`read_mxfp4_experts` checks them (ValueError naming the tensor)."""
    e, k, n = shape
    blocks_name, scales_name = name + "_blocks", name + "_scales"
    for t in (blocks_name, scales_name):
        if t not in ckpt:
            raise ValueError(
                f"model: the checkpoint has no tensor {t!r}: an MXFP4 weight is a pair of tensors, {blocks_name!r} "
                f"and {scales_name!r}; is the checkpoint complete?"
            )
        if ckpt.info(t).dtype != "uint8":
            raise ValueError(f"model: tensor {t!r} is {ckpt.info(t).dtype}; MXFP4 blocks and scales are U8")
    if k % BLOCK:
        raise ValueError(
            f"model: tensor {blocks_name!r}: MXFP4 packs 32 values per block along the {k} inputs (config.json), "
            f"which are not a multiple of 32"
        )
    return ckpt.array(blocks_name, (e, n, k // BLOCK, BLOCK // 2)), ckpt.array(scales_name, (e, n, k // BLOCK))


def declares_mxfp4(q: Any) -> bool:
    """Whether ``q``, a config's ``quantization_config`` value, declares MXFP4 (``quant_method: "mxfp4"``, the
    published gpt-oss checkpoints' and transformers' ``Mxfp4Config``)."""
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


@dataclass(frozen=True)
class Mxfp4Scheme:
    """A checkpoint's MXFP4 experts (gpt-oss's published layout) as the server reports them: ``method`` its
    ``quant_method`` (``/v1/models``), :meth:`describe` the start-up line's words."""

    method: str = "mxfp4"
    stored: bool = False
    """Whether the experts stay MXFP4 on the GPU (the MXFP4 grouped GEMV reads them at decode); False: dequantized
    to bfloat16 at load (:meth:`experts_for` decides)."""

    def experts_for(self, hidden: int, intermediate: int, ranks: int = 1) -> Mxfp4Scheme:
        """This scheme as the engine serves experts of ``hidden`` and ``intermediate`` sizes cut over ``ranks``
        tensor-parallel ranks: kept as stored where the grouped GEMV takes the shapes (each rank's intermediate
        share a multiple of 32, gate/up and down rows in tiles of 16), dequantized otherwise. A layer whose block
        scales pass ``2 ** 113`` (none in a real checkpoint) is dequantized at load even so."""
        share = intermediate // ranks if ranks > 0 and intermediate % max(ranks, 1) == 0 else 0
        fits = share > 0 and share % 32 == 0 and hidden % 32 == 0
        return Mxfp4Scheme(self.method, fits)

    def describe(self) -> str:
        """The layout in words, as the start-up line names it."""
        served = "kept as stored (the MXFP4 grouped GEMV)" if self.stored else "dequantized to bfloat16 at load"
        return f"MXFP4 experts (e2m1 values, an e8m0 scale per 32), {served}"


def mxfp4_scheme(q: Any) -> Mxfp4Scheme | None:
    """The :class:`Mxfp4Scheme` a ``quantization_config`` value declares (:func:`declares_mxfp4`), else None."""
    return Mxfp4Scheme() if declares_mxfp4(q) else None
