"""LoRA adapters in PEFT's layout read on CPU (:func:`fi_engine.lora.adapter.read_adapter`): the matrices and scale
of a folder written with numpy (``helpers.lora_adapters``), rsLoRA's scale against the plain one, float32 and
float16 files in a bfloat16 base, and every refusal, each naming its key or tensor and never the folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.lora_adapters import ALL_MODULES, llama_shapes, write_adapter

from fi_engine.checkpoint.safetensors import write_safetensors
from fi_engine.lora.adapter import BaseShapes, read_adapter

SHAPES = llama_shapes(64, 96, 4, 2, 16)  # q [64, 64], k/v [32, 64], o [64, 64], gate/up [96, 64], down [64, 96]
BASE = BaseShapes(2, "bfloat16", SHAPES)


def bf16_floats(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_an_adapter_reads_as_written(tmp_path: Path) -> None:
    deltas = write_adapter(tmp_path, SHAPES, 2, 8, alpha=16.0, modules=("q_proj", "v_proj", "down_proj"))
    a = read_adapter(tmp_path, BASE, 16)
    assert (a.rank, a.alpha, a.scale) == (8, 16.0, 2.0)
    assert a.modules == {"q_proj", "v_proj", "down_proj"}
    assert sorted(a.weights) == [(i, m) for i in range(2) for m in ("down_proj", "q_proj", "v_proj")]
    for (layer, module), (wa, wb) in a.weights.items():
        out, inp = SHAPES[module]
        assert wa.shape == (8, inp) and wb.shape == (out, 8) and wa.dtype == wb.dtype == np.uint16  # bf16 bits
        merged = np.float32(a.scale) * (bf16_floats(wb) @ bf16_floats(wa))
        np.testing.assert_allclose(merged, deltas[layer, module], rtol=1e-5, atol=1e-7)
    assert a.nbytes == sum(x.nbytes + y.nbytes for x, y in a.weights.values())


def test_rslora_scales_by_the_square_root_of_the_rank(tmp_path: Path) -> None:
    write_adapter(tmp_path / "plain", SHAPES, 1, 16, alpha=32.0, modules=("q_proj",))
    write_adapter(tmp_path / "rs", SHAPES, 1, 16, alpha=32.0, modules=("q_proj",), rslora=True)
    base = BaseShapes(1, "bfloat16", SHAPES)
    assert read_adapter(tmp_path / "plain", base, 16).scale == 32.0 / 16
    assert read_adapter(tmp_path / "rs", base, 16).scale == 32.0 / math.sqrt(16)
    write_adapter(tmp_path / "default", SHAPES, 1, 4, modules=("q_proj",), config={"lora_alpha": None})
    assert read_adapter(tmp_path / "default", base, 16).scale == 8 / 4  # PEFT's default lora_alpha, 8


@pytest.mark.parametrize("stored", ["float32", "float16", "bfloat16"])
def test_any_float_file_is_read_into_the_bases_type_rounded_to_nearest(tmp_path: Path, stored: str) -> None:
    write_adapter(tmp_path, SHAPES, 1, 4, modules=("o_proj",), dtype=stored, prefix="")  # (no base_model.model.)
    for dtype, storage in (("bfloat16", np.uint16), ("float16", np.float16)):
        a = read_adapter(tmp_path, BaseShapes(1, dtype, SHAPES), 8)
        wa, wb = a.weights[0, "o_proj"]
        assert wa.dtype == wb.dtype == storage and wa.flags.c_contiguous
        values = bf16_floats(wa) if dtype == "bfloat16" else wa.astype(np.float32)
        assert np.abs(values).max() > 0


def test_an_adapter_name_between_lora_a_and_weight_is_accepted(tmp_path: Path) -> None:
    tensors = {n.replace(".weight", ".default.weight"): v for n, v in pair("q_proj").items()}
    write_tensors(tmp_path, tensors)
    assert read_adapter(tmp_path, BASE, 8).modules == {"q_proj"}


def config_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text())


# (config keys set, the message's start): each refused naming its key
REFUSED_CONFIG = [
    ({"modules_to_save": ["lm_head"]}, r"adapter_config\.json: modules_to_save: \['lm_head'\]: whole modules"),
    ({"r": 64}, r"adapter_config\.json: r: rank 64 exceeds the engine's max_lora_rank 16; raise max_lora_rank"),
    ({"r": 0}, r"adapter_config\.json: r: expected the rank, an int >= 1, got 0"),
    ({"r": "8"}, r"adapter_config\.json: r: expected the rank"),
    ({"r": None}, r"adapter_config\.json: r: expected the rank"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, r"target_modules: \['embed_tokens'\] not served"),
    ({"target_modules": 5}, r"target_modules: expected a list of module names, got 5"),
    ({"use_dora": True}, r"use_dora: DoRA adapters are not served"),
    ({"bias": "all"}, r"bias: 'all': trained biases are not served; train with bias='none'"),
    ({"bias": "lora_only"}, r"bias: 'lora_only'"),
    ({"peft_type": "IA3"}, r"peft_type: 'IA3' is not served"),
    ({"fan_in_fan_out": True}, r"fan_in_fan_out: transposed"),
    ({"rank_pattern": {"q_proj": 4}}, r"rank_pattern: a rank or alpha per module is not served"),
    ({"alpha_pattern": {"q_proj": 4}}, r"alpha_pattern: "),
    ({"lora_alpha": float("inf")}, r"lora_alpha: expected a finite number"),
    ({"lora_alpha": "16"}, r"lora_alpha: expected a finite number"),
    ({"use_rslora": "yes"}, r"use_rslora: expected true or false"),
]


@pytest.mark.parametrize(("config", "match"), REFUSED_CONFIG, ids=[next(iter(c)) + str(i) for i, (c, _) in
                                                                     enumerate(REFUSED_CONFIG)])  # fmt: skip
def test_a_config_key_that_is_not_served_is_refused_by_name(tmp_path: Path, config: dict, match: str) -> None:
    write_adapter(tmp_path, SHAPES, 2, 8, modules=("q_proj",), config=config)
    with pytest.raises(ValueError, match=match) as e:
        read_adapter(tmp_path, BASE, 16)
    assert str(tmp_path) not in str(e.value)


def test_a_rank_above_max_lora_rank_is_refused_but_one_at_it_is_served(tmp_path: Path) -> None:
    write_adapter(tmp_path, SHAPES, 1, 16, modules=("q_proj",))
    base = BaseShapes(1, "bfloat16", SHAPES)
    assert read_adapter(tmp_path, base, 16).rank == 16
    with pytest.raises(ValueError, match=r"r: rank 16 exceeds the engine's max_lora_rank 8"):
        read_adapter(tmp_path, base, 8)


def test_missing_files_and_malformed_json_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^lora_path: no such folder") as e:
        read_adapter(tmp_path / "nowhere", BASE, 16)
    assert str(tmp_path) not in str(e.value)
    write_adapter(tmp_path, SHAPES, 2, 8, modules=("q_proj",))
    weights = (tmp_path / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"^adapter_model\.safetensors: missing from the adapter folder$"):
        read_adapter(tmp_path, BASE, 16)
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"adapter_model\.bin, pickled, is not read: save it with safe_serialization"):
        read_adapter(tmp_path, BASE, 16)
    (tmp_path / "adapter_model.safetensors").write_bytes(weights)
    for text in ("{not json", "[1, 2]", "\xff\xfe"):
        (tmp_path / "adapter_config.json").write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError, match=r"^adapter_config\.json: (not readable JSON|expected a JSON object)"):
            read_adapter(tmp_path, BASE, 16)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match=r"^adapter_config\.json: missing from the adapter folder$"):
        read_adapter(tmp_path, BASE, 16)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    write_adapter(tmp_path / "ok", SHAPES, 2, 8, modules=("q_proj",))
    (tmp_path / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match=r"^adapter_model\.safetensors") as e:
        read_adapter(tmp_path, BASE, 16)
    assert str(tmp_path) not in str(e.value)


def write_tensors(folder: Path, tensors: dict[str, Any], rank: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 8, "target_modules": "q_proj"}))


def pair(module: str, layer: int = 0, block: str = "self_attn", a_shape=None, b_shape=None, dtype=np.float16):
    out, inp = SHAPES.get(module, (64, 64))
    name = f"base_model.model.model.layers.{layer}.{block}.{module}"
    return {
        f"{name}.lora_A.weight": np.zeros(a_shape or (4, inp), dtype),
        f"{name}.lora_B.weight": np.zeros(b_shape or (out, 4), dtype),
    }


# (tensors, the message's start): tensors that do not fit the base, each named
REFUSED_TENSORS = [
    (pair("q_proj", a_shape=(4, 32)), r"layers\.0\.self_attn\.q_proj\.lora_A\.weight: shape \[4, 32\], expected "
     r"\[4, 64\] \(rank 4 of the base model's q_proj \[64, 64\]\); was it trained on this base model\?"),
    (pair("k_proj", b_shape=(64, 4)), r"k_proj\.lora_B\.weight: shape \[64, 4\], expected \[32, 4\]"),
    (pair("q_proj", a_shape=(8, 64)), r"q_proj\.lora_A\.weight: shape \[8, 64\], expected \[4, 64\]"),
    (pair("q_proj", layer=2), r"layers\.2\.self_attn\.q_proj\.lora_A\.weight: layer 2, but the base model has 2"),
    (pair("lm_head"), r"lm_head\.lora_A\.weight: self_attn\.lm_head is not served"),
    (pair("q_proj", block="mlp"), r"mlp\.q_proj is not served \(the projections gate_proj, up_proj, down_proj"),
    ({"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 8), np.float16)},
     r"embed_tokens\.lora_embedding_A: not an adapter of a served projection"),
    (pair("q_proj", dtype=np.int32), r"q_proj\.lora_A\.weight: dtype int32; adapters are read in float16, bfloat16"),
    ({k: v for k, v in pair("q_proj").items() if "lora_A" in k}, r"layer 0's q_proj has no lora_B tensor"),
    ({}, r"holds no lora_A / lora_B tensor of the base model's projections"),
    ({k: np.full_like(v, np.inf, np.float32) for k, v in pair("q_proj").items()}, r"holds a NaN or an infinity"),
]  # fmt: skip


@pytest.mark.parametrize(("tensors", "match"), REFUSED_TENSORS, ids=range(len(REFUSED_TENSORS)))
def test_a_tensor_that_does_not_fit_the_base_is_refused_by_name(tmp_path: Path, tensors: dict, match: str) -> None:
    write_tensors(tmp_path, tensors)
    with pytest.raises(ValueError, match=match) as e:
        read_adapter(tmp_path, BASE, 16)
    assert str(e.value).startswith("adapter_model.safetensors: ")
    assert str(tmp_path) not in str(e.value)


def test_mlp_adapters_of_a_mixture_of_experts_base_are_refused(tmp_path: Path) -> None:
    attention = {m: SHAPES[m] for m in ALL_MODULES[:4]}
    moe = BaseShapes(2, "bfloat16", attention, moe=True)
    write_adapter(tmp_path / "attn", SHAPES, 2, 4, modules=ALL_MODULES[:4])
    assert read_adapter(tmp_path / "attn", moe, 8).modules == set(ALL_MODULES[:4])
    write_adapter(tmp_path / "mlp", SHAPES, 2, 4, modules=("q_proj", "up_proj"))
    with pytest.raises(ValueError, match=r"up_proj\.lora_A\.weight: the base model's MLP is a mixture of experts"):
        read_adapter(tmp_path / "mlp", moe, 8)


def test_a_float16_base_refuses_values_past_its_range(tmp_path: Path) -> None:
    big = {k: np.full(v.shape, 1e6, np.float32) for k, v in pair("q_proj").items()}
    write_tensors(tmp_path, big)
    with pytest.raises(ValueError, match=r"exceeds float16's range \(65504\); serve a bfloat16 base"):
        read_adapter(tmp_path, BaseShapes(2, "float16", SHAPES), 16)
    assert read_adapter(tmp_path, BASE, 16).rank == 4  # bfloat16 holds it


def test_base_shapes_of_a_config_take_the_mlp_only_where_it_is_dense() -> None:
    from types import SimpleNamespace

    c = SimpleNamespace(num_qo_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64, intermediate_size=96,
                        num_layers=3, moe=None)  # fmt: skip
    dense = BaseShapes.of(c, "bfloat16")
    assert (dense.num_layers, dense.moe, dense.shapes) == (3, False, SHAPES)
    c.moe = object()
    moe = BaseShapes.of(c, "float16")
    assert moe.moe and sorted(moe.shapes) == sorted(ALL_MODULES[:4])
