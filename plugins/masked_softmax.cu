// MaskedSoftmax: probs[b, ..., q, k] = softmax over k of logits[b, ..., q, :], where keys with key_mask[b, k] set
// (padding) get probability 0 and a row whose keys are all padding is all zeros instead of NaN.
// One warp per row; pass 1 keeps a per-lane running (max, sum) so each logit is read once from DRAM, pass 2
// re-reads the row (now in L1/L2) to write. Accumulation in fp32 for fp16 inputs.
// Baked in by the launcher: ROWS_PER_BLOCK (warps per block).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void masked_softmax(const T* __restrict__ logits, const unsigned char* __restrict__ key_mask,
                                               int rows, int rows_per_batch, int keys, T* __restrict__ probs) {
    const int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;  // the whole warp leaves together, so the shuffles below stay full-warp
    const size_t base = static_cast<size_t>(row) * keys;
    const unsigned char* mask = key_mask + static_cast<size_t>(row / rows_per_batch) * keys;

    float max_v = negative_infinity();
    float sum = 0.f;
    for (int k = lane; k < keys; k += 32) {
        if (mask[k]) continue;
        const float v = to_float(logits[base + k]);
        if (v > max_v) {
            sum = sum * expf(max_v - v) + 1.f;
            max_v = v;
        } else if (v != negative_infinity()) {
            sum += expf(v - max_v);
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other_max = __shfl_xor_sync(FULL_WARP, max_v, offset);
        const float other_sum = __shfl_xor_sync(FULL_WARP, sum, offset);
        const float new_max = fmaxf(max_v, other_max);
        if (new_max != negative_infinity()) sum = sum * expf(max_v - new_max) + other_sum * expf(other_max - new_max);
        max_v = new_max;
    }

    const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
    for (int k = lane; k < keys; k += 32) {
        const float p = mask[k] ? 0.f : expf(to_float(logits[base + k]) - max_v) * inv_sum;
        probs[base + k] = from_float<T>(p);
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
