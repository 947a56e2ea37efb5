"""The benchmarks' memory roofline (benchmarks/roofline.py) on CPU: the bytes a decode step reads, against sums
written out by hand for the 8B Llama shape (16-bit and FP8 with per-row and 128x128-block scales, TP 2) and a
Mixtral shape (8 experts, top-2) at batch 1, 8 and 32; the expected distinct experts against a simulation; and the
bandwidth: the peak from a memory clock and bus width, the order in which the sources are tried (stand-in readers:
plain functions), and what a missing source gives (BandwidthUnavailable naming why and ``--hbm-tbs``)."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from helpers.env import REPO, subprocess_env
from helpers.hf_configs import DEEPSEEK_V3, GPT_OSS, GPT_OSS_BF16
from helpers.tools import load_benchmark

roofline = load_benchmark("roofline")
BandwidthUnavailable = roofline.BandwidthUnavailable
MemorySpec = roofline.MemorySpec

# the 8B shape (benchmarks/bench_llama_tp.py's SHAPE_8B) as its config.json has it
CONFIG_8B: dict[str, Any] = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
}  # fmt: skip
# benchmarks/bench_mixtral.py's shape at its default 4 layers
CONFIG_MIXTRAL: dict[str, Any] = {
    "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None,
}  # fmt: skip

# One 8B layer's projection weights: q 4096x4096 (16,777,216) + k, v 1024x4096 (4,194,304 each) + o 4096x4096
# (16,777,216) + gate, up 14336x4096 (58,720,256 each) + down 4096x14336 (58,720,256) = 218,103,808 weights, over
# 4096 + 1024 + 1024 + 4096 + 3 x 14336 (gate, up: 14336 rows each; down: 4096) ... output rows:
LAYER_8B = 218_103_808
ROWS_8B = 4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096  # 43,008 output rows (one scale each, per row)
BLOCKS_8B = 32 * 32 + 8 * 32 + 8 * 32 + 32 * 32 + 112 * 32 + 112 * 32 + 32 * 112  # 13,312 128x128 blocks
NORMS = 2 * 2 * 4096  # two 16-bit norms a layer
HEAD_8B = 2 * 4096 + 2 * 128256 * 4096  # final norm + LM head, 16-bit: 1,050,681,344
KV_8B = 32 * 2 * 8 * 128 * 2  # per row per token: 32 layers x (K, V) x 8 heads x 128 x 2 bytes = 131,072


def test_linear_bytes_of_each_format() -> None:
    assert roofline.linear_bytes(4096, 14336) == 2 * 4096 * 14336
    assert roofline.linear_bytes(4096, 14336, "fp8-row") == 4096 * 14336 + 4 * 4096
    assert roofline.linear_bytes(4096, 14336, "fp8-block") == 4096 * 14336 + 4 * 32 * 112
    # a shape that does not fill its blocks: 100 rows in 1 block of rows, 300 columns in 3 blocks of columns
    assert roofline.linear_bytes(100, 300, "fp8-block") == 100 * 300 + 4 * 1 * 3
    assert roofline.linear_bytes(256, 256, "fp8-block", (64, 128)) == 256 * 256 + 4 * 4 * 2
    with pytest.raises(ValueError, match="weights: expected one of 16-bit, fp8-row, fp8-block, int4, mxfp4, got 'fp4'"):
        roofline.linear_bytes(8, 8, "fp4")
    with pytest.raises(ValueError, match="n: expected an int in"):
        roofline.linear_bytes(0, 8)
    with pytest.raises(TypeError, match=r"block: expected a \(rows, columns\) tuple of two ints"):
        roofline.linear_bytes(8, 8, "fp8-block", (128,))


def test_dense_8b_bytes_per_step() -> None:
    shape = roofline.shape_from_config(CONFIG_8B)
    assert (shape.experts, shape.weights) == (0, "16-bit")
    # 32 x (436,207,616 + 16,384) + 1,050,681,344 + 64 tokens x 131,072 = 15,018,237,952
    assert roofline.decode_step_bytes(shape, batch=1, context=64) == 15_018_237_952
    assert roofline.decode_step_bytes(shape, batch=1, context=64) == 32 * (2 * LAYER_8B + NORMS) + HEAD_8B + 64 * KV_8B
    # batch 32: the weights once, the KV cache of every row
    assert roofline.decode_step_bytes(shape, batch=32, context=64) == 15_018_237_952 + 31 * 64 * KV_8B
    # an FP8 KV cache reads half
    assert roofline.decode_step_bytes(shape, batch=1, context=64, kv_bytes=1) == 15_018_237_952 - 32 * KV_8B


def test_dense_8b_split_over_two_ranks() -> None:
    shape = roofline.shape_from_config(CONFIG_8B)
    # each rank: half of every projection, both norms whole, 64,128 of the vocabulary rows, half the KV heads
    half = 32 * (LAYER_8B + NORMS) + 2 * 4096 + 2 * 64128 * 4096 + 64 * KV_8B // 2
    assert roofline.decode_step_bytes(shape, batch=1, context=64, tp=2) == half
    whole_vocab = half + 2 * (128256 - 64128) * 4096
    assert roofline.decode_step_bytes(shape, batch=1, context=64, tp=2, vocab_parallel=False) == whole_vocab
    with pytest.raises(ValueError, match=r"tp: 3 does not divide the query heads \(32\)"):
        roofline.decode_step_bytes(shape, batch=1, context=64, tp=3)


@pytest.mark.parametrize(
    ("quantization", "weights", "scales"),
    [  # bench_llama_tp.py's --fp8 layouts; per-tensor scales are kept as one per row by the engine
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "fp8-block", 4 * BLOCKS_8B),  # 53,248 bytes
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8-row", 4 * ROWS_8B),  # 172,032 bytes
        ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}, "fp8-row", 4 * ROWS_8B),
    ],
)
def test_fp8_8b_bytes_per_step(quantization: dict[str, Any], weights: str, scales: int) -> None:
    shape = roofline.shape_from_config({**CONFIG_8B, "quantization_config": quantization})
    assert shape.weights == weights
    # one byte a projection weight plus its float32 scales; norms and LM head stay 16-bit
    want = 32 * (LAYER_8B + scales + NORMS) + HEAD_8B + 64 * KV_8B
    assert roofline.decode_step_bytes(shape, batch=1, context=64) == want
    assert 8.03e9 < want < 8.05e9  # 6.98 GB of e4m3 projections, the 1.05 GB LM head, their scales, the KV cache


# One Mixtral layer: attention q 4096x4096 + k, v 1024x4096 + o 4096x4096 = 41,943,040 weights (83,886,080 bytes),
# router 8 x 4096 (65,536 bytes), two norms (16,384 bytes): 83,968,000 bytes a layer besides the experts.
# One expert: w1, w3 14336x4096 and w2 4096x14336 = 176,160,768 weights, 352,321,536 bytes.
MIXTRAL_FIXED = 4 * 83_968_000 + 2 * 4096 + 2 * 32000 * 4096  # + final norm + LM head (262,152,192)
EXPERT = 352_321_536
KV_MIXTRAL = 4 * 2 * 8 * 128 * 2  # per row per token: 16,384


@pytest.mark.parametrize(
    ("batch", "experts"),
    [
        (1, 2.0),  # one row reads its 2 experts
        (8, 8 * (1 - 0.75**8)),  # 7.199: each expert missed by a row with probability 6/8, by all 8 with 0.75**8
        (32, 8 * (1 - 0.75**32)),  # 7.9992
    ],
)
def test_mixtral_reads_the_distinct_experts(batch: int, experts: float) -> None:
    shape = roofline.shape_from_config(CONFIG_MIXTRAL)
    assert (shape.experts, shape.top_k, shape.intermediate) == (8, 2, 14336)
    assert roofline.expected_distinct_experts(8, 2, batch) == pytest.approx(experts, rel=1e-15)
    want = MIXTRAL_FIXED + 4 * experts * EXPERT + batch * 64 * KV_MIXTRAL
    assert roofline.decode_step_bytes(shape, batch=batch, context=64) == pytest.approx(want, rel=1e-12)
    # batch 1: 4 x 83,968,000 + 262,152,192 + 4 x 2 x 352,321,536 + 64 x 16,384 = 3,417,645,056 bytes
    if batch == 1:
        assert roofline.decode_step_bytes(shape, batch=1, context=64) == 3_417_645_056


def test_mixtral_split_over_two_ranks() -> None:
    shape = roofline.shape_from_config(CONFIG_MIXTRAL)
    # each rank: half the attention and of each expert's columns; router and norms whole; half the vocabulary
    attention = 83_886_080 // 2
    want = 4 * (attention + 65_536 + 16_384 + 2 * (EXPERT // 2)) + 2 * 4096 + 2 * 16000 * 4096 + 64 * KV_MIXTRAL // 2
    assert roofline.decode_step_bytes(shape, batch=1, context=64, tp=2) == want


def test_observed_routing_replaces_the_expected_count() -> None:
    shape = roofline.shape_from_config(CONFIG_MIXTRAL)
    routing = [np.array([[0, 1], [1, 2], [0, 2], [5, 1]]), np.array([[3, 4]] * 4), np.array([[0, 7]] * 4)]
    seen = [roofline.count_distinct_experts(r) for r in routing] + [8]
    assert seen == [4, 2, 2, 8]
    want = MIXTRAL_FIXED + (4 + 2 + 2 + 8) * EXPERT + 4 * 64 * KV_MIXTRAL
    assert roofline.decode_step_bytes(shape, batch=4, context=64, experts_read=seen) == want
    means = [3.5, 2.0, 2.25, 8.0]  # a run's mean over its steps
    assert roofline.decode_step_bytes(shape, batch=4, context=64, experts_read=means) == pytest.approx(
        MIXTRAL_FIXED + 15.75 * EXPERT + 4 * 64 * KV_MIXTRAL, rel=1e-12
    )
    with pytest.raises(ValueError, match=r"experts_read: expected one count per MoE layer \(4\), got 3"):
        roofline.decode_step_bytes(shape, batch=4, context=64, experts_read=seen[:3])
    with pytest.raises(ValueError, match=r"expected each count in \[0, 2\].*got 3"):  # batch 1 reads at most top-2
        roofline.decode_step_bytes(shape, batch=1, context=64, experts_read=[3, 2, 2, 2])
    with pytest.raises(TypeError, match="experts_read: expected a sequence of numbers"):
        roofline.decode_step_bytes(shape, batch=1, context=64, experts_read=2)
    with pytest.raises(ValueError, match="experts_read: this shape has no experts"):
        roofline.decode_step_bytes(roofline.shape_from_config(CONFIG_8B), batch=1, context=64, experts_read=[2] * 32)
    with pytest.raises(TypeError, match="expert_ids: expected integer expert ids, got an array of float64"):
        roofline.count_distinct_experts(np.zeros((2, 2)))


def test_expected_distinct_experts_matches_a_simulation() -> None:
    # 20,000 steps of 8 rows, each row's top-2 of 8 experts a uniformly random pair: the mean distinct count's
    # standard error is below 0.006 (the count's deviation is below 0.8), so 0.03 is five of them
    rng = np.random.default_rng(0)
    chosen = rng.random((20_000, 8, 8)).argsort(-1)[..., :2]
    hit = np.zeros((20_000, 8), bool)
    np.put_along_axis(hit, chosen.reshape(20_000, -1), True, axis=1)
    assert abs(hit.sum(1).mean() - roofline.expected_distinct_experts(8, 2, 8)) < 0.03
    assert roofline.expected_distinct_experts(32, 4, 1) == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r"top_k: expected an int in \[1, 8\], got 9"):
        roofline.expected_distinct_experts(8, 9, 1)


def test_shape_from_config_of_other_layouts() -> None:
    oss = roofline.shape_from_config(GPT_OSS_BF16)  # 12 of 24 layers attend to the last 128 tokens
    assert (oss.experts, oss.top_k, oss.window, oss.window_layers, oss.head_dim) == (32, 4, 128, 12, 64)
    kv_token = 2 * 8 * 64 * 2  # one layer's K and V of one token
    short = roofline.decode_step_bytes(oss, batch=1, context=100)
    long = roofline.decode_step_bytes(oss, batch=1, context=1100)
    assert long - short == 1000 * 12 * kv_token + (128 - 100) * 12 * kv_token  # only the full layers grow past 128
    qwen3_moe = {k: v for k, v in CONFIG_MIXTRAL.items() if k != "num_local_experts"}
    qwen3_moe.update(model_type="qwen3_moe", num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768)
    qwen = roofline.shape_from_config(qwen3_moe)  # transformers 4's key, each expert's own size
    assert (qwen.experts, qwen.top_k, qwen.intermediate) == (128, 8, 768)
    # MXFP4 experts: read as stored (half a byte a weight, a byte of scale per 32, k padded to 128); the rest 16-bit
    mx = roofline.shape_from_config(GPT_OSS)
    assert (mx.weights, mx.expert_weights) == ("16-bit", "mxfp4")
    assert roofline.shape_from_config(GPT_OSS, dequantized=True) == oss  # the fallback reads 16-bit experts
    assert roofline.linear_bytes(5760, 2880, "mxfp4") == 5760 * 2944 // 2 + 5760 * 2944 // 32  # 2880 -> 2944
    one_expert = roofline.linear_bytes(5760, 2880) + roofline.linear_bytes(2880, 2880)
    stored = roofline.linear_bytes(5760, 2880, "mxfp4") + roofline.linear_bytes(2880, 2880, "mxfp4")
    experts = 4 * 24  # one row: top-4 experts read in each of the 24 layers
    saved = roofline.decode_step_bytes(oss, batch=1, context=100) - roofline.decode_step_bytes(mx, batch=1, context=100)
    assert saved == pytest.approx(experts * (one_expert - stored))
    # AWQ / GPTQ int4: read as stored, half a byte a weight and a 4-byte record per row and group
    awq = {**CONFIG_8B, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
    int4 = roofline.shape_from_config(awq)
    assert (int4.weights, int4.block) == ("int4", (1, 128))
    assert roofline.linear_bytes(4096, 14336, "int4", (1, 128)) == 4096 * 7168 + 4 * 4096 * 112
    dense = roofline.shape_from_config(CONFIG_8B)
    head = 2 * 128256 * 4096  # the LM head stays 16-bit
    ratio = (roofline.decode_step_bytes(dense, batch=1, context=0) - head) / (
        roofline.decode_step_bytes(int4, batch=1, context=0) - head
    )
    assert 3.75 < ratio < 3.77  # 2 bytes a weight against 0.5 + 4 / 128
    one_group = {**CONFIG_8B, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": -1}}
    assert roofline.linear_bytes(8, 4096, "int4", roofline.shape_from_config(one_group).block) == 8 * 2048 + 4 * 8
    with pytest.raises(ValueError, match="'quantization_config' is not FP8"):
        roofline.shape_from_config({**CONFIG_8B, "quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(ValueError, match="config: missing 'vocab_size'"):
        roofline.shape_from_config({k: v for k, v in CONFIG_8B.items() if k != "vocab_size"})
    with pytest.raises(ValueError, match="'kv_lora_rank': latent attention and shared experts are modelled for Deep"):
        roofline.shape_from_config({**CONFIG_8B, "kv_lora_rank": 512})
    with pytest.raises(TypeError, match="config 'hidden_size': expected an int, got str"):
        roofline.shape_from_config({**CONFIG_8B, "hidden_size": "4096"})
    with pytest.raises(TypeError, match="config 'num_experts': expected an int, got str"):
        roofline.shape_from_config({**qwen3_moe, "num_experts": "128"})
    with pytest.raises(TypeError, match="cfg: expected a config.json dict, got list"):
        roofline.shape_from_config([])
    with pytest.raises(ValueError, match=r"top_k: expected an int in \[1, 8\], got 0"):
        roofline.DecoderShape(4096, 14336, 4, 32, 8, 128, 32000, experts=8)


V3_FP8 = {**DEEPSEEK_V3, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
# DeepSeek-V3's per-layer bytes on one GPU, 16-bit unless said: MLA q_a 1536x7168 + its norm + q_b (128 x 192)x1536 +
# kv_a 576x7168 + its norm + kv_b (128 x 256)x512 + o 7168x(128 x 128); the two norms
V3_MLA = 2 * (1536 * 7168 + 1536 + 24576 * 1536 + 576 * 7168 + 512 + 32768 * 512 + 7168 * 16384) + 4 * 7168
V3_DENSE = 2 * 3 * 18432 * 7168  # the first 3 layers' MLP
V3_MOE = 2 * 256 * 7168 + 2 * 3 * 2048 * 7168  # a MoE layer's router and shared expert
V3_EXPERT_16 = 2 * 3 * 2048 * 7168  # one routed expert, 16-bit
V3_EXPERT_FP8 = 4096 * 7168 + 4 * 32 * 56 + 7168 * 2048 + 4 * 56 * 16  # e4m3 gate/up and down, a scale a block
V3_HEAD = 2 * 7168 + 2 * 129280 * 7168
V3_KV = 61 * (512 + 64) * 2  # per row per token: one latent and one RoPE key a layer, 16-bit


def test_deepseek_v3_reads_mla_the_dense_and_shared_mlps_and_its_fp8_experts_as_stored() -> None:
    """DeepSeek-V3 FP8 as the engine serves it: the routed experts e4m3 (one byte a weight and a float32 scale per
    128x128 block), MLA, the 3 dense MLPs and the shared experts 16-bit (dequantized at load); ``dequantized``: the
    routed experts 16-bit too (``ModelRunner.fp8_experts_as_stored = False``); a 16-bit V3 reads the same."""
    stored = roofline.shape_from_config(V3_FP8)
    assert (stored.weights, stored.expert_weights, stored.block) == ("16-bit", "fp8-block", (128, 128))
    assert (stored.experts, stored.top_k, stored.intermediate, stored.shared_intermediate) == (256, 8, 2048, 2048)
    assert (stored.dense_layers, stored.dense_intermediate) == (3, 18432)
    assert stored.mla == roofline.LatentAttention(1536, 512, 128, 64, 128)
    dequantized = roofline.shape_from_config(V3_FP8, dequantized=True)
    assert dequantized.expert_weights == "" and dequantized == roofline.shape_from_config(DEEPSEEK_V3)
    fixed = 61 * V3_MLA + 3 * V3_DENSE + 58 * V3_MOE + V3_HEAD + 100 * V3_KV
    # batch 1: the row's 8 experts in each of the 58 MoE layers, 100 tokens of context
    assert roofline.decode_step_bytes(stored, batch=1, context=100) == fixed + 58 * 8 * V3_EXPERT_FP8
    assert roofline.decode_step_bytes(dequantized, batch=1, context=100) == fixed + 58 * 8 * V3_EXPERT_16
    # observed routing: one count per MoE layer
    seen = [8.0] * 57 + [16.0]
    assert roofline.decode_step_bytes(stored, batch=2, context=100, experts_read=seen) == (
        fixed + 100 * V3_KV + (57 * 8 + 16) * V3_EXPERT_FP8
    )
    with pytest.raises(ValueError, match=r"experts_read: expected one count per MoE layer \(58\), got 61"):
        roofline.decode_step_bytes(stored, batch=2, context=100, experts_read=[8.0] * 61)


def test_deepseek_v3_split_over_eight_ranks() -> None:
    """TP 8: each rank its 16 heads' q_b, kv_b and o_proj, the latent projections, norms and cache whole, an eighth
    of every dense, shared and routed expert's columns (the routed: 256 of 2048, whole 128x128 blocks), the router
    whole, an eighth of the vocabulary."""
    shape = roofline.shape_from_config(V3_FP8)
    mla = 2 * (1536 * 7168 + 1536 + 3072 * 1536 + 576 * 7168 + 512 + 4096 * 512 + 7168 * 2048) + 4 * 7168
    dense, moe = V3_DENSE // 8, 2 * 256 * 7168 + 2 * 3 * 256 * 7168
    expert = 512 * 7168 + 4 * 4 * 56 + 7168 * 256 + 4 * 56 * 2
    head = 2 * 7168 + 2 * 16160 * 7168
    want = 61 * mla + 3 * dense + 58 * moe + head + 100 * V3_KV + 58 * 8 * expert
    assert roofline.decode_step_bytes(shape, batch=1, context=100, tp=8) == want
    with pytest.raises(ValueError, match=r"tp: 3 does not divide the query heads \(128\)"):
        roofline.decode_step_bytes(shape, batch=1, context=100, tp=3)


# --- the denominator -------------------------------------------------------------------------------------------

H100 = MemorySpec("NVIDIA H100 80GB HBM3", 2_619_000, 5120, "stand-in")
H200 = MemorySpec("NVIDIA H200", 3_201_000, 6144, "stand-in")


def test_peak_from_clock_and_bus_width() -> None:
    assert H100.peak == 2 * 2.619e9 * 5120 / 8 == pytest.approx(3.352e12, rel=1e-4)  # 3,352,320,000,000 B/s
    assert H200.peak == 2 * 3.201e9 * 6144 / 8 == pytest.approx(4.917e12, rel=1e-4)  # 4,916,736,000,000 B/s
    assert roofline.peak_bandwidth(0, [lambda device: H200]) == H200.peak


def test_the_sources_are_tried_in_order() -> None:
    calls: list[str] = []

    def reader(name: str, answer: Any) -> Any:
        def read(device: int) -> MemorySpec:
            calls.append(f"{name}:{device}")
            if isinstance(answer, Exception):
                raise answer
            return answer

        return read

    first, second = reader("driver", H100), reader("nvml", H200)
    assert roofline.read_memory_spec(1, [first, second]) is H100
    assert calls == ["driver:1"]  # the second source is not asked
    calls.clear()
    failing = reader("driver", BandwidthUnavailable("CUDA driver: cuInit failed with CUDA_ERROR_NO_DEVICE"))
    assert roofline.read_memory_spec(0, [failing, second]) is H200
    assert calls == ["driver:0", "nvml:0"]
    zero = reader("driver", MemorySpec("x", 0, 5120, "CUDA driver"))  # an attribute the driver reports as 0
    assert roofline.read_memory_spec(0, [zero, second]) is H200
    wrong = reader("driver", (2619000, 5120))  # an answer that is no MemorySpec: a reason, no AttributeError
    assert roofline.read_memory_spec(0, [wrong, second]) is H200
    with pytest.raises(BandwidthUnavailable) as caught:
        roofline.read_memory_spec(0, [failing, zero, wrong])
    text = str(caught.value)
    assert "cuda:0 cannot be read" in text and "CUDA_ERROR_NO_DEVICE" in text
    assert "CUDA driver: no memory clock or bus width (0 kHz, 5120 bits)" in text
    assert "answered (2619000, 5120), not a MemorySpec" in text and "--hbm-tbs" in text
    with pytest.raises(KeyError):  # a reader's own fault is not taken for an unavailable source
        roofline.read_memory_spec(0, [reader("driver", KeyError("bug")), second])
    with pytest.raises(ValueError, match=r"device: expected an int in \[0, "):
        roofline.peak_bandwidth(-1, [second])
    with pytest.raises(TypeError, match="device: expected an int, got str"):
        roofline.peak_bandwidth("cuda:0", [second])


def test_the_real_sources_refuse_a_device_no_machine_has() -> None:
    # on a machine without a GPU: no driver library; with one, an ordinal past its devices. Either way a reason.
    for read, source in ((roofline.read_driver, "CUDA driver: "), (roofline.read_nvml, "NVML: ")):
        with pytest.raises(BandwidthUnavailable, match=source):
            read(2**31 - 1)
    with pytest.raises(BandwidthUnavailable, match=r"CUDA driver: .*; NVML: .*pass the bandwidth instead"):
        roofline.peak_bandwidth(2**31 - 1)


def test_the_copy_measurement_without_cupy() -> None:
    with pytest.raises(ValueError, match=r"nbytes: expected an int in \[1, "):
        roofline.measured_copy_bandwidth(0, nbytes=0)
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(BandwidthUnavailable, match="copy: CuPy cannot be imported"):
            roofline.measured_copy_bandwidth(0)
    else:
        pytest.skip("CuPy is installed: the copy is measured on the GPU, not refused")


def test_the_denominator_and_its_line() -> None:
    copies: list[int] = []

    def copy(device: int) -> float:
        copies.append(device)
        return 3.0e12

    def missing(device: int) -> MemorySpec:
        raise BandwidthUnavailable("NVML: libnvidia-ml.so.1 does not load")

    def no_copy(device: int) -> float:
        raise BandwidthUnavailable("copy: CuPy cannot be imported")

    line, figure = roofline.roofline_denominator(0, readers=[lambda device: H100], copy=copy)
    assert figure == H100.peak and copies == [0]
    assert line == (
        "bandwidth: NVIDIA H100 80GB HBM3 (cuda:0): peak 3.35 TB/s (2619 MHz x 5120-bit bus, double data rate; "
        "stand-in); measured copy 3.00 TB/s, 89 % of peak; roofline denominator: peak 3.35 TB/s"
    )
    line, figure = roofline.roofline_denominator(0, hbm_tbs=4.8, readers=[lambda device: H200], copy=copy)
    assert figure == 4.8e12 and line.endswith("roofline denominator: --hbm-tbs 4.80 TB/s") and "peak 4.92" in line
    line, figure = roofline.roofline_denominator(0, measure=False, readers=[lambda device: H200], copy=copy)
    assert figure == H200.peak and "measured" not in line and copies == [0, 0]
    line, figure = roofline.roofline_denominator(0, readers=[missing], copy=copy)
    assert figure == 3.0e12 and "peak unknown" in line and line.endswith("measured copy (no peak) 3.00 TB/s")
    line, figure = roofline.roofline_denominator(0, hbm_tbs=3.35, readers=[missing], copy=no_copy)
    assert figure == 3.35e12 and "measured copy unavailable (copy: CuPy cannot be imported)" in line
    line, figure = roofline.roofline_denominator(0, readers=[missing], copy=no_copy)  # no figure: NaN, and why
    assert math.isnan(figure) and "peak unknown (the memory clock and bus width of cuda:0 cannot be read" in line
    assert line.endswith("denominator: none (no copy measured: copy: CuPy cannot be imported; pass --hbm-tbs TB/s)")
    line, figure = roofline.roofline_denominator(0, measure=False, readers=[missing], copy=copy)
    assert math.isnan(figure) and line.endswith("(no copy measured: measure is off; pass --hbm-tbs TB/s)")
    with pytest.raises(ValueError, match=r"hbm_tbs \(--hbm-tbs\): expected a positive bandwidth in TB/s"):
        roofline.roofline_denominator(0, hbm_tbs=0.0, readers=[missing], copy=copy)


def test_the_script_prints_the_line() -> None:
    # an ordinal no machine has: both sources give their reason, the line names the --hbm-tbs denominator
    cmd = [sys.executable, str(REPO / "benchmarks" / "roofline.py"), "--device", str(2**31 - 1), "--no-copy"]
    done = subprocess.run([*cmd, "--hbm-tbs", "4.8"], capture_output=True, text=True, env=subprocess_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].endswith("roofline denominator: --hbm-tbs 4.80 TB/s"), done.stdout
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO)
    assert done.returncode == 1 and "roofline denominator: none" in done.stdout, done.stdout
