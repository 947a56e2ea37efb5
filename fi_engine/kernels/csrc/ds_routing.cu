// DeepSeek's grouped top-k routing on the device (fi_engine.layers.deepseek_routing.DeviceGroupedTopk). One thread
// per token t < T, the rule of that module's grouped_topk on the host: scores (sigmoid, or softmax over the E
// logits), the choice score (+ bias for noaux_tc), the topk_group best groups (noaux_tc: by the sum of their two best
// choice scores, V2: by their best; ties: the lower group), then the k best experts of those groups (ties: the lower
// id), weights their scores (renormalized when renorm), times scale. Float32 throughout.
#include "route.cuh"  // PICKED_BEFORE
extern "C" __global__ void ds_grouped_topk(const float* __restrict__ logits, const float* __restrict__ bias, int E,
                                           int k, int G, int topk_group, int method, int sigmoid_scores, int renorm,
                                           float scale, int T, int* __restrict__ experts, float* __restrict__ w) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float* l = logits + (long long)t * E;
    float m = 0.f, total = 1.f;
    if (!sigmoid_scores) {
        m = l[0];
        for (int e = 1; e < E; ++e) m = fmaxf(m, l[e]);
        total = 0.f;
        for (int e = 0; e < E; ++e) total += expf(l[e] - m);
    }
#define NEG_INF __int_as_float(0xff800000u)
#define SCORE(e) (sigmoid_scores ? 1.f / (1.f + expf(-l[e])) : expf(l[e] - m) / total)
#define CHOICE(e) (method == 2 ? SCORE(e) + bias[e] : SCORE(e))
    unsigned long long keep = ~0ull;
    const int per = E / G;
    if (method != 0 && G > 1) {
        float gs[64];
        for (int g = 0; g < G; ++g) {
            float b1 = NEG_INF, b2 = NEG_INF;
            for (int e = g * per; e < (g + 1) * per; ++e) {
                const float c = CHOICE(e);
                if (c > b1) { b2 = b1; b1 = c; } else if (c > b2) { b2 = c; }
            }
            gs[g] = (method == 2 && per > 1) ? b1 + b2 : b1;
        }
        keep = 0ull;
        for (int j = 0; j < topk_group; ++j) {
            int best = -1;
            float bv = 0.f;
            for (int g = 0; g < G; ++g)
                if (!((keep >> g) & 1ull) && (best < 0 || gs[g] > bv)) { best = g; bv = gs[g]; }
            keep |= 1ull << best;
        }
    }
    float picked = 0.f;
    for (int j = 0; j < k; ++j) {
        int best = -1;
        float bv = 0.f;
        for (int e = 0; e < E; ++e) {
            PICKED_BEFORE(taken, experts, t * k, j, e);
            if (taken) continue;
            const float c = ((keep >> (e / per)) & 1ull) ? CHOICE(e) : NEG_INF;
            if (best < 0 || c > bv) { best = e; bv = c; }
        }
        const float p = SCORE(best);
        experts[t * k + j] = best;
        w[t * k + j] = p;
        picked += p;
    }
    for (int j = 0; j < k; ++j) w[t * k + j] = (renorm ? w[t * k + j] / (picked + 1e-20f) : w[t * k + j]) * scale;
#undef SCORE
#undef CHOICE
#undef NEG_INF
}
