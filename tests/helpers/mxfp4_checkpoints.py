"""gpt-oss checkpoints with MXFP4 experts, written with numpy the way the published ones store them, and the same
weights as a bfloat16 checkpoint, for the MXFP4 tests (``tests/engine/test_mxfp4_weights.py``, and on a GPU
``tests/engine/test_gpu_mxfp4.py``).

The packing is written here from the format's definition (OCP Microscaling MXFP4, as gpt-oss publishes it), not
from the engine's decoder: 32 values per block, e2m1 codes two per byte with the block's value ``2j`` in the low
nibble of byte ``j`` and ``2j + 1`` in the high one, one e8m0 scale byte ``s`` per block standing for
``2 ** (s - 127)``. The experts' tensors are ``gate_up_proj_blocks [E, 2I, H / 32, 16]`` (rows interleaving gate
and up) and ``down_proj_blocks [E, H, I / 32, 16]`` with their ``*_scales``; the bfloat16 checkpoint holds the
same values transposed (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``), as transformers' bfloat16
conversion of gpt-oss does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fi_engine.checkpoint.safetensors import write_safetensors
from helpers.hf_configs import GPT_OSS
from helpers.random_llama import bf16_bits

# e2m1 code -> value (the MX specification's table: sign bit 3, exponent bits 2-1 with bias 1, mantissa bit 0)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def pack_mxfp4(codes: np.ndarray) -> np.ndarray:
    """e2m1 ``codes [..., K]`` (each 0-15, ``K`` a multiple of 32) as the ``*_blocks`` tensor ``[..., K / 32, 16]``:
    byte ``j`` of block ``g`` is ``codes[32g + 2j] | codes[32g + 2j + 1] << 4``."""
    k = codes.shape[-1]
    pairs = codes.astype(np.uint8).reshape(*codes.shape[:-1], k // 32, 16, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def mxfp4_values(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float64 ``[..., K]``: the value of each code, ``E2M1_VALUES[code] * 2 ** (s - 127)`` with ``s`` its block's
    scale (``scales [..., K / 32]``)."""
    table = np.array(E2M1_VALUES)
    factor = np.ldexp(1.0, scales.astype(np.int64) - 127)
    return table[codes] * np.repeat(factor, 32, axis=-1)


def exact_bf16(values: np.ndarray) -> np.ndarray:
    """The bfloat16 bits (uint16) of float64 ``values`` that bfloat16 holds exactly (asserted: MXFP4 values are)."""
    f32 = values.astype(np.float32)
    assert np.array_equal(f32.astype(np.float64), values), "not exact in float32"
    bits = bf16_bits(f32)
    assert np.array_equal((bits.astype(np.uint32) << 16).view(np.float32), f32), "not exact in bfloat16"
    return bits


@dataclass(frozen=True)
class GptOssShape:
    """A small gpt-oss: sizes the sink kernels serve (head_dim 64), hidden and intermediate multiples of 32."""

    vocab: int = 4096
    hidden: int = 512
    intermediate: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    experts: int = 8
    top_k: int = 2
    window: int = 16


MXFP4_CONFIG = GPT_OSS["quantization_config"]  # gpt-oss-20b's, as published


def config(s: GptOssShape, mxfp4: bool) -> dict[str, Any]:
    """A gpt_oss config.json (transformers' GptOssConfig keys) of shape ``s``; MXFP4's quantization_config if
    ``mxfp4``."""
    cfg: dict[str, Any] = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
        "hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim,
        "num_local_experts": s.experts, "num_experts_per_tok": s.top_k, "experts_per_token": s.top_k,
        "sliding_window": s.window, "layer_types": ["sliding_attention", "full_attention"] * (s.layers // 2),
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 150000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 64},
        "swiglu_limit": 7.0, "tie_word_embeddings": False, "vocab_size": s.vocab, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "torch_dtype": "bfloat16",
    }  # fmt: skip
    if mxfp4:
        cfg["quantization_config"] = dict(MXFP4_CONFIG)
    return cfg


