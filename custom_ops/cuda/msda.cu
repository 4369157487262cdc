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
// Three forms (the cooperative one, for D = 32 single-level calls, is at the end of this file: msda_co_*):
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
        if constexpr (sizeof(T) == 1 && CH % 4 == 0) {
            const unsigned int* w = reinterpret_cast<const unsigned int*>(&v);
#pragma unroll
            for (int k = 0; k < CH / 4; ++k) qk_i8x4_to_f32(w[k], dst + i + 4 * k);
        } else {
#pragma unroll
            for (int k = 0; k < CH; ++k) dst[i + k] = qk_ld(&v.v[k]);
        }
    }
}

// How a thread's VEC channels lie in a row of D: as U chunks of CH consecutive channels (one 16-byte load
// each), chunk u of lane t of the group at channel (u * D/VEC + t) * CH. With U > 1 the lanes of a group thus
// read adjacent 16-byte pieces in each load instruction, so one instruction of a warp touches whole 32-byte
// sectors (lanes owning VEC consecutive channels would touch every sector of a corner twice, half each time).
template <typename TV, int VEC>
struct MsdaSplit {
    static constexpr int CH = (VEC * (int)sizeof(TV) > 16) ? 16 / (int)sizeof(TV) : VEC;
    static constexpr int U = VEC / CH;
};

// The single-level case with a compile-time point count LP (every BEVFormer call: L = 1, P = 4 or 8).
// Logits and offsets of the (b,q,m) arrive in a few vector loads, the softmax runs in registers, and the
// fully unrolled point loop lets the compiler put the corner loads of several points in flight at once (the
// generic loop waits one memory latency per point). Index arithmetic is 32-bit: the caller guarantees that
// value has fewer than 2^31 elements. `cstride` is the distance between the thread's channel chunks
// (MsdaSplit). For fp16 the four corners of a point are combined with packed half2 FMAs (the TRT2 plugin's
// half2 arithmetic: one instruction per channel pair, no conversions) and each point's sample is then added
// to fp32 accumulators, so the sum over points keeps fp32 precision. INT8 values are widened exactly with
// qk_i8x4_to_f32 (no conversion instructions) and combined in fp32.
template <typename TV, typename TR, typename TP, int VEC, bool QUANT, int LP>
__device__ __forceinline__ void msda_accumulate_fast(const TV* vsrc, int row, int cstride, int H, int W,
                                                     const TR* __restrict__ refp, const TP* __restrict__ offp,
                                                     const TP* __restrict__ awp, int G, float so, float sa,
                                                     float sv, float* acc) {
    using Split = MsdaSplit<TV, VEC>;
    const unsigned int rowb = (unsigned int)row * sizeof(TV);
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
    // the value scale of the int8 form is folded into the attention weight once per sample
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
        if constexpr (sizeof(TV) == 2 && Split::CH == 8) {
            unsigned int s2[VEC / 2];
#pragma unroll
            for (int i = 0; i < VEC / 2; ++i) s2[i] = 0u;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if (ok[k]) {
                    const TV* src = qk_row_ptr(vsrc, idx[k], rowb);
                    const unsigned int c2 = qk_h2_splat(cw[k]);
#pragma unroll
                    for (int u = 0; u < Split::U; ++u) {
                        const uint4 v = *reinterpret_cast<const uint4*>(src + u * cstride);
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
        } else if constexpr (sizeof(TV) == 1 && VEC == 8) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if (ok[k]) {
                    const uint2 v = *reinterpret_cast<const uint2*>(qk_row_ptr(vsrc, idx[k], rowb));
                    float f[8];
                    qk_i8x4_to_f32(v.x, f);
                    qk_i8x4_to_f32(v.y, f + 4);
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[i] = fmaf(cw[k], f[i], acc[i]);
                }
            }
        } else {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if (ok[k]) {
                    const TV* src = qk_row_ptr(vsrc, idx[k], rowb);
#pragma unroll
                    for (int u = 0; u < Split::U; ++u) {
                        const QkVec<TV, Split::CH> v =
                            *reinterpret_cast<const QkVec<TV, Split::CH>*>(src + u * cstride);
                        float f[Split::CH];
                        qk_unpack<TV, Split::CH>(v, f);
#pragma unroll
                        for (int i = 0; i < Split::CH; ++i)
                            acc[u * Split::CH + i] = fmaf(cw[k], f[i], acc[u * Split::CH + i]);
                    }
                }
            }
        }
    }
}

template <typename TV, int VEC, bool QUANT>
__device__ __forceinline__ void msda_store(TV* dst, int cstride, const float* acc, float inv_sout) {
    using Split = MsdaSplit<TV, VEC>;
#pragma unroll
    for (int u = 0; u < Split::U; ++u) {
        QkVec<TV, Split::CH> o;
        if constexpr (QUANT) {
#pragma unroll
            for (int i = 0; i < Split::CH; ++i) o.v[i] = (TV)qk_quantize_i8(acc[u * Split::CH + i] * inv_sout);
        } else {
            qk_pack<TV, Split::CH>(acc + u * Split::CH, o);
        }
        *reinterpret_cast<QkVec<TV, Split::CH>*>(dst + u * cstride) = o;
    }
}

