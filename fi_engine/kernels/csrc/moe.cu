// The MoE layer's kernels (fi_engine.layers.moe): its combines, the fixed-capacity path's routing and rows, the
// biased activations and the dense-over-experts path's activation and combine.
#include "route.cuh"  // route_row (moe_route)
#include "convert.cuh"  // load16, store16
// out[t, c] = sum_j term(j, c) (expert j's weighted output) over this block's columns c of token t (the combines'
// grid: blockIdx.y the column block), accumulated in float32 in the order of j and rounded once to out's 16-bit type
template <typename Term>
__device__ __forceinline__ void combine_token(long long t, int k, long long hidden, unsigned short* __restrict__ out,
                                              long long out_ld, int bf16, Term term) {
    const long long stride = (long long)gridDim.y * blockDim.x;
    for (long long c = (long long)blockIdx.y * blockDim.x + threadIdx.x; c < hidden; c += stride) {
        float acc = 0.f;
        for (int j = 0; j < k; ++j) acc += term(j, c);
        out[t * out_ld + c] = store16(acc, bf16);
    }
}
// The experts' activation of one gate value g and up value u (biases added): clamped (gpt-oss),
// (clamp(u, -L, L) + 1) * g' * sigmoid(alpha * g') with g' = min(g, L), L = limit; else silu(g) * u
__device__ __forceinline__ float gate_up_act(float g, float u, int clamped, float alpha, float limit) {
    if (clamped) {
        g = fminf(g, limit);
        u = fminf(fmaxf(u, -limit), limit);
        return (u + 1.f) * g / (1.f + expf(-alpha * g));
    }
    return g / (1.f + expf(-g)) * u;
}
// out[t, c] = sum_j w[t * k + j] * y[row_of[t * k + j], c], accumulated in float32; grid (T, column blocks): the
// blocks of a token (blockIdx.y) share its columns (a token's columns in one block made a decode step's combine a
// 10 us chain of dependent loads on one SM; the combines below share the grid). A choice of weight 0 adds nothing and
// its row is not read: another rank's expert under the expert split (moe_localize), whose row no kernel wrote.
extern "C" __global__ void moe_combine(const unsigned short* __restrict__ y, const int* __restrict__ row_of,
                                       const float* __restrict__ w, unsigned short* __restrict__ out, int k,
                                       long long hidden, long long out_ld, int bf16) {
    const long long t = blockIdx.x;
    combine_token(t, k, hidden, out, out_ld, bf16, [&](int j, long long c) {
        const float wj = w[t * k + j];
        if (wj == 0.f) return 0.f;
        const long long r = row_of[t * k + j];
        return wj * load16(y[r * hidden + c], bf16);
    });
}

// The expert split of tensor parallelism, in place over A assignments of a routing over every rank's experts (one
// thread each): an expert of this rank's [first, first + count) renumbered from 0, any other set to count (no expert
// of the layer: the grouped GEMV lists it nowhere, moe_slots gives it no row) with weight 0 (the combine skips it).
// fi_engine.layers.moe_routing.local_assignments is the same rule on the host.
extern "C" __global__ void moe_localize(int* __restrict__ experts, float* __restrict__ w, int A, int first,
                                        int count) {
    const int a = blockIdx.x * blockDim.x + threadIdx.x;
    if (a >= A) return;
    const int e = experts[a] - first;
    const bool mine = e >= 0 && e < count;
    experts[a] = mine ? e : count;
    if (!mine) w[a] = 0.f;
}

// Device routing of the fixed-capacity path, one thread per token t < T: route_row (fi_engine.kernels.cuda_sources).
extern "C" __global__ void moe_route(const float* __restrict__ logits, int E, int k, int renorm, int T,
                                     int* __restrict__ experts, float* __restrict__ w) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    route_row(logits + (long long)t * E, E, k, renorm, experts + (long long)t * k, w + (long long)t * k);
}

// Rows of the fixed-capacity path; one block, a thread per expert e: the choices of e, in token order, take e's rows
// e * capacity + 0, 1, ... (row_of[t * k + j]); then e's count goes into the m of problem e of both prepared grouped
// GEMMs, so an expert no token chose computes no row and its weights are not read. A token chooses distinct
// experts, so a count is at most T <= capacity: never more rows than were prepared. A choice of no expert of the
// layer (another rank's under the expert split: moe_localize) gets row -1, which moe_scatter skips.
extern "C" __global__ void moe_slots(const int* __restrict__ experts, int E, int k, int T, int capacity,
                                     int* __restrict__ row_of, int* __restrict__ problems_gu,
                                     int* __restrict__ problems_down) {
    for (int b = threadIdx.x; b < T * k; b += blockDim.x)
        if (experts[b] < 0 || experts[b] >= E) row_of[b] = -1;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int n = 0;
        for (int b = 0; b < T * k; ++b)
            if (experts[b] == e) row_of[b] = e * capacity + n++;
        problems_gu[3 * e] = n;
        problems_down[3 * e] = n;
    }
}

// The expert of row r of a buffer grouped by expert (seg[e] <= r < seg[e + 1], seg non-decreasing, E + 1 entries).
__device__ __forceinline__ int expert_of(const int* __restrict__ seg, int E, long long r) {
    int e = 0;
    while (e + 1 < E && seg[e + 1] <= r) ++e;
    return e;
}

