"""CPU proxy of the step API's host time per decode step: ``Engine.step()`` of a graph engine with ``overlap_steps``
off (each step waited for), prefix caching on, ``--batch`` greedy requests decoding, run through the real serving
loop, scheduler, KV-cache manager, sampler and model runner host path (the step's arrays filled and staged ahead,
the graph replay, the tokens' copy out, the tokens recorded, the outputs made), with only the device stood in for: a
CuPy stand-in whose copies, events, stream and graphs do nothing, and a decode plan that does nothing (fi_ffi's plan
is timed by bench_step_cpu.py). Tokens are 0 (no end-of-sequence), so every request runs to ``--max-tokens``; the
steps that admit (their prefill stood in for) are not timed. No GPU is needed.

    python benchmarks/bench_serving_host_cpu.py [--before DIR] [--batch 64] [--steps 2000] [--rounds 5] [--profile N]

``--before DIR``: an older tree (its ``fi_engine`` and ``fi_ffi``, e.g. ``git archive <rev> fi_engine fi_ffi | tar -x
-C DIR``) timed in a subprocess in the same interleaved rounds. Prints, for each tree, the host us of a plain
``step()`` and of its serial part (``sync to launch``: from the wait for a step's tokens to the next step's graph
launch, what the GPU waits on), each round's median over its steps, the lowest round (other work on the machine
only adds).
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
# SmolLM2-135M's shape (bench_goals.SMOLLM2): what the per-step views describe
CONFIG = dict(num_qo_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576, intermediate_size=1536, vocab_size=49152)


# the host's serial part of a waited-for step: from the end of the wait for step n (its stream synchronized) to the
# launch of step n + 1's graph (the tokens recorded, the outputs made, the caller's loop, the next step() up to its
# launch): what the GPU waits on. The rest of the host's step (staging the step after) runs while the GPU computes.
_SYNCED: list[float] = []
_SERIAL: list[float] = []


class _Stream:
    ptr = 0

    def synchronize(self) -> None:
        _SYNCED[:] = [time.thread_time()]

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Event:
    def __init__(self, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _DeviceArray:
    """A stand-in device array: host memory of its own, its address as ``data.ptr``."""

    def __init__(self, n: int, dtype: Any = np.int32) -> None:
        self.host = np.zeros(max(1, int(np.prod(n))), dtype)
        self.data = SimpleNamespace(ptr=self.host.ctypes.data)
        self.itemsize = self.host.itemsize


class _Graph:
    def launch(self) -> None:
        if _SYNCED:
            _SERIAL.append(time.thread_time() - _SYNCED.pop())


def _cupy() -> SimpleNamespace:
    cuda = SimpleNamespace(
        alloc_pinned_memory=bytearray,
        Event=_Event,
        Device=lambda device: contextlib.nullcontext(),
        runtime=SimpleNamespace(memcpyAsync=lambda *args: None, memsetAsync=lambda *args: None),
    )
    return SimpleNamespace(cuda=cuda, zeros=lambda n, dtype: _DeviceArray(n, dtype))


class _Family:
    """The family's parts the step reads: a plan that does nothing (the Llama family's keeps its last plan where
    ``kv_indptr`` is the same, and otherwise calls fi_ffi's, which bench_step_cpu.py times)."""

    llama_pass = True

    def plan_decode(self, eng: Any, rows: int, cuda_graph: bool, kind: str | None = None) -> None:
        pass


