"""Decode throughput of the DeepSeek engine on a random DeepSeek-V3-shaped checkpoint (hidden 7168; MLA with 128 heads,
q_lora_rank 1536, kv_lora_rank 512, nope / rope / v 128 / 64 / 128; routed experts of intermediate 2048, top-8 in 8
groups of which 4 are kept, V3's sigmoid routing with a correction bias, one shared expert), bfloat16, ``--layers``
MoE layers (2 by default; no dense layers) of ``--experts`` routed experts (64 by default, V3 has 256: 2.8 GB of e4m3
experts a layer), CUDA graph (``--eager``: eager decode, which routes on the host), at ``--batches`` (1, 4, 8): decode
tokens/s, host us/step and ms/step. Each row also gives the bytes a step is expected to read (benchmarks/roofline.py's
model: MLA, the shared expert and the distinct routed experts a step's rows choose under uniform routing) and that
over the step time as a percent of the device's memory bandwidth (by default its peak from the memory clock x bus
width, printed first with a measured copy beside it; ``--hbm-tbs`` sets another figure).

``--fp8`` writes every projection in FP8 as DeepSeek-V3 publishes it (e4m3 codes with 128x128 ``weight_scale_inv``
block scales, ``quantization_config`` ``fp8``; the router, norms, embedding and LM head bfloat16) and times two
contenders per batch, interleaved: the routed experts kept as stored (the FP8 grouped GEMV) and dequantized to bfloat16
at load (``ModelRunner.fp8_experts_as_stored = False``); MLA and the shared expert are dequantized at load in both.
Each row's roofline is from the bytes that contender reads. The dequantizing load converts every expert on the host
(about 7 seconds per billion weights: 20 s a layer at 64 experts).

``--tp 1,2`` times tensor parallelism instead: each size in fresh processes (``fi-ffi launch --nproc N`` for N > 1,
the comm wheel too), at N > 1 once per ``--splits`` (``columns``: every routed expert's intermediate columns split
across the ranks; ``experts``: each rank whole experts, ``DeepSeekEngine(expert_split=...)``), one table of decode
tokens/s, ms/step and host us/step (no roofline: a rank's bytes depend on the split and the routing). The experts are
kept as stored with ``--fp8``.

Needs a GPU, CuPy, cuBLAS and the ext and model-family kernel wheels (MLA, ``gemm_sm90``, DeepSeek's routing).
``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from roofline import (
    add_hbm_tbs_argument,
    decode_step_bytes,
    report_decode_row,
    roofline_denominator,
    shape_from_config,
)

HIDDEN, HEADS, Q_RANK, KV_RANK, NOPE, ROPE, V_DIM, MOE_INTER = 7168, 128, 1536, 512, 128, 64, 128, 2048


def make_checkpoint(folder: Path, layers: int, experts: int, vocab: int, fp8: bool = False) -> Path:
    """A random DeepSeek-V3-shaped checkpoint (config.json + one .safetensors per layer; module docstring),
    written with numpy; with ``fp8`` every projection as e4m3 codes (magnitudes up to 1) with 128x128 block scales of
    2**-5, as DeepSeek-V3 publishes them."""
    from fi_engine.checkpoint.safetensors import write_safetensors

    h = HIDDEN
    cfg: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": vocab,
        "hidden_size": h, "intermediate_size": 18432, "moe_intermediate_size": MOE_INTER, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "n_shared_experts": 1, "n_routed_experts": experts,
        "routed_scaling_factor": 2.5, "kv_lora_rank": KV_RANK, "q_lora_rank": Q_RANK, "qk_rope_head_dim": ROPE,
        "v_head_dim": V_DIM, "qk_nope_head_dim": NOPE, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "first_k_dense_replace": 0, "moe_layer_freq": 1, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-06,
        "rope_theta": 10000, "rope_scaling": None, "tie_word_embeddings": False, "attention_bias": False,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
    }  # fmt: skip
    if fp8:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}  # fmt: skip
    rng = np.random.default_rng(0)
    block = ((rng.standard_normal(1 << 20, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
    # e4m3 codes of magnitude at most 1.0 (exponent field up to 7: never the NaN code), either sign
    codes = rng.integers(0, 0x39, 1 << 20, dtype=np.uint8) | (rng.integers(0, 2, 1 << 20, dtype=np.uint8) << 7)

    def w(*shape: int) -> tuple[np.ndarray, str]:  # bfloat16 bits, a random block tiled (fast for GBs)
        return np.resize(block, int(np.prod(shape))).reshape(shape), "bfloat16"

    def ones(n: int) -> tuple[np.ndarray, str]:
        return np.full(n, 0x3F80, np.uint16), "bfloat16"

    def linear(name: str, n: int, k: int) -> dict[str, tuple[np.ndarray, str]]:
        """Projection ``name`` ``[n, k]``: bfloat16, or e4m3 codes with their block scales."""
        if not fp8:
            return {name + ".weight": w(n, k)}
        scales = np.full((-(-n // 128), -(-k // 128)), 2.0**-5, np.float32)
        return {name + ".weight": (np.resize(codes, n * k).reshape(n, k), "float8_e4m3fn"),
                name + ".weight_scale_inv": (scales, "float32")}  # fmt: skip

    write_safetensors(
        folder / "model-embed.safetensors",
        {"model.embed_tokens.weight": w(vocab, h), "lm_head.weight": w(vocab, h), "model.norm.weight": ones(h)},
    )
    for n in range(layers):
        p, a, m = f"model.layers.{n}.", f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
        tensors = {
            **linear(a + "q_a_proj", Q_RANK, h), a + "q_a_layernorm.weight": ones(Q_RANK),
            **linear(a + "q_b_proj", HEADS * (NOPE + ROPE), Q_RANK),
            **linear(a + "kv_a_proj_with_mqa", KV_RANK + ROPE, h), a + "kv_a_layernorm.weight": ones(KV_RANK),
            **linear(a + "kv_b_proj", HEADS * (NOPE + V_DIM), KV_RANK), **linear(a + "o_proj", h, HEADS * V_DIM),
            p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
            m + "gate.weight": w(experts, h),
            m + "gate.e_score_correction_bias": (rng.normal(0.0, 0.01, experts).astype(np.float32), "float32"),
        }  # fmt: skip
        for x in [f"experts.{e}." for e in range(experts)] + ["shared_experts."]:
            tensors.update(linear(m + x + "gate_proj", MOE_INTER, h))
            tensors.update(linear(m + x + "up_proj", MOE_INTER, h))
            tensors.update(linear(m + x + "down_proj", h, MOE_INTER))
        write_safetensors(folder / f"model-{n:02d}.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def run(
    path: Path, batch: int, new_tokens: int, graph: bool, stored: bool, tp: int = 1, split: str = "columns"
) -> dict[str, Any]:
    """One timed ``generate`` of ``batch`` 32-token prompts after a warm-up, the routed experts kept as stored or
    dequantized at load (``ModelRunner.fp8_experts_as_stored``, given back as it was found), on ``tp`` ranks (this
    process one of them under ``fi-ffi launch``) with the routed experts split by ``split``."""
    from fi_engine.models.deepseek import DeepSeekEngine
    from fi_engine.runtime.worker.model_runner import ModelRunner

    rng = np.random.default_rng(batch)
    prompts = [rng.integers(3, 1000, size=32).tolist() for _ in range(batch)]
    was, ModelRunner.fp8_experts_as_stored = ModelRunner.fp8_experts_as_stored, stored
    try:  # (read at load: the engine below takes this contender's setting, the class gets its own back)
        with DeepSeekEngine(
            path, max_batch=batch, max_seq_len=256, cuda_graph=graph, tensor_parallel=tp, expert_split=split
        ) as engine:
            held, rank = engine.family.experts_stored, engine.rank
            engine.generate(prompts, 4, eos_token_ids=())  # warm-up
            r = engine.generate(prompts, new_tokens, eos_token_ids=())
    finally:
        ModelRunner.fp8_experts_as_stored = was
    ms = r.decode_s / max(1, r.decode_steps) * 1e3
    return {"batch": batch, "experts_stored": held, "tokens_per_s": r.tokens_per_s,
            "host_us_per_step": r.host_us_per_step, "ms_per_step": ms, "tp": tp, "split": split,
            "rank": rank}  # fmt: skip


def run_tp(args: argparse.Namespace, path: Path) -> list[dict[str, Any]]:
    """``--tp``: every size and split in fresh processes (a rank each under ``fi-ffi launch``); their rows."""
    rows: list[dict[str, Any]] = []
    for tp in (int(t) for t in args.tp.split(",")):
        for split in ["columns"] if tp == 1 else args.splits.split(","):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                cmd = [sys.executable, __file__, "--model", str(path), "--rank-out", out.name, "--split", split]
                cmd += ["--batches", args.batches, "--new-tokens", str(args.new_tokens)]
                cmd += ["--eager"] if args.eager else []
                if tp > 1:
                    cmd = [sys.executable, "-m", "fi_ffi", "launch", "--nproc", str(tp), "--", *cmd]
                if subprocess.run(cmd).returncode:
                    print(f"tp {tp} split by {split}: failed", file=sys.stderr)
                    continue
                rows += json.loads(Path(out.name).read_text())
    print(f"{'tp':>3} {'experts split by':>16} {'batch':>6} {'tokens/s':>10} {'ms/step':>8} {'host us/step':>13}")
    for r in rows:
        print(f"{r['tp']:>3} {r['split'] if r['tp'] > 1 else '-':>16} {r['batch']:>6} {r['tokens_per_s']:>10.1f} "
              f"{r['ms_per_step']:>8.3f} {r['host_us_per_step']:>13.1f}")  # fmt: skip
    return rows


def run_rank(args: argparse.Namespace) -> None:
    """One rank of a ``--tp`` size (or the one GPU): every batch; rank 0 writes the rows to ``--rank-out``."""
    import os

    tp = int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ else 1
    rows = [
        {"engine": "bfloat16" if not args.fp8 else "fp8 experts as stored", "layers": args.layers,
         **run(Path(args.model), batch, args.new_tokens, not args.eager, True, tp, args.split)}
        for batch in (int(b) for b in args.batches.split(","))
    ]  # fmt: skip
    if rows[0]["rank"] == 0:
        Path(args.rank_out).write_text(json.dumps(rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=64, help="routed experts a layer (a multiple of 8 from 16; V3: 256)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes (default 1,4,8)")
    ap.add_argument("--eager", action="store_true", help="eager decode (host routing) instead of the CUDA graph")
    ap.add_argument("--fp8", action="store_true", help="FP8 projections: time the experts as stored and dequantized")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--tp", default="1", help="tensor-parallel sizes, e.g. 1,2 (module docstring); 1: the table above")
    ap.add_argument(
        "--splits", default="columns,experts", help="how TP > 1 splits the routed experts (columns,experts)"
    )
    ap.add_argument("--model", help="a checkpoint written before (by default a fresh one in a temporary folder)")
    ap.add_argument("--rank-out", help=argparse.SUPPRESS)  # one rank's rows (the --tp driver's children)
    ap.add_argument("--split", default="columns", help=argparse.SUPPRESS)
    add_hbm_tbs_argument(ap)
    args = ap.parse_args(argv)
    if args.experts < 16 or args.experts % 8:  # 8 groups of at least 2 (noaux_tc), top-8 from the best 4 groups
        ap.error(f"--experts: expected a multiple of 8 from 16 (8 groups, top-8 of 4 groups), got {args.experts}")
    if args.rank_out:
        run_rank(args)
        return 0
    if args.tp != "1":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(args.model) if args.model else make_checkpoint(Path(tmp), args.layers, args.experts, args.vocab,
                                                                       args.fp8)  # fmt: skip
            rows = run_tp(args, path)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    # (name, experts kept as stored): the 16-bit checkpoint has one contender
    contenders = [("fp8 experts as stored", True), ("fp8 experts dequantized", False)] if args.fp8 else [
        ("bfloat16", True)]  # fmt: skip
    bandwidth = roofline_denominator(0, hbm_tbs=args.hbm_tbs)  # the copy measured before any engine holds memory
    print(bandwidth.line)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), args.layers, args.experts, args.vocab, args.fp8)
        cfg = json.loads((path / "config.json").read_text())
        shapes = {True: shape_from_config(cfg), False: shape_from_config(cfg, dequantized=True)}
        for batch in (int(b) for b in args.batches.split(",")):
            for name, stored in contenders:  # interleaved: one run of each per batch
                # the mean context of the decode steps: the 32-token prompt and half the new tokens
                step_bytes = decode_step_bytes(shapes[stored], batch=batch, context=32 + args.new_tokens // 2)
                row = {"engine": name, "layers": args.layers, "experts": args.experts,
                       **run(path, batch, args.new_tokens, not args.eager, stored)}  # fmt: skip
                if args.fp8 and row["experts_stored"] != stored:
                    print(f"{name}: the engine did not hold the experts so; the row is left out", file=sys.stderr)
                    continue
                report_decode_row(rows, name, row, step_bytes, bandwidth.bytes_per_s, 28)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