template <typename TV, typename TR, typename TP, int VEC, bool QUANT, int FAST_LP>
__device__ __forceinline__ void msda_global(const TV* __restrict__ value, const qk_i64* __restrict__ shapes,
                                            const TR* __restrict__ ref, const TP* __restrict__ off,
                                            const TP* __restrict__ aw, int B, int S, int M, int D, int Q, int L,
                                            int P, int G, float sv, float so, float sa, float inv_sout,
                                            TV* __restrict__ out) {
    using Split = MsdaSplit<TV, VEC>;
    static_assert(FAST_LP > 0 || Split::U == 1, "the generic kernels own VEC consecutive channels");
    const int tpg = D / VEC;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)B * Q * M * tpg;
    if (tid >= total) return;
    const int c = (int)(tid % tpg) * Split::CH;
    const int cstride = tpg * Split::CH;
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
        msda_accumulate_fast<TV, TR, TP, VEC, QUANT, FAST_LP>(vsrc, (int)row, cstride, (int)shapes[0],
                                                              (int)shapes[1],
                                                              ref + bq * (long long)(2 * G),
                                                              off + bqm * (long long)LP * 2, aw + bqm * LP, G, so,
                                                              sa, sv, acc);
    } else {
        msda_accumulate<TV, TR, TP, VEC, QUANT>(vsrc, row, shapes, ref + bq * (long long)(2 * G),
                                                off + bqm * (long long)LP * 2, aw + bqm * LP, L, P, G, so, sa, sv,
                                                acc);
    }
    msda_store<TV, VEC, QUANT>(out + bqm * D + c, cstride, acc, inv_sout);
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
    using Split = MsdaSplit<TV, VEC>;
    static_assert(FAST_LP > 0 || Split::U == 1, "the generic kernels own VEC consecutive channels");
    const int c = lane * Split::CH;
    const int cstride = tpg * Split::CH;
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
            msda_accumulate_fast<TV, TR, TP, VEC, QUANT, FAST_LP>(sval + c, D, cstride, H0, W0,
                                                                  ref + bq * (long long)(2 * G),
                                                                  off + bqm * (long long)LP * 2, aw + bqm * LP, G,
                                                                  so, sa, sv, acc);
        } else {
            msda_accumulate<TV, TR, TP, VEC, QUANT>(sval + c, D, shapes, ref + bq * (long long)(2 * G),
                                                    off + bqm * (long long)LP * 2, aw + bqm * LP, L, P, G, so, sa,
                                                    sv, acc);
        }
        msda_store<TV, VEC, QUANT>(out + bqm * D + c, cstride, acc, inv_sout);
    }
}

// Kernel names: msda[_smem]_<type>_v<VEC> (any L and P) and msda[_smem]_lp<LP>_<type>_v<VEC> (L = 1 and
// L*P = LP; logits and offsets read as 16-byte-aligned vector runs).
#define QK_MSDA_FLOAT(NAME, T, VEC, LP, MINB)                                                               \
    extern "C" __global__ void __launch_bounds__(256, MINB) msda_##NAME(                                          \
        const T* value, const qk_i64* shapes, const T* ref, const T* off, const T* aw, int B, int S, int M,  \
        int D, int Q, int L, int P, int G, T* out) {                                                        \
        msda_global<T, T, T, VEC, false, LP>(value, shapes, ref, off, aw, B, S, M, D, Q, L, P, G, 1.f, 1.f,  \
                                             1.f, 1.f, out);                                                \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256, MINB) msda_smem_##NAME(                               \
        const T* value, const qk_i64* shapes, const T* ref, const T* off, const T* aw, int B, int S, int M,  \
        int D, int Q, int L, int P, int G, int qchunk, T* out) {                                            \
        msda_smem<T, T, T, VEC, false, LP>(value, shapes, ref, off, aw, B, S, M, D, Q, L, P, G, qchunk, 1.f,  \
                                           1.f, 1.f, 1.f, out);                                             \
    }

