"""The host's share of a graph decode step: fi_engine on a random SmolLM2-135M-shaped checkpoint (30 layers, 576
wide, 9/3 heads of 64), decode as a CUDA graph at ``--batch`` (6 by default, the SmolLM2 check's), host us per
step (median; the wait for the GPU excluded), ms per step and tokens/s, with the next step planned ahead (the
default) and after the last one's tokens are back (``in-step``), interleaved over ``--rounds``. A small model's
step is short, so the host's share shows: the row that guards the goal of at most 80 us per step. ``--profile``
adds a cProfile of one generate call (the functions by own time). Not a test: nothing is asserted.

    bash tools/gpu_run.sh python3 benchmarks/bench_engine_host.py [--batch 6] [--new-tokens 64] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GOAL_HOST_US = 80.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    from bench_goals import SMOLLM2, make_checkpoint  # beside this file

    from fi_engine.models.llama import LlamaEngine

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, SMOLLM2["vocab_size"], 32).tolist() for _ in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(tmp), SMOLLM2)
        with LlamaEngine(tmp, max_batch=args.batch, max_seq_len=256, cuda_graph=True) as engine:
            ahead = engine.runner.prepare_ahead
            engine.generate(prompts, 4, eos_token_ids=())  # warm-up
            rows: dict[str, list[tuple[float, float, float]]] = {"ahead": [], "in-step": []}
            tokens: dict[str, list[list[int]]] = {}
            for _ in range(args.rounds):
                for name in rows:
                    engine.runner.prepare_ahead = ahead and name == "ahead"
                    r = engine.generate(prompts, args.new_tokens, eos_token_ids=())
                    rows[name].append((r.host_us_per_step, r.decode_s / max(1, r.decode_steps) * 1e3, r.tokens_per_s))
                    tokens[name] = r.tokens
            print(f"SmolLM2-shaped random checkpoint, graph, batch {args.batch}, {args.new_tokens} new tokens")
            print(f"{'host prep':>10} {'host us/step':>13} {'ms/step':>8} {'tokens/s':>9}  (median of {args.rounds})")
            for name, vals in rows.items():
                if not vals or (name == "ahead" and not ahead):
                    continue
                host, ms, tps = (float(np.median([v[i] for v in vals])) for i in range(3))
                goal = "met" if host <= GOAL_HOST_US else "missed"
                print(f"{name:>10} {host:>13.1f} {ms:>8.3f} {tps:>9.0f}  goal <= {GOAL_HOST_US:.0f} us: {goal}")
            if tokens.get("ahead") and tokens["ahead"] != tokens["in-step"]:
                print("tokens differ between the two ways of preparing a step")
            if args.profile:
                engine.runner.prepare_ahead = ahead
                prof = cProfile.Profile()
                prof.enable()
                engine.generate(prompts, args.new_tokens, eos_token_ids=())
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
                print(out.getvalue())


if __name__ == "__main__":
    main()
