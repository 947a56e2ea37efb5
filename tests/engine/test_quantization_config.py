"""Quantized Llama-family checkpoints (fi_engine.checkpoint.quantization): the FP8 layouts as published configs write
them are recognized and served for dense models (``LlamaConfig.fp8``) and for mixture-of-experts models (their
experts dequantized at load: tests/engine/test_fp8_moe.py reads them); compressed-tensors' block strategy is refused
by name, malformed FP8 configs naming the key, and other methods by their quant_method (AWQ and GPTQ int4:
tests/engine/test_int4_weights.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fi_engine.checkpoint.config import LlamaConfig
from fi_engine.checkpoint.quantization import Fp8Scheme, fp8_scheme

BASE = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
}
# as the published checkpoints write them (the keys and values, not copied files)
QWEN3_FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
LLAMA31_FP8_CT = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False, "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
        }
    },
    "ignore": ["lm_head"],
}
FBGEMM = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}


@pytest.mark.parametrize(
    ("q", "want"),
    [
        (QWEN3_FP8, Fp8Scheme("fp8", "block", "dynamic", (128, 128))),
        ({"quant_method": "fp8", "activation_scheme": "static"}, Fp8Scheme("fp8", "tensor", "static")),
        (LLAMA31_FP8_CT, Fp8Scheme("compressed-tensors", "channel", "dynamic")),
        (FBGEMM, Fp8Scheme("fbgemm_fp8", "channel", "dynamic")),
        ({"quant_method": "awq", "bits": 4}, None),
    ],
)
def test_published_layouts_are_read_by_name(q: dict[str, Any], want: Fp8Scheme | None) -> None:
    assert fp8_scheme(q, "config.json") == want


@pytest.mark.parametrize(
    ("q", "want"),
    [
        (QWEN3_FP8, Fp8Scheme("fp8", "block", "dynamic", (128, 128))),
        (LLAMA31_FP8_CT, Fp8Scheme("compressed-tensors", "channel", "dynamic")),
        (FBGEMM, Fp8Scheme("fbgemm_fp8", "channel", "dynamic")),
        ({"quant_method": "fp8", "activation_scheme": "static"}, Fp8Scheme("fp8", "tensor", "static")),
    ],
)
def test_a_dense_fp8_checkpoint_is_served(q: Any, want: Fp8Scheme) -> None:
    assert LlamaConfig.from_dict({**BASE, "quantization_config": q}).fp8 == want
    assert LlamaConfig.from_dict({**BASE, "model_type": "qwen3", "quantization_config": q}).fp8 == want


MIXTRAL = {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}
QWEN3_MOE = {"model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768}


@pytest.mark.parametrize("extra", [MIXTRAL, QWEN3_MOE], ids=["mixtral", "qwen3_moe"])
@pytest.mark.parametrize(
    ("q", "want"),
    [
        (QWEN3_FP8, Fp8Scheme("fp8", "block", "dynamic", (128, 128), stored_experts=True)),
        (LLAMA31_FP8_CT, Fp8Scheme("compressed-tensors", "channel", "dynamic", None, stored_experts=True)),
        ({"quant_method": "fp8", "activation_scheme": "static"}, Fp8Scheme("fp8", "tensor", "static", None, "", True)),
    ],
    ids=["block", "channel", "tensor"],
)
def test_an_fp8_moe_checkpoints_experts_are_read_as_stored(
    extra: dict[str, Any], q: dict[str, Any], want: Fp8Scheme
) -> None:
    config = LlamaConfig.from_dict({**BASE, **extra, "quantization_config": q}, source="config.json")
    assert config.moe is not None and config.fp8 == want
    assert config.fp8.describe().endswith(" scales (experts read as stored by the FP8 grouped GEMV)")
    dense = LlamaConfig.from_dict({**BASE, "quantization_config": q}).fp8
    assert dense is not None and dense.dequantized == "" and not dense.stored_experts
    assert "dequantized" not in dense.describe() and "experts" not in dense.describe()


@pytest.mark.parametrize("block", [[128, 64], [8, 128], [128, 96]])
def test_fp8_moe_experts_in_blocks_the_grouped_gemv_cannot_take_are_dequantized(block: list[int]) -> None:
    q = {**QWEN3_FP8, "weight_block_size": block}
    config = LlamaConfig.from_dict({**BASE, **MIXTRAL, "quantization_config": q}, source="config.json")
    assert config.fp8 is not None and config.fp8.dequantized == "experts" and not config.fp8.stored_experts
    assert config.fp8.describe().endswith(" scales (experts dequantized to 16-bit at load)")


@pytest.mark.parametrize(
    ("q", "message"),
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes') is not supported"),
        (
            {
                **LLAMA31_FP8_CT,
                "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "block"}}},
            },
            "block strategy is not served yet",
        ),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "quantization_config.weight_block_size: expected two"),
        ({"quant_method": "fp8", "activation_scheme": "lazy"}, "quantization_config.activation_scheme: expected"),
        ({"quant_method": "compressed-tensors"}, "quantization_config.config_groups: expected an object"),
        ("fp8", "quantization_config: expected an object"),
    ],
)
def test_an_unserved_quantization_is_refused_naming_what_it_is(tmp_path: Path, q: Any, message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "quantization_config": q}))
    with pytest.raises(ValueError, match="config.json") as info:
        LlamaConfig.from_dir(tmp_path)
    assert message in str(info.value)


def test_a_16_bit_checkpoint_is_unaffected() -> None:
    config = LlamaConfig.from_dict(BASE)
    assert config.hidden_size == 4096 and config.fp8 is None