// fp32: 4 channels (16 bytes) a thread when D % 4 == 0, else one channel a thread.
QK_MSDA_FLOAT(fp32_v4, float, 4, 0, 4)
QK_MSDA_FLOAT(fp32_v1, float, 1, 0, 4)
QK_MSDA_FLOAT(lp4_fp32_v4, float, 4, 4, 4)
QK_MSDA_FLOAT(lp8_fp32_v4, float, 4, 8, 4)
// wider single-level forms: fewer threads share (and recompute) one (b,q,m)'s softmax and locations
QK_MSDA_FLOAT(lp4_fp32_v8, float, 8, 4, 4)
QK_MSDA_FLOAT(lp8_fp32_v8, float, 8, 8, 4)
QK_MSDA_FLOAT(lp4_fp32_v16, float, 16, 4, 2)
QK_MSDA_FLOAT(lp8_fp32_v16, float, 16, 8, 2)
// fp16: 8 channels (16 bytes: four packed half2 pairs) a thread when D % 8 == 0, one half2 pair when D is
// even, one channel otherwise. Arithmetic accumulates in fp32.
QK_MSDA_FLOAT(fp16_v8, qk_half, 8, 0, 4)
QK_MSDA_FLOAT(fp16_v2, qk_half, 2, 0, 4)
QK_MSDA_FLOAT(fp16_v1, qk_half, 1, 0, 4)
QK_MSDA_FLOAT(lp4_fp16_v8, qk_half, 8, 4, 4)
QK_MSDA_FLOAT(lp8_fp16_v8, qk_half, 8, 8, 4)
QK_MSDA_FLOAT(lp4_fp16_v16, qk_half, 16, 4, 4)
QK_MSDA_FLOAT(lp8_fp16_v16, qk_half, 16, 8, 4)
QK_MSDA_FLOAT(lp4_fp16_v32, qk_half, 32, 4, 2)
QK_MSDA_FLOAT(lp8_fp16_v32, qk_half, 32, 8, 2)

// INT8 variant, as the TensorRT plugin accepts it: value, offsets and weights are int8 with per-tensor scales,
// reference points fp32, output int8 with its own scale. The four scales arrive as the bit patterns of fp32
// values in int32 extras (TensorRT AOT extras are integers; aot_impl reads TensorDesc.scale at build time).
// Dequantised maths is exactly the fp32 kernel's; the output is re-quantised with QuantizeLinear rounding.
#define QK_MSDA_INT8(NAME, LP)                                                                              \
    extern "C" __global__ void __launch_bounds__(256, 4) msda_##NAME(                                          \
        const signed char* value, const qk_i64* shapes, const float* ref, const signed char* off,            \
        const signed char* aw, int B, int S, int M, int D, int Q, int L, int P, int G, int value_scale_bits, \
        int offset_scale_bits, int weight_scale_bits, int out_scale_bits, signed char* out) {               \
        msda_global<signed char, float, signed char, 8, true, LP>(                                          \
            value, shapes, ref, off, aw, B, S, M, D, Q, L, P, G, qk_bits_to_float(value_scale_bits),         \
            qk_bits_to_float(offset_scale_bits), qk_bits_to_float(weight_scale_bits),                       \
            1.f / qk_bits_to_float(out_scale_bits), out);                                                   \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256, 4) msda_smem_##NAME(                                  \
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

