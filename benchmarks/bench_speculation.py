"""Decode with speculative decoding on and off (``Engine.speculative_tokens``), batch 1 and 8: by prompt lookup,
or by a draft model (``--draft-model DIR``, or ``--draft-layers N``: the target's own first ``N`` layers, written
beside it, as a draft that reads fewer bytes a token; its agreement with the full model is what it is).

    python3 benchmarks/bench_llama_tp.py --make /tmp/llama8b             # a random 8B-shaped checkpoint (~1.3 GB)
    python3 benchmarks/bench_speculation.py --model /tmp/llama8b [--batches 1,8] [--k 4] [--new 256] [--rounds 2]
    python3 benchmarks/bench_speculation.py --model /tmp/smollm2 --text   # a trained chat model (see --text below)

Two kinds of prompt, 256 tokens each: ``repeating`` (a random block of 64 token ids four times: prompt lookup finds
its continuation wherever the model repeats it) and ``random`` (random ids). Each batch generates ``--new`` tokens per
prompt with ``generate`` (greedy, no end-of-sequence, the decode graph), speculation off (the pipelined decode loop)
and on with ``--k`` draft tokens, in turn, ``--rounds`` times. Reported: tokens per second of decode, and with
speculation its passes, the draft tokens' acceptance rate and the tokens each pass gave per request. What the
tokens are is the model's: on a random checkpoint the acceptance depends on what its greedy text happens to repeat,
so the rows also give the cost of a verifying pass against a decode step (tokens/s per token a pass gives).

``--temperature T``: the requests sample at ``T`` (speculative sampling: each row of a pass drawn from the request's
distribution) instead of greedy.

``--text`` (a trained model with a chat template, e.g. one tools/checkpoint_from_gguf.py wrote): the prompts are chat
requests instead, ``repeating`` ones that ask to quote a passage, to rename a parameter in a function, or to quote a
passage's first sentences and summarize it (the answer repeats its prompt), and ``open`` ones that ask for a story
(it does not); the answers run to their end of sequence or ``--new`` tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PASSAGES = (
    "The harbour town woke slowly. Fishing boats rocked against the pier while gulls argued over the morning catch. "
    "At the bakery on the corner, the first loaves came out of the oven, and the smell drifted down to the water. "
    "By seven, the market square was full of carts, and the old clock above the town hall struck the hour.",
    "A good experiment starts with a clear question. Write down what you expect to happen and why, then change one "
    "thing at a time and measure the result. Keep every number, even the ones that surprise you, because the "
    "surprises are usually where the interesting behaviour hides. Finally, repeat the run to see how much it varies.",
    "The library closed at nine, but the reading room stayed lit for the night staff. They sorted returned books, "
    "repaired torn covers and replaced the labels that had faded in the sun. Once a month they also checked the "
    "catalogue against the shelves, walking the rows with a list and a pencil, one section at a time.",
)
CODE = "\n".join(
    (
        "def moving_average(x, window):",
        "    total = 0.0",
        "    out = []",
        "    for i in range(len(x)):",
        "        total += x[i]",
        "        if i >= window:",
        "            total -= x[i - window]",
        "        out.append(total / min(i + 1, window))",
        "    return out",
    )
)
TASKS = (
    "Repeat the following paragraph exactly, word for word:\n\n{passage}",
    "Here is a Python function. Rewrite it with the parameter `x` renamed to `values`, changing nothing else:\n\n"
    "```python\n" + CODE.replace("{", "{{").replace("}", "}}") + "\n```",
    "Quote the first two sentences of this text exactly, then summarize the rest in one sentence:\n\n{passage}",
)
STORIES = ("a dragon who is afraid of heights", "a robot learning to cook", "two friends lost in a forest")


def text_prompts(model: Path, kind: str, batch: int) -> tuple[list[list[int]], tuple[int, ...]]:
    """``batch`` chat prompts of ``kind`` (``repeating`` or ``open``) for the checkpoint's chat template, and its
    end-of-sequence ids."""
    from fi_engine.text.codec import TextCodec

    codec = TextCodec.from_dir(model)
    prompts = []
    for i in range(batch):
        if kind == "repeating":
            ask = TASKS[i % len(TASKS)].format(passage=PASSAGES[i % len(PASSAGES)])
        else:
            ask = f"Write a short story about {STORIES[i % len(STORIES)]}."
        prompts.append(codec.encode_chat([{"role": "user", "content": ask}]))
    return prompts, tuple(codec.eos_token_ids)


def _layer(name: str) -> int | None:
    """The decoder layer a tensor name belongs to (``model.layers.N.``), or None."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def copy_checkpoint(
    source: Path,
    folder: Path,
    keep: Callable[[str], bool] = lambda name: True,
    zero: Callable[[str], bool] = lambda name: False,
    **config: Any,
) -> Path:
    """A copy of the checkpoint ``source`` in ``folder``: the tensors whose names ``keep`` selects, byte for byte as
    stored (tensors that share bytes in the source share them in the copy), those ``zero`` selects as zeros (one
    block per dtype and shape); ``config.json`` with ``config``'s keys set, and the tokenizer files beside."""
    from fi_engine.checkpoint.safetensors import DTYPES, read_header

    codes = {name: code for code, (name, _) in DTYPES.items()}
    # where the copy's bytes come from (a file and offset, or zeros of a dtype and shape) -> (offset in the copy,
    # size, the file or None for zeros, the offset there)
    chunks: dict[tuple[Any, ...], tuple[int, int, Path | None, int]] = {}
    header: dict[str, dict[str, Any]] = {}
    for path in sorted(source.glob("*.safetensors")):
        for name, info in read_header(path).items():
            if not keep(name):
                continue
            silent = zero(name)
            key = ("zeros", info.dtype, info.shape) if silent else (info.path, info.offset)
            if key not in chunks:
                at = sum(chunk[1] for chunk in chunks.values())
                chunks[key] = (at, info.nbytes, None if silent else info.path, info.offset)
            at, size = chunks[key][:2]
            header[name] = {"dtype": codes[info.dtype], "shape": list(info.shape), "data_offsets": [at, at + size]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "model.safetensors").open("wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for _, size, origin, offset in chunks.values():  # (in the order of their offsets in the copy)
            if origin is None:
                out.write(bytes(size))
                continue
            with origin.open("rb") as f:
                f.seek(offset)
                out.write(f.read(size))
    settings = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, **config}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (source / name).is_file():
            (folder / name).write_bytes((source / name).read_bytes())
    return folder


