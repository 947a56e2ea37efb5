# ruff: noqa: B023  (each loop iteration captures its closures into CUDA graphs before the next one rebinds them)
"""A lab for ``fi_engine/kernels/csrc/skinny_gemm.cu``, the tensor-core GEMM of decode steps of 5-32 rows: every
geometry of a sweep (tiles per warp ``NT``, steps in flight ``U``, warps a block ``W``, splits of k) on the 8B
shape's weights (QKV, O, gate/up, down) in bfloat16 and e4m3 (128x128-block and per-row scales), each checked
against a float32 reference and timed against cuBLAS (``torch.mm``, bfloat16) in CUDA graphs whose calls rotate
over weight copies larger than the L2, so every call reads HBM. Prints, for each shape, format and row count, the
fastest geometry, its us, GB/s of weight bytes and percent of ``--hbm-tbs``, and cuBLAS's; writes every timing to
``--csv``. Needs torch and CuPy on a GPU of SM 8.0 or newer; the kernels come from ``--cubin`` (compiled here by
``--build`` with nvcc, so a GPU run spends no time compiling) or from NVRTC. Not a test: the checks assert. The
engine's own candidates (the geometries and splits a Dense times) are benchmarks/lab_skinny_plans.py's.

    python benchmarks/lab_skinny_gemm.py --build /tmp/skinny_lab.cubin          # on any machine with nvcc
    python benchmarks/lab_skinny_gemm.py --cubin /tmp/skinny_lab.cubin [--rows 5,8,16,32] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
FORMATS = {"bf16": ("skinny_bf16_16", 0), "e4m3b": ("skinny8b_bf16_16", 1), "e4m3r": ("skinny8r_bf16_16", 2)}
# (NT, U, W, MINB, KX) geometries of each format family
GEOMETRIES = {  # KX 0: x read from global memory, not staged
    "bf16": [
        (1, 4, 8, 1, 512), (1, 4, 8, 1, 1024), (1, 4, 8, 1, 0), (1, 2, 8, 1, 0), (1, 4, 4, 2, 512),
        (2, 2, 8, 1, 512), (1, 2, 8, 2, 512), (1, 8, 8, 1, 512), (1, 4, 8, 2, 512), (1, 4, 4, 1, 0),
    ],
    "e4m3": [
        (1, 2, 8, 1, 512), (1, 4, 8, 1, 512), (1, 2, 8, 1, 0), (1, 4, 4, 2, 512), (2, 2, 8, 1, 512),
        (1, 2, 4, 3, 512), (2, 1, 8, 1, 512),
    ],
}  # fmt: skip
MTS = (1, 2, 3, 4)


def kernel_name(fmt: str, mt: int, nt: int, u: int, w: int, minb: int, kx: int) -> str:
    return f"{FORMATS[fmt][0]}_m{mt}_n{nt}_u{u}_w{w}_b{minb}_x{kx}"


def instances() -> list[str]:
    lines = []
    for fmt, (prefix, code) in FORMATS.items():
        for nt, u, w, minb, kx in GEOMETRIES["bf16" if fmt == "bf16" else "e4m3"]:
            for mt in MTS:
                lines.append(f"SKINNY({prefix}, true, false, {code}, {mt}, {nt}, {u}, {w}, {minb}, {kx})")
    return lines


def program() -> str:
    from fi_engine.kernels.cuda_sources import source

    return "#define SKINNY_INSTANCES " + " ".join(instances()) + "\n" + source("skinny_gemm.cu")


def build(out: str) -> None:
    src = Path(out).with_suffix(".cu")
    src.write_text(program())
    cmd = ["nvcc", "-arch=sm_90", "-cubin", "-o", out, str(src), "-Xptxas", "-v"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(res.stderr[-4000:])
    spills = [line for line in res.stderr.splitlines() if "spill" in line and not line.strip().startswith("0 bytes")]
    print(f"built {out}: {len(instances())} kernels; lines with spills: {len(spills)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", help="compile the sweep's kernels into this cubin with nvcc and stop")
    ap.add_argument("--cubin", help="the kernels, from --build (default: NVRTC here)")
    ap.add_argument("--rows", default="5,8,16,24,32")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--calls", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hbm-tbs", type=float, default=3.35)
    ap.add_argument("--csv", default="")
    ap.add_argument(
        "--profile",
        default="",
        help="SHAPE,FMT,ROWS,NT,U,W,MINB,KX,SPLITS: run that kernel and cuBLAS a few times each, untimed (for ncu)",
    )
    args = ap.parse_args()
    if args.build:
        build(args.build)
        return

    import cupy as cp
    import torch

    dev = torch.device("cuda")
    torch.manual_seed(0)
    module = cp.RawModule(path=args.cubin) if args.cubin else cp.RawModule(code=program())
    part = torch.empty(64 << 20, dtype=torch.uint8, device=dev)  # split-k sums
    done = torch.zeros(1 << 16, dtype=torch.int32, device=dev)  # column blocks' counters
    stream = torch.cuda.Stream()
    cstream = cp.cuda.ExternalStream(stream.cuda_stream)
    rows_list = [int(r) for r in args.rows.split(",")]
    top = max(rows_list)
    records: list[tuple[Any, ...]] = []
    best: dict[tuple[str, str, int], tuple[float, str]] = {}
    cublas: dict[tuple[str, int], float] = {}
    fns: dict[str, Any] = {}
    wrong: list[str] = []

    def fn(name: str) -> Any:
        if name not in fns:
            f = module.get_function(name)
            f.max_dynamic_shared_size_bytes = 2 * 8 * 4 * (1024 + 32) * 2
            fns[name] = f
        return fns[name]

    def graph_time(launch: Any, copies: int) -> float:
        """us per call: a graph of args.calls launches (launch(i) over weight copy i % copies), best of rounds."""
        with cstream:
            cstream.begin_capture()
            for i in range(args.calls):
                launch(i % copies)
            g = cstream.end_capture()
        g.launch(cstream)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(args.rounds):
            start.record(cstream)
            g.launch(cstream)
            end.record(cstream)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) * 1000 / args.calls)
        return min(times)

    only = args.profile.split(",") if args.profile else None
    if only:
        args.shapes, args.formats, args.rows = only[0], only[1], only[2]
        rows_list = [int(only[2])]
        GEOMETRIES["bf16" if only[1] == "bf16" else "e4m3"] = [tuple(int(v) for v in only[3:8])]
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        x = torch.randn(top, k, device=dev).to(torch.bfloat16)
        y = torch.empty(top, n, device=dev, dtype=torch.bfloat16)
        for fmt in args.formats.split(","):
            code = FORMATS[fmt][1]
            wbytes = n * k * (2 if code == 0 else 1)
            copies = max(2, -(-(256 << 20) // wbytes))
            if code == 0:
                w = torch.randn(n, k, device=dev).to(torch.bfloat16)
                ws = [w] + [w.clone() for _ in range(copies - 1)]
                ref_w = w.float()
                scale = torch.zeros(1, device=dev)
                s_ld, bn, bshift = 0, 16, 0
            else:
                w8 = (torch.randn(n, k, device=dev) * 2).to(torch.float8_e4m3fn)
                wu = w8.view(torch.uint8)
                ws = [wu] + [wu.clone() for _ in range(copies - 1)]
                if code == 1:
                    scale = torch.rand(-(-n // 128), -(-k // 128), device=dev) / (8 * k**0.5) + 1e-3
                    full = scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
                    s_ld, bn, bshift = scale.shape[1], 128, 1
                else:
                    scale = torch.rand(n, device=dev) / (8 * k**0.5) + 1e-3
                    full = scale[:, None]
                    s_ld, bn, bshift = 0, 16, 0
                ref_w = w8.float() * full
            wbytes += scale.numel() * 4 if code else 0
            kstep = 32 if code == 0 else 64
            for rows in rows_list:
                mt = -(-rows // 8)
                ref = x[:rows].float() @ ref_w.T
                if code == 0 and (shape, rows) not in cublas:
                    cublas[shape, rows] = t_cublas = _torch_graph_time(torch, stream, x[:rows], ws, y[:rows], args)
                    records.append((shape, "cublas", rows, "", t_cublas, wbytes / t_cublas / 1e3))
                for nt, u, wps, minb, kx in GEOMETRIES["bf16" if code == 0 else "e4m3"]:
                    name = kernel_name(fmt, mt, nt, u, wps, minb, kx)
                    f = fn(name)
                    blocks = -(-n // (16 * nt * wps))
                    for splits in (int(only[8]),) if only else (1, 2, 4, 7, 8, 14, 16):
                        kc = -(-k // splits)
                        unit = math.lcm(kstep * u, 128) if code == 1 else kstep * u  # block scales: whole blocks
                        kc = -(-kc // unit) * unit
                        grid_y = -(-k // kc)
                        if grid_y != splits:
                            continue
                        if kx and (kx // kstep) % u:
                            continue
                        smem = 2 * 8 * mt * (kx + 32) * 2 if kx else 0

                        def launch(i: int, f: Any = f, rows: int = rows) -> None:
                            f((blocks, grid_y), (32 * wps,),
                              (cp.uint64(x.data_ptr()), cp.uint64(ws[i].data_ptr()), cp.uint64(y.data_ptr()),
                               cp.uint64(part.data_ptr()), cp.uint64(done.data_ptr()),
                               cp.int32(rows), cp.int32(n), cp.int32(k), cp.int64(k), cp.int64(n), cp.int32(kc),
                               cp.uint64(scale.data_ptr()), cp.int64(s_ld), cp.int32(bn), cp.int32(bshift)),
                              shared_mem=smem)  # fmt: skip

                        y.fill_(float("nan"))
                        torch.cuda.synchronize()
                        with cstream:
                            launch(0)
                        stream.synchronize()
                        got = y[:rows].float()
                        err = float((got - ref).norm() / ref.norm())
                        ok = bool(torch.isfinite(got).all()) and err < 8e-3
                        left = int(done.abs().sum())
                        if not ok or left:
                            print(f"WRONG {shape} {fmt} {rows} rows {name} s{splits}: rel err {err}, {left} left")
                            wrong.append(name)
                            done.zero_()
                            continue
                        if only:
                            with cstream:
                                for i in range(5):
                                    launch(i % copies)
                            with torch.cuda.stream(stream):
                                for i in range(5):
                                    torch.mm(x[:rows], ws[i % copies].T, out=y[:rows])
                            stream.synchronize()
                            print(f"profiled {name} splits {splits} and torch.mm")
                            return
                        t = graph_time(launch, copies)
                        cfg = f"n{nt}u{u}w{wps}b{minb}x{kx}s{splits}"
                        records.append((shape, fmt, rows, cfg, t, wbytes / t / 1e3))
                        key = (shape, fmt, rows)
                        if key not in best or t < best[key][0]:
                            best[key] = (t, cfg)
        ws = []
        torch.cuda.empty_cache()

    print(f"\npeak {args.hbm_tbs} TB/s; us per call (GB/s, % of peak); cuBLAS = torch.mm bfloat16")
    print(f"{'shape':>8} {'rows':>4} {'cuBLAS bf16':>22} " + " ".join(f"{f:>34}" for f in args.formats.split(",")))
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        for rows in rows_list:
            tc = cublas.get((shape, rows))
            b16 = n * k * 2
            line = f"{shape:>8} {rows:>4} "
            line += (
                f"{tc:8.1f} ({b16 / tc / 1e3:5.0f}, {b16 / tc / 1e6 / args.hbm_tbs * 1e2:3.0f}%)" if tc else " " * 22
            )
            for fmt in args.formats.split(","):
                t, cfg = best.get((shape, fmt, rows), (float("nan"), "none right"))
                wb = n * k * (2 if fmt == "bf16" else 1)
                line += f" {t:7.1f} ({wb / t / 1e3:5.0f},{wb / t / 1e6 / args.hbm_tbs * 1e2:3.0f}%) {cfg:>14}"
            print(line)
    print(f"wrong: {len(wrong)} configurations ({sorted(set(wrong))[:8]})")
    if args.csv:
        with open(args.csv, "w") as fh:
            fh.write("shape,format,rows,config,us,GBps\n")
            for r in records:
                fh.write(",".join(str(v) for v in r) + "\n")


def _torch_graph_time(torch: Any, stream: Any, x: Any, ws: list[Any], y: Any, args: Any) -> float:
    copies = len(ws)
    with torch.cuda.stream(stream):
        for w in ws[:2]:
            torch.mm(x, w.T, out=y)
        stream.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for i in range(args.calls):
                torch.mm(x, ws[i % copies].T, out=y)
        g.replay()
        times = []
        for _ in range(args.rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            g.replay()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000 / args.calls)
    return min(times)


if __name__ == "__main__":
    main()