// Cooperative single-level form for D = 32 (every BEVFormer call). The TPG = 32/VEC lanes of a (b,q,m) group
// split the preparation of its LP points (softmax, sampling location, corner weights, corner index): lane t
// prepares points t, t+TPG, ..., the softmax max and sum are combined with butterfly shuffles, and each point's
// corner weights and index are then broadcast from the lane that prepared it. Every lane thus loads one 16-byte
// (8-byte for int8) piece of each corner, so the TPG lanes of a group read the whole 64-byte (fp16), 128-byte
// (fp32) or 32-byte (int8) corner row in one load instruction, while the per-point arithmetic is done once per
// group instead of once per lane. Corners with a zero weight (outside the map, or exactly on a grid line) are
// not loaded. Idle lanes of the last warp shadow the last group so that every shuffle has the full warp.
template <typename TV, typename TR, typename TP, int VEC, bool QUANT, int LP>
__device__ __forceinline__ void msda_coop(const TV* __restrict__ value, const qk_i64* __restrict__ shapes,
                                          const TR* __restrict__ ref, const TP* __restrict__ off,
                                          const TP* __restrict__ aw, int B, int S, int M, int Q, int G, float sv,
                                          float so, float sa, float inv_sout, TV* __restrict__ out) {
    constexpr int D = 32;
    constexpr int TPG = D / VEC;
    constexpr int NP = (LP + TPG - 1) / TPG;
    static_assert(32 % TPG == 0 && VEC * (int)sizeof(TV) <= 16, "one vector load per lane and corner");
    const long long total = (long long)B * Q * M * TPG;
    const long long tid0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = tid0 < total;
    const long long tid = active ? tid0 : total - 1;
    const int lane = (int)(tid % TPG);
    const long long bqm = tid / TPG;
    const int m = (int)(bqm % M);
    const long long bq = bqm / M;
    const int b = (int)(bq / Q);
    const int H = (int)shapes[0], W = (int)shapes[1];
    const TP* awp = aw + bqm * LP;
    const TP* offp = off + bqm * (LP * 2);
    const TR* refp = ref + bq * (2 * G);

    // softmax over the group's LP logits, each lane holding its own points'
    float e[NP];
    float mx = -3.402823466e38f;
#pragma unroll
    for (int i = 0; i < NP; ++i) {
        const int p = lane + TPG * i;
        e[i] = p < LP ? msda_param<QUANT>(qk_ld(awp + p), sa) : -3.402823466e38f;
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
    // the value scale of the int8 form is folded into the attention weight once per sample
    const float inv_den = (QUANT ? sv : 1.f) / den;

    // this lane's points: four corner weights (zero where the corner is outside) and the top-left index
    float cwo[NP][4];
    int baseo[NP];
#pragma unroll
    for (int i = 0; i < NP; ++i) {
        const int p = lane + TPG * i;
        const int pp = p < LP ? p : 0;
        const int g = pp % G;
        const float x = qk_ld(refp + 2 * g) * (float)W + msda_param<QUANT>(qk_ld(offp + 2 * pp), so) - 0.5f;
        const float y = qk_ld(refp + 2 * g + 1) * (float)H + msda_param<QUANT>(qk_ld(offp + 2 * pp + 1), so) - 0.5f;
        const bool inside = p < LP && y > -1.f && x > -1.f && y < (float)H && x < (float)W;
        const float w = inside ? e[i] * inv_den : 0.f;
        const float fx = floorf(x), fy = floorf(y);
        const int x0 = (int)fx, y0 = (int)fy;
        const float lx = x - fx, ly = y - fy;
        const float wy0 = (1.f - ly) * w, wy1 = ly * w;
        const bool okx0 = x0 >= 0, okx1 = x0 + 1 <= W - 1;
        const bool oky0 = y0 >= 0, oky1 = y0 + 1 <= H - 1;
        // `inside` in every test, not only in w: a NaN or infinite position fails the bounds test (as in the
        // plugin) and must contribute nothing, but its NaN fraction times a zero weight would still be NaN
        cwo[i][0] = (inside && oky0 && okx0) ? wy0 * (1.f - lx) : 0.f;
        cwo[i][1] = (inside && oky0 && okx1) ? wy0 * lx : 0.f;
        cwo[i][2] = (inside && oky1 && okx0) ? wy1 * (1.f - lx) : 0.f;
        cwo[i][3] = (inside && oky1 && okx1) ? wy1 * lx : 0.f;
        baseo[i] = inside ? y0 * W + x0 : 0;
    }

    const unsigned int rowb = (unsigned int)(M * D) * sizeof(TV);  // bytes between spatial positions
    const TV* vsrc = value + ((long long)b * S * M + m) * D + lane * VEC;
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
#pragma unroll
    for (int p = 0; p < LP; ++p) {
        const int src = p % TPG, i = p / TPG;
        const int base = (int)qk_shfl_idx((unsigned int)baseo[i], src, TPG);
        const int idx[4] = {base, base + 1, base + W, base + W + 1};
        if constexpr (sizeof(TV) == 2) {
            // corner weights travel as half2 splats: converted once by the lane that prepared the point. The
            // half2 FMA block below is written out as in msda_accumulate_fast, not shared through a helper:
            // passing the partial sums by pointer made every fp16 kernel 1.4-2.3x slower (GPU_NOTES.md, R9).
            unsigned int c2o[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) c2o[k] = qk_h2_splat(cwo[i][k]);
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
        } else {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float c = __uint_as_float(qk_shfl_idx(__float_as_uint(cwo[i][k]), src, TPG));
                if (c != 0.f) {
                    float f[VEC];
                    if constexpr (sizeof(TV) == 1) {
                        // loaded as words, so that the bytes are widened in place (qk_i8x4_to_f32)
                        const uint2 v = *reinterpret_cast<const uint2*>(qk_row_ptr(vsrc, idx[k], rowb));
                        qk_i8x4_to_f32(v.x, f);
                        qk_i8x4_to_f32(v.y, f + 4);
                    } else {
                        const QkVec<TV, VEC> v =
                            *reinterpret_cast<const QkVec<TV, VEC>*>(qk_row_ptr(vsrc, idx[k], rowb));
                        qk_unpack<TV, VEC>(v, f);
                    }
#pragma unroll
                    for (int j = 0; j < VEC; ++j) acc[j] = fmaf(c, f[j], acc[j]);
                }
            }
        }
    }
    if (active) msda_store<TV, VEC, QUANT>(out + bqm * D + lane * VEC, VEC, acc, inv_sout);
}

// Kernel names msda_co_lp<LP>_<type>: the cooperative form, for L = 1, L*P = LP and D = 32 (the D argument is
// part of the shared signature and must be 32). One thread per (b,q,m) and VEC channels, VEC as in the lp
// kernels' narrow split: fp32 4, fp16 8, int8 8.
#define QK_MSDA_COOP_FLOAT(NAME, T, VEC, LP, BOUNDS)                                                        \
    extern "C" __global__ void __launch_bounds__ BOUNDS msda_co_##NAME(                                    \
        const T* value, const qk_i64* shapes, const T* ref, const T* off, const T* aw, int B, int S, int M,  \
        int D, int Q, int L, int P, int G, T* out) {                                                        \
        msda_coop<T, T, T, VEC, false, LP>(value, shapes, ref, off, aw, B, S, M, Q, G, 1.f, 1.f, 1.f, 1.f,   \
                                           out);                                                            \
    }

