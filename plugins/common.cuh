// Shared by the anchortrt plugin kernels: fp32/fp16 element access with fp32 arithmetic, vector packs, warp sums.
// Kernels are templates on the element type T (float or __half) behind extern "C" entry points, because
// TensorRT's AOT plugins look kernels up by their PTX name.
#pragma once
#include <cuda_fp16.h>

#define FULL_WARP 0xffffffffu

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// N consecutive elements moved as one aligned access (the caller guarantees the alignment).
template <typename T, int N> struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

// Reductions over aligned segments of WIDTH lanes (a power of two up to 32): xor offsets below WIDTH never leave the
// segment, so every segment of the warp gets its own result. All 32 lanes must call them.
template <int WIDTH = 32> __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = WIDTH / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_WARP, v, offset);
    return v;
}

template <int WIDTH = 32> __device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = WIDTH / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_WARP, v, offset));
    return v;
}

__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000); }
