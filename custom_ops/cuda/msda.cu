// MultiScaleDeformableAttn (BEVFormer's MultiScaleDeformableAttnTRT / TRT2 plugin maths).
//
//   value [B,S,M,D], spatial_shapes int64 [L,2] rows (H,W), reference_points [B,Q,1,2G],
//   sampling_offsets [B,Q,M,L*P*2] (pixels, [level][point][x,y]), attention_weights [B,Q,M,L*P] (logits)
//   -> out [B,Q,M,D];  out = sum_j softmax(a)_j * bilinear_zero_pad(V_l, R_g*(W,H) + O_j - 0.5)
//
// Parameter order follows TensorRT's ahead-of-time plugin ABI: tensor inputs, int32 extras, tensor outputs,
// so that the same PTX serves PyTorch and a TensorRT engine.
//
// Work split: a group of D/VEC consecutive threads per (b,q,m); each thread owns VEC consecutive channels
// and loads them as one vector (16 bytes for fp32 x4 and fp16 x8, i.e. four packed half2 pairs). The softmax
// and the sampling locations are recomputed by each thread of the group: a handful of L1-broadcast loads,
// cheaper than a shared-memory exchange and a barrier.
//
// Two forms of each kernel:
//  * msda_<type>_v<VEC>: corners are gathered from global memory (through L1/L2). Any size.
//  * msda_smem_<type>_v<VEC>: a block owns one (b, m) and a chunk of `qchunk` queries; it first copies
//    value[b, :, m, :] (S*D elements) into shared memory, then gathers corners from there. This trades one
//    L2 read of the (b,m) slice per block for the 4*L*P corner reads per query, which wins when the slice is
//    small and many queries sample it (BEVFormer's spatial cross-attention: 375 positions, 2500 queries).
//    Dynamic shared memory of S*D*sizeof(T) bytes; grid (ceil(Q/qchunk), B*M).
#include "common.cuh"

template <bool QUANT>
__device__ __forceinline__ float msda_param(float v, float scale) {
    return QUANT ? v * scale : v;
}

// Accumulates sum_j w_j * bilinear(sample_j) for VEC channels. `vsrc` points at channel c of spatial
// position 0 of level 0 for this (b, m); `row` is the element stride between spatial positions.
template <typename TV, typename TR, typename TP, int VEC, bool QUANT>
__device__ __forceinline__ void msda_accumulate(const TV* vsrc, long long row, const qk_i64* __restrict__ shapes,
                                                const TR* __restrict__ refp, const TP* __restrict__ offp,
                                                const TP* __restrict__ awp, int L, int P, int G, float so,
                                                float sa, float sv, float* acc) {
    const int LP = L * P;
    float mx = -3.402823466e38f;
    for (int j = 0; j < LP; ++j) mx = fmaxf(mx, msda_param<QUANT>(qk_ld(awp + j), sa));
    float den = 0.f;
    for (int j = 0; j < LP; ++j) den += __expf(msda_param<QUANT>(qk_ld(awp + j), sa) - mx);
    // the value scale of the int8 form is folded into the attention weight once per sample
    const float inv_den = (QUANT ? sv : 1.f) / den;

    long long start = 0;
    for (int l = 0; l < L; ++l) {
        const int H = (int)shapes[2 * l];
        const int W = (int)shapes[2 * l + 1];
        const TV* vb = vsrc + start * row;
        for (int p = 0; p < P; ++p) {
            const int j = l * P + p;
            const int g = p % G;
            const float x = qk_ld(refp + 2 * g) * (float)W + msda_param<QUANT>(qk_ld(offp + 2 * j), so) - 0.5f;
            const float y = qk_ld(refp + 2 * g + 1) * (float)H + msda_param<QUANT>(qk_ld(offp + 2 * j + 1), so) - 0.5f;
            if (!(y > -1.f && x > -1.f && y < (float)H && x < (float)W)) continue;
            const float w = __expf(msda_param<QUANT>(qk_ld(awp + j), sa) - mx) * inv_den;
            const float fx = floorf(x), fy = floorf(y);
            const int x0 = (int)fx, y0 = (int)fy;
            const float lx = x - fx, ly = y - fy;
            const float hx = 1.f - lx, hy = 1.f - ly;
            const float cw[4] = {hy * hx * w, hy * lx * w, ly * hx * w, ly * lx * w};
            const int cy[4] = {y0, y0, y0 + 1, y0 + 1};
            const int cx[4] = {x0, x0 + 1, x0, x0 + 1};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if (cy[k] < 0 || cy[k] > H - 1 || cx[k] < 0 || cx[k] > W - 1) continue;
                const QkVec<TV, VEC> v =
                    *reinterpret_cast<const QkVec<TV, VEC>*>(vb + ((long long)cy[k] * W + cx[k]) * row);
                float f[VEC];
                qk_unpack<TV, VEC>(v, f);
#pragma unroll
                for (int i = 0; i < VEC; ++i) acc[i] = fmaf(cw[k], f[i], acc[i]);
            }
        }
        start += (long long)H * W;
    }
}

