"""Host time per layer of an eager decode step: a MoE layer (Mixtral-like: 8 experts, top-2) against a dense
Llama layer of the same attention and hidden size (the goal: the MoE layer at most 2x the dense one).

Two small random float16 checkpoints of each kind (hidden 1024, 8 query / 2 KV heads of 128, intermediate 2048,
vocab 4096) at ``--layers`` depths, so the GPU's work is small and the host never waits for it: for each
batch size the engine's eager decode step is issued as ``ServingLoop`` issues it (the fused step where it applies,
else the forward pass and the LM head) on one prepared step, the host time of the issue measured (median of
``--reps``, the stream synchronized between repetitions and outside the timing), and the per-layer host time is the
slope between the two depths (the embedding, final norm and head cancel). ``--rounds`` (3) repeats every
measurement in turn and reports the medians and each round's ratio: single runs moved by about 20 %. Needs a GPU
and CuPy. Not a test: nothing is asserted.

    bash tools/gpu_run.sh python3 benchmarks/bench_layer_host.py [--batches 1,8,32] [--layers 2,10] [--rounds 3]
        [--unfolded]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

H, INTER, E, K, HQ, HK, D, VOCAB = 1024, 2048, 8, 2, 8, 2, 128, 4096


def write_checkpoint(folder: Path, layers: int, moe: bool) -> Path:
    """A random float16 Llama (``moe``: Mixtral) checkpoint of this benchmark's shapes."""
    from fi_engine.checkpoint.safetensors import write_safetensors

    cfg: dict[str, Any] = {
        "model_type": "mixtral" if moe else "llama",
        "vocab_size": VOCAB,
        "hidden_size": H,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": HQ,
        "num_key_value_heads": HK,
        "head_dim": D,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "eos_token_id": 2,
    }
    if moe:
        cfg.update(num_local_experts=E, num_experts_per_tok=K, sliding_window=None)
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    tensors = {"model.embed_tokens.weight": w(VOCAB, H), "lm_head.weight": w(VOCAB, H), "model.norm.weight": w(H) + 1}
    for n in range(layers):
        p = f"model.layers.{n}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(HQ * D, H),
            p + "self_attn.k_proj.weight": w(HK * D, H),
            p + "self_attn.v_proj.weight": w(HK * D, H),
            p + "self_attn.o_proj.weight": w(H, HQ * D),
            p + "input_layernorm.weight": w(H) + 1,
            p + "post_attention_layernorm.weight": w(H) + 1,
        })  # fmt: skip
        if moe:
            tensors[p + "block_sparse_moe.gate.weight"] = w(E, H)
            for x in range(E):
                q = f"{p}block_sparse_moe.experts.{x}."
                tensors.update({q + "w1.weight": w(INTER, H), q + "w3.weight": w(INTER, H)})
                tensors[q + "w2.weight"] = w(H, INTER)
        else:
            tensors.update({p + "mlp.gate_proj.weight": w(INTER, H), p + "mlp.up_proj.weight": w(INTER, H),
                            p + "mlp.down_proj.weight": w(H, INTER)})  # fmt: skip
    write_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def step_host_us(model: Path, batch: int, reps: int) -> tuple[float, str]:
    """Median host microseconds to issue one eager decode step of ``batch`` rows (prepared once), and the MoE path
    its layers take."""
    import cupy as cp

    from fi_engine.models.llama import LlamaEngine
    from fi_engine.runtime.sched.step_arrays import fill_decode
    from fi_ffi import stream_scope

    with LlamaEngine(model, max_batch=batch, max_seq_len=256) as engine:
        prompts = [[5 + r] * 4 for r in range(batch)]  # all admitted at once (max_prefill_tokens >= 4 * batch)
        engine.generate(prompts, 4, eos_token_ids=())  # warm-up: modules, kernels, packed call sites
        sched = engine.scheduler
        for p in prompts:
            sched.submit(p, 8, eos_token_ids=())  # none may end at its prefill
        admitted = sched.admit()
        with cp.cuda.Device(engine.device), engine.stream, stream_scope(engine.runner.stream_ptr, engine.device):
            engine.passes.prefill(sched, admitted)
            rows = sched.decode_rows(padded=False)
            if len(rows) != batch:
                raise RuntimeError(f"{len(rows)} of {batch} requests admitted")
            engine.runner.upload_decode(
                batch, fill_decode(rows, engine.page_size, engine.runner.decode_arrays), cuda_graph=False
            )
            v = engine.runner.view("decode", batch, batch)
            times = []
            for _ in range(reps + 3):
                engine.stream.synchronize()
                t = time.perf_counter()
                if engine.runner.fuses(batch):
                    engine.runner.fused.step(v, batch)
                else:
                    engine.runner.forward(v, batch, engine.runner.decode_attention)
                    engine.runner.head(batch, engine.runner.normed.data.ptr)
                times.append(time.perf_counter() - t)
            engine.stream.synchronize()
            for r in admitted:
                sched.abort(r)
        path = engine.moe_path_for(batch) if engine.config.moe is not None else "-"
    return statistics.median(times[3:]) * 1e6, path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--layers", default="2,10", help="two depths; the per-layer time is the slope between them")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument(
        "--rounds", type=int, default=3, help="every measurement repeated this many times in turn; medians reported"
    )
    ap.add_argument(
        "--unfolded",
        action="store_true",
        help="also measure the MoE layer with MoELayer.fold_norm_into_router off (its norm, router GEMV and routing "
        "as three launches, as before 2026-11-25), in the same rounds",
    )
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.layers.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    per_layer: dict[tuple[str, int], list[float]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    kinds = ("dense", "moe", "moe-unfolded") if args.unfolded else ("dense", "moe")
    from fi_engine.layers.moe import MoELayer

    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("dense", "moe"):
            for depth in (lo, hi):
                folder = Path(tmp) / f"{kind}{depth}"
                folder.mkdir()
                write_checkpoint(folder, depth, kind == "moe")
        # rounds in turn (dense and MoE measured next to each other in each): a round's ratio compares like with
        # like, and the medians over rounds drop a round that a cold start or a busy host slowed
        for round_ in range(args.rounds):
            for b in batches:
                for kind in kinds:
                    folder = "dense" if kind == "dense" else "moe"
                    MoELayer.fold_norm_into_router = kind != "moe-unfolded"
                    try:
                        (t_lo, path), (t_hi, _) = (
                            step_host_us(Path(tmp) / f"{folder}{d}", b, args.reps) for d in (lo, hi)
                        )
                    finally:
                        MoELayer.fold_norm_into_router = True
                    slope = (t_hi - t_lo) / (hi - lo)
                    per_layer.setdefault((kind, b), []).append(slope)
                    print(f"round {round_}: {kind:12s} batch {b:3d} ({path}): step host {t_lo:7.1f} us at {lo} "
                          f"layers, {t_hi:7.1f} us at {hi}: {slope:6.1f} us per layer", flush=True)  # fmt: skip
                    if kind != "dense":
                        ratios.setdefault((kind, b), []).append(slope / per_layer["dense", b][-1])
    for b in batches:
        dense = statistics.median(per_layer["dense", b])
        for kind in kinds[1:]:
            moe = statistics.median(per_layer[kind, b])
            each = ", ".join(f"{r:.2f}" for r in ratios[kind, b])
            print(f"batch {b:3d}: {kind} layer {moe:.1f} us / dense layer {dense:.1f} us = {moe / dense:.2f}x "
                  f"(median per layer over {args.rounds} rounds; each round's ratio: {each})")  # fmt: skip


if __name__ == "__main__":
    main()
