"""The CUDA C of the engine's own kernels: three sources, which :class:`~fi_engine.kernels.dense.Dense` compiles with
NVRTC into three modules, checks the arguments of and launches (nothing here runs), and a routing function that
one of them shares with the MoE layer's module.

:data:`ROW_KERNELS_SOURCE` (compiled as is; launched through CuPy ``RawKernel`` or, for the gather of the fused
decode step, the driver's launch). Copies and exact comparisons only: nothing is rounded.

- ``gather_rows16(src, rows, dst, width, src_ld, dst_ld)``: ``dst[r, :width] = src[rows[r], :width]``, 16-bit
  elements, ``rows`` int32; grid (output rows, column blocks) (the embedding lookup).
- ``gather_rows16_shard(..., lo, n)``: the same for a vocabulary shard holding ids ``[lo, lo + n)``; a row whose
  id is outside gets zeros (the other ranks add theirs).
- ``argmax_rows(x, n, ld, out)``: ``out[r]`` = the first index of the largest of ``x[r, :n]`` (float32 ``x``
  with row stride ``ld``, int32 ``out [rows]``); NaN never wins, a row of NaN/-inf gives 0. One block per row
  (a multiple of 32 threads, at most 1024).
- ``argmax_rows_shard(x, n, ld, offset, pairs)``: a shard's ``pairs [rows, 2]`` int32 = (the largest value's
  float32 bits, its first index + ``offset``).
- ``combine_argmax(pairs, parts, rows, out)``: the all-gathered ``pairs [parts, rows, 2]`` combined into one
  index per row, as :func:`~fi_engine.layers.tensor_parallel.combine_shard_argmax` does in numpy; one thread a row.
- ``unshard_columns(src, rows, width, n, dst, dst_ld)``: the all-gathered float32 shards ``src [parts, rows,
  width]`` as ``dst [rows, :n]`` (the padding columns past ``n`` dropped).

:data:`GEMV_SOURCE` (launched by the driver, Dense._prepared). ``gemv_{f16,bf16}_{f16,f32}_r{R}(x, w, y, rows, n,
k, x_ld, y_ld)``: ``y[r, j] = sum_c x[r, c] * w[j, c]`` for ``r < rows <= 4`` -- ``x [rows, k]`` and ``w [n, k]``
(row-major, a Linear weight) 16-bit, ``y [rows, n]`` 16-bit or float32, row strides ``x_ld``, ``y_ld`` in
elements. One warp per output column (Dense launches 4 a block, ``ceil(n / 4)`` blocks): lane ``l`` sums, in
float32, the 8-element vectors ``l, l + 32, ...`` of ``w``'s row, then a butterfly sums the 32 lanes. Each lane
loads 4 weight vectors before summing them (``ld.global.nc.L1::no_allocate``: weights are read once, so they
bypass L1), and loads its next 4 before summing those (``GEMV_PIPELINE``); the sums are the same, in the same
order, as one vector at a time. Each kernel is compiled for one row count ``R`` = ``rows``, 1 to 4
(``GEMV_FIXED_ROWS``: the loops over the rows have a known length, so the loads of ``x``'s rows go out together
instead of one behind each row's branch; 0 compiles one kernel, ``_r0``, for any count). Lab timings on an H100
(8 layers of the 8B shape's four one-row GEMVs, programmatic dependent launch, weights past L2): 1,305 us with one
kernel for any count, 1,194 with a kernel per count, 1,160 with the pipelined loads too (90 % of HBM bandwidth).
Rounding: none but ``y``'s, once, to nearest even (float32 ``y``: none). ``k`` a multiple of 8; ``x``, ``w`` and
``x``'s rows 16-byte aligned.

:data:`FUSED_GEMV_SOURCE` (compiled with ``--use_fast_math``, as FlashInfer's modules are; launched by the driver
on 8 warps a block, at most 8 blocks per SM, each block serving a grid-stride set of columns; each kernel compiled
per row count, ``_r1`` .. ``_r4``, as the plain GEMV's, the one-row kernels' registers capped so that
``GEMV_FUSED_MIN_BLOCKS`` blocks, 4, fit an SM):

- ``gemv_{f16,bf16}_{f16,f32}_{norm,addnorm,silu}(x, w, y, rows, n, k, x_ld, y_ld, h, nw, h_out, h_ld, eps)``:
  the GEMV above (the same sums in the same order) whose input rows ``in [rows, k]`` a prologue computes into
  dynamic shared memory (``rows * k * 2`` bytes), so the launch that made them goes away. Its ``MODE`` template
  argument is :data:`~fi_engine.kernels.dense.NORM` (1: ``in = rmsnorm(h) * nw``), ``ADD_NORM`` (2: ``s = h + x``,
  ``h_out = s``, ``in = rmsnorm(s) * nw``; ``x`` and ``h [rows, k]``) or ``SILU`` (3: ``in = silu(x[:, :k]) *
  x[:, k:2k]``; ``x [rows, 2k]``). Rounding: where FlashInfer's ``rmsnorm``, ``fused_add_rmsnorm`` and
  ``silu_and_mul`` round -- ``in`` and ``h_out`` to the 16-bit type, nothing else (``s`` is normalized before
  its rounding) -- then ``y`` once, as the GEMV; the sum of squares in FlashInfer's order and ``rsqrt.approx``,
  so the result equals those launches followed by the GEMV bit for bit.
- ``gemv_{f16,bf16}_{norm,addnorm}_rope(...)``: the NORM / ADD_NORM GEMV of a decode step's QKV projection (``y =
  qkv [rows, (hq + 2 hk) d]``, 16-bit) with FlashInfer's ``apply_rope_pos_ids`` (non-interleaved, all of ``d``)
  and ``append_paged_kv_cache`` (NHD) as its epilogue; each warp computes one head's columns ``i`` and ``i + d /
  2``. Rounding: each column to the 16-bit type as the GEMV's output; the q and k heads rotated in float32 from
  those values and rounded again (as the RoPE kernel writes them); the k and v heads copied into the caches as
  stored in ``y``. The host computes the RoPE constants as FlashInfer's launcher does
  (:meth:`~fi_engine.kernels.dense.RopeAppend.constants`).

- ``gemv_{f16,bf16}_{norm,addnorm}_route(..., eps, normed, normed_ld, top_k, renorm, experts, weights, done)``:
  the NORM / ADD_NORM GEMV of a MoE layer's router (``y``: float32 logits ``[rows, n]``, ``n`` experts) with the
  routing as its epilogue: block 0 writes the normalized input rows to ``normed`` (16-bit, row stride
  ``normed_ld``) for the experts' GEMVs, and the last block to finish (a uint32 counter at ``done``, 0 between
  launches: that block sets it back) routes each row by :data:`ROUTE_SOURCE`'s ``route_row`` into ``experts``
  (int32) and ``weights`` (float32), ``[rows, top_k]``. One launch where the norm, the GEMV and ``moe_route``
  were three. The logits and the expert choice are those launches' bit for bit (comparisons only); the weights
  come from this module's fast-math ``expf`` and division (within a few float32 ulps of ``moe_route``'s).

:data:`ROUTE_SOURCE`: ``route_row``, the device routing of one token (softmax, top-k, renormalization), text that
the fused GEMV source above and the MoE layer's module (``moe_route``) both include.

The sources are the text NVRTC compiles, byte for byte as they were written in :mod:`~fi_engine.kernels.dense`
(``FUSED_GEMV_SOURCE``'s first comment still calls the plain GEMV ``_GEMV_SOURCE``, its name there): a change
that moves a kernel's machine code (``tools/kernel_fingerprints.py`` compares it on the CPU) is a new kernel, to be
proven on the GPU against FlashInfer's launches (tests/engine/test_gpu_fused_decode.py).
"""

from __future__ import annotations

__all__ = [
    "FP8_FUSED_SOURCE",
    "FP8_GEMV_SOURCE",
    "FP8_QUANT_SOURCE",
    "FUSED_GEMV_SOURCE",
    "GEMV_SOURCE",
    "ROUTE_SOURCE",
    "ROW_KERNELS_SOURCE",
]

ROW_KERNELS_SOURCE = r"""
#define NEG_INF __int_as_float((int)0xff800000u)

// dst[r, :width] = src[rows[r], :width] for 16-bit elements; grid (rows, column blocks): blockIdx.y's blocks share
// a row's columns (one block a row made a decode step's embedding gather a chain of dependent copies on one SM).
extern "C" __global__ void gather_rows16(const unsigned short* __restrict__ src, const int* __restrict__ rows,
                                         unsigned short* __restrict__ dst, long long width, long long src_ld,
                                         long long dst_ld) {
    const long long c0 = (long long)blockIdx.y * blockDim.x + threadIdx.x, stride = (long long)gridDim.y * blockDim.x;
    const unsigned short* a = src + (long long)rows[blockIdx.x] * src_ld;
    unsigned short* b = dst + (long long)blockIdx.x * dst_ld;
    for (long long c = c0; c < width; c += stride) b[c] = a[c];
}

__device__ __forceinline__ void keep_first_max(float& best, int& idx, float ob, int oi) {
    if (ob > best || (ob == best && oi < idx)) { best = ob; idx = oi; }
}

// dst[r, :width] = src[rows[r] - lo, :width] where lo <= rows[r] < lo + n, else zeros: the rows a vocabulary shard
// holds (the other ranks add the rest); grid as gather_rows16.
extern "C" __global__ void gather_rows16_shard(const unsigned short* __restrict__ src, const int* __restrict__ rows,
                                               unsigned short* __restrict__ dst, long long width, long long src_ld,
                                               long long dst_ld, int lo, int n) {
    const long long c0 = (long long)blockIdx.y * blockDim.x + threadIdx.x, stride = (long long)gridDim.y * blockDim.x;
    const int id = rows[blockIdx.x] - lo;
    unsigned short* b = dst + (long long)blockIdx.x * dst_ld;
    if (id < 0 || id >= n) {
        for (long long c = c0; c < width; c += stride) b[c] = 0;
        return;
    }
    const unsigned short* a = src + (long long)id * src_ld;
    for (long long c = c0; c < width; c += stride) b[c] = a[c];
}

// The largest of row[:n] and its first index, for the whole block; the answer is in thread 0's (best, idx);
// idx 0x7fffffff when no value beats -inf (NaN never wins).
__device__ __forceinline__ void block_argmax(const float* __restrict__ row, long long n, float& best, int& idx) {
    best = NEG_INF;
    idx = 0x7fffffff;
    const long long b = blockDim.x;
    long long i = threadIdx.x;
    // 8 loads in flight per thread before they are compared (one at a time, a 128K vocabulary's row took 30 us
    // of dependent loads on its one SM); compared in ascending index order, as one at a time
    for (; i + 7 * b < n; i += 8 * b) {
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = row[i + u * b];
#pragma unroll
        for (int u = 0; u < 8; ++u)
            if (v[u] > best) { best = v[u]; idx = (int)(i + u * b); }  // ascending: '>' keeps the first max
    }
    for (; i < n; i += b) {
        float v = row[i];
        if (v > best) { best = v; idx = (int)i; }
    }
    for (int off = 16; off; off >>= 1)
        keep_first_max(best, idx, __shfl_down_sync(0xffffffffu, best, off), __shfl_down_sync(0xffffffffu, idx, off));
    __shared__ float sb[32];
    __shared__ int si[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sb[warp] = best; si[warp] = idx; }
    __syncthreads();
    if (warp == 0) {
        int warps = (blockDim.x + 31) >> 5;
        best = lane < warps ? sb[lane] : NEG_INF;
        idx = lane < warps ? si[lane] : 0x7fffffff;
        for (int off = 16; off; off >>= 1)
            keep_first_max(best, idx, __shfl_down_sync(0xffffffffu, best, off),
                           __shfl_down_sync(0xffffffffu, idx, off));
    }
}

// out[r] = the first index of the largest of x[r, :n] (NaN never wins; a row of NaN/-inf gives 0).
extern "C" __global__ void argmax_rows(const float* __restrict__ x, long long n, long long ld,
                                       int* __restrict__ out) {
    float best;
    int idx;
    block_argmax(x + (long long)blockIdx.x * ld, n, best, idx);
    if (threadIdx.x == 0) out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
}

// A vocabulary shard's argmax: pairs[r] = (the largest of x[r, :n] as float bits, its first index + offset);
// (-inf, offset) for a row with no value above -inf (or n == 0).
extern "C" __global__ void argmax_rows_shard(const float* __restrict__ x, long long n, long long ld, int offset,
                                             int* __restrict__ pairs) {
    float best;
    int idx;
    block_argmax(x + (long long)blockIdx.x * ld, n, best, idx);
    if (threadIdx.x == 0) {
        pairs[2 * blockIdx.x] = __float_as_int(best);
        pairs[2 * blockIdx.x + 1] = (idx == 0x7fffffff ? 0 : idx) + offset;
    }
}

// The ranks' shard argmaxes combined, one thread per row: pairs [parts, rows, 2] (all-gathered, rank order); the
// largest value wins, an equal value on a later rank does not (its ids are larger); nothing above -inf anywhere:
// rank 0's index (0 for its -inf row, as argmax_rows). fi_engine.layers.tensor_parallel.combine_shard_argmax is the
// same rule in numpy.
extern "C" __global__ void combine_argmax(const int* __restrict__ pairs, int parts, int rows, int* __restrict__ out) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float best = NEG_INF;
    int idx = pairs[2 * r + 1];
    for (int p = 0; p < parts; ++p) {
        const long long at = 2 * ((long long)p * rows + r);
        const float v = __int_as_float(pairs[at]);
        if (v > best) { best = v; idx = pairs[at + 1]; }
    }
    out[r] = idx;
}

// dst[r, c] = the gathered shards' column c: src [parts, rows, width] (rank order) -> dst [rows, :n], n <= parts *
// width (the padding columns past n dropped); float32; one block per row.
extern "C" __global__ void unshard_columns(const float* __restrict__ src, int rows, long long width, long long n,
                                           float* __restrict__ dst, long long dst_ld) {
    const int r = blockIdx.x;
    for (long long c = threadIdx.x; c < n; c += blockDim.x)
        dst[r * dst_ld + c] = src[((c / width) * rows + r) * width + c % width];
}
"""


