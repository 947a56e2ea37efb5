"""Multi-turn chat on the engine's step API, with automatic prefix caching on and off (``Engine.prefix_caching``).

    python3 benchmarks/bench_llama_tp.py --make /tmp/smollm2 --shape smollm2-135m --layers 30   # a random checkpoint
    python3 benchmarks/bench_prefix_cache.py --model /tmp/smollm2 [--clients 64] [--turns 3] [--system 1536]
                                             [--user 32] [--answer 32] [--rounds 2] [--json PATH]

Every client holds a conversation: a shared system prompt of ``--system`` random token ids, then ``--turns`` turns,
each a user message of ``--user`` ids and an answer of ``--answer`` tokens (greedy, no end-of-sequence); a turn's
prompt is the system prompt, every earlier message and answer, and its own message, as a chat server renders it.
The clients start together, each sending its next turn as soon as its answer is complete. The engine is stepped as
``fi-engine serve`` steps it (``open_engine``: overlapped steps, mixed prefill passes, the decode graph), once with
the prefix cache off and once on (``--rounds`` times in turn, one engine). Reported per run: time to first token
(from ``add_request`` to the ``step()`` that returns its first token) p50 / p99 in ms, answer tokens per second of
wall time, and the prefix cache's hit rate (prompt tokens found cached / looked up). No HTTP: the engine's side of
the goal (TTFT p50 at least 3x lower with the cache on); ``bench_serve.py`` measures the server.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def run(engine: Any, args: argparse.Namespace, on: bool, seed: int) -> dict[str, Any]:
    """One load of ``args.clients`` conversations with the prefix cache ``on``: the figures of its requests."""
    engine.prefix_caching = on
    rng = np.random.default_rng(seed)
    vocab = engine.config.vocab_size
    system = rng.integers(100, vocab, args.system).tolist()
    history = [list(system) for _ in range(args.clients)]
    turns_left = [args.turns] * args.clients
    owner: dict[int, int] = {}  # rid -> client
    sent: dict[int, float] = {}
    ttft: list[float] = []
    answers: dict[int, list[int]] = {}
    stats0 = (engine.prefix_cache_stats.queries, engine.prefix_cache_stats.hits)

    def send(client: int) -> None:
        history[client] += rng.integers(100, vocab, args.user).tolist()
        rid = engine.add_request(list(history[client]), args.answer, eos_token_ids=())
        owner[rid], sent[rid], answers[rid] = client, time.perf_counter(), []
        turns_left[client] -= 1

    start = time.perf_counter()
    for c in range(args.clients):
        send(c)
    tokens = 0
    while engine.has_unfinished:
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.token_ids and not answers[o.rid]:
                ttft.append(now - sent[o.rid])
            answers[o.rid].extend(o.token_ids)
            tokens += len(o.token_ids)
            if o.finish_reason is not None:
                client = owner[o.rid]
                history[client] += answers[o.rid]
                if turns_left[client]:
                    send(client)
    wall = time.perf_counter() - start
    queries = engine.prefix_cache_stats.queries - stats0[0]
    hits = engine.prefix_cache_stats.hits - stats0[1]
    engine.prefix_caching = False  # drops the cached pages: the next run starts cold
    return {
        "prefix_caching": on,
        "requests": len(ttft),
        "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)),
        "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
        "tokens_per_s": tokens / wall,
        "hit_rate": hits / queries if queries else 0.0,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint of the Llama family")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--system", type=int, default=1536, help="system prompt tokens, shared by every client")
    parser.add_argument("--user", type=int, default=32, help="tokens of each user message")
    parser.add_argument("--answer", type=int, default=32, help="tokens of each answer")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args(argv)

    from fi_engine.models.registry import open_engine

    longest = args.system + args.turns * (args.user + args.answer)
    engine = open_engine(
        args.model,
        overlap_steps=True,
        mixed_prefill=True,
        scheduler_delay_factor=0.0,
        max_batch=args.clients,
        max_seq_len=longest + 16,
        max_prefill_tokens=max(longest + 16, 4096),
        cuda_graph=True,
    )
    rows = []
    with engine:
        run(engine, argparse.Namespace(**{**vars(args), "clients": 4, "turns": 2}), True, seed=0)  # warm-up
        for r in range(args.rounds):
            for on in (False, True):
                row = run(engine, args, on, seed=1 + r)
                rows.append(row)
                print(
                    f"round {r + 1} prefix caching {'on ' if on else 'off'}: {row['requests']} requests, TTFT p50 "
                    f"{row['ttft_p50_ms']:.1f} ms, p99 {row['ttft_p99_ms']:.1f} ms, {row['tokens_per_s']:.0f} "
                    f"answer tokens/s, hit rate {row['hit_rate']:.2f}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
