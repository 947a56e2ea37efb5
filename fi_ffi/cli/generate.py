"""``fi-ffi generate --model DIR --prompt-ids 1,2,3 [--prompt-ids ...] --max-new-tokens N [--graph] [--tp N]``: serve
token-id prompts with a local checkpoint, on the engine its ``model_type`` needs
(:func:`fi_engine.engines.engine_class`); prints the tokens, tokens/s and host time per decode step."""

from __future__ import annotations

import argparse
import sys

from .arguments import Commands, int_at_least, ordinal, positive_int
from .output import EXIT_USAGE


def _count(text: str) -> int:
    return int_at_least(text, 0, "an integer >= 0")


def _seed(text: str) -> int:
    value = _count(text)
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), got {value}")
    return value


def _temperature(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0: greedy), got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0: greedy), got {text}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1], got {text}")
    return value


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids (e.g. 1,2,3), got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _eos_ids(text: str) -> list[int]:
    return [] if text == "none" else _token_ids(text)


def run(args: argparse.Namespace) -> int:
    import os

    from ..errors import FiFFIError

    rank = os.environ.get("RANK")
    # Under --tp every rank runs this command: what is the same on every rank (the checkpoint's config, whether
    # --tp divides it, whether there are GPUs enough) is checked once by the driver before any rank starts, and a
    # rank prefixes what it reports with its number (its own GPU or communicator may differ from the others').
    where = "fi-ffi generate" if args.tp == 1 or rank is None else f"fi-ffi generate [rank {rank}]"
    try:
        from fi_engine.deepseek_config import is_deepseek
        from fi_engine.engines import engine_class
        from fi_engine.llama import SamplingParams

        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        if is_deepseek(args.model) and args.tp > 1:  # model_type deepseek_v2 / deepseek_v3 (the engine refuses too)
            raise ValueError(f"--tp {args.tp}: DeepSeek checkpoints run on one GPU here; leave out --tp")
        if args.tp > 1 and rank is None:  # the driver: start the ranks, each runs this same command
            if args.device is not None:
                raise ValueError("--device: each rank of --tp uses GPU LOCAL_RANK; leave --device out")
            _check_tp(args.model, args.tp)
            from ..comm import launch

            return launch.main(args.tp, [sys.executable, "-m", "fi_ffi", *args.argv], "127.0.0.1", None, 10.0)
        engine_type = engine_class(args.model)  # LlamaEngine, Gemma2Engine, GptOssEngine or DeepSeekEngine
        with engine_type(
            args.model,
            max_batch=args.max_batch or len(args.prompt_ids),
            cuda_graph=args.graph,
            device=args.device,
            tensor_parallel=args.tp,
        ) as engine:
            result = engine.generate(
                args.prompt_ids, args.max_new_tokens, eos_token_ids=args.eos_ids, sampling=sampling
            )
    except (ValueError, TypeError, ImportError, FiFFIError) as exc:  # a bad checkpoint or argument; no GPU; no CuPy
        print(f"{where}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if engine.rank != 0:  # with --tp, only rank 0 prints
        return 0
    for i, (tokens, why) in enumerate(zip(result.tokens, result.finish_reasons, strict=True)):
        print(f"[{i}] {','.join(map(str, tokens))}  ({why})")
    mode = "CUDA graph" if args.graph else "eager"
    print(
        f"prefill: {result.prefill_s * 1e3:.1f} ms; decode ({mode}): {result.decode_steps} steps, "
        f"{result.decode_tokens} tokens, {result.tokens_per_s:.1f} tokens/s, host time per step "
        f"{result.host_us_per_step:.1f} us (median)"
    )
    return 0


def _check_tp(model: str, tp: int) -> None:
    """What every rank of ``generate --tp`` would find the same, checked once before they start: the checkpoint's
    config, that ``tp`` divides it, and that this host has ``tp`` GPUs."""
    from fi_engine.config import LlamaConfig
    from fi_engine.tensor_parallel import shard_config

    from ..cuda import system
    from ..errors import UnsupportedDeviceError

    shard_config(LlamaConfig.from_dir(model), tp)  # every LlamaConfig model type (Gemma 2 and gpt-oss too)
    found, why = system.gpus()
    if len(found) < tp:
        raise UnsupportedDeviceError(
            f"--tp {tp}: needs {tp} GPUs on this host (one per rank), found {len(found)}"
            f"{f' ({why})' if why else ''}; use --tp {max(len(found), 1)} or a machine with more GPUs"
        )


def register(commands: Commands) -> None:
    p = commands.add(
        "generate",
        "serve token-id prompts with a local checkpoint (needs CuPy and a GPU)",
        "Load a Hugging Face checkpoint (Llama, Qwen3, Mixtral, Qwen3-MoE, Gemma 2, gpt-oss, DeepSeek; f16/bf16) "
        "onto the GPU and generate from token-id prompts; prints the tokens, tokens/s and host time per decode "
        "step. Needs CuPy (python -m pip install cupy-cuda13x). Every value is checked before the GPU is touched.",
        "fi-ffi generate --model ./SmolLM2-135M --prompt-ids 1,2,3 --max-new-tokens 16\n"
        "fi-ffi generate --model ./m --prompt-ids 1,2 --prompt-ids 4,5 --temperature 0.7 --top-p 0.9 --graph\n"
        "fi-ffi generate --model ./m --prompt-ids 1,2,3 --tp 2",
    )
    p.add_argument("--model", required=True, help="checkpoint directory: config.json + *.safetensors (f16/bf16)")
    p.add_argument(
        "--prompt-ids",
        type=_token_ids,
        action="append",
        required=True,
        help="one prompt as comma-separated token ids (repeat for a batch)",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate per prompt (>= 1)")
    p.add_argument("--graph", action="store_true", help="replay the decode step as a CUDA graph")
    p.add_argument("--max-batch", type=positive_int, default=None, help="batch slots (default: the number of prompts)")
    p.add_argument(
        "--eos-ids", type=_eos_ids, help="comma-separated end-of-sequence ids, or 'none' (default: the checkpoint's)"
    )
    p.add_argument("--temperature", type=_temperature, default=0.0, help="a finite value >= 0; 0 (default): greedy")
    p.add_argument("--top-k", type=_count, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=_probability, default=1.0, help="sample within this probability mass, in (0, 1]")
    p.add_argument("--seed", type=_seed, default=0, help="sampling seed, in [0, 2**64)")
    p.add_argument("--device", type=ordinal, default=None, help="CUDA ordinal (default 0)")
    p.add_argument(
        "--tp", type=positive_int, default=1, help="tensor-parallel ranks on this host (one GPU each; default 1)"
    )
    p.set_defaults(func=run)


__all__ = ["register", "run"]