ROUTE_SOURCE = r"""
// One token's routing on the device (a MoE layer's: moe_route, and the router GEMV's epilogue): softmax over the E
// float32 logits l, the k largest (ties: the lower expert id) into ex[0, k), their probabilities into w[0, k),
// divided by their sum when renorm. The logits are read through L2 (ld.global.cg): in the router GEMV, blocks
// other than the routing one wrote them during the same launch.
__device__ __forceinline__ float load_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ void route_row(const float* __restrict__ l, int E, int k, int renorm, int* __restrict__ ex,
                                          float* __restrict__ w) {
    float m = load_cg(l);
    for (int e = 1; e < E; ++e) m = fmaxf(m, load_cg(l + e));
    float total = 0.f;
    for (int e = 0; e < E; ++e) total += expf(load_cg(l + e) - m);
    float picked = 0.f;
    for (int j = 0; j < k; ++j) {
        int best = -1;
        float bv = 0.f;
        for (int e = 0; e < E; ++e) {
            bool taken = false;
            for (int i = 0; i < j; ++i) taken |= ex[i] == e;
            const float v = load_cg(l + e);
            if (!taken && (best < 0 || v > bv)) {
                best = e;
                bv = v;
            }
        }
        const float p = expf(bv - m) / total;
        ex[j] = best;
        w[j] = p;
        picked += p;
    }
    if (renorm)
        for (int j = 0; j < k; ++j) w[j] /= picked;
}
"""


# programmatic dependent launch, shared by the two GEMV sources below (the same text in each)
_GRIDDEP = (
    "// Programmatic dependent launch (sm_90; no-ops where the launch did not ask for it): the next kernel in the\n"
    r"""// stream may start once every block of this one has called griddep_launch_dependents (here: at once), and
// griddep_wait blocks until the previous kernel has finished and its writes are visible. Everything a kernel
// reads or writes that another kernel touches comes after its griddep_wait; only the weights, which nothing
// writes, are loaded before it.
__device__ __forceinline__ void griddep_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
"""
)

# The row counts the 16-bit GEMVs are compiled for, and their other compile-time settings (Dense passes each)
_ROW_COUNTS = r"""// The row count of a kernel compiled for R rows (1 to 4: loops of known length, whose loads of x the
// compiler may issue together), or the launch's `rows` where R is 0 (any count: each row's load behind a branch)
#define ROWS(R, rows) ((R) ? (R) : (rows))
#ifndef GEMV_FIXED_ROWS  // 1: a kernel per row count, name suffix _r1 .. _r4; 0: one kernel (_r0) for 1 to 4 rows
#define GEMV_FIXED_ROWS 1
#endif
#ifndef GEMV_PIPELINE  // 1: each lane loads its next UNROLL weight vectors before it sums the current ones
#define GEMV_PIPELINE 1
#endif
#ifndef GEMV_FUSED_MIN_BLOCKS  // the one-row fused kernels' registers capped so this many 256-thread blocks fit an SM
#define GEMV_FUSED_MIN_BLOCKS 4
#endif
#if GEMV_FUSED_MIN_BLOCKS > 1
#define FUSED_BOUNDS_1 __launch_bounds__(256, GEMV_FUSED_MIN_BLOCKS)
#else
#define FUSED_BOUNDS_1
#endif
#define FUSED_BOUNDS_0
#define FUSED_BOUNDS_2
#define FUSED_BOUNDS_3
#define FUSED_BOUNDS_4
#if defined(GEMV_DEVICE_FUNCTIONS_ONLY)  // a module that includes this source for its device functions only
#define EACH_ROW_COUNT(M, ...)
#elif GEMV_FIXED_ROWS
#define EACH_ROW_COUNT(M, ...) M(1, __VA_ARGS__) M(2, __VA_ARGS__) M(3, __VA_ARGS__) M(4, __VA_ARGS__)
#else
#define EACH_ROW_COUNT(M, ...) M(0, __VA_ARGS__)
#endif

"""

GEMV_SOURCE = (
    r"""
// y[r, j] = sum_c x[r, c] * w[j, c] for r < rows <= 4 (float32 sums; 16-bit x and w, 16-bit or float32 y): the
// GEMM of a decode step with few rows. One warp per output column j reads w's row j once in 16-byte vectors and
// keeps one sum per x row; k a multiple of 8, x, w and x_ld 16-byte aligned (the caller checks). Conversions by
// PTX (no headers): float16 via cvt, bfloat16 as the high half of a float32, rounded to nearest even on output.
__device__ __forceinline__ float h2f(unsigned short u) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(u));
    return f;
}
__device__ __forceinline__ float b2f(unsigned short u) {
    return __int_as_float(((unsigned)u) << 16);
}
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short u;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(u) : "f"(f));
    return u;
}
__device__ __forceinline__ unsigned short f2b(float f) {
    unsigned short u;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(u) : "f"(f));
    return u;
}

"""
    + _GRIDDEP
    + r"""// Weights are read once per step: loaded past L1 (no allocation there), so x's rows keep it.
__device__ __forceinline__ uint4 load_weights(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
#ifndef GEMV_UNROLL  // weight vectors in flight per lane (Dense.gemv_unroll passes it)
#define GEMV_UNROLL 4
#endif
#define UNROLL GEMV_UNROLL
"""
    + _ROW_COUNTS
    + r"""// acc[r] += the 8 products of weight vector a with x's vector c of row r, r < ROWS(R, rows), in order.
template <bool BF16, int R>
__device__ __forceinline__ void gemv_vec(uint4 a, const unsigned short* __restrict__ x, long long x_ld, int rows, int c,
                                         float acc[4]) {
    const unsigned short* av = reinterpret_cast<const unsigned short*>(&a);
    float wf[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) wf[e] = BF16 ? b2f(av[e]) : h2f(av[e]);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        if (r < ROWS(R, rows)) {
            uint4 b = __ldg(reinterpret_cast<const uint4*>(x + r * x_ld) + c);
            const unsigned short* bv = reinterpret_cast<const unsigned short*>(&b);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r] += wf[e] * (BF16 ? b2f(bv[e]) : h2f(bv[e]));
        }
    }
}

template <bool BF16, bool F32OUT, int R>
__device__ __forceinline__ void gemv_rows(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                                          void* __restrict__ y, int rows, int n, int k, long long x_ld,
                                          long long y_ld) {
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= n) return;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const uint4* wv = reinterpret_cast<const uint4*>(w + (long long)j * k);
    const int vecs = k >> 3;
    int c = lane;
    // UNROLL weight vectors loaded before any is used (more bytes in flight per warp), then summed in the same
    // order as the one-at-a-time tail loop below: the sums do not depend on the unrolling. The first UNROLL are
    // loaded before waiting for the previous kernel (weights are constants; see griddep_wait); with GEMV_PIPELINE
    // each later UNROLL are loaded before the ones in hand are summed, so the loads wait on no sum
    uint4 a[UNROLL];
    bool more = c + 32 * (UNROLL - 1) < vecs;
    if (more) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) a[u] = load_weights(wv + c + 32 * u);
    }
    griddep_wait();
    while (more) {
        const bool next = c + 32 * (2 * UNROLL - 1) < vecs;
        uint4 b[UNROLL];
        if (GEMV_PIPELINE && next) {
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) b[u] = load_weights(wv + c + 32 * (UNROLL + u));
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) gemv_vec<BF16, R>(a[u], x, x_ld, rows, c + 32 * u, acc);
        c += 32 * UNROLL;
        more = next;
        if (more) {
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) a[u] = GEMV_PIPELINE ? b[u] : load_weights(wv + c + 32 * u);
        }
    }
    for (; c < vecs; c += 32) gemv_vec<BF16, R>(load_weights(wv + c), x, x_ld, rows, c, acc);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        float v = acc[r];
        for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0 && r < ROWS(R, rows)) {
            if (F32OUT) reinterpret_cast<float*>(y)[r * y_ld + j] = v;
            else reinterpret_cast<unsigned short*>(y)[r * y_ld + j] = BF16 ? f2b(v) : f2h(v);
        }
    }
}

#define GEMV(R, name, bf16, f32out)                                                                                 \
    extern "C" __global__ void name##_r##R(const unsigned short* x, const unsigned short* w, void* y, int rows,      \
                                           int n, int k, long long x_ld, long long y_ld) {                          \
        gemv_rows<bf16, f32out, R>(x, w, y, rows, n, k, x_ld, y_ld);                                                \
    }
EACH_ROW_COUNT(GEMV, gemv_f16_f16, false, false)
EACH_ROW_COUNT(GEMV, gemv_f16_f32, false, true)
EACH_ROW_COUNT(GEMV, gemv_bf16_bf16, true, false)
EACH_ROW_COUNT(GEMV, gemv_bf16_f32, true, true)
"""
)