def _assemble_runner(runner_cls: Any, batch: int, num_pages: int, new_tree: bool) -> Any:
    """A model runner without its constructor: its sizes, the CuPy stand-in, the real step buffers
    (``allocate_steps``), the stood-in decode graphs of every ladder size."""
    r = runner_cls.__new__(runner_cls)
    r.cupy = _cupy()
    r.config = SimpleNamespace(**CONFIG, rms_norm_eps=1e-5, eos_token_ids=())
    r.max_batch, r.num_pages, r.page_size, r.max_prefill_tokens = batch, num_pages, 16, 2048
    r.device, r.dtype, r.stream, r.stream_ptr = 0, "bfloat16", _Stream(), 0
    r.device_arrays = []
    r.comm = None
    r.vocab_shard = None
    r.family = _Family()
    c = CONFIG
    w = (c["num_qo_heads"] + 2 * c["num_kv_heads"]) * c["head_dim"]
    rows = 2048
    r.buffers = SimpleNamespace(
        h=_DeviceArray(rows * c["hidden_size"], np.float16),
        x=_DeviceArray(rows * c["hidden_size"], np.float16),
        qkv=_DeviceArray(rows * w, np.float16),
        attn=_DeviceArray(rows * c["num_qo_heads"] * c["head_dim"], np.float16),
        gu=_DeviceArray(rows * 2 * c["intermediate_size"], np.float16),
        act=_DeviceArray(rows * c["intermediate_size"], np.float16),
        logits=_DeviceArray(batch * 8, np.float32),  # (never read: the views only describe it)
        ids=_DeviceArray(batch, np.int32),
    )
    r.normed = _DeviceArray(rows * c["hidden_size"], np.float16)
    r.decode_plan = SimpleNamespace(info=None)
    if new_tree:
        from fi_engine.runtime.worker.graph_shapes import decode_batches
        from fi_engine.runtime.worker.step_graphs import StepGraphs

        r.lora = None
        r.allocate_steps()
        g = r.step_graphs = StepGraphs(r)
        g.graphs = {b: _Graph() for b in decode_batches(batch)}
        g.graph = g.graphs[batch]
        g._batches = tuple(g.graphs)
        g._plan_infos = {(b, None): None for b in g.graphs}
        g._plan_kinds = dict.fromkeys(g.graphs)  # (the stand-in plan has no kind: None at "capture" and every replay)
    else:
        from fi_engine.runtime.paging import decode_batches  # type: ignore[attr-defined]

        r.allocate_steps()
        r.graphs = {b: _Graph() for b in decode_batches(batch)}
        r.graph = r.graphs[batch]
        r._graph_batches = tuple(r.graphs)
        r._graph_plan_infos = dict.fromkeys(r.graphs)
        r._graphs_checked = set()
    r.prepare_ahead = True
    r.staged_wait_s = 0.0

    def run_prefill(rows: Any, riders_behind: int, graph_slots: Any, ahead: int, all_logits: bool = False, **kw: Any):
        # the prefill pass stood in for (admitting steps are not timed): one row per slot
        return None, max(q.slot for q in rows) + 1, None

    r.run_prefill = run_prefill
    return r


def _engine(batch: int) -> Any:
    """A Llama engine of this interpreter's tree without its constructor, over the assembled runner."""
    from fi_engine.models.llama import LlamaEngine

    new_tree = True
    try:
        from fi_engine.runtime.sample.logits_processing import LogitsProcessor
        from fi_engine.runtime.sample.sampler import Sampler
        from fi_engine.runtime.sched.kv_cache import KVCacheManager
        from fi_engine.runtime.sched.scheduler import Scheduler
        from fi_engine.runtime.worker.model_runner import ModelRunner
    except ImportError:
        new_tree = False
        from fi_engine.runtime.kv_cache import KVCacheManager  # type: ignore[no-redef]
        from fi_engine.runtime.logits_processing import LogitsProcessor  # type: ignore[no-redef]
        from fi_engine.runtime.model_runner import ModelRunner  # type: ignore[no-redef]
        from fi_engine.runtime.paging import Scheduler  # type: ignore[no-redef]
        from fi_engine.runtime.sampling import Sampler  # type: ignore[no-redef]

    num_pages = 1 + batch * 32
    runner = _assemble_runner(ModelRunner, batch, num_pages, new_tree)
    e = LlamaEngine.__new__(LlamaEngine)
    e._closed = False
    e.runner = runner
    e.kv_cache = KVCacheManager(num_pages, 16, enable_prefix_caching=True)
    e.scheduler = Scheduler(e.kv_cache, 16, batch, 512, 2048, CONFIG["vocab_size"], ())
    e.scheduler.prefix_caching = True
    kernels = SimpleNamespace(argmax=lambda *a: None, gather_rows=lambda *a: None)
    e.sampler = Sampler(
        runner.cupy, kernels, runner.buffers, device=0, stream_ptr=0, max_batch=batch, vocab_size=CONFIG["vocab_size"]
    )
    runner.sampler = e.sampler
    e.processor = LogitsProcessor(np, np.zeros((batch, 8), np.float32), CONFIG["vocab_size"], frozenset())
    e.model_dir = None
    if not new_tree:
        e._grammars = None
    e._start_loop()
    e._ffi_stream = contextlib.nullcontext()
    e.overlap_steps = False
    return e


