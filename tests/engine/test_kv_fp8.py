"""The FP8 KV cache's arguments and refusals on CPU (fi_engine.layers.kv_fp8): ``kv_cache_dtype`` and
``kv_cache_scales`` checked by name, every combination without an FP8 attention kernel refused at construction naming
``kv_cache_dtype``, what is missing and what is supported (before any GPU work), and the scales read from a checkpoint's
``self_attn.k_scale`` / ``v_scale`` tensors. The engine itself runs in test_gpu_kv_fp8.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.checkpoints import without_weights
from helpers.hf_configs import DEEPSEEK_V3, GEMMA2, GPT_OSS_BF16

from fi_engine.checkpoint.safetensors import Checkpoint, write_safetensors
from fi_engine.layers import kv_fp8
from fi_engine.models.llama import LlamaEngine

LLAMA_128: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize(
    ("value", "want"), [(None, "auto"), ("auto", "auto"), ("fp8", "fp8_e4m3"), ("fp8_e4m3", "fp8_e4m3")]
)
def test_kv_cache_dtype_spellings(value: Any, want: str) -> None:
    assert kv_fp8.parse_kv_cache_dtype(value) == want


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("fp8_e5m2", ValueError, r"^kv_cache_dtype: expected None or one of auto, fp8_e4m3, fp8, got 'fp8_e5m2' \(no "),
        ("bfloat16", ValueError, r"^kv_cache_dtype: expected None or one of auto, fp8_e4m3, fp8, got 'bfloat16'$"),
        ("FP8", ValueError, r"^kv_cache_dtype: expected"),
        (8, TypeError, r"^kv_cache_dtype: expected None or one of .*, got 8"),
        (True, TypeError, r"^kv_cache_dtype: expected"),
    ],
)
def test_bad_kv_cache_dtype_is_named(tmp_path: Path, value: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        kv_fp8.parse_kv_cache_dtype(value)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_128))
    with pytest.raises(error, match=match):  # the engine refuses it before any GPU work
        LlamaEngine(tmp_path, kv_cache_dtype=value)


@pytest.mark.parametrize(
    "value",
    [
        *[(1.0,), (1.0, 0.0), (1.0, float("inf")), (float("nan"), 1.0), ("1", 1.0), (True, 1.0), 1.0, "1,1"],
        # finite and > 0, but the scale or its reciprocal is no float32 (struct.pack raised OverflowError at launch)
        *[(1e-39, 1.0), (1.0, 1e39), (1.0, 1e300), (1e-300, 1.0)],
    ],
)
def test_bad_kv_cache_scales_are_named(tmp_path: Path, value: Any) -> None:
    with pytest.raises(ValueError, match=r"^kv_cache_scales: expected None or a pair \(k_scale, v_scale\)"):
        kv_fp8.parse_scales(value)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_128))
    with pytest.raises(ValueError, match=r"^kv_cache_scales: expected"):
        LlamaEngine(tmp_path, kv_cache_dtype="fp8_e4m3", kv_cache_scales=value)


def test_scales_without_an_fp8_cache_are_refused(tmp_path: Path) -> None:
    assert kv_fp8.parse_scales((0.5, 2)) == (0.5, 2.0)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_128))
    with pytest.raises(ValueError, match=r"^kv_cache_scales: only an FP8 KV cache has scales; pass kv_cache_dtype"):
        LlamaEngine(tmp_path, kv_cache_scales=(0.5, 2.0))


SUPPORTED = (
    r"it serves bfloat16 Llama-family models \(llama, qwen3, mixtral, qwen3_moe\) with head_dim 128; use kv_cache"
)


@pytest.mark.parametrize(
    ("change", "missing"),
    [
        ({"head_dim": 64}, r"head_dim 64 \(the FP8 modules are head_dim 128\)"),
        ({"head_dim": 256, "hidden_size": 2048}, r"head_dim 256 \(the FP8 modules are head_dim 128\)"),
        ({"torch_dtype": "float16"}, r"float16 queries \(the FP8 modules take bfloat16 q and output\)"),
        ({"torch_dtype": None, "dtype": "float16"}, r"float16 queries \(the FP8 modules take bfloat16 q and output\)"),
    ],
)
def test_llama_settings_without_a_kernel_are_refused_at_construction(
    tmp_path: Path, change: dict[str, Any], missing: str
) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_128, **change}))
    with pytest.raises(
        ValueError, match=rf"^kv_cache_dtype: fp8_e4m3 has no attention kernel for {missing}; {SUPPORTED}"
    ):
        LlamaEngine(tmp_path, kv_cache_dtype="fp8_e4m3")


def test_a_supported_llama_passes_the_checks() -> None:
    """The checks that run before the GPU accept a bfloat16 head_dim 128 Llama (and Qwen3-style, no dtype key)."""
    from fi_engine.checkpoint.config import LlamaConfig
    from fi_engine.models.llama import Llama

    cfg = LlamaConfig.from_dict(LLAMA_128)
    kv_fp8.check_supported(Llama(), cfg, "/nonexistent")  # no config.json to read: the weights decide at load
    kv_fp8.check_model_dtype("bfloat16")
    with pytest.raises(ValueError, match=r"^kv_cache_dtype: fp8_e4m3 has no attention kernel for float16 queries"):
        kv_fp8.check_model_dtype("float16")


@pytest.mark.parametrize(
    ("config", "engine", "missing"),
    [
        (GEMMA2, "fi_engine.models.gemma2.Gemma2Engine", r"Gemma 2's attention \(logits soft caps and sliding windows"),
        (GPT_OSS_BF16, "fi_engine.models.gpt_oss.GptOssEngine", r"gpt-oss's attention sinks"),
    ],
)
def test_families_without_an_fp8_kernel_are_refused(tmp_path: Path, config: dict, engine: str, missing: str) -> None:
    import importlib

    module, _, name = engine.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"^kv_cache_dtype: fp8_e4m3 has no attention kernel for {missing}"):
        cls(tmp_path, kv_cache_dtype="fp8")


def test_deepseek_mla_is_refused(tmp_path: Path) -> None:
    from fi_engine.models.deepseek import DeepSeekEngine

    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    with pytest.raises(ValueError, match=r"^kv_cache_dtype: fp8_e4m3 has no attention kernel for MLA \(DeepSeek"):
        DeepSeekEngine(tmp_path, kv_cache_dtype="fp8_e4m3")


@pytest.mark.cpu_only  # it reaches the GPU look-up, which must fail here
def test_a_supported_llama_gets_as_far_as_the_gpu(tmp_path: Path) -> None:
    from fi_ffi.errors import UnsupportedDeviceError

    with pytest.raises(UnsupportedDeviceError):
        LlamaEngine(without_weights(tmp_path, LLAMA_128), kv_cache_dtype="fp8_e4m3", kv_cache_scales=(0.5, 0.25))


def _checkpoint(tmp_path: Path, tensors: dict[str, np.ndarray]) -> Checkpoint:
    write_safetensors(tmp_path / "model.safetensors", {k: (v, "float32") for k, v in tensors.items()})
    return Checkpoint(tmp_path)


def test_scales_read_from_the_checkpoint(tmp_path: Path) -> None:
    """The largest per-layer scale of each (a layer without one counts as 1.0); none at all: (1.0, 1.0)."""
    ckpt = _checkpoint(
        tmp_path,
        {
            "model.layers.0.self_attn.k_scale": np.array(2.5, np.float32),
            "model.layers.1.self_attn.k_scale": np.array([4.0], np.float32),
            "model.layers.0.self_attn.v_scale": np.array(0.5, np.float32),
            "model.layers.1.self_attn.v_scale": np.array(0.25, np.float32),
        },
    )
    assert kv_fp8.read_scales(ckpt, 2) == (4.0, 1.0)  # v: 0.5 and 0.25 against a layer 2 without one (1.0)
    assert kv_fp8.read_scales(ckpt, 1) == (2.5, 1.0)
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    bits = np.array([0x4040], np.uint16)  # 3.0 in bfloat16
    write_safetensors(bf16 / "model.safetensors", {"model.layers.0.self_attn.k_scale": (bits, "bfloat16")})
    assert kv_fp8.read_scales(Checkpoint(bf16), 1) == (3.0, 1.0)
    (tmp_path / "none").mkdir()
    empty = _checkpoint(tmp_path / "none", {"model.norm.weight": np.ones(4, np.float32)})
    assert kv_fp8.read_scales(empty, 2) == (1.0, 1.0)


@pytest.mark.parametrize(
    "bad",
    [
        *[np.array([1.0, 2.0], np.float32), np.array(0.0, np.float32), np.array(-1.0, np.float32)],
        np.array(1e-39, np.float32),  # a subnormal whose reciprocal is no float32
        np.array(np.inf, np.float32),
    ],
)
def test_bad_checkpoint_scales_are_named(tmp_path: Path, bad: np.ndarray) -> None:
    ckpt = _checkpoint(tmp_path, {"model.layers.0.self_attn.v_scale": bad})
    with pytest.raises(ValueError, match=r"^model: tensor 'model.layers.0.self_attn.v_scale' must hold one finite"):
        kv_fp8.read_scales(ckpt, 1)
