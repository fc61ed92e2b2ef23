// The evaluation transform of a batch in two launches: Pillow BILINEAR resize (its integer arithmetic), /255,
// ImageNet mean/std, zero padding and the padding mask. grid.z = batch slot in both.
//   first_pass:  Pillow's first pass, once per intermediate pixel, rounded to uint8 into the slot's scratch.
//   second_pass: PIXELS_X padded output pixels a thread: the second pass over that scratch, normalisation, padding.
// The images are read where they are (the decoder's device buffer, or one copy of a host image), through a row
// pitch; the tables live in a device cache keyed by (input size, output size).
// Normalisation is a lookup in the CPU path's own table of (v / 255 - mean) / std for every uint8 level
// (runtime.preprocess.NORMALISED, 3 x 256 float32), so the values are the CPU path's by construction.
// Pixels 4 bytes apart (a Pillow image's own RGBX storage, and the scratch) are read as one 32-bit word each,
// one load where a 3-byte pixel takes three.

#define PRECISION_BITS 22

struct Slot {
    const unsigned char* pixels;  // in_h rows of in_w pixels (R, G, B, then pixel_bytes - 3 unused), `pitch` apart
    const int* xtab;              // out_w rows of [first, count, kx weights] (22-bit fixed point)
    const int* ytab;              // out_h rows of [first, count, ky weights]
    unsigned int* scratch;        // first pass, RGB0 words: in_h x out_w (horizontal first), else out_h x in_w
    long long pitch;
    int in_h, in_w, out_h, out_w, kx, ky;
    int vertical_first;           // Pillow's pass order for this size (its uint8 rounding sits between passes)
    int pixel_bytes;              // 3 (packed RGB) or 4 (RGBX, rows 4-byte aligned)
};

__device__ __forceinline__ int clip8(int sum) {
    return min(max(sum >> PRECISION_BITS, 0), 255);
}

// The three channel sums of one pass, each started at half a unit so that the shift rounds.
struct Sums {
    int r, g, b;
};

__device__ __forceinline__ Sums start() {
    const int half = 1 << (PRECISION_BITS - 1);
    return Sums{half, half, half};
}

__device__ __forceinline__ void add(Sums& a, unsigned int rgb0, int k) {
    a.r += (int)(rgb0 & 255u) * k;
    a.g += (int)((rgb0 >> 8) & 255u) * k;
    a.b += (int)((rgb0 >> 16) & 255u) * k;
}

// The pixel at p as an RGB0 word: one load when pixels are 4-byte words, else three.
__device__ __forceinline__ unsigned int pixel(const unsigned char* p, bool word) {
    if (word) return *(const unsigned int*)p & 0xFFFFFFu;
    return (unsigned int)p[0] | ((unsigned int)p[1] << 8) | ((unsigned int)p[2] << 16);
}

__device__ __forceinline__ unsigned int pack(const Sums& a) {
    return (unsigned int)clip8(a.r) | ((unsigned int)clip8(a.g) << 8) | ((unsigned int)clip8(a.b) << 16);
}

// BLOCK_THREADS, MIN_BLOCKS, PIXELS_X, PAIRED and STREAM_STORES come from runtime.gpu_preprocess.kernel_defines,
// which also sizes the grids.
#if !defined(BLOCK_THREADS) || !defined(MIN_BLOCKS) || !defined(PIXELS_X) || !defined(PAIRED) || !defined(STREAM_STORES)
#error "BLOCK_THREADS, MIN_BLOCKS, PIXELS_X, PAIRED and STREAM_STORES must be defined (runtime.gpu_preprocess.kernel_defines)"
#endif
#if PAIRED && PIXELS_X != 2
#error "PAIRED writes two neighbouring pixels a thread: PIXELS_X must be 2"
#endif

// The output planes and masks are written once and read only by the engine, later: with STREAM_STORES they are
// stored evict-first, so that they do not push the scratch and the input, still being read, out of L2.
#if STREAM_STORES
#define STORE(p, v) __stcs((p), (v))
#else
#define STORE(p, v) (*(p) = (v))
#endif

