"""CPU proxy of single op calls' host time: the calls fi_ffi.prepare packs, as ops and packed, up to the module call.

    python benchmarks/bench_op_calls_cpu.py [--before DIR] [--calls 20000] [--rounds 25]

Each launcher's entry point is bound to the real libtvm_ffi's ``testing.nop`` and every tensor is a descriptor that
claims ``cuda:0`` over host memory (as bench_step_cpu.py), so what is timed is everything fi_ffi does on the host
for one call: the op's Python, its wire mapping, the launcher's key, pointer tests, payload writes and the FFI call.
Rows: ``rmsnorm`` and ``fused_add_rmsnorm`` ``[1, 4096]``; the in-place RoPE ops with position ids (32/8 heads,
head_dim 128, one token); ``append_paged_kv_cache`` (one token, 8 heads, head_dim 128, NHD); then the same calls
packed once with ``fi_ffi.prepare`` (calling the result). ``--before DIR``: an older fi_ffi package
(``git archive <rev> fi_ffi wheels.lock | tar -x -C DIR``) imported beside this tree's and timed in the same
interleaved rounds (rows it cannot make are left out).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def calls_of(fi: Any) -> dict[str, Callable[[], Any]]:
    """The timed calls on package ``fi`` (this tree's fi_ffi or an older one), launchers bound to ``testing.nop``."""
    name = fi.__name__
    runtime = importlib.import_module(name + ".abi.runtime")
    function = importlib.import_module(name + ".abi.call").Function
    dl = importlib.import_module(name + ".loader.dl")
    lib_dir = os.path.dirname(runtime.library_path())
    dl.open_library(os.path.join(lib_dir, "libtvm_ffi_testing.so"), dl.RTLD_NOW | dl.RTLD_GLOBAL)
    nop = function.global_function("testing.nop")
    entry = SimpleNamespace(safe_call=nop.safe_call, this=nop.this)
    norm, rope, page = (importlib.import_module(f"{name}.ops.{m}") for m in ("norm", "rope", "page"))
    launches = (norm._rmsnorm, norm._fused_add_rmsnorm, rope._apply_rope_pos_ids, rope._apply_llama31_rope_pos_ids)
    for launch in (*launches, page._append):
        launch.launcher.forget()
        launch.launcher.entry = entry
    keep: list[Any] = []

    def fake(shape: tuple[int, ...], dtype: str = "float16") -> Any:
        host = np.zeros(int(np.prod(shape)) * 2 + 256, np.uint8)
        keep.append(host)
        return fi.Tensor.from_pointer((host.ctypes.data + 255) // 256 * 256, shape, dtype, "cuda:0")

    x, w, o, r = fake((1, 4096)), fake((4096,)), fake((1, 4096)), fake((1, 4096))
    q, k, pos = fake((1, 32, 128)), fake((1, 8, 128)), fake((1,), "int32")
    kc, vc = fake((64, 16, 8, 128)), fake((64, 16, 8, 128))
    bi, ki, kp, kl = fake((1,), "int32"), fake((4,), "int32"), fake((2,), "int32"), fake((1,), "int32")
    append = (k, k, bi, pos, (kc, vc), ki, kp, kl)
    calls: dict[str, Callable[[], Any]] = {
        "rmsnorm": lambda: fi.rmsnorm(x, w, out=o, eps=1e-6, stream=0),
        "fused_add_rmsnorm": lambda: fi.fused_add_rmsnorm(x, r, w, eps=1e-6, stream=0),
        "apply_rope_pos_ids_inplace": lambda: fi.apply_rope_pos_ids_inplace(q, k, pos, rope_theta=5e5, stream=0),
        "apply_llama31_rope_pos_ids_inplace": lambda: fi.apply_llama31_rope_pos_ids_inplace(q, k, pos, stream=0),
        "append_paged_kv_cache": lambda: fi.append_paged_kv_cache(*append, stream=0),
    }
    packed = {
        "prepared rmsnorm": (fi.rmsnorm, (x, w), {"out": o}),
        "prepared llama31 RoPE": (fi.apply_llama31_rope_pos_ids_inplace, (q, k, pos), {}),
        "prepared append": (fi.append_paged_kv_cache, append, {}),
    }
    for row, (op, args, kwargs) in packed.items():
        with contextlib.suppress(TypeError):  # an older package's prepare packs norms only
            calls[row] = fi.prepare(op, *args, **kwargs, stream=0)
    calls["rmsnorm"].keep = keep  # type: ignore[attr-defined]
    return calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="folder of an older fi_ffi package, timed in the same rounds")
    ap.add_argument("--calls", type=int, default=20000, help="calls per timed loop")
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args(argv)
    import fi_ffi

    packages = {"this tree": calls_of(fi_ffi)}
    if args.before:
        sys.path.insert(0, str(HERE))
        from bench_goals import load_package

        packages["before"] = calls_of(load_package(args.before))
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for tag, calls in packages.items():
            for row, fn in calls.items():
                fn()
                t = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                ns = (time.perf_counter() - t) / args.calls * 1e9
                best[(row, tag)] = min(best.get((row, tag), float("inf")), ns)
    print(f"op calls, descriptors, CPU proxy (ns per call, best of {args.rounds} rounds of {args.calls})")
    print(f"  {'':36} {'this tree':>10}" + (f" {'before':>10}" if args.before else ""))
    for row in packages["this tree"]:
        now = best[(row, "this tree")]
        line = f"  {row:<36} {now:10.0f}"
        before = best.get((row, "before"))
        if before is not None:
            line += f" {before:10.0f}   {now / before - 1:+.1%}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
