"""CPU proxy of the per-call cost: calling the global ``testing.nop`` of ``libtvm_ffi_testing.so``.

Ours (prepared descriptors, one packed frame; and rmsnorm's generated launcher bound to ``testing.nop``, with
descriptors and torch CPU tensors) against the tvm_ffi Cython binding calling the same function with numpy
arrays / torch tensors, in one run. Runs on any machine with the dev extra installed (no GPU needed; torch
optional).

    python benchmarks/bench_cpu_proxy.py [--json out.json]
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

import numpy as np
from timing import Report

from fi_ffi.abi import objects, runtime
from fi_ffi.abi.call import Function
from fi_ffi.abi.frame import Frame, fail
from fi_ffi.loader import dl
from fi_ffi.tensor.descriptor import Tensor
from fi_ffi.tensor.intake import as_tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("-n", type=int, default=200_000, help="calls per timed loop")
    args = parser.parse_args()

    import tvm_ffi  # the peer; loads the same libtvm_ffi.so that fi_ffi uses (see the loader)

    lib_dir = os.path.dirname(runtime.library_path())
    dl.open_library(os.path.join(lib_dir, "libtvm_ffi_testing.so"), dl.RTLD_NOW | dl.RTLD_GLOBAL)
    nop = Function.global_function("testing.nop")
    a = np.zeros((4, 128), np.float32)
    t = Tensor.from_pointer(a.ctypes.data, a.shape, "float32", "cpu", owner=a)

    # What an op does per call: write three payload words into a frame whose type words are set, and call.
    frame = Frame(3, 0, nop.safe_call, nop.this)
    frame.q[0] = frame.q[2] = frame.q[4] = objects.DLTENSOR_PTR
    words, call, callee_self, args_ptr, result_ptr, addr = (
        frame.q,
        nop.safe_call,
        nop.this,
        frame.args,
        frame.result,
        t._dl_addr,
    )

    def ours_prepared() -> None:
        words[1] = addr
        words[3] = addr
        words[5] = addr
        words[6] = 0  # result: None
        if call(callee_self, args_ptr, 3, result_ptr):
            fail("testing.nop", frame)

    def ours_generic() -> None:
        nop(t, t, t)

    def ours_numpy_each_call() -> None:
        x = as_tensor(a)
        nop(x, x, x)

    peer = tvm_ffi.get_global_func("testing.nop")
    report = Report(f"testing.nop with 3 tensor arguments, host time per call (n={args.n})")

    # The op layer on top of the frame: rmsnorm's generated launcher (layout key, pointer rules, payload writes,
    # stream, error check) with its entry point bound to testing.nop, and its contract check (alignment and
    # overlap rules) without the CUDA-device test, so host tensors pass: what a warm rmsnorm call costs the host
    # before the kernel launch.
    from fi_ffi.launch import checks
    from fi_ffi.launch.launcher import compile_launcher
    from fi_ffi.ops import norm

    checks.cuda = lambda *a: None  # this process only: the proxy's tensors are host memory
    launch = compile_launcher(norm.RMSNORM, "norm", norm._check_2d_out)
    launch.launcher.entry = SimpleNamespace(safe_call=nop.safe_call, this=nop.this)  # bound: no module to load
    host = np.zeros(4096, np.uint8)
    base = (host.ctypes.data + 255) // 256 * 256
    xd, wd, od = (
        Tensor.from_pointer(base + off, s, "float16", "cpu")
        for off, s in ((0, (1, 128)), (512, (128,)), (1024, (1, 128)))
    )
    report.measure("fi_ffi rmsnorm launcher -> nop, 3 descriptors", lambda: launch(od, xd, wd, 1e-6, False), n=args.n)
    try:
        import torch

        xt, wt, ot = (torch.zeros(s, dtype=torch.float16) for s in ((1, 128), (128,), (1, 128)))
        report.measure(
            "fi_ffi rmsnorm launcher -> nop, 3 torch tensors", lambda: launch(ot, xt, wt, 1e-6, False), n=args.n
        )
        report.measure("tvm_ffi Cython nop(x, w, out), 3 torch tensors", lambda: peer(xt, wt, ot), n=args.n)
        report.measure("fi_ffi.as_tensor(torch tensor)", lambda: as_tensor(xt), n=args.n)
    except ImportError:
        print("torch unavailable: its rows are left out")
    report.measure("fi_ffi.Tensor.from_pointer", lambda: Tensor.from_pointer(base, (1, 128), "float16", 0), n=args.n)
    report.measure("fi_ffi prepared frame, 3 Tensor descriptors", ours_prepared, n=args.n)
    report.measure("fi_ffi generic call nop(t, t, t), 3 Tensor descriptors", ours_generic, n=args.n)
    report.measure("fi_ffi as_tensor(numpy) + generic call", ours_numpy_each_call, n=args.n // 4)
    report.measure("tvm_ffi Cython nop(a, a, a), 3 numpy arrays", lambda: peer(a, a, a), n=args.n)
    report.measure("tvm_ffi Cython nop(None, None, None)", lambda: peer(None, None, None), n=args.n)
    ratios = [
        ("fi_ffi rmsnorm launcher -> nop, 3 descriptors", "fi_ffi prepared frame, 3 Tensor descriptors"),
        ("fi_ffi rmsnorm launcher -> nop, 3 torch tensors", "tvm_ffi Cython nop(x, w, out), 3 torch tensors"),
        ("fi_ffi prepared frame, 3 Tensor descriptors", "tvm_ffi Cython nop(a, a, a), 3 numpy arrays"),
        ("fi_ffi generic call nop(t, t, t), 3 Tensor descriptors", "tvm_ffi Cython nop(a, a, a), 3 numpy arrays"),
    ]
    report.print(ratios)
    if args.json:
        report.dump(args.json, ratios)


if __name__ == "__main__":
    main()
