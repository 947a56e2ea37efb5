
// One token's routing on the device (a MoE layer's: moe_route, and the router GEMV's epilogue): softmax over the E
// float32 logits l, the k largest (ties: the lower expert id) into ex[0, k), their probabilities into w[0, k),
// divided by their sum when renorm. The logits are read through L2 (ld.global.cg): in the router GEMV, blocks
// other than the routing one wrote them during the same launch.
__device__ __forceinline__ float load_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
// bool `taken`: whether expert e is among the j experts picked first, list[at + i] for i < j (a macro, not a function:
// the loop compiles in its place, into the same instructions as when each includer wrote it out)
#define PICKED_BEFORE(taken, list, at, j, e)                                                                       \
    bool taken = false;                                                                                            \
    for (int i = 0; i < (j); ++i) taken |= (list)[(at) + i] == (e)
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
            PICKED_BEFORE(taken, ex, 0, j, e);
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
