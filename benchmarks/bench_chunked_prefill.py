"""Streams decoding while long prompts arrive, on the engine's step API, with chunked prefill on and off
(``Engine.chunked_prefill``).

    python3 benchmarks/bench_llama_tp.py --make /tmp/llama8b             # a random 8B-shaped checkpoint (~1.3 GB)
    python3 benchmarks/bench_chunked_prefill.py --model /tmp/llama8b [--streams 32] [--decode 256] [--long 8192]
                                                [--long-prompts 4] [--every 40] [--chunks 512,1024] [--json PATH]

``--streams`` requests of a short prompt decode ``--decode`` tokens each (greedy, no end-of-sequence), started
together; once they all decode, a prompt of ``--long`` random token ids arrives every ``--every`` decode steps,
``--long-prompts`` of them, each asking 16 tokens. The engine is stepped as ``fi-engine serve`` steps it
(``open_engine``: overlapped steps, mixed prefill passes, the decode graph). Runs, one engine, in turn: the streams
alone (the baseline), with the long prompts and chunked prefill off (each prompt one pass), and on with each of
``--chunks`` token rows a pass (``max_num_batched_tokens``). Reported per run: the streams' inter-token latency
(the time between two ``step()`` calls that give a stream tokens, over the tokens they gave) p50 / p99 in ms, the
long prompts' time to first token (p50), and the streams' tokens per second. No HTTP: the goal is the engine's (ITL
p99 with the long prompts within 2x of the baseline's).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def run(engine: Any, args: argparse.Namespace, long_prompts: int, chunk: int | None, seed: int) -> dict[str, Any]:
    """One load: the streams, and ``long_prompts`` long prompts; chunked prefill off (``chunk`` None) or at ``chunk``
    token rows a pass. Returns its figures."""
    engine.chunked_prefill = False
    if chunk is not None:
        engine.max_num_batched_tokens = chunk
        engine.chunked_prefill = True
    rng = np.random.default_rng(seed)
    vocab = engine.config.vocab_size
    streams = {engine.add_request(rng.integers(100, vocab, 64).tolist(), args.decode, eos_token_ids=()) for _ in
               range(args.streams)}  # fmt: skip
    last: dict[int, float] = {}
    itl: list[float] = []
    sent: dict[int, float] = {}
    ttft: list[float] = []
    tokens = 0
    steps = 0
    start = time.perf_counter()
    while engine.has_unfinished:
        decoding = len(last) == args.streams  # every stream has its first token
        if decoding and len(sent) < long_prompts and steps % args.every == 0:
            rid = engine.add_request(rng.integers(100, vocab, args.long).tolist(), 16, eos_token_ids=())
            sent[rid] = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        steps += decoding
        for o in outs:
            if o.rid in streams and o.token_ids:
                if o.rid in last:
                    itl += [(now - last[o.rid]) / len(o.token_ids)] * len(o.token_ids)
                last[o.rid] = now
                tokens += len(o.token_ids)
            elif o.rid in sent and o.token_ids and sent[o.rid] > 0:
                ttft.append(now - sent[o.rid])
                sent[o.rid] = 0.0  # (its first token only)
    wall = time.perf_counter() - start
    engine.chunked_prefill = False
    return {
        "long_prompts": long_prompts,
        "chunked_prefill": chunk,
        "itl_p50_ms": 1e3 * float(np.percentile(itl, 50)),
        "itl_p99_ms": 1e3 * float(np.percentile(itl, 99)),
        "itl_max_ms": 1e3 * float(np.max(itl)),
        "long_ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)) if ttft else None,
        "stream_tokens_per_s": tokens / wall,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint of the Llama family")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--decode", type=int, default=256, help="tokens each stream decodes")
    parser.add_argument("--long", type=int, default=8192, help="tokens of each long prompt")
    parser.add_argument("--long-prompts", type=int, default=4)
    parser.add_argument("--every", type=int, default=40, help="decode steps between two long prompts' arrivals")
    parser.add_argument("--chunks", default="512,1024", help="max_num_batched_tokens of the chunked runs")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args(argv)
    chunks = [int(c) for c in args.chunks.split(",")]

    from fi_engine.models.registry import open_engine

    engine = open_engine(
        args.model,
        overlap_steps=True,
        mixed_prefill=True,
        scheduler_delay_factor=0.0,
        max_batch=args.streams + args.long_prompts,
        max_seq_len=args.long + 32,
        max_prefill_tokens=args.long + args.streams + args.long_prompts,
        # the KV pages the load holds at most (16 tokens a page), not max_batch requests of max_seq_len tokens
        num_pages=1 + args.streams * -(-(64 + args.decode) // 16) + args.long_prompts * -(-(args.long + 16) // 16),
        cuda_graph=True,
    )
    rows = []
    with engine:
        # warm-up: every shape the runs meet captured (the graphs of a prefill bucket are captured when first met)
        warm = argparse.Namespace(**{**vars(args), "decode": 24, "every": 4})
        for chunk in (None, *chunks):
            run(engine, warm, args.long_prompts, chunk, seed=0)
        for r in range(args.rounds):
            loads = [(0, None), (args.long_prompts, None), *((args.long_prompts, c) for c in chunks)]
            for long_prompts, chunk in loads:
                row = run(engine, args, long_prompts, chunk, seed=1 + r)
                rows.append(row)
                what = "streams alone" if not long_prompts else f"chunked prefill {chunk or 'off'}"
                ttft = row["long_ttft_p50_ms"]
                print(
                    f"round {r + 1} {what}: ITL p50 {row['itl_p50_ms']:.1f} ms, p99 {row['itl_p99_ms']:.1f} ms, "
                    f"max {row['itl_max_ms']:.1f} ms; long prompts' TTFT p50 "
                    f"{'-' if ttft is None else f'{ttft:.0f} ms'}; {row['stream_tokens_per_s']:.0f} stream tokens/s",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
