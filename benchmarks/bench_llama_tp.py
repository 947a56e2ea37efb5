"""Llama decode with tensor parallelism: tokens/s and host time per step of fi_ffi's engine at TP 1/2/4 on an
8B-shaped random Llama (32 layers, hidden 4096, 32/8 heads of 128, MLP 14336, vocab 128256, bfloat16), batch 1
and 32, eager and CUDA graph, with the fused all-reduce + residual + RMSNorm kernel and with NCCL + a separate
``fused_add_rmsnorm`` (``nccl`` rows), and with the embedding and LM head whole on every rank instead of split
over the ranks by vocabulary rows (``whole-vocab`` rows). Each row also gives the bytes a step reads on one rank
(``bytes_per_step``, benchmarks/roofline.py's model: the projections, FP8 ones with their scales, the LM head, the
norms and the KV cache; for a MoE checkpoint the router and the distinct experts a step's rows are expected to
choose under uniform routing, not one dense MLP) and that over the step time against the device's memory bandwidth
(the ``roofline`` column): by default its peak from the memory clock x bus width, which the table's ``bandwidth:``
line gives with a measured copy beside it; ``--hbm-tbs`` sets another figure. Not a test: nothing is asserted.

    python3 benchmarks/bench_llama_tp.py --make /tmp/llama8b            # write the random checkpoint once (~16 GB)
    python3 benchmarks/bench_llama_tp.py --make /tmp/llama8b-fp8 --fp8 block   # e4m3 projections, 128x128 scales
    python3 benchmarks/bench_llama_tp.py --make /tmp/llama8b-awq --int4 awq     # AWQ int4 projections, groups of 128
    python3 benchmarks/bench_llama_tp.py --make /tmp/smollm2 --shape smollm2-135m --layers 30 --tokenizer-from DIR
    python3 benchmarks/bench_llama_tp.py --model /tmp/llama8b --tp 1,2,4 [--json PATH] [--profile] [--choices]
    python3 benchmarks/bench_llama_tp.py --model /tmp/llama8b --tp 1,2 --batches 32 --modes graph \
        --variants fused,whole-vocab

The driver runs each size in fresh processes (``fi-ffi launch --nproc N`` for N > 1) and prints one table.
``--layers`` shrinks the model (same shapes per layer) when disk or time is short. Prompts are random, 32 tokens
(``--prompt-tokens``: longer decode contexts, the engine's ``max_seq_len`` raised to hold them). ``--make-mixtral
DIR`` writes benchmarks/bench_mixtral.py's random Mixtral-shaped checkpoint (8 experts of 4096 x 14336, top-2,
``--layers`` of them) instead, for the MoE engine's tokens/s at TP 1/2/4 (its experts split by intermediate
columns).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from roofline import add_hbm_tbs_argument, decode_step_bytes, roofline_denominator, shape_from_config

os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})

# --variants that run on one GPU only (TP 1 rows): these names and these prefixes
ONE_GPU_VARIANTS = (
    "in-step",
    "lt",
    "unfused",
    "no-pdl",
    "no-attn-pdl",
    "fp8-fused",
    "fp8-separate",
    "fp8-norm-no-pdl",
    "norm-fold",
    "int4-rope-launches",
    "graph-fused-one-row",
    "fp8-scalar-gemv",
    "w8a16",
    "w8a8-no-blocks",
    "again",
    "no-pipeline",
    "one-graph",
    "no-tune",
    "tune-quantized",
    "tune-wide",
    "release-rows",
    "no-release-rows",
    "any-rows",
    "no-gemv-pipeline",
    "silu-prologue",
    "no-skinny",
    "no-wg4",
    "wg4-plain",
    "wg4-rows-25",
    "no-wg8",
    "skinny-w8a8",
    "no-w8a8",
    "w8a8-quantizer",
    "w8a8-both",
    "skinny-w4a8",
    "int4-lean",
    "fp8-lean",
    "no-tc-decode",
    "no-prefill-kernel-pdl",
    "skinny-silu",
    "tune-pairs",
    "after-wait",
)
ONE_GPU_PREFIXES = (
    "tc-decode-rows-",
    "tc-decode-context-",
    "int4-ahead-",
    "int4-warps-",
    "fp8-gemv-rows-",
    "fp8-tc-rows-",
    "fp8-one-row-blocks-",
    "unroll-",
    "rope-unroll-",
    "fused-blocks-",
    "fused-min-blocks-",
)


def one_gpu_variant(name: str) -> bool:
    """Whether ``name`` is a variant that runs on one GPU only (a TP 1 row)."""
    return name in ONE_GPU_VARIANTS or name.startswith(ONE_GPU_PREFIXES)


SHAPE_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=False,
    rope_theta=500000.0,
)
# SmolLM2-135M's shapes (its config.json): the model benchmarks/bench_serve.py serves, as random weights with the
# real tokenizer (--tokenizer-from) where the checkpoint itself cannot travel to the GPU machine
SHAPE_SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)
SHAPES = {"8b": SHAPE_8B, "smollm2-135m": SHAPE_SMOLLM2_135M}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


FP8_CONFIGS = {  # --fp8 LAYOUT: the quantization_config its published checkpoints carry
    "tensor": {"quant_method": "fp8", "activation_scheme": "dynamic"},
    "block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "channel": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0},
}
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


INT4_CONFIGS = {  # --int4 METHOD: the quantization_config AutoAWQ / GPTQModel write (groups of 128)
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
}


def make(
    folder: Path,
    layers: int,
    fp8: str | None = None,
    shape: str = "8b",
    tokenizer_from: Path | None = None,
    int4: str | None = None,
) -> None:
    """A random bfloat16 checkpoint written fast, whatever its depth: one random block per tensor shape, and every
    tensor of that shape (each layer's, the embedding's and the LM head's) points at the same bytes of the file
    (fi_ffi's reader allows it; the ``safetensors`` package would not). The file holds about 1.3 GB for the 8B shape
    at any depth, while the engine still uploads every tensor to a buffer of its own, so the GPU reads as much per
    step as with distinct weights (the values do not matter for timing). ``shape``: a key of ``SHAPES``;
    ``tokenizer_from``: a folder whose tokenizer files are copied beside the weights (a servable text checkpoint).
    ``int4``: the projections as AWQ or GPTQ int4 (random codes, every zero 8, float16 scales of 2**-7: weights of
    bf16 scale) in groups of 128."""
    cfg: dict[str, Any] = {
        "model_type": "llama",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "eos_token_id": 2,
    }
    cfg.update(SHAPES[shape], num_hidden_layers=layers)
    block = (np.random.default_rng(0).standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(np.float32)
    bits = (block.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bits
    one = (np.full(cfg["hidden_size"], 1.0, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    hq, hk, v = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hq * d, h),
                p + "self_attn.k_proj.weight": (hk * d, h),
                p + "self_attn.v_proj.weight": (hk * d, h),
                p + "self_attn.o_proj.weight": (h, hq * d),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    codes = np.random.default_rng(1).integers(0, 256, 1 << 22, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x30  # no NaN code
    codes[(codes & 0x78) >= 0x58] &= 0xC7  # no exponent above 10: |w| < 16, so sums stay finite
    if fp8 is not None:
        cfg["quantization_config"] = FP8_CONFIGS[fp8]
        for name, shape in list(shapes.items()):
            if name.rsplit(".", 2)[-2] in _PROJECTIONS:
                n, k = shape
                scale_shape = {"tensor": (), "channel": (n, 1), "block": (-(-n // 128), -(-k // 128))}[fp8]
                shapes[name] = ("F8_E4M3", shape)  # type: ignore[assignment]
                suffix = "weight_scale_inv" if fp8 == "block" else "weight_scale"
                shapes[name[: -len("weight")] + suffix] = ("F32", scale_shape)  # type: ignore[assignment]
    if int4 is not None:
        cfg["quantization_config"] = INT4_CONFIGS[int4]
        for name, shape in list(shapes.items()):
            if name.rsplit(".", 2)[-2] in _PROJECTIONS:
                n, k = shape
                base = name[: -len("weight")]
                del shapes[name]
                packed = (k, n // 8) if int4 == "awq" else (k // 8, n)
                shapes[base + "qweight"] = ("I32", packed)  # type: ignore[assignment]
                shapes[base + "qzeros"] = ("I32-zeros", (k // 128, n // 8))  # type: ignore[assignment]
                shapes[base + "scales"] = ("F16", (k // 128, n))  # type: ignore[assignment]
    words = np.random.default_rng(2).integers(0, 1 << 32, 1 << 22, dtype=np.uint64).astype(np.uint32).view(np.int32)
    blobs: dict[tuple[Any, ...], tuple[int, np.ndarray]] = {}  # (dtype, shape) -> (offset, data)
    offset = 0
    header: dict[str, object] = {}
    for name, spec in shapes.items():
        dtype, shape = spec if isinstance(spec[0], str) else ("BF16", spec)
        if (dtype, shape) not in blobs:
            size = int(np.prod(shape))
            if dtype == "F8_E4M3":
                arr = np.resize(codes, size)
            elif dtype == "I32":
                arr = np.resize(words, size)
            elif dtype == "I32-zeros":
                arr = np.full(size, 0x88888888, np.uint32).view(np.int32)  # every zero 8
            elif dtype == "F16":
                arr = np.full(size, 2.0**-7, np.float16)
            elif dtype == "F32":
                arr = np.full(size, 2.0**-8, np.float32)  # e4m3 codes up to 15.x, times 2**-8: weights of bf16 scale
            else:
                arr = one if len(shape) == 1 else np.resize(bits, size)
            blobs[(dtype, shape)] = (offset, arr)
            offset += arr.nbytes
        at, arr = blobs[(dtype, shape)]
        stored = dtype.split("-")[0]  # ("I32-zeros": an int32 tensor of other contents than the weights')
        header[name] = {"dtype": stored, "shape": list(shape), "data_offsets": [at, at + arr.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "model.safetensors").open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, arr in blobs.values():
            f.write(arr.tobytes())
    (folder / "config.json").write_text(json.dumps(cfg))
    for name in _TOKENIZER_FILES if tokenizer_from is not None else ():
        if (tokenizer_from / name).is_file():
            (folder / name).write_bytes((tokenizer_from / name).read_bytes())


def set_variant(variant: str) -> None:
    """The class-level settings of one ``--variants`` name (the TP 1 ones; ``a+b`` sets both a's and b's)."""
    from fi_engine.models.llama import LlamaEngine
    from fi_engine.runtime.worker.model_runner import ModelRunner

    if "+" in variant:
        for part in variant.split("+"):
            set_variant(part)
        return
    if variant == "lt":  # every GEMM of the decode graph through cuBLASLt (before the GEMV served one row)
        import fi_engine.kernels.dense

        fi_engine.kernels.dense.gemv_bound = lambda rows, n, k: False
    if variant == "no-skinny":  # steps of 5-32 rows without the skinny GEMM (cuBLASLt and the FP8 paths only)
        from fi_engine.kernels.skinny_gemm import SkinnyLaunches

        SkinnyLaunches.on = False
    if variant == "no-wg4":  # int4 weights without the skinny GEMM's warpgroup form (its mma.sync geometries only;
        # the W4A8 form's none)
        from fi_engine.kernels import skinny_gemm

        for fmt in (skinny_gemm.INT4, skinny_gemm.INT4_A8Q):
            skinny_gemm.GEOMETRIES[fmt] = tuple(g for g in skinny_gemm.GEOMETRIES[fmt] if not g.wg)
    if variant == "wg4-plain":  # the warpgroup form as first served: one strip a warp, x staged by 4-byte copies,
        # the weights in registers, 25-32 rows (its two-block geometry too)
        from fi_engine.kernels import skinny_gemm

        plain = (
            skinny_gemm.Geometry(1, 2, 8, 2, 512, (4,), True),
            skinny_gemm.Geometry(1, 2, 8, 1, 256, (4,), True, True),
            skinny_gemm.Geometry(1, 4, 8, 1, 512, (4,), True, True),
        )
        int4 = skinny_gemm.GEOMETRIES[skinny_gemm.INT4]
        skinny_gemm.GEOMETRIES[skinny_gemm.INT4] = (*(g for g in int4 if not g.wg), *plain)
    if variant == "no-wg8":  # FP8 weights without the skinny GEMM's warpgroup form (its W8A8 form too)
        from fi_engine.kernels import skinny_gemm

        for fmt in (skinny_gemm.E4M3_BLOCK, skinny_gemm.E4M3_ROW, skinny_gemm.E4M3_A8, skinny_gemm.E4M3_A8Q):
            skinny_gemm.GEOMETRIES[fmt] = tuple(g for g in skinny_gemm.GEOMETRIES[fmt] if not g.wg)
    if variant == "skinny-w8a8":  # FP8 block weights may take the skinny GEMM's W8A8 form (x quantized, e4m3 wgmma)
        from fi_engine.kernels.skinny_gemm import SkinnyLaunches

        SkinnyLaunches.w8a8_on = True
    if variant == "no-w8a8":  # FP8 block weights without the skinny GEMM's W8A8 form (on by default)
        from fi_engine.kernels.skinny_gemm import SkinnyLaunches

        SkinnyLaunches.w8a8_on = False
    if variant == "skinny-w4a8":  # int4 weights may take the skinny GEMM's W4A8 form (x to int8, integer wgmma)
        from fi_engine.kernels.skinny_gemm import SkinnyLaunches

        SkinnyLaunches.w4a8_on = True
    if variant == "w8a8-quantizer":  # that form over x quantized by a launch of its own first only
        from fi_engine.kernels.skinny_gemm import SkinnyLaunches

        SkinnyLaunches.w8a8_fused, SkinnyLaunches.w8a8_quantizer = False, True
    if variant == "w8a8-both":  # that form's plans of both kinds, x quantized in the kernel (the default) and first
        from fi_engine.kernels.skinny_gemm import SkinnyLaunches

        SkinnyLaunches.w8a8_quantizer = True
    if variant == "wg4-rows-25":  # the warpgroup form at 25-32 rows only
        import dataclasses

        from fi_engine.kernels import skinny_gemm

        skinny_gemm.GEOMETRIES[skinny_gemm.INT4] = tuple(
            dataclasses.replace(g, groups=(4,)) if g.wg else g for g in skinny_gemm.GEOMETRIES[skinny_gemm.INT4]
        )
    if variant.startswith("tc-decode-rows-"):  # decode graphs of N+ rows: attention on FlashInfer's FA2 prefill kernel
        ModelRunner.tensor_core_decode_rows = int(variant.rsplit("-", 1)[1])
    if variant == "no-tc-decode":  # every decode graph's attention on FlashInfer's decode kernel
        ModelRunner.tensor_core_decode_rows = 0
    if variant.startswith("tc-decode-context-"):  # graphs of fewer rows: the prefill kernel from N tokens (0: never)
        ModelRunner.tensor_core_decode_context = int(variant.rsplit("-", 1)[1])
    if variant == "no-prefill-kernel-pdl":  # the prefill kernel's decode runs without programmatic dependent launch
        ModelRunner.prefill_kernel_pdl = False
    if variant == "skinny-silu":  # the dense MLP's gate/up GEMM may take the skinny GEMM's SiLU form (off: RESULTS)
        from fi_engine.kernels.skinny_gemm import SkinnyLaunches

        SkinnyLaunches.silu_on = True
    if variant == "tune-pairs":  # the decode graphs' tuning also tries consecutive shapes together (off: RESULTS)
        from fi_engine.runtime.worker import step_tuning

        step_tuning.TUNE_PAIRS = True
    if variant == "no-pdl":  # the fused step's GEMVs launched without programmatic dependent launch
        from fi_engine.kernels.launch import Launcher

        Launcher.pdl = False
    if variant == "fp8-fused":  # FP8 weights: the fused step with the norms and SiLU as prologues (off: slower)
        from fi_engine.kernels.quantized_weights import QuantizedWeights

        QuantizedWeights.fp8_fused = True
    if variant == "norm-fold":  # FP8 and int4 weights: the fused step's norms folded into its GEMVs (off: slower)
        from fi_engine.kernels.quantized_weights import QuantizedWeights

        QuantizedWeights.norm_in_gemv = True
    if variant == "int4-rope-launches":  # int4 weights: RoPE and the KV append as launches, not the QKV GEMV's epilogue
        from fi_engine.kernels.quantized_weights import QuantizedWeights

        QuantizedWeights.int4_rope = False
    if variant == "graph-fused-one-row":  # int4 weights: the graphs of 2-8 rows capture the separate launches
        ModelRunner.graph_fused_int4_rows = 1
    if variant == "fp8-norm-no-pdl":  # FP8 weights: the epilogue step's norms without programmatic dependent launch
        ModelRunner.norm_pdl = False
    if variant == "fp8-separate":  # FP8 weights: the decode step as separate launches (before 2026-11-25)
        from fi_engine.kernels.quantized_weights import QuantizedWeights

        QuantizedWeights.fp8_epilogues = False
    if variant == "fp8-scalar-gemv":  # FP8 weights: the GEMV without tensor cores (gemv8_*; before 2026-11-25)
        from fi_engine.kernels.fp8_linear import Fp8Linears

        Fp8Linears.tensor_core_rows = 9
    if variant == "w8a16":  # FP8 weights: steps of more than 8 rows dequantize (before the FP8 tensor-core GEMM)
        from fi_engine.kernels.quantized_weights import QuantizedWeights

        QuantizedWeights.fp8_w8a8 = False
    if variant == "w8a8-no-blocks":  # FP8 128x128-block weights: dequantized above 8 rows (before 2026-11-24)
        from fi_engine.kernels.quantized_weights import QuantizedWeights

        QuantizedWeights.fp8_w8a8_blocks = False
    if variant.startswith("fp8-tc-rows-"):  # FP8 weights: the GEMV on tensor cores from N rows up (3 by default)
        from fi_engine.kernels.fp8_linear import Fp8Linears

        Fp8Linears.tensor_core_rows = int(variant.rsplit("-", 1)[1])
    if variant.startswith("fp8-gemv-rows-"):  # FP8 weights: the GEMV up to N rows, the FP8 GEMM above
        from fi_engine.kernels.quantized_weights import QuantizedWeights

        QuantizedWeights.fp8_gemv_max_rows = int(variant.rsplit("-", 1)[1])
    if variant.startswith("int4-ahead-"):  # int4 weights: the GEMV's warps load runs of N tiles (1 by default)
        from fi_engine.kernels.int4_linear import Int4Linears

        Int4Linears.tiles_ahead = int(variant.rsplit("-", 1)[1])
    if variant == "fp8-lean":  # FP8 weights: the tensor-core GEMV's lean loop (Fp8Linears.lean_loop)
        from fi_engine.kernels.fp8_linear import Fp8Linears

        Fp8Linears.lean_loop = True
    if variant == "int4-lean":  # int4 weights: the GEMV's lean loop (two register sets in turn; Int4Linears.lean_loop)
        from fi_engine.kernels.int4_linear import Int4Linears

        Int4Linears.lean_loop = True
    if variant.startswith("int4-warps-"):  # int4 weights: GEMV launches aiming at N warps an SM at every row
        from fi_engine.kernels.int4_linear import Int4Linears  # count (by default 32, 16, 8 up to 8, 16, 32 rows)

        Int4Linears.warps_per_sm = (int(variant.rsplit("-", 1)[1]),) * 3
    if variant.startswith("fp8-one-row-blocks-"):  # FP8 weights: one-row GEMV launches of N blocks an SM (64)
        from fi_engine.kernels.fp8_linear import Fp8Linears

        Fp8Linears.one_row_blocks_per_sm = int(variant.rsplit("-", 1)[1])
    if variant.startswith("unroll-"):  # the 16-bit GEMVs with N weight vectors in flight per lane (4 by default)
        from fi_engine.kernels.gemv_settings import GemvSettings

        GemvSettings.gemv_unroll = int(variant.rsplit("-", 1)[1])
    if variant.startswith("rope-unroll-"):  # the QKV + RoPE GEMV with N vectors per column in flight (1: before)
        from fi_engine.kernels.fused_gemv import FusedKernels

        FusedKernels.rope_unroll = int(variant.rsplit("-", 1)[1])
    if variant.startswith("fused-blocks-"):  # the fused GEMVs with at most N blocks per SM (8 by default)
        from fi_engine.kernels.fused_gemv import FusedKernels

        FusedKernels.fused_blocks_per_sm = int(variant.rsplit("-", 1)[1])
    if variant.startswith("fused-min-blocks-"):  # the one-row fused GEMVs' registers capped for N blocks an SM (4)
        from fi_engine.kernels.fused_gemv import FusedKernels

        FusedKernels.fused_min_blocks = int(variant.rsplit("-", 1)[1])
    if variant == "silu-prologue":  # the down GEMV computes SiLU-and-mul in each block (before 2026-11-25)
        ModelRunner.silu_in_gate_up = False
    if variant == "any-rows":  # one 16-bit GEMV kernel for any row count (before 2026-11-25)
        from fi_engine.kernels.gemv_settings import GemvSettings

        GemvSettings.gemv_fixed_rows = False
    if variant == "no-gemv-pipeline":  # the 16-bit GEMVs load their next weights after summing (before 2026-11-25)
        from fi_engine.kernels.gemv_settings import GemvSettings

        GemvSettings.gemv_pipeline = False
    if variant == "no-pipeline":  # each decode step launched after the last one's tokens are read (before 2026-11-25)
        LlamaEngine.pipelined_decode = False
    if variant == "no-attn-pdl":  # the fused step's attention runs launched without programmatic dependent launch
        ModelRunner.attention_pdl = False
    if variant == "no-tune":  # each GEMM shape's launch as timed alone, not tried in the captured step
        ModelRunner.tune_decode_graphs = False
    if variant == "tune-quantized":  # FP8 and int4 shapes tried in the captured step too (off: RESULTS.md says why)
        from fi_engine.runtime.worker import step_tuning

        step_tuning.TUNE_QUANTIZED = True
    if variant == "release-rows":  # the engine's own add-norm and SiLU, each releasing the GEMM after it at its start
        ModelRunner.release_rows = True
    if variant == "no-release-rows":  # FlashInfer's add-norm and silu_and_mul in the decode steps
        ModelRunner.release_rows = False
    if variant == "tune-wide":  # launches timed alone within 50 % of a shape's fastest tried in the step, up to 4
        from fi_engine.runtime.worker import step_tuning

        step_tuning.TUNE_WITHIN, step_tuning.TUNE_MOST = 0.5, 4
    if variant == "one-graph":  # one decode graph of max_batch rows for every step (before 2026-11-25)
        ModelRunner.decode_graph_ladder = False
    if variant == "unfused":  # a one-row decode graph of separate launches (before 2026-11-23)
        ModelRunner.graph_fused_decode = False
    if variant == "no-tp-fused":  # TP > 1: RoPE + append and SiLU as launches of their own, not the GEMVs' epilogues
        ModelRunner.tp_fused_epilogues = False
    if variant in ("tp-pipe", "no-tp-pipe"):
        # TP > 1: each graph step staged ahead and launched before the last one's ids are read (the default since
        # 2026-11-27), or each launched after them
        from fi_engine.runtime.serving import ServingLoop

        ModelRunner.tp_prepare_ahead = ServingLoop.tp_pipelined_decode = variant == "tp-pipe"
    if variant in ("tp-tune", "no-tp-tune"):  # TP > 1: the decode graphs' GEMM launches tuned in the captured step,
        ModelRunner.tp_tune_decode_graphs = variant == "tp-tune"  # in lock step, or not
    if variant == "after-wait":  # the engine's kernels let the next one start after their wait, not at their start
        from fi_engine.kernels.cuda_sources import Griddep

        Griddep.after_wait = True
    if variant in ("pdl", "ar-early", "no-ar-pdl"):  # the fused all-reduce + norm with programmatic dependent
        # launch: the next kernel launched when it ends (pdl), once it has waited for the kernel before it (ar-early,
        # the default), or without it (no-ar-pdl: the engine's kernels then release the next at their start)
        from fi_engine.layers.tensor_parallel import ResidualAllReduce

        ResidualAllReduce.launch_with_pdl = variant != "no-ar-pdl"
        ResidualAllReduce.trigger_early = variant == "ar-early"


def run_rank(
    model: str,
    out: str,
    variant: str,
    new_tokens: int,
    batches: list[int],
    modes: list[str],
    profile: bool,
    max_batch: int = 0,
    choices: bool = False,
    prompt_tokens: int = 32,
) -> None:
    """One rank (or the single GPU): every configuration, rank 0 writes the rows; ``choices``: every rank prints
    its GEMM shapes' launches timed alone (stderr); ``prompt_tokens``: each random prompt's length."""
    from fi_engine.models.llama import Llama, LlamaEngine

    tp = int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ else 1
    nccl = variant == "nccl"
    set_variant(variant)
    rows = []
    rng = np.random.default_rng(0)
    cfg = json.loads((Path(model) / "config.json").read_text())
    vocab = cfg["vocab_size"]
    rank = 0
    for batch in batches:
        prompts = [rng.integers(3, vocab, prompt_tokens).tolist() for _ in range(batch)]
        for graph in [m == "graph" for m in modes]:
            with LlamaEngine(
                model,
                max_batch=max(batch, max_batch),
                max_seq_len=max(256, prompt_tokens + new_tokens),
                cuda_graph=graph,
                tensor_parallel=tp,
                fused_allreduce=not nccl,
                vocab_parallel=variant != "whole-vocab",
            ) as engine:
                if variant == "agree":  # greedy ids from the shards' combined argmax, no broadcast from rank 0
                    engine.sampler.ids_agree = engine.runner.vocab_shard is not None
                if variant == "ahead":  # the next step's index arrays and plan prepared while the GPU runs this one
                    engine.runner.prepare_ahead = type(engine.family).plan_decode is Llama.plan_decode
                if variant == "in-step":  # each step prepared after the last one's tokens are back (before 2026-11-23)
                    engine.runner.prepare_ahead = False
                for graph_rows, tuning in engine.runner.step_graphs.tuning.items():  # (stderr: what the step kept)
                    changed = [
                        (s.shape[1:3] + s.shape[5:], s.before[0], s.kept[0])
                        for s in tuning.shapes
                        if s.kept != s.before
                    ]
                    print(
                        f"tuned graph of {graph_rows} rows: {tuning.start_ms:.3f} -> {tuning.kept_ms:.3f} ms; "
                        f"{len(tuning.shapes)} shapes tried, changed (n, k), launch before -> after: {changed}",
                        file=sys.stderr,
                    )
                engine.generate(prompts, 4, eos_token_ids=())  # warm-up
                if choices:  # (stderr: each GEMM shape's launches timed alone, us, and the one serving it)
                    for key, (times, chosen) in sorted(engine.runner.dense.timed_launches().items()):
                        alone = ", ".join(f"{label}: {ms * 1e3:.1f}" for label, ms in sorted(times.items()))
                        print(
                            f"rank {engine.rank} rows {key[0]} (n, k) {key[1:3]}{' quantized' if key[5] else ''}"
                            f"{' with SiLU' if key[6:] else ''}: "
                            f"{alone}; serving {chosen}",
                            file=sys.stderr,
                        )
                result = engine.generate(prompts, new_tokens, eos_token_ids=())
                rank = engine.rank
                profiled = variant in ("fused", "lt", "whole-vocab", "tp-pipe")
                parts = step_parts(engine) if profile and graph and profiled else None
            rows.append(
                {
                    "tp": tp,
                    "layers": cfg["num_hidden_layers"],
                    "all-reduce": "nccl" if nccl or tp == 1 else "fused",
                    "vocab": "whole" if tp == 1 or variant == "whole-vocab" else "split",
                    "ids": "broadcast" if tp > 1 and variant != "agree" else "-",
                    "host prep": "ahead" if engine.runner.prepare_ahead else "in step",
                    "variant": variant,
                    "pdl": bool(getattr(engine.runner.allreduce, "pdl", False)),
                    "batch": batch,
                    "max_batch": max(batch, max_batch),
                    "mode": "graph" if graph else "eager",
                    "tokens_per_s": result.tokens_per_s,
                    "host_us_per_step": result.host_us_per_step,
                    "step_ms": result.decode_s / max(1, result.decode_steps) * 1e3,
                    # the mean context of the decode steps: the prompt and half the new tokens
                    "bytes_per_step": decode_step_bytes(
                        shape_from_config(cfg),
                        batch=batch,
                        context=prompt_tokens + new_tokens // 2,
                        tp=tp,
                        vocab_parallel=variant != "whole-vocab",
                    ),
                    "tokens_sha": hashlib.sha256(json.dumps(result.tokens).encode()).hexdigest()[:12],
                    "parts_us": parts,
                }
            )
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def step_parts(engine: object, reps: int = 20) -> dict[str, float]:
    """Where a graph decode step's device time goes: each part of the step (over all layers) captured as a CUDA
    graph of its own and replayed ``reps`` times back to back, us per step (CUDA events); ``graph replay`` is the
    engine's own decode graph replayed back to back (no host work between steps), ``host: ...`` the host time of
    the per-step calls outside the graph. Runs the parts on padded rows of the last plan; it leaves the engine's
    buffers garbage (call it last). Reads the engine's private state: a measurement, not an API."""
    import time

    import cupy as cp

    from fi_engine.kernels import flashinfer as kernels
    from fi_engine.kernels.graph import CudaGraph
    from fi_engine.runtime.sched.step_arrays import fill_decode
    from fi_engine.runtime.worker.step_graphs import _refuse_allocation
    from fi_ffi import stream_scope

    e: Any = engine
    c, b, dense, s = e.config, e.runner.buffers, e.runner.dense, e.runner.stream_ptr
    h, inter, ab, eps = c.hidden_size, c.intermediate_size, e.runner.gemm_type, c.rms_norm_eps
    rows, layers = e.max_batch, c.num_layers
    hqd, w = c.num_qo_heads * c.head_dim, e.runner.qkv_width
    normed, x, qkv, attn, gu, act = (a.data.ptr for a in (e.runner.normed, b.x, b.qkv, b.attn, b.gu, b.act))
    out: dict[str, float] = {}
    dense.bandwidth_bound = True  # as in the engine's decode graph (Dense.gemv_bound picks GEMV or cuBLASLt)
    with cp.cuda.Device(e.device), e.stream, stream_scope(s, e.device):
        n_pages = fill_decode([None] * rows, e.page_size, e.runner.decode_arrays)
        e.runner.upload_decode(rows, n_pages, cuda_graph=True)
        v = e.runner.view("decode", rows, rows)

        def embed() -> None:
            vs = e.runner.vocab_shard
            if vs is None:
                dense.rows.gather_rows(rows, e.runner.embed, h, v.token_ids, b.h.data.ptr, h, h)
                kernels.rmsnorm(v.h, e.runner.ln1[0], v.x2, eps, s)
            else:
                dense.shards.gather_rows_shard(rows, e.runner.embed, h, v.token_ids, x, h, h, vs.start, vs.valid)
                cp.cuda.runtime.memsetAsync(b.h.data.ptr, 0, rows * h * b.h.itemsize, s)
                e.runner.add_norm(v, e.runner.ln1[0])

        def rope_append(i: int) -> None:
            kernels.rope_inplace(v.q, v.k, v.positions, c.rope, s)
            kernels.append_kv(
                v.k, v.v, v.batch_indices, v.positions, e.runner.k_cache[i], e.runner.v_cache[i], v.kv_indices,
                v.kv_indptr, v.kv_last_page_len, s,
            )  # fmt: skip

        per_layer = {
            "qkv gemm": lambda i: dense.linear(rows, normed, h, e.runner.wqkv[i], w, h, qkv, w, ab, ab),
            "rope + kv append": rope_append,
            "attention": lambda i: e.runner.decode_attention(i, v),
            "o gemm": lambda i: dense.linear(rows, attn, hqd, e.runner.wo[i], h, hqd, x, h, ab, ab),
            "add+norm (all-reduce) x2": lambda i: (
                e.runner.add_norm(v, e.runner.ln2[i]),
                e.runner.add_norm(v, e.runner.ln1[i]),
            ),
            "gate/up gemm": lambda i: dense.linear(
                rows, normed, h, e.runner.wgu[i], 2 * inter, h, gu, 2 * inter, ab, ab
            ),
            "silu_and_mul": lambda i: kernels.silu_and_mul(v.gu, v.act, s),
            "down gemm": lambda i: dense.linear(rows, act, inter, e.runner.wd[i], h, inter, x, h, ab, ab),
        }
        parts: dict[str, Any] = {"embedding": embed}
        for name, fn in per_layer.items():
            parts[name] = lambda fn=fn: [fn(i) for i in range(layers)]
        parts["lm head"] = lambda: e.runner.head(rows, normed)
        parts["argmax (+ combine)"] = lambda: e.sampler.argmax(rows)
        if e.comm is not None:
            parts["ids broadcast"] = lambda: e.comm.broadcast(b.ids, root=0, stream=s)
        parts["step (one graph)"] = lambda: e.runner.step_graphs._decode_body(v, rows)
        start, end = cp.cuda.Event(), cp.cuda.Event()

        def timed(launch: Any) -> float:
            launch()
            e.stream.synchronize()
            start.record(e.stream)
            for _ in range(reps):
                launch()
            end.record(e.stream)
            end.synchronize()
            return float(cp.cuda.get_elapsed_time(start, end)) * 1e3 / reps

        for name, fn in parts.items():
            g = CudaGraph(s)
            try:
                with cp.cuda.using_allocator(_refuse_allocation), g.capture():
                    fn()
                out[name] = timed(g.launch)
            except Exception as exc:  # a part that cannot be captured alone: say so, time the others
                print(f"step_parts: {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            finally:
                g.close()
        step_graph = e.runner.step_graphs.planned_graph(rows)  # (the one this plan replays: by its attention kernel)
        out["graph replay"] = timed(step_graph.launch)
        # host time of what Passes.decode_step does outside the graph, per call
        for name, fn in {
            "host: upload + plan": lambda: e.runner.upload_decode(rows, n_pages, cuda_graph=True),
            "host: graph launch": step_graph.launch,
            "host: ids broadcast call": lambda: e.comm.broadcast(b.ids, root=0, stream=s) if e.comm else None,
            "host: step's share_ids": lambda: e.sampler.share_ids(False),  # a greedy step's
        }.items():
            e.stream.synchronize()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            out[name] = (time.perf_counter() - t) * 1e6 / reps
            e.stream.synchronize()
        # each of ``reps`` back-to-back launches timed alone: the first on an idle stream (the plain loop's launch),
        # the second with one graph in flight (the pipelined loop's), and the median and slowest (a launch that
        # waits for the GPU shows here, not as host work); the ranks start together, so a late peer holds neither
        if e.comm is not None:
            e.comm.barrier()
        e.stream.synchronize()
        each = []
        for _ in range(reps):
            t = time.perf_counter()
            step_graph.launch()
            each.append((time.perf_counter() - t) * 1e6)
        e.stream.synchronize()
        out["host: launch, idle stream"] = each[0]
        out["host: launch, 1 in flight"] = each[1]
        out[f"host: launch, median of {reps}"] = float(np.median(each))
        out[f"host: launch, max of {reps}"] = max(each)
    dense.bandwidth_bound = False
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", type=Path, help="write a random 8B-shaped checkpoint here and exit")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="with --make: the model's shapes")
    ap.add_argument("--tokenizer-from", type=Path, help="with --make: copy this folder's tokenizer files beside it")
    ap.add_argument("--fp8", choices=sorted(FP8_CONFIGS), help="with --make: e4m3 projections in this scale layout")
    ap.add_argument("--int4", choices=sorted(INT4_CONFIGS), help="with --make: int4 projections in this layout")
    ap.add_argument("--make-mixtral", type=Path, help="write a random Mixtral-shaped checkpoint here and exit")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--tp", default="1,2,4", help="tensor-parallel sizes (comma-separated)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="each random prompt's tokens (the decode contexts)")
    ap.add_argument("--json")
    ap.add_argument("--rank-out", help=argparse.SUPPRESS)  # internal: a rank's output file
    ap.add_argument("--variant", default="fused", help=argparse.SUPPRESS)  # internal: one variant per process
    ap.add_argument("--batches", default="1,32", help="batch sizes (comma-separated)")
    ap.add_argument("--modes", default="eager,graph", help="eager and/or graph")
    ap.add_argument(
        "--max-batch",
        type=int,
        default=0,
        help="the engine's max_batch (a server's slots) for every batch; 0 (default): max_batch = the batch",
    )
    ap.add_argument(
        "--variants",
        default="fused,nccl,whole-vocab",
        help="TP > 1 rows: fused (fused all-reduce, vocabulary split), nccl (NCCL + fused_add_rmsnorm), whole-"
        "vocab (fused all-reduce, embedding and LM head whole on every rank), agree (as fused, greedy ids "
        "from the shards' combined argmax without rank 0's broadcast; off in the engine until measured), in-"
        "step (TP 1: each graph step prepared only after the last one's tokens are back), lt (TP 1: every "
        "GEMM of the decode graph through cuBLASLt, none through the GEMV), unfused (TP 1: a one-row decode "
        "graph of separate launches, not the fused step), no-pdl (TP 1: the fused step's GEMVs without "
        "programmatic dependent launch), fp8-fused (TP 1, FP8 checkpoints: the fused step with the norms and SiLU "
        "as its FP8 GEMVs' prologues, off by default), fp8-separate (TP 1, FP8 checkpoints: the decode step as "
        "separate launches, not the GEMVs with SiLU and RoPE epilogues), fp8-norm-no-pdl (TP 1, FP8 checkpoints: "
        "that step's norms launched without programmatic dependent launch), w8a16 (TP 1, FP8 checkpoints: steps of "
        "more than 8 rows dequantize instead of the "
        "FP8 GEMM), w8a8-no-blocks (TP 1, 128x128-block FP8 checkpoints: dequantized above 8 rows, not the "
        "FP8 GEMM), fp8-gemv-rows-N (TP 1, FP8 checkpoints: the FP8 GEMV up to N rows, the FP8 GEMM above), "
        "fp8-tc-rows-N (TP 1, FP8 checkpoints: the FP8 GEMV on tensor cores from N rows up; 3 by default), "
        "norm-fold (TP 1, FP8 and int4 checkpoints: the fused step's norms between two GEMVs folded into them, "
        "QuantizedWeights.norm_in_gemv on), int4-rope-launches (TP 1, int4 checkpoints: RoPE and the KV append as "
        "launches, QuantizedWeights.int4_rope off), graph-fused-one-row (TP 1, int4 checkpoints: the decode graphs of "
        "2-8 rows capture the separate launches, ModelRunner.graph_fused_int4_rows 1), "
        "int4-ahead-N (TP 1, int4 checkpoints: the int4 GEMV's warps load runs "
        "of N tiles; Int4Linears.tiles_ahead), "
        "int4-warps-N (TP 1, int4 checkpoints: int4 GEMV launches aiming at N warps an SM; Int4Linears.warps_per_sm), "
        "unroll-N (TP 1: the 16-bit GEMVs with N weight vectors in flight per lane; GemvSettings.gemv_unroll), rope-"
        "unroll-N (TP 1: the QKV + RoPE GEMV's; 1 is its loop before 2026-11-25), fused-blocks-N (TP 1: the "
        "fused GEMVs with at most N blocks per SM; FusedKernels.fused_blocks_per_sm, 8 by default), "
        "fused-min-blocks-N (TP 1: the one-row fused GEMVs' registers capped for N blocks an SM; "
        "FusedKernels.fused_min_blocks, 4), any-rows (TP 1: one 16-bit GEMV kernel for any row count, "
        "GemvSettings.gemv_fixed_rows off), no-gemv-pipeline (TP 1: the 16-bit GEMVs load their next weights after "
        "summing, GemvSettings.gemv_pipeline off), silu-prologue (TP 1: the one-row step's down GEMV computes "
        "SiLU-and-mul in each of its blocks, ModelRunner.silu_in_gate_up off; TP 1 names joined by + combine, e.g. "
        "any-rows+no-gemv-pipeline), no-attn-pdl (TP "
        "1: the fused step's attention runs without programmatic dependent launch), no-pipeline (TP 1: each "
        "graph step launched only after the last one's tokens are read, ServingLoop.pipelined_decode off), "
        "one-graph (TP 1: one decode graph of max_batch rows for every step, ModelRunner.decode_graph_ladder "
        "off), no-tune (TP 1: each GEMM shape's launch as timed alone, not tried in the captured step, "
        "ModelRunner.tune_decode_graphs off), tune-quantized (TP 1: FP8 and int4 shapes tried in the captured step "
        "too, step_tuning.TUNE_QUANTIZED), tune-wide (TP 1: launches timed alone within 50 %% of a shape's fastest "
        "tried in the step, up to 4 a shape), release-rows (TP 1: the decode steps' add-norms and SiLU-and-mul the "
        "engine's own, each releasing the GEMM after it at its start, ModelRunner.release_rows, the default), "
        "no-release-rows (TP 1: FlashInfer's launches there), again (TP 1: the default once more, after the others: "
        "the run's own noise), ahead (as fused, "
        "the next step prepared while the GPU runs this one; TP 1 runs it too), ar-early (TP > 1: the fused "
        "all-reduce launched with programmatic dependent launch, the next kernel once the all-reduce has waited for "
        "the kernel before it, and the engine's kernels letting the next start once their own wait has returned: "
        "the default, see ResidualAllReduce), pdl (TP > 1: as ar-early, the next kernel launched when the "
        "all-reduce ends), no-ar-pdl (TP > 1: the all-reduce launched plainly, the engine's kernels releasing the "
        "next at their start), after-wait (the engine's kernels let the next kernel start once their own wait has "
        "returned, cuda_sources.Griddep.after_wait: what a TP > 1 rank does by default; at TP 1 it measures the "
        "cost on one GPU), no-tp-fused (TP > 1: a step "
        "of 1-4 rows launches RoPE + append and SiLU-and-mul on their own instead of as the QKV and gate/up "
        "GEMVs' epilogues, "
        "ModelRunner.tp_fused_epilogues off), tp-pipe (TP > 1: each graph step staged while the last one runs and "
        "launched before its ids are read, ServingLoop.tp_pipelined_decode and ModelRunner.tp_prepare_ahead on, "
        "the default), no-tp-pipe (TP > 1: both off, each step launched after the last one's ids are read; "
        "--profile also times the graph launch with one graph in flight), tp-tune (TP > 1: the decode graphs' GEMM "
        "launches tuned in the captured step with the ranks in lock step, ModelRunner.tp_tune_decode_graphs on), "
        "no-tp-tune (TP > 1: that tuning off, the default)",
    )
    ap.add_argument("--profile", action="store_true", help="graph rows: also time each part of the step")
    ap.add_argument(
        "--choices", action="store_true", help="print (stderr) each rank's GEMM shapes: launches timed alone, one kept"
    )
    add_hbm_tbs_argument(ap)
    args = ap.parse_args()
    if args.make:
        make(args.make, args.layers, args.fp8, args.shape, args.tokenizer_from, args.int4)
        return
    if args.make_mixtral:
        from bench_mixtral import make_checkpoint  # beside this file (the script's folder is on sys.path)

        args.make_mixtral.mkdir(parents=True, exist_ok=True)
        make_checkpoint(args.make_mixtral, args.layers, 32000)
        return
    if args.model is None:
        ap.error("--model DIR (or --make DIR first)")
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    if args.rank_out:
        run_rank(
            str(args.model),
            args.rank_out,
            args.variant,
            args.new_tokens,
            batches,
            modes,
            args.profile,
            args.max_batch,
            args.choices,
            args.prompt_tokens,
        )
        return
    table = []
    for tp in [int(t) for t in args.tp.split(",")]:
        variants = args.variants.split(",")
        one_gpu = ["fused"] + [v for v in variants if all(one_gpu_variant(part) for part in v.split("+"))]
        for variant in one_gpu if tp == 1 else variants:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                cmd = [sys.executable, __file__, "--model", str(args.model), "--rank-out", out.name]
                cmd += ["--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens)]
                cmd += ["--variant", variant]
                cmd += ["--batches", args.batches, "--modes", args.modes] + (["--profile"] if args.profile else [])
                cmd += ["--max-batch", str(args.max_batch)] + (["--choices"] if args.choices else [])
                if tp > 1:
                    cmd = [sys.executable, "-m", "fi_ffi", "launch", "--nproc", str(tp), "--", *cmd]
                done = subprocess.run(cmd)
                if done.returncode:
                    print(f"tp {tp} {variant}: failed ({done.returncode})", file=sys.stderr)
                    continue
                table += json.loads(Path(out.name).read_text())
    # measured here, after the ranks' processes are gone: this process's CUDA context never shares the GPU with them
    bandwidth = roofline_denominator(0, hbm_tbs=args.hbm_tbs)
    print(bandwidth.line)
    print(f"{'variant':>11} {'layers':>6} {'tp':>3} {'all-reduce':>10} {'vocab':>6} {'ids':>9} {'host prep':>9} "
          f"{'batch':>7} {'mode':>6} {'pdl':>4} {'tokens/s':>10} {'ms/step':>8} {'host us/step':>13} "
          f"{'GB/step':>8} {'roofline':>8}")  # fmt: skip
    for r in table:
        # bytes read per step (one rank's) over the step time, against the memory bandwidth
        gb = r["bytes_per_step"] / 1e9
        roofline = r["bytes_per_step"] / bandwidth.bytes_per_s / (r["step_ms"] / 1e3) if r["step_ms"] else 0.0
        r["roofline"], r["bandwidth_bytes_per_s"] = roofline, bandwidth.bytes_per_s
        batch = f"{r['batch']}/{r.get('max_batch', r['batch'])}"  # the step's rows / the engine's slots
        print(
            f"{r.get('variant', '-'):>11} {r['layers']:>6} {r['tp']:>3} {r['all-reduce']:>10} {r['vocab']:>6} "
            f"{r['ids']:>9} {r['host prep']:>9} "
            f"{batch:>7} {r['mode']:>6} {'yes' if r['pdl'] else '-':>4} {r['tokens_per_s']:>10.1f} "
            f"{r['step_ms']:>8.3f} {r['host_us_per_step']:>13.1f} {gb:>8.2f} {100 * roofline:>7.0f}%"
        )
    # agree and ahead change no arithmetic: their greedy tokens must equal the fused rows' of the same shape
    # pdl rows: the same kernels, the same sums
    key = ("tp", "batch", "max_batch", "layers", "mode", "vocab", "all-reduce")
    for r in table:
        ref = [q for q in table if q["host prep"] == "in step" and q["ids"] == "-" and all(q[k] == r[k] for k in key)]
        if ref and ref[0]["tokens_sha"] != r["tokens_sha"]:
            print(f"tokens differ from the fused row's: {r}")
    profiled = [r for r in table if r.get("parts_us")]
    if profiled:  # one column per profiled row: us per step of each part
        names = list(dict.fromkeys(k for r in profiled for k in r["parts_us"]))
        heads = [f"{r.get('variant', '')[:5]} L{r['layers']} b{r['batch']}" for r in profiled]
        print(f"\n{'us per step':<28}" + "".join(f"{x:>15}" for x in heads))
        for k in names:
            cells = [r["parts_us"].get(k) for r in profiled]
            print(f"{k:<28}" + "".join(f"{'-' if c is None else format(c, '.1f'):>15}" for c in cells))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
