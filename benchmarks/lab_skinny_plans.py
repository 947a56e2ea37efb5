"""A lab for the skinny GEMM's candidate launches as a Dense times them (``SkinnyGemm.plans``): for each 8B weight
shape (QKV, O, gate/up, down), row count and weight format (bfloat16, e4m3 with 128x128-block or per-row scales, AWQ
int4 in groups of 128, and ``e4m3a8``: 128x128-block e4m3 weights times e4m3 x, W8A8 on Hopper's e4m3 ``wgmma``, x
quantized per row and 128 inputs by the engine's ``fp8_quant.cu`` first, outside the timed launch; ``e4m3a8q``: the
same with x quantized alike by each block of the GEMM as it stages it; ``int4a8``: the int4 weights times x quantized
to int8 by each block, W4A8 on Hopper's integer ``wgmma``), every plan's
geometry, how its split of k was chosen (``rule``: the power-of-two rule, ``half``: half of it, ``waves``: the split
whose grid fills whole waves of the SMs' resident blocks), its grid, the blocks an SM holds of its kernel, the waves
its grid takes, and its time in us per call in a chain of launches, GB/s of the bytes it must read (weights and their
scales or records) and percent of the roofline, then its time alone as a Dense times it (one launch after the L2 is
flushed: its ramp and last wave hidden behind no neighbour). Each plan is
checked against a float32 reference first (a wrong one prints WRONG and is not timed); ``*`` marks the new ones (a
wave-fitted split, a kernel of two blocks an SM, the warpgroup form). After each case: the best of the plans a Dense
timed before them against the best of all, in the chain and alone. The chains are CUDA graphs of ``--calls`` launches
rotating over weight copies larger than the L2, so every call reads HBM. Needs CuPy on a GPU of SM 8.0 or newer (no
torch). Not a test: tests/engine/test_gpu_skinny_gemm.py is.

    python benchmarks/lab_skinny_plans.py [--rows 8,16,32] [--shapes qkv,o,gate_up,down]
        [--formats bf16,e4m3b,e4m3r,int4,e4m3a8,e4m3a8q,int4a8] [--hbm-tbs TB/s] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from roofline import add_hbm_tbs_argument, linear_bytes, roofline_denominator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
FORMATS = ("bf16", "e4m3b", "e4m3r", "int4", "e4m3a8", "e4m3a8q", "int4a8")
# roofline.linear_bytes' formats
BYTES_FORMAT = {
    "bf16": "16-bit",
    "e4m3b": "fp8-block",
    "e4m3r": "fp8-row",
    "int4": "int4",
    "e4m3a8": "fp8-block",
    "e4m3a8q": "fp8-block",
    "int4a8": "int4",
}
GROUP = 128  # int4 inputs a group (AWQ's usual)
ROTATE_BYTES = 256 << 20  # weight copies a graph rotates over: past any L2


def bf16_bits(cp: Any, a: Any) -> tuple[Any, Any]:
    """float32 ``a`` truncated to bfloat16: ``(its bits as uint16, their float32 values)``."""
    bits = (a.astype(cp.float32).view(cp.uint32) >> 16).astype(cp.uint16)
    return bits, (bits.astype(cp.uint32) << 16).view(cp.float32)


def weight_copies(cp: Any, fmt: str, n: int, k: int, copies: int) -> tuple[list[tuple[Any, Any]], Any, dict[str, Any]]:
    """``copies`` random weights of format ``fmt`` on the GPU, each ``(weight bytes, scales or records or None)``,
    the float32 values of the first ``[n, k]``, and the arguments of ``SkinnyGemm.plans`` besides the call's."""
    from fi_engine.checkpoint.fp8_weights import E4M3
    from fi_engine.checkpoint.int4_weights import Int4Matrix
    from fi_engine.kernels.skinny_gemm import E4M3_A8, E4M3_A8Q, E4M3_BLOCK, E4M3_ROW, INT4, INT4_A8Q, W16

    made: list[tuple[Any, Any]] = []
    if fmt == "bf16":
        bits, values = bf16_bits(cp, cp.random.standard_normal((n, k), dtype=cp.float32))
        made = [(bits, None)] + [(bits.copy(), None) for _ in range(copies - 1)]
        return made, values, {"fmt": W16}
    if fmt in ("e4m3b", "e4m3r", "e4m3a8", "e4m3a8q"):
        # codes of magnitude below 0x7f (NaN), either sign; scales near 1 / 16
        codes = (cp.random.randint(0, 0x7F, (n, k), dtype=cp.int32) | (cp.random.randint(0, 2, (n, k)) << 7)).astype(
            cp.uint8
        )
        if fmt in ("e4m3b", "e4m3a8", "e4m3a8q"):
            scales = cp.random.uniform(0.5, 2.0, (-(-n // 128), -(-k // 128)), dtype=cp.float32) / 16
            full = cp.repeat(cp.repeat(scales, 128, 0), 128, 1)[:n, :k]
            kind = {"e4m3b": E4M3_BLOCK, "e4m3a8": E4M3_A8, "e4m3a8q": E4M3_A8Q}[fmt]
            extra = {"fmt": kind, "s_ld": scales.shape[1], "block": (128, 128)}
        else:
            scales = cp.random.uniform(0.5, 2.0, n, dtype=cp.float32) / 16
            full = scales[:, None]
            extra = {"fmt": E4M3_ROW, "s_ld": 0, "block": None}
        values = cp.asarray(E4M3)[codes] * full
        made = [(codes, scales)] + [(codes.copy(), scales.copy()) for _ in range(copies - 1)]
        return made, values, extra
    groups = k // GROUP
    scales16 = cp.random.uniform(0.5, 2.0, (groups, n), dtype=cp.float32) * 0.02
    m = Int4Matrix(
        cp.random.randint(0, 16, (n, k), dtype=cp.int32).astype(cp.uint8),
        cp.random.randint(0, 17, (groups, n), dtype=cp.int32).astype(cp.uint8),
        scales16.astype(cp.float16).astype(cp.float32),
        GROUP,
    )
    weights, records = m.gemv_layout()
    values = (m.codes.reshape(n, groups, GROUP).astype(cp.float32) - m.zeros.T[:, :, None]) * m.scales.T[:, :, None]
    made = [(weights, records)] + [(weights.copy(), records.copy()) for _ in range(copies - 1)]
    kind = INT4_A8Q if fmt == "int4a8" else INT4
    return made, values.reshape(n, k), {"fmt": kind, "gshift": (GROUP // 64).bit_length() - 1, "groups": groups}


def int8_x(cp: Any, x: Any) -> Any:
    """float32 ``x [rows, k]`` as the W4A8 form quantizes it (a scale per row and 128 inputs, ``amax / 127``; codes
    ``rint(x * (127 / amax))``), the values the codes times their scales stand for."""
    rows, k = x.shape
    groups = x.reshape(rows, k // 128, 128)
    amax = cp.maximum(cp.abs(groups).max(axis=2), cp.float32(1e-12))
    codes = cp.rint(groups * (cp.float32(127) / amax)[..., None])
    return (codes * (amax / cp.float32(127))[..., None]).reshape(rows, k)


def quantized_x(cp: Any, quant: Any, x: Any, rows: int) -> tuple[Any, Any]:
    """``x[:rows]`` (bfloat16 bits ``[32, k]``) quantized as the W8A8 form reads it: e4m3 bytes ``[rows, k]`` then,
    256-byte aligned, float32 scales ``[k / 128, rows]`` (``quant``: fp8_quant.cu's ``quant_groups_bf16``), in one
    buffer; and the float32 values the bytes times their scales stand for ``[rows, k]``."""
    from fi_engine.checkpoint.fp8_weights import E4M3

    k = x.shape[1]
    groups = k // 128
    at = -(-rows * k // 256) * 256
    buf = cp.zeros(at + 4 * rows * groups, cp.uint8)
    quant(
        (-(-rows * groups // 8),),
        (256,),
        (x, cp.int64(k), cp.int32(rows), cp.int32(k), buf, buf[at:], cp.int64(rows)),
    )
    codes = buf[: rows * k].reshape(rows, k)
    scales = buf[at:].view(cp.float32).reshape(groups, rows)
    values = cp.asarray(E4M3)[codes] * cp.repeat(scales.T, 128, 1)
    return buf, values


def plans_of(sk: Any, extra: dict[str, Any], call: tuple[int, ...], q: Any) -> list[Any]:
    """``sk.plans`` of the linear call ``call`` over a weight with quantization data ``q`` (``extra``: its format's
    arguments, :func:`weight_copies`')."""
    fmt = extra["fmt"]
    if "groups" in extra:
        return sk.plans(fmt, call, int4=(int(q.data.ptr), extra["groups"], extra["gshift"], 0))
    if "block" in extra:
        return sk.plans(fmt, call, int(q.data.ptr), extra["s_ld"], extra["block"])
    return sk.plans(fmt, call)


def is_new(plan: Any) -> bool:
    """Whether ``plan`` is one a Dense did not time before the wave-fitted splits, the two-block geometries and the
    int4 warpgroup form: a ``waves`` split, a kernel of two blocks an SM (``_b2_`` in its name,
    :meth:`Geometry.name`) or of the warpgroup form (``skinnywg4``, ``skinnywg8b``, ``skinnywg8r``)."""
    from fi_engine.kernels.skinny_gemm import SPLIT_WAVES

    return bool(plan.split == SPLIT_WAVES or "_b2_" in plan.kernel or plan.kernel.startswith("skinnywg"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="8,16,32")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--csv", default="")
    add_hbm_tbs_argument(ap)
    args = ap.parse_args()

    import cupy as cp

    from fi_engine.kernels.cuda_sources import source
    from fi_engine.kernels.dense import CUDA_R_16BF, Dense
    from fi_engine.kernels.launch_timing import LaunchTimer
    from fi_engine.kernels.skinny_gemm import SkinnyGemm

    bandwidth = roofline_denominator(0, hbm_tbs=args.hbm_tbs)
    print(bandwidth.line)
    cp.random.seed(0)
    stream = cp.cuda.Stream(non_blocking=True)
    records: list[tuple[Any, ...]] = []
    summary: list[str] = []
    wrong = 0
    with stream:
        dense, sk = Dense(stream), SkinnyGemm()
        timer = LaunchTimer(stream.ptr)
        done: Any = sk.done  # the split launches' counters (zero between launches)
        quant = cp.RawModule(code=source("fp8_quant.cu")).get_function("quant_groups_bf16")
        print(f"{sk.sms} SMs; columns: geometry, split, grid (column blocks x k ranges), blocks an SM holds, waves")
        for shape in args.shapes.split(","):
            n, k = SHAPES[shape]
            x, xf = bf16_bits(cp, cp.random.standard_normal((32, k), dtype=cp.float32))
            y = cp.empty((32, n), cp.uint16)
            for fmt in args.formats.split(","):
                nbytes = linear_bytes(n, k, BYTES_FORMAT[fmt], (128, GROUP))
                copies = max(2, -(-ROTATE_BYTES // nbytes))
                made, values, extra = weight_copies(cp, fmt, n, k, copies)
                for rows in (int(r) for r in args.rows.split(",")):
                    ref = xf[:rows] @ values.T
                    x_at = int(x.data.ptr)
                    if fmt in ("e4m3a8", "e4m3a8q"):  # (the reference: of the values x's e4m3 bytes stand for)
                        xq, xv = quantized_x(cp, quant, x, rows)
                        if fmt == "e4m3a8":  # (e4m3a8q: x as it is, quantized alike in the kernel)
                            x_at = int(xq.data.ptr)
                        moved = float(cp.linalg.norm(xv @ values.T - ref) / cp.linalg.norm(ref))
                        print(f"  x's e4m3 quantization alone moves the product by {moved:.3g} (relative)")
                        ref = xv @ values.T
                    if fmt == "int4a8":  # (the reference: of x's int8 values)
                        xv = int8_x(cp, xf[:rows])
                        moved = float(cp.linalg.norm(xv @ values.T - ref) / cp.linalg.norm(ref))
                        print(f"  x's int8 quantization alone moves the product by {moved:.3g} (relative)")
                        ref = xv @ values.T
                    call = (rows, x_at, k, 0, n, k, int(y.data.ptr), n, CUDA_R_16BF, CUDA_R_16BF)
                    by_copy = []
                    for w, q in made:  # the same plans over each copy's addresses
                        by_copy.append(plans_of(sk, extra, (*call[:3], int(w.data.ptr), *call[4:]), q))
                    timed: list[tuple[float, Any, float]] = []
                    print(f"\n{shape} {n}x{k} {fmt} {rows} rows ({nbytes / 1e6:.1f} MB a call)")
                    for i, plan in enumerate(by_copy[0]):
                        launches = [
                            dense.launcher.prepared_kernel(
                                p[i].function, p[i].grid, p[i].threads, p[i].smem, p[i].args, "skinny", True
                            )
                            for p in by_copy
                        ]
                        name = plan.kernel.split("_m", 1)[1]  # (row groups, tiles, steps, warps, min blocks, staged)
                        y.fill(0)
                        launches[0]()
                        stream.synchronize()
                        got = (y[:rows].astype(cp.uint32) << 16).view(cp.float32)
                        err = float(cp.linalg.norm(got - ref) / cp.linalg.norm(ref))
                        if not err < 1e-2 or int(done.sum()):
                            print(f"  WRONG {name} {plan.split} grid {plan.grid}: relative error {err:.3g}")
                            wrong += 1
                            done.fill(0)
                            continue
                        stream.begin_capture()
                        for c in range(args.calls):
                            launches[c % copies]()
                        graph = stream.end_capture()
                        graph.launch(stream)
                        start, end = cp.cuda.Event(), cp.cuda.Event()
                        times = []
                        for _ in range(args.rounds):
                            start.record(stream)
                            graph.launch(stream)
                            end.record(stream)
                            end.synchronize()
                            times.append(cp.cuda.get_elapsed_time(start, end) * 1e3 / args.calls)
                        us = min(times)
                        gbps = nbytes / us / 1e3
                        # as a Dense times it: one launch after the L2 is flushed, nothing before or after it
                        alone_us = 1e3 * min(timer.times({0: launches[0], 1: launches[-1]}).values())
                        waves = plan.grid[0] * plan.grid[1] / (sk.sms * plan.resident)
                        print(
                            f"  {'*' if is_new(plan) else ' '} {name:>24} {plan.split:>5} "
                            f"grid {plan.grid[0]:>5} x {plan.grid[1]:<3} "
                            f"{plan.resident} an SM {waves:5.2f} waves {us:8.1f} us {gbps:6.0f} GB/s "
                            f"{100 * gbps * 1e9 / bandwidth.bytes_per_s:5.1f} %, alone {alone_us:6.1f} us"
                        )
                        timed.append((us, plan, alone_us))
                        records.append(
                            (shape, fmt, rows, name, plan.split, *plan.grid, plan.resident, us, gbps, alone_us)
                        )
                    old = [t for t in timed if not is_new(t[1])]
                    if old and timed:
                        b_old, b_all = min(old, key=lambda t: t[0]), min(timed, key=lambda t: t[0])
                        line = (
                            f"{shape:>8} {fmt:>6} {rows:>3} rows: before {b_old[0]:7.1f} us, all "
                            f"{b_all[0]:7.1f} us ({b_all[1].kernel.split('_m', 1)[1]} {b_all[1].split}, grid "
                            f"{b_all[1].grid}): "
                            f"{100 * (b_old[0] / b_all[0] - 1):+5.1f} %"
                        )
                        a_old, a_all = min(old, key=lambda t: t[2]), min(timed, key=lambda t: t[2])
                        line += (
                            f"; alone {a_old[2]:5.1f} -> {a_all[2]:5.1f} us "
                            f"({a_all[1].kernel.split('_m', 1)[1]} {a_all[1].split})"
                        )
                        summary.append(line)
                        print("  " + line)
                made = []
                cp.get_default_memory_pool().free_all_blocks()
    print("\nthe best of the plans a Dense timed before (no wave-fitted split, no two-block kernel) against every")
    print("plan's best (+: a new plan is that much faster)")
    print("\n".join(summary))
    print(f"wrong: {wrong}")
    if args.csv:
        with open(args.csv, "w") as fh:
            fh.write("shape,format,rows,geometry,split,blocks,ranges,resident,us,GBps,alone_us\n")
            for r in records:
                fh.write(",".join(str(v) for v in r) + "\n")


if __name__ == "__main__":
    main()
