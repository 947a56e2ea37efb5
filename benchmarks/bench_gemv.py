# ruff: noqa: B023  (each loop iteration captures its closures into CUDA graphs before the next one rebinds them)
"""The decode GEMMs of an 8B-shaped Llama at HBM bandwidth: for each weight shape (QKV, O, gate/up, down, LM head) and
row count, the engine's GEMV kernel (``fi_engine.kernels.dense.Dense.linear`` with the GEMV on), the fused GEMV with a
norm / add-norm / SiLU prologue (``FusedGemvs.linear``), cuBLASLt (the GEMV off), the same shape with e4m3 weights
(``--fp8``: ``QuantizedWeights.add_fp8_weight``; per-row and 128x128-block scales: the FP8 GEMV up to 8 rows, dequantize
+ GEMM beyond) and with int4 weights (``--int4``: ``QuantizedWeights.add_int4_weight``, groups of 128: the int4 GEMV up
to 32 rows, dequantize + GEMM beyond), in us per call and GB/s of weight bytes read (benchmarks/roofline.py's
``linear_bytes``: two bytes per weight; for FP8 one plus the float32 scales; for int4 a half plus a 4-byte record per
row and group; the weights rotate over copies larger than the 50 MB L2, so every call reads HBM), and that as a percent
of the device's memory bandwidth (``% HBM``: by default its peak from the memory clock x bus width, printed first with a
measured copy beside it; ``--hbm-tbs`` sets another figure). Each contender is captured as a CUDA graph of ``--calls``
launches and replayed (no host time in the figure). Not a test: nothing is asserted.

    python3 benchmarks/bench_gemv.py [--rows 1,2,4,8,16,32] [--calls 64] [--rounds 3] [--fp8] [--int4] \
        [--only-quantized] [--hbm-tbs TB/s]
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from roofline import add_hbm_tbs_argument, linear_bytes, roofline_denominator

SHAPES = {  # name: (n, k) of the 8B shape's Linear weights [n, k]
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--calls", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--fp8", action="store_true", help="also e4m3 weights (per-row and 128x128-block scales)")
    ap.add_argument("--int4", action="store_true", help="also int4 weights (AWQ/GPTQ, groups of 128)")
    ap.add_argument("--only-quantized", action="store_true", help="leave out the 16-bit contenders")
    add_hbm_tbs_argument(ap)
    args = ap.parse_args()

    import cupy as cp

    from fi_engine.kernels.dense import CUDA_R_16BF, CUDA_R_32F, GEMV_MAX_ROWS, Dense
    from fi_engine.kernels.fused_args import ADD_NORM, NORM, SILU

    stream = cp.cuda.Stream(non_blocking=True)
    bf16 = CUDA_R_16BF
    rows_list = [int(r) for r in args.rows.split(",")]
    top = max(rows_list)
    bandwidth = roofline_denominator(0, hbm_tbs=args.hbm_tbs)
    print(f"{bandwidth.line}; GB/s = weight bytes / time")
    print(f"{'shape':>8} {'n':>6} {'k':>6} {'rows':>4} {'contender':>14} {'us':>9} {'GB/s':>7} {'% HBM':>6}")
    with stream:
        dense = Dense(stream)
        for name in args.shapes.split(","):
            n, k = SHAPES[name]
            nbytes = n * k * 2
            copies = max(2, -(-(256 << 20) // nbytes))
            ws = [
                cp.random.standard_normal((n, k), dtype=np.float32).astype(cp.float16).view(cp.uint16) for _ in range(1)
            ]
            ws += [ws[0].copy() for _ in range(copies - 1)]
            x = cp.zeros((top, 2 * max(k, 4096)), cp.uint16)
            x[:, :] = cp.asarray(np.full(x.shape, 0x3C00, np.uint16))
            h = cp.zeros((top, k), cp.uint16)
            h_out = cp.zeros((top, k), cp.uint16)
            nw = cp.zeros((k,), cp.uint16)
            c_type = CUDA_R_32F if name == "lm_head" else bf16
            y = cp.zeros((top, n), cp.float32 if c_type == CUDA_R_32F else cp.uint16)
            fp8 = {}  # scales layout -> e4m3 copies, registered (rows of 128x128 blocks or one scale per row)
            if args.fp8:
                for layout, block in (("row", None), ("block", (128, 128))):
                    bits = cp.full((copies, n, k), 0x38, cp.uint8)  # 1.0 everywhere: the value does not matter
                    scales = cp.full((copies, -(-n // 128), -(-k // 128)) if block else (copies, n), 0.5, cp.float32)
                    for j in range(copies):
                        dense.quantized.add_fp8_weight(bits[j].data.ptr, n, k, scales[j].data.ptr, block)
                    fp8[layout] = (bits, scales)
            # int4 copies in the GEMV's layout (random codes, zero 8, scale 2**-7; every n here a multiple of 16, so
            # n * k / 2 bytes is the tile-major layout's size), registered
            int4 = None
            if args.int4:
                codes = cp.random.randint(0, 256, (copies, n, k // 2), dtype=cp.int32).astype(cp.uint8)
                record = int(np.float32(2.0**-7).view(np.uint32)) | 8
                records = cp.full((copies, n, k // 128), record, cp.uint32)
                for j in range(copies):
                    dense.quantized.add_int4_weight(codes[j].data.ptr, n, k, records[j].data.ptr, 128)
                int4 = (codes, records)
            mode = {"qkv": NORM, "o": None, "gate_up": ADD_NORM, "down": SILU, "lm_head": NORM}[name]
            for rows in rows_list:
                contenders: dict[str, Any] = {}

                def plain(i: int, rows: int = rows) -> None:
                    dense.linear(
                        rows, x.data.ptr, x.shape[1], ws[i % copies].data.ptr, n, k, y.data.ptr, n, bf16, c_type
                    )

                if rows <= GEMV_MAX_ROWS and not args.only_quantized:
                    contenders["gemv"] = plain
                    if mode is not None and dense.fused.fits(rows, k):

                        def fused(i: int, rows: int = rows) -> None:
                            w = ws[i % copies].data.ptr
                            if mode == SILU:
                                dense.fused.linear(mode, rows, x.data.ptr, 2 * k, w, n, k, y.data.ptr, n, bf16, c_type)
                            else:
                                dense.fused.linear(
                                    mode, rows, x.data.ptr, k, w, n, k, y.data.ptr, n, bf16, c_type,
                                    h.data.ptr, k, nw.data.ptr, h_out.data.ptr if mode == ADD_NORM else 0, 1e-5,
                                )  # fmt: skip

                        contenders["fused"] = fused

                def lt(i: int, rows: int = rows) -> None:
                    on, dense.gemv = dense.gemv, False
                    try:
                        plain(i, rows)
                    finally:
                        dense.gemv = on

                if not args.only_quantized:
                    contenders["cublaslt"] = lt
                if int4 is not None:

                    def w4(i: int, rows: int = rows) -> None:
                        w = int4[0][i % copies].data.ptr
                        dense.linear(rows, x.data.ptr, x.shape[1], w, n, k, y.data.ptr, n, bf16, c_type)

                    contenders["int4 g128"] = w4
                for layout, (bits, _) in fp8.items():

                    def e4m3(i: int, rows: int = rows, bits: Any = bits) -> None:
                        w = bits[i % copies].data.ptr
                        dense.linear(rows, x.data.ptr, x.shape[1], w, n, k, y.data.ptr, n, bf16, c_type)

                    contenders[f"fp8 {layout}"] = e4m3
                    if mode is not None and rows <= GEMV_MAX_ROWS and dense.fused.fits(rows, k):

                        def e4m3_fused(i: int, rows: int = rows, bits: Any = bits) -> None:
                            w = bits[i % copies].data.ptr
                            if mode == SILU:
                                dense.fused.linear(mode, rows, x.data.ptr, 2 * k, w, n, k, y.data.ptr, n, bf16, c_type)
                            else:
                                dense.fused.linear(
                                    mode, rows, x.data.ptr, k, w, n, k, y.data.ptr, n, bf16, c_type,
                                    h.data.ptr, k, nw.data.ptr, h_out.data.ptr if mode == ADD_NORM else 0, 1e-5,
                                )  # fmt: skip

                        contenders[f"fp8 {layout} fused"] = e4m3_fused
                times: dict[str, list[float]] = {c: [] for c in contenders}
                graphs = {}
                for c, fn in contenders.items():
                    fn(0)
                    stream.synchronize()
                    stream.begin_capture()
                    for i in range(args.calls):
                        fn(i)
                    graphs[c] = stream.end_capture()
                start, end = cp.cuda.Event(), cp.cuda.Event()
                for _ in range(args.rounds):
                    for c, g in graphs.items():
                        g.launch(stream)
                        start.record(stream)
                        g.launch(stream)
                        end.record(stream)
                        end.synchronize()
                        times[c].append(cp.cuda.get_elapsed_time(start, end) * 1e3 / args.calls)
                for c, t in times.items():
                    us = float(np.median(t))
                    weights = "fp8-block" if "block" in c else "fp8-row" if c.startswith("fp8") else "16-bit"
                    weights = "int4" if c.startswith("int4") else weights
                    gbps = linear_bytes(n, k, weights, (1, 128) if weights == "int4" else (128, 128)) / us / 1e3
                    print(
                        f"{name:>8} {n:>6} {k:>6} {rows:>4} {c:>14} {us:>9.2f} {gbps:>7.0f} "
                        f"{100 * gbps * 1e9 / bandwidth.bytes_per_s:>5.0f}%"
                    )
            for bits, _ in fp8.values():  # before the copies are freed: their addresses may hold 16-bit weights next
                for j in range(copies):
                    dense.quantized.remove_weight(bits[j].data.ptr)
            for j in range(copies if int4 is not None else 0):
                dense.quantized.remove_weight(int4[0][j].data.ptr)

        dense.close()


if __name__ == "__main__":
    main()