// Six blocks of 256 an SM (at most 40 registers) where that costs no more than a few bytes of spill. The fp16
// 8-point kernel spills 28 bytes at 40 registers; it keeps the plain bound, under which NVRTC gives it 48
// registers and no spill (an explicit minimum of 1 block made it take 75: three blocks an SM, 10% slower).
QK_MSDA_COOP_FLOAT(lp4_fp32, float, 4, 4, (256, 6))
QK_MSDA_COOP_FLOAT(lp8_fp32, float, 4, 8, (256, 6))
QK_MSDA_COOP_FLOAT(lp4_fp16, qk_half, 8, 4, (256, 6))
QK_MSDA_COOP_FLOAT(lp8_fp16, qk_half, 8, 8, (256))

#define QK_MSDA_COOP_INT8(NAME, LP)                                                                         \
    extern "C" __global__ void __launch_bounds__(256, 6) msda_co_##NAME(                                    \
        const signed char* value, const qk_i64* shapes, const float* ref, const signed char* off,            \
        const signed char* aw, int B, int S, int M, int D, int Q, int L, int P, int G, int value_scale_bits, \
        int offset_scale_bits, int weight_scale_bits, int out_scale_bits, signed char* out) {               \
        msda_coop<signed char, float, signed char, 8, true, LP>(                                            \
            value, shapes, ref, off, aw, B, S, M, Q, G, qk_bits_to_float(value_scale_bits),                 \
            qk_bits_to_float(offset_scale_bits), qk_bits_to_float(weight_scale_bits),                       \
            1.f / qk_bits_to_float(out_scale_bits), out);                                                   \
    }

QK_MSDA_COOP_INT8(lp4_int8, 4)
QK_MSDA_COOP_INT8(lp8_int8, 8)

// ------------------------------------------------------------------------------------------------------------
// Packed form (D = 32, one level): `value` is first copied into a corner-packed workspace, then the gather kernel
// reads it. Entry (b, m, ey, ex), ey in [0, H], ex in [0, W], holds the four corners of a sampling point whose
// top-left corner is (y0, x0) = (ey - 1, ex - 1), zero where a corner lies outside the map, so that one point's
// corners share cache lines instead of lying M*D elements apart as in value's [B, S, M, D] layout (GPU_NOTES.md,
// R14). fp16: [row][column][32 channels] (256 bytes: one 128-byte line per row); int8: [32 channels][4 corners]
// (128 bytes: one line a point; the four corners of a channel in one word, combined by dp4a). Entries of one
// (b, m) are contiguous: entry index ((b * M + m) * (H + 1) + ey) * (W + 1) + ex. 32-bit indexing: the caller
// guarantees that the workspace and value have fewer than 2^31 bytes.

__device__ __forceinline__ unsigned int qk_prmt(unsigned int a, unsigned int b, unsigned int sel) {
    unsigned int d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

// Entries of the workspace, and of the one (b, m) slice, for a map of H x W.
__device__ __forceinline__ int msda_pack_entries(int H, int W) { return (H + 1) * (W + 1); }

// msda_pack_fp16: one thread per 16 bytes of the workspace (8 channels of one corner); grid (pieces of a (b, m)
// slice / 256, B * M), where the x extent may cover more than the slice (the host may only know a bound).
extern "C" __global__ void __launch_bounds__(256) msda_pack_fp16(const qk_half* value, const qk_i64* shapes, int B,
                                                                 int S, int M, int D, qk_half* packed) {
    const int H = (int)shapes[0], W = (int)shapes[1];
    const int E = msda_pack_entries(H, W);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= E * 16) return;
    const int bm = blockIdx.y;
    const int q = i & 3, c = (i >> 2) & 1, r = (i >> 3) & 1;
    const int e = i >> 4;
    const int ey = e / (W + 1), ex = e - ey * (W + 1);
    const int y = ey - 1 + r, x = ex - 1 + c;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (y >= 0 && y < H && x >= 0 && x < W) {
        const int b = bm / M, m = bm - b * M;
        v = *reinterpret_cast<const uint4*>(value + (((b * S + y * W + x) * M + m) * 32 + q * 8));
    }
    *reinterpret_cast<uint4*>(packed + ((long long)bm * E * 16 + i) * 8) = v;
}

