"""Decode with speculative decoding by prompt lookup on and off (``ServingLoop.speculative_tokens``), batch 1 and 8.

    python3 benchmarks/bench_llama_tp.py --make /tmp/llama8b             # a random 8B-shaped checkpoint (~1.3 GB)
    python3 benchmarks/bench_speculation.py --model /tmp/llama8b [--batches 1,8] [--k 4] [--new 256] [--rounds 2]

Two kinds of prompt, 256 tokens each: ``repeating`` (a random block of 64 token ids four times: prompt lookup finds
its continuation wherever the model repeats it) and ``random`` (random ids). Each batch generates ``--new`` tokens per
prompt with ``generate`` (greedy, no end-of-sequence, the decode graph), speculation off (the pipelined decode loop)
and on with ``--k`` draft tokens, in turn, ``--rounds`` times. Reported: tokens per second of decode, and with
speculation its passes, the draft tokens' acceptance rate and the tokens each pass gave per request. What the
tokens are is the model's: on a random checkpoint the acceptance depends on what its greedy text happens to repeat,
so the rows also give the cost of a verifying pass against a decode step (tokens/s per token a pass gives).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint of the Llama family")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per pass")
    parser.add_argument("--new", type=int, default=256, help="tokens generated per prompt")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    from fi_engine.models.registry import open_engine

    engine = open_engine(args.model, max_batch=max(batches), max_seq_len=256 + args.new + 16, cuda_graph=True)
    rng = np.random.default_rng(0)
    vocab = engine.config.vocab_size
    rows = []
    with engine:
        for kind in ("repeating", "random"):
            for batch in batches:
                if kind == "repeating":
                    prompts = [rng.integers(100, vocab, 64).tolist() * 4 for _ in range(batch)]
                else:
                    prompts = [rng.integers(100, vocab, 256).tolist() for _ in range(batch)]
                for r in range(args.rounds + 1):  # the first round warms up (graph captures), not reported
                    for k in (0, args.k):
                        engine.speculative_tokens = k
                        before = dict(vars(engine.speculation_stats))
                        t = time.perf_counter()
                        out = engine.generate(prompts, args.new, eos_token_ids=())
                        wall = time.perf_counter() - t
                        stats = {n: v - before[n] for n, v in vars(engine.speculation_stats).items()}
                        if r == 0:
                            continue
                        row = {
                            "kind": kind,
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