// Loads N consecutive elements of type T (16-byte aligned run) into floats with the widest vector loads.
template <typename T, int N>
__device__ __forceinline__ void qk_load_run(const T* __restrict__ p, float* dst) {
    constexpr int CH = (N * (int)sizeof(T) >= 16) ? 16 / (int)sizeof(T) : N;
#pragma unroll
    for (int i = 0; i < N; i += CH) {
        const QkVec<T, CH> v = *reinterpret_cast<const QkVec<T, CH>*>(p + i);
#pragma unroll
        for (int k = 0; k < CH; ++k) dst[i + k] = qk_ld(&v.v[k]);
    }
}

// The single-level case with a compile-time point count LP (every BEVFormer call: L = 1, P = 4 or 8).
// Logits and offsets of the (b,q,m) arrive in a few vector loads, the softmax runs in registers, and the
// fully unrolled point loop lets the compiler put the corner loads of several points in flight at once (the
// generic loop waits one memory latency per point). Index arithmetic is 32-bit: the caller guarantees that
// value has fewer than 2^31 elements. For fp16 x8 the four corners of a point are combined with packed half2
// FMAs (the TRT2 plugin's half2 arithmetic: one instruction per channel pair, no conversions) and each point's
// sample is then added to fp32 accumulators, so the sum over points keeps fp32 precision.
template <typename TV, typename TR, typename TP, int VEC, bool QUANT, int LP>
__device__ __forceinline__ void msda_accumulate_fast(const TV* vsrc, int row, int H, int W,
                                                     const TR* __restrict__ refp, const TP* __restrict__ offp,
                                                     const TP* __restrict__ awp, int G, float so, float sa,
                                                     float sv, float* acc) {
    float a[LP], o[2 * LP];
    qk_load_run<TP, LP>(awp, a);
    qk_load_run<TP, 2 * LP>(offp, o);
    float mx = -3.402823466e38f;
#pragma unroll
    for (int j = 0; j < LP; ++j) {
        a[j] = msda_param<QUANT>(a[j], sa);
        mx = fmaxf(mx, a[j]);
    }
    float den = 0.f;
#pragma unroll
    for (int j = 0; j < LP; ++j) {
        a[j] = __expf(a[j] - mx);
        den += a[j];
    }
    const float inv_den = (QUANT ? sv : 1.f) / den;
    int g = 0;
#pragma unroll
    for (int p = 0; p < LP; ++p) {
        const float x = qk_ld(refp + 2 * g) * (float)W + msda_param<QUANT>(o[2 * p], so) - 0.5f;
        const float y = qk_ld(refp + 2 * g + 1) * (float)H + msda_param<QUANT>(o[2 * p + 1], so) - 0.5f;
        g = (g + 1 == G) ? 0 : g + 1;
        const bool inside = y > -1.f && x > -1.f && y < (float)H && x < (float)W;
        const float w = inside ? a[p] * inv_den : 0.f;
        const float fx = floorf(x), fy = floorf(y);
        const int x0 = (int)fx, y0 = (int)fy;
        const float lx = x - fx, ly = y - fy;
        const float hx = 1.f - lx, hy = 1.f - ly;
        const float cw[4] = {hy * hx * w, hy * lx * w, ly * hx * w, ly * lx * w};
        const bool okx0 = x0 >= 0, okx1 = x0 + 1 <= W - 1;
        const bool oky0 = y0 >= 0, oky1 = y0 + 1 <= H - 1;
        const bool ok[4] = {inside && oky0 && okx0, inside && oky0 && okx1, inside && oky1 && okx0,
                            inside && oky1 && okx1};
        const int base = y0 * W + x0;
        const int idx[4] = {base, base + 1, base + W, base + W + 1};
        if constexpr (sizeof(TV) == 2 && VEC % 8 == 0) {
            constexpr int U = VEC / 8;  // 16-byte loads per corner
            unsigned int s2[VEC / 2];
#pragma unroll
            for (int i = 0; i < VEC / 2; ++i) s2[i] = 0u;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if (ok[k]) {
                    const uint4* src = reinterpret_cast<const uint4*>(vsrc + idx[k] * row);
                    const unsigned int c2 = qk_h2_splat(cw[k]);
#pragma unroll
                    for (int u = 0; u < U; ++u) {
                        const uint4 v = src[u];
                        s2[4 * u + 0] = qk_h2_fma(c2, v.x, s2[4 * u + 0]);
                        s2[4 * u + 1] = qk_h2_fma(c2, v.y, s2[4 * u + 1]);
                        s2[4 * u + 2] = qk_h2_fma(c2, v.z, s2[4 * u + 2]);
                        s2[4 * u + 3] = qk_h2_fma(c2, v.w, s2[4 * u + 3]);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < VEC / 2; ++i) {
                float lo, hi;
                qk_h2_to_f2(s2[i], lo, hi);
                acc[2 * i] += lo;
                acc[2 * i + 1] += hi;
            }
        } else {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if (ok[k]) {
                    const QkVec<TV, VEC> v = *reinterpret_cast<const QkVec<TV, VEC>*>(vsrc + idx[k] * row);
                    float f[VEC];
                    qk_unpack<TV, VEC>(v, f);
#pragma unroll
                    for (int i = 0; i < VEC; ++i) acc[i] = fmaf(cw[k], f[i], acc[i]);
                }
            }
        }
    }
}

