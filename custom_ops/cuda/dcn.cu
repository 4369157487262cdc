// ModulatedDeformableConv2d (DCNv2; mmcv ModulatedDeformConv2d semantics, the maths of the
// ModulatedDeformableConv2dTRT plugin).
//
//   x [N,C,H,W], offset [N, DG*KH*KW*2, Ho, Wo] (per deform group, per kernel tap k: (dy, dx)),
//   mask [N, DG*KH*KW, Ho, Wo] (already modulated, no sigmoid here), weight [OC, C/groups, KH, KW], bias [OC]
//   out[n,oc,ho,wo] = bias[oc] + sum_{c in group(oc), k} weight[oc,c,k] * mask[n,dg(c),k,ho,wo]
//                      * bilinear(x[n,c], ho*sh - ph + kh*dh + dy, wo*sw - pw + kw*dw + dx)
//   with bilinear = 0 unless -1 < h < H and -1 < w < W, and corners outside the image contributing 0.
//
// Two forms: dcn_im2col_* builds the modulated column matrix [N, C*KH*KW, Ho*Wo] (row c*K + k) that a GEMM
// with weight.view(groups, OC/groups, C/groups*K) turns into the output (the PyTorch path uses cuBLAS for it);
// dcn_direct_* computes the output in one kernel with no workspace, which is what a TensorRT AOT plugin can
// embed (PTX only, no library calls). Parameter order is TensorRT's AOT ABI (inputs, int32 extras, outputs).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ float dcn_bilinear(const T* __restrict__ plane, int H, int W, float h, float w) {
    if (!(h > -1.f && w > -1.f && h < (float)H && w < (float)W)) return 0.f;
    const float fh = floorf(h), fw = floorf(w);
    const int h0 = (int)fh, w0 = (int)fw;
    const float lh = h - fh, lw = w - fw;
    const float hh = 1.f - lh, hw = 1.f - lw;
    float v = 0.f;
    if (h0 >= 0 && w0 >= 0) v = fmaf(hh * hw, qk_ld(plane + (long long)h0 * W + w0), v);
    if (h0 >= 0 && w0 + 1 < W) v = fmaf(hh * lw, qk_ld(plane + (long long)h0 * W + w0 + 1), v);
    if (h0 + 1 < H && w0 >= 0) v = fmaf(lh * hw, qk_ld(plane + (long long)(h0 + 1) * W + w0), v);
    if (h0 + 1 < H && w0 + 1 < W) v = fmaf(lh * lw, qk_ld(plane + (long long)(h0 + 1) * W + w0 + 1), v);
    return v;
}

// One thread per (n, CPT consecutive channels of one deform group, ho, wo), all KH*KW taps: the offset and
// mask of a tap are read once and the bilinear weights computed once for CPT channels, and the column writes
// are coalesced along wo.
template <typename T, int CPT>
__device__ __forceinline__ void dcn_im2col_body(const T* __restrict__ x, const T* __restrict__ offset,
                                                const T* __restrict__ mask, int N, int C, int H, int W, int KH,
                                                int KW, int Ho, int Wo, int sh, int sw, int ph, int pw, int dh,
                                                int dw, int DG, T* __restrict__ cols) {
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long HWo = (long long)Ho * Wo;
    const int CB = C / CPT;
    const long long total = (long long)N * CB * HWo;
    if (tid >= total) return;
    const int wo = (int)(tid % Wo);
    const int ho = (int)((tid / Wo) % Ho);
    const int c0 = (int)((tid / HWo) % CB) * CPT;
    const int n = (int)(tid / (HWo * CB));
    const int K = KH * KW;
    const int dg = c0 / (C / DG);
    const long long HW = (long long)H * W;
    const T* plane = x + ((long long)n * C + c0) * HW;
    const T* offp = offset + ((long long)n * DG + dg) * 2 * K * HWo + (long long)ho * Wo + wo;
    const T* maskp = mask + ((long long)n * DG + dg) * K * HWo + (long long)ho * Wo + wo;
    T* colp = cols + ((long long)n * C * K + (long long)c0 * K) * HWo + (long long)ho * Wo + wo;
    for (int kh = 0; kh < KH; ++kh) {
        for (int kw = 0; kw < KW; ++kw) {
            const int k = kh * KW + kw;
            const float hs = (float)(ho * sh - ph + kh * dh) + qk_ld(offp + (2LL * k) * HWo);
            const float ws = (float)(wo * sw - pw + kw * dw) + qk_ld(offp + (2LL * k + 1) * HWo);
            const float mk = qk_ld(maskp + (long long)k * HWo);
            float v[CPT];
#pragma unroll
            for (int i = 0; i < CPT; ++i) v[i] = 0.f;
            if (hs > -1.f && ws > -1.f && hs < (float)H && ws < (float)W) {
                const float fh = floorf(hs), fw = floorf(ws);
                const int h0 = (int)fh, w0 = (int)fw;
                const float lh = hs - fh, lw = ws - fw;
                const float cwt[4] = {(1.f - lh) * (1.f - lw) * mk, (1.f - lh) * lw * mk, lh * (1.f - lw) * mk,
                                      lh * lw * mk};
                const bool ok[4] = {h0 >= 0 && w0 >= 0, h0 >= 0 && w0 + 1 < W, h0 + 1 < H && w0 >= 0,
                                    h0 + 1 < H && w0 + 1 < W};
                const long long base = (long long)h0 * W + w0;
                const long long idx[4] = {base, base + 1, base + W, base + W + 1};
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    if (!ok[q]) continue;
#pragma unroll
                    for (int i = 0; i < CPT; ++i) v[i] = fmaf(cwt[q], qk_ld(plane + i * HW + idx[q]), v[i]);
                }
            }
#pragma unroll
            for (int i = 0; i < CPT; ++i) qk_st(colp + ((long long)i * K + k) * HWo, v[i]);
        }
    }
}

