"""On a GPU: nvImageCodec against Pillow, the per-image fallback, a corrupt file alone, the kernel reading the
decoder's buffers in place, and the device top-100 against the host's post-processing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from runtime.postprocess import postprocess
from runtime.preprocess import ImageError, preprocess_batch, to_rgb

pytestmark = pytest.mark.gpu
MAX_HW = (1344, 1344)


def jpeg(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def photo_like(rng, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def decoder():
    pytest.importorskip("nvidia.nvimgcodec")
    from core import cuda
    from runtime.decode import BatchDecoder

    cuda.init()
    with BatchDecoder(exif=True) as d:
        yield d


@pytest.fixture(scope="module")
def files():
    rng = np.random.default_rng(5)
    sizes = [(480, 640), (427, 640), (640, 480), (333, 500), (1200, 1600), (61, 83)]
    good = [jpeg(photo_like(rng, h, w), quality=90) for h, w in sizes]
    png = io.BytesIO()
    Image.fromarray(photo_like(rng, 100, 120)).convert("P").save(png, "PNG")
    return good, png.getvalue()


def test_hardware_decoder_is_within_one_level_of_pillow(decoder, files):
    from runtime.decode import DeviceImage

    good, _ = files
    out = decoder.decode(good)
    assert all(isinstance(image, DeviceImage) for image in out), out
    differ = total = 0
    for data, image in zip(good, out):
        expected = np.asarray(to_rgb(Image.open(io.BytesIO(data))), dtype=np.int16)
        got = np.asarray(image.to_pil(), dtype=np.int16)
        assert got.shape == expected.shape and image.pitch >= image.width * 3
        assert int(np.abs(got - expected).max()) <= 1
        differ, total = differ + int((got != expected).sum()), total + got.size
    print(f"nvImageCodec vs Pillow: {differ} of {total} values differ by one level")


def test_fallback_and_a_corrupt_file_inside_a_batch(decoder, files):
    from runtime.decode import DeviceImage

    good, png = files
    truncated = good[0][: len(good[0]) // 3]
    garbage = good[1][:600] + bytes(range(256)) * 40 + b"\xff\xd9"  # a JPEG header, then noise, then EOI
    batch = [good[0], png, truncated, garbage, good[2]]
    out = decoder.decode(batch, ["a.jpg", "b.png", "c.jpg", "d.jpg", "e.jpg"])
    assert isinstance(out[0], DeviceImage) and isinstance(out[4], DeviceImage)
    assert isinstance(out[1], Image.Image)  # the palette PNG went to Pillow
    assert isinstance(out[2], ImageError) and str(out[2]).startswith("c.jpg")
    # The noise file: whatever nvImageCodec or Pillow make of it, it stays this file's result alone.
    assert isinstance(out[3], (ImageError, DeviceImage, Image.Image))
    np.testing.assert_array_equal(np.asarray(out[1].convert("RGB")),
                                  np.asarray(to_rgb(Image.open(io.BytesIO(png)))))


def test_kernel_reads_decoded_images_in_place_and_equals_the_cpu_path_on_those_pixels(decoder, files):
    from core import cuda
    from runtime.gpu_preprocess import GpuPreprocessor

    good, _ = files
    decoded = decoder.decode(good[:4])
    rgb = [image.to_pil() for image in decoded]  # the decoder's own pixels, on the host
    expected, expected_masks, sizes = preprocess_batch(rgb, exif=False, max_hw=MAX_HW)
    b, _, h, w = expected.shape
    nbytes = b * 3 * h * w * 4
    with GpuPreprocessor(max_batch=4, max_hw=MAX_HW) as pre, cuda.DeviceBuffer(nbytes + b * h * w) as out, \
            cuda.PinnedBuffer(nbytes + b * h * w, np.uint8) as host:
        got_sizes = [pre.place(slot, i.ptr, i.height, i.width, i.pitch, owner=i) for slot, i in enumerate(decoded)]
        pre.run(out.ptr, out.ptr + nbytes, (b, h, w))
        out.download(host.array, pre.stream)
        pre.stream.synchronize()
        raw = host.array.copy()
    assert got_sizes == [tuple(s) for s in sizes]
    np.testing.assert_array_equal(raw[:nbytes].view(np.float32).reshape(b, 3, h, w), expected)
    np.testing.assert_array_equal(raw[nbytes:].view(bool).reshape(b, h, w), expected_masks)


def _raw_outputs(rng, batch, queries=900, classes=91):
    logits = rng.standard_normal((batch, queries, classes)).astype(np.float32) * 3
    logits[0, :5, :4] = logits[0, 0, 0] = 9.5  # equal logits at the top: ranked by lowest flat index
    logits[1 % batch, 100:400, 7] = 4.0  # many equal logits across the 100th place
    boxes = rng.uniform(0.05, 0.95, (batch, queries, 4)).astype(np.float32)
    return logits, boxes


def _assert_same_detections(got: dict, logits, boxes, sizes):
    from runtime.postprocess import from_engine_outputs

    host = postprocess(logits, boxes, sizes)
    device = from_engine_outputs(got["scores"], got["labels"], got["boxes"], sizes)
    for h, d in zip(host, device):
        np.testing.assert_array_equal(d["labels"], h["labels"])
        np.testing.assert_array_equal(d["boxes"], h["boxes"])
        np.testing.assert_allclose(d["scores"], h["scores"], rtol=2.4e-7, atol=0)  # expf vs NumPy's exp: 2 ulp


def test_device_top_k_equals_the_host_post_processing():
    from core import cuda
    from runtime.gpu_postprocess import DeviceTopK

    cuda.init()
    rng = np.random.default_rng(3)
    logits, boxes = _raw_outputs(rng, 3)
    sizes = np.array([(480, 640), (800, 600), (33, 1000)])
    with DeviceTopK(max_batch=4) as top, cuda.DeviceBuffer(logits.nbytes) as dl, \
            cuda.DeviceBuffer(boxes.nbytes) as db:
        dl.upload(logits, top.stream)
        db.upload(boxes, top.stream)
        top.run(dl.ptr, db.ptr, 3, 900, 91)
        top.stream.synchronize()
        got = top.outputs()
    _assert_same_detections(got, logits, boxes, sizes)


def test_torch_top_k_equals_the_host_post_processing():
    """The reference's device top-100, then its download through pinned memory, waited for only when read."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA GPU")
    from runtime.gpu_postprocess import torch_download, torch_top_k

    rng = np.random.default_rng(4)
    logits, boxes = _raw_outputs(rng, 2)
    top = torch_top_k(torch, torch.from_numpy(logits).cuda(), torch.from_numpy(boxes).cuda())
    assert all(t.is_cuda for t in top.values())  # nothing left the device yet
    got = torch_download(torch, top)()
    _assert_same_detections(got, logits, boxes, np.array([(480, 640), (640, 480)]))