template <typename TV, int VEC, bool QUANT>
__device__ __forceinline__ void msda_store(TV* dst, const float* acc, float inv_sout) {
    QkVec<TV, VEC> o;
    if constexpr (QUANT) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) o.v[i] = (TV)qk_quantize_i8(acc[i] * inv_sout);
    } else {
        qk_pack<TV, VEC>(acc, o);
    }
    *reinterpret_cast<QkVec<TV, VEC>*>(dst) = o;
}

template <typename TV, typename TR, typename TP, int VEC, bool QUANT, int FAST_LP>
__device__ __forceinline__ void msda_global(const TV* __restrict__ value, const qk_i64* __restrict__ shapes,
                                            const TR* __restrict__ ref, const TP* __restrict__ off,
                                            const TP* __restrict__ aw, int B, int S, int M, int D, int Q, int L,
                                            int P, int G, float sv, float so, float sa, float inv_sout,
                                            TV* __restrict__ out) {
    const int tpg = D / VEC;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)B * Q * M * tpg;
    if (tid >= total) return;
    const int c = (int)(tid % tpg) * VEC;
    const long long bqm = tid / tpg;
    const int m = (int)(bqm % M);
    const long long bq = bqm / M;
    const int b = (int)(bq / Q);
    const int LP = L * P;
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    const long long row = (long long)M * D;
    const TV* vsrc = value + (long long)b * S * row + (long long)m * D + c;
    if constexpr (FAST_LP > 0) {
        msda_accumulate_fast<TV, TR, TP, VEC, QUANT, FAST_LP>(vsrc, (int)row, (int)shapes[0], (int)shapes[1],
                                                              ref + bq * (long long)(2 * G),
                                                              off + bqm * (long long)LP * 2, aw + bqm * LP, G, so,
                                                              sa, sv, acc);
    } else {
        msda_accumulate<TV, TR, TP, VEC, QUANT>(vsrc, row, shapes, ref + bq * (long long)(2 * G),
                                                off + bqm * (long long)LP * 2, aw + bqm * LP, L, P, G, so, sa, sv,
                                                acc);
    }
    msda_store<TV, VEC, QUANT>(out + bqm * D + c, acc, inv_sout);
}

