// Session-10 experiment: msda_coop for fp16 with each lane's point prepared right before the TPG iterations that
// use it (the shipped kernel prepares all NP points first and keeps their corner weights and indices live
// through the loop), so that fewer registers are live and more warps fit an SM.
template <int LP, bool PERSIST>
__device__ __forceinline__ void msda_coop_lazy(const qk_half* __restrict__ value, const qk_i64* __restrict__ shapes,
                                               const qk_half* __restrict__ ref, const qk_half* __restrict__ off,
                                               const qk_half* __restrict__ aw, int B, int S, int M, int Q, int G,
                                               qk_half* __restrict__ out) {
    constexpr int D = 32, VEC = 8, TPG = 4;
    constexpr int NP = (LP + TPG - 1) / TPG;
    const long long total = (long long)B * Q * M * TPG;
    const int H = (int)shapes[0], W = (int)shapes[1];
    const unsigned int rowb = (unsigned int)(M * D) * sizeof(qk_half);
    long long start = (long long)blockIdx.x * blockDim.x;
    const long long stride = PERSIST ? (long long)gridDim.x * blockDim.x : total + blockDim.x;
    for (; start < total; start += stride) {
    const long long tid0 = start + threadIdx.x;
    const bool active = tid0 < total;
    const long long tid = active ? tid0 : total - 1;
    const int lane = (int)(tid % TPG);
    const long long bqm = tid / TPG;
    const int m = (int)(bqm % M);
    const long long bq = bqm / M;
    const int b = (int)(bq / Q);
    const qk_half* awp = aw + bqm * LP;
    const qk_half* offp = off + bqm * (LP * 2);
    const qk_half* refp = ref + bq * (2 * G);

    float e[NP];
    float mx = -3.402823466e38f;
#pragma unroll
    for (int i = 0; i < NP; ++i) {
        const int p = lane + TPG * i;
        e[i] = p < LP ? qk_ld(awp + p) : -3.402823466e38f;
        mx = fmaxf(mx, e[i]);
    }
#pragma unroll
    for (int s = TPG / 2; s > 0; s /= 2) mx = fmaxf(mx, qk_shfl_xor(mx, s, TPG));
    float den = 0.f;
#pragma unroll
    for (int i = 0; i < NP; ++i) {
        e[i] = (lane + TPG * i) < LP ? __expf(e[i] - mx) : 0.f;
        den += e[i];
    }
#pragma unroll
    for (int s = TPG / 2; s > 0; s /= 2) den += qk_shfl_xor(den, s, TPG);
    const float inv_den = 1.f / den;

    const qk_half* vsrc = value + ((long long)b * S * M + m) * D + lane * VEC;
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    unsigned int c2o[4];
    int baseo = 0;
#pragma unroll
    for (int p = 0; p < LP; ++p) {
        const int src = p % TPG, i = p / TPG;
        if (src == 0) {  // this lane's point i, used by the TPG iterations from here
            const int pp0 = lane + TPG * i;
            const int pp = pp0 < LP ? pp0 : 0;
            const int g = pp % G;
            const float x = qk_ld(refp + 2 * g) * (float)W + qk_ld(offp + 2 * pp) - 0.5f;
            const float y = qk_ld(refp + 2 * g + 1) * (float)H + qk_ld(offp + 2 * pp + 1) - 0.5f;
            const bool inside = pp0 < LP && y > -1.f && x > -1.f && y < (float)H && x < (float)W;
            const float w = inside ? e[i] * inv_den : 0.f;
            const float fx = floorf(x), fy = floorf(y);
            const int x0 = (int)fx, y0 = (int)fy;
            const float lx = x - fx, ly = y - fy;
            const float wy0 = (1.f - ly) * w, wy1 = ly * w;
            const bool okx0 = x0 >= 0, okx1 = x0 + 1 <= W - 1;
            const bool oky0 = y0 >= 0, oky1 = y0 + 1 <= H - 1;
            c2o[0] = qk_h2_splat((inside && oky0 && okx0) ? wy0 * (1.f - lx) : 0.f);
            c2o[1] = qk_h2_splat((inside && oky0 && okx1) ? wy0 * lx : 0.f);
            c2o[2] = qk_h2_splat((inside && oky1 && okx0) ? wy1 * (1.f - lx) : 0.f);
            c2o[3] = qk_h2_splat((inside && oky1 && okx1) ? wy1 * lx : 0.f);
            baseo = inside ? y0 * W + x0 : 0;
        }
        const int base = (int)qk_shfl_idx((unsigned int)baseo, src, TPG);
        const int idx[4] = {base, base + 1, base + W, base + W + 1};
        unsigned int s2[VEC / 2];
#pragma unroll
        for (int j = 0; j < VEC / 2; ++j) s2[j] = 0u;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const unsigned int c2 = qk_shfl_idx(c2o[k], src, TPG);
            if (c2 != 0u) {
                const uint4 v = *reinterpret_cast<const uint4*>(qk_row_ptr(vsrc, idx[k], rowb));
                s2[0] = qk_h2_fma(c2, v.x, s2[0]);
                s2[1] = qk_h2_fma(c2, v.y, s2[1]);
                s2[2] = qk_h2_fma(c2, v.z, s2[2]);
                s2[3] = qk_h2_fma(c2, v.w, s2[3]);
            }
        }
#pragma unroll
        for (int j = 0; j < VEC / 2; ++j) {
            float lo, hi;
            qk_h2_to_f2(s2[j], lo, hi);
            acc[2 * j] += lo;
            acc[2 * j + 1] += hi;
        }
    }
    if (active) msda_store<qk_half, VEC, false>(out + bqm * D + lane * VEC, VEC, acc, 1.f);
    }
}

#define QK_LAZY(NAME, PERSIST, BOUNDS)                                                                          \
    extern "C" __global__ void __launch_bounds__ BOUNDS msda_x_##NAME(                                         \
        const qk_half* value, const qk_i64* shapes, const qk_half* ref, const qk_half* off, const qk_half* aw,  \
        int B, int S, int M, int D, int Q, int L, int P, int G, qk_half* out) {                                 \
        msda_coop_lazy<8, PERSIST>(value, shapes, ref, off, aw, B, S, M, Q, G, out);                            \
    }
QK_LAZY(lazy, false, (256))
QK_LAZY(lazy6, false, (256, 6))
QK_LAZY(lazy5, false, (256, 5))
QK_LAZY(lazy_persist6, true, (256, 6))
