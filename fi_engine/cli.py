"""``fi-engine``: the engine's command line (``python -m fi_engine``).

- ``generate MODEL_DIR --prompt-ids 1,2,3 [--prompt-ids ...] --max-new-tokens N [--graph] [--tp N]``: serve
  token-id prompts with a local checkpoint (needs CuPy and a GPU); prints the tokens, tokens/s and host time per
  decode step. ``--prompt TEXT`` and ``--chat MESSAGE`` (each repeatable, beside ``--prompt-ids``) take text:
  encoded with the checkpoint's ``tokenizer.json``, a chat message rendered with its chat template, the
  generation ended by its ``generation_config.json`` end-of-sequence ids, the output printed as text. Every value
  is checked before the GPU is touched: a bad one is a usage error (exit 2).
- ``serve MODEL_DIR [--host H] [--port P] [--max-batch N] [--max-queue N] [--graph] [--api-servers N]
  [--scheduler-delay-factor F] [--no-mixed-prefill] [--no-enable-prefix-caching]``: the OpenAI-compatible HTTP
  server (:mod:`fi_engine.serve.openai_server`; the ``serve`` extra) until SIGINT/SIGTERM; with ``--api-servers
  N``, N front-end processes over one engine process (:mod:`fi_engine.serve.api_servers`). The engine steps with
  ``overlap_steps``, the scheduler delay, ``mixed_prefill`` and ``prefix_caching`` where the engine serves it
  (``fi_engine.runtime.serving.ServingLoop``); the start-up line says whether prefix caching is on and names
  quantized weights (FP8, AWQ/GPTQ int4, MXFP4), which ``/v1/models`` reports as ``quantization`` (their
  ``quant_method``).

``fi-ffi generate ARGS`` (the binding's command, where this subcommand lived) runs ``python -m fi_engine generate
ARGS``. With ``--tp N`` this command starts its ranks through ``fi-ffi launch`` (the binding's launcher, a
subprocess), each rank running this same command. Exit status: 0 success, 2 a usage, checkpoint or fi_ffi error
(or output that could not be written: ``> /dev/full``, one line), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from .kernels.system import FiFFIError

__all__ = ["build_parser", "main"]

PROG = "fi-engine"
# `serve --scheduler-delay-factor`'s default (LaunchPolicy.admit), vLLM's too: admit at the next step. Measured on an
# H100 (benchmarks/bench_serve.py compare, SmolLM2 shapes, 64 streaming clients over 4 API servers, 16 waves; once
# the front ends handed requests on at once, 2026-11-24): factor 0 gave 0.87-0.99x of generate over 8 runs (median
# 0.906), 1 gave 0.88x, 3 (the earlier default, chosen while requests reached the engine 4-20 ms late) 0.87-0.91x
SCHEDULER_DELAY_FACTOR = 0.0


def _int_at_least(text: str, lowest: int, what: str) -> int:
    """``text`` as an int >= ``lowest`` for argparse; ``what`` describes it in the error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _lora_module(text: str) -> tuple[str, str]:
    """``serve --lora-modules``' ``NAME=PATH`` as ``(name, path)`` (the name as a request's ``model`` gives it)."""
    from .lora.settings import adapter_name

    name, sep, path = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (an adapter's name and its PEFT folder), got {text!r}")
    try:
        return adapter_name(name, "NAME"), path
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (in {text!r})") from None


def _lora_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """The engine's ``lora`` argument of ``serve``'s LoRA flags (None without ``--enable-lora``); ValueError naming
    the flag for one given without ``--enable-lora``, a name given twice or one of the base model's, or a value the
    settings refuse (:class:`~fi_engine.lora.settings.LoraSettings`)."""
    from .lora.settings import LoraSettings

    flags = {"--lora-modules": args.lora_modules, "--max-loras": args.max_loras, "--max-lora-rank": args.max_lora_rank,
             "--max-cpu-loras": args.max_cpu_loras}  # fmt: skip
    if not args.enable_lora:
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise ValueError(f"{given[0]}: serves LoRA adapters; add --enable-lora")
        return None
    modules = list(args.lora_modules or ())
    served = args.served_model_name or [args.model]
    for name, _ in modules:
        if name in served:
            raise ValueError(f"--lora-modules {name}=...: {name!r} is the base model's served name; rename the adapter")
    settings = {"modules": modules, "max_loras": args.max_loras or 1, "max_lora_rank": args.max_lora_rank or 16,
                "max_cpu_loras": args.max_cpu_loras}  # fmt: skip
    try:
        LoraSettings.of(settings)
    except (TypeError, ValueError) as exc:  # "lora: max_loras: ..." as the flag
        text = str(exc).removeprefix("lora: ")
        field = text.split(":", 1)[0].split("[", 1)[0]
        flag = "lora-modules" if field == "modules" else field.replace("_", "-")
        raise ValueError(f"--{flag}{text[len(field) :]}") from None
    return settings


def _speculative_config(text: str) -> dict[str, Any]:
    """``--speculative-config``'s JSON object (its keys are checked by the engine)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        example = '{"method": "ngram", ...}'
        raise argparse.ArgumentTypeError(f"expected a JSON object such as {example}: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _size(text: str) -> int:
    """A count the engine allocates by (tokens, batch slots): an int in ``[1, 2**31)`` (the kernels' int32)."""
    return _in_range(text, 1, (1 << 31) - 1, "a positive integer below 2**31")


def _count(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _float_where(text: str, ok: Callable[[float], bool], what: str, out_of_range: str | None = None) -> float:
    """``text`` as a float for which ``ok`` holds (``ok`` must refuse NaN), for argparse; ``what`` describes it in
    the error, ``out_of_range`` (default: ``what``) where it is a number ``ok`` refuses."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {out_of_range or what}, got {text}")
    return value


def _seed(text: str) -> int:
    value = _count(text)
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), got {value}")
    return value


def _finite_non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _temperature(text: str) -> float:
    return _float_where(text, _finite_non_negative, "a number >= 0 (0: greedy)", "a finite number >= 0 (0: greedy)")


def _probability(text: str) -> float:
    return _float_where(text, lambda v: 0.0 < v <= 1.0, "a probability in (0, 1]")  # refuses NaN too


def _ordinal(text: str) -> int:
    return _int_at_least(text, 0, "a CUDA device ordinal (0, 1, ...)")


def _token_ids(text: str) -> list[int]:
    items = text.split(",")
    if not text.strip():
        raise argparse.ArgumentTypeError("expected at least one token id")
    if any(not t.strip() for t in items):  # `1,,3` or `1,2,`: a token id lost to a typo, not silently dropped
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token ids with no empty item (e.g. 1,2,3), got {text!r}"
        )
    try:
        return [int(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids (e.g. 1,2,3), got {text!r}") from None


def _eos_ids(text: str) -> list[int]:
    return [] if text == "none" else _token_ids(text)


def cmd_generate(args: argparse.Namespace) -> int:
    """Serve the prompts of ``args`` (token ids, texts or chat messages) with the checkpoint at ``args.model``;
    print the tokens (or the text) and the timings."""
    from .models.llama import SamplingParams
    from .models.registry import engine_class, read_config

    rank = os.environ.get("RANK")
    # Under --tp every rank runs this command: what is the same on every rank (the checkpoint's config, whether
    # --tp divides it, whether there are GPUs enough) is checked once by the driver before any rank starts, and a
    # rank prefixes what it reports with its number (its own GPU or communicator may differ from the others').
    where = f"{PROG} generate" if args.tp == 1 or rank is None else f"{PROG} generate [rank {rank}]"
    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        if args.tp > 1 and args.device is not None:
            raise ValueError("--device: each rank of --tp uses GPU LOCAL_RANK; leave --device out")
        _check_prompt_flags(args)
        config = read_config(args.model)  # whether the folder is a checkpoint at all: before its tokenizer is read
        prompts, codec = _prompts(args)
        _check_generate_values(args, prompts, config)  # against the checkpoint's config: before any rank or GPU
        if args.tp > 1 and rank is None:  # the driver: start the ranks, each runs this same command
            _check_tp(args.model, args.tp)
            return _launch_ranks(args.tp, [sys.executable, "-m", "fi_engine", *args.argv])
        _check_device(args.device)
        eos = args.eos_ids if args.eos_ids is not None or codec is None else list(codec.eos_token_ids) or None
        engine_type = engine_class(args.model)  # LlamaEngine, Gemma2Engine, GptOssEngine or DeepSeekEngine
        with engine_type(
            args.model,
            max_batch=args.max_batch or len(prompts),
            cuda_graph=args.graph,
            device=args.device,
            tensor_parallel=args.tp,
        ) as engine:
            result = engine.generate(prompts, args.max_new_tokens, eos_token_ids=eos, sampling=sampling)
    except (ValueError, TypeError, ImportError, FiFFIError) as exc:  # a bad checkpoint or argument; no GPU; no CuPy
        print(f"{where}: {exc}", file=sys.stderr)
        return 2
    if engine.rank != 0:  # with --tp, only rank 0 prints
        return 0
    given = len(args.prompt_ids or ())
    for i, (tokens, why) in enumerate(zip(result.tokens, result.finish_reasons, strict=True)):
        if i < given or codec is None:  # a --prompt-ids prompt: its tokens
            print(f"[{i}] {','.join(map(str, tokens))}  ({why})")
        else:  # a --prompt or --chat prompt: the generated text, the checkpoint's special tokens left out
            print(f"[{i}] {codec.decode(tokens)!r}  ({why})")
    mode = "CUDA graph" if args.graph else "eager"
    print(
        f"prefill: {result.prefill_s * 1e3:.1f} ms; decode ({mode}): {result.decode_steps} steps, "
        f"{result.decode_tokens} tokens, {result.tokens_per_s:.1f} tokens/s, host time per step "
        f"{result.host_us_per_step:.1f} us (median)"
    )
    return 0


def _check_prompt_flags(args: argparse.Namespace) -> None:
    """ValueError naming the flag when no prompt is given or a ``--prompt``/``--chat`` text is empty (before any
    file of the checkpoint is read)."""
    if not args.prompt_ids and not args.prompt and not args.chat:
        raise ValueError("give at least one prompt: --prompt-ids 1,2,3, --prompt TEXT or --chat MESSAGE")
    for flag, items in (("--prompt", args.prompt or []), ("--chat", args.chat or [])):
        for text in items:
            if not text.strip():
                raise ValueError(f"{flag}: expected a non-empty text, got {text!r}")


def _prompts(args: argparse.Namespace) -> tuple[list[list[int]], Any]:
    """The prompts in order: each ``--prompt-ids`` as given, each ``--prompt`` encoded with the checkpoint's
    tokenizer (its BOS added where the tokenizer adds one), each ``--chat`` as one user message through the
    checkpoint's chat template with the assistant's turn opened; and the checkpoint's
    :class:`~fi_engine.text.codec.TextCodec` when any prompt is text (None otherwise). The flags are checked
    already (:func:`_check_prompt_flags`)."""
    prompts = [list(p) for p in args.prompt_ids or ()]
    texts, chats = args.prompt or [], args.chat or []
    if not texts and not chats:
        return prompts, None
    from .text.codec import TextCodec

    codec = TextCodec.from_dir(args.model)
    prompts += [codec.encode(text) for text in texts]
    prompts += [codec.encode_chat([{"role": "user", "content": text}]) for text in chats]
    return prompts, codec


def _check_generate_values(args: argparse.Namespace, prompts: list[list[int]], config: Any) -> None:
    """The values of ``generate`` that the checkpoint's ``config.json`` (``config``, as its family's reader read it)
    bounds, checked on the host before any GPU work: token ids (``--prompt-ids``, ``--eos-ids``) in
    ``[0, vocab_size)``, ``--top-k`` at most ``vocab_size``, and the longest prompt plus ``--max-new-tokens`` within
    the engine's ``max_seq_len`` (the rule its scheduler applies to every request:
    :meth:`~fi_engine.runtime.sched.scheduler.Scheduler.submit`). ValueError naming the flag, the value, what is
    allowed and the fix."""
    from .runtime.settings import EngineSettings

    vocab = config.vocab_size
    for flag, lists in (("--prompt-ids", args.prompt_ids or []), ("--eos-ids", [args.eos_ids or []])):
        for ids in lists:
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(
                    f"{flag}: token id {bad} is outside the checkpoint's vocabulary (vocab_size {vocab} in "
                    f"config.json); use ids from 0 to {vocab - 1}"
                )
    if args.top_k > vocab:
        raise ValueError(
            f"--top-k {args.top_k}: expected 0 (every token) up to the vocabulary size {vocab}; use --top-k {vocab} "
            f"or less"
        )
    max_seq_len = EngineSettings(max_batch=args.max_batch or len(prompts)).sizes(config).max_seq_len
    longest = max(len(p) for p in prompts)
    if longest + args.max_new_tokens > max_seq_len:
        limit = f"the engine's max_seq_len {max_seq_len} (max_position_embeddings {config.max_position_embeddings} "
        limit += "in config.json, at most 4096)"
        if longest >= max_seq_len:
            raise ValueError(
                f"a prompt of {longest} tokens leaves no room for a new token within {limit}; shorten it to "
                f"{max_seq_len - 1} tokens or fewer"
            )
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens}: the longest prompt ({longest} tokens) plus "
            f"{args.max_new_tokens} new tokens exceed {limit}; use --max-new-tokens {max_seq_len - longest} or less"
        )


def _check_serve_values(args: argparse.Namespace) -> None:
    """The values of ``serve`` checked on the host before any GPU work: ``--max-seq-len`` at most the checkpoint's
    ``max_position_embeddings``, every ``--served-model-name`` non-empty, ``--host`` an address or a name this
    machine resolves (``socket.getaddrinfo``), ``--device`` an ordinal present. ValueError naming the flag."""
    import socket

    from .models.registry import read_config

    config = read_config(args.model)
    limit = config.max_position_embeddings
    if args.max_seq_len is not None and args.max_seq_len > limit:
        raise ValueError(
            f"--max-seq-len {args.max_seq_len}: the checkpoint's max_position_embeddings is {limit} (config.json), "
            f"the longest sequence its positions cover; use --max-seq-len {limit} or less"
        )
    for name in args.served_model_name or ():
        if not name.strip():
            raise ValueError(
                f"--served-model-name: expected a non-empty name, got {name!r}; leave the flag out to serve the "
                f"model as MODEL_DIR"
            )
    try:
        socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise ValueError(
            f"--host {args.host!r}: cannot be resolved to an address to listen on ({why}); give an address such as "
            f"127.0.0.1, 0.0.0.0 (every interface) or ::, or a host name this machine resolves"
        ) from None
    _check_device(args.device)


def _check_device(device: int | None) -> None:
    """``--device`` against the GPUs this host has; where it has none, the engine's "needs an NVIDIA GPU" says why."""
    if device is None:
        return
    from .kernels.system import gpus

    why = device_problem(device, len(gpus()[0]))
    if why:
        raise ValueError(why)


def device_problem(device: int, count: int) -> str:
    """What is wrong with ``--device device`` on a host with ``count`` GPUs (``""``: nothing, or no GPU at all,
    which the engine names with its fix)."""
    if count == 0 or device < count:
        return ""
    return (
        f"--device {device}: this host has {count} GPU{'s' if count > 1 else ''} (ordinals 0 to {count - 1}); use "
        f"one of them (`nvidia-smi` lists them)"
    )


def _check_tp(model: str, tp: int) -> None:
    """What every rank of ``generate --tp`` would find the same, checked once before they start: the checkpoint's
    config, that ``tp`` divides it, and that this host has ``tp`` GPUs."""
    from .kernels.system import UnsupportedDeviceError, gpus
    from .layers.tensor_parallel import shard_config
    from .models.registry import family_of, read_config

    family = family_of(model)
    if not family.tensor_parallel:  # its registry row says so (the engine refuses too)
        raise ValueError(f"--tp {tp}: {family.label} checkpoints run on one GPU here; leave out --tp")
    shard_config(read_config(model), tp)  # as the checkpoint's family reads it (a LlamaConfig where --tp applies)
    found, why = gpus()
    if len(found) < tp:
        raise UnsupportedDeviceError(
            f"--tp {tp}: needs {tp} GPUs on this host (one per rank), found {len(found)}"
            f"{f' ({why})' if why else ''}; use --tp {max(len(found), 1)} or a machine with more GPUs"
        )


def _launch_ranks(nproc: int, command: list[str]) -> int:
    """Run ``command`` as ``nproc`` ranks on this host through the binding's launcher (``fi-ffi launch``: the
    variables torchrun sets, NVLink multicast off, the others stopped when one fails); its exit status."""
    import subprocess

    launcher = [sys.executable, "-m", "fi_ffi", "launch", "--nproc", str(nproc), "--master-addr", "127.0.0.1"]
    return subprocess.call([*launcher, "--", *command])


def _served() -> str:
    """The families served and their ``config.json`` model types, for the help (one row each in the registry)."""
    from .models.registry import families

    return "; ".join(f"{f.label}: model_type {', '.join(f.model_types)}" for f in families())


def _version() -> str:
    """The installed distribution's version (fi_engine ships in fi_ffi's)."""
    from .kernels.system import __version__

    return __version__


def _command(
    sub: Any, common: argparse.ArgumentParser, name: str, summary: str, description: str, examples: Sequence[str]
) -> argparse.ArgumentParser:
    """Sub-command ``name``'s parser: its one-line ``summary`` (the command list's help), ``description`` wrapped at 100
    columns, ``examples`` after the options as written (one command line each) and the ``common`` options."""
    return sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 100),
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``fi-engine`` argument parser (subcommands ``generate`` and ``serve``)."""
    common = argparse.ArgumentParser(add_help=False)  # -q/-v before or after the subcommand
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or progress lines"
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log what fi_ffi's loader does to stderr (-vv: debug detail)",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The fi_engine serving engine: FlashInfer kernels through fi_ffi, without torch.",
        epilog="Run `fi-engine COMMAND --help` for a command's options and examples. Exit status: 0 success, 2 a "
        "usage, checkpoint or fi_ffi error.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _command(
        sub,
        common,
        "generate",
        "serve token-id prompts with a local checkpoint (needs CuPy and a GPU)",
        f"Load a Hugging Face checkpoint ({_served()}; "
        "f16/bf16; FP8 e4m3, or AWQ/GPTQ int4 read as stored, for dense Llama/Qwen3) onto the GPU and "
        "generate from token-id prompts; prints the "
        "tokens, tokens/s and host time "
        "per decode step. Needs the engine extra: python -m pip install '.[engine]' in the checkout. Every value "
        "is checked before the GPU is touched.",
        (
            "fi-engine generate ./SmolLM2-135M --prompt-ids 1,2,3 --max-new-tokens 16",
            "fi-engine generate --model ./m --prompt-ids 1,2 --prompt-ids 4,5 --temperature 0.7 --top-p 0.9 --graph",
            "fi-engine generate --model ./m --prompt-ids 1,2,3 --tp 2",
            "fi-engine generate ./SmolLM2-135M-Instruct --chat 'What is a GPU?' --max-new-tokens 64",
        ),
    )
    _add_model(p, "checkpoint directory: config.json + *.safetensors (f16/bf16, FP8 e4m3, or AWQ/GPTQ int4)")
    p.add_argument(
        "--prompt-ids",
        type=_token_ids,
        action="append",
        help="one prompt as comma-separated token ids (repeat for a batch)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        help="one prompt as text, encoded with the checkpoint's tokenizer.json (repeat for a batch; printed as text)",
    )
    p.add_argument(
        "--chat",
        action="append",
        help="one user message, rendered with the checkpoint's chat template (repeat for a batch; printed as text)",
    )
    p.add_argument("--max-new-tokens", type=_size, default=32, help="tokens to generate per prompt (>= 1; default 32)")
    p.add_argument("--graph", action="store_true", help="replay the decode step as a CUDA graph")
    p.add_argument("--max-batch", type=_size, default=None, help="batch slots (default: the number of prompts)")
    p.add_argument(
        "--eos-ids", type=_eos_ids, help="comma-separated end-of-sequence ids, or 'none' (default: the checkpoint's)"
    )
    p.add_argument("--temperature", type=_temperature, default=0.0, help="a finite value >= 0; 0 (default): greedy")
    p.add_argument("--top-k", type=_count, default=0, help="sample among the k most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=_probability, default=1.0, help="probability mass sampled, in (0, 1] (default 1)")
    p.add_argument("--seed", type=_seed, default=0, help="sampling seed, in [0, 2**64) (default 0)")
    p.add_argument("--device", type=_ordinal, default=None, help="CUDA ordinal (default 0)")
    p.add_argument(
        "--tp", type=_positive_int, default=1, help="tensor-parallel ranks on this host (one GPU each; default 1)"
    )
    p.set_defaults(func=cmd_generate)
    _add_serve(sub, common)
    return parser


class _WatchedStdout:
    """Standard output that remembers whether a write to it failed (``> /dev/full``, a full disk), so that
    :func:`main` tells that failure (one line, exit 2) from an ``OSError`` of the command's own work."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.error: OSError | None = None  # the first failed write (argparse's help swallows it: kept here)

    @property
    def failed(self) -> bool:
        return self.error is not None

    def write(self, text: str) -> int:
        try:
            return int(self.stream.write(text))
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _add_model(p: argparse.ArgumentParser, what: str) -> None:
    """The checkpoint of a command: ``MODEL_DIR`` (positional, as ``vllm serve MODEL``) or ``--model DIR`` (as
    vLLM's option), either spelling; :func:`_model_of` picks the one given."""
    p.add_argument("model_dir", metavar="MODEL_DIR", nargs="?", help=f"{what} (or --model DIR)")
    p.add_argument("--model", metavar="DIR", help="the same as MODEL_DIR")
    p.set_defaults(subparser=p)


