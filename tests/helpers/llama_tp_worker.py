"""One rank of the tensor-parallel tests (tests/engine/test_gpu_llama_tp.py, engine/test_gpu_moe_tp.py,
engine/test_gpu_family_tp.py), or the single-GPU reference. The engine class is the checkpoint's
(fi_engine.models.registry: Llama, Gemma 2, gpt-oss).

``python tests/helpers/llama_tp_worker.py MODEL_DIR OUT.npz [--graph] [--nccl] [--whole-vocab] [--topk1]
[--expert-split] [--loop DIR]``:
under ``fi-ffi launch`` (``RANK`` set) the engine runs with ``tensor_parallel = WORLD_SIZE``, otherwise on one GPU.
Greedy generation of fixed prompts; rank 0 (or the single process) saves the tokens and the prefill logits of the
first two prompts. ``--whole-vocab``: every rank keeps the whole embedding and LM head (``vocab_parallel=False``);
``--topk1``: also a sampled generation with ``top_k=1`` (the gathered-logits path; must equal greedy);
``--expert-split``: DeepSeek's routed experts split by expert (``expert_split="experts"``);
``--loop DIR``: after the first generation write ``DIR/ready-RANK`` (its pid) and generate forever (the rank-death
test kills one rank there). ``--tp-fused-compare``: instead, greedy generation of the first 1 and the first 3 prompts
with ``ModelRunner.tp_fused_epilogues`` on, then (a second engine) off; rank 0 saves ``tokens_b{1,3}_{on,off}`` and
what refused the epilogue step at each batch's decode rows (``refusal_b{1,3}_{on,off}``; "" where it ran).
``--pipeline-compare``: instead, greedy generation with the CUDA graph (3 request slots) with the pipelined decode at
tensor parallelism off (the default), then (a second engine) on (``ServingLoop.tp_pipelined_decode`` with
``ModelRunner.tp_prepare_ahead``): the first prompt alone, then the first 4 prompts (the 4th admitted once a slot
frees), each run ending its first prompt with an end-of-sequence token mid-run (a token the off engine's runs
without one gave that prompt alone); rank 0 saves ``tokens_b{1,3}_{on,off}``, ``reasons_b{1,3}_{on,off}`` and the
decode steps launched ahead of the one in flight (``ahead_b{1,3}_{on,off}``).
"""

from __future__ import annotations

import os
import sys

os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})

from pathlib import Path
from typing import Any

import numpy as np

from fi_engine.models.llama import SamplingParams
from fi_engine.models.registry import engine_class

PROMPT_LENS = (3, 16, 29, 50)
MAX_NEW = 24


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(3, vocab, n).tolist() for n in PROMPT_LENS]


def compare_tp_fused(model: str, out: str, tp: int) -> None:
    """``--tp-fused-compare`` (see the module docstring)."""
    from fi_engine.runtime.worker.model_runner import ModelRunner

    saved: dict[str, np.ndarray] = {}
    rank = 0
    for on in (True, False):
        ModelRunner.tp_fused_epilogues = on  # read at each step, and by each decode graph's capture
        graph = "--graph" in sys.argv
        with engine_class(model)(model, max_batch=4, max_seq_len=128, cuda_graph=graph, tensor_parallel=tp) as engine:
            rank = engine.rank
            ps = prompts(engine.config.vocab_size)
            for batch in (1, 3):
                tokens = engine.generate(ps[:batch], MAX_NEW, eos_token_ids=()).tokens
                rows = min(b for b in engine.runner.decode_graph_batches if b >= batch) if graph else batch
                key = f"b{batch}_{'on' if on else 'off'}"
                saved[f"tokens_{key}"] = np.array(tokens, dtype=np.int64)
                saved[f"refusal_{key}"] = np.array(engine.runner.tp_fused.refusal(rows) or "")
    if rank == 0:
        np.savez(out, tp=np.array(tp), **saved)


def first_own_token(tokens: list[list[int]]) -> int:
    """A token of ``tokens[0]`` that no other row takes and that the first row first takes mid-run (at index 2 or
    later, before its last; the first such from index 4 where there is one): as an end-of-sequence id, it ends the
    first row mid-run and no other."""
    others = {t for row in tokens[1:] for t in row}
    row = tokens[0]
    firsts = {t: row.index(t) for t in row if t not in others}
    mid = sorted((j, t) for t, j in firsts.items() if 2 <= j < len(row) - 1)
    if not mid:
        raise AssertionError(f"no token of the first row ends it alone mid-run: {tokens}")
    late = [(j, t) for j, t in mid if j >= 4]
    return (late or mid[::-1])[0][1]