def first_layers(source: Path, folder: Path, layers: int) -> Path:
    """A copy of the checkpoint ``source`` with only its first ``layers`` decoder layers (the embedding, final norm
    and head kept; ``num_hidden_layers`` set), written into ``folder`` byte for byte (:func:`copy_checkpoint`)."""

    def kept(name: str) -> bool:
        n = _layer(name)
        return n is None or n < layers

    return copy_checkpoint(source, folder, keep=kept, num_hidden_layers=layers)


def silent_after(source: Path, folder: Path, live: int) -> Path:
    """A copy of the checkpoint ``source`` whose layers from ``live`` on add nothing to the residual stream (their
    ``o_proj`` and ``down_proj`` zero): it computes what its first ``live`` layers compute, at the cost of all of them.
    With ``--draft-layers live`` its draft then agrees with it (up to the kernels' rounding): the speed of a draft
    model whose drafts are accepted, at its cost."""

    def silenced(name: str) -> bool:
        n = _layer(name)
        return n is not None and n >= live and name.split(".")[-2] in ("o_proj", "down_proj")

    return copy_checkpoint(source, folder, zero=silenced)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint of the Llama family")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per pass")
    parser.add_argument("--new", type=int, default=256, help="tokens generated per prompt")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--text", action="store_true", help="chat prompts for a trained model (see above)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (0: greedy)")
    parser.add_argument("--ignore-eos", action="store_true", help="--text: every answer runs to --new tokens")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    parser.add_argument("--draft-model", type=Path, help="speculate with this draft model (same tokenizer)")
    parser.add_argument("--draft-layers", type=int, help="speculate with the target's first N layers as the draft")
    parser.add_argument(
        "--silent-after", type=int, help="serve a copy of --model whose layers from N on add nothing (see silent_after)"
    )
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    from fi_engine.models.registry import open_engine
    from fi_engine.runtime.sampling_params import SamplingParams

    sampling = SamplingParams(temperature=args.temperature) if args.temperature else None

    if args.silent_after:
        args.model = silent_after(
            args.model, args.model.with_name(args.model.name + f"-silent{args.silent_after}"), args.silent_after
        )
    draft = args.draft_model
    if args.draft_layers:
        draft = first_layers(
            args.model, args.model.with_name(args.model.name + f"-first{args.draft_layers}"), args.draft_layers
        )
    speculation = None if draft is None else {"model": str(draft), "num_speculative_tokens": args.k}
    engine = open_engine(
        args.model,
        max_batch=max(batches),
        max_seq_len=256 + args.new + 16,
        cuda_graph=True,
        speculative_config=speculation,
    )
    if draft is not None:
        print(f"draft model: {draft} ({engine.draft_model.config.num_layers} layers)", flush=True)
    rng = np.random.default_rng(0)
    vocab = engine.config.vocab_size
    rows = []
    with engine:
        for kind in ("repeating", "open" if args.text else "random"):
            for batch in batches:
                eos: tuple[int, ...] = ()
                if args.text:
                    prompts, eos = text_prompts(args.model, kind, batch)
                    eos = () if args.ignore_eos else eos
                elif kind == "repeating":
                    prompts = [rng.integers(100, vocab, 64).tolist() * 4 for _ in range(batch)]
                else:
                    prompts = [rng.integers(100, vocab, 256).tolist() for _ in range(batch)]
                for r in range(args.rounds + 1):  # the first round warms up (graph captures), not reported
                    for k in (0, args.k):
                        engine.speculative_tokens = k
                        before = dict(vars(engine.speculation_stats))
                        t = time.perf_counter()
                        out = engine.generate(prompts, args.new, eos_token_ids=eos, sampling=sampling)
                        wall = time.perf_counter() - t
                        stats = {n: v - before[n] for n, v in vars(engine.speculation_stats).items()}
                        if r == 0:
                            continue
                        row = {
                            "kind": kind,
                            "draft": "prompt lookup" if draft is None else str(draft),
                            "temperature": args.temperature,
                            "batch": batch,
                            "k": k,
                            "round": r,
                            "decode_tokens_per_s": out.tokens_per_s,
                            "wall_s": wall,
                            **stats,
                            "acceptance": stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0,
                            "tokens_per_pass": stats["tokens"] / stats["passes"] / batch if stats["passes"] else 0.0,
                        }
                        rows.append(row)
                        extra = (
                            f", {row['passes']} passes, acceptance {row['acceptance']:.2f}, "
                            f"{row['tokens_per_pass']:.2f} tokens a pass and request"
                            if k
                            else ""
                        )
                        print(
                            f"round {r} {kind} batch {batch} speculation {k or 'off'}: "
                            f"{row['decode_tokens_per_s']:.1f} tokens/s{extra}",
                            flush=True,
                        )
                engine.speculative_tokens = 0
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
