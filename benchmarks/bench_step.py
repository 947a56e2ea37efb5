"""A decode step as a runtime issues it: one plan, then per layer an append and a run, with a cache per layer.

    python benchmarks/bench_step.py [--layers 32] [--steps 20] [--rounds 5] [--json PATH] [--profile N] [--batch1-only]
                                    [--floor]

Per step: one ``batch_decode_plan`` (host indptr / last-page arrays), then for each of ``--layers`` layers
``append_paged_kv_cache`` (one new token per request into that layer's own K/V cache) and
``batch_decode_run`` (that layer's q, caches and output). 32 query / 8 KV heads, head_dim 128, page 16, f16,
NHD. Two problems:

- batch 1, 16 cached tokens: the host is the bottleneck (host time per step);
- batch 32, ~1-2k cached tokens per request: the GPU is the bottleneck (wall time per step: the binding must add
  no GPU idle time).

Contenders, same caches, same modules, interleaved rounds (each round runs every contender's steps once, the
best round is kept; only ratios of one run mean anything):

- ``fi_ffi descriptors``: descriptors made once (what a runtime holds), a new plan every step;
- ``fi_ffi torch``: torch tensors passed to every call (no descriptors);
- ``fi_ffi cupy``: CuPy arrays (views of the same memory) passed to every call;
- ``packed descriptors`` / ``torch`` / ``cupy``: the step as a serving loop with fixed buffers issues it, one
  plan, then per layer an append packed once at set-up (``fi_ffi.prepare``) and the run packed once
  (``fi_ffi.prepare_decode_run(...).run(plan)``); packing reads each producer once, so the three should match;
- ``floor: frames packed once`` (``--floor``): descriptors, every append and run packed once into a frame of its
  own, a new plan every step whose handle is written into the run frames: the modules' own host work;
- ``flashinfer``: ``BatchDecodeWithPagedKVCacheWrapper`` planned with host indptr / last-page tensors, and
  ``flashinfer.page.append_paged_kv_cache``.

Every contender's last-layer output after one step is compared with fi_ffi's (they must be equal). Goals:
batch 1: descriptors <= 0.5x flashinfer, torch tensors <= 0.8x; batch 32: <= 1.02x.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from timing import append_args, decode_plan, decode_run_call, prepare_decode

HQ, HK, D, PAGE = 32, 8, 128, 16


def problem(torch: Any, batch: int, lengths: list[int], layers: int) -> dict[str, Any]:
    """Caches, q/out per layer, page tables (host and device) and the append indices for one step."""
    import numpy as np

    dev, dt = "cuda", torch.float16
    pages_per = [-(-n // PAGE) for n in lengths]
    total_pages = sum(pages_per)
    indptr = np.zeros(batch + 1, np.int32)
    indptr[1:] = np.cumsum(pages_per)
    last = np.array([n - (p - 1) * PAGE for n, p in zip(lengths, pages_per, strict=True)], np.int32)
    g = torch.Generator(device=dev).manual_seed(0)
    kv = [torch.randn(total_pages, 2, PAGE, HK, D, dtype=dt, device=dev, generator=g) * 0.5 for _ in range(layers)]
    q = [torch.randn(batch, HQ, D, dtype=dt, device=dev, generator=g) for _ in range(layers)]
    new_k = [torch.randn(batch, HK, D, dtype=dt, device=dev, generator=g) for _ in range(layers)]
    new_v = [torch.randn(batch, HK, D, dtype=dt, device=dev, generator=g) for _ in range(layers)]
    return {
        "batch": batch,
        "lengths": lengths,
        "layers": layers,
        "k": [c[:, 0] for c in kv],
        "v": [c[:, 1] for c in kv],
        "q": q,
        "new_k": new_k,
        "new_v": new_v,
        "out": [torch.empty_like(x) for x in q],
        "indptr_h": indptr,
        "last_h": last,
        "indptr": torch.from_numpy(indptr).to(dev),
        "indices": torch.arange(total_pages, dtype=torch.int32, device=dev),
        "last": torch.from_numpy(last).to(dev),
        # the token appended this step overwrites each request's last cached position (same work every step)
        "batch_indices": torch.arange(batch, dtype=torch.int32, device=dev),
        "positions": torch.tensor([n - 1 for n in lengths], dtype=torch.int32, device=dev),
    }


def fi_ffi_step(fi_ffi: Any, p: dict[str, Any], ws: Any, convert: Callable[[Any], Any]) -> Callable[[], None]:
    """One step with fi_ffi; ``convert`` maps a torch tensor to what is passed (descriptor, itself, CuPy)."""
    c = {
        k: [convert(t) for t in v]
        if isinstance(v, list) and v and hasattr(v[0], "data_ptr")
        else (convert(v) if hasattr(v, "data_ptr") else v)
        for k, v in p.items()
    }
    append = fi_ffi.append_paged_kv_cache
    layers = range(p["layers"])
    indptr_h, last_h = p["indptr_h"], p["last_h"]
    bi, pos, indices, indptr, last = c["batch_indices"], c["positions"], c["indices"], c["indptr"], c["last"]
    k, v, q, nk, nv, out = c["k"], c["v"], c["q"], c["new_k"], c["new_v"], c["out"]
    appends = [append_args(fi_ffi, nk[i], nv[i], bi, pos, k[i], v[i], indices, indptr, last) for i in layers]
    runs = [decode_run_call(fi_ffi, q[i], k[i], v[i], indptr, indices, last, out[i]) for i in layers]

    def step() -> None:
        plan = decode_plan(fi_ffi, ws, indptr_h, last_h, HQ, HK, D, PAGE)
        for i in layers:
            append(*appends[i])
            runs[i](plan)

    return step


def packed_step(fi_ffi: Any, p: dict[str, Any], ws: Any, convert: Callable[[Any], Any]) -> Callable[[], None]:
    """The step as a serving loop with fixed buffers issues it: one plan, then per layer the append packed once at
    set-up (``fi_ffi.prepare``) and the run packed once (``fi_ffi.prepare_decode_run``), given the step's plan.
    ``convert`` as :func:`fi_ffi_step`: packing reads each producer once, so the calls cost the same for all."""
    c = {
        k: [convert(t) for t in v]
        if isinstance(v, list) and v and hasattr(v[0], "data_ptr")
        else (convert(v) if hasattr(v, "data_ptr") else v)
        for k, v in p.items()
    }
    indptr_h, last_h = p["indptr_h"], p["last_h"]
    bi, pos, indices, indptr, last = c["batch_indices"], c["positions"], c["indices"], c["indptr"], c["last"]
    k, v, q, nk, nv, out = c["k"], c["v"], c["q"], c["new_k"], c["new_v"], c["out"]
    first = decode_plan(fi_ffi, ws, indptr_h, last_h, HQ, HK, D, PAGE)
    layers = [
        (
            fi_ffi.prepare(
                fi_ffi.append_paged_kv_cache,
                *append_args(fi_ffi, nk[i], nv[i], bi, pos, k[i], v[i], indices, indptr, last),
            ),
            prepare_decode(fi_ffi, q[i], k[i], v[i], indptr, indices, last, out[i], first),
        )
        for i in range(p["layers"])
    ]

    def step() -> None:
        plan = decode_plan(fi_ffi, ws, indptr_h, last_h, HQ, HK, D, PAGE)
        for append, run in layers:
            append()
            run.run(plan)

    return step


def floor_step(fi_ffi: Any, p: dict[str, Any], ws: Any) -> Callable[[], None]:
    """The same step with every append and run packed once into a frame of its own (descriptors): per layer two
    cffi calls of the modules' entry points and the plan's handle written, no op-layer work. What is left is
    the modules' own host work (argument checks in C++, the schedule read, the kernel launch): the floor under
    any binding that makes these calls one by one."""
    from fi_ffi.abi.frame import fail
    from fi_ffi.launch.launcher import LaunchFrame, _write_pointers
    from fi_ffi.ops import page

    d = {
        k: [fi_ffi.as_tensor(t) for t in v] if isinstance(v, list) and v and hasattr(v[0], "data_ptr") else v
        for k, v in p.items()
    }
    dev = {k: fi_ffi.as_tensor(p[k]) for k in ("batch_indices", "positions", "indices", "indptr", "last")}
    indptr_h, last_h = p["indptr_h"], p["last_h"]
    plan = decode_plan(fi_ffi, ws, indptr_h, last_h, HQ, HK, D, PAGE)
    s = plan._s

    def packed(launcher: Any, values: tuple[Any, ...], context: Any) -> Any:
        entry = launcher.bind()
        f = LaunchFrame(len(launcher.decl.params), len(launcher.tensor_index), entry.safe_call, entry.this)
        f, _, ptrs = launcher.slow(values, None, context, frame=f, remember=False)
        _write_pointers(f, launcher.decl, launcher.record_of, ptrs)
        return f

    frames = []
    for i in range(p["layers"]):
        append = packed(
            page._append.launcher,
            (
                d["new_k"][i],
                d["new_v"][i],
                dev["batch_indices"],
                dev["positions"],
                d["k"][i],
                d["v"][i],
                dev["indices"],
                dev["indptr"],
                dev["last"],
                0,
            ),
            None,
        )
        run = packed(
            s.run.launcher,
            (
                ws.float_buffer,
                ws.int_buffer,
                plan._info,
                d["q"][i],
                d["k"][i],
                d["v"][i],
                dev["indptr"],
                dev["indices"],
                dev["last"],
                d["out"][i],
                None,
                s.layout_code,
                s.window_left,
                False,
                None,
                s.logits_soft_cap,
                s.sm_scale,
                s.rope_rcp_scale,
                s.rope_rcp_theta,
            ),
            plan._context,
        )
        frames.append((append, run))
    info_word = 2 * [q.name for q in s.run.launcher.decl.params].index("plan_info_vec") + 1

    def step() -> None:
        plan = decode_plan(fi_ffi, ws, indptr_h, last_h, HQ, HK, D, PAGE)
        handle = plan._info.handle
        for a, r in frames:
            if a.call(*a.cargs):
                fail("append", a)
            r.q[info_word] = handle
            if r.call(*r.cargs):
                fail("run", r)

    return step


def flashinfer_step(torch: Any, p: dict[str, Any]) -> Callable[[], None]:
    import flashinfer.decode as fdec
    import flashinfer.page as fpage

    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = fdec.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    indptr_c, last_c = torch.from_numpy(p["indptr_h"]), torch.from_numpy(p["last_h"])
    layers = range(p["layers"])
    append = fpage.append_paged_kv_cache
    indices, indptr, last, bi, pos = p["indices"], p["indptr"], p["last"], p["batch_indices"], p["positions"]
    k, v, q, nk, nv = p["k"], p["v"], p["q"], p["new_k"], p["new_v"]
    out = [torch.empty_like(x) for x in q]
    p["flashinfer_out"] = out

    def step() -> None:
        wrapper.plan(indptr_c, indices, last_c, HQ, HK, D, PAGE, q_data_type=torch.float16)
        for i in layers:
            append(nk[i], nv[i], bi, pos, (k[i], v[i]), indices, indptr, last, kv_layout="NHD")
            wrapper.run(q[i], (k[i], v[i]), out=out[i])

    return step


def measure(
    steps: dict[str, Callable[[], None]], n: int, rounds: int, sync: Callable[[], None], wall: bool
) -> dict[str, float]:
    """Best round's time per step, in us: host time (no sync inside the round) or wall time (sync included)."""
    for fn in steps.values():
        fn()
    sync()
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            sync()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            if wall:
                sync()
            best[name] = min(best[name], (time.perf_counter() - t) / n * 1e6)
    return best


