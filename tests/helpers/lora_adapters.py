"""Random LoRA adapters in PEFT's layout, written with numpy alone (``adapter_config.json`` and
``adapter_model.safetensors``), and the float32 products a reference merges into the base weights; plus the
kernels' arithmetic in numpy (:func:`bgmv_reference`), for the CPU tests of the slot layout."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fi_engine.checkpoint.safetensors import write_safetensors

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip


def llama_shapes(hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple[int, int]]:
    """``module -> (out, in)`` of a Llama layer's seven projections."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}  # fmt: skip


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _stored(x: np.ndarray, dtype: str) -> tuple[Any, np.ndarray]:
    """``x`` as written in ``dtype`` (what write_safetensors takes) and the float32 of the stored values."""
    if dtype == "float32":
        return x.astype(np.float32), x.astype(np.float32)
    if dtype == "float16":
        h = x.astype(np.float16)
        return h, h.astype(np.float32)
    bits = _bf16_bits(x)
    return (bits, "bfloat16"), (bits.astype(np.uint32) << 16).view(np.float32)


def write_adapter(
    folder: Path,
    shapes: dict[str, tuple[int, int]],
    layers: int,
    rank: int,
    alpha: float = 16.0,
    modules: Sequence[str] = ALL_MODULES,
    *,
    dtype: str = "bfloat16",
    rslora: bool = False,
    seed: int = 0,
    std: float = 0.05,
    config: dict[str, Any] | None = None,
    prefix: str = "base_model.model.",
) -> dict[tuple[int, str], np.ndarray]:
    """A random adapter of ``rank`` over ``modules`` of every one of ``layers`` layers, written into ``folder`` in
    ``dtype``; A and B drawn with standard deviation ``std`` (B too, unlike PEFT's zeros, so that it changes the
    model). ``config``: keys added to (or, set to None, removed from) ``adapter_config.json``. Returns each
    ``(layer, module)``'s float32 ``scale * B @ A`` of the stored values (what a merged reference adds to ``W``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    tensors: dict[str, Any] = {}
    deltas = {}
    for layer in range(layers):
        for m in modules:
            out, inp = shapes[m]
            a_w, a = _stored(rng.standard_normal((rank, inp)) * std, dtype)
            b_w, b = _stored(rng.standard_normal((out, rank)) * std, dtype)
            name = f"{prefix}model.layers.{layer}.{_BLOCK[m]}.{m}"
            tensors[f"{name}.lora_A.weight"] = a_w
            tensors[f"{name}.lora_B.weight"] = b_w
            deltas[layer, m] = np.float32(scale) * (b @ a)
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    cfg: dict[str, Any] = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(modules), "use_rslora": rslora,
        "lora_dropout": 0.0, "bias": "none", "modules_to_save": None, "use_dora": False, "fan_in_fan_out": False,
        "task_type": "CAUSAL_LM", "base_model_name_or_path": "random",
    }  # fmt: skip
    for k, v in (config or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return deltas


def bgmv_reference(
    x: np.ndarray,
    slots: np.ndarray,
    a: np.ndarray,
    bt: np.ndarray,
    scale: np.ndarray,
    targets: np.ndarray,
    bit: int,
    split: tuple[int, int],
    rank: int,
) -> np.ndarray:
    """The shrink and expand kernels' sum in float64 (``csrc/lora_bgmv.cu``): ``x [rows, k]`` float, ``a [slots,
    width, k]`` and ``bt [slots, rank, n]`` one layer's slot arrays as floats; returns what is added to ``y [rows,
    n]`` (zero rows for slot -1 or a slot without ``bit``)."""
    rows, n = x.shape[0], bt.shape[2]
    out = np.zeros((rows, n))
    n0, n1 = split
    part = (np.arange(n) >= n0).astype(int) + (np.arange(n) >= n1).astype(int)
    for r in range(rows):
        s = int(slots[r])
        if s < 0 or not targets[s] & bit:
            continue
        t = scale[s] * (a[s].astype(np.float64) @ x[r].astype(np.float64))  # [width]
        for j in range(n):
            p = part[j]
            out[r, j] = t[p * rank : (p + 1) * rank] @ bt[s, :, j].astype(np.float64)
    return out
