"""Llama decode with tensor parallelism: tokens/s and host time per step of fi_ffi's engine at TP 1/2/4 on an
8B-shaped random Llama (32 layers, hidden 4096, 32/8 heads of 128, MLP 14336, vocab 128256, bfloat16), batch 1
and 32, eager and CUDA graph, with the fused all-reduce + residual + RMSNorm kernel and with NCCL + a separate
``fused_add_rmsnorm`` (``nccl`` rows), and with the embedding and LM head whole on every rank instead of split
over the ranks by vocabulary rows (``whole-vocab`` rows). Not a test: nothing is asserted.

    python3 benchmarks/bench_llama_tp.py --make /tmp/llama8b            # write the random checkpoint once (~16 GB)
    python3 benchmarks/bench_llama_tp.py --model /tmp/llama8b --tp 1,2,4 [--json PATH]
    python3 benchmarks/bench_llama_tp.py --model /tmp/llama8b --tp 1,2 --batches 32 --modes graph \
        --variants fused,whole-vocab

The driver runs each size in fresh processes (``fi-ffi launch --nproc N`` for N > 1) and prints one table.
``--layers`` shrinks the model (same shapes per layer) when disk or time is short. ``--make-mixtral DIR`` writes
benchmarks/bench_mixtral.py's random Mixtral-shaped checkpoint (8 experts of 4096 x 14336, top-2, ``--layers`` of
them) instead, for the MoE engine's tokens/s at TP 1/2/4 (its experts split by intermediate columns).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})

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


def make(folder: Path, layers: int) -> None:
    """A random bfloat16 checkpoint: every weight cut from one random block (fast to write; values do not matter
    for timing)."""
    from fi_ffi.models.checkpoint import write_safetensors

    cfg = {"model_type": "llama", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "eos_token_id": 2}
    cfg.update(SHAPE_8B, num_hidden_layers=layers)
    block = (np.random.default_rng(0).standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(np.float32)
    bits = (block.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bits

    def w(*shape: int) -> tuple[np.ndarray, str]:
        n = int(np.prod(shape))
        return np.resize(bits, n).reshape(shape), "bfloat16"

    one = (np.full(cfg["hidden_size"], 1.0, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    hq, hk, v = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "model.embed_tokens.weight": w(v, h),
        "lm_head.weight": w(v, h),
        "model.norm.weight": (one, "bfloat16"),
    }
    for n in range(layers):
        p = f"model.layers.{n}."
        tensors.update(
            {
                p + "self_attn.q_proj.weight": w(hq * d, h),
                p + "self_attn.k_proj.weight": w(hk * d, h),
                p + "self_attn.v_proj.weight": w(hk * d, h),
                p + "self_attn.o_proj.weight": w(h, hq * d),
                p + "mlp.gate_proj.weight": w(i, h),
                p + "mlp.up_proj.weight": w(i, h),
                p + "mlp.down_proj.weight": w(h, i),
                p + "input_layernorm.weight": (one, "bfloat16"),
                p + "post_attention_layernorm.weight": (one, "bfloat16"),
            }
        )
    write_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(cfg))


def run_rank(model: str, out: str, variant: str, new_tokens: int, batches: list[int], modes: list[str]) -> None:
    """One rank (or the single GPU): every configuration, rank 0 writes the rows."""
    from fi_ffi.models.llama import LlamaEngine

    tp = int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ else 1
    nccl = variant == "nccl"
    rows = []
    rng = np.random.default_rng(0)
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    for batch in batches:
        prompts = [rng.integers(3, vocab, 32).tolist() for _ in range(batch)]
        for graph in [m == "graph" for m in modes]:
            with LlamaEngine(
                model,
                max_batch=batch,
                max_seq_len=256,
                cuda_graph=graph,
                tensor_parallel=tp,
                fused_allreduce=not nccl,
                vocab_parallel=variant != "whole-vocab",
            ) as engine:
                engine.generate(prompts, 4, eos_token_ids=())  # warm-up
                result = engine.generate(prompts, new_tokens, eos_token_ids=())
                rank = engine.rank
            rows.append(
                {
                    "tp": tp,
                    "all-reduce": "nccl" if nccl or tp == 1 else "fused",
                    "vocab": "whole" if tp == 1 or variant == "whole-vocab" else "split",
                    "batch": batch,
                    "mode": "graph" if graph else "eager",
                    "tokens_per_s": result.tokens_per_s,
                    "host_us_per_step": result.host_us_per_step,
                    "step_ms": result.decode_s / max(1, result.decode_steps) * 1e3,
                }
            )
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", type=Path, help="write a random 8B-shaped checkpoint here and exit")
    ap.add_argument("--make-mixtral", type=Path, help="write a random Mixtral-shaped checkpoint here and exit")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--tp", default="1,2,4", help="tensor-parallel sizes (comma-separated)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json")
    ap.add_argument("--rank-out", help=argparse.SUPPRESS)  # internal: a rank's output file
    ap.add_argument("--variant", default="fused", help=argparse.SUPPRESS)  # internal: one variant per process
    ap.add_argument("--batches", default="1,32", help="batch sizes (comma-separated)")
    ap.add_argument("--modes", default="eager,graph", help="eager and/or graph")
    ap.add_argument(
        "--variants",
        default="fused,nccl,whole-vocab",
        help="TP > 1 rows: fused (fused all-reduce, vocabulary split), nccl (NCCL + fused_add_rmsnorm), "
        "whole-vocab (fused all-reduce, embedding and LM head whole on every rank)",
    )
    args = ap.parse_args()
    if args.make:
        make(args.make, args.layers)
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
        run_rank(str(args.model), args.rank_out, args.variant, args.new_tokens, batches, modes)
        return
    table = []
    for tp in [int(t) for t in args.tp.split(",")]:
        for variant in ["fused"] if tp == 1 else args.variants.split(","):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                cmd = [sys.executable, __file__, "--model", str(args.model), "--rank-out", out.name]
                cmd += ["--new-tokens", str(args.new_tokens), "--variant", variant]
                cmd += ["--batches", args.batches, "--modes", args.modes]
                if tp > 1:
                    cmd = [sys.executable, "-m", "fi_ffi", "launch", "--nproc", str(tp), "--", *cmd]
                done = subprocess.run(cmd)
                if done.returncode:
                    print(f"tp {tp} {variant}: failed ({done.returncode})", file=sys.stderr)
                    continue
                table += json.loads(Path(out.name).read_text())
    print(f"{'tp':>3} {'all-reduce':>10} {'vocab':>6} {'batch':>5} {'mode':>6} {'tokens/s':>10} {'ms/step':>8} "
          f"{'host us/step':>13}")  # fmt: skip
    for r in table:
        print(
            f"{r['tp']:>3} {r['all-reduce']:>10} {r['vocab']:>6} {r['batch']:>5} {r['mode']:>6} "
            f"{r['tokens_per_s']:>10.1f} {r['step_ms']:>8.2f} {r['host_us_per_step']:>13.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
