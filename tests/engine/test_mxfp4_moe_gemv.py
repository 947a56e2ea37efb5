"""The MXFP4 grouped GEMV's host side, without a GPU (fi_engine.kernels.mxfp4_moe_gemv): the layout the loader writes
(``tiled_mxfp4``) decoded as the kernels decode it (``tiled_values``: the float16 bits their shifts and masks make,
times the block scale) equals the checkpoint's values exactly, for every code in every place, k padded to 128; the
refusals; gpt-oss's per-rank cut of its MXFP4 experts as stored (gate and up rows apart, down's blocks of its
columns, the bias alike) against the same cut of the dequantized weights; the kernels the module names exist in
``grouped_gemv4.cu``; a layer refuses MXFP4 experts it cannot serve before touching CuPy."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from helpers.mxfp4_checkpoints import GptOssShape, write_gpt_oss_pair

from fi_engine.checkpoint.mxfp4_weights import dequantize_mxfp4
from fi_engine.checkpoint.safetensors import Checkpoint
from fi_engine.kernels.cuda_sources import source
from fi_engine.kernels.fp8_moe_gemv import Fp8Experts
from fi_engine.kernels.mxfp4_moe_gemv import Mxfp4Experts, Mxfp4GroupedGemv, padded, tiled_mxfp4, tiled_values
from fi_engine.layers.moe import ClampedSwiGLU, MoEBiases, MoELayer, MoEWeights
from fi_engine.models.gpt_oss import read_experts, shard_experts, stored_experts


def values_of(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 values of MXFP4 ``blocks`` / ``scales`` (the checkpoint reader's bfloat16, exact)."""
    return (dequantize_mxfp4(blocks, scales).astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize(("e", "n", "k"), [(2, 16, 32), (2, 32, 96), (3, 16, 256), (1, 48, 2880)])
def test_the_kernels_decoding_of_the_layout_is_the_checkpoints_values(e: int, n: int, k: int) -> None:
    rng = np.random.default_rng(k)
    blocks = rng.integers(0, 256, (e, n, k // 32, 16), dtype=np.uint8)
    blocks.reshape(-1)[:256] = np.arange(256)  # every byte: every code in both nibbles
    scales = rng.integers(1, 241, (e, n, k // 32), dtype=np.uint8)  # the whole range the kernel takes
    codes, tiled_scales = tiled_mxfp4(blocks, scales)
    assert codes.shape == (e, n, padded(k) // 2) and tiled_scales.shape == (e, n, padded(k) // 32)
    assert codes.dtype == tiled_scales.dtype == np.uint8
    got = tiled_values(codes, tiled_scales, k)
    assert np.array_equal(got, values_of(blocks, scales))  # exact, bit for bit (-0 included)
    assert np.array_equal(np.signbit(got), np.signbit(values_of(blocks, scales)))
    # the padding columns hold zero codes: they decode to +0 whatever their scale
    assert not tiled_values(codes, tiled_scales, padded(k))[:, :, k:].any()


def test_a_code_moves_only_its_own_value() -> None:
    """One code set in an all-zero stack lands at its own row and column only (the layout is a permutation)."""
    e, n, k = 1, 32, 256
    for row, col in ((0, 0), (9, 1), (17, 130), (31, 255), (8, 77)):
        blocks = np.zeros((e, n, k // 32, 16), np.uint8)
        blocks[0, row, col // 32, (col % 32) // 2] = 0x7 << (4 * (col % 2))  # value 6
        scales = np.full((e, n, k // 32), 127, np.uint8)
        got = tiled_values(*tiled_mxfp4(blocks, scales), k)
        assert got[0, row, col] == 6.0 and np.count_nonzero(got) == 1, (row, col)


def test_the_layout_refuses_what_the_kernel_cannot_read() -> None:
    ok_blocks, ok_scales = np.zeros((1, 16, 2, 16), np.uint8), np.full((1, 16, 2), 127, np.uint8)
    with pytest.raises(ValueError, match=r"scales: a block scale of 2\*\*114 \(byte 241\).*serve these experts "):
        tiled_mxfp4(ok_blocks, np.full((1, 16, 2), 241, np.uint8))
    with pytest.raises(ValueError, match=r"n a multiple of 16, got \[1, 8, 2, 16\]"):
        tiled_mxfp4(np.zeros((1, 8, 2, 16), np.uint8), np.zeros((1, 8, 2), np.uint8))
    with pytest.raises(ValueError, match=r"blocks: expected a uint8 array of 4 dimensions, got int16"):
        tiled_mxfp4(ok_blocks.astype(np.int16), ok_scales)
    with pytest.raises(ValueError, match=r"scales: expected a uint8 array of 3 dimensions"):
        tiled_mxfp4(ok_blocks, ok_scales[0])
    with pytest.raises(ValueError, match=r"got \[1, 16, 2, 16\] and \[1, 16, 3\]"):
        tiled_mxfp4(ok_blocks, np.zeros((1, 16, 3), np.uint8))


def experts_of(e: int, h: int, i: int) -> Mxfp4Experts:
    """Zero MXFP4 experts of ``(e, h, i)`` in the layout's shapes (numpy stand-ins for the GPU arrays)."""
    return Mxfp4Experts(
        np.zeros((e, 2 * i, padded(h) // 2), np.uint8), np.zeros((e, 2 * i, padded(h) // 32), np.uint8),
        np.zeros((e, h, padded(i) // 2), np.uint8), np.zeros((e, h, padded(i) // 32), np.uint8), h, i,
    )  # fmt: skip


def test_the_experts_check_their_four_arrays() -> None:
    good = experts_of(4, 64, 96)
    assert good.shapes() == (4, 64, 96)
    assert good.nbytes() == 4 * (192 * 64 + 192 * 4 + 64 * 64 + 64 * 4)  # k padded: 64 -> 128, 96 -> 128
    with pytest.raises(ValueError, match=r"mxfp4_experts.down: expected a C-contiguous uint8 array \[4, 64, 64\]"):
        Mxfp4Experts(good.gate_up, good.gate_up_scales, good.down[:, :, :32], good.down_scales, 64, 96).shapes()
    with pytest.raises(ValueError, match=r"mxfp4_experts.hidden: expected a positive multiple of 32, got 48"):
        Mxfp4Experts(good.gate_up, good.gate_up_scales, good.down, good.down_scales, 48, 96).shapes()
    with pytest.raises(ValueError, match=r"mxfp4_experts.gate_up: expected a C-contiguous uint8 array \[0, 192, 64\]"):
        Mxfp4Experts(np.uint8(0), good.gate_up_scales, good.down, good.down_scales, 64, 96).shapes()  # a scalar
    none = experts_of(0, 64, 96)
    with pytest.raises(ValueError, match=r"mxfp4_experts: expected at least one expert, got none"):
        none.shapes()
    with pytest.raises(ValueError, match=r"mxfp4_experts.gate_up_scales: .* got float32"):
        Mxfp4Experts(good.gate_up, good.gate_up_scales.astype(np.float32), good.down, good.down_scales, 64,
                     96).shapes()  # fmt: skip


def test_a_layer_refuses_mxfp4_experts_it_cannot_serve_before_cupy() -> None:
    e, h, i = 4, 64, 96
    zeros = (np.zeros(s, np.uint16) for s in ((e, h), (e, 2 * i, h), (e, h, i)))
    weights = MoEWeights(*zeros)
    common = {"dtype": "bfloat16", "top_k": 2, "max_tokens": 8, "stream": None}
    with pytest.raises(TypeError, match=r"mxfp4_experts: expected None or an Mxfp4Experts, got dict"):
        MoELayer(weights, mxfp4_experts={}, **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"experts of \(experts, hidden, intermediate\) \(4, 64, 64\), the layer's"):
        MoELayer(weights, mxfp4_experts=experts_of(e, h, 64), **common)  # type: ignore[arg-type]
    biases = MoEBiases(*(np.zeros(s, np.float32) for s in ((e,), (e, 2 * i), (e, h))))
    with pytest.raises(ValueError, match=r"with biases are served with the clamped SwiGLU"):
        MoELayer(weights, mxfp4_experts=experts_of(e, h, i), biases=biases, **common)  # type: ignore[arg-type]
    fp8 = Fp8Experts(np.zeros((e, 2 * i, h), np.uint8), np.ones((e, 2 * i), np.float32), np.zeros((e, h, i), np.uint8),
                     np.ones((e, h), np.float32), None)  # fmt: skip
    with pytest.raises(ValueError, match=r"e4m3 \(fp8_experts\) or MXFP4, not both"):
        MoELayer(weights, mxfp4_experts=experts_of(e, h, i), fp8_experts=fp8, **common)  # type: ignore[arg-type]
    assert ClampedSwiGLU(1.702, 7.0).limit == 7.0


SMALL = GptOssShape(vocab=64, hidden=64, intermediate=96, layers=1, heads=2, kv_heads=1, experts=3)


@pytest.mark.parametrize(("rank", "parts"), [(0, 1), (0, 3), (2, 3)])
def test_each_rank_stores_its_cut_of_the_mxfp4_experts(tmp_path: Path, rank: int, parts: int) -> None:
    mx, _ = write_gpt_oss_pair(tmp_path, SMALL, seed=7)
    ckpt = Checkpoint(mx)
    e, h, i = SMALL.experts, SMALL.hidden, SMALL.intermediate
    (gu_c, gu_s), (dn_c, dn_s), bias = stored_experts(ckpt, 0, e, h, i, rank, parts, np)
    # the dequantizing path's cut of the same layer: [E, H, 2I/N] interleaved, its bias, [E, I/N, H]
    gate_up, gate_up_bias, down = shard_experts(*read_experts(ckpt, 0, e, h, i), rank, parts)
    f32 = lambda a: (np.ascontiguousarray(a).astype(np.uint32) << 16).view(np.float32)  # noqa: E731
    gu = f32(gate_up).transpose(0, 2, 1)  # [E, 2I/N, H]: rows gate, up interleaved
    want_gu = np.concatenate([gu[:, 0::2], gu[:, 1::2]], axis=1)  # gate rows, then up rows
    assert np.array_equal(tiled_values(gu_c, gu_s, h), want_gu)
    assert np.array_equal(tiled_values(dn_c, dn_s, i // parts), f32(down).transpose(0, 2, 1))
    assert np.array_equal(bias, np.concatenate([gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]], axis=1))
    assert bias.dtype == np.float32 and bias.flags.c_contiguous


def test_the_kernels_named_are_in_the_program() -> None:
    text = source("grouped_gemv4.cu")
    defined = set(re.findall(r"GROUPED4\((\w+),", text)) | set(re.findall(r"__global__ void (\w+)\(", text))
    for dtype in ("bfloat16", "float16"):
        assert set(Mxfp4GroupedGemv.kernel_names(dtype).values()) <= defined, dtype
    assert {"dequant_mxfp4_bf16", "dequant_mxfp4_f16"} <= defined


def test_the_layout_reading_refuses_what_the_layout_does_not_make() -> None:
    codes, scales = tiled_mxfp4(np.zeros((1, 16, 4, 16), np.uint8), np.full((1, 16, 4), 127, np.uint8))
    with pytest.raises(ValueError, match=r"codes: expected tiled_mxfp4's numpy uint8"):
        tiled_values(codes.astype(np.int8), scales, 128)
    with pytest.raises(ValueError, match=r"scales: expected a numpy uint8 array \[1, 16, 4\]"):
        tiled_values(codes, scales[:, :, :2], 128)
    with pytest.raises(ValueError, match=r"k: expected"):
        tiled_values(codes, scales, 129)
    with pytest.raises(TypeError, match=r"k: expected an int"):
        padded(2.5)  # type: ignore[arg-type]
    assert (padded(1), padded(128), padded(2880)) == (128, 128, 2944)