FUSED_GEMV_SOURCE = (
    r"""
// The GEMV of _GEMV_SOURCE (same column loop, same float32 sums in the same order, same output rounding) with its
// input rows computed in a prologue into shared memory, so that the launch producing them goes away:
//   MODE 1 (norm):     in = rmsnorm(h) * nw                     (FlashInfer's rmsnorm of h)
//   MODE 2 (add-norm): s = h + x; h_out = s; in = rmsnorm(s) * nw (FlashInfer's fused_add_rmsnorm with input x,
//                      residual h, written into h_out instead of in place: every block reads h while block 0
//                      writes h_out, so the two are different buffers the caller alternates)
//   MODE 3 (silu):     in = silu(x[:, :k]) * x[:, k:2k]           (FlashInfer's silu_and_mul of x)
// The prologue rounds where those kernels round (h_out and in to the 16-bit type, nothing else) and sums the
// squares in FlashInfer's order: its block of W = ceil(min(1024, k / 8) / 32) warps, thread t summing the 8-element
// vectors t, t + 32 W, ... in turn, a butterfly within each warp, then one across the W warp sums; rsqrt.approx as
// its math::rsqrt. The module is compiled with --use_fast_math, as FlashInfer's modules are (its divisions and
// __expf). Each block recomputes the prologue (rows <= 4 rows of k elements, from L2) and then serves a
// grid-stride set of output columns, one warp each. k a multiple of 8; x, h, h_out, nw and the row strides 16-byte
// aligned (the caller checks).
__device__ __forceinline__ float h2f(unsigned short u) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(u));
    return f;
}
__device__ __forceinline__ float b2f(unsigned short u) {
    return __int_as_float(((unsigned)u) << 16);
}
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short u;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(u) : "f"(f));
    return u;
}
__device__ __forceinline__ unsigned short f2b(float f) {
    unsigned short u;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(u) : "f"(f));
    return u;
}
__device__ __forceinline__ float rsqrt_approx(float x) {
    float y;
    asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
template <bool BF16> __device__ __forceinline__ float tof(unsigned short u) { return BF16 ? b2f(u) : h2f(u); }
template <bool BF16> __device__ __forceinline__ unsigned short fromf(float f) { return BF16 ? f2b(f) : f2h(f); }

// element e of the 8-vector at c8 of row r: h alone, or x + h (FlashInfer: float(input) + float(residual))
template <bool BF16, int MODE>
__device__ __forceinline__ void row_vec(const unsigned short* __restrict__ h, const unsigned short* __restrict__ x,
                                        int r, int c8, long long h_ld, long long x_ld, float v[8]) {
    uint4 a = *(reinterpret_cast<const uint4*>(h + r * h_ld) + c8);
    const unsigned short* av = reinterpret_cast<const unsigned short*>(&a);
    if (MODE == 2) {
        uint4 b = *(reinterpret_cast<const uint4*>(x + r * x_ld) + c8);
        const unsigned short* bv = reinterpret_cast<const unsigned short*>(&b);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            float t = tof<BF16>(bv[e]);
            t += tof<BF16>(av[e]);
            v[e] = t;
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = tof<BF16>(av[e]);
    }
}

// The prologue: the input rows into sx (shared), every thread of the block taking part; ends with a barrier.
template <bool BF16, int MODE>
__device__ __forceinline__ void stage(uint4* sx, const unsigned short* __restrict__ x, int rows, int k, long long x_ld,
                                      const unsigned short* __restrict__ h, const unsigned short* __restrict__ nw,
                                      unsigned short* __restrict__ h_out, long long h_ld, float eps) {
    __shared__ float part[4][32];
    __shared__ float rcp[4];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int vecs = k >> 3;
    if (MODE == 3) {
        for (int r = 0; r < rows; ++r)
            for (int c = threadIdx.x; c < vecs; c += blockDim.x) {
                uint4 g = *(reinterpret_cast<const uint4*>(x + r * x_ld) + c);
                uint4 u = *(reinterpret_cast<const uint4*>(x + r * x_ld + k) + c);
                const unsigned short* gv = reinterpret_cast<const unsigned short*>(&g);
                const unsigned short* uv = reinterpret_cast<const unsigned short*>(&u);
                uint4 o;
                unsigned short* ov = reinterpret_cast<unsigned short*>(&o);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    float a = tof<BF16>(gv[e]);
                    ov[e] = fromf<BF16>(a / (1.0f + __expf(-a)) * tof<BF16>(uv[e]));
                }
                sx[r * vecs + c] = o;
            }
    } else {
        // FlashInfer's partition of the sum of squares (see above)
        const int fw = (min(1024, vecs) + 31) >> 5;
        const int ft = fw << 5;
        for (int r = 0; r < rows; ++r)
            for (int vw = warp; vw < fw; vw += warps) {
                const int t = (vw << 5) + lane;
                float sum = 0.f;
                for (int c = t; c < vecs; c += ft) {
                    float v[8];
                    row_vec<BF16, MODE>(h, x, r, c, h_ld, x_ld, v);
#pragma unroll
                    for (int e = 0; e < 8; ++e) sum += v[e] * v[e];
                }
#pragma unroll
                for (int off = 16; off; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
                if (lane == 0) part[r][vw] = sum;
            }
        __syncthreads();
        if (warp == 0)
            for (int r = 0; r < rows; ++r) {
                float sum = lane < fw ? part[r][lane] : 0.f;
#pragma unroll
                for (int off = 16; off; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
                if (lane == 0) rcp[r] = rsqrt_approx(sum / float(k) + eps);
            }
        __syncthreads();
        const bool write_h = MODE == 2 && h_out != nullptr && blockIdx.x == 0;
        for (int r = 0; r < rows; ++r)
            for (int c = threadIdx.x; c < vecs; c += blockDim.x) {
                float v[8];
                row_vec<BF16, MODE>(h, x, r, c, h_ld, x_ld, v);
                uint4 g = *(reinterpret_cast<const uint4*>(nw) + c);
                const unsigned short* gv = reinterpret_cast<const unsigned short*>(&g);
                uint4 o, s;
                unsigned short* ov = reinterpret_cast<unsigned short*>(&o);
                unsigned short* sv = reinterpret_cast<unsigned short*>(&s);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    ov[e] = fromf<BF16>(v[e] * rcp[r] * tof<BF16>(gv[e]));
                    sv[e] = fromf<BF16>(v[e]);
                }
                sx[r * vecs + c] = o;
                if (write_h) *(reinterpret_cast<uint4*>(h_out + r * h_ld) + c) = s;
            }
    }
    __syncthreads();
}

"""
    + _GRIDDEP
    + r"""// Weights past L1, UNROLL vectors in flight per lane: as the plain GEMV (GEMV_SOURCE).
__device__ __forceinline__ uint4 load_weights(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
#ifndef GEMV_UNROLL  // weight vectors in flight per lane (Dense.gemv_unroll passes it)
#define GEMV_UNROLL 4
#endif
#define UNROLL GEMV_UNROLL
"""
    + _ROW_COUNTS
    + r"""// acc[r] += the 8 products of weight vector a with the staged input vector c of row r, for r < ROWS(R, rows).
template <bool BF16, int R>
__device__ __forceinline__ void staged_vec(uint4 a, const uint4* sx, int vecs, int rows, int c, float acc[4]) {
    const unsigned short* av = reinterpret_cast<const unsigned short*>(&a);
    float wf[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) wf[e] = tof<BF16>(av[e]);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        if (r < ROWS(R, rows)) {
            uint4 b = sx[r * vecs + c];
            const unsigned short* bv = reinterpret_cast<const unsigned short*>(&b);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r] += wf[e] * tof<BF16>(bv[e]);
        }
    }
}

template <bool BF16, bool F32OUT, int MODE, int R>
__device__ __forceinline__ void gemv_fused(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                                           void* __restrict__ y, int rows, int n, int k, long long x_ld,
                                           long long y_ld, const unsigned short* __restrict__ h,
                                           const unsigned short* __restrict__ nw, unsigned short* __restrict__ h_out,
                                           long long h_ld, float eps) {
    extern __shared__ uint4 sx[];  // the input rows, [rows, k / 8] vectors of 8 16-bit values
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int vecs = k >> 3;
    // the first column's first UNROLL weight vectors are loaded before the wait for the previous kernel, whose
    // output the prologue reads (weights are constants)
    int j = blockIdx.x * warps + warp;
    uint4 a[UNROLL];
    bool more = j < n && lane + 32 * (UNROLL - 1) < vecs;
    if (more) {
        const uint4* wv = reinterpret_cast<const uint4*>(w + (long long)j * k);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) a[u] = load_weights(wv + lane + 32 * u);
    }
    griddep_wait();
    stage<BF16, MODE>(sx, x, ROWS(R, rows), k, x_ld, h, nw, h_out, h_ld, eps);
    for (; j < n; j += gridDim.x * warps) {
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        const uint4* wv = reinterpret_cast<const uint4*>(w + (long long)j * k);
        int c = lane;
        if (!more) {  // a later column: its first vectors are loaded here
            more = c + 32 * (UNROLL - 1) < vecs;
            if (more) {
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) a[u] = load_weights(wv + c + 32 * u);
            }
        }
        while (more) {  // as the plain GEMV: the same sums, the next vectors loaded first with GEMV_PIPELINE
            const bool next = c + 32 * (2 * UNROLL - 1) < vecs;
            uint4 b[UNROLL];
            if (GEMV_PIPELINE && next) {
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) b[u] = load_weights(wv + c + 32 * (UNROLL + u));
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) staged_vec<BF16, R>(a[u], sx, vecs, rows, c + 32 * u, acc);
            c += 32 * UNROLL;
            more = next;
            if (more) {
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) a[u] = GEMV_PIPELINE ? b[u] : load_weights(wv + c + 32 * u);
            }
        }
        for (; c < vecs; c += 32) staged_vec<BF16, R>(load_weights(wv + c), sx, vecs, rows, c, acc);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            float v = acc[r];
            for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane == 0 && r < ROWS(R, rows)) {
                if (F32OUT) reinterpret_cast<float*>(y)[r * y_ld + j] = v;
                else reinterpret_cast<unsigned short*>(y)[r * y_ld + j] = fromf<BF16>(v);
            }
        }
    }
}

#define FUSED(R, name, bf16, f32out, mode)                                                                         \
    extern "C" __global__ void FUSED_BOUNDS_##R                                                                    \
            name##_r##R(const unsigned short* x, const unsigned short* w, void* y, int rows, int n, int k,           \
                        long long x_ld, long long y_ld, const unsigned short* h, const unsigned short* nw,           \
                        unsigned short* h_out, long long h_ld, float eps) {                                          \
        gemv_fused<bf16, f32out, mode, R>(x, w, y, rows, n, k, x_ld, y_ld, h, nw, h_out, h_ld, eps);                \
    }
EACH_ROW_COUNT(FUSED, gemv_f16_f16_norm, false, false, 1)
EACH_ROW_COUNT(FUSED, gemv_f16_f32_norm, false, true, 1)
EACH_ROW_COUNT(FUSED, gemv_bf16_bf16_norm, true, false, 1)
EACH_ROW_COUNT(FUSED, gemv_bf16_f32_norm, true, true, 1)
EACH_ROW_COUNT(FUSED, gemv_f16_f16_addnorm, false, false, 2)
EACH_ROW_COUNT(FUSED, gemv_f16_f32_addnorm, false, true, 2)
EACH_ROW_COUNT(FUSED, gemv_bf16_bf16_addnorm, true, false, 2)
EACH_ROW_COUNT(FUSED, gemv_bf16_f32_addnorm, true, true, 2)
EACH_ROW_COUNT(FUSED, gemv_f16_f16_silu, false, false, 3)
EACH_ROW_COUNT(FUSED, gemv_f16_f32_silu, false, true, 3)
EACH_ROW_COUNT(FUSED, gemv_bf16_bf16_silu, true, false, 3)
EACH_ROW_COUNT(FUSED, gemv_bf16_f32_silu, true, true, 3)

#ifndef ROPE_UNROLL  // vectors of each column in flight per lane in the QKV + RoPE GEMV (Dense.rope_unroll)
#define ROPE_UNROLL 4
#endif

// a0[r] / a1[r] += the 8 products of weight vectors u0 / u1 (columns j0, j1) with staged input vector c of row r
template <bool BF16, int R>
__device__ __forceinline__ void pair_vec(uint4 u0, uint4 u1, const uint4* sx, int vecs, int rows, int c, float a0[4],
                                         float a1[4]) {
    const unsigned short* v0 = reinterpret_cast<const unsigned short*>(&u0);
    const unsigned short* v1 = reinterpret_cast<const unsigned short*>(&u1);
    float f0[8], f1[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        f0[e] = tof<BF16>(v0[e]);
        f1[e] = tof<BF16>(v1[e]);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        if (r < ROWS(R, rows)) {
            uint4 b = sx[r * vecs + c];
            const unsigned short* bv = reinterpret_cast<const unsigned short*>(&b);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                a0[r] += f0[e] * tof<BF16>(bv[e]);
                a1[r] += f1[e] * tof<BF16>(bv[e]);
            }
        }
    }
}

// RoPE's frequency of element i of a head of d (and of i + d / 2: FlashInfer indexes it by e % (d / 2)), with
// FlashInfer's expressions (the host computes rcp_theta, rcp_scale, smooth_a and smooth_b as its launcher does):
// explicit fmas where the compiler could contract either product, FlashInfer's build fusing the first
__device__ __forceinline__ float rope_freq(unsigned i, unsigned d, float rcp_theta, float rcp_scale, float smooth_a,
                                           float smooth_b) {
    const unsigned half = d >> 1;
    float freq = __powf(rcp_theta, float(2 * (i % half)) / float(d));
    float smooth = freq * smooth_a + smooth_b;
    smooth = max(0.0f, min(1.0f, smooth));
    return __fmaf_rn(1 - smooth, freq * rcp_scale, smooth * freq);
}

// A QKV GEMV's epilogue for row r of one pair of its rounded outputs (q0, q1: columns j0 = head d + i and j0 + d /
// 2): a q or k head rotated at the row's position (FlashInfer's rotation, written as its kernel writes it, in
// float32 from the rounded values, rounded again), stored back into y, and a k or v head also written into page
// kv_indices[kv_indptr[batch_indices[r]] + pos / page_size] of its cache (strides in elements)
template <bool BF16>
__device__ __forceinline__ void rope_store_append(
        unsigned short q0, unsigned short q1, int head, unsigned i, float freq, int r, unsigned short* __restrict__ y,
        long long y_ld, long long j0, int hq, int hk, unsigned d, const int* __restrict__ positions,
        const int* __restrict__ batch_indices, const int* __restrict__ kv_indptr, const int* __restrict__ kv_indices,
        unsigned short* __restrict__ k_cache, unsigned short* __restrict__ v_cache, int page_size,
        long long stride_page, long long stride_n, long long stride_h) {
    const unsigned half = d >> 1;
    const int pos = positions[r];
    if (head < hq + hk) {
        float sn, cs;
        __sincosf(float(pos) * freq, &sn, &cs);
        const float x0 = tof<BF16>(q0), x1 = tof<BF16>(q1);
        const float o0 = __fmaf_rn(x0, cs, -x1 * sn);
        const float o1 = __fmaf_rn(x1, cs, x0 * sn);
        q0 = fromf<BF16>(o0);
        q1 = fromf<BF16>(o1);
    }
    y[r * y_ld + j0] = q0;
    y[r * y_ld + j0 + half] = q1;
    if (head >= hq) {
        const bool is_k = head < hq + hk;
        const int kvh = is_k ? head - hq : head - hq - hk;
        const int page = kv_indices[kv_indptr[batch_indices[r]] + pos / page_size];
        const long long at = page * stride_page + (long long)(pos % page_size) * stride_n + kvh * stride_h + i;
        unsigned short* cache = is_k ? k_cache : v_cache;
        cache[at] = q0;
        cache[at + half] = q1;
    }
}

// The fused GEMVs whose warps each compute a pair of output columns, then an epilogue over the pair (EPI):
//
// EPI_ROPE: the QKV GEMV of a decode step with FlashInfer's apply_rope_pos_ids (in place, non-interleaved, all of
// d rotated) and append_paged_kv_cache (NHD) as its epilogue: y = qkv [rows, (hq + 2 hk) d], 16-bit. Each warp
// computes the columns i and i + d/2 of one head (each column's sum exactly as gemv_fused's), rounds them as the
// GEMV's output is rounded, rotates q and k heads with FlashInfer's arithmetic (its frequency and smoothing
// expressions, __powf and __sincosf under --use_fast_math, the rotation written as its kernel writes it; the host
// computes rcp_theta, rcp_scale, smooth_a and smooth_b as its launcher does), stores them back into y (attention
// reads q there) and writes k and v heads into page kv_indices[kv_indptr[b] + pos / page_size], entry
// pos % page_size of k_cache / v_cache (b = batch_indices[r], pos = positions[r]; strides in elements).
//
// EPI_SILU: the gate/up GEMV of a decode step (w [2 m, k]: the m gate rows, then the m up rows; n = 2 m) with
// FlashInfer's silu_and_mul as its epilogue: y [rows, m] = silu(g) * u, g and u the columns p and m + p rounded as
// the GEMV's output is, the activation as the SiLU prologue computes it. The RoPE arguments are unused.
#define EPI_ROPE 0
#define EPI_SILU 1
template <int EPI>
__device__ __forceinline__ void pair_columns(int p, int pairs, unsigned d, long long& j0, long long& j1) {
    if (EPI == EPI_SILU) {
        j0 = p;
        j1 = (long long)pairs + p;
    } else {
        const unsigned half = d >> 1;
        const int head = p / (int)half;
        j0 = (long long)head * d + (p - head * (int)half);
        j1 = j0 + half;
    }
}

template <bool BF16, int MODE, int R, int EPI>
__device__ __forceinline__ void gemv_pairs(
        const unsigned short* __restrict__ x, const unsigned short* __restrict__ w, unsigned short* __restrict__ y,
        int rows, int n, int k, long long x_ld, long long y_ld, const unsigned short* __restrict__ h,
        const unsigned short* __restrict__ nw, unsigned short* __restrict__ h_out, long long h_ld, float eps, int hq,
        int hk, unsigned d, float rcp_theta, float rcp_scale, float smooth_a, float smooth_b,
        const int* __restrict__ positions, const int* __restrict__ batch_indices, const int* __restrict__ kv_indptr,
        const int* __restrict__ kv_indices, unsigned short* __restrict__ k_cache, unsigned short* __restrict__ v_cache,
        int page_size, long long stride_page, long long stride_n, long long stride_h) {
    extern __shared__ uint4 sx[];
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int vecs = k >> 3;
    const int pairs = n >> 1;
    // As gemv_fused: ROPE_UNROLL vectors of each of the two columns in flight per lane (the first pair's loaded
    // before the wait for the previous kernel), summed in the order of the one-at-a-time tail loop
    int p = blockIdx.x * warps + warp;
    uint4 b0[ROPE_UNROLL], b1[ROPE_UNROLL];
    bool more = p < pairs && lane + 32 * (ROPE_UNROLL - 1) < vecs;
    if (more) {
        long long j0, j1;
        pair_columns<EPI>(p, pairs, d, j0, j1);
        const uint4* w0 = reinterpret_cast<const uint4*>(w + j0 * k);
        const uint4* w1 = reinterpret_cast<const uint4*>(w + j1 * k);
#pragma unroll
        for (int u = 0; u < ROPE_UNROLL; ++u) {
            b0[u] = load_weights(w0 + lane + 32 * u);
            b1[u] = load_weights(w1 + lane + 32 * u);
        }
    }
    griddep_wait();
    stage<BF16, MODE>(sx, x, ROWS(R, rows), k, x_ld, h, nw, h_out, h_ld, eps);
    for (; p < pairs; p += gridDim.x * warps) {
        long long j0, j1;
        pair_columns<EPI>(p, pairs, d, j0, j1);
        float a0[4] = {0.f, 0.f, 0.f, 0.f}, a1[4] = {0.f, 0.f, 0.f, 0.f};
        const uint4* w0 = reinterpret_cast<const uint4*>(w + j0 * k);
        const uint4* w1 = reinterpret_cast<const uint4*>(w + j1 * k);
        int c = lane;
        if (!more) {  // a later pair: its first vectors are loaded here
            more = c + 32 * (ROPE_UNROLL - 1) < vecs;
            if (more) {
#pragma unroll
                for (int u = 0; u < ROPE_UNROLL; ++u) {
                    b0[u] = load_weights(w0 + c + 32 * u);
                    b1[u] = load_weights(w1 + c + 32 * u);
                }
            }
        }
        while (more) {
#pragma unroll
            for (int u = 0; u < ROPE_UNROLL; ++u) pair_vec<BF16, R>(b0[u], b1[u], sx, vecs, rows, c + 32 * u, a0, a1);
            c += 32 * ROPE_UNROLL;
            more = c + 32 * (ROPE_UNROLL - 1) < vecs;
            if (more) {
#pragma unroll
                for (int u = 0; u < ROPE_UNROLL; ++u) {
                    b0[u] = load_weights(w0 + c + 32 * u);
                    b1[u] = load_weights(w1 + c + 32 * u);
                }
            }
        }
        for (; c < vecs; c += 32)
            pair_vec<BF16, R>(load_weights(w0 + c), load_weights(w1 + c), sx, vecs, rows, c, a0, a1);
#pragma unroll
        for (int r = 0; r < 4; ++r)
            for (int off = 16; off; off >>= 1) {
                a0[r] += __shfl_xor_sync(0xffffffffu, a0[r], off);
                a1[r] += __shfl_xor_sync(0xffffffffu, a1[r], off);
            }
        if (lane != 0) continue;
        if (EPI == EPI_SILU) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                if (r >= ROWS(R, rows)) break;
                const float g = tof<BF16>(fromf<BF16>(a0[r])), u = tof<BF16>(fromf<BF16>(a1[r]));
                y[r * y_ld + p] = fromf<BF16>(g / (1.0f + __expf(-g)) * u);
            }
            continue;
        }
        const unsigned half = d >> 1;
        const int head = p / (int)half;
        const unsigned i = p - head * (int)half;
        const float freq = rope_freq(i, d, rcp_theta, rcp_scale, smooth_a, smooth_b);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            if (r >= ROWS(R, rows)) break;
            rope_store_append<BF16>(fromf<BF16>(a0[r]), fromf<BF16>(a1[r]), head, i, freq, r, y, y_ld, j0, hq, hk, d,
                                    positions, batch_indices, kv_indptr, kv_indices, k_cache, v_cache, page_size,
                                    stride_page, stride_n, stride_h);
        }
    }
}

#define PAIRS(R, name, bf16, mode, epi)                                                                            \
    extern "C" __global__ void FUSED_BOUNDS_##R name##_r##R(                                                       \
            const unsigned short* x, const unsigned short* w, unsigned short* y, int rows, int n, int k,             \
            long long x_ld, long long y_ld, const unsigned short* h, const unsigned short* nw,                       \
            unsigned short* h_out, long long h_ld, float eps, int hq, int hk, unsigned d, float rcp_theta,           \
            float rcp_scale, float smooth_a, float smooth_b, const int* positions, const int* batch_indices,         \
            const int* kv_indptr, const int* kv_indices, unsigned short* k_cache, unsigned short* v_cache,           \
            int page_size, long long stride_page, long long stride_n, long long stride_h) {                          \
        gemv_pairs<bf16, mode, R, epi>(x, w, y, rows, n, k, x_ld, y_ld, h, nw, h_out, h_ld, eps, hq, hk, d,         \
                                       rcp_theta, rcp_scale, smooth_a, smooth_b, positions, batch_indices,          \
                                       kv_indptr, kv_indices, k_cache, v_cache, page_size, stride_page, stride_n,   \
                                       stride_h);                                                                   \
    }
EACH_ROW_COUNT(PAIRS, gemv_f16_norm_rope, false, 1, EPI_ROPE)
EACH_ROW_COUNT(PAIRS, gemv_bf16_norm_rope, true, 1, EPI_ROPE)
EACH_ROW_COUNT(PAIRS, gemv_f16_addnorm_rope, false, 2, EPI_ROPE)
EACH_ROW_COUNT(PAIRS, gemv_bf16_addnorm_rope, true, 2, EPI_ROPE)
EACH_ROW_COUNT(PAIRS, gemv_f16_norm_gateup, false, 1, EPI_SILU)
EACH_ROW_COUNT(PAIRS, gemv_bf16_norm_gateup, true, 1, EPI_SILU)
EACH_ROW_COUNT(PAIRS, gemv_f16_addnorm_gateup, false, 2, EPI_SILU)
EACH_ROW_COUNT(PAIRS, gemv_bf16_addnorm_gateup, true, 2, EPI_SILU)
"""
    + ROUTE_SOURCE
    + r"""
// The router GEMV of a MoE decode step with the routing as its epilogue: the NORM / ADD_NORM fused GEMV into
// float32 logits y [rows, n] (n experts), block 0 also writing the staged input rows (the normalized rows the
// experts' GEMVs read) to `normed`; then the last block to finish (counted in `done`, which it sets back to 0 for
// the next launch: a CUDA graph replays it as is) routes each row as route_row does, into experts and weights
// [rows, top_k]. Every block fences its logits before it counts itself, so the last one reads them all.
template <bool BF16, int MODE, int R>
__device__ __forceinline__ void gemv_route(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                                           float* __restrict__ y, int rows, int n, int k, long long x_ld,
                                           long long y_ld, const unsigned short* __restrict__ h,
                                           const unsigned short* __restrict__ nw, unsigned short* __restrict__ h_out,
                                           long long h_ld, float eps, unsigned short* __restrict__ normed,
                                           long long normed_ld, int top_k, int renorm, int* __restrict__ experts,
                                           float* __restrict__ weights, unsigned int* __restrict__ done) {
    extern __shared__ uint4 sx[];  // the staged rows: gemv_fused leaves them in place
    __shared__ int last;
    gemv_fused<BF16, true, MODE, R>(x, w, y, rows, n, k, x_ld, y_ld, h, nw, h_out, h_ld, eps);
    const int vecs = k >> 3;
    if (blockIdx.x == 0)
        for (int r = 0; r < rows; ++r)
            for (int c = threadIdx.x; c < vecs; c += blockDim.x)
                reinterpret_cast<uint4*>(normed + r * normed_ld)[c] = sx[r * vecs + c];
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int r = threadIdx.x; r < rows; r += blockDim.x)
        route_row(y + r * y_ld, n, top_k, renorm, experts + r * top_k, weights + r * top_k);
    if (threadIdx.x == 0) *done = 0u;
}

#define ROUTE(R, name, bf16, mode)                                                                                 \
    extern "C" __global__ void name##_r##R(const unsigned short* x, const unsigned short* w, float* y, int rows,     \
                                           int n, int k, long long x_ld, long long y_ld, const unsigned short* h,   \
                                           const unsigned short* nw, unsigned short* h_out, long long h_ld,         \
                                           float eps, unsigned short* normed, long long normed_ld, int top_k,       \
                                           int renorm, int* experts, float* weights, unsigned int* done) {          \
        gemv_route<bf16, mode, R>(x, w, y, rows, n, k, x_ld, y_ld, h, nw, h_out, h_ld, eps, normed, normed_ld,      \
                                  top_k, renorm, experts, weights, done);                                           \
    }
EACH_ROW_COUNT(ROUTE, gemv_f16_norm_route, false, 1)
EACH_ROW_COUNT(ROUTE, gemv_bf16_norm_route, true, 1)
EACH_ROW_COUNT(ROUTE, gemv_f16_addnorm_route, false, 2)
EACH_ROW_COUNT(ROUTE, gemv_bf16_addnorm_route, true, 2)
"""
)


