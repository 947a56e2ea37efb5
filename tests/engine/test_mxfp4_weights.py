"""MXFP4 weights on CPU (fi_engine.checkpoint.mxfp4_weights, and gpt-oss reading them: fi_engine.models.gpt_oss):
blocks and scales written the way the published gpt-oss checkpoints store them (tests/helpers/mxfp4_checkpoints.py,
packed from the format's definition and checked here against a loop over the nibbles) decode to exactly the values
of a plain reference (every e2m1 code in both nibbles, every finite scale from 2**-127 to 2**127); blocks past
bfloat16's range are refused; an MXFP4 gpt-oss checkpoint's experts read as the same bfloat16 checkpoint's, bit for
bit, in the layout the engine's bfloat16 path takes (gate and up interleaved as transformers stores them); other
quantizations and malformed tensors are refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.hf_configs import GPT_OSS, GPT_OSS_BF16
from helpers.mxfp4_checkpoints import E2M1_VALUES, GptOssShape, exact_bf16, pack_mxfp4, write_gpt_oss_pair

from fi_engine.checkpoint.mxfp4_weights import E2M1, declares_mxfp4, dequantize_mxfp4, read_mxfp4_experts
from fi_engine.checkpoint.safetensors import Checkpoint, write_safetensors
from fi_engine.models.gpt_oss import check_checkpoint, expert_matrices, gpt_oss_config, read_experts

SMALL = GptOssShape(vocab=64, hidden=64, intermediate=96, layers=2, heads=2, kv_heads=1, experts=3)


def reference_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float64 values of MXFP4 ``blocks [..., G, 16]`` and ``scales [..., G]``, nibble by nibble: byte ``j`` of a
    block holds value ``2j`` in its low nibble and ``2j + 1`` in its high one, each ``E2M1_VALUES[code] * 2 ** (s -
    127)``."""
    table = np.array(E2M1_VALUES)
    factor = np.ldexp(1.0, scales.astype(np.int64) - 127)
    out = np.empty((*blocks.shape[:-1], 32))
    for j in range(16):
        out[..., 2 * j] = table[blocks[..., j] & 0x0F] * factor
        out[..., 2 * j + 1] = table[blocks[..., j] >> 4] * factor
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * 32)


def test_e2m1_table_is_the_formats() -> None:
    assert E2M1.dtype == np.float32 and E2M1.shape == (16,)
    assert E2M1.tolist() == list(E2M1_VALUES)
    assert np.signbit(E2M1).tolist() == [c >= 8 for c in range(16)]  # code 8 is -0, not +0


