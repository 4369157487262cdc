// Rotate (BEVFormer's RotateTRT / RotateTRT2 plugin maths; torchvision rotate with fill 0).
//
//   img [C,H,W], angle 0-d (degrees, counter-clockwise), center [2] (pixel x, y), mode 0 bilinear / 1 nearest
//   -> out [C,H,W]
//
// For output pixel (h, w): x = w - W/2 + 0.5, y = h - H/2 + 0.5, theta = -angle*pi/180, c' = center - (W/2, H/2);
// source xs = cos*(x - cx') + sin*(y - cy') + cx', ys = -sin*(x - cx') + cos*(y - cy') + cy', read at
// (xs + W/2 - 0.5, ys + H/2 - 0.5) with zero fill. Nearest rounds halves away from zero, as the fp32 plugin kernel (C round); PyTorch rounds them to even.
//
// Parameter order is TensorRT's AOT plugin ABI (inputs, int32 extras, outputs). Angle and centre have the
// image's type, as the TRT2 plugin takes them for fp32/fp16.
//
// Work split: a thread per output pixel and per chunk of RC channels (grid.y walks the chunks), so the
// source coordinates are computed once per chunk and every store of a warp is one contiguous row segment.
#include "common.cuh"

#define QK_ROTATE_RC 8

template <typename T>
__device__ __forceinline__ void rotate_body(const T* __restrict__ img, const T* __restrict__ angle,
                                            const T* __restrict__ center, int C, int H, int W, int mode,
                                            T* __restrict__ out) {
    const int pix = blockIdx.x * blockDim.x + threadIdx.x;
    const int HW = H * W;
    if (pix >= HW) return;
    const int c_begin = blockIdx.y * QK_ROTATE_RC;
    const int c_end = min(C, c_begin + QK_ROTATE_RC);
    const int h = pix / W, w = pix - (pix / W) * W;

    float s, co;
    // sincospi keeps the degree-to-radian conversion exact for the common multiples of 90 degrees.
    sincospif(-qk_ld(angle) / 180.f, &s, &co);
    const float cxp = qk_ld(center) - 0.5f * W;
    const float cyp = qk_ld(center + 1) - 0.5f * H;
    const float x = (float)w - 0.5f * W + 0.5f - cxp;
    const float y = (float)h - 0.5f * H + 0.5f - cyp;
    const float ix = co * x + s * y + cxp + 0.5f * W - 0.5f;
    const float iy = -s * x + co * y + cyp + 0.5f * H - 0.5f;

    if (mode == 1) {
        const float rx = roundf(ix), ry = roundf(iy);
        const bool inside = rx >= 0.f && ry >= 0.f && rx <= (float)(W - 1) && ry <= (float)(H - 1);
        const long long src = inside ? (long long)ry * W + (long long)rx : 0;
        for (int c = c_begin; c < c_end; ++c) {
            const long long base = (long long)c * HW;
            out[base + pix] = inside ? img[base + src] : T(0);
        }
        return;
    }
    const float fx = floorf(ix), fy = floorf(iy);
    const float lx = ix - fx, ly = iy - fy;
    const float wgt[4] = {(1.f - ly) * (1.f - lx), (1.f - ly) * lx, ly * (1.f - lx), ly * lx};
    long long idx[4];
    bool ok[4];
    const int x0 = (int)fmaxf(fminf(fx, 1e9f), -1e9f), y0 = (int)fmaxf(fminf(fy, 1e9f), -1e9f);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int yy = y0 + (k >> 1), xx = x0 + (k & 1);
        ok[k] = yy >= 0 && yy < H && xx >= 0 && xx < W;
        idx[k] = ok[k] ? (long long)yy * W + xx : 0;
    }
    for (int c = c_begin; c < c_end; ++c) {
        const long long base = (long long)c * HW;
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k)
            if (ok[k]) acc = fmaf(wgt[k], qk_ld(img + base + idx[k]), acc);
        qk_st(out + base + pix, acc);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    rotate_fp32(const float* img, const float* angle, const float* center, int C, int H, int W, int mode,
                float* out) {
    rotate_body<float>(img, angle, center, C, H, W, mode, out);
}

extern "C" __global__ void __launch_bounds__(256)
    rotate_fp16(const qk_half* img, const qk_half* angle, const qk_half* center, int C, int H, int W,
                int mode, qk_half* out) {
    rotate_body<qk_half>(img, angle, center, C, H, W, mode, out);
}
