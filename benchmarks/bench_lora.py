"""LoRA adapters chosen per request: decode tokens/s of a batch whose rows take adapters against the base model
alone, and the time to copy an adapter into a GPU slot. Not a test: nothing is asserted.

    python3 benchmarks/bench_llama_tp.py --make /tmp/llama8b                 # the 8B-shaped random base (once)
    python3 benchmarks/bench_lora.py --model /tmp/llama8b --make-adapters /tmp/llama8b-loras   # 4 adapters, rank 16
    python3 benchmarks/bench_lora.py --model /tmp/llama8b --adapters /tmp/llama8b-loras [--json PATH]

Rows (CUDA graphs, prompts of ``--prompt`` tokens, ``--new-tokens`` tokens each, no end-of-sequence):

- ``base``: the base model's engine, opened without adapters (its fused one-row decode step included);
- ``lora, no adapter rows``: the engine opened with adapters, every row of the base model (such a step runs the base
  engine's path, its decode graphs captured without the adapters' launches: what serving adapters costs a step that
  takes none);
- ``lora, N adapters``: the rows spread round-robin over ``N`` adapters (batch 32: 4; batch 1: one).

``--lora-fused`` picks the forms of a decode step of 1 to 4 rows where a row takes an adapter, comma-separated
(``ModelRunner.lora_fused`` and ``lora_shrink_in_grid``, both on in the engine by default): ``on`` (the fused step's
LoRA form, each shrink in its GEMV's grid and the expand in the GEMV's epilogue), ``launch`` (the same with each
shrink a launch of its own before the GEMV), ``off`` (the separate launches, the adapters' shrink and expand after
each projection's GEMM); ``both`` is ``on,off`` (this benchmark's default). The engine opens once per form; the
forms after the first give their rows, labelled so, only at batches of at most 4, where the switch applies:

    python3 benchmarks/bench_lora.py --model /tmp/llama8b --adapters /tmp/llama8b-loras --batches 1 \
        --lora-fused on,launch,off

The ratio column is each row's tokens/s over ``base``'s at the same batch. ``--prefill N`` adds the time to
prefill one prompt of ``N`` tokens (and sample its first token) in each engine, with and without an adapter: what
the adapters' launches cost a prefill's thousands of rows; with an adapter, once per form of
``--lora-prefill-form`` (comma-separated; default ``cuda-cores,segment``): ``cuda-cores`` (the CUDA-core kernels in
the engine's prefill graph, its form off SM 9.x), ``cuda-cores-eager`` (the same without the graph) and ``segment``
(FlashInfer's segment GEMMs on tensor cores, ``DeviceSlots.prefill_segment_gemm``, the engine's default on SM 9.x,
run eagerly):

    python3 benchmarks/bench_lora.py --model /tmp/llama8b --adapters /tmp/llama8b-loras --batches 1 --lora-fused off \
        --prefill 4096 --lora-prefill-form cuda-cores,cuda-cores-eager,segment

``--prefill-vary K`` makes each timed prompt ``K`` tokens shorter than the one before (the warm-up's ``N``): every
pass has new rows, as serving's prompts of varied lengths, so the segment form prepares its GEMMs in each (the
prefills with the same prompt find them prepared).

Swap-in: an adapter copied into a GPU
slot from the host's packed copy (``max_cpu_loras`` keeps it), and read from its folder first (host cache of one),
each timed to the end of its copies on the stream.

The adapters: ``--make-adapters DIR`` writes ``--count`` random adapters of ``--rank`` over every projection
(q, k, v, o, gate, up, down) of the model in ``--model`` (bfloat16, PEFT's layout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fi_engine.checkpoint.config import LlamaConfig
from fi_engine.checkpoint.safetensors import write_safetensors
from fi_engine.lora.adapter import BaseShapes


def make_adapters(model: Path, out: Path, count: int, rank: int) -> list[Path]:
    """``count`` random adapters of ``rank`` over every projection of ``model``'s layers, in PEFT's layout (random
    A and B of standard deviation 0.02, bfloat16 bits), as ``out/lora{i}``."""
    base = BaseShapes.of(LlamaConfig.from_dir(model), "bfloat16")
    rng = np.random.default_rng(0)
    folders = []
    for i in range(count):
        folder = out / f"lora{i}"
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Any] = {}
        for layer in range(base.num_layers):
            for module, (n, k) in base.shapes.items():
                block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                name = f"base_model.model.model.layers.{layer}.{block}.{module}"
                for half, shape in (("A", (rank, k)), ("B", (n, rank))):
                    values = (rng.standard_normal(shape) * 0.02).astype(np.float32).view(np.uint32)
                    tensors[f"{name}.lora_{half}.weight"] = ((values >> 16).astype(np.uint16), "bfloat16")
        write_safetensors(folder / "adapter_model.safetensors", tensors)
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(base.shapes),
                  "bias": "none"}  # fmt: skip
        (folder / "adapter_config.json").write_text(json.dumps(config))
        folders.append(folder)
        print(f"wrote {folder}")
    return folders


def tokens_per_s(engine: Any, batch: int, prompt: int, new: int, loras: list[str | None]) -> float:
    """Decode tokens/s of one generate call of ``batch`` random prompts (after one warm-up call)."""
    rng = np.random.default_rng(1)
    prompts = rng.integers(3, 1000, size=(batch, prompt)).tolist()
    engine.generate(prompts, 4, eos_token_ids=(), lora=loras)  # warm-up: the prefill graph, the swap-ins
    best = 0.0
    for _ in range(2):
        r = engine.generate(prompts, new, eos_token_ids=(), lora=loras)
        best = max(best, r.tokens_per_s)
    return best


def prefill_ms(engine: Any, tokens: int, lora: str | None, vary: int = 0) -> float:
    """Milliseconds to prefill one random prompt of ``tokens`` tokens and sample its first token (best of 3, after
    one warm-up call); with ``vary``, each timed prompt ``vary`` tokens shorter than the one before (new rows each
    pass, as serving's prompts of varied lengths: the segment form prepares its GEMMs in every timed pass)."""
    rng = np.random.default_rng(2)
    engine.generate([rng.integers(3, 1000, size=tokens).tolist()], 1, eos_token_ids=(), lora=[lora])
    best = float("inf")
    for i in range(3):
        prompt = rng.integers(3, 1000, size=tokens - vary * (i + 1) if vary else tokens).tolist()
        start = time.perf_counter()
        engine.generate([prompt], 1, eos_token_ids=(), lora=[lora])
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


PREFILL_FORMS = ("cuda-cores", "cuda-cores-eager", "segment")
# a decode step's forms (--lora-fused): (ModelRunner.lora_fused, ModelRunner.lora_shrink_in_grid)
DECODE_FORMS = {"on": (True, True), "launch": (True, False), "off": (False, True)}
"""The forms of a prefill's LoRA products ``--lora-prefill-form`` picks from: the CUDA-core kernels in the engine's
prefill graph, the same eagerly (what the segment form is measured against: it runs eagerly), and FlashInfer's
segment GEMMs (``DeviceSlots.prefill_segment_gemm``; SM 9.x)."""


@contextlib.contextmanager
def prefill_form(engine: Any, form: str) -> Iterator[None]:
    """Prefills of ``engine`` take the LoRA form ``form`` (:data:`PREFILL_FORMS`) inside the block; the engine's
    settings restored after it."""
    from fi_engine.lora.device import DeviceSlots

    runner, default = engine.runner, DeviceSlots.prefill_segment_gemm
    graphs = runner.prefill_graphs
    DeviceSlots.prefill_segment_gemm = form == "segment"
    runner.prefill_graphs = form == "cuda-cores"
    try:
        yield
    finally:
        DeviceSlots.prefill_segment_gemm, runner.prefill_graphs = default, graphs


def swap_in_ms(engine: Any, names: list[str]) -> float:
    """Mean milliseconds to copy each adapter of ``names`` into a GPU slot (each evicting the last: one slot), to the
    end of its copies on the stream."""
    manager, stream = engine.lora, engine.runner.stream
    times = []
    for name in names * 2:
        start = time.perf_counter()
        slot = manager.acquire(manager.key(name))
        stream.synchronize()
        times.append(time.perf_counter() - start)
        manager.release(slot)
    return 1e3 * float(np.mean(times[len(names) :]))  # (the second round: every adapter met before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a Llama checkpoint (bench_llama_tp.py --make)")
    ap.add_argument("--make-adapters", type=Path, help="write random adapters for --model here and exit")
    ap.add_argument("--adapters", type=Path, help="a folder of adapters (lora0, lora1, ...)")
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prefill", type=int, default=0, help="also time one prompt of this many tokens' prefill")
    vary_help = "each timed prefill's prompt this many tokens shorter than the one before (new rows each pass)"
    ap.add_argument("--prefill-vary", type=int, default=0, help=vary_help)
    ap.add_argument("--json")
    fused_help = "forms of the LoRA decode step of 1-4 rows to compare, comma-separated: on, launch, off (both: on,off)"
    ap.add_argument("--lora-fused", default="both", help=fused_help)
    forms_help = "the forms of a prefill's LoRA products to time, comma-separated: " + ", ".join(PREFILL_FORMS)
    ap.add_argument("--lora-prefill-form", default="cuda-cores,segment", help=forms_help)
    args = ap.parse_args()
    forms = ["on", "off"] if args.lora_fused == "both" else args.lora_fused.split(",")
    if not forms or not set(forms) <= set(DECODE_FORMS) or len(set(forms)) < len(forms):
        ap.error(f"--lora-fused: expected some of {', '.join(DECODE_FORMS)} (or both), got {args.lora_fused}")
    prefill_forms = args.lora_prefill_form.split(",")
    if not set(prefill_forms) <= set(PREFILL_FORMS):
        ap.error(f"--lora-prefill-form: expected some of {', '.join(PREFILL_FORMS)}, got {args.lora_prefill_form}")
    if args.prefill_vary < 0 or (args.prefill and args.prefill - 3 * args.prefill_vary < 1):
        ap.error(f"--prefill-vary: expected 0 <= K < --prefill / 3 ({args.prefill}), got {args.prefill_vary}")
    if args.make_adapters:
        make_adapters(args.model, args.make_adapters, args.count, args.rank)
        return
    if args.adapters is None:
        ap.error("--adapters DIR (or --make-adapters DIR first)")
    from fi_engine.models.registry import open_engine
    from fi_engine.runtime.worker.model_runner import ModelRunner

    folders = sorted(p for p in args.adapters.iterdir() if (p / "adapter_config.json").is_file())
    names = [p.name for p in folders]
    batches = [int(b) for b in args.batches.split(",")]
    seq = max(args.prompt + args.new_tokens, args.prefill) + 8
    common = dict(max_batch=max(batches), max_seq_len=seq, cuda_graph=True)
    rows: list[dict[str, Any]] = []
    with open_engine(args.model, **common) as engine:
        base = {b: tokens_per_s(engine, b, args.prompt, args.new_tokens, [None] * b) for b in batches}
        prefills = {"base": prefill_ms(engine, args.prefill, None, args.prefill_vary)} if args.prefill else {}
    for b in batches:
        rows.append({"row": "base", "batch": b, "tokens_per_s": base[b]})
    modules = {n: str(p) for n, p in zip(names, folders, strict=True)}
    lora = {"max_loras": len(names), "max_lora_rank": args.rank, "modules": modules}
    engine_default = ModelRunner.lora_fused, ModelRunner.lora_shrink_in_grid
    for form in forms:
        first = form == forms[0]  # (the other forms: only their adapter rows at 1-4 rows, where they differ)
        # read when the engine opens, its graphs are captured and its steps packed
        ModelRunner.lora_fused, ModelRunner.lora_shrink_in_grid = DECODE_FORMS[form]
        suffix = "" if len(forms) == 1 else f" (lora_fused {form})"
        with open_engine(args.model, lora=lora, **common) as engine:
            for b in batches if first else [b for b in batches if b <= 4]:
                used = names[: min(len(names), b)]
                spread: list[str | None] = [used[i % len(used)] for i in range(b)]
                cases = [(f"lora, {len(used)} adapters{suffix if b <= 4 else ''}", spread)]  # (the switch: 1-4 rows)
                if first:  # (base rows: the same step in every form)
                    cases.insert(0, ("lora, no adapter rows", [None] * b))
                for label, loras in cases:
                    speed = tokens_per_s(engine, b, args.prompt, args.new_tokens, loras)
                    rows.append({"row": label, "batch": b, "tokens_per_s": speed})
            if args.prefill and first:  # (a prefill takes none of the forms: timed once)
                prefills["lora, no adapter"] = prefill_ms(engine, args.prefill, None, args.prefill_vary)
                for form in prefill_forms:
                    label = "lora, one adapter" + ("" if len(prefill_forms) == 1 else f" ({form})")
                    with prefill_form(engine, form):
                        prefills[label] = prefill_ms(engine, args.prefill, names[0], args.prefill_vary)
            slot_mb = engine.runner.lora.layout.slot_bytes() / 2**20
    ModelRunner.lora_fused, ModelRunner.lora_shrink_in_grid = engine_default
    swap = {}
    for cpu, label in ((len(names), "from the host copy"), (1, "read from its folder first")):
        settings = {**lora, "max_loras": 1, "max_cpu_loras": cpu}
        with open_engine(args.model, max_batch=1, max_seq_len=seq, lora=settings) as engine:
            swap[label] = swap_in_ms(engine, names)
    print(f"{'row':<42}{'batch':>6}{'tokens/s':>12}{'x base':>8}")
    for r in rows:
        r["x_base"] = r["tokens_per_s"] / base[r["batch"]]
        print(f"{r['row']:<42}{r['batch']:>6}{r['tokens_per_s']:>12.1f}{r['x_base']:>8.2f}")
    for label, ms in prefills.items():
        varied = f" (each pass {args.prefill_vary} fewer)" if args.prefill_vary else ""
        print(f"prefill of {args.prefill} tokens{varied}, {label}: {ms:.1f} ms ({ms / prefills['base']:.2f}x base)")
    for label, ms in swap.items():
        print(f"swap-in {label}: {ms:.2f} ms (a slot of rank {args.rank}: {slot_mb:.0f} MiB)")
    if args.json:
        report = {"rows": rows, "swap_in_ms": swap, "slot_mib": slot_mb, "prefill_ms": prefills}
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
