"""What reading a decode GEMM's weights costs without its arithmetic: kernels that only load the 8B shape's bfloat16
weights (QKV, O, gate/up, down) the way the skinny GEMM does (``fi_engine/kernels/csrc/skinny_gemm.cu``: each warp
16 weight rows, 64 bytes of each row a step, ``U`` steps in flight; k split over the grid), the same with x's loads
of 8 or 32 rows added (the 16-byte vectors the lanes read from L1 beside their weights, no mma; for 32 rows also
from shared memory filled once, without the staging's copies and barriers, and staged as the GEMM stages it), and
the same bytes read as one contiguous run a warp (a tile-major layout), against a device-to-device copy. Each kernel
folds what it loads into one word (no output), timed as CUDA graphs of ``--calls`` launches rotating over weight
copies larger than the L2, best of ``--rounds``; percent of ``--hbm-tbs`` (default: the device's peak).

So a GEMM's time splits into the floor its reads set, what its x loads add and what its arithmetic and split sums
add (``lab_skinny_plans.py`` times the GEMM itself). Needs a GPU and CuPy. Not a test.

    python benchmarks/lab_weight_reads.py [--shapes qkv,o,gate_up,down] [--calls 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from roofline import add_hbm_tbs_argument, roofline_denominator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROTATE_BYTES = 256 << 20  # weight copies a graph rotates over: past any L2
X_ROWS = 32  # rows of the x buffer the x-loading patterns read (k of the widest shape each)
PATTERNS = {  # name: (kernel prefix, what it reads)
    "rows": ("rows", "the skinny GEMM's weight reads: rows g and g + 8 of a warp's 16, 64 bytes of each a step"),
    "rows+x8": ("xrows1", "those, and x's vector of 8 rows a step (a 16-byte load a lane)"),
    "rows+x32": ("xrows4", "those, and x's vectors of 32 rows a step (four 16-byte loads a lane)"),
    "rows+x32 shared": ("sxrows4", "those, x's four vectors a lane from shared memory filled once"),
    "rows+x32 staged": ("stxrows4", "those, x staged in shared memory as the GEMM stages it (copies, barriers)"),
    "contiguous": ("contig", "the same bytes a warp as one contiguous run, 512 bytes an instruction"),
}
GEOMETRIES = ((2, 4), (4, 4), (8, 4), (4, 8), (8, 8))  # (steps in flight U, warps a block)
SPLITS = (1, 2, 4, 8)  # k ranges over the grid's y dimension
XS_ROW = 68  # 16-byte vectors of a shared x row: 512 inputs and 32 of padding (SOURCE gets it by -D)
STAGED_BYTES = 2 * 32 * XS_ROW * 16  # the staged pattern's two passes of 32 rows
OPTIONS = ("-std=c++17", f"-DXS_ROW={XS_ROW}")

# the weights loaded by the skinny GEMM's own load_weights (csrc/load_weights.cuh: past L1), which program() puts first
SOURCE = r"""
// One warp's share of a [n, k] 16-bit weight, range blockIdx.y of kc inputs: 16 rows x 2 kc bytes, read a step (1 KB
// a warp, two 16-byte vectors a lane) at a time with U steps in flight (the next U loaded while these are folded).
// CONTIG: as one contiguous run at the warp's index; else rows g and g + 8 of the warp's 16, vector q of each
// row's 64 bytes a step (lane g * 4 + q). MT > 0: with each step, x's vector q of rows 8 i + g, i < MT, from a
// [32, k] 16-bit x (L1); SHARED: from shared memory instead, 32 rows of 512 inputs filled once (the step's inputs
// modulo 512), each row padded by 64 bytes as the skinny GEMM stages x, so a quarter-warp's reads take distinct
// banks: what the lanes' x loads cost without the staging's copies and barriers.
// STAGED: x's 32 rows staged as the skinny GEMM stages them (dynamic shared memory, two buffers of 512 inputs):
// the block's threads ask for pass p + 1 by asynchronous copies at pass p's first step, between two barriers, after
// waiting for pass p's own copies.
template <int U, int WARPS, bool CONTIG, int MT, bool SHARED = false, bool STAGED = false>
__device__ __forceinline__ void reads(const unsigned char* __restrict__ w, unsigned* __restrict__ out, int n, int k,
                                      int kc, const uint4* __restrict__ x) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    __shared__ uint4 xs[SHARED ? 32 * XS_ROW : 1];
    extern __shared__ uint4 staged[];  // STAGED: two passes of 32 rows of XS_ROW vectors
    if (SHARED) {
        for (int v = threadIdx.x; v < 32 * XS_ROW; v += blockDim.x) xs[v] = make_uint4(v, v + 1, v + 2, v + 3);
        __syncthreads();
    }
    const long long x_lo = (long long)blockIdx.y * kc / 8;  // the range's first x vector of a row
    auto stage = [&](int p) {  // pass p's x: 32 rows of 64 vectors into buffer p & 1
        for (int v = threadIdx.x; v < 32 * 64; v += blockDim.x) {
            const int r = v >> 6, c = v & 63;
            const unsigned at = (unsigned)__cvta_generic_to_shared(staged + (p & 1) * 32 * XS_ROW + r * XS_ROW + c);
            const uint4* from = x + r * (long long)(k / 8) + x_lo + 64 * p + c;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(at), "l"(from));
        }
        asm volatile("cp.async.commit_group;");
    };
    const int passes = (kc + 511) / 512;
    if (STAGED) stage(0);
    const int wid = blockIdx.x * WARPS + warp;
    const int range_bytes = 2 * kc, steps = range_bytes / 64;
    const uint4 *pa, *pb;
    int stride;  // vectors from one step's to the next
    if (CONTIG) {
        const long long run = 16ll * range_bytes;
        pa = reinterpret_cast<const uint4*>(w + ((long long)blockIdx.y * gridDim.x * WARPS + wid) * run) + lane;
        pb = pa + 32;
        stride = 64;
    } else {
        const unsigned char* base = w + (long long)blockIdx.y * range_bytes;
        pa = reinterpret_cast<const uint4*>(base + (long long)min(wid * 16 + g, n - 1) * 2 * k) + q;
        pb = reinterpret_cast<const uint4*>(base + (long long)min(wid * 16 + g + 8, n - 1) * 2 * k) + q;
        stride = 4;
    }
    unsigned acc = 0;
    uint4 cur[U][2];
