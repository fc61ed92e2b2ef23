// Mask2Pos: feature mask (B, h, w), True = padding -> the 1-D sine embeddings of the normalised positions
//   pos_col[b, y] = (count of valid rows among mask[b, 0..y, 0] - 0.5) / (valid rows in mask[b, :, 0])
//   pos_row[b, x] = (count of valid columns among mask[b, 0, 0..x] - 0.5) / (valid columns in mask[b, 0, :])
//   emb[..., i] = sin(2*pi*pos / TEMPERATURE^(2*floor(i/2)/DIM)) for even i, cos(...) for odd i
// emb_col is (B, h, DIM), emb_row is (B, w, DIM). Grid: x = batch, y = chunks of POS_PER_BLOCK positions, the
// column chunks first, then the row chunks. Each block's first warp scans its whole mask line (h or w bytes,
// cheap) and keeps the counts of its own positions; then the block writes POS_PER_BLOCK * DIM features.
// Baked in by the launcher: DIM, POS_PER_BLOCK, TEMPERATURE (core.config.SINE_TEMPERATURE).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void mask2pos(const unsigned char* __restrict__ mask, int height, int width,
                                         T* __restrict__ emb_col, T* __restrict__ emb_row) {
    const int b = blockIdx.x;
    const int col_chunks = (height + POS_PER_BLOCK - 1) / POS_PER_BLOCK;
    const bool is_col = blockIdx.y < col_chunks;
    const int first = (is_col ? blockIdx.y : blockIdx.y - col_chunks) * POS_PER_BLOCK;
    const int n = is_col ? height : width;
    const int stride = is_col ? width : 1;  // mask[b, :, 0] or mask[b, 0, :]
    const unsigned char* line = mask + static_cast<size_t>(b) * height * width;
    T* out = is_col ? emb_col + static_cast<size_t>(b) * height * DIM : emb_row + static_cast<size_t>(b) * width * DIM;

    __shared__ float count[POS_PER_BLOCK];
    __shared__ float total;
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        int carry = 0;
        for (int start = 0; start < n; start += 32) {
            const int k = start + lane;
            int running = (k < n && !line[static_cast<size_t>(k) * stride]) ? 1 : 0;
#pragma unroll
            for (int offset = 1; offset < 32; offset <<= 1) {
                const int up = __shfl_up_sync(FULL_WARP, running, offset);
                if (lane >= offset) running += up;
            }
            if (k >= first && k < first + POS_PER_BLOCK && k < n) {
                count[k - first] = static_cast<float>(carry + running);
            }
            carry += __shfl_sync(FULL_WARP, running, 31);
        }
        if (lane == 0) total = static_cast<float>(carry);
    }
    __syncthreads();

    const float two_pi = 6.283185307179586f;
    for (int e = threadIdx.x; e < POS_PER_BLOCK * DIM; e += blockDim.x) {
        const int k = first + e / DIM;
        if (k >= n) break;  // e only grows, so every later k is out of range too
        const int i = e % DIM;
        const float pos = (count[e / DIM] - 0.5f) / total;
        const float period = powf(TEMPERATURE, static_cast<float>(2 * (i / 2)) / DIM);
        const float angle = pos * two_pi / period;
        out[static_cast<size_t>(k) * DIM + i] = from_float<T>((i & 1) ? cosf(angle) : sinf(angle));
    }
}

extern "C" __global__ void mask2pos_f32(const unsigned char* mask, int height, int width, float* emb_col,
                                        float* emb_row) {
    mask2pos(mask, height, width, emb_col, emb_row);
}

extern "C" __global__ void mask2pos_f16(const unsigned char* mask, int height, int width, __half* emb_col,
                                        __half* emb_row) {
    mask2pos(mask, height, width, emb_col, emb_row);
}
