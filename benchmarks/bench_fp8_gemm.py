"""cuBLASLt's FP8 (e4m3) GEMM against its 16-bit GEMM on the 8B shapes, as the engine's W8A8 path calls them
(:meth:`fi_engine.kernels.cublas_lt.LtMatmuls.fp8_shape` / ``fp8_call``: per-row scales, or 128x128 weight blocks with
per-128-column activation scales): us per product, the weight rotating over 4 copies so that each product reads it
from HBM (the activation quantization is not included: ``benchmarks/bench_llama_tp.py`` times whole steps). Prints,
per shape and row count, ``bf16``, ``row`` and ``block`` times, ``-`` where cuBLASLt offers no algorithm. Not a
test: nothing is asserted (``tests/engine/test_gpu_fp8_linear.py`` checks the products).

    python3 benchmarks/bench_fp8_gemm.py [--rows 16,32,64,128,512,2048] [--reps 30]

Where the lock holds FlashInfer 0.6.3's ``fp8_blockscale_gemm_90`` module (``../shared/wheels-fp8``), two more
columns: its runner (a TVM-FFI module object: ``init()``, then ``ffi.ModuleGetFunction``) on its precompiled CUTLASS
path (DeepGEMM's JIT include dirs are never set, so nothing compiles), ``fi-w8a8`` with e4m3 activations and their
1x128 scales as cuBLASLt's ``block`` column gets them, and ``fi-bf16in`` with bfloat16 activations that the runner
quantizes itself (its activation quantization included, unlike the other columns).
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
WORKSPACE = 32 << 20


def flashinfer_runner() -> Any:
    """FlashInfer's FP8 block-scale GEMM runner: ``(module, {method: Function})``, or None (with the reason printed)
    where the lock has no ``fp8_blockscale_gemm_90`` or it does not start."""
    try:
        from fi_ffi.abi.call import Function
        from fi_ffi.launch.kernels import entry_point

        module = entry_point("fp8_blockscale_gemm_90", "init")()
        get = Function.global_function("ffi.ModuleGetFunction")
        names = ("run_gemm", "get_workspace_size", "configure_workspace")
        return module, {name: Function(get(module, name, False), name) for name in names}
    except Exception as exc:  # a benchmark column, not the engine: say why it is missing
        print(f"fp8_blockscale_gemm_90: not run ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="16,32,64,128,512,2048")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()

    import cupy as cp

    from fi_engine.kernels.cublas import CUDA_R_16BF
    from fi_engine.kernels.cublas_lt import _DECLARATIONS, LtMatmuls

    ffi = _DECLARATIONS.ffi()
    one, zero = ffi.new("float*", 1.0), ffi.new("float*", 0.0)
    stream = cp.cuda.Stream(non_blocking=True)
    workspace = cp.empty(WORKSPACE, cp.uint8)
    lt = LtMatmuls(stream.ptr, workspace.data.ptr, WORKSPACE, one, zero)
    fi = flashinfer_runner()
    fi_workspace = None

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

    def flashinfer_cells(fi: Any, rows: int, n: int, k: int, *bufs: Any) -> list[str]:
        """The runner's two columns for one shape (``-`` where it refuses the call)."""
        nonlocal fi_workspace
        from fi_ffi import Tensor, stream_scope

        _, methods = fi
        x16, x8, x_scales, block_scales, y, w8 = bufs

        def t(a: Any, shape: tuple[int, ...], dtype: str) -> Tensor:
            return Tensor(a.data.ptr, shape, dtype, 0)

        cells = []
        with stream_scope(stream.ptr, 0):  # the runner launches on TVM-FFI's current stream
            size = int(methods["get_workspace_size"](rows, n, k))
            if fi_workspace is None or fi_workspace.nbytes < size:
                fi_workspace = cp.empty(max(size, 1), cp.uint8)
                methods["configure_workspace"](t(fi_workspace, (fi_workspace.nbytes,), "uint8"))
            scales_b = t(block_scales, (-(-n // 128), -(-k // 128)), "float32")
            out = t(y, (rows, n), "bfloat16")
            weights = {w.data.ptr: t(w, (n, k), "float8_e4m3fn") for w in w8}  # made once, not per timed call
            for label, x, scales_a in (
                ("fi-w8a8", t(x8, (rows, k), "float8_e4m3fn"), t(x_scales, (x_scales.size,), "float32")),
                ("fi-bf16in", t(x16, (rows, k), "bfloat16"), None),
            ):
                run = methods["run_gemm"]

                def product(w: int, x: Any = x, scales_a: Any = scales_a, run: Any = run) -> None:
                    run(x, weights[w], out, scales_a, scales_b)

                try:
                    cells.append(f"{label} {timed(rotating(product, w8)):.1f}")
                except Exception as exc:  # a shape the runner refuses
                    cells.append(f"{label} - ({type(exc).__name__}: {str(exc)[:80]})")
        return cells

    with stream:
        for name, (n, k) in SHAPES.items():
            w16 = [cp.full((n, k), 0x3C00, cp.uint16) for _ in range(4)]
            w8 = [cp.full((n, k), 0x30, cp.uint8) for _ in range(4)]
            row_scales = cp.ones(n, cp.float32)
            block_scales = cp.ones(-(-n // 128) * -(-k // 128), cp.float32)
            cells = [f"{name} {n}x{k}"]
            for rows in (int(r) for r in args.rows.split(",")):
                x16, x8 = cp.zeros((rows, k), cp.uint16), cp.zeros((rows, k), cp.uint8)
                x_scales = cp.ones(-(-rows // 128) * 128 * -(-k // 128), cp.float32)  # rows padded to 128
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
                if fi is not None:
                    out += flashinfer_cells(fi, rows, n, k, x16, x8, x_scales, block_scales, y, w8)
                cells.append(f"{rows} rows: " + " ".join(out))
            print(" | ".join(cells), flush=True)
    lt.close()
    fi = None  # the runner module (and its methods) released before the interpreter ends


if __name__ == "__main__":
    main()