// msda_pack_int8: one thread per 4 channels of an entry (16 bytes out: for each channel its 4 corners), reading one
// 4-byte word of each corner and transposing the 4 x 4 bytes with byte permutes; grid as msda_pack_fp16's.
extern "C" __global__ void __launch_bounds__(256) msda_pack_int8(const signed char* value, const qk_i64* shapes,
                                                                 int B, int S, int M, int D, signed char* packed) {
    const int H = (int)shapes[0], W = (int)shapes[1];
    const int E = msda_pack_entries(H, W);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= E * 8) return;
    const int bm = blockIdx.y;
    const int q = i & 7;
    const int e = i >> 3;
    const int ey = e / (W + 1), ex = e - ey * (W + 1);
    const int b = bm / M, m = bm - b * M;
    unsigned int w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int y = ey - 1 + (k >> 1), x = ex - 1 + (k & 1);
        w[k] = (y >= 0 && y < H && x >= 0 && x < W)
                   ? *reinterpret_cast<const unsigned int*>(value + (((b * S + y * W + x) * M + m) * 32 + q * 4))
                   : 0u;
    }
    // lo01 = [w0.b0 w1.b0 w0.b1 w1.b1], lo23 likewise for corners 2, 3; then channel j's word = its 4 corners
    const unsigned int lo01 = qk_prmt(w[0], w[1], 0x5140u), lo23 = qk_prmt(w[2], w[3], 0x5140u);
    const unsigned int hi01 = qk_prmt(w[0], w[1], 0x7362u), hi23 = qk_prmt(w[2], w[3], 0x7362u);
    uint4 o;
    o.x = qk_prmt(lo01, lo23, 0x5410u);
    o.y = qk_prmt(lo01, lo23, 0x7632u);
    o.z = qk_prmt(hi01, hi23, 0x5410u);
    o.w = qk_prmt(hi01, hi23, 0x7632u);
    *reinterpret_cast<uint4*>(packed + ((long long)bm * E * 8 + i) * 16) = o;
}

// Gather over the workspace: 8 lanes per (b, q, m) group. Lane t prepares point t (softmax by butterfly shuffles
// over the 8 lanes, sampling location, corner weights, entry index); every point's entry index and weights are then
// broadcast to the group. fp16: lane t owns column t >> 2 and channels 8 (t & 3) .. + 8 of both rows, so the 8
// lanes read one whole 128-byte line per row and instruction; the two columns' partial sums meet at the end by one
// shuffle. int8: lane t owns channels 4t .. 4t + 3 of all four corners (one 16-byte load a point covers the
// group's whole 128-byte entry) and combines them with dp4a against the corner weights in 23-bit fixed point,
// split into three bytes (three dp4a a channel; the integer sums are exact, the weights carry 2^-24 of absolute
// rounding, about fp32's relative rounding of a weight near one).
template <bool QUANT, typename TR, typename TP, int LP>
__device__ __forceinline__ void msda_packed_prepare(const qk_i64* __restrict__ shapes, const TR* __restrict__ refp,
                                                    const TP* __restrict__ offp, const TP* __restrict__ awp,
                                                    int lane, int G, float so, float sa, float cw[4], int& entry) {
    const int H = (int)shapes[0], W = (int)shapes[1];
    const bool has = lane < LP;
    const int p = has ? lane : 0;
    float a = has ? msda_param<QUANT>(qk_ld(awp + p), sa) : -3.402823466e38f;
    float mx = a;
#pragma unroll
    for (int s = 4; s > 0; s /= 2) mx = fmaxf(mx, qk_shfl_xor(mx, s, 8));
    const float e = has ? __expf(a - mx) : 0.f;
    float den = e;
#pragma unroll
    for (int s = 4; s > 0; s /= 2) den += qk_shfl_xor(den, s, 8);
    const int g = p % G;
    const float x = qk_ld(refp + 2 * g) * (float)W + msda_param<QUANT>(qk_ld(offp + 2 * p), so) - 0.5f;
    const float y = qk_ld(refp + 2 * g + 1) * (float)H + msda_param<QUANT>(qk_ld(offp + 2 * p + 1), so) - 0.5f;
    // `inside` decides every weight (a NaN or infinite position fails it and must contribute nothing)
    const bool inside = has && y > -1.f && x > -1.f && y < (float)H && x < (float)W;
    const float fx = inside ? floorf(x) : 0.f, fy = inside ? floorf(y) : 0.f;
    const float lx = inside ? x - fx : 0.f, ly = inside ? y - fy : 0.f;
    const float w = inside ? __fdividef(e, den) : 0.f;  // den >= 1: the fast division is exact to 2 ulp
    // a row outside the map holds zeros in the workspace: its weights are zeroed so that its line is not read
    const float wy0 = fy >= 0.f ? (1.f - ly) * w : 0.f, wy1 = fy + 1.f <= (float)(H - 1) ? ly * w : 0.f;
    cw[0] = wy0 * (1.f - lx);
    cw[1] = wy0 * lx;
    cw[2] = wy1 * (1.f - lx);
    cw[3] = wy1 * lx;
    entry = inside ? ((int)fy + 1) * (W + 1) + (int)fx + 1 : 0;
}