# The e4m3 decoding and 16-bit widening the FP8 kernels share (FP8_GEMV_SOURCE's and FP8_FUSED_SOURCE's); uses
# h2f, which each source defines before it
_FP8_DECODE = r"""
// A float32 product with subnormal inputs honored whatever the build's flush-to-zero setting (PTX mul without .ftz)
__device__ __forceinline__ float mul_subnormal(float a, float b) {
    float c;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(c) : "f"(a), "f"(b));
    return c;
}

// The 4 e4m3 values of u (bytes 0..3, in that order) as float32, exactly, with integer operations and one multiply
// each (a conversion instruction issues at a quarter of their rate): each byte's sign, exponent and mantissa go to
// a bfloat16's places, whose exponent bias (127) exceeds e4m3's (7) by 120 -- e4m3's subnormals land on bfloat16
// subnormals -- the bfloat16 pairs widen to float32 and a multiply by 2**120 (subnormal inputs honored) restores
// the value. The NaN codes (0x7f, 0xff) read as +-480.
__device__ __forceinline__ void e4m3x4(unsigned u, float* f) {
    const unsigned even = ((u << 8) & 0x80008000u) | ((u << 4) & 0x07f007f0u);  // bytes 0 and 2
    const unsigned odd = (u & 0x80008000u) | ((u >> 4) & 0x07f007f0u);          // bytes 1 and 3
    f[0] = mul_subnormal(__int_as_float(even << 16), 0x1p120f);
    f[1] = mul_subnormal(__int_as_float(odd << 16), 0x1p120f);
    f[2] = mul_subnormal(__int_as_float(even & 0xffff0000u), 0x1p120f);
    f[3] = mul_subnormal(__int_as_float(odd & 0xffff0000u), 0x1p120f);
}

// The 16 values of a 16-byte weight vector
__device__ __forceinline__ void e4m3x16(uint4 a, float* f) {
    e4m3x4(a.x, f);
    e4m3x4(a.y, f + 4);
    e4m3x4(a.z, f + 8);
    e4m3x4(a.w, f + 12);
}

// The 8 16-bit values of b as float32 (bfloat16: the high half of a float32; float16: cvt)
template <bool BF16> __device__ __forceinline__ void widen8(uint4 b, float* f) {
    const unsigned v[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (BF16) {
            f[2 * i] = __int_as_float(v[i] << 16);
            f[2 * i + 1] = __int_as_float(v[i] & 0xffff0000u);
        } else {
            f[2 * i] = h2f((unsigned short)(v[i] & 0xffffu));
            f[2 * i + 1] = h2f((unsigned short)(v[i] >> 16));
        }
    }
}

// x's 16 values at xr (two 16-byte vectors, through the read-only path) as float32
template <bool BF16> __device__ __forceinline__ void widen16(const uint4* xr, float* f) {
    widen8<BF16>(__ldg(xr), f);
    widen8<BF16>(__ldg(xr + 1), f + 8);
}

// acc plus the 16-product partial sum of one decoded weight vector wf with x's values xf, summed in order, times the
// vector's block scale s where BLOCK: each widening FP8 GEMV's step per weight vector and x row (their order of sums)
template <bool BLOCK>
__device__ __forceinline__ float add_partial16(float acc, const float* wf, const float* xf, float s) {
    float p = 0.f;
#pragma unroll
    for (int e = 0; e < 16; ++e) p = fmaf(wf[e], xf[e], p);
    return BLOCK ? fmaf(s, p, acc) : acc + p;
}

"""

