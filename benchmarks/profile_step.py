"""Where a replayed decode step's GPU time goes: every kernel of the engine's decode CUDA graph, with its time, and
the idle time between kernels (per-kernel time from a profile of one replayed step).

    bash tools/gpu_run.sh python3 benchmarks/profile_step.py --model DIR [--batch 1] [--steps 20] [--moe-path auto]

The engine of ``DIR`` (any checkpoint ``fi_engine.models.registry.open_engine`` serves; ``max_batch`` = ``--batch``,
CUDA graph) generates a few tokens once (graphs captured, kernels loaded), then replays the decode graph of ``--batch``
rows ``--steps`` times back to back under torch's profiler (CUPTI: the kernels inside a graph are recorded one by one).
Printed per kernel name: launches per step, microseconds per step and per launch, and the exclusive time per step: the
part of each launch's time after every earlier kernel had ended (a kernel launched with programmatic dependent launch
starts while its predecessor drains and waits for it, so its own duration counts that overlap twice; the exclusive times
and the idle time add up to the step); then per step the span from the first kernel's start to the last one's end and
the idle time in it (no kernel running: launch gaps and the graph's own dependencies). Needs a GPU, CuPy and torch (only
for its profiler: the engine does not use torch). Not a test: nothing is asserted.

``--sequence FIRST:COUNT`` also prints COUNT kernels of the replayed step from position FIRST, in launch order, each
with its median duration, exclusive time and start against the end of the kernels before it: one layer's launches
one by one (the O and down projections share a kernel name; their positions tell them apart).

The replay's attention is not a live step's: after ``generate`` the graph's index arrays and plan are those of the
last step staged (likely padding rows of one token each, every request having ended): on an H200 at 32 rows the
decode kernel took 3.5 us a layer replayed against 9.8-15.5 us in the live steps before it (contexts of 33-64
tokens). ``--generate`` times the live steps; the GEMMs' times do not depend on it.

``--generate N`` profiles a whole ``generate`` of ``N`` new tokens instead (after a warm-up call of the same shape):
its decode wall time as the engine counts it against the time some kernel ran in it, and the largest idle gaps
with the kernels on either side: where a generated step's time goes that a replayed graph does not show (the
host's preparation of each step, copies, waits between steps).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def short_name(name: str) -> str:
    """A kernel's name without template arguments and parameter lists (one row per kernel family)."""
    while "<" in name:
        reduced = re.sub(r"<[^<>]*>", "", name)
        if reduced == name:
            break
        name = reduced
    name = re.sub(r"\(.*", "", name)
    name = name.replace("void ", "").strip()
    return name[:90]


def kernel_events(prof: Any) -> list[tuple[str, float, float]]:
    """``(name, start_us, duration_us)`` of every GPU kernel the profiler recorded, in start order."""
    events = []
    for e in prof.events():
        if getattr(e, "device_type", None) is None or "CUDA" not in str(e.device_type):
            continue
        if "memcpy" in e.name.lower() or "memset" in e.name.lower():
            continue
        start = e.time_range.start
        events.append((e.name, float(start), float(e.time_range.end - start)))
    events.sort(key=lambda x: x[1])
    return events


@contextmanager
def engine_and_prompts(model: str, batch: int, moe_path: str | None) -> Iterator[tuple[Any, list[list[int]]]]:
    """The engine of ``model`` (``max_batch`` = ``batch``, CUDA graph) and ``batch`` random 32-token prompts."""
    import numpy as np

    from fi_engine.models.registry import open_engine

    kwargs: dict[str, Any] = {"max_batch": batch, "cuda_graph": True, "max_seq_len": 512}
    if moe_path:
        kwargs["moe_path"] = moe_path
    rng = np.random.default_rng(0)
    with open_engine(model, **kwargs) as engine:
        vocab = engine.config.vocab_size
        yield engine, [rng.integers(3, min(vocab, 30000), size=32).tolist() for _ in range(batch)]