// One thread of a packed-form gather: its lane in the group of 8 and the group's (b, q, m). Idle threads of the last
// warp shadow the last group (every shuffle needs the whole warp) and store nothing.
struct MsdaPackedGroup {
    bool active;
    int lane, bqm, bq, bm;  // bm = b * M + m: the (b, m) slice of the workspace
};

__device__ __forceinline__ MsdaPackedGroup msda_packed_group(int B, int M, int Q) {
    const int total = B * Q * M * 8;
    const int tid0 = blockIdx.x * blockDim.x + threadIdx.x;
    MsdaPackedGroup g;
    g.active = tid0 < total;
    const int tid = g.active ? tid0 : total - 1;
    g.lane = tid & 7;
    g.bqm = tid >> 3;
    const int m = g.bqm % M;
    g.bq = g.bqm / M;
    g.bm = (g.bq / Q) * M + m;
    return g;
}

template <int LP>
__device__ __forceinline__ void msda_packed_fp16(const qk_half* __restrict__ packed, const qk_i64* __restrict__ shapes,
                                                 const qk_half* __restrict__ ref, const qk_half* __restrict__ off,
                                                 const qk_half* __restrict__ aw, int B, int M, int Q, int G,
                                                 qk_half* __restrict__ out) {
    static_assert(LP <= 8 && LP % 2 == 0, "one point a lane, points summed in pairs");
    const MsdaPackedGroup grp = msda_packed_group(B, M, Q);
    const int lane = grp.lane, bqm = grp.bqm;
    const int H = (int)shapes[0], W = (int)shapes[1];
    float cw[4];
    int entry;
    msda_packed_prepare<false, qk_half, qk_half, LP>(shapes, ref + grp.bq * (2 * G), off + bqm * (2 * LP),
                                                     aw + bqm * LP, lane, G, 1.f, 1.f, cw, entry);
    // the two corners of each row as one half2 pair: (left, right)
    unsigned int row0, row1;
    {
        const unsigned int l0 = qk_h2_splat(cw[0]), r0 = qk_h2_splat(cw[1]);
        const unsigned int l1 = qk_h2_splat(cw[2]), r1 = qk_h2_splat(cw[3]);
        row0 = qk_prmt(l0, r0, 0x5410u);
        row1 = qk_prmt(l1, r1, 0x5410u);
    }
    const int col = lane >> 2;
    const unsigned int pick = col ? 0x3232u : 0x1010u;  // splat of this lane's column weight
    const qk_half* base = packed + grp.bm * msda_pack_entries(H, W) * 128 + lane * 8;
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = 0.f;
    unsigned int s2[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int p = 0; p < LP; ++p) {
        const int e = (int)qk_shfl_idx((unsigned int)entry, p, 8);
        const unsigned int w0 = qk_shfl_idx(row0, p, 8), w1 = qk_shfl_idx(row1, p, 8);
        const qk_half* src = qk_row_ptr(base, e, 256u);
        if (w0 != 0u) {
            const unsigned int c2 = qk_prmt(w0, w0, pick);
            const uint4 v = *reinterpret_cast<const uint4*>(src);
            s2[0] = qk_h2_fma(c2, v.x, s2[0]);
            s2[1] = qk_h2_fma(c2, v.y, s2[1]);
            s2[2] = qk_h2_fma(c2, v.z, s2[2]);
            s2[3] = qk_h2_fma(c2, v.w, s2[3]);
        }
        if (w1 != 0u) {
            const unsigned int c2 = qk_prmt(w1, w1, pick);
            const uint4 v = *reinterpret_cast<const uint4*>(src + 64);
            s2[0] = qk_h2_fma(c2, v.x, s2[0]);
            s2[1] = qk_h2_fma(c2, v.y, s2[1]);
            s2[2] = qk_h2_fma(c2, v.z, s2[2]);
            s2[3] = qk_h2_fma(c2, v.w, s2[3]);
        }
        if (p % 2 == 1) {
            // two points (four half2 products a channel pair, as the cooperative kernel's four corners) per fp32 add
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float lo, hi;
                qk_h2_to_f2(s2[j], lo, hi);
                acc[2 * j] += lo;
                acc[2 * j + 1] += hi;
                s2[j] = 0u;
            }
        }
    }
    // lanes t and t ^ 4 hold the two columns of the same 8 channels: lane `col` keeps channels 4 col .. 4 col + 3
    float res[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float keep = col ? acc[4 + j] : acc[j];
        const float give = col ? acc[j] : acc[4 + j];
        res[j] = keep + qk_shfl_xor(give, 4, 8);
    }
    if (grp.active) {
        QkVec<qk_half, 4> o;
        qk_pack<qk_half, 4>(res, o);
        *reinterpret_cast<QkVec<qk_half, 4>*>(out + bqm * 32 + (lane & 3) * 8 + col * 4) = o;
    }
}

