"""CPU proxy of the per-call cost: calling the global ``testing.nop`` of ``libtvm_ffi_testing.so``.

Ours (prepared descriptors, one packed frame) against the tvm_ffi Cython binding calling the same function
with numpy arrays, in one run. Runs on any machine with the dev extra installed (no GPU needed).

    python benchmarks/bench_cpu_proxy.py [--json out.json]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from timing import Report

from fi_ffi.abi import runtime
from fi_ffi.abi.call import Function, Signature
from fi_ffi.interop import as_tensor
from fi_ffi.loader import dl
from fi_ffi.tensor import Tensor


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

    # What an op does per call: write three payload words into this thread's prepared frame and call.
    sig = Signature("nop", [("a", "tensor"), ("b", "tensor"), ("c", "tensor")])
    frame = nop.frame_for(sig)
    words, call, callee_self, args_ptr, result_ptr, addr = (
        frame.q,
        nop._call,
        nop._self,
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
            nop.raise_error(frame)

    def ours_generic() -> None:
        nop(t, t, t)

    def ours_numpy_each_call() -> None:
        x = as_tensor(a)
        nop(x, x, x)

    peer = tvm_ffi.get_global_func("testing.nop")
    report = Report(f"testing.nop with 3 tensor arguments, host time per call (n={args.n})")
    report.measure("fi_ffi prepared frame, 3 Tensor descriptors", ours_prepared, n=args.n)
    report.measure("fi_ffi generic call nop(t, t, t), 3 Tensor descriptors", ours_generic, n=args.n)
    report.measure("fi_ffi as_tensor(numpy) + generic call", ours_numpy_each_call, n=args.n // 4)
    report.measure("tvm_ffi Cython nop(a, a, a), 3 numpy arrays", lambda: peer(a, a, a), n=args.n)
    report.measure("tvm_ffi Cython nop(None, None, None)", lambda: peer(None, None, None), n=args.n)
    ratios = [
        ("fi_ffi prepared frame, 3 Tensor descriptors", "tvm_ffi Cython nop(a, a, a), 3 numpy arrays"),
        ("fi_ffi generic call nop(t, t, t), 3 Tensor descriptors", "tvm_ffi Cython nop(a, a, a), 3 numpy arrays"),
    ]
    report.print(ratios)
    if args.json:
        report.dump(args.json, ratios)


if __name__ == "__main__":
    main()