def kernel_sequence(events: list[tuple[str, float, float]], n: int, steps: int, first: int, count: int) -> None:
    """Print kernels ``first`` .. ``first + count - 1`` of the replayed step in launch order, each with its median
    over the steps of: its duration, its exclusive time (as in the table) and its start relative to the end of
    every kernel before it (negative: it started while an earlier one ran, as programmatic dependent launch allows;
    positive: the GPU idled that long before it). Where one kernel name serves several weights (the O and down
    projections run the same GEMV), the positions tell them apart."""

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    print(f"{'#':>4} {'kernel':60s} {'us':>8s} {'excl us':>8s} {'start after prev end us':>24s}")
    for pos in range(first, min(first + count, n)):
        durations, exclusives, starts = [], [], []
        for s in range(steps):
            chunk = events[s * n : (s + 1) * n]
            if len(chunk) < n:
                break
            ended = max((st + d for _, st, d in chunk[:pos]), default=chunk[0][1])
            _, start, dur = chunk[pos]
            durations.append(dur)
            exclusives.append(max(0.0, start + dur - max(start, ended)))
            starts.append(start - ended)
        if durations:
            name = short_name(chunk[pos][0])[:60]
            print(f"{pos:4d} {name:60s} {median(durations):8.2f} {median(exclusives):8.2f} {median(starts):24.2f}")


