// MultiScaleDeformableAttn (BEVFormer's MultiScaleDeformableAttnTRT / TRT2 plugin maths).
//
//   value [B,S,M,D], spatial_shapes int64 [L,2] rows (H,W), reference_points [B,Q,1,2G],
//   sampling_offsets [B,Q,M,L*P*2] (pixels, [level][point][x,y]), attention_weights [B,Q,M,L*P] (logits)
//   -> out [B,Q,M,D];  out = sum_j softmax(a)_j * bilinear_zero_pad(V_l, R_g*(W,H) + O_j - 0.5)
//
// Parameter order follows TensorRT's ahead-of-time plugin ABI: tensor inputs, int32 extras, tensor outputs,
// so that the same PTX serves PyTorch and a TensorRT engine.
//
// Work split: one group of D/VEC consecutive threads per (b,q,m); each thread owns VEC consecutive channels
// and loads them as one vector (16 bytes for fp32 x4 and fp16 x8). The softmax and the sampling locations
// are recomputed by each thread of the group: they are a handful of L1-broadcast loads and some arithmetic,
// cheaper than a shared-memory exchange and a barrier at these sizes.
#include "common.cuh"

template <typename T, int VEC>
__device__ __forceinline__ void msda_body(const T* __restrict__ value, const qk_i64* __restrict__ shapes,
                                          const T* __restrict__ ref, const T* __restrict__ off,
                                          const T* __restrict__ aw, int B, int S, int M, int D, int Q, int L,
                                          int P, int G, T* __restrict__ out) {
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

    const T* awp = aw + bqm * LP;
    const T* offp = off + bqm * (long long)LP * 2;
    const T* refp = ref + bq * (long long)(2 * G);

    // Softmax over all L*P logits; out-of-bounds points still count in the denominator.
    float mx = -3.402823466e38f;
    for (int j = 0; j < LP; ++j) mx = fmaxf(mx, qk_ld(awp + j));
    float den = 0.f;
    for (int j = 0; j < LP; ++j) den += __expf(qk_ld(awp + j) - mx);
    const float inv_den = 1.f / den;

    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;

    const long long row = (long long)M * D;  // elements between consecutive spatial positions
    long long start = 0;
    for (int l = 0; l < L; ++l) {
        const int H = (int)shapes[2 * l];
        const int W = (int)shapes[2 * l + 1];
        const T* vbase = value + ((long long)b * S + start) * row + (long long)m * D + c;
        for (int p = 0; p < P; ++p) {
            const int j = l * P + p;
            const int g = p % G;
            const float x = qk_ld(refp + 2 * g) * (float)W + qk_ld(offp + 2 * j) - 0.5f;
            const float y = qk_ld(refp + 2 * g + 1) * (float)H + qk_ld(offp + 2 * j + 1) - 0.5f;
            if (!(y > -1.f && x > -1.f && y < (float)H && x < (float)W)) continue;
            const float w = __expf(qk_ld(awp + j) - mx) * inv_den;
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
                const QkVec<T, VEC> v =
                    *reinterpret_cast<const QkVec<T, VEC>*>(vbase + ((long long)cy[k] * W + cx[k]) * row);
                float f[VEC];
                qk_unpack<T, VEC>(v, f);
#pragma unroll
                for (int i = 0; i < VEC; ++i) acc[i] = fmaf(cw[k], f[i], acc[i]);
            }
        }
        start += (long long)H * W;
    }
    QkVec<T, VEC> o;
    qk_pack<T, VEC>(acc, o);
    *reinterpret_cast<QkVec<T, VEC>*>(out + bqm * D + c) = o;
}

#define QK_MSDA_KERNEL(NAME, T, VEC)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                               \
        const T* value, const qk_i64* shapes, const T* ref, const T* off, const T* aw, int B, int S, int M, \
        int D, int Q, int L, int P, int G, T* out) {                                                       \
        msda_body<T, VEC>(value, shapes, ref, off, aw, B, S, M, D, Q, L, P, G, out);                       \
    }