#pragma unroll
    for (int u = 0; u < U; ++u) cur[u][0] = load_weights(pa + stride * u), cur[u][1] = load_weights(pb + stride * u);
    for (int s = 0; s < steps; s += U) {
        uint4 nxt[U][2];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = stride * min(s + U + u, steps - 1);
            nxt[u][0] = load_weights(pa + t), nxt[u][1] = load_weights(pb + t);
        }
        if (STAGED && s % 16 == 0) {  // a pass is 16 steps of 32 inputs
            const int p = s / 16;
            __syncthreads();  // every warp is done with the buffer pass p + 1 goes into
            if (p + 1 < passes) stage(p + 1);
            else asm volatile("cp.async.commit_group;");
            asm volatile("cp.async.wait_group 1;" ::: "memory");
            __syncthreads();
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                uint4 xv;
                if (SHARED) {
                    xv = xs[(8 * i + g) * XS_ROW + ((4 * (s + u) + q) & 63)];
                } else if (STAGED) {
                    xv = staged[((s + u) / 16 & 1) * 32 * XS_ROW + (8 * i + g) * XS_ROW + ((4 * (s + u) + q) & 63)];
                } else {
                    const long long at = ((8 * i + g) * (long long)k + (long long)blockIdx.y * kc) / 8;
                    xv = __ldg(x + at + 4 * min(s + u, steps - 1) + q);
                }
                acc += xv.x ^ xv.y ^ xv.z ^ xv.w;
            }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int h = 0; h < 2; ++h) acc ^= cur[u][h].x ^ cur[u][h].y ^ cur[u][h].z ^ cur[u][h].w;
#pragma unroll
        for (int u = 0; u < U; ++u) cur[u][0] = nxt[u][0], cur[u][1] = nxt[u][1];
    }
    if (STAGED) asm volatile("cp.async.wait_all;" ::: "memory");
    if (acc == 0x9e3779b9u) out[0] = acc;  // (never in practice: keeps the loads)
}

// {name}_u{U}_w{W}(w, o, n, k, kc, x): reads<U, W, the pattern's template arguments>
#define READ_KERNEL(name, U, W, ...)                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * W) name##_u##U##_w##W(const unsigned char* w, unsigned* o,    \
                                                                           int n, int k, int kc, const uint4* x) {  \
        reads<U, W, __VA_ARGS__>(w, o, n, k, kc, x);                                                               \
    }
