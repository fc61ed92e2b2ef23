// AnchorDETR's post-processing on the device for raw engine outputs: per image, the top K of queries x classes
// by logit (equal logits by lowest flat index, as runtime/postprocess.py ranks them), their sigmoid scores, labels
// and boxes as normalised x0,y0,x1,y1: what an engine with the top-K inside it outputs. One block per image.
// 1. Radix select (4 passes of 8 bits over order-preserving keys) finds the K-th largest key T.
// 2. Each thread takes a contiguous run of indices; a block scan of its counts of keys > T and == T gives every
//    candidate its slot: all keys > T, then the lowest-index keys == T until K are taken.
// 3. K threads rank the K candidates by (key desc, index asc) and write their outputs.

#define THREADS 1024
#define KMAX 128

__device__ __forceinline__ unsigned order_key(float v) {
    const unsigned u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

extern "C" __global__ void __launch_bounds__(THREADS)
top_k(const float* __restrict__ logits, const float* __restrict__ boxes, int queries, int classes, int k,
      float* __restrict__ scores, int* __restrict__ labels, float* __restrict__ out_boxes) {
    __shared__ unsigned hist[256];
    __shared__ unsigned shared_prefix;
    __shared__ int shared_remaining;
    __shared__ unsigned long long scan[THREADS];
    __shared__ unsigned cand_key[KMAX];
    __shared__ int cand_index[KMAX];
    const int n = queries * classes;
    const int t = threadIdx.x;
    const float* x = logits + (size_t)blockIdx.x * n;

    unsigned prefix = 0, mask = 0;
    int remaining = k;  // how many of the keys matching `prefix` are still to take
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = t; i < 256; i += THREADS) hist[i] = 0;
        __syncthreads();
        for (int i = t; i < n; i += THREADS) {
            const unsigned key = order_key(x[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (t == 0) {
            int above = 0, d = 255;
            for (; d > 0; --d) {
                if (above + (int)hist[d] >= remaining) break;
                above += hist[d];
            }
            shared_prefix = prefix | ((unsigned)d << shift);
            shared_remaining = remaining - above;
        }
        __syncthreads();
        prefix = shared_prefix;
        remaining = shared_remaining;
        mask |= 255u << shift;
    }
    const unsigned threshold = prefix;  // the K-th largest key; `remaining` keys equal to it are taken
    const int greater = k - remaining;

    const int chunk = (n + THREADS - 1) / THREADS;
    const int begin = min(t * chunk, n), end = min(begin + chunk, n);
    unsigned gt = 0, eq = 0;
    for (int i = begin; i < end; ++i) {
        const unsigned key = order_key(x[i]);
        gt += key > threshold;
        eq += key == threshold;
    }
    const unsigned long long mine = ((unsigned long long)gt << 32) | eq;
    scan[t] = mine;
    __syncthreads();
    for (int offset = 1; offset < THREADS; offset <<= 1) {  // inclusive scan of both counts at once
        const unsigned long long add = t >= offset ? scan[t - offset] : 0ull;
        __syncthreads();
        scan[t] += add;
        __syncthreads();
    }
    const unsigned long long before = scan[t] - mine;
    unsigned gt_at = (unsigned)(before >> 32), eq_at = (unsigned)(before & 0xffffffffu);
    for (int i = begin; i < end; ++i) {
        const unsigned key = order_key(x[i]);
        if (key > threshold) {
            cand_key[gt_at] = key;
            cand_index[gt_at++] = i;
        } else if (key == threshold && (int)eq_at < remaining) {
            cand_key[greater + eq_at] = key;
            cand_index[greater + eq_at++] = i;
        } else if (key == threshold) {
            ++eq_at;
        }
    }
    __syncthreads();
    if (t < k) {
        const unsigned key = cand_key[t];
        const int index = cand_index[t];
        int rank = 0;
        for (int j = 0; j < k; ++j)
            rank += cand_key[j] > key || (cand_key[j] == key && cand_index[j] < index);
        const float v = x[index];
        // runtime.postprocess.sigmoid in float32: e = exp(-|v|), v >= 0 ? 1 / (1 + e) : e / (1 + e)
        const float e = expf(-fabsf(v));
        const float denominator = __fadd_rn(1.0f, e);
        const size_t out = (size_t)blockIdx.x * k + rank;
        scores[out] = __fdiv_rn(v >= 0.0f ? 1.0f : e, denominator);
        const int query = index / classes;
        labels[out] = index - query * classes;
        const float* b = boxes + ((size_t)blockIdx.x * queries + query) * 4;
        const float half_w = __fmul_rn(0.5f, b[2]), half_h = __fmul_rn(0.5f, b[3]);
        float* o = out_boxes + out * 4;
        o[0] = __fsub_rn(b[0], half_w);
        o[1] = __fsub_rn(b[1], half_h);
        o[2] = __fadd_rn(b[0], half_w);
        o[3] = __fadd_rn(b[1], half_h);
    }
}