// Biased activation, one block per row r of the gate/up buffer gu [rows, 2I] (gate columns, then up): with e the row's
// expert, g = gate + b_gu[e, j], u = up + b_gu[e, I + j] (float32 biases [E, 2I]); clamped (gpt-oss):
// act = (clamp(u, -L, L) + 1) * g' * sigmoid(alpha * g'), g' = min(g, L); else act = silu(g) * u.
extern "C" __global__ void moe_bias_act(const unsigned short* __restrict__ gu, const float* __restrict__ b_gu,
                                        const int* __restrict__ seg, int E, long long I, int clamped, float alpha,
                                        float limit, int bf16, unsigned short* __restrict__ act) {
    const long long r = blockIdx.x;
    const int e = expert_of(seg, E, r);
    const unsigned short* row = gu + r * 2 * I;
    const float* b = b_gu + (long long)e * 2 * I;
    for (long long j = threadIdx.x; j < I; j += blockDim.x) {
        const float g = load16(row[j], bf16) + b[j];
        const float u = load16(row[I + j], bf16) + b[I + j];
        act[r * I + j] = store16(gate_up_act(g, u, clamped, alpha, limit), bf16);
    }
}

// moe_combine with the experts' down bias: out[t, c] = sum_j w[t * k + j] * (y[row_of[t * k + j], c] + b_down[e_j, c]),
// e_j the expert of that row (seg as above; float32 b_down [E, hidden]); k <= 64; grid as moe_combine.
extern "C" __global__ void moe_combine_bias(const unsigned short* __restrict__ y, const int* __restrict__ row_of,
                                            const float* __restrict__ w, const float* __restrict__ b_down,
                                            const int* __restrict__ seg, int E, unsigned short* __restrict__ out,
                                            int k, long long hidden, long long out_ld, int bf16) {
    __shared__ int ex[64];
    const long long t = blockIdx.x;
    for (int j = threadIdx.x; j < k; j += blockDim.x) ex[j] = expert_of(seg, E, row_of[t * k + j]);
    __syncthreads();
    combine_token(t, k, hidden, out, out_ld, bf16, [&](int j, long long c) {
        const long long r = row_of[t * k + j];
        return w[t * k + j] * (load16(y[r * hidden + c], bf16) + b_down[(long long)ex[j] * hidden + c]);
    });
}

// logits[t, e] += bias[e] (float32 [T, E], one block per token).
extern "C" __global__ void moe_router_bias(float* __restrict__ logits, const float* __restrict__ bias, int E) {
    float* l = logits + (long long)blockIdx.x * E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) l[e] += bias[e];
}

// xs[row_of[b], :] = x[b / k, :] for 16-bit elements; one block per assignment b = t * k + j (none for row -1).
extern "C" __global__ void moe_scatter(const unsigned short* __restrict__ x, long long x_ld,
                                       const int* __restrict__ row_of, int k, unsigned short* __restrict__ xs,
                                       long long hidden) {
    if (row_of[blockIdx.x] < 0) return;
    const unsigned short* src = x + (long long)(blockIdx.x / k) * x_ld;
    unsigned short* dst = xs + (long long)row_of[blockIdx.x] * hidden;
    for (long long c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = src[c];
}

// Dense-over-experts activation, one block per (token t, expert e) (blockIdx.x = t * E + e): gu [T, E * 2I] holds
// every expert's gate (I columns) then up (I columns) for every token; when t chose e (experts [T, k]),
// act[t, e * I + j] = activation(gate + b_gu[e, j], up + b_gu[e, I + j]) as moe_bias_act (bias when has_bias),
// otherwise 0 (the down GEMM multiplies it; the combine never reads that expert's output for t).
extern "C" __global__ void moe_dense_act(const unsigned short* __restrict__ gu, const float* __restrict__ b_gu,
                                         int has_bias, const int* __restrict__ experts, int E, int k, long long I,
                                         int clamped, float alpha, float limit, int bf16,
                                         unsigned short* __restrict__ act) {
    const long long t = blockIdx.x / E;
    const int e = blockIdx.x % E;
    bool chosen = false;
    for (int j = 0; j < k; ++j) chosen |= experts[t * k + j] == e;
    unsigned short* a = act + (t * E + e) * I;
    if (!chosen) {
        for (long long j = threadIdx.x; j < I; j += blockDim.x) a[j] = 0;
        return;
    }
    const unsigned short* row = gu + (t * E + e) * 2 * I;
    const float* b = b_gu + (long long)e * 2 * I;
    for (long long j = threadIdx.x; j < I; j += blockDim.x) {
        float g = load16(row[j], bf16);
        float u = load16(row[I + j], bf16);
        if (has_bias) { g += b[j]; u += b[I + j]; }
        a[j] = store16(gate_up_act(g, u, clamped, alpha, limit), bf16);
    }
}

// Dense-over-experts combine, grid as moe_combine: out[t, c] = sum_j w[t, j] * (y[e_j, t, c] + b_down[e_j, c])
// over the k experts e_j that t chose (experts, w [T, k]); y float32 [E, y_rows, hidden] (expert e's down projection
// of every token), b_down float32 [E, hidden] when has_bias. Accumulated in float32, rounded once.
extern "C" __global__ void moe_dense_combine(const float* __restrict__ y, long long y_rows,
                                             const int* __restrict__ experts, const float* __restrict__ w, int k,
                                             const float* __restrict__ b_down, int has_bias,
                                             unsigned short* __restrict__ out, long long hidden, long long out_ld,
                                             int bf16) {
    const long long t = blockIdx.x;
    combine_token(t, k, hidden, out, out_ld, bf16, [&](int j, long long c) {
        const long long e = experts[t * k + j];
        float v = y[(e * y_rows + t) * hidden + c];
        if (has_bias) v += b_down[e * hidden + c];
        return w[t * k + j] * v;
    });
}
