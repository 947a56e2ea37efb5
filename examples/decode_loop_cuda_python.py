"""A decode loop over a paged KV cache with fi_ffi and cuda-python only (no torch), checked against numpy.

Each step appends one key/value token per request to the paged cache (``fi_ffi.ops.page.append_paged_kv_cache``),
plans the step (``batch_decode_plan``: the page table changed), runs attention for every "layer" with that one
plan (``batch_decode_run``), copies the output back and compares it with a float32 numpy reference. Exits 1 on
a mismatch.

    python examples/decode_loop_cuda_python.py [--steps 32] [--layers 2]

Needs: an NVIDIA GPU with its driver that the pinned kernel wheels cover (SM 9.0 and others: `fi-ffi doctor`
says), and fi_ffi installed (cuda-python and the CUDA runtime come with it). The first run fetches the pinned
wheels (1-2 GB) into the cache unless a wheelhouse holds them (docs/operations.md, "Offline machines").
Without a GPU it says so and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from cuda.bindings import runtime as rt

from fi_ffi import Tensor
from fi_ffi.cuda import no_gpu_message
from fi_ffi.ops.attention.decode import batch_decode_plan, batch_decode_run
from fi_ffi.ops.attention.workspace import Workspace
from fi_ffi.ops.page import append_paged_kv_cache


def check(result):
    err = result[0]
    if err != rt.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {err}")
    return result[1] if len(result) > 1 else None


class DeviceArray:
    """A device buffer with a fi_ffi descriptor, filled from / read into numpy."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.ptr = int(check(rt.cudaMalloc(max(self.nbytes, 1))))
        self.t = Tensor.from_pointer(self.ptr, self.shape, str(self.dtype), 0)

    def upload(self, host: np.ndarray, stream) -> None:
        host = np.ascontiguousarray(host, dtype=self.dtype)
        assert host.nbytes <= self.nbytes
        check(
            rt.cudaMemcpyAsync(
                self.ptr, host.ctypes.data, host.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream
            )
        )
        check(rt.cudaStreamSynchronize(stream))  # the host array may go away

    def download(self, stream) -> np.ndarray:
        host = np.empty(self.shape, self.dtype)
        check(
            rt.cudaMemcpyAsync(
                host.ctypes.data, self.ptr, self.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream
            )
        )
        check(rt.cudaStreamSynchronize(stream))
        return host

    def free(self) -> None:
        check(rt.cudaFree(self.ptr))


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Decode attention of q ``[hq, d]`` over k/v ``[n, hk, d]`` in float32."""
    g = q.shape[0] // k.shape[1]
    kf = np.repeat(k.astype(np.float32), g, axis=1)
    vf = np.repeat(v.astype(np.float32), g, axis=1)
    s = np.einsum("hd,nhd->hn", q.astype(np.float32), kf) / np.sqrt(q.shape[1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hn,nhd->hd", p, vf)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args(argv)
    problem = no_gpu_message(os.path.basename(sys.argv[0]))  # "" where a GPU is usable; else why not, and the fix
    if problem:
        print(problem, file=sys.stderr)
        return 2

    hq, hk, d, page, max_pages = 32, 8, 128, 16, 256
    prompt = [5, 16, 33]  # tokens already cached per request (uneven, page-crossing)
    batch = len(prompt)
    rng = np.random.default_rng(0)
    stream = check(rt.cudaStreamCreate())

    caches = [
        (DeviceArray((max_pages, page, hk, d), np.float16), DeviceArray((max_pages, page, hk, d), np.float16))
        for _ in range(args.layers)
    ]
    history = [[np.zeros((0, hk, d), np.float16)] * 2 for _ in range(args.layers * batch)]  # per layer, request
    q_d, out_d = DeviceArray((batch, hq, d), np.float16), DeviceArray((batch, hq, d), np.float16)
    tok_k, tok_v = (
        DeviceArray((max(prompt) * batch, hk, d), np.float16),
        DeviceArray((max(prompt) * batch, hk, d), np.float16),
    )
    batch_idx_d, pos_d = DeviceArray((max(prompt) * batch,), np.int32), DeviceArray((max(prompt) * batch,), np.int32)
    indices_d = DeviceArray((max_pages,), np.int32)
    indptr_d, last_d = DeviceArray((batch + 1,), np.int32), DeviceArray((batch,), np.int32)
    tables: list[list[int]] = [[] for _ in range(batch)]
    free = list(rng.permutation(max_pages))
    lens = [0] * batch
    ok = True

    def append(new_tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Append new_tokens[b] tokens to request b in every layer (page table first, then the cache kernel)."""
        bidx, pos = [], []
        for b, n in enumerate(new_tokens):
            for _ in range(n):
                if lens[b] % page == 0:
                    tables[b].append(int(free.pop()))
                bidx.append(b)
                pos.append(lens[b])
                lens[b] += 1
        indptr = np.concatenate([[0], np.cumsum([len(t) for t in tables])]).astype(np.int32)
        last = np.array([n - (len(t) - 1) * page for n, t in zip(lens, tables, strict=True)], np.int32)
        indices_d.upload(np.concatenate(tables).astype(np.int32), stream)
        indptr_d.upload(indptr, stream)
        last_d.upload(last, stream)
        nnz = len(bidx)
        batch_idx_d.upload(np.array(bidx, np.int32), stream)
        pos_d.upload(np.array(pos, np.int32), stream)
        for layer, (kc, vc) in enumerate(caches):
            k = rng.standard_normal((nnz, hk, d)).astype(np.float16)
            v = rng.standard_normal((nnz, hk, d)).astype(np.float16)
            tok_k.upload(k, stream)
            tok_v.upload(v, stream)
            append_paged_kv_cache(
                tok_k.t.view((nnz, hk, d)),
                tok_v.t.view((nnz, hk, d)),
                batch_idx_d.t.view((nnz,)),
                pos_d.t.view((nnz,)),
                (kc.t, vc.t),
                indices_d.t.view((int(indptr[-1]),)),
                indptr_d.t,
                last_d.t,
                kv_layout="NHD",
                stream=int(stream),
            )
            for b in range(batch):
                rows = [i for i, x in enumerate(bidx) if x == b]
                hk_, hv_ = history[layer * batch + b]
                history[layer * batch + b] = [np.concatenate([hk_, k[rows]]), np.concatenate([hv_, v[rows]])]
        check(rt.cudaStreamSynchronize(stream))
        return indptr, last

    with Workspace.allocate(0) as ws:
        append(prompt)  # prefill's KV (the prompt tokens) lands in the cache
        for step in range(args.steps):
            indptr, last = append([1] * batch)
            plan = batch_decode_plan(indptr, None, last, hq, hk, d, page, stream=int(stream), workspace=ws)
            indices = indices_d.t.view((int(indptr[-1]),))
            for layer, (kc, vc) in enumerate(caches):
                q = rng.standard_normal((batch, hq, d)).astype(np.float16)
                q_d.upload(q, stream)
                batch_decode_run(
                    q_d.t,
                    (kc.t, vc.t),
                    kv_indptr=indptr_d.t,
                    kv_indices=indices,
                    kv_last_page_len=last_d.t,
                    out=out_d.t,
                    stream=int(stream),
                    plan=plan,
                )
                out = out_d.download(stream).astype(np.float32)
                for b in range(batch):
                    hk_, hv_ = history[layer * batch + b]
                    want = reference(q[b], hk_, hv_)
                    err = float(np.max(np.abs(out[b] - want)))
                    if not np.allclose(out[b], want, atol=5e-3, rtol=5e-3):
                        print(f"MISMATCH step {step} layer {layer} request {b}: max abs error {err:.2e}")
                        ok = False
            plan.release()
            print(f"step {step:3d}: lengths {lens} ok" if ok else f"step {step:3d}: lengths {lens} FAILED")

    for arr in (q_d, out_d, tok_k, tok_v, batch_idx_d, pos_d, indices_d, indptr_d, last_d):
        arr.free()
    for kc, vc in caches:
        kc.free()
        vc.free()
    check(rt.cudaStreamDestroy(stream))
    print("all steps match the numpy reference" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