def profile(steps: dict[str, Callable[[], None]], n: int, top: int, sync: Callable[[], None]) -> None:
    """A cProfile of ``n`` steps of each fi_ffi contender: the ``top`` functions by own time (host work per step)."""
    import cProfile
    import pstats

    for name, fn in steps.items():
        if not name.startswith(("fi_ffi", "floor", "packed")):
            continue
        sync()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            fn()
        prof.disable()
        sync()
        print(f"\nprofile of {n} steps, {name}, by own time:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def run_problem(
    torch: Any, title: str, batch: int, lengths: list[int], args: argparse.Namespace, wall: bool
) -> dict[str, Any]:
    import fi_ffi

    p = problem(torch, batch, lengths, args.layers)
    ws = fi_ffi.Workspace.allocate(0)
    steps: dict[str, Callable[[], None]] = {}
    steps["fi_ffi descriptors"] = fi_ffi_step(fi_ffi, p, ws, fi_ffi.as_tensor)
    steps["fi_ffi torch"] = fi_ffi_step(fi_ffi, p, ws, lambda t: t)
    if args.floor:
        try:
            steps["floor: frames packed once"] = floor_step(fi_ffi, p, ws)
        except Exception:
            traceback.print_exc(limit=3)
    try:
        import cupy

        steps["fi_ffi cupy"] = fi_ffi_step(fi_ffi, p, ws, cupy.asarray)
    except Exception as exc:
        cupy = None
        print(f"CuPy contender unavailable: {exc}")
    producers = {"descriptors": fi_ffi.as_tensor, "torch": lambda t: t}
    if cupy is not None:
        producers["cupy"] = cupy.asarray
    for name, convert in producers.items():
        try:
            steps[f"packed {name}"] = packed_step(fi_ffi, p, ws, convert)
        except Exception:
            traceback.print_exc(limit=3)
    try:
        steps["flashinfer"] = flashinfer_step(torch, p)
    except Exception:
        traceback.print_exc(limit=3)
    # equal outputs: one step each from the same state (appends overwrite the same slots with the same values)
    outputs = {}
    for name, fn in steps.items():
        fn()
        torch.cuda.synchronize()
        last_out = p["flashinfer_out"][-1] if name == "flashinfer" else p["out"][-1]
        outputs[name] = last_out.clone()
    ref = outputs["fi_ffi descriptors"]
    equal = {name: bool(torch.equal(o, ref)) for name, o in outputs.items()}
    times = measure(steps, args.steps, args.rounds, torch.cuda.synchronize, wall)
    if args.profile and not wall:
        profile(steps, args.steps, args.profile, torch.cuda.synchronize)
    base = times.get("flashinfer")
    print(
        f"\n{title} ({'wall' if wall else 'host'} us per step, {args.layers} layers, best of {args.rounds} rounds "
        f"of {args.steps} steps; {torch.cuda.get_device_name()})"
    )
    for name, us in times.items():
        ratio = f"{us / base:.2f}x" if base else "-"
        print(f"  {name:<25} {us:10.1f} us   {ratio} flashinfer   output equal: {equal[name]}")
    ws.close()
    return {
        "title": title,
        "us_per_step": times,
        "ratio_vs_flashinfer": {k: v / base for k, v in times.items()} if base else {},
        "outputs_equal": equal,
        "wall": wall,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--profile", type=int, default=0, help="batch 1: a cProfile of each fi_ffi contender (N functions)")
    ap.add_argument("--batch1-only", action="store_true", help="only the batch-1 (host-bound) problem")
    ap.add_argument(
        "--floor", action="store_true", help="also the step with every call packed once (the modules' own host work)"
    )
    args = ap.parse_args(argv)
    import torch

    results = [run_problem(torch, "decode step, batch 1, 16 tokens", 1, [16], args, wall=False)]
    lengths = [1024 + (i * 997) % 1024 for i in range(32)]  # 1-2k tokens, uneven
    if not args.batch1_only:
        results.append(run_problem(torch, "decode step, batch 32, 1-2k tokens", 32, lengths, args, wall=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