// every pattern of PATTERNS at one geometry
#define READS(U, W)                                                                                               \
    READ_KERNEL(rows, U, W, false, 0) READ_KERNEL(xrows1, U, W, false, 1) READ_KERNEL(xrows4, U, W, false, 4)     \
    READ_KERNEL(sxrows4, U, W, false, 4, true) READ_KERNEL(stxrows4, U, W, false, 4, false, true)                 \
    READ_KERNEL(contig, U, W, true, 0)
READS(2, 4) READS(4, 4) READS(8, 4) READS(4, 8) READS(8, 8)
"""


def program() -> str:
    """The CUDA program: the engine's ``load_weights.cuh``, then :data:`SOURCE`."""
    from fi_engine.kernels.cuda_sources import source

    return source("load_weights.cuh") + "\n" + SOURCE


def best_of(cp: Any, stream: Any, graph: Any, rounds: int, calls: int) -> float:
    """The fastest of ``rounds`` replays of ``graph``, us a call."""
    graph.launch(stream)
    stream.synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    best = float("inf")
    for _ in range(rounds):
        start.record(stream)
        graph.launch(stream)
        end.record(stream)
        end.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(start, end) * 1e3 / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    add_hbm_tbs_argument(ap)
    args = ap.parse_args()

    import cupy as cp

    bandwidth = roofline_denominator(0, hbm_tbs=args.hbm_tbs)
    print(bandwidth.line)
    module = cp.RawModule(code=program(), options=OPTIONS)
    out = cp.zeros(1, cp.uint32)
    # (and a pass past the end: the staged pattern's last pass of a range may run past it, as its k need not be whole
    # passes)
    x = cp.ones(X_ROWS * max(k for _, k in SHAPES.values()) + 1024, cp.uint16)
    stream = cp.cuda.Stream(non_blocking=True)
    summary = []
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        nbytes = 2 * n * k
        copies = max(2, -(-ROTATE_BYTES // nbytes))
        weights = [cp.ones(n * k, cp.uint16) for _ in range(copies)]
        dst = cp.empty(n * k, cp.uint16)
        print(f"\n{shape} {n}x{k} bf16, {nbytes / 1e6:.1f} MB a call")
        with stream:
            stream.begin_capture()
            for c in range(args.calls):
                dst.data.copy_from_device_async(weights[c % copies].data, nbytes, stream)
            us = best_of(cp, stream, stream.end_capture(), args.rounds, args.calls)
            gbps = 2 * nbytes / us / 1e3  # (read and written)
            print(f"  {'device-to-device copy':>34} {us:8.2f} us {gbps:6.0f} GB/s read + written "
                  f"{100 * gbps * 1e9 / bandwidth.bytes_per_s:5.1f} %")  # fmt: skip
            best: dict[str, tuple[float, str]] = {}
            for label, (prefix, _) in PATTERNS.items():
                for u, warps in GEOMETRIES:
                    fn = module.get_function(f"{prefix}_u{u}_w{warps}")
                    smem = STAGED_BYTES if prefix == "stxrows4" else 0
                    fn.max_dynamic_shared_size_bytes = smem
                    for s in SPLITS:
                        if n % (16 * warps) or (2 * k // s) % 64:
                            continue
                        grid = (n // (16 * warps), s)
                        stream.begin_capture()
                        for c in range(args.calls):
                            fn(grid, (32 * warps,), (weights[c % copies], out, cp.int32(n), cp.int32(k),
                                                     cp.int32(k // s), x), shared_mem=smem)  # fmt: skip
                        us = best_of(cp, stream, stream.end_capture(), args.rounds, args.calls)
                        gbps = nbytes / us / 1e3
                        name = f"{label} u{u} w{warps} grid {grid}"
                        print(f"  {name:>34} {us:8.2f} us {gbps:6.0f} GB/s "
                              f"{100 * gbps * 1e9 / bandwidth.bytes_per_s:5.1f} %")  # fmt: skip
                        if us < best.get(label, (float("inf"), ""))[0]:
                            best[label] = (us, name)
        line = f"{shape:>8}: " + ", ".join(
            f"{label} {us:.2f} us ({100 * nbytes / us / 1e3 * 1e9 / bandwidth.bytes_per_s:.0f} %)"
            for label, (us, _) in best.items()
        )
        summary.append(line)
        weights = []
        cp.get_default_memory_pool().free_all_blocks()
    print("\nthe fastest launch of each pattern (" + "; ".join(f"{k}: {v[1]}" for k, v in PATTERNS.items()) + ")")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
