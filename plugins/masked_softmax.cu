// MaskedSoftmax: probs[b, ..., q, k] = softmax over k of logits[b, ..., q, :], where keys with key_mask[b, k] set
// (padding) get probability 0 and a row whose keys are all padding is all zeros instead of NaN.
// One warp per row, KEYS_PER_LANE keys per lane held in registers: a chunk of 32 * KEYS_PER_LANE keys costs one
// warp max, one exp per key and one rescale of the running sum, so rows up to that length (every feature-map
// side up to 32 * KEYS_PER_LANE) are read once and written once; longer rows are re-read (L1/L2) to be written.
// Accumulation in fp32 for fp16 inputs.
// Baked in by the launcher: ROWS_PER_BLOCK (warps per block), KEYS_PER_LANE.
#include "common.cuh"

constexpr int CHUNK = 32 * KEYS_PER_LANE;

template <typename T>
__device__ __forceinline__ void masked_softmax(const T* __restrict__ logits, const unsigned char* __restrict__ key_mask,
                                               int rows, int rows_per_batch, int keys, T* __restrict__ probs) {
    const int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;  // the whole warp leaves together, so the shuffles below stay full-warp
    const T* x = logits + static_cast<size_t>(row) * keys;
    T* y = probs + static_cast<size_t>(row) * keys;
    const unsigned char* mask = key_mask + static_cast<size_t>(row / rows_per_batch) * keys;
    const float neg_inf = negative_infinity();

    float v[KEYS_PER_LANE];  // padded keys and keys past the row hold -inf
    float max_v = neg_inf;   // warp-uniform
    float sum = 0.f;         // this lane's share, relative to max_v
    for (int start = 0; start < keys; start += CHUNK) {
        float chunk_max = neg_inf;
#pragma unroll
        for (int j = 0; j < KEYS_PER_LANE; ++j) {
            const int k = start + j * 32 + lane;
            v[j] = (k < keys && !mask[k]) ? to_float(x[k]) : neg_inf;
            chunk_max = fmaxf(chunk_max, v[j]);
        }
        const float new_max = fmaxf(max_v, warp_max(chunk_max));
        if (new_max == neg_inf) continue;  // no valid key yet
        float chunk_sum = 0.f;
#pragma unroll
        for (int j = 0; j < KEYS_PER_LANE; ++j) chunk_sum += expf(v[j] - new_max);
        sum = sum * expf(max_v - new_max) + chunk_sum;
        max_v = new_max;
    }
    sum = warp_sum(sum);
    const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;

    if (keys <= CHUNK) {  // the row is still in registers
#pragma unroll
        for (int j = 0; j < KEYS_PER_LANE; ++j) {
            const int k = j * 32 + lane;
            if (k < keys) y[k] = from_float<T>(v[j] == neg_inf ? 0.f : expf(v[j] - max_v) * inv_sum);
        }
    } else {
        for (int k = lane; k < keys; k += 32) {
            const float xk = mask[k] ? neg_inf : to_float(x[k]);
            y[k] = from_float<T>(xk == neg_inf ? 0.f : expf(xk - max_v) * inv_sum);
        }
    }
}

extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * 32)
masked_softmax_f32(const float* logits, const unsigned char* key_mask, int rows, int rows_per_batch, int keys,
                   float* probs) {
    masked_softmax(logits, key_mask, rows, rows_per_batch, keys, probs);
}

extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * 32)
masked_softmax_f16(const __half* logits, const unsigned char* key_mask, int rows, int rows_per_batch, int keys,
                   __half* probs) {
    masked_softmax(logits, key_mask, rows, rows_per_batch, keys, probs);
}