# The tensor-core decoding, mma and main loop of e4m3 weights (gemv8_tc in FP8_GEMV_SOURCE, gemv8_tc_pairs in
# FP8_FUSED_SOURCE share it; gemv8_tc's comment says how they work); uses load_weights and griddep_wait, which each
# source defines before it
_FP8_TENSOR_CORES = r"""__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned sel) {
    unsigned d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}
// bytes 1 and 3 of u (each half's high byte), e4m3, as a 16-bit pair (low half: byte 1), exactly
template <bool BF16> __device__ __forceinline__ unsigned e4m3_pair(unsigned u) {
    const unsigned bits = (u & 0x80008000u) | ((u & 0x7f007f00u) >> (BF16 ? 4 : 1));
    unsigned d;
#if __CUDA_ARCH__ >= 800
    if (BF16)  // times 2**120 (plus -0: a product's sign kept)
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(bits), "r"(0x7b807b80u), "r"(0x80008000u));
    else  // times 2**8
        asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(bits), "r"(0x5c005c00u), "r"(0x80008000u));
#else
    d = bits;
#endif
    return d;
}
template <bool BF16>
__device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                         unsigned b1) {
#if __CUDA_ARCH__ >= 800
    if (BF16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}
// a lane's 16-byte weight vectors of one chunk at `at`: column g's at 16 t and 64 + 16 t, then column g + 8's
// (zeros past k)
__device__ __forceinline__ void tc_load(uint4* v, const unsigned char* wa, const unsigned char* wb, int at, int t,
                                        int k) {
    const uint4 z = make_uint4(0u, 0u, 0u, 0u);
    const bool lo = at + 16 * t + 16 <= k, hi = at + 80 + 16 * t <= k;
    v[0] = lo ? load_weights(reinterpret_cast<const uint4*>(wa + at)) : z;
    v[1] = hi ? load_weights(reinterpret_cast<const uint4*>(wa + at + 64)) : z;
    v[2] = lo ? load_weights(reinterpret_cast<const uint4*>(wb + at)) : z;
    v[3] = hi ? load_weights(reinterpret_cast<const uint4*>(wb + at + 64)) : z;
}
// c += one chunk: 8 mma, each over word q of both columns' 32 weights and x's 4 values at the same places
template <bool BF16>
__device__ __forceinline__ void tc_chunk(const uint4* v, const uint4* xq, float* c) {
    const unsigned* ua = reinterpret_cast<const unsigned*>(v);
    const unsigned* ub = reinterpret_cast<const unsigned*>(v + 2);
    const unsigned* xv = reinterpret_cast<const unsigned*>(xq);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        // A: (column g, k pair 0) bytes 0 and 2, (g + 8, pair 0), (g, pair 1) bytes 1 and 3, (g + 8, pair 1)
        const unsigned a0 = e4m3_pair<BF16>(ua[q] << 8), a1 = e4m3_pair<BF16>(ub[q] << 8);
        const unsigned a2 = e4m3_pair<BF16>(ua[q]), a3 = e4m3_pair<BF16>(ub[q]);
        // B: x's values 0 and 2, then 1 and 3, of the same 4 places (row g of x)
        const unsigned b0 = prmt(xv[2 * q], xv[2 * q + 1], 0x5410u), b1 = prmt(xv[2 * q], xv[2 * q + 1], 0x7632u);
        mma16816<BF16>(c, a0, a1, a2, a3, b0, b1);
    }
}
// gemv8_tc's sums, which gemv8_tc_pairs shares: lane (g, t) of warp `warp` (of `warps`) sums the chunks at warp 128,
// (warp + warps) 128, ... < k of its two weight rows (wa: mma row g, wb: row g + 8, each already at 16 t) against x's
// row g (xr, at 16 t; zeros for g >= rows), loading the next chunk's weights while it sums this one; acc[0..1] (wa's
// column) times its block scales at sa, acc[2..3] (wb's) times those at sb where BLOCK (one 128-column chunk inside
// one scale block; ONE_SCALE: both rows in one scale block, sb unread), plain sums otherwise. The first chunk's
// weights load before griddep_wait, the rest after.
template <bool BF16, bool BLOCK, bool ONE_SCALE>
__device__ __forceinline__ void tc_sums(float* acc, const unsigned char* wa, const unsigned char* wb,
                                        const unsigned short* xr, const float* sa, const float* sb, int warp,
                                        int warps, int g, int t, int rows, int k, int shift) {
    const int stride = warps * 128;
    uint4 cur[4], nxt[4];
    int at = warp * 128;
    if (at < k) tc_load(cur, wa, wb, at, t, k);
    griddep_wait();  // x may be the previous kernel's output; the weights and scales are constants
    while (at < k) {
        const int next = at + stride;
        if (next < k) tc_load(nxt, wa, wb, next, t, k);
        uint4 xq[4];
        const uint4 z = make_uint4(0u, 0u, 0u, 0u);
        const bool lo = g < rows && at + 16 * t + 16 <= k, hi = g < rows && at + 80 + 16 * t <= k;
        const uint4* xp = reinterpret_cast<const uint4*>(xr + at);
        xq[0] = lo ? __ldg(xp) : z;
        xq[1] = lo ? __ldg(xp + 1) : z;
        xq[2] = hi ? __ldg(xp + 8) : z;
        xq[3] = hi ? __ldg(xp + 9) : z;
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        tc_chunk<BF16>(cur, xq, c);
        const float s_a = BLOCK ? __ldg(sa + (at >> (4 + shift))) : 1.f;
        const float s_b = BLOCK && !ONE_SCALE ? __ldg(sb + (at >> (4 + shift))) : s_a;
        acc[0] = BLOCK ? fmaf(s_a, c[0], acc[0]) : acc[0] + c[0];
        acc[1] = BLOCK ? fmaf(s_a, c[1], acc[1]) : acc[1] + c[1];
        acc[2] = BLOCK ? fmaf(s_b, c[2], acc[2]) : acc[2] + c[2];
        acc[3] = BLOCK ? fmaf(s_b, c[3], acc[3]) : acc[3] + c[3];
#pragma unroll
        for (int i = 0; i < 4; ++i) cur[i] = nxt[i];
        at = next;
    }
}

"""


# The FP8 GEMV of one x row (a decode step of one row), shared by FP8_GEMV_SOURCE (gemv8_one) and FP8_FUSED_SOURCE
# (gemv8_pair_one); uses load_weights, griddep_wait and _FP8_DECODE's helpers, which each source defines before it
_FP8_ONE_ROW = r"""
// 4 warps a block walk groups of two e4m3 weight rows, g = blockIdx.x, blockIdx.x + gridDim.x, ... < groups, the
// weight rows row_of(g, 0) and row_of(g, 1). Each row's sum is gemv8_rows' at one row, in its order (lane l of warp
// v sums the 16-byte vectors 32 v + l, 32 (v + 4) + l, ..., 16 products at a time, each times its block scale where
// BLOCK; a butterfly over the lanes; the warps' sums added in order by one thread): the same bits. The schedule is
// what differs: two weight rows a block where gemv8_rows takes four, at most 64 registers a thread (the launch
// bounds), so that 8 blocks share an SM where 5 did, and a block's next weight vectors load while it sums the last
// ones, the next group's first ones included. finish(g, va, vb) gets the two sums (no per-row scale applied) in
// thread 0. Why: a one-row step's GEMVs are bound by the bytes in flight, and more resident warps keep more of them
// in flight (an H100, 8B shape, 128x128 blocks, weights past L2, us a launch: QKV 12.4 -> 10.9, o 9.3 -> 8.2, gate/up
// 45.1 -> 42.1, down 24.2 -> 22.0; benchmarks/RESULTS.md).
template <bool BF16, bool BLOCK, class RowOf, class Finish>
__device__ __forceinline__ void gemv8_one_row(const unsigned short* __restrict__ x,
                                              const unsigned char* __restrict__ w, int groups, int k,
                                              const float* __restrict__ scale, long long s_ld, int bn, int shift,
                                              RowOf row_of, Finish finish) {
    __shared__ float part[2][4][2];  // [group parity][warp][weight row]: the next group writes the other half
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int vecs = k >> 4, c0 = warp * 32 + lane;
    int g = blockIdx.x;
    uint4 a[2];
    if (g < groups && c0 < vecs) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
            a[i] = load_weights(reinterpret_cast<const uint4*>(w + (long long)row_of(g, i) * k) + c0);
    }
    griddep_wait();  // x may be the previous kernel's output; the weights and scales are constants
    for (int parity = 0; g < groups; g += gridDim.x, parity ^= 1) {
        const float* srow[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) srow[i] = BLOCK ? scale + (long long)(row_of(g, i) / bn) * s_ld : scale;
        float acc[2] = {0.f, 0.f};
        for (int c = c0; c < vecs; c += 128) {
            float wf[2][16];
            float s[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                e4m3x16(a[i], wf[i]);
                s[i] = BLOCK ? __ldg(srow[i] + (c >> shift)) : 1.f;
            }
            int next = c + 128, ng = g;  // this lane's next vectors: further along k, else the next group's first
            if (next >= vecs) {
                next = c0;
                ng = g + gridDim.x;
            }
            if (ng < groups) {
#pragma unroll
                for (int i = 0; i < 2; ++i)
                    a[i] = load_weights(reinterpret_cast<const uint4*>(w + (long long)row_of(ng, i) * k) + next);
            }
            float xf[16];
            widen16<BF16>(reinterpret_cast<const uint4*>(x) + 2 * c, xf);
#pragma unroll
            for (int i = 0; i < 2; ++i) acc[i] = add_partial16<BLOCK>(acc[i], wf[i], xf, s[i]);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float v = acc[i];
            for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane == 0) part[parity][warp][i] = v;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float va = 0.f, vb = 0.f;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                va += part[parity][q][0];
                vb += part[parity][q][1];
            }
            finish(g, va, vb);
        }
    }
}
"""

