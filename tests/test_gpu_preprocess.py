"""The GPU preprocessing kernel against the CPU path (runtime.preprocess.preprocess_batch): values, masks, slots."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.preprocess import NORMALISED, preprocess_batch

pytestmark = pytest.mark.gpu

MAX_HW = (1344, 1344)
# (H, W) of decoded images: upscale, antialiased downscale, 1xN, Nx1, extreme aspect, one pixel, COCO sizes.
AWKWARD = [(480, 640), (1800, 1200), (1, 37), (41, 1), (3000, 10), (10, 3000), (1, 1), (427, 640), (2000, 1990)]


@pytest.fixture(scope="module")
def gpu():
    from core import cuda
    from runtime.gpu_preprocess import GpuPreprocessor

    cuda.init()
    with GpuPreprocessor(max_batch=4, max_hw=MAX_HW) as pre:
        yield pre


def _run(gpu, images, batch_shape, pillow=False):
    """Upload `images` to slots 0.. (with `pillow`, as Pillow images through `load`: their own 4-byte pixels), run
    the kernel, return (images, masks, sizes) read back to the host."""
    from core import cuda

    sizes = [gpu.load(slot, Image.fromarray(image)) if pillow else gpu.upload(slot, image)
             for slot, image in enumerate(images)]
    b, h, w = batch_shape
    nbytes = b * 3 * h * w * 4
    with cuda.DeviceBuffer(nbytes + b * h * w) as out, cuda.PinnedBuffer(nbytes + b * h * w, np.uint8) as host:
        gpu.run(out.ptr, out.ptr + nbytes, batch_shape)
        out.download(host.array, gpu.stream)
        gpu.stream.synchronize()
        raw = host.array.copy()
    return raw[:nbytes].view(np.float32).reshape(b, 3, h, w), raw[nbytes:].view(bool).reshape(b, h, w), sizes


def _levels(values, channel):
    """uint8 levels back from normalised values (the table is increasing), to measure differences in uint8 steps."""
    return np.searchsorted(NORMALISED[channel], values).clip(0, 255)


def _compare(gpu, arrays, min_hw=None, pillow=False):
    expected, expected_masks, sizes = preprocess_batch([Image.fromarray(a, "RGB") for a in arrays],
                                                       min_hw=min_hw, max_hw=MAX_HW)
    images, masks, gpu_sizes = _run(gpu, arrays, (len(arrays), *expected.shape[2:]), pillow)
    assert gpu_sizes == [tuple(s) for s in sizes]
    np.testing.assert_array_equal(masks, expected_masks)
    steps = max(int(np.abs(_levels(images[:, c], c).astype(int) - _levels(expected[:, c], c)).max()) for c in range(3))
    differ = int((images != expected).sum())
    print(f"{[a.shape[:2] for a in arrays]}: {differ} values differ, at most {steps} uint8 step(s)")
    assert steps <= 1
    return differ


@pytest.mark.parametrize("pillow", [False, True], ids=["rgb-array", "pillow-image"])
@pytest.mark.parametrize("size", AWKWARD)
def test_kernel_equals_cpu_path_on_awkward_images(gpu, size, pillow):
    pixels = np.random.default_rng(size[0] + 3 * size[1]).integers(0, 256, (*size, 3), dtype=np.uint8)
    assert _compare(gpu, [pixels], pillow=pillow) == 0


@pytest.mark.parametrize("pillow", [False, True], ids=["rgb-array", "pillow-image"])
def test_kernel_equals_cpu_path_on_random_sizes_in_batches(gpu, pillow):
    rng = np.random.default_rng(11)
    differ = 0
    for _ in range(6):
        arrays = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in rng.integers(1, 1500, (4, 2))]
        differ += _compare(gpu, arrays, pillow=pillow)
    assert differ == 0


def test_padding_to_profile_minimum_and_slot_reuse(gpu):
    rng = np.random.default_rng(12)
    small = [rng.integers(0, 256, (12, 30, 3), dtype=np.uint8), rng.integers(0, 256, (30, 12, 3), dtype=np.uint8)]
    assert _compare(gpu, small, min_hw=(1344, 1344)) == 0  # padded far beyond both images; masks True there
    images, masks, sizes = _run(gpu, small[::-1], (2, 1344, 1344))  # same slots, new contents and sizes
    assert sizes == [(1332, 533), (533, 1332)]
    for slot, (h, w) in enumerate(sizes):
        assert not masks[slot, :h, :w].any() and masks[slot].sum() == 1344 * 1344 - h * w
    assert not images[masks[:, None].repeat(3, 1)].any()  # padding is zero


def test_bad_calls_are_refused(gpu):
    with pytest.raises(ValueError, match="slot 4"):
        gpu.upload(4, np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        gpu.upload(0, np.zeros((2, 2, 3), np.float32))
    gpu.upload(0, np.zeros((480, 640, 3), np.uint8))
    with pytest.raises(ValueError, match="larger than the batch"):
        gpu.run(0, 0, (1, 100, 100))
