// AddBiasTranspose: out[b, h, q, d] = (x[b, q, h * HEAD_DIM + d] + bias[h * HEAD_DIM + d]) * SCALE, i.e. a
// projection's bias, the 1/sqrt(head_dim) query scaling and the split into heads in one pass. Each thread
// writes VEC consecutive outputs (contiguous writes; reads are contiguous within a head, HEAD_DIM elements).
// Baked in by the launcher: CHANNELS, HEADS, VEC (divides CHANNELS / HEADS), SCALE (float literal).
#include "common.cuh"

constexpr int HEAD_DIM = CHANNELS / HEADS;
constexpr int PACKS_PER_HEAD = HEAD_DIM / VEC;

template <typename T>
__device__ __forceinline__ void add_bias_transpose(const T* __restrict__ x, const float* __restrict__ bias,
                                                   int queries, int packs, T* __restrict__ out) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x;  // index of the output pack
    if (o >= packs) return;
    const int d = (o % PACKS_PER_HEAD) * VEC;
    int rest = o / PACKS_PER_HEAD;
    const int q = rest % queries;
    rest /= queries;
    const int h = rest % HEADS;
    const int b = rest / HEADS;
    const int c = h * HEAD_DIM + d;

    const Pack<T, VEC> in =
        *reinterpret_cast<const Pack<T, VEC>*>(x + (static_cast<size_t>(b) * queries + q) * CHANNELS + c);
    const Pack<float, VEC> bb = *reinterpret_cast<const Pack<float, VEC>*>(bias + c);
    Pack<T, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) y.v[j] = from_float<T>((to_float(in.v[j]) + bb.v[j]) * SCALE);
    *reinterpret_cast<Pack<T, VEC>*>(out + static_cast<size_t>(o) * VEC) = y;
}

extern "C" __global__ void add_bias_transpose_f32(const float* x, const float* bias, int queries, int packs,
                                                  float* out) {
    add_bias_transpose(x, bias, queries, packs, out);
}

extern "C" __global__ void add_bias_transpose_f16(const __half* x, const float* bias, int queries, int packs,
                                                  __half* out) {
    add_bias_transpose(x, bias, queries, packs, out);
}