FP8_GEMV_SOURCE = (
    r"""
// Linear layers with e4m3 weights and 16-bit activations (W8A16): the weights are read as stored (one byte each)
// and turned into float32 in registers; x, y and the float32 sums as GEMV_SOURCE's.
__device__ __forceinline__ float h2f(unsigned short u) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(u));
    return f;
}
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short u;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(u) : "f"(f));
    return u;
}
__device__ __forceinline__ unsigned short f2b(float f) {
    unsigned short u;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(u) : "f"(f));
    return u;
}
template <bool BF16> __device__ __forceinline__ unsigned short fromf(float f) { return BF16 ? f2b(f) : f2h(f); }

"""
    + _FP8_DECODE
    + _GRIDDEP
    + r"""// Weights past L1: as GEMV_SOURCE.
__device__ __forceinline__ uint4 load_weights(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
"""
    + _FP8_ONE_ROW
    + r"""
#define COLS 4   // output columns per block: each x vector loaded and widened once serves all of them
#define SPLITS 4 // warps per block, each summing every SPLITS-th run of 32 weight vectors of the block's columns

// y[r, j] = sum_c x[r, c] * w[j, c] * scale(j, c) for r < rows <= R: x [rows, k] 16-bit (row stride x_ld), w [n, k]
// e4m3 (row-major), y [rows, n] 16-bit or float32 (row stride y_ld). BLOCK false: scale(j, c) = scale[j], applied
// to the whole sum; BLOCK true: scale[(j / bn) * s_ld + (c >> (4 + shift))] (blocks of bn rows and 16 << shift
// columns), applied to each 16-element partial sum. Each block of SPLITS warps serves COLS consecutive columns:
// lane l of warp v takes the 16-byte weight vectors 32 v + l, 32 (v + SPLITS) + l, ... of each column (the next
// ones loading while these are summed), a butterfly sums each warp's lanes and warp 0 the warps' sums. Float32
// sums of exact products (the weights exact as float32); y rounded once. k a multiple of 16; x, w and x_ld
// 16-byte aligned (the caller checks).
template <bool BF16, bool F32OUT, bool BLOCK, int R>
__device__ __forceinline__ void gemv8_rows(const unsigned short* __restrict__ x, const unsigned char* __restrict__ w,
                                           void* __restrict__ y, int rows, int n, int k, long long x_ld,
                                           long long y_ld, const float* __restrict__ scale, long long s_ld, int bn,
                                           int shift) {
    __shared__ float part[SPLITS][COLS][R];
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j0 = blockIdx.x * COLS;
    const int vecs = k >> 4;
    const uint4* wv[COLS];
    const float* srow[COLS];
#pragma unroll
    for (int i = 0; i < COLS; ++i) {
        const int j = min(j0 + i, n - 1);  // a last partial group repeats its last column (not stored)
        wv[i] = reinterpret_cast<const uint4*>(w + (long long)j * k);
        srow[i] = BLOCK ? scale + (long long)(j / bn) * s_ld : scale + j;
    }
    float acc[COLS][R];
#pragma unroll
    for (int i = 0; i < COLS; ++i)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[i][r] = 0.f;
    uint4 a[COLS];
    int c = warp * 32 + lane;
    if (c < vecs) {
#pragma unroll
        for (int i = 0; i < COLS; ++i) a[i] = load_weights(wv[i] + c);
    }
    griddep_wait();  // x may be the previous kernel's output; the weights and scales are constants
    while (c < vecs) {
        float wf[COLS][16];
        float s[COLS];
#pragma unroll
        for (int i = 0; i < COLS; ++i) {
            e4m3x16(a[i], wf[i]);
            s[i] = BLOCK ? __ldg(srow[i] + (c >> shift)) : 1.f;
        }
        const int next = c + 32 * SPLITS;
        if (next < vecs) {
#pragma unroll
            for (int i = 0; i < COLS; ++i) a[i] = load_weights(wv[i] + next);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r < rows) {
                float xf[16];
                widen16<BF16>(reinterpret_cast<const uint4*>(x + r * x_ld) + 2 * c, xf);
#pragma unroll
                for (int i = 0; i < COLS; ++i) acc[i][r] = add_partial16<BLOCK>(acc[i][r], wf[i], xf, s[i]);
            }
        }
        c = next;
    }
#pragma unroll
    for (int i = 0; i < COLS; ++i)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float v = acc[i][r];
            for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane == 0) part[warp][i][r] = v;
        }
    __syncthreads();
    // warp 0: lane i * R + r adds the warps' sums of column j0 + i, row r, and stores it
    const int i = lane / R, r = lane % R;
    if (warp == 0 && lane < COLS * R && r < rows && j0 + i < n) {
        float v = 0.f;
#pragma unroll
        for (int p = 0; p < SPLITS; ++p) v += part[p][i][r];
        if (!BLOCK) v *= __ldg(srow[0] + i);
        const int j = j0 + i;
        if (F32OUT) reinterpret_cast<float*>(y)[r * y_ld + j] = v;
        else reinterpret_cast<unsigned short*>(y)[r * y_ld + j] = fromf<BF16>(v);
    }
}

// One x row (gemv8_one_row): y[j] = the sum of weight row j (times scale[j] where not BLOCK), rounded once; the
// arguments as gemv8_rows takes them (rows, x_ld and y_ld unused: one row)
template <bool BF16, bool F32OUT, bool BLOCK>
__device__ __forceinline__ void gemv8_one(const unsigned short* __restrict__ x, const unsigned char* __restrict__ w,
                                          void* __restrict__ y, int n, int k, const float* __restrict__ scale,
                                          long long s_ld, int bn, int shift) {
    gemv8_one_row<BF16, BLOCK>(
        x, w, (n + 1) / 2, k, scale, s_ld, bn, shift, [n](int g, int i) { return min(2 * g + i, n - 1); },
        [=](int g, float va, float vb) {
            const float v[2] = {va, vb};
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int j = 2 * g + i;  // (a last odd group's second row repeats its first: not stored)
                if (j < n) {
                    const float o = BLOCK ? v[i] : v[i] * __ldg(scale + j);
                    if (F32OUT) reinterpret_cast<float*>(y)[j] = o;
                    else reinterpret_cast<unsigned short*>(y)[j] = fromf<BF16>(o);
                }
            }
        });
}
#define GEMV8ONE(name, bf16, f32out, block)                                                                        \
    extern "C" __global__ void __launch_bounds__(128, 8)                                                           \
        name(const unsigned short* x, const unsigned char* w, void* y, int rows, int n, int k, long long x_ld,     \
             long long y_ld, const float* scale, long long s_ld, int bn, int shift) {                             \
        gemv8_one<bf16, f32out, block>(x, w, y, n, k, scale, s_ld, bn, shift);                                     \
    }
GEMV8ONE(gemv8_bf16_bf16_row_1, true, false, false)
GEMV8ONE(gemv8_bf16_bf16_block_1, true, false, true)
GEMV8ONE(gemv8_bf16_f32_row_1, true, true, false)
GEMV8ONE(gemv8_bf16_f32_block_1, true, true, true)
GEMV8ONE(gemv8_f16_f16_row_1, false, false, false)
GEMV8ONE(gemv8_f16_f16_block_1, false, false, true)
GEMV8ONE(gemv8_f16_f32_row_1, false, true, false)
GEMV8ONE(gemv8_f16_f32_block_1, false, true, true)

#define GEMV8(name, bf16, f32out, block, r)                                                                         \
    extern "C" __global__ void name(const unsigned short* x, const unsigned char* w, void* y, int rows, int n,       \
                                    int k, long long x_ld, long long y_ld, const float* scale, long long s_ld,       \
                                    int bn, int shift) {                                                             \
        gemv8_rows<bf16, f32out, block, r>(x, w, y, rows, n, k, x_ld, y_ld, scale, s_ld, bn, shift);                \
    }
GEMV8(gemv8_bf16_bf16_row_2, true, false, false, 2)
GEMV8(gemv8_bf16_bf16_block_2, true, false, true, 2)
GEMV8(gemv8_bf16_f32_row_2, true, true, false, 2)
GEMV8(gemv8_bf16_f32_block_2, true, true, true, 2)
GEMV8(gemv8_f16_f16_row_2, false, false, false, 2)
GEMV8(gemv8_f16_f16_block_2, false, false, true, 2)
GEMV8(gemv8_f16_f32_row_2, false, true, false, 2)
GEMV8(gemv8_f16_f32_block_2, false, true, true, 2)
GEMV8(gemv8_bf16_bf16_row_4, true, false, false, 4)
GEMV8(gemv8_bf16_bf16_block_4, true, false, true, 4)
GEMV8(gemv8_bf16_f32_row_4, true, true, false, 4)
GEMV8(gemv8_bf16_f32_block_4, true, true, true, 4)
GEMV8(gemv8_f16_f16_row_4, false, false, false, 4)
GEMV8(gemv8_f16_f16_block_4, false, false, true, 4)
GEMV8(gemv8_f16_f32_row_4, false, true, false, 4)
GEMV8(gemv8_f16_f32_block_4, false, true, true, 4)
GEMV8(gemv8_bf16_bf16_row_8, true, false, false, 8)
GEMV8(gemv8_bf16_bf16_block_8, true, false, true, 8)
GEMV8(gemv8_bf16_f32_row_8, true, true, false, 8)
GEMV8(gemv8_bf16_f32_block_8, true, true, true, 8)
GEMV8(gemv8_f16_f16_row_8, false, false, false, 8)
GEMV8(gemv8_f16_f16_block_8, false, false, true, 8)
GEMV8(gemv8_f16_f32_row_8, false, true, false, 8)
GEMV8(gemv8_f16_f32_block_8, false, true, true, 8)

// The same product on tensor cores (SM 8.0+; an empty kernel below): gemv8_rows' decoding is the step's cost once
// rows > 1 (each weight widened per row group), while here each weight is decoded once into a 16-bit pair and
// one mma.m16n8k16 multiplies 16 columns by 16 of k for all rows <= 8 (the mma's n). A block of W warps (blockDim
// / 32, at most 8) serves 16 consecutive columns j0..j0+15; warp v sums the chunks of 128 of k at 128 v, 128 (v +
// W), ...; lane (g = lane / 4, t = lane % 4) reads 16 weights of column j0 + g and of j0 + g + 8 at 16 t and at 64
// + 16 t of each chunk (a warp's load: 64 contiguous bytes of 8 columns), the next chunk loading while this one is
// summed. Decoding: e4m3's bits moved into a 16-bit float's places (bfloat16: the value times 2**-120, float16:
// times 2**-8, subnormals landing on subnormals) and one packed multiply by 2**120 / 2**8, exact. The mma sums
// k in an order of its own: the lane's physical k positions are paired as the decoding pairs them (bytes 0 and 2,
// 1 and 3 of each word), and x's values are paired alike (prmt), which the sum does not see. Sums: each chunk's
// products in the mma's float32 accumulator (fresh per chunk), added to the column's sum (times the chunk's block
// scale); the warps' sums in shared memory; y rounded once. BLOCK needs (16 << shift) a multiple of 128 (a chunk
// inside one scale block) and bn a multiple of 16 (the caller checks); k a multiple of 16; x, w, x_ld 16-byte
// aligned.
"""
    + _FP8_TENSOR_CORES
    + r"""template <bool BF16, bool F32OUT, bool BLOCK>
__device__ __forceinline__ void gemv8_tc(const unsigned short* __restrict__ x, const unsigned char* __restrict__ w,
                                         void* __restrict__ y, int rows, int n, int k, long long x_ld,
                                         long long y_ld, const float* __restrict__ scale, long long s_ld, int bn,
                                         int shift) {
#if __CUDA_ARCH__ >= 800
    __shared__ float part[8][32][4];
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int j0 = blockIdx.x * 16;
    const unsigned char* wa = w + (long long)min(j0 + g, n - 1) * k + 16 * t;  // a last partial tile repeats
    const unsigned char* wb = w + (long long)min(j0 + g + 8, n - 1) * k + 16 * t;  // its last column (not stored)
    const unsigned short* xr = x + (long long)min(g, rows - 1) * x_ld + 16 * t;  // B's column g: x's row g
    const float* srow = BLOCK ? scale + (long long)(j0 / bn) * s_ld : scale;  // (the tile inside one scale block)
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    tc_sums<BF16, BLOCK, true>(acc, wa, wb, xr, srow, srow, warp, warps, g, t, rows, k, shift);
#pragma unroll
    for (int i = 0; i < 4; ++i) part[warp][lane][i] = acc[i];
    __syncthreads();
    if (warp == 0) {
        // accumulator i: column j0 + g (+ 8 for i >= 2), x row 2 t + (i & 1)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float v = 0.f;
            for (int p = 0; p < warps; ++p) v += part[p][lane][i];
            const int j = j0 + g + (i >> 1) * 8, r = 2 * t + (i & 1);
            if (j < n && r < rows) {
                if (!BLOCK) v *= __ldg(scale + j);
                if (F32OUT) reinterpret_cast<float*>(y)[r * y_ld + j] = v;
                else reinterpret_cast<unsigned short*>(y)[r * y_ld + j] = fromf<BF16>(v);
            }
        }
    }
#endif
}

#define GEMV8TC(name, bf16, f32out, block)                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        name(const unsigned short* x, const unsigned char* w, void* y, int rows, int n, int k, long long x_ld,     \
             long long y_ld, const float* scale, long long s_ld, int bn, int shift) {                             \
        gemv8_tc<bf16, f32out, block>(x, w, y, rows, n, k, x_ld, y_ld, scale, s_ld, bn, shift);                    \
    }
GEMV8TC(gemv8tc_bf16_bf16_row, true, false, false)
GEMV8TC(gemv8tc_bf16_bf16_block, true, false, true)
GEMV8TC(gemv8tc_bf16_f32_row, true, true, false)
GEMV8TC(gemv8tc_bf16_f32_block, true, true, true)
GEMV8TC(gemv8tc_f16_f16_row, false, false, false)
GEMV8TC(gemv8tc_f16_f16_block, false, false, true)
GEMV8TC(gemv8tc_f16_f32_row, false, true, false)
GEMV8TC(gemv8tc_f16_f32_block, false, true, true)

// out [n, k] 16-bit = w [n, k] e4m3 times its scales (as gemv8_rows reads them; block != 0: per block), each
// product rounded once to nearest even: the weight a 16-bit GEMM of many rows reads. A grid-stride loop over the
// 16-byte weight vectors; k a multiple of 16, w and out 16-byte aligned.
template <bool BF16>
__device__ __forceinline__ void dequant_rows(const unsigned char* __restrict__ w, unsigned short* __restrict__ out,
                                             long long n, int k, const float* __restrict__ scale, long long s_ld,
                                             int bn, int shift, int block) {
    const int vecs = k >> 4;
    const long long total = n * vecs;
    for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < total;
         v += (long long)gridDim.x * blockDim.x) {
        const long long j = v / vecs;
        const int c = (int)(v - j * vecs);
        const float s = block ? __ldg(scale + (j / bn) * s_ld + (c >> shift)) : __ldg(scale + j);
        float wf[16];
        e4m3x16(load_weights(reinterpret_cast<const uint4*>(w) + v), wf);
        uint4 o[2];
        unsigned short* ov = reinterpret_cast<unsigned short*>(o);
#pragma unroll
        for (int e = 0; e < 16; ++e) ov[e] = fromf<BF16>(wf[e] * s);
        uint4* dst = reinterpret_cast<uint4*>(out) + 2 * v;
        dst[0] = o[0];
        dst[1] = o[1];
    }
}
extern "C" __global__ void dequant_e4m3_bf16(const unsigned char* w, unsigned short* out, long long n, int k,
                                             const float* scale, long long s_ld, int bn, int shift, int block) {
    dequant_rows<true>(w, out, n, k, scale, s_ld, bn, shift, block);
}
extern "C" __global__ void dequant_e4m3_f16(const unsigned char* w, unsigned short* out, long long n, int k,
                                            const float* scale, long long s_ld, int bn, int shift, int block) {
    dequant_rows<false>(w, out, n, k, scale, s_ld, bn, shift, block);
}
"""
)