__device__ __forceinline__ int qk_dp4a_us(unsigned int a, unsigned int b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

template <int LP>
__device__ __forceinline__ void msda_packed_int8(const signed char* __restrict__ packed,
                                                 const qk_i64* __restrict__ shapes, const float* __restrict__ ref,
                                                 const signed char* __restrict__ off,
                                                 const signed char* __restrict__ aw, int B, int M, int Q, int G,
                                                 float sv, float so, float sa, float inv_sout,
                                                 signed char* __restrict__ out) {
    static_assert(LP <= 8, "one point a lane");
    const MsdaPackedGroup grp = msda_packed_group(B, M, Q);
    const int lane = grp.lane, bqm = grp.bqm;
    const int H = (int)shapes[0], W = (int)shapes[1];
    float cw[4];
    int entry;
    msda_packed_prepare<true, float, signed char, LP>(shapes, ref + grp.bq * (2 * G), off + bqm * (2 * LP),
                                                      aw + bqm * LP, lane, G, so, sa, cw, entry);
    // corner weights in 23-bit fixed point (each at most 2^23, as every weight is at most one), as three bytes
    unsigned int fw[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) fw[k] = __float2uint_rn(cw[k] * 8388608.f);
    const unsigned int lo01 = qk_prmt(fw[0], fw[1], 0x5140u), lo23 = qk_prmt(fw[2], fw[3], 0x5140u);
    const unsigned int hi01 = qk_prmt(fw[0], fw[1], 0x7362u), hi23 = qk_prmt(fw[2], fw[3], 0x7362u);
    const unsigned int k0 = qk_prmt(lo01, lo23, 0x5410u);  // bits 0-7 of the four corner weights
    const unsigned int k1 = qk_prmt(lo01, lo23, 0x7632u);  // bits 8-15
    const unsigned int k2 = qk_prmt(hi01, hi23, 0x5410u);  // bits 16-23
    const signed char* base = packed + grp.bm * msda_pack_entries(H, W) * 128 + lane * 16;
    int a0[4] = {0, 0, 0, 0}, a1[4] = {0, 0, 0, 0}, a2[4] = {0, 0, 0, 0};
#pragma unroll
    for (int p = 0; p < LP; ++p) {
        const int e = (int)qk_shfl_idx((unsigned int)entry, p, 8);
        const unsigned int c0 = qk_shfl_idx(k0, p, 8), c1 = qk_shfl_idx(k1, p, 8), c2 = qk_shfl_idx(k2, p, 8);
        if ((c0 | c1 | c2) != 0u) {
            const uint4 v = *reinterpret_cast<const uint4*>(qk_row_ptr(base, e, 128u));
            const unsigned int vw[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                a0[j] = qk_dp4a_us(c0, vw[j], a0[j]);
                a1[j] = qk_dp4a_us(c1, vw[j], a1[j]);
                a2[j] = qk_dp4a_us(c2, vw[j], a2[j]);
            }
        }
    }
    const float scale = sv * inv_sout * (1.f / 8388608.f);
    unsigned int word = 0u;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float s = ((float)a2[j] * 65536.f + (float)a1[j] * 256.f) + (float)a0[j];
        word |= (unsigned int)(unsigned char)qk_quantize_i8(s * scale) << (8 * j);
    }
    if (grp.active) *reinterpret_cast<unsigned int*>(out + bqm * 32 + lane * 4) = word;
}

// Kernel names msda_pk_lp<LP>_<type>: the gather over the workspace that msda_pack_<type> wrote (passed in value's
// place; S is unused). One thread per (b, q, m) and 8 lanes.
#define QK_MSDA_PACKED_FP16(LP)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) msda_pk_lp##LP##_fp16(                                 \
        const qk_half* packed, const qk_i64* shapes, const qk_half* ref, const qk_half* off, const qk_half* aw, \
        int B, int S, int M, int D, int Q, int L, int P, int G, qk_half* out) {                               \
        msda_packed_fp16<LP>(packed, shapes, ref, off, aw, B, M, Q, G, out);                                   \
    }
#define QK_MSDA_PACKED_INT8(LP)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) msda_pk_lp##LP##_int8(                                 \
        const signed char* packed, const qk_i64* shapes, const float* ref, const signed char* off,          \
        const signed char* aw, int B, int S, int M, int D, int Q, int L, int P, int G, int value_scale_bits, \
        int offset_scale_bits, int weight_scale_bits, int out_scale_bits, signed char* out) {               \
        msda_packed_int8<LP>(packed, shapes, ref, off, aw, B, M, Q, G, qk_bits_to_float(value_scale_bits),    \
                             qk_bits_to_float(offset_scale_bits), qk_bits_to_float(weight_scale_bits),        \
                             1.f / qk_bits_to_float(out_scale_bits), out);                                   \
    }

QK_MSDA_PACKED_FP16(4)
QK_MSDA_PACKED_FP16(8)
QK_MSDA_PACKED_INT8(4)
QK_MSDA_PACKED_INT8(8)