def _model_of(args: argparse.Namespace) -> str:
    """The checkpoint ``args`` name, through ``MODEL_DIR`` or ``--model``; a usage error (exit 2) when neither is
    given, or both with different values."""
    given, flag = args.model_dir, args.model
    if given is not None and flag is not None and given != flag:
        args.subparser.error(
            f"MODEL_DIR {given!r} and --model {flag!r} name different checkpoints; give one of them (the same value "
            f"twice is accepted)"
        )
    model = given if given is not None else flag
    if model is None:
        args.subparser.error("the checkpoint is missing: give MODEL_DIR (e.g. ./SmolLM2-135M-Instruct) or --model DIR")
    return str(model)


def _add_serve(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _command(
        sub,
        common,
        "serve",
        "serve a checkpoint over an OpenAI-compatible HTTP API (needs CuPy, a GPU and the serve extra)",
        f"Load a checkpoint ({_served()}) onto the GPU and serve /v1/completions, /v1/chat/completions "
        "(streamed or not), "
        "/v1/models, /health and /metrics until SIGINT/SIGTERM; every client's requests are batched together. "
        "Needs the engine and serve extras: python -m pip install '.[engine,serve]' in the checkout.",
        (
            "fi-engine serve ./SmolLM2-135M-Instruct --port 8000 --max-batch 64 --graph",
            "curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
            '  -d \'{"model": "./SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]}\'',
        ),
    )
    _add_model(p, "checkpoint directory: config.json, *.safetensors, tokenizer.json")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--served-model-name",
        action="append",
        help="the name(s) requests give as `model` (default: MODEL_DIR as given, as vLLM does; repeat for aliases)",
    )
    p.add_argument("--max-batch", type=_size, default=32, help="requests generated together (default 32)")
    p.add_argument(
        "--max-queue",
        type=_count,
        default=256,
        help="requests waiting beyond --max-batch before new ones get HTTP 429 (default 256)",
    )
    p.add_argument(
        "--max-seq-len",
        type=_size,
        default=None,
        help="most tokens per request, prompt + output (default: max_position_embeddings, at most 4096)",
    )
    p.add_argument(
        "--graph",
        action="store_true",
        help="replay the decode step and the prefill passes as CUDA graphs (the passes' graphs captured at start)",
    )
    p.add_argument("--device", type=_ordinal, default=None, help="CUDA ordinal (default 0)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the engine in the server's own process (default: a child process, so that the HTTP event loop "
        "and the engine's steps do not take turns on one Python interpreter)",
    )
    p.add_argument(
        "--api-servers",
        type=_api_servers,
        default=1,
        metavar="N",
        help="HTTP front-end processes in front of the one engine process (default 1): each parses, tokenizes and "
        "streams in an interpreter of its own, so more clients are served at the engine's pace; the queue limit and "
        "/metrics cover all of them",
    )
    p.add_argument(
        "--scheduler-delay-factor",
        type=_delay_factor,
        default=SCHEDULER_DELAY_FACTOR,
        metavar="F",
        help="requests that arrive while others decode wait up to F times the last prefill's time to be prefilled "
        f"together, as vLLM's option of that name (default {SCHEDULER_DELAY_FACTOR}; 0: at the next step)",
    )
    p.add_argument(
        "--mixed-prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a prefill pass also decodes the requests already running, one token row each, instead of pausing "
        "them for a pass of its own (default on; --no-mixed-prefill: each prefill alone, the decode step after it)",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a prompt reuses the KV cache pages an earlier request computed for the same beginning (a chat's system "
        "prompt and history), as vLLM's option of that name; on where the engine serves it (the Llama family on one "
        "GPU), the start-up line says which; hits in each response's usage.prompt_tokens_details.cached_tokens and in "
        "/metrics (default on; --no-enable-prefix-caching: every prompt computed whole)",
    )
    p.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a prompt longer than a pass's --max-num-batched-tokens is prefilled in chunks, the running requests "
        "taking a token from each chunk's pass instead of waiting for the whole prompt, and prompts up to "
        "--max-seq-len are served; as vLLM's option of that name, on where the engine serves it (as prefix caching) "
        "(default on; --no-enable-chunked-prefill: each prompt in one pass)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=None,
        help="token rows of one prefill pass with chunked prefill (the running requests' rows and the prompts'); "
        "fewer keep the running streams' tokens coming faster during a long prompt, more prefill it sooner "
        "(default: 512, at most the engine's max_prefill_tokens; benchmarks/RESULTS.md has the trade measured)",
    )
    p.add_argument(
        "--speculative-config",
        type=_speculative_config,
        default=None,
        help="speculative decoding, as vLLM's option: "
        """'{"method": "ngram", "num_speculative_tokens": 4}' drafts up to 4 tokens a pass by prompt lookup """
        "(prompt_lookup_max / prompt_lookup_min: the n-gram sizes, default 4 and 1); "
        """'{"model": DIR, "num_speculative_tokens": 4}' by a smaller model of the same tokenizer, """
        "opened beside the served one; a step verifies drafts where a pass pays (default off)",
    )
    p.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve LoRA adapters of the base model (PEFT folders), each chosen by a request's `model` (the Llama "
        "family on one GPU); rows of different adapters decode in one batch; with --api-servers N, every front end "
        "serves the adapters the engine holds",
    )
    p.add_argument(
        "--lora-modules",
        type=_lora_module,
        nargs="+",
        action="extend",
        metavar="NAME=PATH",
        help="adapters to serve from the start, each as the name requests give as `model` and its PEFT folder "
        "(adapter_config.json, adapter_model.safetensors); with FI_ENGINE_ALLOW_RUNTIME_LORA_UPDATING=1, more are "
        "loaded and unloaded at run time through POST /v1/load_lora_adapter and /v1/unload_lora_adapter (of any "
        "API server: all of them see the change)",
    )
    p.add_argument(
        "--max-loras",
        type=_positive_int,
        default=None,
        help="adapters held on the GPU at once, the most one batch uses (default 1); a request of another adapter "
        "waits for a slot",
    )
    p.add_argument(
        "--max-lora-rank",
        type=_positive_int,
        default=None,
        help="the largest adapter rank served, at most 512 (default 16); every GPU slot takes this rank's memory",
    )
    p.add_argument(
        "--max-cpu-loras",
        type=_positive_int,
        default=None,
        help="adapters kept read on the host, at least --max-loras (default: --max-loras); one not kept is read "
        "from its folder again when a request needs it",
    )
    p.add_argument(
        "--grace",
        type=_seconds,
        default=30.0,
        help="seconds open requests get to finish on SIGINT/SIGTERM before they are cancelled (default 30)",
    )
    p.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug"),
        default="info",
        help="uvicorn's log level (default info: one line per request)",
    )
    p.add_argument(
        "--api-key",
        type=_api_key,
        default=os.environ.get("FI_ENGINE_API_KEY") or None,
        help="requests to /v1/* must send 'Authorization: Bearer KEY' (the openai client's api_key), else 401; "
        "/health and /metrics stay open (default: $FI_ENGINE_API_KEY, which keeps the key off the command line; "
        "unset: no key)",
    )
    p.add_argument(
        "--allowed-origins",
        type=_origins,
        default=["*"],
        help="origins browsers may call the API from (CORS), as a JSON list or comma-separated, such as "
        "https://a.example,https://b.example (default: any, as vLLM's; '[]': no CORS headers)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=_request_bytes,
        default=None,
        metavar="BYTES",
        help="the largest request body taken; a larger one is answered 413 (default 33554432: 32 MiB, room for a "
        "million-token prompt several times over)",
    )
    p.set_defaults(func=cmd_serve)


