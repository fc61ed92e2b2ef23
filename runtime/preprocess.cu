// The evaluation transform of a batch in two launches: Pillow BILINEAR resize (its integer arithmetic), /255,
// ImageNet mean/std, zero padding and the padding mask. grid.z = batch slot in both.
//   first_pass:  Pillow's first pass, once per intermediate pixel, rounded to uint8 into the slot's scratch.
//   second_pass: one thread per padded output pixel: the second pass over that scratch, normalisation, padding.
// The images are read where they are (the decoder's device buffer, or one copy of a host image), through a row
// pitch; the tables live in a device cache keyed by (input size, output size).
// Normalisation is a lookup in the CPU path's own table of (v / 255 - mean) / std for every uint8 level
// (runtime.preprocess.NORMALISED, 3 x 256 float32), so the values are the CPU path's by construction.

#define PRECISION_BITS 22

struct Slot {
    const unsigned char* pixels;  // in_h rows of in_w x 3 bytes (RGB), `pitch` bytes apart
    const int* xtab;              // out_w rows of [first, count, kx weights] (22-bit fixed point)
    const int* ytab;              // out_h rows of [first, count, ky weights]
    unsigned char* scratch;       // the first pass: in_h x out_w x 3 (horizontal first) or out_h x in_w x 3
    long long pitch;
    int in_h, in_w, out_h, out_w, kx, ky;
    int vertical_first;           // Pillow's pass order for this size (its uint8 rounding sits between passes)
    int unused;
};

__device__ __forceinline__ int clip8(int sum) {
    return min(max(sum >> PRECISION_BITS, 0), 255);
}

// One thread per intermediate pixel (x, y) of slot blockIdx.z; the grid covers the batch's largest intermediate.
extern "C" __global__ void first_pass(const Slot* __restrict__ slots) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    const Slot s = slots[blockIdx.z];
    const int cols = s.vertical_first ? s.in_w : s.out_w;
    const int rows = s.vertical_first ? s.out_h : s.in_h;
    if (x >= cols || y >= rows) return;
    const int half = 1 << (PRECISION_BITS - 1);
    int a0 = half, a1 = half, a2 = half;
    if (!s.vertical_first) {  // horizontal: input row y, taps along x
        const int* r = s.xtab + (size_t)x * (2 + s.kx);
        const unsigned char* p = s.pixels + (size_t)y * s.pitch + (size_t)r[0] * 3;
        for (int i = 0; i < r[1]; ++i) {
            const int k = r[2 + i];
            a0 += p[3 * i] * k;
            a1 += p[3 * i + 1] * k;
            a2 += p[3 * i + 2] * k;
        }
    } else {  // vertical: input column x, taps along y
        const int* r = s.ytab + (size_t)y * (2 + s.ky);
        const unsigned char* p = s.pixels + (size_t)r[0] * s.pitch + (size_t)x * 3;
        for (int j = 0; j < r[1]; ++j) {
            const int k = r[2 + j];
            a0 += p[j * s.pitch] * k;
            a1 += p[j * s.pitch + 1] * k;
            a2 += p[j * s.pitch + 2] * k;
        }
    }
    unsigned char* out = s.scratch + ((size_t)y * cols + x) * 3;
    out[0] = (unsigned char)clip8(a0);
    out[1] = (unsigned char)clip8(a1);
    out[2] = (unsigned char)clip8(a2);
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
    const int half = 1 << (PRECISION_BITS - 1);
    int a0 = half, a1 = half, a2 = half;
    if (!s.vertical_first) {  // vertical over the horizontally resampled rows (out_w wide)
        const int* r = s.ytab + (size_t)y * (2 + s.ky);
        const unsigned char* p = s.scratch + ((size_t)r[0] * s.out_w + x) * 3;
        const size_t stride = (size_t)s.out_w * 3;
        for (int j = 0; j < r[1]; ++j) {
            const int k = r[2 + j];
            a0 += p[j * stride] * k;
            a1 += p[j * stride + 1] * k;
            a2 += p[j * stride + 2] * k;
        }
    } else {  // horizontal over the vertically resampled rows (in_w wide)
        const int* r = s.xtab + (size_t)x * (2 + s.kx);
        const unsigned char* p = s.scratch + ((size_t)y * s.in_w + r[0]) * 3;
        for (int i = 0; i < r[1]; ++i) {
            const int k = r[2 + i];
            a0 += p[3 * i] * k;
            a1 += p[3 * i + 1] * k;
            a2 += p[3 * i + 2] * k;
        }
    }
    out[0] = normalised[clip8(a0)];
    out[plane] = normalised[256 + clip8(a1)];
    out[2 * plane] = normalised[512 + clip8(a2)];
}