def compare_pipeline(model: str, out: str, tp: int) -> None:
    """``--pipeline-compare`` (see the module docstring)."""
    from fi_engine.runtime.serving import ServingLoop
    from fi_engine.runtime.worker.model_runner import ModelRunner

    saved: dict[str, np.ndarray] = {}
    rank = 0
    eos: dict[int, int] = {}
    defaults = ServingLoop.tp_pipelined_decode, ModelRunner.tp_prepare_ahead
    for on in (False, True):
        ServingLoop.tp_pipelined_decode = ModelRunner.tp_prepare_ahead = on  # read when the engine opens / steps
        with engine_class(model)(model, max_batch=3, max_seq_len=128, cuda_graph=True, tensor_parallel=tp) as engine:
            rank = engine.rank
            assert engine.runner.prepare_ahead == on, (on, engine.runner.prepare_ahead)
            ps = prompts(engine.config.vocab_size)
            ahead = [0]
            launch = engine.passes.decode_launch

            def counted(sched: object, depth: int = 1, launch: Any = launch, ahead: list[int] = ahead) -> Any:
                ahead[0] += depth == 2  # a step launched before the tokens of the one in flight were read
                return launch(sched, depth)

            engine.passes.decode_launch = counted
            for batch, group in ((1, ps[:1]), (3, ps[:4])):
                if not on:  # the end-of-sequence id: a token the first prompt alone takes, without one
                    eos[batch] = first_own_token(engine.generate(group[:batch], MAX_NEW, eos_token_ids=()).tokens)
                ahead[0] = 0
                result = engine.generate(group, MAX_NEW, eos_token_ids=(eos[batch],))
                key = f"b{batch}_{'on' if on else 'off'}"
                saved[f"tokens_{key}"] = np.array([t + [-1] * (MAX_NEW - len(t)) for t in result.tokens], np.int64)
                saved[f"reasons_{key}"] = np.array(result.finish_reasons)
                saved[f"ahead_{key}"] = np.array(ahead[0])
    ServingLoop.tp_pipelined_decode, ModelRunner.tp_prepare_ahead = defaults
    if rank == 0:
        np.savez(out, tp=np.array(tp), **saved)


def main() -> None:
    model, out = sys.argv[1], sys.argv[2]
    if "--w8a16" in sys.argv:  # FP8 weights with 16-bit activations at every row count (the weights exact)
        from fi_engine.kernels.quantized_weights import QuantizedWeights

        QuantizedWeights.fp8_w8a8 = QuantizedWeights.fp8_w8a8_blocks = False
    tp = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    if "--tp-fused-compare" in sys.argv:
        compare_tp_fused(model, out, tp)
        return
    if "--pipeline-compare" in sys.argv:
        compare_pipeline(model, out, tp)
        return
    family_args = {"expert_split": "experts"} if "--expert-split" in sys.argv else {}
    with engine_class(model)(
        model,
        max_batch=4,
        max_seq_len=128,
        cuda_graph="--graph" in sys.argv,
        tensor_parallel=tp,
        fused_allreduce="--nccl" not in sys.argv,
        vocab_parallel="--whole-vocab" not in sys.argv,
        **family_args,
    ) as engine:
        ps = prompts(engine.config.vocab_size)
        result = engine.generate(ps, MAX_NEW, eos_token_ids=())
        if "--loop" in sys.argv:
            folder = Path(sys.argv[sys.argv.index("--loop") + 1])
            (folder / f"ready-{engine.rank}").write_text(str(os.getpid()))
            while True:
                engine.generate(ps, MAX_NEW, eos_token_ids=())
        sampled = result.tokens
        if "--topk1" in sys.argv:
            sampled = engine.generate(
                ps, MAX_NEW, eos_token_ids=(), sampling=SamplingParams(temperature=1.0, top_k=1, seed=7)
            ).tokens
        logits = engine.prefill_logits(ps[:2])
        fused = engine.runner.allreduce is not None and engine.runner.allreduce.fused
        if engine.rank == 0:
            np.savez(
                out,
                tokens=np.array(result.tokens, dtype=np.int64),
                tokens_topk1=np.array(sampled, dtype=np.int64),
                logits0=logits[0],
                logits1=logits[1],
                fused=np.array(fused),
                tp=np.array(tp),
                # the ranks DeepSeek's routed experts are divided among whole (1: not split by expert)
                expert_parts=np.array(getattr(engine.config, "expert_parts", 1)),
                vocab_shard=np.array(engine.runner.vocab_shard is not None),
                int4_weights=np.array(
                    len(engine.runner.dense.quantized.int4_weights)
                ),  # int4 projections read as stored
                # e4m3 projections registered with the GEMMs, and MoE layers holding e4m3 experts as stored
                fp8_weights=np.array(len(fp8.weights) if (fp8 := engine.runner.dense.quantized.fp8) is not None else 0),
                fp8_experts=np.array(
                    sum(getattr(x, "fp8_experts", None) is not None for x in engine.runner.moe_layers)
                ),
            )
            print(f"rank 0: tp {tp}, fused all-reduce {fused}, {result.tokens_per_s:.1f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
