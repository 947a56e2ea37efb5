"""The grouped GEMVs of a mixture-of-experts decode step alone, on a Mixtral-shaped layer (8 experts, top-2, hidden
4096, intermediate 14336; ``--experts/--hidden/--intermediate`` for others): the 16-bit experts'
(:class:`~fi_engine.kernels.moe_gemv.GroupedGemv`) against the e4m3 experts read as stored
(:class:`~fi_engine.kernels.fp8_moe_gemv.Fp8GroupedGemv`, 128x128 block scales and per-row scales, the codes
row-major and tiled), for the gate/up projection and the down projection (its SiLU-and-mul made as it stages its
rows), at each of ``--tokens``. Settings to compare, each a comma-separated list: ``--min-blocks``
(``Fp8GroupedGemv.min_blocks_per_sm``), ``--ahead`` (``chunks_ahead``); ``--narrow`` also times ``wide_blocks``
off.

Each launch is timed with CUDA events over ``--iters`` back-to-back launches, the variants interleaved in rounds
(the best round kept); the routing is drawn once per token count (each token's ``top_k`` distinct experts,
uniform) and the bytes a launch reads are the distinct chosen experts' weights (and scales), so the TB/s figure
is what the launch streamed over its time. Weights are random codes (the time does not depend on them). Needs a
GPU and CuPy. ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from typing import Any

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--min-blocks", default="1", help="Fp8GroupedGemv.min_blocks_per_sm settings to compare (comma-separated)"
    )
    ap.add_argument("--ahead", default="2", help="Fp8GroupedGemv.chunks_ahead settings to compare (comma-separated)")
    ap.add_argument(
        "--narrow", action="store_true", help="also time Fp8GroupedGemv.wide_blocks off (8 warps a block at most)"
    )
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    import cupy as cp

    from fi_engine.kernels.fp8_moe_gemv import Fp8GroupedGemv
    from fi_engine.kernels.moe_gemv import GroupedGemv

    e, h, i, k = a.experts, a.hidden, a.intermediate, a.top_k
    stream = cp.cuda.Stream(non_blocking=True)
    g16 = GroupedGemv("bfloat16", stream)
    g8s = {}
    for m in a.min_blocks.split(","):
        for ahead in a.ahead.split(","):
            Fp8GroupedGemv.min_blocks_per_sm, Fp8GroupedGemv.chunks_ahead = int(m), int(ahead)
            g8s[f"{m} a{ahead}"] = Fp8GroupedGemv("bfloat16", stream)
    rng = np.random.default_rng(0)
    w16 = {"gate_up": cp.asarray(rng.integers(0x3C00, 0x3D00, (e, 2 * i, h), dtype=np.uint16)),
           "down": cp.asarray(rng.integers(0x3C00, 0x3D00, (e, h, i), dtype=np.uint16))}  # fmt: skip
    w8 = {name: cp.asarray(rng.integers(0, 0x70, arr.shape, dtype=np.uint8)) for name, arr in w16.items()}
    scales = {
        ("gate_up", True): cp.full((e, 2 * i // 128, -(-h // 128)), 0.01, cp.float32),
        ("down", True): cp.full((e, h // 128, -(-i // 128)), 0.01, cp.float32),
        ("gate_up", False): cp.full((e, 2 * i), 0.01, cp.float32),
        ("down", False): cp.full((e, h), 0.01, cp.float32),
    }
    fp8 = {}  # (projection, block) -> a registered copy of the codes (the GEMV keys its registry by address)
    for (name, block), s in scales.items():
        codes = w8[name].copy()
        n, kk = codes.shape[1:]
        tiled = codes.copy()  # (timing only: the same random bytes read as the tiled layout)
        for g8 in g8s.values():
            g8.add(int(codes.data.ptr), int(s.data.ptr), e, n, kk, (128, 128) if block else None)
            g8.add(int(tiled.data.ptr), int(s.data.ptr), e, n, kk, (128, 128) if block else None, tiled=True)
        fp8[name, block] = (codes, s)
        fp8[name, block, "tiled"] = (tiled, s)

    def timed(g: Any, wide: bool, *args: Any, **kwargs: Any) -> None:
        Fp8GroupedGemv.wide_blocks = wide  # read at each launch
        g(*args, **kwargs)

    rows = []
    for t in a.tokens:
        chosen = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32).reshape(-1)
        experts = cp.asarray(chosen)
        distinct = len(np.unique(chosen))
        x = cp.asarray(rng.integers(0x3C00, 0x3D00, (t, h), dtype=np.uint16))
        gu = cp.asarray(rng.integers(0x3C00, 0x3D00, (t * k, 2 * i), dtype=np.uint16))
        y_gu, y_down = cp.empty((t * k, 2 * i), cp.uint16), cp.empty((t * k, h), cp.uint16)
        cases = {}
        for name, n, kk, inp, div, out, gated in (
            ("gate_up", 2 * i, h, x, k, y_gu, False),
            ("down", h, i, gu, 1, y_down, True),
        ):
            cases[f"{name} bf16"] = (
                partial(g16, inp, div, experts, t, k, w16[name], e, n, kk, out, gated=gated),
                distinct * n * kk * 2,
            )
            for block in (True, False):
                for layout in ("rows", "tiled"):
                    codes, s = fp8[(name, block) if layout == "rows" else (name, block, "tiled")]
                    for m, g8 in g8s.items():
                        for wide in (True, False) if a.narrow else (True,):
                            label = (
                                f"{name} e4m3 {'block' if block else 'row'} {layout} m{m}{'' if wide else ' narrow'}"
                            )
                            cases[label] = (
                                partial(timed, g8, wide, inp, div, experts, t, k, codes, e, n, kk, out, gated=gated),
                                distinct * (n * kk + s.nbytes // e),
                            )
        best = dict.fromkeys(cases, float("inf"))
        with stream:
            for _ in range(a.rounds):
                for label, (run, _) in cases.items():
                    run()
                    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                    e0.record(stream)
                    for _ in range(a.iters):
                        run()
                    e1.record(stream)
                    e1.synchronize()
                    best[label] = min(best[label], cp.cuda.get_elapsed_time(e0, e1) * 1e3 / a.iters)
        for label, (_, nbytes) in cases.items():
            us = best[label]
            rows.append({"tokens": t, "case": label, "us": us, "bytes": nbytes, "tb_per_s": nbytes / us / 1e6})
            print(f"{t:3d} tokens ({distinct} experts) {label:36s} {us:8.1f} us  {nbytes / us / 1e6:5.2f} TB/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