def profile(
    model: str, batch: int, steps: int, moe_path: str | None, sequence: tuple[int, int] = (0, 0)
) -> dict[str, Any]:
    import cupy as cp
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with engine_and_prompts(model, batch, moe_path) as (engine, prompts):
        engine.generate(prompts, 8, eos_token_ids=())
        rows = min(b for b in engine.runner.graphs if b >= batch)
        graph = engine.runner.step_graphs.planned_graph(rows)  # (the one the last step's plan replays: its kernel)
        with cp.cuda.Device(engine.device), engine.stream:
            for _ in range(3):
                graph.launch()
            engine.stream.synchronize()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    graph.launch()
                engine.stream.synchronize()
    events = kernel_events(prof)
    if not events:
        raise SystemExit("the profiler recorded no kernel (CUPTI unavailable?)")
    per_step = len(events) / steps
    if per_step != int(per_step):
        print(f"note: {len(events)} kernels over {steps} replays is not a whole number per replay")
    n = int(per_step)
    spans, busy = [], []
    for s in range(steps):
        chunk = events[s * n : (s + 1) * n]
        if not chunk:
            break
        spans.append(chunk[-1][1] + chunk[-1][2] - chunk[0][1])
        busy.append(sum(d for _, _, d in chunk))
    by_name: dict[str, list[float]] = defaultdict(list)
    exclusive: dict[str, float] = defaultdict(float)
    idle = 0.0
    for s in range(steps):
        chunk = events[s * n : (s + 1) * n]
        ended = chunk[0][1] if chunk else 0.0
        for name, start, dur in chunk:
            idle += max(0.0, start - ended)
            exclusive[short_name(name)] += max(0.0, start + dur - max(start, ended))
            ended = max(ended, start + dur)
    for name, _, dur in events:
        by_name[short_name(name)].append(dur)
    table = sorted(
        (
            (name, len(d) / steps, sum(d) / steps, sum(d) / len(d), exclusive[name] / steps)
            for name, d in by_name.items()
        ),
        key=lambda row: -row[4],
    )
    span, work = sorted(spans)[len(spans) // 2], sorted(busy)[len(busy) // 2]
    print(f"{model}: batch {batch} (graph of {rows} rows), {n} kernels per replayed step, median of {len(spans)}")
    print(f"{'kernel':80s} {'per step':>8s} {'us/step':>9s} {'us/launch':>9s} {'exclusive us/step':>17s}")
    for name, count, total, mean, excl in table:
        print(f"{name[:80]:80s} {count:8.1f} {total:9.1f} {mean:9.2f} {excl:17.1f}")
    print(f"step span {span:.1f} us (median); mean idle between kernels {idle / steps:.1f} us per step "
          f"({100 * idle / steps / span:.1f} %, {idle / steps / max(n - 1, 1):.2f} us per boundary)")  # fmt: skip
    if sequence[1]:
        kernel_sequence(events, n, steps, *sequence)
    return {
        "model": model,
        "batch": batch,
        "graph_rows": rows,
        "kernels_per_step": n,
        "span_us": span,
        "busy_us": work,
        "idle_us": idle / steps,
        "kernels": [
            {"name": a, "per_step": b, "us_per_step": c, "us_per_launch": d, "exclusive_us_per_step": e}
            for a, b, c, d, e in table
        ],
    }


def union_busy(events: list[tuple[str, float, float]], start: float, end: float) -> float:
    """Microseconds of ``[start, end]`` in which at least one of ``events`` ran (overlaps counted once)."""
    busy, reach = 0.0, start
    for _, s, d in events:
        lo, hi = max(s, reach), min(s + d, end)
        if hi > lo:
            busy += hi - lo
        reach = max(reach, min(s + d, end))
    return busy


def profile_generate(model: str, batch: int, new_tokens: int, moe_path: str | None) -> dict[str, Any]:
    """A whole ``generate`` of ``batch`` prompts under the profiler: decode wall time against kernel time."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with engine_and_prompts(model, batch, moe_path) as (engine, prompts):
        engine.generate(prompts, new_tokens, eos_token_ids=())  # warm-up: graphs captured, kernels loaded
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            result = engine.generate(prompts, new_tokens, eos_token_ids=())
    events = kernel_events(prof)
    if not events:
        raise SystemExit("the profiler recorded no kernel (CUPTI unavailable?)")
    first, last = events[0][1], events[-1][1] + events[-1][2]
    gaps = []
    ended, before = first, events[0][0]
    for name, s, d in events:
        if s > ended:
            gaps.append((s - ended, short_name(before), short_name(name)))
        if s + d >= ended:
            ended, before = s + d, name
    gaps.sort(reverse=True)
    span = last - first
    busy = union_busy(events, first, last)
    decode_us = result.decode_s * 1e6
    steps = max(1, result.decode_steps)
    print(
        f"{model}: generate batch {batch}, {new_tokens} new tokens: decode {decode_us / steps:.1f} us per step "
        f"({result.decode_steps} steps, {result.tokens_per_s:.1f} tokens/s), prefill {result.prefill_s * 1e3:.1f} ms"
    )
    print(f"kernels from first to last: {span:.0f} us, some kernel running {busy:.0f} us ({100 * busy / span:.1f} %), "
          f"idle {span - busy:.0f} us = {(span - busy) / steps:.1f} us per decode step")  # fmt: skip
    print(f"{'gap us':>9}  after -> before")
    for g, a, b in gaps[:15]:
        print(f"{g:9.1f}  {a[:60]} -> {b[:60]}")
    big = [g for g, _, _ in gaps if g > 20.0]
    print(f"gaps over 20 us: {len(big)}, {sum(big):.0f} us in all")
    # each kernel's time per decode step, to set beside a replayed step's table (prefill kernels included)
    per_name: dict[str, float] = defaultdict(float)
    for name, _, d in events:
        per_name[short_name(name)] += d
    print(f"{'kernel':80s} {'us per decode step':>18s}")
    for name, total in sorted(per_name.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{name[:80]:80s} {total / steps:18.1f}")
    return {"model": model, "batch": batch, "new_tokens": new_tokens, "decode_us_per_step": decode_us / steps,
            "span_us": span, "busy_us": busy, "gaps_top": gaps[:30]}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--batch", type=int, nargs="*", default=[1])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--moe-path", default=None, help="LlamaEngine moe_path (auto, routed, dense); default: its own")
    ap.add_argument("--generate", type=int, default=0, help="profile a whole generate of N new tokens instead")
    ap.add_argument("--json", default="", help="write the rows to this file")
    ap.add_argument(
        "--sequence", default="", metavar="FIRST:COUNT", help="also print COUNT kernels of the step from FIRST in order"
    )
    a = ap.parse_args()
    first, _, count = a.sequence.partition(":")
    sequence = (int(first or 0), int(count or 0))
    if a.generate:
        rows = [profile_generate(a.model, b, a.generate, a.moe_path) for b in a.batch]
    else:
        rows = [profile(a.model, b, a.steps, a.moe_path, sequence) for b in a.batch]
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
