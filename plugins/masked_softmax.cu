// MaskedSoftmax: probs[b, ..., q, k] = softmax over k of logits[b, ..., q, :], where keys with key_mask[b, k] set
// (padding) get probability 0 and a row whose keys are all padding is all zeros instead of NaN.
// A row belongs to a segment of LANES lanes of one warp, KEYS_PER_LANE keys per lane held in registers: a chunk of
// LANES * KEYS_PER_LANE keys costs one segment max, one exp per key and one rescale of the running sum, so rows up
// to that length are read once and written once; longer rows are re-read (L1/L2) to be written.
// Short rows would leave most of a warp idle and pay a full-warp max and sum each, so they are packed 32 / LANES to
// a warp: LANES = 8 for K <= 8 * KEYS_PER_LANE, 16 for K <= 16 * KEYS_PER_LANE, else 32. The choice is made here
// from K at run time rather than by the launcher, because in a TensorRT engine K varies within the profile while
// the PTX and the symbolic grid are fixed at build time: the grid always has one warp per row, and the blocks that
// packing leaves without rows exit at once.
// Accumulation in fp32 for fp16 inputs.
// Baked in by the launcher: ROWS_PER_BLOCK (warps per block), KEYS_PER_LANE.
#include "common.cuh"

template <int LANES, typename T>
__device__ __forceinline__ void softmax_rows(const T* __restrict__ logits, const unsigned char* __restrict__ key_mask,
                                             int rows, int rows_per_batch, int keys, T* __restrict__ probs) {
    constexpr int CHUNK = LANES * KEYS_PER_LANE;
    const int first_row = (blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32) * (32 / LANES);
    if (first_row >= rows) return;  // the whole warp leaves together, so the shuffles below see all 32 lanes
    const int lane = threadIdx.x % LANES;
    // A segment past the last row recomputes the last row, to take part in the shuffles, and writes nothing.
    const bool writes = first_row + (threadIdx.x % 32) / LANES < rows;
    const int row = writes ? first_row + (threadIdx.x % 32) / LANES : rows - 1;
    const T* x = logits + static_cast<size_t>(row) * keys;
    T* y = probs + static_cast<size_t>(row) * keys;
    const unsigned char* mask = key_mask + static_cast<size_t>(row / rows_per_batch) * keys;
    const float neg_inf = negative_infinity();

    float e[KEYS_PER_LANE];  // this lane's keys of the current chunk, then their exp(x - max); padding -> 0
    float max_v = neg_inf;   // segment-uniform
    float sum = 0.f;         // this lane's share, relative to max_v
    for (int start = 0; start < keys; start += CHUNK) {
        float chunk_max = neg_inf;
#pragma unroll
        for (int j = 0; j < KEYS_PER_LANE; ++j) {
            const int k = start + j * LANES + lane;
            e[j] = (k < keys && !mask[k]) ? to_float(x[k]) : neg_inf;
            chunk_max = fmaxf(chunk_max, e[j]);
        }
        const float new_max = fmaxf(max_v, warp_max<LANES>(chunk_max));
        // While every key so far is padding new_max is -inf: shifting by 0 then keeps exp(-inf) = 0 instead of NaN.
        const float shift = new_max == neg_inf ? 0.f : new_max;
        float chunk_sum = 0.f;
#pragma unroll
        for (int j = 0; j < KEYS_PER_LANE; ++j) {
            e[j] = expf(e[j] - shift);
            chunk_sum += e[j];
        }
        if (start > 0) sum *= expf(max_v - shift);
        sum += chunk_sum;
        max_v = new_max;
    }
    sum = warp_sum<LANES>(sum);
    const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
    if (!writes) return;

    if (keys <= CHUNK) {  // e still holds the whole row
#pragma unroll
        for (int j = 0; j < KEYS_PER_LANE; ++j) {
            const int k = j * LANES + lane;
            if (k < keys) y[k] = from_float<T>(e[j] * inv_sum);
        }
    } else {
        for (int k = lane; k < keys; k += LANES) {
            const float xk = mask[k] ? neg_inf : to_float(x[k]);
            y[k] = from_float<T>(xk == neg_inf ? 0.f : expf(xk - max_v) * inv_sum);
        }
    }
}

template <typename T>
__device__ __forceinline__ void masked_softmax(const T* logits, const unsigned char* key_mask, int rows,
                                               int rows_per_batch, int keys, T* probs) {
    if (keys <= 8 * KEYS_PER_LANE) {
        softmax_rows<8>(logits, key_mask, rows, rows_per_batch, keys, probs);
    } else if (keys <= 16 * KEYS_PER_LANE) {
        softmax_rows<16>(logits, key_mask, rows, rows_per_batch, keys, probs);
    } else {
        softmax_rows<32>(logits, key_mask, rows, rows_per_batch, keys, probs);
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