def plain_steps_us(batch: int, steps: int, max_tokens: int, prompt_len: int, profile: int = 0) -> tuple[float, float]:
    """Median host us of a non-admitting ``step()`` over ``steps`` of them (each ended request replaced at once), and
    of the serial part (a step's synchronize to the next step's graph launch), in this thread's CPU time (the time
    other processes take the core is not counted; the median, not the mean: what they leave in the caches lands in
    a few steps)."""
    e = _engine(batch)
    rng = np.random.default_rng(1)
    times: list[float] = []
    prof = cProfile.Profile() if profile else None
    new = 0
    for _ in range(batch):
        e.add_request(rng.integers(100, 10000, prompt_len).tolist(), max_tokens, eos_token_ids=())
        new += 1
    while len(times) < steps:
        t = time.thread_time()
        if prof is not None and not new:
            prof.enable()
        outs = e.step()
        if prof is not None:
            prof.disable()
        dt = time.thread_time() - t
        if not new:
            times.append(dt)
        new = 0
        for o in outs:
            if o.finish_reason is not None:
                e.add_request(rng.integers(100, 10000, prompt_len).tolist(), max_tokens, eos_token_ids=())
                new += 1
    if prof is not None:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(profile)
    return 1e6 * statistics.median(times), 1e6 * statistics.median(_SERIAL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="an older tree (its fi_engine and fi_ffi) timed beside this one")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", type=int, default=0, help="a cProfile of this tree's plain steps: the N top")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a subprocess's single measurement
    args = ap.parse_args()
    if args.one:
        print(json.dumps(plain_steps_us(args.batch, args.steps, args.max_tokens, args.prompt_len, args.profile)))
        return
    trees = {"this": str(HERE.parent)}
    if args.before:
        trees["before"] = args.before
    figures: dict[str, list[list[float]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, root in trees.items():
            command = [sys.executable, __file__, "--one", "--batch", str(args.batch), "--steps", str(args.steps)]
            command += ["--max-tokens", str(args.max_tokens), "--prompt-len", str(args.prompt_len)]
            if args.profile and name == "this" and not figures[name]:
                command += ["--profile", str(args.profile)]
            env = dict(os.environ, PYTHONPATH=root)
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            if "--profile" in command:
                print(out.stderr, file=sys.stderr)
            figures[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"host us of a plain decode step() (CPU proxy): batch {args.batch}, graph, waited for, prefix cache on")
    print("the lowest round of each (other work on this machine only adds); each round the median of its steps")
    for i, part in enumerate(("step()", "sync to launch")):
        for name, rounds in figures.items():
            vals = [r[i] for r in rounds]
            print(f"{name + ' ' + part:>22} {min(vals):8.1f}   rounds {', '.join(f'{v:.1f}' for v in vals)}")
        if args.before:
            best = {name: min(r[i] for r in rounds) for name, rounds in figures.items()}
            print(f"{'this / before':>22} {best['this'] / best['before']:8.3f}")


if __name__ == "__main__":
    main()