// One thread per intermediate pixel (x, y) of slot blockIdx.z; the grid covers the batch's largest intermediate.
extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, MIN_BLOCKS) first_pass(const Slot* __restrict__ slots) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    const Slot s = slots[blockIdx.z];
    const int cols = s.vertical_first ? s.in_w : s.out_w;
    const int rows = s.vertical_first ? s.out_h : s.in_h;
    if (x >= cols || y >= rows) return;
    const bool word = s.pixel_bytes == 4;
    Sums a = start();
    if (!s.vertical_first) {  // horizontal: input row y, taps along x
        const int* r = s.xtab + (size_t)x * (2 + s.kx);
        const unsigned char* p = s.pixels + (size_t)y * s.pitch + (size_t)r[0] * s.pixel_bytes;
        for (int i = 0; i < r[1]; ++i) add(a, pixel(p + i * s.pixel_bytes, word), r[2 + i]);
    } else {  // vertical: input column x, taps along y
        const int* r = s.ytab + (size_t)y * (2 + s.ky);
        const unsigned char* p = s.pixels + (size_t)r[0] * s.pitch + (size_t)x * s.pixel_bytes;
        for (int j = 0; j < r[1]; ++j) add(a, pixel(p + j * s.pitch, word), r[2 + j]);
    }
    s.scratch[(size_t)y * cols + x] = pack(a);
}

// Each thread writes PIXELS_X output pixels of one row from one read of the slot record and, for a vertical
// second pass, of the row's taps: the kernel was bound by the latency of those loads, not by memory bandwidth (ncu
// on the H200). The pixels are blockDim.x apart (a warp's scalar stores stay contiguous) or, with PAIRED,
// neighbours (x, x + 1), stored as one 8-byte float2 per plane where the batch width is even, so aligned.
__device__ __forceinline__ int column(int i) {
#if PAIRED
    return (blockIdx.x * blockDim.x + threadIdx.x) * PIXELS_X + i;
#else
    return blockIdx.x * blockDim.x * PIXELS_X + threadIdx.x + i * (int)blockDim.x;
#endif
}

extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, MIN_BLOCKS)
second_pass(const Slot* __restrict__ slots, const float* __restrict__ normalised, float* __restrict__ images,
            bool* __restrict__ masks, int height, int width) {
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (y >= height) return;
    const Slot s = slots[blockIdx.z];
    const size_t plane = (size_t)height * width;
    unsigned char* mask_row = (unsigned char*)masks + (size_t)blockIdx.z * plane + (size_t)y * width;
    float* out_row = images + 3 * (size_t)blockIdx.z * plane + (size_t)y * width;
    const bool inside_rows = y < s.out_h;
    Sums a[PIXELS_X];
#pragma unroll
    for (int i = 0; i < PIXELS_X; ++i) a[i] = start();
    if (inside_rows && !s.vertical_first) {  // vertical over the horizontally resampled rows (out_w wide)
        const int* r = s.ytab + (size_t)y * (2 + s.ky);
        const unsigned int* p = s.scratch + (size_t)r[0] * s.out_w;
        for (int j = 0; j < r[1]; ++j) {
            const int k = r[2 + j];
            const unsigned int* row = p + (size_t)j * s.out_w;
#pragma unroll
            for (int i = 0; i < PIXELS_X; ++i) {
                const int x = column(i);
                if (x < s.out_w) add(a[i], row[x], k);
            }
        }
    } else if (inside_rows) {  // horizontal over the vertically resampled rows (in_w wide)
#pragma unroll
        for (int i = 0; i < PIXELS_X; ++i) {
            const int x = column(i);
            if (x >= s.out_w) continue;
            const int* r = s.xtab + (size_t)x * (2 + s.kx);
            const unsigned int* p = s.scratch + (size_t)y * s.in_w + r[0];
            for (int t = 0; t < r[1]; ++t) add(a[i], p[t], r[2 + t]);
        }
    }
    float v[3][PIXELS_X];
    unsigned char pad[PIXELS_X];
#pragma unroll
    for (int i = 0; i < PIXELS_X; ++i) {
        const int x = column(i);
        pad[i] = !inside_rows || x >= s.out_w;
        v[0][i] = pad[i] ? 0.0f : normalised[clip8(a[i].r)];
        v[1][i] = pad[i] ? 0.0f : normalised[256 + clip8(a[i].g)];
        v[2][i] = pad[i] ? 0.0f : normalised[512 + clip8(a[i].b)];
    }
#if PAIRED
    const int x = column(0);
    if (x >= width) return;
    if ((width & 1) == 0) {  // x is even, and so is every row's and plane's start: 8-byte aligned pairs
        STORE((uchar2*)(mask_row + x), make_uchar2(pad[0], pad[1]));
        for (int c = 0; c < 3; ++c) STORE((float2*)(out_row + c * plane + x), make_float2(v[c][0], v[c][1]));
        return;
    }
#endif
#pragma unroll
    for (int i = 0; i < PIXELS_X; ++i) {
        const int x = column(i);
        if (x >= width) break;
        STORE(mask_row + x, pad[i]);
        for (int c = 0; c < 3; ++c) STORE(out_row + c * plane + x, v[c][i]);
    }
}
