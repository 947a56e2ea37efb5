"""The GEMMs of one rank's decode step on the 8B-shaped Llama at TP 1/2/4, batch 1 and 32: cuBLAS as the engine
was first written (``cublasGemmEx``, default algorithm), the engine's GEMV (at most 4 rows; the engine uses it in
eager decode) and every candidate of cuBLASLt's heuristic for the same problem (the engine takes the first), us per
GEMM and the weight-read bandwidth it reaches, on one GPU. Not a test: nothing is asserted.

    python3 benchmarks/bench_tp_gemms.py [--tp 1,2,4] [--batches 1,32] [--algos 16] [--json PATH]

Shapes per rank (``y[rows, n] = x[rows, k] @ w[n, k].T``, bfloat16, float32 accumulation; the LM head writes
float32): QKV ``n = 6144 / tp, k = 4096``; O ``n = 4096, k = 4096 / tp``; gate/up ``n = 28672 / tp, k = 4096``;
down ``n = 4096, k = 14336 / tp``; LM head ``n = 128256 / tp, k = 4096``. Each contender runs ``--reps`` times
in one CUDA graph, cycling over enough copies of the weight that none is still in L2 from its last use (the
decode step reads each weight once), timed with CUDA events. A GEMM that reads its weights at far below the
best bandwidth of the table, with a cuBLASLt candidate that does better, is one the engine should pick another
algorithm for.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import cffi

# the engine's own declarations and enum values (cublasLt.h / library_types.h), not a second copy
from fi_engine.kernels.cublas import CUBLAS_COMPUTE_32F as _COMPUTE_32F
from fi_engine.kernels.cublas import CUBLAS_OP_N as _OP_N
from fi_engine.kernels.cublas import CUBLAS_OP_T as _OP_T
from fi_engine.kernels.cublas import CUDA_R_16BF as _R_16BF
from fi_engine.kernels.cublas import CUDA_R_32F as _R_32F
from fi_engine.kernels.cublas_lt import CDEFS as _CDEFS
from fi_engine.kernels.cublas_lt import CUBLASLT_MATMUL_DESC_TRANSA as _DESC_TRANSA
from fi_engine.kernels.cublas_lt import CUBLASLT_MATMUL_DESC_TRANSB as _DESC_TRANSB
from fi_engine.kernels.cublas_lt import CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES as _PREF_MAX_WORKSPACE_BYTES
from fi_engine.kernels.dense import WORKSPACE_BYTES as _WORKSPACE

HIDDEN, QKV, INTER, VOCAB = 4096, 6144, 14336, 128256


def shapes(tp: int) -> list[tuple[str, int, int, bool]]:
    """(name, n, k, float32 output) of one rank's GEMMs."""
    return [
        ("qkv", QKV // tp, HIDDEN, False),
        ("o", HIDDEN, HIDDEN // tp, False),
        ("gate/up", 2 * INTER // tp, HIDDEN, False),
        ("down", HIDDEN, INTER // tp, False),
        ("lm head", VOCAB // tp, HIDDEN, True),
    ]


class Lt:
    """cuBLASLt, opened with cuda-pathfinder (or the CUDA 13 soname)."""

    def __init__(self) -> None:
        self.ffi = cffi.FFI()
        self.ffi.cdef(_CDEFS)
        try:
            import cuda.pathfinder as pathfinder

            path = pathfinder.load_nvidia_dynamic_lib("cublasLt").abs_path or "libcublasLt.so.13"
        except Exception:
            path = "libcublasLt.so.13"
        self.lib = self.ffi.dlopen(path)
        h = self.ffi.new("cublasLtHandle_t*")
        self.check("cublasLtCreate", self.lib.cublasLtCreate(h))
        self.handle = h[0]
        self.scalars = self.ffi.new("float[2]", [1.0, 0.0])

    @staticmethod
    def check(name: str, status: int) -> None:
        if status:
            raise RuntimeError(f"{name} failed: status {status}")

    def problem(self, rows: int, n: int, k: int, out_type: int) -> Any:
        """The matmul descriptor and layouts of ``y[rows, n] = x[rows, k] @ w[n, k].T`` in column-major terms:
        ``y.T (n x rows) = w (k x n, transposed) . x.T (k x rows)``."""
        ffi, lib = self.ffi, self.lib
        desc = ffi.new("cublasLtMatmulDesc_t*")
        self.check("MatmulDescCreate", lib.cublasLtMatmulDescCreate(desc, _COMPUTE_32F, _R_32F))
        for attr, op in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            v = ffi.new("int32_t*", op)
            self.check("MatmulDescSetAttribute", lib.cublasLtMatmulDescSetAttribute(desc[0], attr, v, 4))
        layouts = []
        for dtype, r, c, ld in ((_R_16BF, k, n, k), (_R_16BF, k, rows, k), (out_type, n, rows, n)):
            lay = ffi.new("cublasLtMatrixLayout_t*")
            self.check("MatrixLayoutCreate", lib.cublasLtMatrixLayoutCreate(lay, dtype, r, c, ld))
            layouts.append(lay[0])
        return desc[0], layouts

    def candidates(self, desc: Any, layouts: list[Any], count: int) -> list[Any]:
        ffi, lib = self.ffi, self.lib
        pref = ffi.new("cublasLtMatmulPreference_t*")
        self.check("MatmulPreferenceCreate", lib.cublasLtMatmulPreferenceCreate(pref))
        size = ffi.new("uint64_t*", _WORKSPACE)
        self.check(
            "MatmulPreferenceSetAttribute",
            lib.cublasLtMatmulPreferenceSetAttribute(pref[0], _PREF_MAX_WORKSPACE_BYTES, size, 8),
        )
        results = ffi.new("cublasLtMatmulHeuristicResult_t[]", count)
        got = ffi.new("int*")
        a, b, c = layouts
        status = lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, a, b, c, c, pref[0], count, results, got)
        lib.cublasLtMatmulPreferenceDestroy(pref[0])
        self.check("MatmulAlgoGetHeuristic", status)
        algos = []
        for i in range(got[0]):
            if results[i].state == 0:  # copied out: `results` is freed on return
                algo = ffi.new("cublasLtMatmulAlgo_t*")
                ffi.memmove(algo, ffi.addressof(results[i], "algo"), ffi.sizeof("cublasLtMatmulAlgo_t"))
                algos.append(algo)
        return algos

    def matmul(self, desc: Any, layouts: list[Any], algo: Any, w: int, x: int, y: int, ws: int, stream: int) -> None:
        a, b, c = layouts
        one, zero = self.scalars, self.scalars + 1
        status = self.lib.cublasLtMatmul(
            self.handle, desc, one, w, a, x, b, zero, y, c, y, c, algo, ws, _WORKSPACE, stream,
        )  # fmt: skip
        self.check("cublasLtMatmul", status)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", default="1,2,4")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--algos", type=int, default=16, help="cuBLASLt heuristic candidates to time")
    ap.add_argument("--reps", type=int, default=32, help="GEMMs per timed graph")
    ap.add_argument("--json")
    args = ap.parse_args()

    import cupy as cp

    from fi_engine.kernels.cublas import CUDA_R_16BF, CUDA_R_32F
    from fi_engine.kernels.dense import GEMV_MAX_ROWS, Dense
    from fi_engine.kernels.graph import CudaGraph

    stream = cp.cuda.Stream(non_blocking=True)
    dense = Dense(stream)
    lt = Lt()
    ws = cp.empty(_WORKSPACE, cp.uint8)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    rows_out = []
    with stream:
        x = cp.random.standard_normal((32, INTER), cp.float32)
        xb = (x.view(cp.uint32) >> 16).astype(cp.uint16)  # bfloat16 bits
        y = cp.empty((32, VOCAB), cp.float32)

        def timed(issue: Any, reps: int) -> float:
            g = CudaGraph(stream.ptr)
            with g.capture():
                for j in range(reps):
                    issue(j)
            g.launch()
            stream.synchronize()
            start.record(stream)
            for _ in range(3):
                g.launch()
            end.record(stream)
            end.synchronize()
            g.close()
            return float(cp.cuda.get_elapsed_time(start, end)) * 1e3 / (3 * reps)

        def measure(batch: int, n: int, k: int, f32: bool, ptrs: list[int]) -> dict[str, Any]:
            """GemmEx and every cuBLASLt candidate on ``y[batch, n] = x[batch, k] @ w[n, k].T``, cycling over the
            weight copies at ``ptrs``."""
            c_type = CUDA_R_32F if f32 else CUDA_R_16BF

            def linear(j: int) -> None:
                dense.linear(batch, xb.data.ptr, k, ptrs[j % len(ptrs)], n, k, y.data.ptr, n, CUDA_R_16BF, c_type)

            gemv, lt_on = dense.gemv, dense.lt
            dense.gemv, dense.lt = False, False  # cublasGemmEx
            out: dict[str, Any] = {"gemm_ex_us": timed(linear, args.reps), "gemv_us": None}
            if gemv and batch <= GEMV_MAX_ROWS:  # the engine's own GEMV (eager decode only, today)
                dense.gemv = True
                out["gemv_us"] = timed(linear, args.reps)
            dense.gemv, dense.lt = gemv, lt_on
            desc, layouts = lt.problem(batch, n, k, _R_32F if f32 else _R_16BF)
            lt_us = []
            for cand in lt.candidates(desc, layouts, args.algos):

                def lt_call(j: int, cand: Any = cand) -> None:
                    lt.matmul(
                        desc, layouts, cand, ptrs[j % len(ptrs)], xb.data.ptr, y.data.ptr, ws.data.ptr, stream.ptr
                    )

                try:
                    lt_us.append(timed(lt_call, args.reps))
                except Exception as exc:  # a candidate that cannot run (or be captured): skipped
                    lt_us.append(float("nan"))
                    print(f"n {n} k {k} batch {batch}: a cuBLASLt candidate failed: {exc}")
            lt.lib.cublasLtMatmulDescDestroy(desc)
            for lay in layouts:
                lt.lib.cublasLtMatrixLayoutDestroy(lay)
            good = [u for u in lt_us if u == u]
            out["lt_first_us"] = lt_us[0] if lt_us else None  # cuBLASLt's own first choice
            out["lt_best_us"] = min(good) if good else None
            out["lt_best_index"] = lt_us.index(min(good)) if good else None
            out["candidates"] = len(lt_us)
            return out

        for tp in [int(t) for t in args.tp.split(",")]:
            for name, n, k, f32 in shapes(tp):
                nbytes = n * k * 2
                copies = max(2, min(16, math.ceil((256 << 20) / nbytes)))
                first = (cp.random.standard_normal(n * k, cp.float32).view(cp.uint32) >> 16).astype(cp.uint16)
                weights = [first] + [first.copy() for _ in range(copies - 1)]
                ptrs = [w.data.ptr for w in weights]
                for batch in [int(b) for b in args.batches.split(",")]:
                    row: dict[str, Any] = {"tp": tp, "gemm": name, "n": n, "k": k, "batch": batch, "mb": nbytes / 1e6}
                    row.update(measure(batch, n, k, f32, ptrs))
                    rows_out.append(row)
                del weights, first

    print(
        f"{'tp':>3} {'gemm':>8} {'n':>6} {'k':>6} {'batch':>5} {'MB':>7} {'GemmEx us':>10} {'GB/s':>6} "
        f"{'GEMV us':>8} {'Lt 1st us':>10} {'Lt best us':>10} {'(#)':>4} {'GB/s':>6} {'best/GemmEx':>11}"
    )
    for r in rows_out:
        best = r["lt_best_us"]
        print(
            f"{r['tp']:>3} {r['gemm']:>8} {r['n']:>6} {r['k']:>6} {r['batch']:>5} {r['mb']:>7.1f} "
            f"{r['gemm_ex_us']:>10.1f} {r['mb'] * 1e3 / r['gemm_ex_us']:>6.0f} "
            f"{r['gemv_us'] or float('nan'):>8.1f} "
            f"{r['lt_first_us'] or float('nan'):>10.1f} {best or float('nan'):>10.1f} "
            f"{r['lt_best_index'] if best else '-':>4} "
            f"{(r['mb'] * 1e3 / best) if best else float('nan'):>6.0f} "
            f"{(best / r['gemm_ex_us']) if best else float('nan'):>11.2f}"
        )
    dense.close()
    lt.lib.cublasLtDestroy(lt.handle)
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main()