// fp32: 4 channels (16 bytes) a thread when D % 4 == 0, else one channel a thread.
QK_MSDA_KERNEL(msda_fp32_v4, float, 4)
QK_MSDA_KERNEL(msda_fp32_v1, float, 1)
// fp16: 8 channels (16 bytes, four packed half2 pairs) a thread when D % 8 == 0, one half2 pair when D is
// even, one channel otherwise. Arithmetic accumulates in fp32.
QK_MSDA_KERNEL(msda_fp16_v8, qk_half, 8)
QK_MSDA_KERNEL(msda_fp16_v2, qk_half, 2)
QK_MSDA_KERNEL(msda_fp16_v1, qk_half, 1)

// INT8 variant, as the TensorRT plugin accepts it: value, offsets and weights are int8 with per-tensor scales,
// reference points fp32, output int8 with its own scale. The four scales arrive as the bit patterns of fp32
// values in int32 extras (TensorRT AOT extras are integers; aot_impl reads TensorDesc.scale at build time).
// Dequantised maths is exactly the fp32 kernel's; the output is re-quantised with QuantizeLinear rounding.
extern "C" __global__ void __launch_bounds__(256)
    msda_int8_v8(const signed char* value, const qk_i64* shapes, const float* ref, const signed char* off,
                 const signed char* aw, int B, int S, int M, int D, int Q, int L, int P, int G,
                 int value_scale_bits, int offset_scale_bits, int weight_scale_bits, int out_scale_bits,
                 signed char* out) {
    const int VEC = 8;
    const float sv = qk_bits_to_float(value_scale_bits);
    const float so = qk_bits_to_float(offset_scale_bits);
    const float sa = qk_bits_to_float(weight_scale_bits);
    const float inv_sout = 1.f / qk_bits_to_float(out_scale_bits);
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
    const signed char* awp = aw + bqm * LP;
    const signed char* offp = off + bqm * (long long)LP * 2;
    const float* refp = ref + bq * (long long)(2 * G);

    float mx = -3.402823466e38f;
    for (int j = 0; j < LP; ++j) mx = fmaxf(mx, sa * (float)awp[j]);
    float den = 0.f;
    for (int j = 0; j < LP; ++j) den += __expf(sa * (float)awp[j] - mx);
    const float inv_den = 1.f / den;

    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    const long long row = (long long)M * D;
    long long start = 0;
    for (int l = 0; l < L; ++l) {
        const int H = (int)shapes[2 * l];
        const int W = (int)shapes[2 * l + 1];
        const signed char* vbase = value + ((long long)b * S + start) * row + (long long)m * D + c;
        for (int p = 0; p < P; ++p) {
            const int j = l * P + p;
            const int g = p % G;
            const float x = refp[2 * g] * (float)W + so * (float)offp[2 * j] - 0.5f;
            const float y = refp[2 * g + 1] * (float)H + so * (float)offp[2 * j + 1] - 0.5f;
            if (!(y > -1.f && x > -1.f && y < (float)H && x < (float)W)) continue;
            // The value scale is applied once per sample rather than per corner and channel.
            const float w = __expf(sa * (float)awp[j] - mx) * inv_den * sv;
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
                const QkVec<signed char, VEC> v = *reinterpret_cast<const QkVec<signed char, VEC>*>(
                    vbase + ((long long)cy[k] * W + cx[k]) * row);
#pragma unroll
                for (int i = 0; i < VEC; ++i) acc[i] = fmaf(cw[k], (float)v.v[i], acc[i]);
            }
        }
        start += (long long)H * W;
    }
    QkVec<signed char, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = qk_quantize_i8(acc[i] * inv_sout);
    *reinterpret_cast<QkVec<signed char, VEC>*>(out + bqm * D + c) = o;
}
