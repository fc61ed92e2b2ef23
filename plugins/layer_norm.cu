// LayerNorm over the last axis: out = (x - mean) / sqrt(var + EPS) * gamma + beta, gamma/beta in fp32.
// One warp per row; the row stays in registers between the mean, the variance (two-pass, as stable as
// PyTorch's) and the output. Loads and stores move VEC elements at a time.
// Baked in by the launcher: CHANNELS, VEC (divides CHANNELS), EPS (float literal), ROWS_PER_BLOCK.
#include "common.cuh"

constexpr int CHUNK = 32 * VEC;
constexpr int ITERS = (CHANNELS + CHUNK - 1) / CHUNK;

template <typename T>
__device__ __forceinline__ void layer_norm(const T* __restrict__ x, const float* __restrict__ gamma,
                                           const float* __restrict__ beta, int rows, T* __restrict__ out) {
    const int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + static_cast<size_t>(row) * CHANNELS;
    T* yr = out + static_cast<size_t>(row) * CHANNELS;

    float v[ITERS][VEC];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
        const int c = i * CHUNK + lane * VEC;
        if (c < CHANNELS) {
            const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(xr + c);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                v[i][j] = to_float(p.v[j]);
                sum += v[i][j];
            }
        }
    }
    const float mean = warp_sum(sum) / CHANNELS;

    float squares = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
        if (i * CHUNK + lane * VEC < CHANNELS) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const float d = v[i][j] - mean;
                squares += d * d;
            }
        }
    }
    const float rstd = rsqrtf(warp_sum(squares) / CHANNELS + EPS);

#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
        const int c = i * CHUNK + lane * VEC;
        if (c < CHANNELS) {
            const Pack<float, VEC> g = *reinterpret_cast<const Pack<float, VEC>*>(gamma + c);
            const Pack<float, VEC> b = *reinterpret_cast<const Pack<float, VEC>*>(beta + c);
            Pack<T, VEC> y;
#pragma unroll
            for (int j = 0; j < VEC; ++j) y.v[j] = from_float<T>((v[i][j] - mean) * rstd * g.v[j] + b.v[j]);
            *reinterpret_cast<Pack<T, VEC>*>(yr + c) = y;
        }
    }
}

extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * 32)
layer_norm_f32(const float* x, const float* gamma, const float* beta, int rows, float* out) {
    layer_norm(x, gamma, beta, rows, out);
}

extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * 32)
layer_norm_f16(const __half* x, const float* gamma, const float* beta, int rows, __half* out) {
    layer_norm(x, gamma, beta, rows, out);
}