# FUSED_GEMV_SOURCE (its prologue, stage) with a GEMV over e4m3 weights after it: the fused decode step's
# launches for FP8 weights (gemv8_*_{norm,addnorm,silu}_*: a prologue; gemv8_*_{silu,rope}_{row,block}_{1,4}: the
# SiLU or the RoPE and KV append as an epilogue over pairs of output columns). Compiled with --use_fast_math as
# FUSED_GEMV_SOURCE is (the prologue's and the epilogues' rounding must be FlashInfer's); the weights' decoding
# multiplies with subnormal inputs honored regardless (mul_subnormal).
FP8_FUSED_SOURCE = (
    "#define GEMV_DEVICE_FUNCTIONS_ONLY  // FUSED_GEMV_SOURCE's prologue and epilogues, none of its 16-bit kernels\n"
    + FUSED_GEMV_SOURCE
    + _FP8_DECODE
    + _FP8_ONE_ROW
    + r"""
#define COLS 4   // output columns per group of warps, as gemv8_rows
#define SPLITS 4 // warps per group, each summing every SPLITS-th run of 32 weight vectors

// gemv_fused's prologue (MODE 1 norm, 2 add-norm, 3 silu: the input rows into shared memory, rounded as
// FlashInfer rounds) followed by gemv8_rows' sums over e4m3 weights (its scales, its order of sums) for rows <= 4.
// 8 warps a block: two groups of SPLITS warps, each group serving COLS columns per pass of a grid-stride loop
// (both groups take the same number of passes, so the block's barriers are met by all its threads).
template <bool BF16, bool F32OUT, int MODE, bool BLOCK>
__device__ __forceinline__ void gemv8_fused(const unsigned short* __restrict__ x, const unsigned char* __restrict__ w,
                                            void* __restrict__ y, int rows, int n, int k, long long x_ld,
                                            long long y_ld, const unsigned short* __restrict__ h,
                                            const unsigned short* __restrict__ nw, unsigned short* __restrict__ h_out,
                                            long long h_ld, float eps, const float* __restrict__ scale,
                                            long long s_ld, int bn, int shift) {
    extern __shared__ uint4 sx[];  // the input rows, [rows, k / 8] vectors of 8 16-bit values
    __shared__ float part[2][SPLITS][COLS][4];
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = warp / SPLITS, split = warp % SPLITS;
    const int groups = (n + COLS - 1) / COLS;
    const int vecs = k >> 4, row_vecs = k >> 3;
    // the first pass's first weight vectors load before the wait for the previous kernel and the prologue (the
    // weights are constants), as gemv_fused's do: most blocks make one pass, so this hides the prologue
    uint4 a[COLS];
    bool loaded = false;
    {
        const int g = blockIdx.x * 2 + group;
        const int c = split * 32 + lane;
        if (g < groups && c < vecs) {
#pragma unroll
            for (int i = 0; i < COLS; ++i)
                a[i] = load_weights(reinterpret_cast<const uint4*>(w + (long long)min(g * COLS + i, n - 1) * k) + c);
            loaded = true;
        }
    }
    griddep_wait();
    stage<BF16, MODE>(sx, x, rows, k, x_ld, h, nw, h_out, h_ld, eps);
    for (int base = blockIdx.x * 2; base < groups; base += gridDim.x * 2) {
        const int g = base + group;
        const int j0 = g * COLS;
        float acc[COLS][4];
#pragma unroll
        for (int i = 0; i < COLS; ++i)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][r] = 0.f;
        const float* srow[COLS];
        if (g < groups) {
            const uint4* wv[COLS];
#pragma unroll
            for (int i = 0; i < COLS; ++i) {
                const int j = min(j0 + i, n - 1);
                wv[i] = reinterpret_cast<const uint4*>(w + (long long)j * k);
                srow[i] = BLOCK ? scale + (long long)(j / bn) * s_ld : scale + j;
            }
            int c = split * 32 + lane;
            if (c < vecs && !loaded) {
#pragma unroll
                for (int i = 0; i < COLS; ++i) a[i] = load_weights(wv[i] + c);
            }
            loaded = false;  // later passes load their own first vectors
            while (c < vecs) {
                float wf[COLS][16];
                float s[COLS];
#pragma unroll
                for (int i = 0; i < COLS; ++i) {
                    e4m3x16(a[i], wf[i]);
                    s[i] = BLOCK ? __ldg(srow[i] + (c >> shift)) : 1.f;
                }
                const int next = c + 32 * SPLITS;
                if (next < vecs) {
#pragma unroll
                    for (int i = 0; i < COLS; ++i) a[i] = load_weights(wv[i] + next);
                }
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    if (r < rows) {
                        float xf[16];
                        widen8<BF16>(sx[r * row_vecs + 2 * c], xf);
                        widen8<BF16>(sx[r * row_vecs + 2 * c + 1], xf + 8);
#pragma unroll
                        for (int i = 0; i < COLS; ++i) acc[i][r] = add_partial16<BLOCK>(acc[i][r], wf[i], xf, s[i]);
                    }
                }
                c = next;
            }
        }
#pragma unroll
        for (int i = 0; i < COLS; ++i)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                float v = acc[i][r];
                for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
                if (lane == 0) part[group][split][i][r] = v;
            }
        __syncthreads();
        const int i = lane >> 2, r = lane & 3;
        if (split == 0 && g < groups && lane < COLS * 4 && r < rows && j0 + i < n) {
            float v = 0.f;
#pragma unroll
            for (int p = 0; p < SPLITS; ++p) v += part[group][p][i][r];
            if (!BLOCK) v *= __ldg(srow[i]);
            const int j = j0 + i;
            if (F32OUT) reinterpret_cast<float*>(y)[r * y_ld + j] = v;
            else reinterpret_cast<unsigned short*>(y)[r * y_ld + j] = fromf<BF16>(v);
        }
        __syncthreads();  // part is written again by the next pass
    }
}

// (at most 128 registers a thread, so that two blocks share an SM: one alone keeps too few loads in flight)
#define FUSED8(name, bf16, f32out, mode, block)                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                           \
        name(const unsigned short* x, const unsigned char* w, void* y, int rows, int n, int k, long long x_ld,     \
             long long y_ld, const unsigned short* h, const unsigned short* nw, unsigned short* h_out,             \
             long long h_ld, float eps, const float* scale, long long s_ld, int bn, int shift) {                   \
        gemv8_fused<bf16, f32out, mode, block>(x, w, y, rows, n, k, x_ld, y_ld, h, nw, h_out, h_ld, eps, scale,     \
                                               s_ld, bn, shift);                                                    \
    }
FUSED8(gemv8_bf16_bf16_norm_row, true, false, 1, false)
FUSED8(gemv8_bf16_bf16_norm_block, true, false, 1, true)
FUSED8(gemv8_bf16_bf16_addnorm_row, true, false, 2, false)
FUSED8(gemv8_bf16_bf16_addnorm_block, true, false, 2, true)
FUSED8(gemv8_bf16_bf16_silu_row, true, false, 3, false)
FUSED8(gemv8_bf16_bf16_silu_block, true, false, 3, true)
FUSED8(gemv8_bf16_f32_norm_row, true, true, 1, false)
FUSED8(gemv8_bf16_f32_norm_block, true, true, 1, true)
FUSED8(gemv8_bf16_f32_addnorm_row, true, true, 2, false)
FUSED8(gemv8_bf16_f32_addnorm_block, true, true, 2, true)
FUSED8(gemv8_bf16_f32_silu_row, true, true, 3, false)
FUSED8(gemv8_bf16_f32_silu_block, true, true, 3, true)
FUSED8(gemv8_f16_f16_norm_row, false, false, 1, false)
FUSED8(gemv8_f16_f16_norm_block, false, false, 1, true)
FUSED8(gemv8_f16_f16_addnorm_row, false, false, 2, false)
FUSED8(gemv8_f16_f16_addnorm_block, false, false, 2, true)
FUSED8(gemv8_f16_f16_silu_row, false, false, 3, false)
FUSED8(gemv8_f16_f16_silu_block, false, false, 3, true)
FUSED8(gemv8_f16_f32_norm_row, false, true, 1, false)
FUSED8(gemv8_f16_f32_norm_block, false, true, 1, true)
FUSED8(gemv8_f16_f32_addnorm_row, false, true, 2, false)
FUSED8(gemv8_f16_f32_addnorm_block, false, true, 2, true)
FUSED8(gemv8_f16_f32_silu_row, false, true, 3, false)
FUSED8(gemv8_f16_f32_silu_block, false, true, 3, true)

// The end of one pair of output columns and one row (gemv8_pairs, gemv8_tc_pairs): its two float32 sums va and vb
// (pair p: columns ja and jb as gemv8_pairs maps them) times their per-row scales (not BLOCK), rounded as the GEMV's
// output, then the epilogue EPI
template <bool BF16, bool BLOCK, int EPI>
__device__ __forceinline__ void finish_pair(
        float va, float vb, int p, int r, unsigned short* __restrict__ y, long long y_ld, int pairs,
        const float* __restrict__ scale, int hq, int hk, unsigned d, float rcp_theta, float rcp_scale, float smooth_a,
        float smooth_b, const int* __restrict__ positions, const int* __restrict__ batch_indices,
        const int* __restrict__ kv_indptr, const int* __restrict__ kv_indices, unsigned short* __restrict__ k_cache,
        unsigned short* __restrict__ v_cache, int page_size, long long stride_page, long long stride_n,
        long long stride_h) {
    const unsigned half = EPI == 2 ? d >> 1 : 1u;
    const int head = p / (int)half;
    const unsigned i = p - head * (int)half;
    const long long ja = EPI == 1 ? p : (long long)head * d + i;
    const long long jb = EPI == 1 ? (long long)p + pairs : ja + half;
    if (!BLOCK) {
        va *= __ldg(scale + ja);
        vb *= __ldg(scale + jb);
    }
    const unsigned short q0 = fromf<BF16>(va), q1 = fromf<BF16>(vb);
    if (EPI == 1) {
        const float g = tof<BF16>(q0);
        y[r * y_ld + p] = fromf<BF16>(g / (1.0f + __expf(-g)) * tof<BF16>(q1));
        return;
    }
    rope_store_append<BF16>(q0, q1, head, i, rope_freq(i, d, rcp_theta, rcp_scale, smooth_a, smooth_b), r, y, y_ld,
                            ja, hq, hk, d, positions, batch_indices, kv_indptr, kv_indices, k_cache, v_cache,
                            page_size, stride_page, stride_n, stride_h);
}

// The FP8 GEMV of a decode step whose outputs pair up in an epilogue, so that the launch after it goes away. A
// block of SPLITS warps computes two pairs (a, b) of output columns, four e4m3 weight rows, each with gemv8_rows'
// sums in gemv8_rows' order (so each output has the plain FP8 GEMV's bits, up to this module's flush-to-zero of
// subnormal products), rounds them to the 16-bit type as that GEMV's output is rounded, then per pair and row:
//   EPI 1 (SiLU): w [2 pairs, k] holds the gate rows, then the up rows; pair o is (o, o + pairs) and writes
//                 y [rows, pairs] at column o: round(silu(gate) * up), FlashInfer's silu_and_mul of the two rounded
//                 outputs (its arithmetic, as the fused SILU prologue computes it)
//   EPI 2 (RoPE and the KV append): y = qkv [rows, (hq + 2 hk) d]; pair p of head p / (d / 2), element i = p % (d /
//                 2) is (head d + i, head d + i + d / 2): gemv_rope_append's epilogue (q and k heads rotated, k and
//                 v heads also written into page kv_indices[kv_indptr[b] + pos / page_size] of the caches)
// Rows <= R <= 4; k a multiple of 16; x, w and x_ld 16-byte aligned (the caller checks).
template <bool BF16, bool BLOCK, int R, int EPI>
__device__ __forceinline__ void gemv8_pairs(
        const unsigned short* __restrict__ x, const unsigned char* __restrict__ w, unsigned short* __restrict__ y,
        int rows, int pairs, int k, long long x_ld, long long y_ld, const float* __restrict__ scale, long long s_ld,
        int bn, int shift, int hq, int hk, unsigned d, float rcp_theta, float rcp_scale, float smooth_a,
        float smooth_b, const int* __restrict__ positions, const int* __restrict__ batch_indices,
        const int* __restrict__ kv_indptr, const int* __restrict__ kv_indices, unsigned short* __restrict__ k_cache,
        unsigned short* __restrict__ v_cache, int page_size, long long stride_page, long long stride_n,
        long long stride_h) {
    __shared__ float part[SPLITS][4][R];
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int vecs = k >> 4;
    const unsigned half = EPI == 2 ? d >> 1 : 1u;
    const uint4* wv[4];
    const float* srow[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // weight row i: pair i & 1 of the block, its member i >> 1
        const int p = min((int)blockIdx.x * 2 + (i & 1), pairs - 1);  // a last odd pair repeats (not stored)
        const int j = EPI == 1 ? p + (i >> 1) * pairs
                               : (p / (int)half) * (int)d + p % (int)half + (i >> 1) * (int)half;
        wv[i] = reinterpret_cast<const uint4*>(w + (long long)j * k);
        srow[i] = BLOCK ? scale + (long long)(j / bn) * s_ld : scale + j;
    }
    float acc[4][R];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[i][r] = 0.f;
    uint4 a[4];
    int c = warp * 32 + lane;
    if (c < vecs) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = load_weights(wv[i] + c);
    }
    griddep_wait();  // x is the previous kernel's output; the weights and scales are constants
    while (c < vecs) {  // gemv8_rows' loop
        float wf[4][16];
        float s[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            e4m3x16(a[i], wf[i]);
            s[i] = BLOCK ? __ldg(srow[i] + (c >> shift)) : 1.f;
        }
        const int next = c + 32 * SPLITS;
        if (next < vecs) {
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = load_weights(wv[i] + next);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r < rows) {
                float xf[16];
                widen16<BF16>(reinterpret_cast<const uint4*>(x + r * x_ld) + 2 * c, xf);
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[i][r] = add_partial16<BLOCK>(acc[i][r], wf[i], xf, s[i]);
            }
        }
        c = next;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float v = acc[i][r];
            for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane == 0) part[warp][i][r] = v;
        }
    __syncthreads();
    // warp 0: lane q * R + r finishes pair q of the block for row r
    const int q = lane / R, r = lane % R;
    const int p = (int)blockIdx.x * 2 + q;
    if (warp != 0 || lane >= 2 * R || r >= rows || p >= pairs) return;
    float va = 0.f, vb = 0.f;
#pragma unroll
    for (int sp = 0; sp < SPLITS; ++sp) {
        va += part[sp][q][r];
        vb += part[sp][q + 2][r];
    }
    finish_pair<BF16, BLOCK, EPI>(va, vb, p, r, y, y_ld, pairs, scale, hq, hk, d, rcp_theta, rcp_scale, smooth_a,
                                  smooth_b, positions, batch_indices, kv_indptr, kv_indices, k_cache, v_cache,
                                  page_size, stride_page, stride_n, stride_h);
}

// gemv8_pairs' sums and epilogue for one x row (gemv8_one_row: one pair a group, weight rows its two members;
// the same bits as gemv8_pairs at one row, on the one-row schedule)
template <bool BF16, bool BLOCK, int EPI>
__device__ __forceinline__ void gemv8_pair_one(
        const unsigned short* __restrict__ x, const unsigned char* __restrict__ w, unsigned short* __restrict__ y,
        int pairs, int k, long long y_ld, const float* __restrict__ scale, long long s_ld, int bn, int shift, int hq,
        int hk, unsigned d, float rcp_theta, float rcp_scale, float smooth_a, float smooth_b,
        const int* __restrict__ positions, const int* __restrict__ batch_indices, const int* __restrict__ kv_indptr,
        const int* __restrict__ kv_indices, unsigned short* __restrict__ k_cache, unsigned short* __restrict__ v_cache,
        int page_size, long long stride_page, long long stride_n, long long stride_h) {
    const int half = EPI == 2 ? (int)(d >> 1) : 1;
    gemv8_one_row<BF16, BLOCK>(
        x, w, pairs, k, scale, s_ld, bn, shift,
        [=](int p, int i) { return EPI == 1 ? p + i * pairs : (p / half) * (int)d + p % half + i * half; },
        [=](int p, float va, float vb) {
            finish_pair<BF16, BLOCK, EPI>(va, vb, p, 0, y, y_ld, pairs, scale, hq, hk, d, rcp_theta, rcp_scale,
                                          smooth_a, smooth_b, positions, batch_indices, kv_indptr, kv_indices,
                                          k_cache, v_cache, page_size, stride_page, stride_n, stride_h);
        });
}

// The kernels' parameters, shared by the one-row (gemv8_pair_one) and the up-to-4-rows (gemv8_pairs) forms
#define PAIRS8_PARAMS                                                                                              \
    const unsigned short *x, const unsigned char *w, unsigned short *y, int rows, int pairs, int k, long long x_ld, \
        long long y_ld, const float *scale, long long s_ld, int bn, int shift, int hq, int hk, unsigned d,          \
        float rcp_theta, float rcp_scale, float smooth_a, float smooth_b, const int *positions,                     \
        const int *batch_indices, const int *kv_indptr, const int *kv_indices, unsigned short *k_cache,             \
        unsigned short *v_cache, int page_size, long long stride_page, long long stride_n, long long stride_h
#define PAIRS8ONE(name, bf16, block, epi)                                                                          \
    extern "C" __global__ void __launch_bounds__(128, 8) name(PAIRS8_PARAMS) {                                    \
        gemv8_pair_one<bf16, block, epi>(x, w, y, pairs, k, y_ld, scale, s_ld, bn, shift, hq, hk, d, rcp_theta,    \
                                         rcp_scale, smooth_a, smooth_b, positions, batch_indices, kv_indptr,        \
                                         kv_indices, k_cache, v_cache, page_size, stride_page, stride_n, stride_h); \
    }
#define PAIRS8(name, bf16, block, r, epi)                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * SPLITS) name(PAIRS8_PARAMS) {                               \
        gemv8_pairs<bf16, block, r, epi>(x, w, y, rows, pairs, k, x_ld, y_ld, scale, s_ld, bn, shift, hq, hk, d,    \
                                         rcp_theta, rcp_scale, smooth_a, smooth_b, positions, batch_indices,         \
                                         kv_indptr, kv_indices, k_cache, v_cache, page_size, stride_page, stride_n, \
                                         stride_h);                                                                 \
    }
PAIRS8ONE(gemv8_bf16_silu_row_1, true, false, 1)
PAIRS8ONE(gemv8_bf16_silu_block_1, true, true, 1)
PAIRS8(gemv8_bf16_silu_row_4, true, false, 4, 1)
PAIRS8(gemv8_bf16_silu_block_4, true, true, 4, 1)
PAIRS8ONE(gemv8_bf16_rope_row_1, true, false, 2)
PAIRS8ONE(gemv8_bf16_rope_block_1, true, true, 2)
PAIRS8(gemv8_bf16_rope_row_4, true, false, 4, 2)
PAIRS8(gemv8_bf16_rope_block_4, true, true, 4, 2)
PAIRS8ONE(gemv8_f16_silu_row_1, false, false, 1)
PAIRS8ONE(gemv8_f16_silu_block_1, false, true, 1)
PAIRS8(gemv8_f16_silu_row_4, false, false, 4, 1)
PAIRS8(gemv8_f16_silu_block_4, false, true, 4, 1)
PAIRS8ONE(gemv8_f16_rope_row_1, false, false, 2)
PAIRS8ONE(gemv8_f16_rope_block_1, false, true, 2)
PAIRS8(gemv8_f16_rope_row_4, false, false, 4, 2)
PAIRS8(gemv8_f16_rope_block_4, false, true, 4, 2)
"""
    + _FP8_TENSOR_CORES
    + r"""
// gemv8_pairs on tensor cores, for 3 rows and more (as gemv8_tc serves them: SM 8.0+, an empty kernel below): a
// block's 16 mma rows are the two members of 8 pairs, lane (g, t) reading the weights of pair p = 8 blockIdx + g's
// first column (mma row g) and second (row g + 8), so that its accumulators hold both members of its pair for x rows
// 2 t and 2 t + 1, and finish_pair runs in the lane. Each column's sum is gemv8_tc's, in gemv8_tc's order (the same
// chunks per warp for the same warps a block: the caller launches as gemv8_tc would be launched over the weight),
// each chunk times its own column's block scale. BLOCK needs (16 << shift) a multiple of 128 (the caller checks).
template <bool BF16, bool BLOCK, int EPI>
__device__ __forceinline__ void gemv8_tc_pairs(
        const unsigned short* __restrict__ x, const unsigned char* __restrict__ w, unsigned short* __restrict__ y,
        int rows, int pairs, int k, long long x_ld, long long y_ld, const float* __restrict__ scale, long long s_ld,
        int bn, int shift, int hq, int hk, unsigned d, float rcp_theta, float rcp_scale, float smooth_a,
        float smooth_b, const int* __restrict__ positions, const int* __restrict__ batch_indices,
        const int* __restrict__ kv_indptr, const int* __restrict__ kv_indices, unsigned short* __restrict__ k_cache,
        unsigned short* __restrict__ v_cache, int page_size, long long stride_page, long long stride_n,
        long long stride_h) {
#if __CUDA_ARCH__ >= 800
    __shared__ float part[8][32][4];
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const unsigned half = EPI == 2 ? d >> 1 : 1u;
    const int p = min((int)blockIdx.x * 8 + g, pairs - 1);  // a last partial tile repeats its last pair (not stored)
    const long long ja = EPI == 1 ? p : (long long)(p / (int)half) * d + p % (int)half;
    const long long jb = EPI == 1 ? (long long)p + pairs : ja + half;
    const unsigned char* wa = w + ja * k + 16 * t;
    const unsigned char* wb = w + jb * k + 16 * t;
    const unsigned short* xr = x + (long long)min(g, rows - 1) * x_ld + 16 * t;  // B's column g: x's row g
    const float* sa = BLOCK ? scale + (ja / bn) * s_ld : scale;
    const float* sb = BLOCK ? scale + (jb / bn) * s_ld : scale;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    tc_sums<BF16, BLOCK, false>(acc, wa, wb, xr, sa, sb, warp, warps, g, t, rows, k, shift);  // gemv8_tc's sums
#pragma unroll
    for (int i = 0; i < 4; ++i) part[warp][lane][i] = acc[i];
    __syncthreads();
    const int pair = (int)blockIdx.x * 8 + g;
    if (warp != 0 || pair >= pairs) return;
    // accumulator i: the pair's first column (i < 2) or second, x row 2 t + (i & 1)
    float v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[i] = 0.f;
        for (int q = 0; q < warps; ++q) v[i] += part[q][lane][i];
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = 2 * t + h;
        if (r < rows)
            finish_pair<BF16, BLOCK, EPI>(v[h], v[2 + h], pair, r, y, y_ld, pairs, scale, hq, hk, d, rcp_theta,
                                          rcp_scale, smooth_a, smooth_b, positions, batch_indices, kv_indptr,
                                          kv_indices, k_cache, v_cache, page_size, stride_page, stride_n, stride_h);
    }
#endif
}

#define PAIRS8TC(name, bf16, block, epi)                                                                           \
    extern "C" __global__ void __launch_bounds__(256) name(                                                       \
            const unsigned short* x, const unsigned char* w, unsigned short* y, int rows, int pairs, int k,         \
            long long x_ld, long long y_ld, const float* scale, long long s_ld, int bn, int shift, int hq, int hk,   \
            unsigned d, float rcp_theta, float rcp_scale, float smooth_a, float smooth_b, const int* positions,     \
            const int* batch_indices, const int* kv_indptr, const int* kv_indices, unsigned short* k_cache,         \
            unsigned short* v_cache, int page_size, long long stride_page, long long stride_n, long long stride_h) { \
        gemv8_tc_pairs<bf16, block, epi>(x, w, y, rows, pairs, k, x_ld, y_ld, scale, s_ld, bn, shift, hq, hk, d,    \
                                         rcp_theta, rcp_scale, smooth_a, smooth_b, positions, batch_indices,         \
                                         kv_indptr, kv_indices, k_cache, v_cache, page_size, stride_page, stride_n, \
                                         stride_h);                                                                 \
    }
PAIRS8TC(gemv8tc_bf16_silu_row, true, false, 1)
PAIRS8TC(gemv8tc_bf16_silu_block, true, true, 1)
PAIRS8TC(gemv8tc_bf16_rope_row, true, false, 2)
PAIRS8TC(gemv8tc_bf16_rope_block, true, true, 2)
PAIRS8TC(gemv8tc_f16_silu_row, false, false, 1)
PAIRS8TC(gemv8tc_f16_silu_block, false, true, 1)
PAIRS8TC(gemv8tc_f16_rope_row, false, false, 2)
PAIRS8TC(gemv8tc_f16_rope_block, false, true, 2)
"""
)