// One thread per output element; loops over its group's input channels and the kernel taps.
template <typename T>
__device__ __forceinline__ void dcn_direct_body(const T* __restrict__ x, const T* __restrict__ offset,
                                                const T* __restrict__ mask, const T* __restrict__ weight,
                                                const T* __restrict__ bias, int N, int C, int H, int W, int OC,
                                                int KH, int KW, int Ho, int Wo, int sh, int sw, int ph, int pw,
                                                int dh, int dw, int groups, int DG, T* __restrict__ out) {
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long HWo = (long long)Ho * Wo;
    const long long total = (long long)N * OC * HWo;
    if (tid >= total) return;
    const int wo = (int)(tid % Wo);
    const int ho = (int)((tid / Wo) % Ho);
    const int oc = (int)((tid / HWo) % OC);
    const int n = (int)(tid / (HWo * OC));
    const int K = KH * KW;
    const int cpg = C / groups;
    const int cpdg = C / DG;
    const int g = oc / (OC / groups);
    float acc = qk_ld(bias + oc);
    for (int ci = 0; ci < cpg; ++ci) {
        const int c = g * cpg + ci;
        const int dg = c / cpdg;
        const T* plane = x + ((long long)n * C + c) * H * W;
        const T* offp = offset + ((long long)n * DG + dg) * 2 * K * HWo + (long long)ho * Wo + wo;
        const T* maskp = mask + ((long long)n * DG + dg) * K * HWo + (long long)ho * Wo + wo;
        const T* wp = weight + ((long long)oc * cpg + ci) * K;
        for (int kh = 0; kh < KH; ++kh) {
            for (int kw = 0; kw < KW; ++kw) {
                const int k = kh * KW + kw;
                const float hs = (float)(ho * sh - ph + kh * dh) + qk_ld(offp + (2LL * k) * HWo);
                const float ws = (float)(wo * sw - pw + kw * dw) + qk_ld(offp + (2LL * k + 1) * HWo);
                const float v = qk_ld(maskp + (long long)k * HWo) * dcn_bilinear(plane, H, W, hs, ws);
                acc = fmaf(qk_ld(wp + k), v, acc);
            }
        }
    }
    qk_st(out + tid, acc);
}

// dcn_im2col_<type>_c<CPT>: CPT channels a thread; c4 needs (C / deform_groups) % 4 == 0.
#define QK_DCN_IM2COL(NAME, T, CPT)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                      \
        NAME(const T* x, const T* offset, const T* mask, int N, int C, int H, int W, int KH, int KW, int Ho, \
             int Wo, int sh, int sw, int ph, int pw, int dh, int dw, int DG, T* cols) {                    \
        dcn_im2col_body<T, CPT>(x, offset, mask, N, C, H, W, KH, KW, Ho, Wo, sh, sw, ph, pw, dh, dw, DG,   \
                                cols);                                                                     \
    }
QK_DCN_IM2COL(dcn_im2col_fp32_c4, float, 4)
QK_DCN_IM2COL(dcn_im2col_fp32_c1, float, 1)
QK_DCN_IM2COL(dcn_im2col_fp16_c4, qk_half, 4)
QK_DCN_IM2COL(dcn_im2col_fp16_c1, qk_half, 1)

extern "C" __global__ void __launch_bounds__(256)
    dcn_direct_fp32(const float* x, const float* offset, const float* mask, const float* weight,
                    const float* bias, int N, int C, int H, int W, int OC, int KH, int KW, int Ho, int Wo,
                    int sh, int sw, int ph, int pw, int dh, int dw, int groups, int DG, float* out) {
    dcn_direct_body<float>(x, offset, mask, weight, bias, N, C, H, W, OC, KH, KW, Ho, Wo, sh, sw, ph, pw, dh,
                           dw, groups, DG, out);
}

extern "C" __global__ void __launch_bounds__(256)
    dcn_direct_fp16(const qk_half* x, const qk_half* offset, const qk_half* mask, const qk_half* weight,
                    const qk_half* bias, int N, int C, int H, int W, int OC, int KH, int KW, int Ho, int Wo,
                    int sh, int sw, int ph, int pw, int dh, int dw, int groups, int DG, qk_half* out) {
    dcn_direct_body<qk_half>(x, offset, mask, weight, bias, N, C, H, W, OC, KH, KW, Ho, Wo, sh, sw, ph, pw,
                             dh, dw, groups, DG, out);
}
