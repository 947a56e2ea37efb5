"""The MXFP4 grouped GEMV alone against the 16-bit grouped GEMV, on gpt-oss-20b's expert shapes (32 experts, hidden and
intermediate 2880, top-4): the gate/up projection (``[5760, 2880]``) and the down projection (``[2880, 2880]``, its
clamped SwiGLU made as it stages), at 1, 4 and 8 tokens, for a few launch geometries of the MXFP4 kernels
(``chunks_ahead``, ``min_blocks_per_sm``, ``chunks_per_warp``, ``warps_per_sm``). Each launch is timed as 50 of
them in a CUDA graph (the experts, 0.4 GB of MXFP4 and 1.6 GB of bfloat16, are far past the L2), and reported as
the bytes of the experts the step reads (the distinct chosen experts' codes and scales) over the time, against the
device's peak.

Needs a GPU and CuPy. ``python benchmarks/lab_mxfp4_gemv.py [--tokens 1,4,8]``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,4,8")
    ap.add_argument("--only-default", action="store_true", help="time the class's own geometry only")
    ap.add_argument("--peak-tbs", type=float, default=3.35, help="the device's peak bandwidth, TB/s (H100 SXM: 3.35)")
    args = ap.parse_args(argv)
    import cupy as cp

    from fi_engine.kernels.moe_gemv import GroupedGemv
    from fi_engine.kernels.mxfp4_moe_gemv import Mxfp4GroupedGemv, padded, tiled_mxfp4

    e, h, i, k_top = 32, 2880, 2880, 4
    rng = np.random.default_rng(0)
    stream = cp.cuda.Stream(non_blocking=True)
    stacks = {}
    for name, (n, k) in {"gate_up": (2 * i, h), "down": (h, i)}.items():
        blocks = cp.asarray(rng.integers(0, 256, (e, n, k // 32, 16), dtype=np.uint8))
        scales = cp.full((e, n, k // 32), 120, cp.uint8)
        codes, s = tiled_mxfp4(blocks, scales)
        w16 = cp.asarray(rng.integers(0, 1 << 15, (e, n, k), dtype=np.uint16) & 0x3CFF)  # small bfloat16 values
        stacks[name] = (n, k, codes, s, w16)
    bias = {name: cp.zeros((e, stacks[name][0]), cp.float32) for name in stacks}

    def timed(fn: object, reps: int = 50) -> float:
        """GPU microseconds a launch of ``fn`` takes: ``reps`` of them captured in a CUDA graph (a launch from
        Python takes ~30 us of host time, more than a 1-token GEMV's), the graph timed with events."""
        fn()  # type: ignore[operator]
        stream.synchronize()
        stream.begin_capture()
        for _ in range(reps):
            fn()  # type: ignore[operator]
        graph = stream.end_capture()
        graph.launch(stream)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        graph.launch(stream)
        end.record(stream)
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / reps * 1e3  # us

    # (chunks ahead, min blocks per SM, chunks per warp, warps per SM)
    variants = [(2, 2, 4, 128), (2, 2, 2, 128), (2, 2, 1, 128), (2, 2, 2, 256), (3, 2, 2, 128), (2, 1, 2, 128),
                (2, 2, 4, 256), (2, 1, 2, 32)]  # fmt: skip
    defaults = (Mxfp4GroupedGemv.chunks_ahead, Mxfp4GroupedGemv.min_blocks_per_sm, Mxfp4GroupedGemv.chunks_per_warp,
                Mxfp4GroupedGemv.warps_per_sm)  # fmt: skip
    for tokens in (int(t) for t in args.tokens.split(",")):
        experts = cp.asarray(np.stack([rng.choice(e, k_top, replace=False) for _ in range(tokens)]).reshape(-1))
        distinct = len(set(cp.asnumpy(experts).tolist()))
        x = cp.asarray(rng.integers(0, 1 << 14, (tokens * k_top, 2 * i), dtype=np.uint16) & 0x3CFF)
        y = cp.zeros((tokens * k_top, 2 * i), cp.uint16)
        for name, (n, k, codes, s, w16) in stacks.items():
            gated = name == "down"
            mx_bytes = distinct * n * (padded(k) // 2 + padded(k) // 32)
            g16 = GroupedGemv("bfloat16", stream)
            div = 1 if gated else k_top

            def run16() -> None:
                g16(x, div, experts, tokens, k_top, w16, e, n, k, y, gated=gated)  # noqa: B023

            t16 = timed(run16)
            pct16 = 2 * distinct * n * k / t16 / 1e6 / args.peak_tbs * 100
            line = f"{tokens} tok {name:7s}: bf16 {t16:6.1f} us {pct16:3.0f} %; mxfp4 ahead/min-blocks/cpw/wps"
            for ahead, mb, cpw, wps in [defaults] if args.only_default else variants:
                Mxfp4GroupedGemv.chunks_ahead, Mxfp4GroupedGemv.min_blocks_per_sm = ahead, mb
                Mxfp4GroupedGemv.chunks_per_warp, Mxfp4GroupedGemv.warps_per_sm = cpw, wps
                g = Mxfp4GroupedGemv("bfloat16", stream)
                g.add(int(codes.data.ptr), int(s.data.ptr), e, n, k)
                kw = {"bias": bias[name], "act": "swiglu", "alpha": 1.702, "limit": 7.0} if gated else {}

                def run4() -> None:
                    g(x, div, experts, tokens, k_top, codes, e, n, k, y, gated, **kw)  # noqa: B023

                t4 = timed(run4)
                gbs = mx_bytes / t4 / 1e3
                line += f" | {ahead}/{mb}/{cpw}/{wps}: {t4:6.1f} us {gbs / args.peak_tbs / 10:3.0f} %"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