# Dynamic e4m3 quantization of 16-bit activations for the FP8 tensor-core GEMM (W8A8, fp8_linear.Fp8Linears.w8a8).
FP8_QUANT_SOURCE = r"""
// x [rows, k] 16-bit (row stride x_ld, 16-byte aligned rows for quant_rows, 8-byte for quant_groups) -> q [rows, k]
// e4m3 (row-major, row stride k) and float32 scales with x ~= q * scale. Per group of elements: amax = max(max |x|,
// 1e-12), scale = amax / 448 and q = e4m3(x * (448 / amax)), rounded to nearest even and saturated at +-448 (PTX
// cvt.rn.satfinite.e4m3x2.f32; SM 8.9+). The largest element of each group is stored as +-448 exactly.
__device__ __forceinline__ float h2f(unsigned short u) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(u));
    return f;
}
template <bool BF16> __device__ __forceinline__ float wide(unsigned short u) {
    return BF16 ? __int_as_float(((unsigned)u) << 16) : h2f(u);
}
__device__ __forceinline__ unsigned short e4m3x2(float lo, float hi) {
    unsigned short out;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(out) : "f"(hi), "f"(lo));
    return out;
}

// One group per row (per-token scales, scale[r]): one block of 256 threads per row; k a multiple of 8.
template <bool BF16>
__device__ __forceinline__ void quant_rows(const unsigned short* __restrict__ x, long long x_ld, int k,
                                           unsigned char* __restrict__ q, float* __restrict__ scale) {
    __shared__ float warp_max[8];
    const unsigned short* row = x + (long long)blockIdx.x * x_ld;
    const uint4* v = reinterpret_cast<const uint4*>(row);
    const int vecs = k >> 3;
    float m = 0.f;
    for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
        const uint4 a = v[i];
        const unsigned w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            m = fmaxf(m, fabsf(wide<BF16>((unsigned short)(w[j] & 0xffffu))));
            m = fmaxf(m, fabsf(wide<BF16>((unsigned short)(w[j] >> 16))));
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
    __syncthreads();
    m = warp_max[0];
    for (int i = 1; i < (int)(blockDim.x >> 5); ++i) m = fmaxf(m, warp_max[i]);
    const float amax = fmaxf(m, 1e-12f);
    const float inv = 448.f / amax;
    if (threadIdx.x == 0) scale[blockIdx.x] = amax / 448.f;
    uint2* out = reinterpret_cast<uint2*>(q + (long long)blockIdx.x * k);
    for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
        const uint4 a = v[i];
        const unsigned w[4] = {a.x, a.y, a.z, a.w};
        unsigned short b[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float lo = wide<BF16>((unsigned short)(w[j] & 0xffffu));
            const float hi = wide<BF16>((unsigned short)(w[j] >> 16));
            b[j] = e4m3x2(lo * inv, hi * inv);
        }
        out[i] = make_uint2(b[0] | ((unsigned)b[1] << 16), b[2] | ((unsigned)b[3] << 16));
    }
}

// Groups of 128 elements along k (scale[g * s_ld + r]: groups major, rows contiguous, as cuBLASLt's VEC128_32F
// scales of the product's second operand): one warp per (row, group), 4 elements a lane; k a multiple of 4.
template <bool BF16>
__device__ __forceinline__ void quant_groups(const unsigned short* __restrict__ x, long long x_ld, int rows, int k,
                                             unsigned char* __restrict__ q, float* __restrict__ scale, long long s_ld) {
    const int groups = (k + 127) >> 7;
    const long long id = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (id >= (long long)rows * groups) return;
    const int r = (int)(id / groups), g = (int)(id % groups), lane = threadIdx.x & 31;
    const int c = (g << 7) + (lane << 2);
    float f[4] = {0.f, 0.f, 0.f, 0.f};
    if (c < k) {
        const uint2 a = *reinterpret_cast<const uint2*>(x + (long long)r * x_ld + c);
        f[0] = wide<BF16>((unsigned short)(a.x & 0xffffu));
        f[1] = wide<BF16>((unsigned short)(a.x >> 16));
        f[2] = wide<BF16>((unsigned short)(a.y & 0xffffu));
        f[3] = wide<BF16>((unsigned short)(a.y >> 16));
    }
    float m = fmaxf(fmaxf(fabsf(f[0]), fabsf(f[1])), fmaxf(fabsf(f[2]), fabsf(f[3])));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const float amax = fmaxf(m, 1e-12f);
    const float inv = 448.f / amax;
    if (lane == 0) scale[(long long)g * s_ld + r] = amax / 448.f;
    if (c < k) {
        const unsigned short lo = e4m3x2(f[0] * inv, f[1] * inv), hi = e4m3x2(f[2] * inv, f[3] * inv);
        *reinterpret_cast<unsigned*>(q + (long long)r * k + c) = lo | ((unsigned)hi << 16);
    }
}

#define QUANT(T, B)                                                                                                 \
    extern "C" __global__ void quant_rows_##T(const unsigned short* x, long long x_ld, int k, unsigned char* q,     \
                                              float* scale) {                                                       \
        quant_rows<B>(x, x_ld, k, q, scale);                                                                        \
    }                                                                                                               \
    extern "C" __global__ void quant_groups_##T(const unsigned short* x, long long x_ld, int rows, int k,            \
                                                unsigned char* q, float* scale, long long s_ld) {                   \
        quant_groups<B>(x, x_ld, rows, k, q, scale, s_ld);                                                          \
    }
QUANT(bf16, true)
QUANT(f16, false)
"""