def random_experts(
    rng: np.random.Generator, s: GptOssShape, rows: int, cols: int, scales: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Random e2m1 codes ``[E, rows, cols]`` (every code equally likely) and scale bytes ``[E, rows, cols / 32]`` in
    ``[scales[0], scales[1])``."""
    codes = rng.integers(0, 16, size=(s.experts, rows, cols), dtype=np.uint8)
    scale = rng.integers(*scales, size=(s.experts, rows, cols // 32), dtype=np.uint8)
    return codes, scale


def write_gpt_oss_pair(root: Path, s: GptOssShape = GptOssShape(), seed: int = 0) -> tuple[Path, Path]:
    """One random gpt-oss written twice under ``root``: ``mxfp4/`` (experts as ``*_blocks`` / ``*_scales``,
    ``quantization_config`` MXFP4) and ``bf16/`` (the same experts' values in bfloat16, transformers' layout); every
    other tensor the same bfloat16 bits in both. Scales put gate/up values past the SwiGLU clamp (7) for some
    tokens. Returns ``(mxfp4_dir, bf16_dir)``."""
    rng = np.random.default_rng(seed)
    h, i, e, hq, hk, d = s.hidden, s.intermediate, s.experts, s.heads, s.kv_heads, s.head_dim

    def w(*shape: int, std: float = 0.05, mean: float = 0.0) -> tuple[np.ndarray, str]:
        return bf16_bits((mean + std * rng.standard_normal(shape)).astype(np.float32)), "bfloat16"

    shared: dict[str, Any] = {
        "model.embed_tokens.weight": w(s.vocab, h, std=1.0),
        "lm_head.weight": w(s.vocab, h),
        "model.norm.weight": w(h, mean=1.0, std=0.1),
    }
    mxfp4, bf16 = {}, {}
    for n in range(s.layers):
        p, a, m = f"model.layers.{n}.", f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
        shared.update({
            a + "q_proj.weight": w(hq * d, h), a + "q_proj.bias": w(hq * d, std=0.5),
            a + "k_proj.weight": w(hk * d, h), a + "k_proj.bias": w(hk * d, std=0.5),
            a + "v_proj.weight": w(hk * d, h), a + "v_proj.bias": w(hk * d, std=0.5),
            a + "o_proj.weight": w(h, hq * d), a + "o_proj.bias": w(h, std=0.5), a + "sinks": w(hq, std=0.5),
            p + "input_layernorm.weight": w(h, mean=1.0, std=0.1),
            p + "post_attention_layernorm.weight": w(h, mean=1.0, std=0.1),
            m + "router.weight": w(e, h), m + "router.bias": w(e, std=0.5),
            m + "experts.gate_up_proj_bias": w(e, 2 * i, std=0.5), m + "experts.down_proj_bias": w(e, h, std=0.5),
        })  # fmt: skip
        # gate/up: value std ~2.9 * 2**-4.5 over 512 inputs of RMS 1: sums of std ~3, past the clamp (7) at times
        for name, (rows, cols), scales in (("gate_up_proj", (2 * i, h), (121, 124)), ("down_proj", (h, i), (117, 120))):
            codes, scale = random_experts(rng, s, rows, cols, scales)
            mxfp4[m + f"experts.{name}_blocks"] = pack_mxfp4(codes)
            mxfp4[m + f"experts.{name}_scales"] = scale
            bf16[m + f"experts.{name}"] = exact_bf16(mxfp4_values(codes, scale)).transpose(0, 2, 1), "bfloat16"
    dirs = []
    for kind, experts in (("mxfp4", mxfp4), ("bf16", bf16)):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / "model.safetensors", {**shared, **experts})
        (folder / "config.json").write_text(json.dumps(config(s, kind == "mxfp4")))
        dirs.append(folder)
    return dirs[0], dirs[1]
