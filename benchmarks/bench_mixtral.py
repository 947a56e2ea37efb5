"""Decode throughput of fi_ffi's engine on a random Mixtral-shaped checkpoint (hidden 4096, intermediate 14336,
8 experts, top-2, 32/8 heads, head_dim 128; ``--layers`` of them, 4 by default so that it fits one GPU: the full
32 layers are 90 GB), float16, eager and CUDA graph, at batch 1 and 32 (``--batch``), each ``moe_path`` of
``--moe-paths`` (``auto``: the engine's choice per step; ``routed``: on the device, the grouped GEMV or the
fixed-capacity grouped GEMM; ``dense``: every expert through one GEMM and one batched GEMM): decode tokens/s, host
us/step, for the graph the GPU time of one replayed step, and the bytes a step is expected to read
(``bytes_per_step``: benchmarks/roofline.py's model, the experts counted as the distinct ones a step's rows choose
under uniform routing) over the step time against the device's memory bandwidth (the roofline; by default its peak
from the memory clock x bus width, printed first with a measured copy beside it; ``--hbm-tbs`` sets another
figure). ``--max-batch N`` runs every batch in an
engine of ``N`` slots, as a server holds them (the decode graphs: one per batch size up to ``N``, or with
``--one-graph`` a single one of ``N`` rows, as before 2026-11-25). ``--fp8 block|channel`` writes the checkpoint
with e4m3 attention and experts (the LM head float16); ``--fp8-experts stored,dequantized`` then compares the
experts read as stored by the FP8 grouped GEMV with their dequantization at load.

Needs a GPU, CuPy, cuBLAS and the model-family kernel wheel (``gemm_sm90``). No peer: this measures the engine
only. ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from roofline import add_hbm_tbs_argument, decode_step_bytes, roofline_denominator, shape_from_config

FP8_CONFIGS = {  # --fp8 LAYOUT: the quantization_config its published checkpoints carry (as bench_llama_tp's)
    "block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "channel": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0},
}


def make_checkpoint(folder: Path, layers: int, vocab: int, fp8: str | None = None) -> Path:
    """A random float16 Mixtral checkpoint (config.json + one .safetensors per layer), written with numpy. The
    experts' matrices are one random block per shape, shared by every expert of every layer (drawing 2.8 GB of
    normal floats per layer took most of a GPU run's minute and a half); the router and attention weights are drawn
    per layer, so the routing is as random as before, and each expert is still uploaded, and read, on its own.
    ``fp8``: the attention projections and the experts as e4m3 codes (those of the float16 values times 64, so the
    scales, 1/64 per block or row, give weights of the same magnitude) in that scale layout of ``FP8_CONFIGS``."""
    from fi_engine.checkpoint.fp8_weights import quantize_e4m3
    from fi_engine.checkpoint.safetensors import write_safetensors

    def e4m3(name: str, value: np.ndarray) -> dict[str, object]:  # name -> the tensors FP8 stores for it
        if fp8 is None:
            return {name: value}
        n, k = value.shape
        base = name[: -len("weight")]
        if fp8 == "block":
            scales = {base + "weight_scale_inv": np.full((-(-n // 128), -(-k // 128)), 1 / 64, np.float32)}
        else:
            scales = {base + "weight_scale": np.full((n, 1), 1 / 64, np.float32)}
        return {name: (quantize_e4m3(value.astype(np.float32) * 64), "float8_e4m3fn"), **scales}

    h, i, e, hq, hk, d = 4096, 14336, 8, 32, 8, 128
    cfg = {
        "model_type": "mixtral",
        "vocab_size": vocab,
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": hq,
        "num_key_value_heads": hk,
        "head_dim": d,
        "num_local_experts": e,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "eos_token_id": 2,
    }
    if fp8 is not None:
        cfg["quantization_config"] = FP8_CONFIGS[fp8]
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    write_safetensors(
        folder / "model-embed.safetensors",
        {
            "model.embed_tokens.weight": w(vocab, h),
            "lm_head.weight": w(vocab, h),
            "model.norm.weight": np.ones(h, np.float16),
        },
    )
    expert = {"w1": w(i, h), "w3": w(i, h), "w2": w(h, i)}
    stored = {name: e4m3("weight", value) for name, value in expert.items()}  # quantized once, shared as the 16-bit
    for n in range(layers):
        p = f"model.layers.{n}."
        tensors = {
            **e4m3(p + "self_attn.q_proj.weight", w(hq * d, h)),
            **e4m3(p + "self_attn.k_proj.weight", w(hk * d, h)),
            **e4m3(p + "self_attn.v_proj.weight", w(hk * d, h)),
            **e4m3(p + "self_attn.o_proj.weight", w(h, hq * d)),
            p + "block_sparse_moe.gate.weight": w(e, h),
            p + "input_layernorm.weight": np.ones(h, np.float16),
            p + "post_attention_layernorm.weight": np.ones(h, np.float16),
        }
        for x in range(e):
            q = f"{p}block_sparse_moe.experts.{x}."
            for name, parts in stored.items():
                tensors.update({f"{q}{name}.{part}": value for part, value in parts.items()})
        write_safetensors(folder / f"model-{n:03d}.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", default="")
    ap.add_argument(
        "--gemv-tokens",
        type=int,
        nargs="*",
        default=[8],
        help="MoELayer.gemv_tokens settings to compare (0: every step through the grouped GEMM); default 8",
    )
    ap.add_argument("--modes", default="eager,graph")
    ap.add_argument(
        "--moe-paths",
        default="auto",
        help="LlamaEngine moe_path values to compare (auto, routed, dense; comma-separated); default auto",
    )
    ap.add_argument(
        "--max-batch",
        type=int,
        default=0,
        help="the engine's max_batch (a server's slots) for every batch; 0 (default): max_batch = the batch",
    )
    ap.add_argument("--one-graph", action="store_true", help="one decode graph of max_batch rows (before 2026-11-25)")
    ap.add_argument(
        "--variants",
        default="default",
        help="comma-separated, each row run per variant in turn: default; no-fused-silu (the grouped GEMV step's "
        "SiLU-and-mul as a launch of its own, MoELayer.gemv_fused_silu off, as before 2026-11-25); grouped-warps-8 "
        "(8 warps in every grouped GEMV block, GroupedGemv.min_warps_per_sm 0, as before 2026-11-25); unfolded-router "
        "(the post-attention norm, router GEMV and routing as three launches, MoELayer.fold_norm_into_router off, "
        "as before 2026-11-25); fp8-chunks-N (FP8 experts: Fp8GroupedGemv.chunks_per_warp N, default 4); "
        "fp8-warps-N (Fp8GroupedGemv.warps_per_sm N, default 32)",
    )
    ap.add_argument(
        "--checkpoint", default="", help="keep the random checkpoint in this folder, or reuse the one written there"
    )
    ap.add_argument("--fp8", choices=sorted(FP8_CONFIGS), help="write the checkpoint with e4m3 attention and experts")
    ap.add_argument(
        "--fp8-experts",
        default="stored",
        help="with an FP8 checkpoint, comma-separated: stored (the FP8 grouped GEMV reads the e4m3 experts; default), "
        "dequantized (ModelRunner.fp8_experts_as_stored off: 16-bit experts, as before 2026-11-26)",
    )
    add_hbm_tbs_argument(ap)
    a = ap.parse_args()

    import cupy as cp

    from fi_engine.kernels.fp8_moe_gemv import Fp8GroupedGemv
    from fi_engine.kernels.moe_gemv import GroupedGemv
    from fi_engine.layers.moe import MoELayer
    from fi_engine.models.llama import LlamaEngine
    from fi_engine.runtime.worker.model_runner import ModelRunner

    bandwidth = roofline_denominator(0, hbm_tbs=a.hbm_tbs)  # the copy measured before any engine holds memory
    print(bandwidth.line)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        folder = Path(a.checkpoint or tmp)
        if (folder / "config.json").is_file():
            model = folder  # written by an earlier run (--checkpoint)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            model = make_checkpoint(folder, a.layers, a.vocab, a.fp8)
            print(
                f"random Mixtral-shaped checkpoint ({a.layers} layers) in {time.perf_counter() - t:.0f} s",
                file=sys.stderr,
            )
        shape = shape_from_config(json.loads((model / "config.json").read_text()))  # a reused one: its own layers
        rng = np.random.default_rng(1)
        ModelRunner.decode_graph_ladder = not a.one_graph
        for batch, gemv_tokens, path, graph, variant, experts in [
            (b, g, p, m == "graph", v, x)
            for b in a.batch
            for g in a.gemv_tokens
            for p in a.moe_paths.split(",")
            for m in a.modes.split(",")
            for v in a.variants.split(",")
            for x in a.fp8_experts.split(",")
        ]:
            if experts not in ("stored", "dequantized"):
                raise SystemExit(f"--fp8-experts: expected stored or dequantized, got {experts!r}")
            ModelRunner.fp8_experts_as_stored = experts == "stored"
            known = ("default", "no-fused-silu", "grouped-warps-8", "unfolded-router")
            tuned = variant.startswith(("fp8-chunks-", "fp8-warps-")) and variant.rsplit("-", 1)[1].isdigit()
            if variant not in known and not tuned:
                raise SystemExit(f"--variants: unknown variant {variant!r} ({', '.join(known)}, fp8-chunks-N, "
                                 f"fp8-warps-N)")  # fmt: skip
            Fp8GroupedGemv.chunks_per_warp = int(variant[11:]) if variant.startswith("fp8-chunks-") else 4
            Fp8GroupedGemv.warps_per_sm = int(variant[10:]) if variant.startswith("fp8-warps-") else 32
            MoELayer.fold_norm_into_router = variant != "unfolded-router"
            MoELayer.gemv_tokens = gemv_tokens
            MoELayer.gemv_fused_silu = variant != "no-fused-silu"
            GroupedGemv.min_warps_per_sm = 0 if variant == "grouped-warps-8" else 32
            prompts = [rng.integers(3, a.vocab, size=32).tolist() for _ in range(batch)]
            max_batch = max(batch, a.max_batch)
            with LlamaEngine(model, max_batch=max_batch, cuda_graph=graph, max_seq_len=256, moe_path=path) as engine:
                chosen = engine.moe_path_for(batch)
                engine.generate(prompts, 8, eos_token_ids=())  # warm-up
                r = engine.generate(prompts, a.new_tokens, eos_token_ids=())
                row = {"batch": batch, "max_batch": max_batch, "mode": "graph" if graph else "eager",
                       "tokens_per_s": r.tokens_per_s, "host_us_per_step": r.host_us_per_step,
                       "gemv_tokens": gemv_tokens, "moe_path": f"{path}:{chosen}",
                       "variant": variant if experts == "stored" else f"{variant}+dequantized-experts",
                       "ms_per_step": r.decode_s / max(1, r.decode_steps) * 1e3}  # fmt: skip
                if graph:  # the graph this batch replays (the smallest of the ladder holding it)
                    held = min(b for b in engine.runner.graphs if b >= batch)
                    replayed = engine.runner.step_graphs.planned_graph(held)  # (by the last plan's attention kernel)
                    with cp.cuda.Device(engine.device), engine.stream:
                        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                        replayed.launch()
                        e0.record(engine.stream)
                        for _ in range(20):
                            replayed.launch()
                        e1.record(engine.stream)
                        e1.synchronize()
                        row["gpu_us_per_step"] = cp.cuda.get_elapsed_time(e0, e1) * 1e3 / 20
            # the mean context of the decode steps: the 32-token prompt and half the new tokens
            row["bytes_per_step"] = decode_step_bytes(shape, batch=batch, context=32 + a.new_tokens // 2)
            row["roofline"] = row["bytes_per_step"] / bandwidth.bytes_per_s / (row["ms_per_step"] / 1e3)
            rows.append(row)
            extra = f", GPU {row['gpu_us_per_step']:.0f} us/step" if "gpu_us_per_step" in row else ""
            print(
                f"batch {batch:3d}/{max_batch} {row['mode']:5s} gemv<={gemv_tokens} moe_path {row['moe_path']} "
                f"{row['variant']}: "
                f"{row['tokens_per_s']:8.0f} tokens/s, "
                f"{row['ms_per_step']:.3f} ms/step, host {row['host_us_per_step']:.0f} us/step{extra}; "
                f"{row['bytes_per_step'] / 1e9:.2f} GB/step expected, {100 * row['roofline']:.0f} % of the roofline"
            )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
