"""CPU proxy of a decode step's host time: bench_step.py's batch-1 step with descriptors, up to the module call.

    python benchmarks/bench_step_cpu.py [--before DIR] [--profile N] [--steps 200] [--rounds 7]

Per step, as bench_step.py issues it: one ``batch_decode_plan`` (host indptr / last-page arrays), then 32 x
(``append_paged_kv_cache`` + ``batch_decode_run``), a cache per layer (32/8 heads, head_dim 128, page 16, f16,
NHD), every tensor a descriptor that claims ``cuda:0`` over host memory. No GPU is needed: the launchers' entry
points are bound to the real libtvm_ffi's ``testing.nop`` (append, run) and ``ffi.Array`` (the plan, which must
return an Array), so everything fi_ffi does on the host (the op's Python, the launcher's layout key, pointer
rules, payload writes, stream comparison, the FFI call and its error test) is timed; the module's own C++ work
and the plan's event record (CUDA) are not. The kernel wheels are needed only to name the modules
(``FI_FFI_LOCK`` / ``FI_FFI_WHEELHOUSE``, as the tests set them; defaults to ``../shared/wheels``).

``--before DIR``: an older fi_ffi package (``git archive <rev> fi_ffi wheels.lock | tar -x -C DIR``) imported
beside this tree's as ``fi_ffi_before`` and timed in the same interleaved rounds. ``--profile N``: a cProfile of
this tree's steps, the N functions of most own time. ``floor``: the same calls packed once each into frames of
their own (a new plan per step, its handle written into the run frames): what the nop calls and the plan cost.
``packed run``: the runs through ``prepare_decode_run`` (packed once per layer, ``run(plan)`` per call), the appends
as ops. ``packed``: bench_step.py's packed contender, the appends through ``fi_ffi.prepare`` too (packed once per
layer at set-up): one plan, then per layer a prepared append and the packed run's ``run(plan)``. Then the run
alone per call: ``batch_decode_run`` against the packed run's ``run(plan)`` (a step's 32 runs less its plan,
divided by 32).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from timing import append_args, decode_plan, decode_run_call, prepare_decode

HERE = Path(__file__).resolve().parent
HQ, HK, D, PAGE, LAYERS = 32, 8, 128, 16, 32


def _env() -> None:
    """Name the modules from the shared test wheels unless the caller configured the loader."""
    if "FI_FFI_LOCK" in os.environ:
        return
    wheels = Path(os.environ.get("FI_FFI_TEST_WHEELS", HERE.parent.parent / "shared" / "wheels"))
    lock = Path(tempfile.gettempdir()) / f"fi_ffi_bench_step_cpu_{os.getpid()}.lock"
    found = sorted(str(p) for p in wheels.glob("flashinfer_jit_cache*.whl"))
    text = subprocess.run([sys.executable, "-m", "fi_ffi", "lock", *found], capture_output=True, text=True, check=True)
    lock.write_text(text.stdout)
    os.environ.update(FI_FFI_LOCK=str(lock), FI_FFI_WHEELHOUSE=str(wheels), FI_FFI_OFFLINE="1", FI_FFI_QUIET="1")


def _fake(fi: Any, keep: list[Any], shape: tuple[int, ...], dtype: str = "float16", device: str = "cuda:0") -> Any:
    """A descriptor of ``shape`` over 256-byte aligned host memory of its own (never read: the callee is a nop)."""
    n = int(np.prod(shape)) * (2 if dtype == "float16" else 4 if dtype == "int32" else 1)
    host = np.zeros(n + 256, np.uint8)
    keep.append(host)
    ptr = (host.ctypes.data + 255) // 256 * 256
    return fi.Tensor.from_pointer(ptr, shape, dtype, device)


def step_of(
    fi: Any, floor: bool = False, packed_run: bool = False, runs_only: bool = False, packed: bool = False
) -> Callable[[], None]:
    """bench_step.py's batch-1 step on package ``fi`` (this tree's fi_ffi or an older one), entry points bound;
    ``floor``: the same calls packed once each (bench_step.py's floor), only the plan and the calls per step;
    ``packed_run``: the runs through ``prepare_decode_run`` (packed once, ``run(plan)`` per layer), the appends as
    ops; ``packed``: the appends through ``fi_ffi.prepare`` too (bench_step.py's packed contender: one plan, then per
    layer a prepared append and the packed run's ``run(plan)``); ``runs_only``: the step without its appends (with
    ``packed_run`` or not: the run's per-call cost)."""
    # the package's own cffi instance (each copy has one); the runtime library is shared by both
    runtime = importlib.import_module(fi.__name__ + ".abi.runtime")
    Function = importlib.import_module(fi.__name__ + ".abi.call").Function
    dl = importlib.import_module(fi.__name__ + ".loader.dl")

    lib_dir = os.path.dirname(runtime.library_path())
    dl.open_library(os.path.join(lib_dir, "libtvm_ffi_testing.so"), dl.RTLD_NOW | dl.RTLD_GLOBAL)

    # the attention ops refuse to pick a module on a machine without a CUDA driver; this proxy launches nothing
    with contextlib.suppress(ModuleNotFoundError):  # a package from before that check has no such module
        importlib.import_module(fi.__name__ + ".launch.kernels")._driver_found = True
    decode = importlib.import_module(fi.__name__ + ".ops.attention.decode")
    page = importlib.import_module(fi.__name__ + ".ops.page")
    wsmod = importlib.import_module(fi.__name__ + ".ops.attention.workspace")
    wsmod.Workspace._record_plan_copy = lambda self, stream: None  # CUDA event: not on this machine
    keep: list[Any] = []
    pinned = np.zeros(1 << 16, np.uint8)
    keep.append(pinned)
    ws = fi.Workspace.from_buffers(
        _fake(fi, keep, (1 << 20,), "uint8"),
        _fake(fi, keep, (1 << 16,), "uint8"),
        fi.Tensor.from_pointer(pinned.ctypes.data, pinned.shape, "uint8", "cpu"),
    )
    indptr_h, last_h = np.array([0, 1], np.int32), np.array([16], np.int32)
    nop, array = Function.global_function("testing.nop"), Function.global_function("ffi.Array")
    s = decode._settings(0, (HQ, HK, D, PAGE, "float16", None, None, "NHD", "NONE", -1, 0.0, None, 1.0, 1e4, False))
    s.plan.launcher.entry = SimpleNamespace(safe_call=array.safe_call, this=array.this)
    s.run.launcher.entry = SimpleNamespace(safe_call=nop.safe_call, this=nop.this)
    page._append.launcher.entry = SimpleNamespace(safe_call=nop.safe_call, this=nop.this)
    k = [_fake(fi, keep, (1, PAGE, HK, D)) for _ in range(LAYERS)]
    v = [_fake(fi, keep, (1, PAGE, HK, D)) for _ in range(LAYERS)]
    q = [_fake(fi, keep, (1, HQ, D)) for _ in range(LAYERS)]
    out = [_fake(fi, keep, (1, HQ, D)) for _ in range(LAYERS)]
    nk = [_fake(fi, keep, (1, HK, D)) for _ in range(LAYERS)]
    nv = [_fake(fi, keep, (1, HK, D)) for _ in range(LAYERS)]
    indptr, indices, last, bi, pos = (_fake(fi, keep, (n,), "int32") for n in (2, 1, 1, 1, 1))
    append = fi.append_paged_kv_cache
    layers = range(LAYERS)
    appends = [append_args(fi, nk[i], nv[i], bi, pos, k[i], v[i], indices, indptr, last) for i in layers]
    runs = [decode_run_call(fi, q[i], k[i], v[i], indptr, indices, last, out[i]) for i in layers]

    def step() -> None:
        plan = decode_plan(fi, ws, indptr_h, last_h, HQ, HK, D, PAGE)
        for i in layers:
            append(*appends[i])
            runs[i](plan)

    def step_runs() -> None:
        plan = decode_plan(fi, ws, indptr_h, last_h, HQ, HK, D, PAGE)
        for i in layers:
            runs[i](plan)

    step.keep = (keep, ws)  # type: ignore[attr-defined]
    step()
    if packed:
        first = decode_plan(fi, ws, indptr_h, last_h, HQ, HK, D, PAGE)
        calls = [
            (
                fi.prepare(append, *appends[i]),
                prepare_decode(fi, q[i], k[i], v[i], indptr, indices, last, out[i], first),
            )
            for i in layers
        ]

        def all_packed_step() -> None:
            plan = decode_plan(fi, ws, indptr_h, last_h, HQ, HK, D, PAGE)
            for packed_append, packed_run_ in calls:
                packed_append()
                packed_run_.run(plan)

        all_packed_step.keep = (keep, ws, calls)  # type: ignore[attr-defined]
        all_packed_step()
        return all_packed_step
    if packed_run:
        first = decode_plan(fi, ws, indptr_h, last_h, HQ, HK, D, PAGE)
        prepared = [prepare_decode(fi, q[i], k[i], v[i], indptr, indices, last, out[i], first) for i in layers]

        def packed_step() -> None:
            plan = decode_plan(fi, ws, indptr_h, last_h, HQ, HK, D, PAGE)
            for i in layers:
                append(*appends[i])
                prepared[i].run(plan)

        def packed_runs() -> None:
            plan = decode_plan(fi, ws, indptr_h, last_h, HQ, HK, D, PAGE)
            for each in prepared:
                each.run(plan)

        chosen = packed_runs if runs_only else packed_step
        chosen.keep = (keep, ws, prepared)  # type: ignore[attr-defined]
        chosen()
        return chosen
    if runs_only:
        step_runs.keep = (keep, ws)  # type: ignore[attr-defined]
        return step_runs
    if not floor:
        return step
    # every append and run packed once into a frame of its own: what is left is the call (here testing.nop)
    launcher_mod = importlib.import_module(fi.__name__ + ".launch.launcher")
    fail = importlib.import_module(fi.__name__ + ".abi.frame").fail
    plan = decode_plan(fi, ws, indptr_h, last_h, HQ, HK, D, PAGE)

    def packed(launcher: Any, values: tuple[Any, ...], context: Any) -> Any:
        entry = launcher.bind()
        f = launcher_mod.LaunchFrame(len(launcher.decl.params), len(launcher.tensor_index), entry.safe_call, entry.this)
        f, _, ptrs = launcher.slow(values, None, context, frame=f, remember=False)
        launcher_mod._write_pointers(f, launcher.decl, launcher.record_of, ptrs)
        return f

    frames = [
        (
            packed(page._append.launcher, (nk[i], nv[i], bi, pos, k[i], v[i], indices, indptr, last, 0), None),
            packed(
                s.run.launcher,
                (
                    *(ws.float_buffer, ws.int_buffer, plan._info, q[i], k[i], v[i], indptr, indices, last, out[i]),
                    *(None, s.layout_code, s.window_left, False, None, s.logits_soft_cap, s.sm_scale),
                    *(s.rope_rcp_scale, s.rope_rcp_theta),
                ),
                plan._context,
            ),
        )
        for i in layers
    ]
    info_word = 2 * [p.name for p in s.run.launcher.decl.params].index("plan_info_vec") + 1

    def floor_step() -> None:
        plan = decode_plan(fi, ws, indptr_h, last_h, HQ, HK, D, PAGE)
        handle = plan._info.handle
        for a, r in frames:
            if a.call(*a.cargs):
                fail("append", a)
            r.q[info_word] = handle
            if r.call(*r.cargs):
                fail("run", r)

    floor_step.keep = (keep, ws, plan)  # type: ignore[attr-defined]
    return floor_step


def _plan_only(fi: Any) -> Callable[[], None]:
    """The step's plan alone (on the workspace and bound entry points step_of set up), to subtract from the runs."""
    step = step_of(fi, runs_only=True)
    ws = step.keep[1]  # type: ignore[attr-defined]
    indptr_h, last_h = np.array([0, 1], np.int32), np.array([16], np.int32)

    def plan_only() -> None:
        decode_plan(fi, ws, indptr_h, last_h, HQ, HK, D, PAGE)

    plan_only.keep = step.keep  # type: ignore[attr-defined]
    return plan_only


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="folder of an older fi_ffi package, timed in the same rounds")
    ap.add_argument("--steps", type=int, default=200, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", type=int, default=0, help="print a cProfile of this tree's steps (N functions)")
    args = ap.parse_args(argv)
    _env()
    import fi_ffi

    contenders = {
        "this tree": step_of(fi_ffi),
        "floor": step_of(fi_ffi, floor=True),
        "packed run": step_of(fi_ffi, packed_run=True),
        "packed": step_of(fi_ffi, packed=True),
    }
    if args.before:
        sys.path.insert(0, str(HERE))
        from bench_goals import load_package

        contenders["before"] = step_of(load_package(args.before))
    best = {name: float("inf") for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / args.steps * 1e6)
    print(f"decode step b1, descriptors, CPU proxy (host us per step, best of {args.rounds} rounds of {args.steps})")
    for name, us in best.items():
        ratio = f"   {us / best['this tree']:.3f}x this tree" if name != "this tree" else ""
        print(f"  {name:<10} {us:9.1f} us  ({us / (2 * LAYERS + 1):.2f} us per call){ratio}")
    # the run alone (a plan, then 32 runs per step): batch_decode_run against the packed run's run(plan)
    runs = {
        "batch_decode_run": step_of(fi_ffi, runs_only=True),
        "prepared run(plan)": step_of(fi_ffi, packed_run=True, runs_only=True),
    }
    plan_only = _plan_only(fi_ffi)
    best_runs = {name: float("inf") for name in (*runs, "plan only")}
    for _ in range(args.rounds):
        for name, fn in (*runs.items(), ("plan only", plan_only)):
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            best_runs[name] = min(best_runs[name], (time.perf_counter() - t) / args.steps * 1e6)
    print(f"the decode run per call (a step's {LAYERS} runs less its plan, / {LAYERS})")
    for name in runs:
        print(f"  {name:<20} {(best_runs[name] - best_runs['plan only']) / LAYERS:6.2f} us per call")
    if args.profile:
        prof = cProfile.Profile()
        fn = contenders["this tree"]
        prof.enable()
        for _ in range(args.steps):
            fn()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
