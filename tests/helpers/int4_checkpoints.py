"""AWQ and GPTQ int4 checkpoints for tests, written without torch the way the publishers' tools write them, with
packers of this module's own (independent of fi_engine.checkpoint.int4_weights' unpacking):

- AWQ (AutoAWQ ``WQLinear_GEMM``, ``version: "gemm"``): ``qweight`` int32 ``[k, n/8]`` and ``qzeros`` int32
  ``[G, n/8]``, eight output columns to an int32 in the interleave :data:`AWQ_INTERLEAVE` (nibble ``j``, bits
  ``4j .. 4j+3``, holds column ``AWQ_INTERLEAVE[j]`` of the eight), ``scales`` float16 ``[G, n]``;
- GPTQ (AutoGPTQ / GPTQModel): ``qweight`` int32 ``[k/8, n]``, eight inputs to an int32 in order (nibble ``j`` of
  row ``r`` holds input ``8r + j``), ``qzeros`` int32 ``[G, n/8]`` eight output columns in order, stored minus one
  in the v1 layout (``checkpoint_format: "gptq"``) and as they are in ``gptq_v2``; ``scales`` float16 ``[G, n]``;
  ``g_idx`` int32 ``[k]`` = ``i // group_size``.

Every weight is ``(q - z) * s`` of its group (``G = ceil(k / group_size)`` groups of consecutive inputs per output
column). :func:`quantize_groups` rounds a float32 weight AutoAWQ's way (asymmetric: min/max per group) or GPTQ's
symmetric way (zero 8); :func:`write_int4_copy` writes a 16-bit Llama checkpoint's projections in a layout and
returns what they dequantize to, which :func:`write_16bit_copy` can write as a 16-bit checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fi_engine.checkpoint.safetensors import Checkpoint, write_safetensors
from helpers.random_llama import bf16_bits

AWQ_INTERLEAVE = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's order_map: nibble j holds column AWQ_INTERLEAVE[j]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _words(fields: list[np.ndarray]) -> np.ndarray:
    """int32 words whose nibble ``j`` (bits ``4j .. 4j+3``) is ``fields[j]`` (eight arrays of 0..15)."""
    word = np.zeros(fields[0].shape, np.uint32)
    for j, field in enumerate(fields):  # one nibble at a time, as the publishers' packers loop
        assert field.min() >= 0 and field.max() <= 15
        word |= field.astype(np.uint32) << np.uint32(4 * j)
    return word.view(np.int32)


def pack_awq(values: np.ndarray) -> np.ndarray:
    """``values`` ``[rows, n]`` (0..15) as AWQ packs them: int32 ``[rows, n/8]``, interleaved."""
    return _words([values[:, AWQ_INTERLEAVE[j] :: 8] for j in range(8)])


def pack_columns(values: np.ndarray) -> np.ndarray:
    """``values`` ``[rows, n]`` (0..15) eight columns to an int32 in order (GPTQ's ``qzeros``): ``[rows, n/8]``."""
    return _words([values[:, j::8] for j in range(8)])


def pack_rows(values: np.ndarray) -> np.ndarray:
    """``values`` ``[k, n]`` (0..15) eight rows to an int32 in order (GPTQ's ``qweight``): ``[k/8, n]``."""
    return _words([values[j::8] for j in range(8)])


def pack_one_by_one(values: np.ndarray, along_rows: bool, order: tuple[int, ...] = tuple(range(8))) -> np.ndarray:
    """The packers above, an element at a time in plain Python integers (to check them on small arrays):
    ``along_rows`` packs eight rows (GPTQ's weight), else eight columns in ``order`` (AWQ's or GPTQ's zeros)."""
    rows, cols = values.shape
    shape = (rows // 8, cols) if along_rows else (rows, cols // 8)
    out = np.zeros(shape, np.int64)
    for r in range(shape[0]):
        for c in range(shape[1]):
            word = 0
            for j in range(8):
                v = int(values[8 * r + j, c]) if along_rows else int(values[r, 8 * c + order[j]])
                word += v * 16**j
            out[r, c] = word - (1 << 32) if word >= 1 << 31 else word  # the int32 of the same bits
    return out.astype(np.int32)


def groups_of(k: int, group_size: int) -> int:
    return -(-k // (k if group_size == -1 else group_size))


def expand(per_group: np.ndarray, k: int, group_size: int) -> np.ndarray:
    """``[G, n]`` -> ``[k, n]``: each group's row repeated over its inputs."""
    g = k if group_size == -1 else group_size
    return np.repeat(per_group, g, axis=0)[:k]


def reference(q: np.ndarray, z: np.ndarray, s: np.ndarray, group_size: int) -> np.ndarray:
    """The float32 weight ``[n, k]`` of codes ``q [k, n]``, zeros ``z [G, n]`` (the real zeros) and float16 scales
    ``s [G, n]``: ``(q - z) * s`` per group, in float32 (exact: at most 5 by 11 significant bits)."""
    k = q.shape[0]
    diff = q.astype(np.float32) - expand(z, k, group_size).astype(np.float32)
    return (diff * expand(s, k, group_size).astype(np.float32)).T.copy()


def quantize_groups(w: np.ndarray, group_size: int, sym: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 ``w [n, k]`` -> (codes ``[k, n]``, zeros ``[G, n]``, float16 scales ``[G, n]``): per group of inputs,
    asymmetric (AutoAWQ, GPTQ ``sym: false``: ``s = (max - min) / 15``, ``z = round(-min / s)``) or symmetric (GPTQ
    ``sym: true``: ``s = 2 max|w| / 15``, ``z = 8``); the codes are rounded against the float16 scale."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    G = groups_of(k, group_size)
    wt = w.T.astype(np.float32)  # [k, n]
    s = np.empty((G, n), np.float32)
    z = np.empty((G, n), np.float32)
    for i in range(G):
        part = wt[i * g : (i + 1) * g]
        if sym:
            s[i] = np.maximum(2 * np.abs(part).max(axis=0) / 15, 1e-5)
            z[i] = 8
        else:
            lo, hi = part.min(axis=0), part.max(axis=0)
            s[i] = np.maximum(hi - lo, 1e-5) / 15
            z[i] = np.clip(np.round(-lo / s[i]), 0, 15)
    s16 = s.astype(np.float16)
    q = np.clip(np.round(wt / expand(s16, k, group_size).astype(np.float32)) + expand(z, k, group_size), 0, 15)
    return q.astype(np.uint8), z.astype(np.uint8), s16


def int4_tensors(
    prefix: str, q: np.ndarray, z: np.ndarray, s: np.ndarray, method: str, group_size: int, v1: bool = True
) -> dict[str, Any]:
    """One projection's tensors as the tool of ``method`` writes them (GPTQ ``v1``: the zeros stored minus one,
    4 bits wide, so a zero of 0 is stored as 15)."""
    if method == "awq":
        return {prefix + ".qweight": pack_awq(q), prefix + ".qzeros": pack_awq(z), prefix + ".scales": s}
    k = q.shape[0]
    stored = (z.astype(np.int64) - 1) % 16 if v1 else z
    g = k if group_size == -1 else group_size
    return {
        prefix + ".qweight": pack_rows(q),
        prefix + ".qzeros": pack_columns(stored),
        prefix + ".scales": s,
        prefix + ".g_idx": (np.arange(k) // g).astype(np.int32),
    }


def quantization_config(method: str, group_size: int, *, sym: bool = True, v1: bool = True) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` as AutoAWQ (``to_transformers_dict``) or GPTQModel write it."""
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}  # fmt: skip
    return {"bits": 4, "group_size": group_size, "desc_act": False, "sym": sym, "lm_head": False,
            "quant_method": "gptq", "checkpoint_format": "gptq" if v1 else "gptq_v2", "pack_dtype": "int32",
            "meta": {"quantizer": ["tests"]}, "true_sequential": True, "damp_percent": 0.01}  # fmt: skip


def _float32(ckpt: Checkpoint, name: str) -> np.ndarray:
    arr = np.asarray(ckpt.array(name))
    if ckpt.info(name).dtype == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def _copy_extras(src: Path, dst: Path, config: dict[str, Any]) -> None:
    (dst / "config.json").write_text(json.dumps(config))
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)


def write_int4_copy(
    src: Path, dst: Path, method: str, group_size: int, *, sym: bool = True, v1: bool = True
) -> dict[str, np.ndarray]:
    """Copy the 16-bit Llama checkpoint ``src`` to ``dst`` with its seven projections per layer quantized to int4
    in ``method``'s layout (``sym`` and ``v1``: GPTQ's), the rest copied; return the float32 weight ``[n, k]`` each
    projection dequantizes to, by its ``.weight`` name."""
    ckpt = Checkpoint(src)
    dst.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    dequantized = {}
    for name, info in ckpt.tensors.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in PROJECTIONS and parts[-1] == "weight":
            q, z, s = quantize_groups(_float32(ckpt, name), group_size, sym=sym and method == "gptq")
            tensors.update(int4_tensors(name[: -len(".weight")], q, z, s, method, group_size, v1))
            if method == "gptq" and v1:  # what v1 readers take the stored zero for: stored + 1 (0 -> 15 -> 16)
                z = (z.astype(np.int64) - 1) % 16 + 1
            dequantized[name] = reference(q, z, s, group_size)
        else:
            arr = np.asarray(ckpt.array(name))
            tensors[name] = (arr, info.dtype) if info.dtype == "bfloat16" else arr
    write_safetensors(dst / "model.safetensors", tensors)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(method, group_size, sym=sym, v1=v1)
    _copy_extras(src, dst, config)
    return dequantized


def write_16bit_copy(src: Path, dst: Path, weights: dict[str, np.ndarray]) -> None:
    """Copy the 16-bit checkpoint ``src`` to ``dst`` with ``weights`` (float32, by tensor name) in its place, rounded
    to the tensor's float16 or bfloat16 (to nearest even); config.json as ``src``'s (no quantization_config)."""
    ckpt = Checkpoint(src)
    dst.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    for name, info in ckpt.tensors.items():
        arr = np.asarray(ckpt.array(name))
        if name in weights:
            assert info.dtype in ("float16", "bfloat16"), "write_16bit_copy writes 16-bit weights"
            arr = weights[name].astype(np.float16) if info.dtype == "float16" else bf16_bits(weights[name])
        tensors[name] = (arr, info.dtype) if info.dtype == "bfloat16" else arr
    write_safetensors(dst / "model.safetensors", tensors)
    _copy_extras(src, dst, json.loads((src / "config.json").read_text()))
