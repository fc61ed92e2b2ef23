// The evaluation transform of a batch in two launches: Pillow BILINEAR resize (its integer arithmetic), /255,
// ImageNet mean/std, zero padding and the padding mask. grid.z = batch slot in both.
//   first_pass:  Pillow's first pass, once per intermediate pixel, rounded to uint8 into the slot's scratch.
//   second_pass: one thread per padded output pixel: the second pass over that scratch, normalisation, padding.
// The images are read where they are (the decoder's device buffer, or one copy of a host image), through a row
// pitch; the tables live in a device cache keyed by (input size, output size).
// Normalisation is a lookup in the CPU path's own table of (v / 255 - mean) / std for every uint8 level
// (runtime.preprocess.NORMALISED, 3 x 256 float32), so the values are the CPU path's by construction.
// Pixels 4 bytes apart (a Pillow image's own RGBX storage, and the scratch) are read as one 32-bit word each:
// the byte loads of 3-byte pixels were most of the second pass's instructions.

#define PRECISION_BITS 22

struct Slot {
    const unsigned char* pixels;  // in_h rows of in_w pixels (R, G, B, then pixel_bytes - 3 unused), `pitch` apart
    const int* xtab;              // out_w rows of [first, count, kx weights] (22-bit fixed point)
    const int* ytab;              // out_h rows of [first, count, ky weights]
    unsigned int* scratch;        // the first pass, one RGB0 word a pixel: in_h x out_w (horizontal first) or out_h x in_w
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

// One thread per intermediate pixel (x, y) of slot blockIdx.z; the grid covers the batch's largest intermediate.
extern "C" __global__ void first_pass(const Slot* __restrict__ slots) {
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

// One thread per padded output pixel: the second pass over the slot's scratch, normalised, or padding.
extern "C" __global__ void second_pass(const Slot* __restrict__ slots, const float* __restrict__ normalised,
                                       float* __restrict__ images, bool* __restrict__ masks, int height, int width) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= width || y >= height) return;
    const Slot s = slots[blockIdx.z];
    const size_t plane = (size_t)height * width;
    const size_t at = (size_t)blockIdx.z * plane + (size_t)y * width + x;
    float* out = images + 3 * (size_t)blockIdx.z * plane + (size_t)y * width + x;
    const bool pad = x >= s.out_w || y >= s.out_h;
    masks[at] = pad;
    if (pad) {
        out[0] = out[plane] = out[2 * plane] = 0.0f;
        return;
    }
    Sums a = start();
    if (!s.vertical_first) {  // vertical over the horizontally resampled rows (out_w wide)
        const int* r = s.ytab + (size_t)y * (2 + s.ky);
        const unsigned int* p = s.scratch + (size_t)r[0] * s.out_w + x;
        for (int j = 0; j < r[1]; ++j) add(a, p[(size_t)j * s.out_w], r[2 + j]);
    } else {  // horizontal over the vertically resampled rows (in_w wide)
        const int* r = s.xtab + (size_t)x * (2 + s.kx);
        const unsigned int* p = s.scratch + (size_t)y * s.in_w + r[0];
        for (int i = 0; i < r[1]; ++i) add(a, p[i], r[2 + i]);
    }
    out[0] = normalised[clip8(a.r)];
    out[plane] = normalised[256 + clip8(a.g)];
    out[2 * plane] = normalised[512 + clip8(a.b)];
}