def _api_key(text: str) -> str:
    from .serve.openai_server import check_api_key

    try:
        return str(check_api_key(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            "expected a non-empty key of printable ASCII characters without blanks (--api-key or FI_ENGINE_API_KEY)"
        ) from None


def _origins(text: str) -> list[str]:
    try:
        value = json.loads(text) if text.lstrip().startswith("[") else [o for o in text.split(",") if o.strip()]
        if not isinstance(value, list):
            raise ValueError
        from .serve.openai_server import check_origins

        return list(check_origins(value))
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"expected a JSON list of origins or a comma-separated list, such as https://a.example, got {text!r}"
        ) from None


def _request_bytes(text: str) -> int:
    return _in_range(text, 1024, 1 << 62, "a number of bytes >= 1024")


def _port(text: str) -> int:
    return _in_range(text, 0, 65535, "a TCP port in [0, 65535]")


def _in_range(text: str, lowest: int, highest: int, what: str) -> int:
    value = _int_at_least(text, lowest, what)
    if value > highest:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _api_servers(text: str) -> int:
    from .serve.engine_process import MAX_CLIENTS

    return _in_range(text, 1, MAX_CLIENTS, f"an integer in [1, {MAX_CLIENTS}]")


def _delay_factor(text: str) -> float:
    return _float_where(text, lambda v: 0 <= v <= 100, "a number in [0, 100]")  # refuses NaN too