template <typename TV, typename TR, typename TP, int VEC, bool QUANT, int FAST_LP>
__device__ __forceinline__ void msda_smem(const TV* __restrict__ value, const qk_i64* __restrict__ shapes,
                                          const TR* __restrict__ ref, const TP* __restrict__ off,
                                          const TP* __restrict__ aw, int B, int S, int M, int D, int Q, int L,
                                          int P, int G, int qchunk, float sv, float so, float sa, float inv_sout,
                                          TV* __restrict__ out) {
    extern __shared__ __align__(128) unsigned char qk_smem_raw[];
    TV* sval = reinterpret_cast<TV*>(qk_smem_raw);
    const int bm = blockIdx.y;
    const int b = bm / M, m = bm % M;
    const int tpg = D / VEC;
    // Stage value[b, :, m, :] as [S][D]; consecutive threads copy consecutive vectors of one row.
    const TV* src = value + (long long)b * S * M * D + (long long)m * D;
    for (int i = threadIdx.x; i < S * tpg; i += blockDim.x) {
        const int s = i / tpg, cv = (i - s * tpg) * VEC;
        *reinterpret_cast<QkVec<TV, VEC>*>(sval + s * D + cv) =
            *reinterpret_cast<const QkVec<TV, VEC>*>(src + (long long)s * M * D + cv);
    }
    __syncthreads();
    const int groups = blockDim.x / tpg;
    const int lane = threadIdx.x % tpg, grp = threadIdx.x / tpg;
    if (grp >= groups) return;
    const int c = lane * VEC;
    const int LP = L * P;
    const int H0 = (int)shapes[0], W0 = (int)shapes[1];
    const int q_end = min(Q, (blockIdx.x + 1) * qchunk);
    for (int q = blockIdx.x * qchunk + grp; q < q_end; q += groups) {
        const long long bq = (long long)b * Q + q;
        const long long bqm = bq * M + m;
        float acc[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
        if constexpr (FAST_LP > 0) {
            msda_accumulate_fast<TV, TR, TP, VEC, QUANT, FAST_LP>(sval + c, D, H0, W0, ref + bq * (long long)(2 * G),
                                                                  off + bqm * (long long)LP * 2, aw + bqm * LP, G,
                                                                  so, sa, sv, acc);
        } else {
            msda_accumulate<TV, TR, TP, VEC, QUANT>(sval + c, D, shapes, ref + bq * (long long)(2 * G),
                                                    off + bqm * (long long)LP * 2, aw + bqm * LP, L, P, G, so, sa,
                                                    sv, acc);
        }
        msda_store<TV, VEC, QUANT>(out + bqm * D + c, acc, inv_sout);
    }
}

// Kernel names: msda[_smem]_<type>_v<VEC> (any L and P) and msda[_smem]_lp<LP>_<type>_v<VEC> (L = 1 and
// L*P = LP; logits and offsets read as 16-byte-aligned vector runs).
#define QK_MSDA_FLOAT(NAME, T, VEC, LP)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) msda_##NAME(                                          \
        const T* value, const qk_i64* shapes, const T* ref, const T* off, const T* aw, int B, int S, int M,  \
        int D, int Q, int L, int P, int G, T* out) {                                                        \
        msda_global<T, T, T, VEC, false, LP>(value, shapes, ref, off, aw, B, S, M, D, Q, L, P, G, 1.f, 1.f,  \
                                             1.f, 1.f, out);                                                \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) msda_smem_##NAME(                                     \
        const T* value, const qk_i64* shapes, const T* ref, const T* off, const T* aw, int B, int S, int M,  \
        int D, int Q, int L, int P, int G, int qchunk, T* out) {                                            \
        msda_smem<T, T, T, VEC, false, LP>(value, shapes, ref, off, aw, B, S, M, D, Q, L, P, G, qchunk, 1.f,  \
                                           1.f, 1.f, 1.f, out);                                             \
    }

