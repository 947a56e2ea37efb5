"""cuBLASLt's FP8 (e4m3) GEMM against its 16-bit GEMM on the 8B shapes, as the engine's W8A8 path calls them
(:meth:`fi_engine.cublas_lt.LtMatmuls.fp8_shape` / ``fp8_call``: per-row scales, or 128x128 weight blocks with
per-128-column activation scales): us per product, the weight rotating over 4 copies so that each product reads it
from HBM (the activation quantization is not included: ``benchmarks/bench_llama_tp.py`` times whole steps). Prints,
per shape and row count, ``bf16``, ``row`` and ``block`` times, ``-`` where cuBLASLt offers no algorithm. Not a
test: nothing is asserted (``tests/engine/test_gpu_fp8_linear.py`` checks the products).

    python3 benchmarks/bench_fp8_gemm.py [--rows 16,32,64,128,512,2048] [--reps 30]
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
WORKSPACE = 32 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="16,32,64,128,512,2048")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()

    import cupy as cp

    from fi_engine.cublas import CUDA_R_16BF
    from fi_engine.cublas_lt import _DECLARATIONS, LtMatmuls

    ffi = _DECLARATIONS.ffi()
    one, zero = ffi.new("float*", 1.0), ffi.new("float*", 0.0)
    stream = cp.cuda.Stream(non_blocking=True)
    workspace = cp.empty(WORKSPACE, cp.uint8)
    lt = LtMatmuls(stream.ptr, workspace.data.ptr, WORKSPACE, one, zero)

    def timed(call: Any) -> float:
        call()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        for _ in range(args.reps):
            call()
        end.record(stream)
        end.synchronize()
        return float(cp.cuda.get_elapsed_time(start, end)) * 1000 / args.reps

    def rotating(product: Any, weights: list[Any]) -> Any:
        """``product(w)`` over the weights in turn (each call reads its weight from HBM, not L2)."""
        turn = [0]

        def call() -> None:
            turn[0] = (turn[0] + 1) % len(weights)
            product(weights[turn[0]].data.ptr)

        return call

    with stream:
        for name, (n, k) in SHAPES.items():
            w16 = [cp.full((n, k), 0x3C00, cp.uint16) for _ in range(4)]
            w8 = [cp.full((n, k), 0x30, cp.uint8) for _ in range(4)]
            row_scales = cp.ones(n, cp.float32)
            block_scales = cp.ones(-(-n // 128) * -(-k // 128), cp.float32)
            cells = [f"{name} {n}x{k}"]
            for rows in (int(r) for r in args.rows.split(",")):
                x16, x8 = cp.zeros((rows, k), cp.uint16), cp.zeros((rows, k), cp.uint8)
                x_scales = cp.ones(rows * -(-k // 128), cp.float32)
                y = cp.zeros((rows, n), cp.uint16)
                out = []
                entry = lt.shape(rows, n, k, k, n, CUDA_R_16BF, CUDA_R_16BF)
                if entry is None:
                    out.append("bf16 -")
                else:
                    bf16 = partial(lambda e, x, yy, w: lt(e, x, w, yy, False), entry, x16.data.ptr, y.data.ptr)
                    out.append(f"bf16 {timed(rotating(bf16, w16)):.1f}")
                for label, blocked, scales in (("row", False, row_scales), ("block", True, block_scales)):
                    fp8 = lt.fp8_shape(rows, n, k, n, CUDA_R_16BF, blocked, x_scales.data.ptr, scales.data.ptr)
                    if fp8 is None:
                        out.append(f"{label} -")
                        continue
                    product = partial(
                        lambda e, x, s, yy, w: lt.fp8_call(e, x, w, s, yy, False),
                        fp8,
                        x8.data.ptr,
                        scales.data.ptr,
                        y.data.ptr,
                    )
                    out.append(f"{label} {timed(rotating(product, w8)):.1f}")
                cells.append(f"{rows} rows: " + " ".join(out))
            print(" | ".join(cells), flush=True)
    lt.close()


if __name__ == "__main__":
    main()
