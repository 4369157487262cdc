// Shared device helpers for the qdqkit custom-op kernels.
//
// The sources are compiled three ways: by NVRTC at run time (the PyTorch path, through CuPy), by NVRTC or
// nvcc to PTX for TensorRT's ahead-of-time plugins, and by nvcc on a CPU machine as a compile check. None of
// these is guaranteed to see the CUDA headers, so half precision is handled here on raw 16-bit storage with
// inline PTX conversions instead of <cuda_fp16.h>.
#pragma once

typedef unsigned short qk_half;   // IEEE binary16 bits
typedef long long qk_i64;

__device__ __forceinline__ float qk_h2f(qk_half h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ qk_half qk_f2h(float f) {
    qk_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Element access that reads/writes float arithmetic values whatever the storage type.
__device__ __forceinline__ float qk_ld(const float* p) { return *p; }
__device__ __forceinline__ float qk_ld(const qk_half* p) { return qk_h2f(*p); }
__device__ __forceinline__ float qk_ld(const signed char* p) { return (float)*p; }
__device__ __forceinline__ void qk_st(float* p, float v) { *p = v; }
__device__ __forceinline__ void qk_st(qk_half* p, float v) { *p = qk_f2h(v); }

// A vector of N storage elements loaded or stored in one instruction when N*sizeof(T) is 4, 8 or 16 bytes.
template <typename T, int N>
struct alignas(sizeof(T) * N) QkVec {
    T v[N];
};

// Exact int8 -> fp32 for the four bytes of a 32-bit word without the conversion unit (I2F issues at an eighth of
// the FMA rate and bounds the INT8 kernels): byte b ^ 0x80 = x + 128 placed in the low mantissa bits of 2^23
// gives the float 2^23 + x + 128, and one subtraction leaves x (all exact in fp32). One LOP3 a word, then one
// PRMT and one FADD an element.
__device__ __forceinline__ void qk_i8x4_to_f32(unsigned int w, float* f) {
    const unsigned int u = w ^ 0x80808080u;
    unsigned int b0, b1, b2, b3;
    asm("prmt.b32 %0, %1, %2, 0x7650;" : "=r"(b0) : "r"(u), "r"(0x4B000000u));
    asm("prmt.b32 %0, %1, %2, 0x7651;" : "=r"(b1) : "r"(u), "r"(0x4B000000u));
    asm("prmt.b32 %0, %1, %2, 0x7652;" : "=r"(b2) : "r"(u), "r"(0x4B000000u));
    asm("prmt.b32 %0, %1, %2, 0x7653;" : "=r"(b3) : "r"(u), "r"(0x4B000000u));
    f[0] = __int_as_float((int)b0) - 8388736.0f;
    f[1] = __int_as_float((int)b1) - 8388736.0f;
    f[2] = __int_as_float((int)b2) - 8388736.0f;
    f[3] = __int_as_float((int)b3) - 8388736.0f;
}

// Converts N elements of storage type T to float, unpacking half pairs with one conversion pair each.
template <typename T, int N>
__device__ __forceinline__ void qk_unpack(const QkVec<T, N>& src, float* dst) {
    if constexpr (sizeof(T) == 1 && N % 4 == 0) {
        const unsigned int* w = reinterpret_cast<const unsigned int*>(&src);
#pragma unroll
        for (int k = 0; k < N / 4; ++k) qk_i8x4_to_f32(w[k], dst + 4 * k);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) dst[i] = qk_ld(&src.v[i]);
    }
}

template <typename T, int N>
__device__ __forceinline__ void qk_pack(const float* src, QkVec<T, N>& dst) {
#pragma unroll
    for (int i = 0; i < N; ++i) qk_st(&dst.v[i], src[i]);
}

// Reinterprets a float carried through an int32 launch argument (TensorRT's AOT ABI has integer extras only).
__device__ __forceinline__ float qk_bits_to_float(int bits) { return __int_as_float(bits); }

__device__ __forceinline__ signed char qk_quantize_i8(float v) {
    // QuantizeLinear semantics: round half to even, saturate to [-128, 127].
    float r = rintf(v);
    r = fminf(fmaxf(r, -128.0f), 127.0f);
    return (signed char)(int)r;
}

// Packed half2 arithmetic on raw 32-bit registers (sm_53+): two channels per instruction.
__device__ __forceinline__ unsigned int qk_h2_splat(float f) {
    const qk_half h = qk_f2h(f);
    unsigned int r;
    asm("mov.b32 %0, {%1, %1};" : "=r"(r) : "h"(h));
    return r;
}

__device__ __forceinline__ unsigned int qk_h2_fma(unsigned int a, unsigned int b, unsigned int c) {
    unsigned int d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ void qk_h2_to_f2(unsigned int v, float& lo, float& hi) {
    qk_half l, h;
    asm("mov.b32 {%0, %1}, %2;" : "=h"(l), "=h"(h) : "r"(v));
    lo = qk_h2f(l);
    hi = qk_h2f(h);
}

// Warp shuffles within aligned segments of `width` lanes (a power of two dividing 32). Every lane of the warp
// must execute them (full member mask).
__device__ __forceinline__ unsigned int qk_shfl_idx(unsigned int v, int src, int width) {
    unsigned int r;
    asm volatile("shfl.sync.idx.b32 %0, %1, %2, %3, 0xffffffff;" : "=r"(r) : "r"(v), "r"(src), "r"(((32 - width) << 8) | 0x1f));
    return r;
}

__device__ __forceinline__ float qk_shfl_xor(float v, int lane_mask, int width) {
    float r;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, %3, 0xffffffff;" : "=f"(r) : "f"(v), "r"(lane_mask), "r"(((32 - width) << 8) | 0x1f));
    return r;
}

// `base + index * stride_bytes` as one wide multiply-add (IMAD.WIDE.U32) for a non-negative 32-bit index: the
// gather address of a corner without sign extension and 64-bit shifts.
template <typename T>
__device__ __forceinline__ const T* qk_row_ptr(const T* base, int index, unsigned int stride_bytes) {
    return reinterpret_cast<const T*>(reinterpret_cast<const char*>(base) +
                                      (unsigned long long)(unsigned int)index * stride_bytes);
}