// fp32: 4 channels (16 bytes) a thread when D % 4 == 0, else one channel a thread.
QK_MSDA_FLOAT(fp32_v4, float, 4, 0)
QK_MSDA_FLOAT(fp32_v1, float, 1, 0)
QK_MSDA_FLOAT(lp4_fp32_v4, float, 4, 4)
QK_MSDA_FLOAT(lp8_fp32_v4, float, 4, 8)
// wider single-level forms: fewer threads share (and recompute) one (b,q,m)'s softmax and locations
QK_MSDA_FLOAT(lp4_fp32_v8, float, 8, 4)
QK_MSDA_FLOAT(lp8_fp32_v8, float, 8, 8)
QK_MSDA_FLOAT(lp4_fp32_v16, float, 16, 4)
QK_MSDA_FLOAT(lp8_fp32_v16, float, 16, 8)
// fp16: 8 channels (16 bytes: four packed half2 pairs) a thread when D % 8 == 0, one half2 pair when D is
// even, one channel otherwise. Arithmetic accumulates in fp32.
QK_MSDA_FLOAT(fp16_v8, qk_half, 8, 0)
QK_MSDA_FLOAT(fp16_v2, qk_half, 2, 0)
QK_MSDA_FLOAT(fp16_v1, qk_half, 1, 0)
QK_MSDA_FLOAT(lp4_fp16_v8, qk_half, 8, 4)
QK_MSDA_FLOAT(lp8_fp16_v8, qk_half, 8, 8)
QK_MSDA_FLOAT(lp4_fp16_v16, qk_half, 16, 4)
QK_MSDA_FLOAT(lp8_fp16_v16, qk_half, 16, 8)
QK_MSDA_FLOAT(lp4_fp16_v32, qk_half, 32, 4)
QK_MSDA_FLOAT(lp8_fp16_v32, qk_half, 32, 8)

// INT8 variant, as the TensorRT plugin accepts it: value, offsets and weights are int8 with per-tensor scales,
// reference points fp32, output int8 with its own scale. The four scales arrive as the bit patterns of fp32
// values in int32 extras (TensorRT AOT extras are integers; aot_impl reads TensorDesc.scale at build time).
// Dequantised maths is exactly the fp32 kernel's; the output is re-quantised with QuantizeLinear rounding.
#define QK_MSDA_INT8(NAME, LP)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) msda_##NAME(                                          \
        const signed char* value, const qk_i64* shapes, const float* ref, const signed char* off,            \
        const signed char* aw, int B, int S, int M, int D, int Q, int L, int P, int G, int value_scale_bits, \
        int offset_scale_bits, int weight_scale_bits, int out_scale_bits, signed char* out) {               \
        msda_global<signed char, float, signed char, 8, true, LP>(                                          \
            value, shapes, ref, off, aw, B, S, M, D, Q, L, P, G, qk_bits_to_float(value_scale_bits),         \
            qk_bits_to_float(offset_scale_bits), qk_bits_to_float(weight_scale_bits),                       \
            1.f / qk_bits_to_float(out_scale_bits), out);                                                   \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) msda_smem_##NAME(                                     \
        const signed char* value, const qk_i64* shapes, const float* ref, const signed char* off,            \
        const signed char* aw, int B, int S, int M, int D, int Q, int L, int P, int G, int qchunk,           \
        int value_scale_bits, int offset_scale_bits, int weight_scale_bits, int out_scale_bits,             \
        signed char* out) {                                                                                 \
        msda_smem<signed char, float, signed char, 8, true, LP>(                                            \
            value, shapes, ref, off, aw, B, S, M, D, Q, L, P, G, qchunk, qk_bits_to_float(value_scale_bits), \
            qk_bits_to_float(offset_scale_bits), qk_bits_to_float(weight_scale_bits),                       \
            1.f / qk_bits_to_float(out_scale_bits), out);                                                   \
    }

QK_MSDA_INT8(int8_v8, 0)
QK_MSDA_INT8(lp4_int8_v8, 4)
QK_MSDA_INT8(lp8_int8_v8, 8)
