"""RMSNorm on raw device memory with cuda-python only (no torch): allocate, copy in, run on a stream, compare.

python examples/rmsnorm_cuda_python.py        # exits 1 if the result differs from numpy

Needs: an NVIDIA GPU with its driver that the pinned kernel wheels cover (SM 9.0 and others: `fi-ffi doctor`
says), and fi_ffi installed (cuda-python and the CUDA runtime come with it). The first run fetches the pinned
wheels (1-2 GB) into the cache unless a wheelhouse holds them (docs/operations.md, "Offline machines").
Without a GPU it says so and exits 2.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from cuda.bindings import runtime as rt

import fi_ffi
from fi_ffi.cuda import no_gpu_message


def check(result: tuple, what: str) -> object:
    if result[0] != rt.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what}: {result[0].name}")
    return result[1] if len(result) > 1 else None


def main() -> int:
    problem = no_gpu_message(os.path.basename(sys.argv[0]))  # "" where a GPU is usable; else why not, and the fix
    if problem:
        print(problem, file=sys.stderr)
        return 2
    rows, hidden, eps = 8, 4096, 1e-6
    rng = np.random.default_rng(0)
    x_host = rng.standard_normal((rows, hidden)).astype(np.float16)
    w_host = rng.standard_normal(hidden).astype(np.float16)

    stream = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
    ptrs = [int(check(rt.cudaMalloc(a.nbytes), "cudaMalloc")) for a in (x_host, w_host, x_host)]
    try:
        for ptr, host in zip(ptrs, (x_host, w_host), strict=False):
            check(
                rt.cudaMemcpy(ptr, host.ctypes.data, host.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice),
                "cudaMemcpy",
            )
        # Descriptors are made once and reused for every call.
        x = fi_ffi.Tensor.from_pointer(ptrs[0], (rows, hidden), "float16", device=0)
        w = fi_ffi.Tensor.from_pointer(ptrs[1], (hidden,), "float16", device=0)
        out = fi_ffi.Tensor.from_pointer(ptrs[2], (rows, hidden), "float16", device=0)

        fi_ffi.rmsnorm(x, w, out=out, eps=eps, stream=int(stream))
        check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

        got = np.empty_like(x_host)
        check(
            rt.cudaMemcpy(got.ctypes.data, ptrs[2], got.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy"
        )
    finally:
        for ptr in ptrs:
            rt.cudaFree(ptr)
        rt.cudaStreamDestroy(stream)

    x32 = x_host.astype(np.float32)
    expected = x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps) * w_host.astype(np.float32)
    error = float(np.max(np.abs(got.astype(np.float32) - expected)))
    print(f"rmsnorm [{rows}, {hidden}] float16: max |error| vs numpy float32 = {error:.2e}")
    return 0 if error < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
