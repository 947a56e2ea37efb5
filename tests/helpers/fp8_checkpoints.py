"""FP8 (e4m3) checkpoints for tests and benchmarks, written without torch: a 16-bit checkpoint's projections
(:data:`PROJECTIONS`: Llama's seven per layer, Mixtral's experts ``w1``/``w2``/``w3``, DeepSeek's MLA projections;
routers, norms, embedding and LM head stay 16-bit, as the publishers' tools leave them) quantized to e4m3 with scales
in one of the published layouts (``"tensor"``: ``quant_method fp8`` with a scalar ``weight_scale``; ``"channel"``:
``fbgemm_fp8`` with ``weight_scale [n, 1]``; ``"block"``: ``quant_method fp8`` with ``weight_block_size [128, 128]``
and ``weight_scale_inv``), the rest copied. The dequantized float32 weights are returned, so a reference model can
be built on exactly what the checkpoint holds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from fi_engine.checkpoint.fp8_weights import E4M3, quantize_e4m3
from fi_engine.checkpoint.safetensors import Checkpoint, write_safetensors

PROJECTIONS = (
    *("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    *("w1", "w2", "w3"),  # Mixtral's experts
    *("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"),  # DeepSeek's MLA
)
CONFIGS = {
    "tensor": {"quant_method": "fp8", "activation_scheme": "dynamic"},
    "channel": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]},
    "block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
}


def _float32(ckpt: Checkpoint, name: str) -> np.ndarray:
    arr = np.asarray(ckpt.array(name))
    if ckpt.info(name).dtype == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def quantize(w: np.ndarray, layout: str, pow2: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w [n, k]`` float32 as (e4m3 codes, scales in the layout's shape, the dequantized float32 weight); each
    scale maps its group's largest magnitude to 448, as the published quantizers do; ``pow2``: each scale rounded up
    to a power of two, so every dequantized value (4 significant bits) is exact in bfloat16."""
    n, k = w.shape
    if layout == "tensor":
        scale = np.array(max(float(np.abs(w).max()), 1e-12) / 448, np.float32)
        full = np.full((n, 1), scale, np.float32)
    elif layout == "channel":
        scale = (np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12) / 448).astype(np.float32)
        full = scale
    else:
        bn = bk = 128
        pad = np.zeros((-(-n // bn) * bn, -(-k // bk) * bk), np.float32)
        pad[:n, :k] = np.abs(w)
        blocks = pad.reshape(pad.shape[0] // bn, bn, pad.shape[1] // bk, bk).max(axis=(1, 3))
        scale = (np.maximum(blocks, 1e-12) / 448).astype(np.float32)
        full = np.repeat(np.repeat(scale, bn, axis=0), bk, axis=1)[:n, :k]
    if pow2:
        scale = np.exp2(np.ceil(np.log2(scale))).astype(np.float32)
        full = np.exp2(np.ceil(np.log2(full))).astype(np.float32)
    codes = quantize_e4m3(w / full)
    return codes, scale, E4M3[codes] * full


def write_fp8_copy(src: Path, dst: Path, layout: str, pow2: bool = False) -> dict[str, np.ndarray]:
    """Copy the 16-bit checkpoint ``src`` to ``dst`` with its projections in FP8 ``layout`` (``pow2``: power-of-two
    scales, see :func:`quantize`); return the dequantized float32 weight of every projection, by tensor name."""
    ckpt = Checkpoint(src)
    dst.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray | tuple[np.ndarray, str]] = {}
    dequantized = {}
    for name, info in ckpt.tensors.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in PROJECTIONS and parts[-1] == "weight":
            codes, scale, deq = quantize(_float32(ckpt, name), layout, pow2)
            tensors[name] = (codes, "float8_e4m3fn")
            prefix = name[: -len("weight")]
            tensors[prefix + ("weight_scale_inv" if layout == "block" else "weight_scale")] = scale
            dequantized[name] = deq
        else:
            arr = np.asarray(ckpt.array(name))
            tensors[name] = (arr, info.dtype) if info.dtype == "bfloat16" else arr
    write_safetensors(dst / "model.safetensors", tensors)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = CONFIGS[layout]
    (dst / "config.json").write_text(json.dumps(config))
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)
    return dequantized