def _seconds(text: str) -> float:
    return _float_where(text, _finite_non_negative, "seconds >= 0", "a finite number of seconds >= 0")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the checkpoint at ``args.model`` over HTTP until interrupted; 2 for a bad checkpoint or argument."""
    import importlib

    from .models.registry import engine_class, open_engine
    from .runtime.stepping import StepEngine
    from .serve.service import GenerationService
    from .text.codec import TextCodec

    where = f"{PROG} serve"
    if args.api_servers > 1 and args.in_process:
        print(
            f"{where}: --api-servers {args.api_servers} serves one engine process; drop --in-process", file=sys.stderr
        )
        return 2
    try:
        # everything a CPU can check, before the GPU: the values, the tokenizer and template, the server's packages
        lora = _lora_settings(args)
        _check_serve_values(args)
        codec = TextCodec.from_dir(args.model)
        weights = _quantized_weights(args.model)  # the start-up line and /v1/models name it
        for module in ("starlette", "uvicorn"):
            try:
                importlib.import_module(module)
            except ModuleNotFoundError:
                raise ImportError(
                    f"the server needs the {module!r} package; install it with: python -m pip install '.[serve]' "
                    f"in the fi_ffi checkout"
                ) from None
        kwargs = dict(max_batch=args.max_batch, max_seq_len=args.max_seq_len, cuda_graph=args.graph, device=args.device)
        # each decode step launched before the last one's tokens are delivered (ServingLoop._serve_step), arrivals
        # grouped into fewer prefills (LaunchPolicy.admit), and the running requests decoded in each prefill pass
        # and, with CUDA graphs, the prefill graphs those passes replay captured before the first request
        kwargs.update(
            overlap_steps=True,
            scheduler_delay_factor=args.scheduler_delay_factor,
            mixed_prefill=args.mixed_prefill,
            warm_serving=args.graph,
            prefix_caching=args.enable_prefix_caching,
            chunked_prefill=args.enable_chunked_prefill,
            max_num_batched_tokens=args.max_num_batched_tokens,
            speculative_config=args.speculative_config,
        )
        if lora is not None:
            kwargs["lora"] = lora
        if args.in_process:
            engine = open_engine(args.model, **kwargs)
        else:  # the engine steps in a process of its own (fi_engine.serve.engine_process says why)
            from .serve.engine_process import EngineProcess

            engine_class(args.model)  # the checkpoint's family is known (a bad config.json is named here)
            engine = EngineProcess(
                "fi_engine.models.registry:open_engine", args.model, clients=args.api_servers, **kwargs
            )
    except (ValueError, TypeError, ImportError, RuntimeError, FiFFIError) as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return 2
    names = args.served_model_name or [args.model]
    caching = getattr(engine, "prefix_caching", False) is True
    chunking = getattr(engine, "chunked_prefill", False) is True
    unserved = " (not served by this engine)" if args.enable_prefix_caching and not caching else ""
    chunks = f"on, {engine.max_num_batched_tokens} tokens a pass" if chunking else "off"
    drafts = getattr(engine, "speculative_tokens", 0)
    draft_model = (args.speculative_config or {}).get("model")
    method = "ngram" if draft_model is None else f"draft model {draft_model}"
    speculation = f", speculative decoding ({method}) up to {drafts} tokens a pass" if drafts else ""
    settings = (
        f"max batch {args.max_batch}, queue {args.max_queue}, {'CUDA graph' if args.graph else 'eager'}, "
        f"prefix caching {'on' if caching else 'off'}{unserved}, chunked prefill {chunks}{speculation}"
        + (f", {weights.describe()}" if weights is not None else "")
        + (f", LoRA adapters {_adapters_line(lora)}" if lora is not None else "")
    )
    options = _server_options(args, engine, None if weights is None else weights.method, lora)
    if args.api_servers > 1:
        return _serve_api_servers(args, engine, names, settings, options)
    from .serve.openai_server import serve

    with engine:
        if not isinstance(engine, StepEngine):
            print(
                f"{where}: {type(engine).__name__} does not serve step by step yet "
                f"(fi_engine.runtime.stepping.StepEngine: add_request, abort_request, step, has_unfinished)",
                file=sys.stderr,
            )
            return 2
        service = GenerationService(engine, codec, max_queue=args.max_queue)
        print(
            f"{where}: serving {', '.join(names)} on http://{args.host}:{args.port} ({settings})",
            file=sys.stderr,
            flush=True,
        )
        try:
            serve(service, names, **options)
        finally:
            service.close(timeout=args.grace)
    return 0


def _server_options(
    args: argparse.Namespace, engine: Any, quantization: str | None, lora: dict[str, Any] | None
) -> dict[str, Any]:
    """The options of the server from the flags, as both forms take them (one process:
    :func:`~fi_engine.serve.openai_server.serve`; ``--api-servers N``: :func:`_serve_api_servers`): the address, the
    grace and log level, what ``/v1/models`` shows (``engine``'s longest request, the weights' ``quantization``),
    the key, the origins, the body limit (left out where not given: the server's default) and the adapters of
    ``lora`` loaded at start."""
    options = dict(
        host=args.host,
        port=args.port,
        max_model_len=getattr(engine, "max_seq_len", None),
        graceful_s=args.grace,
        log_level=args.log_level,
        quantization=quantization,
        api_key=args.api_key,
        allowed_origins=args.allowed_origins,
        lora_modules=_adapter_names(lora),
    )
    if args.max_request_bytes is not None:
        options["max_request_bytes"] = args.max_request_bytes
    return options


def _adapter_names(lora: dict[str, Any] | None) -> list[str] | None:
    """The names of the adapters ``serve`` loads at start (the engine's ``lora`` argument; None: no LoRA)."""
    return None if lora is None else [name for name, _ in lora["modules"]]


def _adapters_line(lora: dict[str, Any]) -> str:
    """The start-up line's LoRA part: the adapters served, the slots and rank, and whether they change at run time."""
    from .serve.lora_api import RUNTIME_LORA_ENV, runtime_lora_allowed

    names = ", ".join(name for name, _ in lora["modules"]) or "none yet"
    runtime = "loaded at run time too" if runtime_lora_allowed() else f"fixed ({RUNTIME_LORA_ENV} unset)"
    return f"{names} ({lora['max_loras']} on the GPU, rank up to {lora['max_lora_rank']}, {runtime})"


def _quantized_weights(model: str) -> Any:
    """The layout of the checkpoint's quantized weights as its family's config reader finds it (an ``Fp8Scheme`` or
    ``Int4Scheme`` of :mod:`fi_engine.checkpoint.quantization`, or gpt-oss's ``Mxfp4Scheme``, which ``describe()``
    themselves), or None for 16-bit weights; ValueError for a config the family refuses."""
    from .checkpoint.quantization import Fp8Scheme
    from .models.registry import read_config
    from .runtime.worker.model_runner import ModelRunner

    config = read_config(model)
    scheme = getattr(config, "int4", None) or getattr(config, "fp8", None)
    moe = getattr(config, "moe", None)
    if moe is not None and isinstance(scheme, Fp8Scheme):  # FP8 experts of shapes the grouped GEMV cannot read
        scheme = scheme.experts_for(config.hidden_size, moe.intermediate_size)
        if not ModelRunner.fp8_experts_as_stored:  # the engines' switch: dequantized at load
            scheme = scheme.experts_dequantized()
    if scheme is None:  # gpt-oss reads its MXFP4 experts per tensor: the config.json the reader accepted says so
        from .checkpoint.config import read_config_json
        from .checkpoint.mxfp4_weights import mxfp4_scheme

        scheme = mxfp4_scheme(read_config_json(model)[0].get("quantization_config"))
        from .models.gpt_oss import GptOss

        if scheme is not None and moe is not None:  # kept as stored where the switch is on and the GEMV fits
            scheme = GptOss.experts_scheme(scheme, config.hidden_size, moe.intermediate_size)
    return scheme


def _serve_api_servers(
    args: argparse.Namespace,
    engine: Any,
    names: list[str],
    settings: str,
    options: dict[str, Any],
) -> int:
    """``serve --api-servers N`` (N > 1): N front-end processes over ``engine`` (fi_engine.serve.api_servers) until
    SIGINT/SIGTERM, each serving with the server ``options`` (:func:`_server_options`: the adapters loaded at start
    among them); 1 when a front end failed (named on stderr), 2 for an address that cannot be bound."""
    from .serve.api_servers import serve_api_servers

    where = f"{PROG} serve"

    def ready(port: int, pids: list[int]) -> None:
        print(
            f"{where}: serving {', '.join(names)} on http://{args.host}:{port} ({args.api_servers} API servers, "
            f"{settings})",
            file=sys.stderr,
            flush=True,
        )

    with engine:
        try:
            serve_api_servers(engine, args.model, names, max_queue=args.max_queue, ready=ready, **options)
        except ValueError as exc:  # the address cannot be bound
            print(f"{where}: {exc}", file=sys.stderr)
            return 2
        except RuntimeError as exc:  # a front end failed or died
            print(f"{where}: {exc}", file=sys.stderr)
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    watched = _WatchedStdout(sys.stdout)
    sys.stdout = watched
    try:
        return _main(argv, watched)
    finally:
        if sys.stdout is watched:
            sys.stdout = watched.stream


def _main(argv: Sequence[str] | None, watched: _WatchedStdout) -> int:
    command = PROG
    try:
        try:
            args, unknown = build_parser().parse_known_args(argv)
            if unknown:  # argparse leaves them to the top-level parser, whose usage names no option of the command
                args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
        except SystemExit as exc:  # --help, usage errors: argparse printed and asked to exit
            sys.stdout.flush()
            if watched.error is not None:  # argparse swallows a failed write of --help: raise it again here
                raise watched.error from None
            return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
        command = f"{PROG} {args.command}"
        args.model = _model_of(args)
        _apply_verbosity(getattr(args, "quiet", False), getattr(args, "verbose", 0))
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what `generate --tp N` restarts as its ranks
        status = int(args.func(args))
        sys.stdout.flush()
        return status
    except FiFFIError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not watched.failed:
            raise  # not our output: a real error of the command's own
        _silence_stdout()
        print(
            f"{command}: cannot write the output to stdout: {exc.strerror or exc}; send it to a file or device with "
            f"room (is the disk full?)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _apply_verbosity(quiet: bool, verbose: int) -> None:
    """``-q``: no progress bars or ``fi_ffi:`` progress lines (``FI_FFI_QUIET=1`` for this process and the ranks
    it starts); ``-v``/``-vv``: fi_ffi's loader log at INFO/DEBUG on stderr."""
    import logging

    if quiet:
        os.environ["FI_FFI_QUIET"] = "1"
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fi_ffi: %(message)s"))
        logger = logging.getLogger("fi_ffi")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
