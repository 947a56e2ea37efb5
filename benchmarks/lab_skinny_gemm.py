# ruff: noqa: B023  (each loop iteration captures its closures into CUDA graphs before the next one rebinds them)
"""A lab for ``fi_engine/kernels/csrc/skinny_gemm.cu``, the tensor-core GEMM of decode steps of 5-32 rows, and its
Hopper form on warpgroup MMA (``csrc/skinny_wgmma.cu``, 9-32 rows): every geometry of a sweep (skinny: tiles per warp
``NT``, steps in flight ``U``, warps a block ``W``; wgmma: warpgroups a block, ``U``, inputs of x staged a pass;
both: splits of k) on the 8B shape's weights (QKV, O, gate/up, down) in bfloat16, e4m3 (128x128-block and per-row
scales) and AWQ int4 (groups of 128, the int4 GEMV's layout), each checked against a float32 reference of the
dequantized weights (its relative error printed where it fails) and timed against cuBLAS (``torch.mm``, bfloat16)
in CUDA graphs whose calls rotate over weight copies larger than the L2, so every call reads HBM. Prints, for each
shape, format and row count, the fastest geometry of each kernel, its us, GB/s of weight bytes and percent of
``--hbm-tbs``, and cuBLAS's; writes every timing to ``--csv``. Needs torch and CuPy on a GPU of SM 8.0 or newer
(wgmma: SM 9.0); the skinny kernels come from ``--cubin`` (compiled here by ``--build`` with nvcc, so a GPU run
spends no time compiling) or from NVRTC, the wgmma kernels from NVRTC (sm_90a). Not a test: the checks assert.

The wgmma kernels' B operand descriptor: each configuration is checked with the fields
``fi_engine.kernels.skinny_wgmma.descriptor_fields`` gives; where that result is wrong, again with the two byte
offsets swapped, and the line says which (if only the swapped one is right, the descriptor's LBO and SBO are the
other way round on this GPU).

    python benchmarks/lab_skinny_gemm.py --build /tmp/skinny_lab.cubin          # on any machine with nvcc
    python benchmarks/lab_skinny_gemm.py --cubin /tmp/skinny_lab.cubin [--rows 5,8,16,32] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fi_engine.kernels.skinny_wgmma import WgmmaGeometry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
FORMATS = {
    "bf16": ("skinny_bf16_16", 0),
    "e4m3b": ("skinny8b_bf16_16", 1),
    "e4m3r": ("skinny8r_bf16_16", 2),
    "int4": ("skinny4_bf16_16", 3),
}
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
    "int4": [(1, 1, 8, 1, 0), (1, 2, 8, 1, 512), (1, 2, 8, 1, 0), (1, 2, 4, 2, 512)],
}  # fmt: skip
# the wgmma kernel's (warpgroups, U, KX) geometries and its row counts: x rows padded to 16 or 32
WGMMA_GEOMETRIES = [(2, 2, 512), (1, 4, 512), (2, 2, 256), (1, 2, 512), (2, 4, 256), (1, 4, 256)]
WGMMA_SPLITS = (1, 2, 4, 8, 16)
MTS = (1, 2, 3, 4)


def family(fmt: str) -> str:
    return fmt if fmt in ("bf16", "int4") else "e4m3"


def kernel_name(fmt: str, mt: int, nt: int, u: int, w: int, minb: int, kx: int) -> str:
    return f"{FORMATS[fmt][0]}_m{mt}_n{nt}_u{u}_w{w}_b{minb}_x{kx}"


def wgmma_geometries(code: int) -> list[WgmmaGeometry]:
    from fi_engine.kernels.skinny_wgmma import WgmmaGeometry

    scaled = code in (1, 3)
    return [WgmmaGeometry(wg, u, kx) for wg, u, kx in WGMMA_GEOMETRIES if not (scaled and code == 1 and u % 2)]


def wgmma_program(formats: list[str]) -> str:
    from fi_engine.kernels.cuda_sources import source

    lines = [
        g.instance(FORMATS[fmt][1], True, False, nr)
        for fmt in formats
        for g in wgmma_geometries(FORMATS[fmt][1])
        for nr in (16, 32)
    ]
    return "#define WGMMA_INSTANCES " + " ".join(lines) + "\n" + source("skinny_wgmma.cu")


def instances() -> list[str]:
    lines = []
    for fmt, (prefix, code) in FORMATS.items():
        for nt, u, w, minb, kx in GEOMETRIES[family(fmt)]:
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
    ap.add_argument("--no-wgmma", action="store_true", help="leave the wgmma kernels out (SM 9.0 only)")
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
    wgmma_fns: dict[str, Any] = {}
    if not args.no_wgmma and str(cp.cuda.Device().compute_capability) == "90":
        import os

        from fi_engine.kernels.skinny_wgmma import compile_sm90a

        wmod, wpath = compile_sm90a(wgmma_program(args.formats.split(",")))
        for fmt in args.formats.split(","):
            for g in wgmma_geometries(FORMATS[fmt][1]):
                for nr in (16, 32):
                    f = wmod.get_function(g.name(FORMATS[fmt][1], True, False, nr))
                    f.max_dynamic_shared_size_bytes = g.smem(nr)
                    wgmma_fns[g.name(FORMATS[fmt][1], True, False, nr)] = f
        os.unlink(wpath)
    part = torch.empty(64 << 20, dtype=torch.uint8, device=dev)  # split-k sums
    done = torch.zeros(1 << 16, dtype=torch.int32, device=dev)  # column blocks' counters
    stream = torch.cuda.Stream()
    cstream = cp.cuda.ExternalStream(stream.cuda_stream)
    rows_list = [int(r) for r in args.rows.split(",")]
    top = max(rows_list)
    records: list[tuple[Any, ...]] = []
    best: dict[tuple[str, str, int], tuple[float, str]] = {}
    best_wg: dict[tuple[str, str, int], tuple[float, str]] = {}
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
        GEOMETRIES[family(only[1])] = [tuple(int(v) for v in only[3:8])]
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        x = torch.randn(top, k, device=dev).to(torch.bfloat16)
        y = torch.empty(top, n, device=dev, dtype=torch.bfloat16)
        for fmt in args.formats.split(","):
            code = FORMATS[fmt][1]
            wbytes = n * k * 2 if code == 0 else n * k // 2 if code == 3 else n * k
            copies = max(2, -(-(256 << 20) // wbytes))
            if code == 3:
                ws, ref_w, scale, s_ld, bn, bshift = _int4_weights(torch, dev, n, k, copies)
            elif code == 0:
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
            kstep = {0: 32, 3: 128}.get(code, 64)
            for rows in rows_list:
                mt = -(-rows // 8)
                ref = x[:rows].float() @ ref_w.T
                if code == 0 and (shape, rows) not in cublas:
                    cublas[shape, rows] = t_cublas = _torch_graph_time(torch, stream, x[:rows], ws, y[:rows], args)
                    records.append((shape, "cublas", rows, "", t_cublas, wbytes / t_cublas / 1e3))
                for nt, u, wps, minb, kx in GEOMETRIES[family(fmt)]:
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
                if wgmma_fns and 9 <= rows <= 32:
                    wgmma_sweep(
                        cp, torch, cstream, stream, wgmma_fns, args, graph_time, records, best_wg, wrong,
                        (shape, fmt, code, rows, n, k, x, y, ws, scale, s_ld, bn, bshift, ref, wbytes, copies),
                        part, done,
                    )  # fmt: skip
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
                wb = n * k * (2 if fmt == "bf16" else 1) // (2 if fmt == "int4" else 1)
                line += f" {t:7.1f} ({wb / t / 1e3:5.0f},{wb / t / 1e6 / args.hbm_tbs * 1e2:3.0f}%) {cfg:>14}"
            print(line)
            for fmt in args.formats.split(","):
                if (shape, fmt, rows) in best_wg:
                    t, cfg = best_wg[shape, fmt, rows]
                    ts = best.get((shape, fmt, rows), (float("nan"), ""))[0]
                    wb = n * k * (2 if fmt == "bf16" else 1) // (2 if fmt == "int4" else 1)
                    print(
                        f"{'':>8} {rows:>4} wgmma {fmt:>6}: {t:7.1f} us ({wb / t / 1e3:5.0f} GB/s, "
                        f"{wb / t / 1e6 / args.hbm_tbs * 1e2:3.0f}%) {cfg:>16}, {ts / t:4.2f}x the skinny GEMM's best"
                    )
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


def _int4_weights(torch: Any, dev: Any, n: int, k: int, copies: int) -> tuple[Any, ...]:
    """Random AWQ-style int4 weights (groups of 128) in the int4 GEMV's layout: ``(copies of the packed weights,
    the float32 dequantized weight, the records, groups a row, half_n 0, gshift)`` (the kernels' q, q_ld, q_a, q_b)."""
    import numpy as np

    from fi_engine.checkpoint.int4_weights import Int4Matrix, decode_gemv_layout

    rng = np.random.default_rng(n + k)
    groups = k // 128
    scales = (rng.uniform(0.5, 2.0, (groups, n)) * 0.02).astype(np.float16).astype(np.float32)
    m = Int4Matrix(rng.integers(0, 16, (n, k)).astype(np.uint8), rng.integers(0, 17, (groups, n)).astype(np.uint8),
                   scales, 128)  # fmt: skip
    weights, records = m.gemv_layout()
    ref_w = torch.from_numpy(decode_gemv_layout(weights, records, k).astype(np.float32)).to(dev)
    w = torch.from_numpy(weights).to(dev)
    rec = torch.from_numpy(records.view(np.int32)).to(dev)
    return [w] + [w.clone() for _ in range(copies - 1)], ref_w, rec, groups, 0, 1


def wgmma_sweep(
    cp: Any, torch: Any, cstream: Any, stream: Any, fns: dict[str, Any], args: Any, graph_time: Any,
    records: list[tuple[Any, ...]], best_wg: dict[tuple[str, str, int], tuple[float, str]], wrong: list[str],
    case: tuple[Any, ...], part: Any, done: Any,
) -> None:  # fmt: skip
    """Every wgmma geometry and split of one shape, format and row count: checked against float32 (with the
    descriptor's byte offsets as made, then swapped where that is wrong), then timed."""
    from fi_engine.kernels.skinny_wgmma import descriptor_fields, padded_rows, range_length

    shape, fmt, code, rows, n, k, x, y, ws, scale, s_ld, bn, bshift, ref, wbytes, copies = case
    nr = padded_rows(rows)
    fields = descriptor_fields(nr)
    lbo, sbo = (fields >> 16) & 0x3FFF, (fields >> 32) & 0x3FFF
    swapped = (fields & ~(0x3FFF << 16) & ~(0x3FFF << 32)) | sbo << 16 | lbo << 32
    for g in wgmma_geometries(code):
        name = g.name(code, True, False, nr)
        f = fns[name]
        blocks = -(-n // g.rows_per_block)
        for splits in WGMMA_SPLITS:
            kc = range_length(code, k, splits, 128 if code == 1 else 0)
            if -(-k // kc) != splits:
                continue

            def launch(i: int, desc: int = fields, f: Any = f, kc: int = kc, g: Any = g) -> None:
                f((blocks, -(-k // kc)), (g.threads,),
                  (cp.uint64(x.data_ptr()), cp.uint64(ws[i].data_ptr()), cp.uint64(y.data_ptr()),
                   cp.uint64(part.data_ptr()), cp.uint64(done.data_ptr()),
                   cp.int32(rows), cp.int32(n), cp.int32(k), cp.int64(k), cp.int64(n), cp.int32(kc),
                   cp.uint64(scale.data_ptr()), cp.int64(s_ld), cp.int32(bn), cp.int32(bshift), cp.uint64(desc)),
                  shared_mem=g.smem(nr))  # fmt: skip

            errs = []
            for desc in (fields, swapped):
                y.fill_(float("nan"))
                torch.cuda.synchronize()
                with cstream:
                    launch(0, desc)
                stream.synchronize()
                got = y[:rows].float()
                err = float((got - ref).norm() / ref.norm())
                errs.append(err)
                left = int(done.abs().sum())
                if left:
                    done.zero_()
                if bool(torch.isfinite(got).all()) and err < 8e-3 and not left:
                    break
            cfg = f"w{g.warpgroups}u{g.u}x{g.kx}s{splits}"
            if len(errs) == 2 or errs[-1] >= 8e-3:
                how = "swapped LBO/SBO right" if errs[-1] < 8e-3 else "wrong either way"
                print(f"WRONG wgmma {shape} {fmt} {rows} rows {cfg}: rel err {errs[0]:.3g} as made; {how} {errs[1:]}")
                wrong.append(name)
                continue
            print(f"ok wgmma {shape} {fmt} {rows} rows {cfg}: rel err {errs[0]:.3g}")
            t = graph_time(launch, copies)
            records.append((shape, f"wgmma-{fmt}", rows, cfg, t, wbytes / t / 1e3))
            key = (shape, fmt, rows)
            if key not in best_wg or t < best_wg[key][0]:
                best_wg[key] = (t, cfg)


if __name__ == "__main__":
    main()