def test_the_test_packing_is_the_formats_byte_order() -> None:
    """helpers.mxfp4_checkpoints.pack_mxfp4 against a loop over every byte (the format's definition)."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, size=(2, 3, 64), dtype=np.uint8)
    packed = pack_mxfp4(codes)
    assert packed.shape == (2, 3, 2, 16) and packed.dtype == np.uint8
    for a in range(2):
        for r in range(3):
            for g in range(2):
                for j in range(16):
                    low, high = codes[a, r, 32 * g + 2 * j], codes[a, r, 32 * g + 2 * j + 1]
                    assert packed[a, r, g, j] == low + 16 * high


def test_known_values() -> None:
    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, :4] = [0x21, 0xF7, 0x81, 0x1F]  # (0.5, 1), (6, -6), (0.5, -0), (-6, 0.5)
    got = dequantize_mxfp4(blocks, np.array([127], np.uint8))  # one row of one block
    assert got.dtype == np.uint16 and got.shape == (32,)
    assert got[:8].tolist() == [0x3F00, 0x3F80, 0x40C0, 0xC0C0, 0x3F00, 0x8000, 0xC0C0, 0x3F00]
    assert not got[8:].any()
    tiny = dequantize_mxfp4(blocks, np.array([0], np.uint8))  # 2**-127: bfloat16 subnormals, exactly
    assert tiny[:2].tolist() == [0x0020, 0x0040]  # 0.5 * 2**-127 = 2**-128 = 32 * 2**-133, and 2**-127
    assert dequantize_mxfp4(blocks, np.array([130], np.uint8))[2] == 0x4240  # 6 * 2**3 = 48


def test_every_code_in_either_nibble_and_every_finite_scale_decode_exactly() -> None:
    every_byte = np.arange(256, dtype=np.uint8).reshape(16, 16)  # 16 blocks: each byte value once
    scale = np.arange(253, dtype=np.uint8)  # 2**-127 .. 2**125: every code finite in bfloat16 (6 * 2**125 < 2**128)
    blocks = np.broadcast_to(every_byte, (253, 16, 16)).copy()
    scales = np.repeat(scale[:, None], 16, axis=1)
    got = dequantize_mxfp4(blocks, scales)
    assert got.shape == (253, 512)
    np.testing.assert_array_equal(got, exact_bf16(reference_decode(blocks, scales)))
    # scale 253 (2**126): finite up to magnitude 3 (codes 0-5, 8-13); 254 (2**127): up to 1.5 (codes 0-3, 8-11)
    for s, below in ((253, 6), (254, 4)):
        small = np.array([c for c in range(16) if c & 0x7 < below], np.uint8)
        pairs = (small[:, None] | (small[None, :] << 4)).reshape(-1, 16)
        top = dequantize_mxfp4(pairs, np.full(len(pairs), s, np.uint8))
        np.testing.assert_array_equal(top, exact_bf16(reference_decode(pairs, np.full(len(pairs), s, np.uint8))))
        assert (top == 0x7F40).any() and (top == 0xFF40).any()  # +-1.5 * 2**127, bfloat16's largest here


def test_random_blocks_of_any_leading_shape() -> None:
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, size=(3, 40, 5, 16), dtype=np.uint8)
    scales = rng.integers(0, 253, size=(3, 40, 5), dtype=np.uint8)
    got = dequantize_mxfp4(blocks, scales)
    assert got.shape == (3, 40, 160)
    np.testing.assert_array_equal(got, exact_bf16(reference_decode(blocks, scales)))
    np.testing.assert_array_equal(dequantize_mxfp4(blocks[1, 7], scales[1, 7]), got[1, 7])  # rows independent


@pytest.mark.parametrize(
    ("byte", "scale", "message"),
    [
        (0x04, 254, "scale byte 254 holds values past bfloat16's range"),  # 2 * 2**127 = 2**128
        (0x70, 254, "scale byte 254"),  # the high nibble's 6 * 2**127
        (0x60, 253, "scale byte 253"),  # 4 * 2**126 = 2**128
        (0x00, 255, "255 is e8m0 NaN"),  # NaN whatever the codes
    ],
)
def test_blocks_past_bfloat16_are_refused(byte: int, scale: int, message: str) -> None:
    blocks = np.zeros((3, 16), np.uint8)
    blocks[1, 5] = byte
    scales = np.array([127, scale, 127], np.uint8)
    with pytest.raises(ValueError, match=rf"scales: .*{message}"):
        dequantize_mxfp4(blocks, scales)


def test_the_array_arguments_are_refused_by_name() -> None:
    blocks, scales = np.zeros((2, 16), np.uint8), np.zeros(2, np.uint8)
    with pytest.raises(TypeError, match="blocks: expected a numpy uint8 array, got list"):
        dequantize_mxfp4([[0] * 16], scales)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scales: expected a numpy uint8 array, got a float32 array"):
        dequantize_mxfp4(blocks, scales.astype(np.float32))
    with pytest.raises(ValueError, match=r"blocks, scales: expected blocks \[..., G, 16\].*got \[2, 16\] and \[3\]"):
        dequantize_mxfp4(blocks, np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match=r"got \[2, 8\] and \[2\]"):
        dequantize_mxfp4(np.zeros((2, 8), np.uint8), scales)
    with pytest.raises(ValueError, match=r"got \[16\] and \[\]"):
        dequantize_mxfp4(np.zeros(16, np.uint8), np.zeros((), np.uint8))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Checkpoint, Checkpoint]:
    mx, bf = write_gpt_oss_pair(tmp_path_factory.mktemp("gpt_oss"), SMALL, seed=3)
    return Checkpoint(mx), Checkpoint(bf)


def test_the_written_pair_is_an_mxfp4_checkpoint_and_its_bf16_copy(pair: tuple[Checkpoint, Checkpoint]) -> None:
    mx, bf = pair
    e, h, i = SMALL.experts, SMALL.hidden, SMALL.intermediate
    m = "model.layers.1.mlp.experts."
    assert mx.info(m + "gate_up_proj_blocks").shape == (e, 2 * i, h // 32, 16)
    assert mx.info(m + "gate_up_proj_scales").shape == (e, 2 * i, h // 32)
    assert mx.info(m + "down_proj_blocks").shape == (e, h, i // 32, 16) and m + "gate_up_proj" not in mx
    assert bf.info(m + "gate_up_proj").shape == (e, h, 2 * i) and bf.info(m + "down_proj").shape == (e, i, h)
    assert {n for n in mx.tensors if not n.endswith(("_blocks", "_scales"))} < set(bf.tensors)
    assert check_checkpoint(mx) == check_checkpoint(bf) == "bfloat16"
    configs = [json.loads((c.info(m + "gate_up_proj_bias").path.parent / "config.json").read_text()) for c in pair]
    assert configs[0]["quantization_config"]["quant_method"] == "mxfp4" and "quantization_config" not in configs[1]
    a, b = (gpt_oss_config(c) for c in configs)
    assert a == b and a.moe is not None and (a.moe.num_experts, a.moe.top_k, a.moe.intermediate_size) == (e, 2, i)


@pytest.mark.parametrize("layer", [0, 1])
def test_mxfp4_experts_read_as_the_bf16_checkpoints(pair: tuple[Checkpoint, Checkpoint], layer: int) -> None:
    mx, bf = pair
    e, h, i = SMALL.experts, SMALL.hidden, SMALL.intermediate
    got, want = read_experts(mx, layer, e, h, i), read_experts(bf, layer, e, h, i)
    for g, w_ in zip(got, want, strict=True):
        assert g.shape == w_.shape and g.dtype == w_.dtype
        np.testing.assert_array_equal(g, w_)
    assert got[0].dtype == np.uint16 and got[1].dtype == np.float32
    # the orientation, from the blocks themselves: gate_up[e, k, r] is row r, input k of the blocks
    m = f"model.layers.{layer}.mlp.experts."
    rows = reference_decode(mx.array(m + "gate_up_proj_blocks"), mx.array(m + "gate_up_proj_scales"))  # [E, 2I, H]
    np.testing.assert_array_equal(got[0], exact_bf16(rows).transpose(0, 2, 1))
    down = reference_decode(mx.array(m + "down_proj_blocks"), mx.array(m + "down_proj_scales"))  # [E, H, I]
    down_weight = read_mxfp4_experts(mx, m + "down_proj", (e, i, h))
    np.testing.assert_array_equal(down_weight, exact_bf16(down).transpose(0, 2, 1))


def test_the_routed_layout_takes_gate_from_even_rows_and_up_from_odd(pair: tuple[Checkpoint, Checkpoint]) -> None:
    """What the engine uploads (expert_matrices of read_experts): expert e's gate rows j are the blocks' rows 2j,
    its up rows the rows 2j + 1 (transformers' interleaving: gate = gate_up[..., ::2]), its down rows the down
    blocks' rows."""
    mx, _ = pair
    e, h, i = SMALL.experts, SMALL.hidden, SMALL.intermediate
    m = "model.layers.0.mlp.experts."
    w_gu, b_gu, w_down = expert_matrices(*read_experts(mx, 0, e, h, i))
    rows = exact_bf16(reference_decode(mx.array(m + "gate_up_proj_blocks"), mx.array(m + "gate_up_proj_scales")))
    np.testing.assert_array_equal(w_gu[:, :i], rows[:, 0::2])
    np.testing.assert_array_equal(w_gu[:, i:], rows[:, 1::2])
    down = exact_bf16(reference_decode(mx.array(m + "down_proj_blocks"), mx.array(m + "down_proj_scales")))
    np.testing.assert_array_equal(w_down, down)
    bias = (np.asarray(mx.array(m + "gate_up_proj_bias")).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(b_gu, np.concatenate([bias[:, 0::2], bias[:, 1::2]], axis=1))
    assert all(a.flags.c_contiguous for a in (w_gu, b_gu, w_down))


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "q",
    [
        {"quant_method": "gptq", "bits": 4, "group_size": 128},
        {"quant_method": "awq", "bits": 4},
        {"quant_method": "fp8", "weight_block_size": [128, 128]},
        {"quant_method": "bitsandbytes", "load_in_4bit": True},
        {"bits": 4},
        "mxfp4",
    ],
)
def test_other_quantizations_are_refused_by_name(q: Any) -> None:
    with pytest.raises(ValueError, match=r"config: quantization_config \(quant_method .*\) is not supported;.*MXFP4"):
        gpt_oss_config({**GPT_OSS_BF16, "quantization_config": q})
    assert not declares_mxfp4(q)
    assert declares_mxfp4(GPT_OSS["quantization_config"]) and declares_mxfp4({"quant_method": "mxfp4"})


def tiny_checkpoint(folder: Path, tensors: dict[str, Any]) -> Checkpoint:
    emb = (np.ones((8, 64), np.float32).view(np.uint32) >> 16).astype(np.uint16)
    write_safetensors(folder / "model.safetensors", {"model.embed_tokens.weight": (emb, "bfloat16"), **tensors})
    return Checkpoint(folder)


def test_mxfp4_tensors_other_than_the_experts_are_refused(tmp_path: Path) -> None:
    q = "model.layers.0.self_attn.q_proj.weight_blocks"
    ckpt = tiny_checkpoint(tmp_path, {q: np.zeros((4, 2, 16), np.uint8)})
    with pytest.raises(ValueError, match=rf"'{q}' looks MXFP4-quantized; only the experts' gate_up_proj and down_proj"):
        check_checkpoint(ckpt)


E, H, INTER = 2, 64, 32
GU = "model.layers.0.mlp.experts.gate_up_proj"
VALID = {
    GU + "_blocks": np.zeros((E, 2 * INTER, H // 32, 16), np.uint8),
    GU + "_scales": np.full((E, 2 * INTER, 2), 127, np.uint8),
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({GU + "_scales": None}, r"no tensor '.*gate_up_proj_scales': an MXFP4 weight is a pair of tensors"),
        ({GU + "_scales": np.zeros((E, 2 * INTER, 2), np.float32)}, r"scales' is float32; MXFP4 .* are U8"),
        ({GU + "_blocks": np.zeros((E, 2 * INTER, 4, 8), np.uint8)}, r"gate_up_proj_blocks' has shape \[2, 64, 4, 8\], "
         r"expected \[2, 64, 2, 16\]"),
        ({GU + "_scales": np.full((E, 2 * INTER, 2), 255, np.uint8)}, r"gate_up_proj_scales', expert 0: scales: .*255"),
        ({GU: (np.zeros((E, H, 2 * INTER), np.uint16), "bfloat16")}, r"holds '.*gate_up_proj' both in bfloat16 and"),
    ],
)  # fmt: skip
def test_malformed_mxfp4_experts_are_refused_naming_the_tensor(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    tensors = {k: v for k, v in {**VALID, **change}.items() if v is not None}
    ckpt = tiny_checkpoint(tmp_path, tensors)
    with pytest.raises(ValueError, match=message):
        expert_weight_of(ckpt)


def expert_weight_of(ckpt: Checkpoint) -> Any:
    return read_experts(ckpt, 0, E, H, INTER)[0]  # the gate/up weight is read first


def test_inputs_not_a_multiple_of_32_and_missing_experts_are_refused(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path, VALID)
    with pytest.raises(ValueError, match=r"MXFP4 packs 32 values per block along the 48 inputs"):
        read_mxfp4_experts(ckpt, GU, (E, 48, 2 * INTER))
    with pytest.raises(ValueError, match=r"no tensor 'model.layers.1.mlp.experts.gate_up_proj' \(bfloat16\) nor"):
        read_experts(ckpt, 1, E, H, INTER)
    f16 = tiny_checkpoint(tmp_path, {GU: np.zeros((E, H, 2 * INTER), np.float16)})
    with pytest.raises(ValueError, match=r"gate_up_proj' is float16, the embedding is bfloat16"):
        read_experts(f16, 0, E, H, INTER)


def test_serve_names_mxfp4_experts_in_its_start_up_line_and_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fi-engine serve``'s start-up line and ``/v1/models`` name the weights it serves (``cli._quantized_weights``):
    MXFP4 experts for the published layout, nothing for the bfloat16 copy."""
    from fi_engine import cli

    mx, bf = write_gpt_oss_pair(tmp_path, SMALL, seed=5)
    scheme = cli._quantized_weights(str(mx))
    assert scheme is not None and scheme.method == "mxfp4"
    assert scheme.describe() == ("MXFP4 experts (e2m1 values, an e8m0 scale per 32), kept as stored (the MXFP4 "
                                 "grouped GEMV)")  # fmt: skip
    assert cli._quantized_weights(str(bf)) is None
    from fi_engine.models.gpt_oss import GptOss

    monkeypatch.setattr(GptOss, "mxfp4_as_stored", False)  # the fallback, as the start-up line names it
    fallback = cli._quantized_weights(str(mx))
    assert fallback is not None and fallback.describe().endswith("dequantized to bfloat16 at load")
    # shapes the grouped GEMV cannot take: dequantized whatever the setting (an intermediate share not of 32s)
    assert not scheme.experts_for(2880, 2880, 4).stored and scheme.experts_for(2880, 2880, 2).stored
    assert not scheme.experts_for(2880, 48).stored and not scheme.experts_for(2880, 2880, 7).stored
