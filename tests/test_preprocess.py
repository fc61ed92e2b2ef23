"""runtime.preprocess against independent formulations: exact size rule, normalisation, image modes, EXIF, padding."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import PIL
import pytest
from PIL import Image

from runtime.gpu_preprocess import bilinear_coefficients, pillow_bilinear, vertical_first
from runtime.preprocess import (
    MEAN,
    STD,
    ImageError,
    ShapeError,
    decode_many,
    load_image,
    normalize,
    pad_batch,
    preprocess_batch,
    preprocess_image,
    output_hw,
    resized_hw,
    to_rgb,
)


def exact_size(width, height, short=800, longest=1333):
    """The size rule in exact rational arithmetic: (height, width)."""
    lo, hi = min(width, height), max(width, height)
    if Fraction(hi, lo) * short > longest:
        # Python rounds halves to even, as round() on floats does; at least one pixel (our documented deviation)
        short = max(1, round(Fraction(longest * lo, hi)))
    scaled = (short * Fraction(max(width, height), min(width, height))).__floor__()
    return (scaled, short) if width < height else (short, scaled)


def reference_preprocess(image: Image.Image) -> np.ndarray:
    """PIL bilinear resize to the exact size, then normalisation in float64."""
    height, width = exact_size(*image.size)
    pixels = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR), dtype=np.float64)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((pixels / 255 - mean) / std).transpose(2, 0, 1)


ODD_SIZES = [(640, 480), (480, 640), (333, 501), (1, 1), (799, 801), (800, 1333), (1333, 800), (801, 1335),
             (500, 375), (427, 640), (3, 7), (1000, 1000), (2000, 100), (100, 2000), (1919, 1081), (4000, 3)]


@pytest.mark.parametrize("size", ODD_SIZES)
def test_size_rule_matches_exact_arithmetic(size):
    width, height = size
    assert resized_hw(height, width) == exact_size(width, height)


def test_size_rule_on_many_random_sizes():
    rng = np.random.default_rng(0)
    for width, height in rng.integers(1, 5000, (2000, 2)):
        assert resized_hw(int(height), int(width)) == exact_size(int(width), int(height)), (width, height)


def test_size_rule_known_values():
    # (height, width) in, (height, width) out
    assert resized_hw(480, 640) == (800, 1066)  # the common COCO landscape size
    assert resized_hw(640, 480) == (1066, 800)
    assert resized_hw(400, 1000) == (533, 1332)  # capped: round(1333 * 400 / 1000) = 533, int(533 * 2.5)
    assert resized_hw(2000, 100) == (1340, 67)  # the rounding lets the long side pass 1333
    assert output_hw(480, 640, (700, 1344)) == (700, 932)  # then scaled to fit a profile maximum


def test_size_rule_never_gives_zero():
    assert resized_hw(1, 5000) == (1, 5000)  # the official rule would give a zero height here


@pytest.mark.parametrize("size", [(96, 128), (131, 97), (256, 320)])
def test_preprocess_matches_independent_formulation(size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    ours = preprocess_image(image)
    reference = reference_preprocess(image)
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=2e-6, rtol=0)


def test_fit_within_profile_maximum():
    image = Image.new("RGB", (30, 900), (10, 20, 30))  # official size 1320x44: fits; 1x5000 would not
    assert preprocess_image(image, max_hw=(1344, 1344)).shape == (3, 1320, 44)
    long = Image.new("RGB", (2, 3000), (10, 20, 30))
    assert preprocess_image(long).shape[1] > 1344
    out = preprocess_image(long, max_hw=(1344, 1344))
    assert out.shape[1] <= 1344 and out.shape[2] >= 1


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("L", (8, 6), 77), (77, 77, 77)),
        (lambda: Image.new("1", (8, 6), 1), (255, 255, 255)),
        (lambda: Image.new("RGB", (8, 6), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE), (10, 200, 30)),
        (lambda: Image.new("RGBA", (8, 6), (10, 200, 30, 255)), (10, 200, 30)),
        (lambda: Image.new("RGBA", (8, 6), (10, 200, 30, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("RGBA", (8, 6), (0, 0, 0, 128)), (127, 127, 127)),  # half over white
        (lambda: Image.new("LA", (8, 6), (0, 0)), (255, 255, 255)),
        (lambda: Image.new("CMYK", (8, 6), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.new("I;16", (8, 6), 65535), (255, 255, 255)),
        (lambda: Image.new("I;16", (8, 6), 32896), (128, 128, 128)),  # 16-bit mid grey, not clipped white
        (lambda: Image.new("I", (8, 6), 51400), (200, 200, 200)),
        (lambda: Image.new("I", (8, 6), 200), (200, 200, 200)),  # 8-bit range kept
        (lambda: Image.new("F", (8, 6), 0.5), (128, 128, 128)),
        (lambda: Image.new("RGB", (8, 6), (90, 60, 30)).convert("YCbCr"), (88, 60, 27)),  # Pillow's own conversion
    ],
)
def test_every_mode_becomes_rgb(make, expected):
    image = make()
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    np.testing.assert_allclose(np.asarray(rgb).reshape(-1, 3), np.tile(expected, (48, 1)), atol=1)
    assert preprocess_image(image).shape == (3, 800, 1066)


def test_palette_transparency_and_16bit_big_endian():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0  # index 0 transparent
    rgb = np.asarray(to_rgb(palette))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[1, 1].tolist() == [200, 10, 10]
    big = Image.frombytes("I;16B", (2, 1), np.array([0, 65535], dtype=">u2").tobytes())
    assert np.asarray(to_rgb(big))[0, :, 0].tolist() == [0, 255]


def _exif_png(orientation):
    # 3x2 image: left column red, others blue, stored unrotated with an orientation tag.
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[:, :, 2] = 255
    pixels[:, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", exif=exif)
    buffer.seek(0)
    return Image.open(buffer)


def test_exif_orientation_applied():
    rotated = np.asarray(to_rgb(_exif_png(6)))  # 6: display rotated 90 degrees clockwise
    assert rotated.shape == (3, 2, 3)
    assert rotated[0].tolist() == [[255, 0, 0], [255, 0, 0]]  # the red left column is now the top row
    assert rotated[1:, :, 2].min() == 255
    stored = np.asarray(to_rgb(_exif_png(6), exif=False))
    assert stored.shape == (2, 3, 3) and stored[:, 0, 0].tolist() == [255, 255]
    assert preprocess_image(_exif_png(6)).shape == (3, 1200, 800)  # portrait after rotation


@pytest.mark.parametrize("orientation", [None, 1, 0, 9])
def test_an_image_that_needs_no_turn_is_used_as_it_is(orientation):
    """No orientation tag, 1 (upright) or a value outside 1..8: the decoded image itself, not a copy of it."""
    image = _exif_png(orientation) if orientation is not None else Image.new("RGB", (3, 2), (9, 8, 7))
    assert to_rgb(image) is image


def test_pad_batch_masks_and_values():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 5, 7)).astype(np.float32)
    b = rng.normal(size=(3, 6, 4)).astype(np.float32)
    images, masks = pad_batch([a, b])
    assert images.shape == (2, 3, 6, 7) and masks.shape == (2, 6, 7) and masks.dtype == bool
    np.testing.assert_array_equal(images[0, :, :5, :7], a)
    np.testing.assert_array_equal(images[1, :, :6, :4], b)
    assert masks[0, :5].sum() == 0 and masks[0, 5].all()
    assert not masks[1, :, :4].any() and masks[1, :, 4:].all()
    assert not images[masks[:, None].repeat(3, 1)].any()  # padding is zero


def test_pad_batch_up_to_minimum_and_refusal_above_maximum():
    tiny = np.ones((3, 2, 1333), dtype=np.float32)  # extreme aspect ratio
    images, masks = pad_batch([tiny], min_hw=(320, 512), max_hw=(1344, 1344))
    assert images.shape == (1, 3, 320, 1333)
    assert masks[0, 2:].all() and not masks[0, :2].any()
    with pytest.raises(ShapeError, match=r"1400x900.*maximum 1344x1344"):
        pad_batch([np.zeros((3, 1400, 900), dtype=np.float32)], max_hw=(1344, 1344))


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="nope.jpg: no such file"):
        load_image(tmp_path / "nope.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="notes.jpg: cannot read image"):
        load_image(text)
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 48), (1, 2, 3)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ImageError, match="truncated.jpg"):
        load_image(truncated)
    assert load_image(good).size == (64, 48)


def _arithmetic_normalize(pixels):
    """The transform's float32 arithmetic over a whole (H,W,3) uint8 array, as it was computed before the table."""
    scaled = pixels.astype(np.float32) / np.float32(255)
    return np.ascontiguousarray(((scaled - MEAN) / STD).transpose(2, 0, 1))


def test_lookup_table_equals_float32_arithmetic_for_every_level():
    levels = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(1, 256, 3)  # every value in every channel
    ours = normalize(Image.fromarray(levels, "RGB"))
    np.testing.assert_array_equal(ours.view(np.uint32), _arithmetic_normalize(levels).view(np.uint32))
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    ours = normalize(Image.fromarray(pixels, "RGB"))
    assert ours.flags.c_contiguous and ours.shape == (3, 37, 53)
    np.testing.assert_array_equal(ours, _arithmetic_normalize(pixels))


def test_preprocess_batch_equals_pad_batch_of_single_images():
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
              for h, w in [(48, 64), (70, 31), (2, 900)]]
    batch, masks, sizes = preprocess_batch(images, min_hw=(1400, 64), max_hw=(1344, 1344))
    singles = [preprocess_image(image, max_hw=(1344, 1344)) for image in images]
    expected, expected_masks = pad_batch(singles, min_hw=(1400, 64))
    assert sizes == [s.shape[1:] for s in singles] and batch.shape == expected.shape == (3, 3, 1400, 1344)
    np.testing.assert_array_equal(batch, expected)
    np.testing.assert_array_equal(masks, expected_masks)
    with pytest.raises(ValueError, match="at least one image"):
        preprocess_batch([])


def test_threaded_resizes_give_the_serial_batch_in_input_order():
    rng = np.random.default_rng(5)
    # Different sizes, so a result in the wrong slot changes the batch.
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
              for h, w in [(480, 640), (31, 70), (640, 480), (5, 900), (300, 300)]]
    threaded = preprocess_batch(images, threads=True)
    serial = preprocess_batch(images, threads=False)
    assert threaded[2] == serial[2] == [resized_hw(image.height, image.width) for image in images]
    np.testing.assert_array_equal(threaded[0], serial[0])
    np.testing.assert_array_equal(threaded[1], serial[1])


# (in_h, in_w) -> (out_h, out_w): upscales, antialiased downscales, one-pixel sides, extreme aspect ratios,
# unchanged axes, and sizes on either side of Pillow 13's pass-order rule.
RESAMPLE_CASES = [((480, 640), (800, 1066)), ((1, 1), (5, 7)), ((1, 9), (1, 3)), ((9, 1), (800, 1)),
                  ((1, 200), (1, 1333)), ((3000, 10), (1333, 4)), ((10, 3000), (4, 1333)), ((10, 3000), (1, 1)),
                  ((7, 5), (7, 11)), ((5, 7), (2, 7)), ((29, 13), (10, 10)), ((30, 20), (10, 10)),
                  ((31, 20), (10, 10)), ((1200, 900), (800, 600)), ((333, 501), (800, 1203))]


@pytest.mark.parametrize("size, out", RESAMPLE_CASES)
def test_numpy_resample_equals_pillow(size, out):
    pixels = np.random.default_rng(size[0] * 7 + size[1]).integers(0, 256, (*size, 3), dtype=np.uint8)
    pillow = np.asarray(Image.fromarray(pixels, "RGB").resize(out[::-1], Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(pillow_bilinear(pixels, *out), pillow)


def test_numpy_resample_equals_pillow_on_random_sizes():
    rng = np.random.default_rng(6)
    orders = set()
    for _ in range(150):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 64, 4))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pillow = np.asarray(Image.fromarray(pixels, "RGB").resize((ow, oh), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(pillow_bilinear(pixels, oh, ow), pillow, err_msg=f"{h}x{w} -> {oh}x{ow}")
        orders.add(vertical_first(h, w, oh, ow))
    assert orders == {True, False} or not vertical_first(29, 13, 10, 10)  # both orders met (on Pillow >= 13)


def test_coefficients_identity_and_downscale():
    same = bilinear_coefficients(5, 5)  # an unchanged axis is an exact copy, so the kernel may always run both passes
    assert same[:, 0].tolist() == list(range(5)) and (same[:, 2] == 1 << 22).all() and not same[:, 3:].any()
    down = bilinear_coefficients(10, 1)  # support widened to the whole row, weights summing to 1 within rounding
    assert down[0, :2].tolist() == [0, 10] and abs(int(down[0, 2:].sum()) - (1 << 22)) <= 10
    with pytest.raises(ValueError, match="positive"):
        bilinear_coefficients(0, 3)


def test_decode_many_keeps_order_and_reports_each_bad_file(tmp_path):
    paths = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (i + 1, 3), (i, 0, 0)).save(path)
        paths.append(path)
    (tmp_path / "bad.png").write_text("not an image")
    paths[2:2] = [tmp_path / "bad.png", tmp_path / "missing.png"]
    results = list(decode_many(paths, workers=2))
    assert [type(r) is ImageError for r in results] == [False, False, True, True] + [False] * 5
    assert "bad.png: cannot read image" in str(results[2]) and "missing.png: no such file" in str(results[3])
    assert [r.size for r in results if not isinstance(r, ImageError)] == [(i + 1, 3) for i in range(7)]
    with pytest.raises(ValueError, match="workers"):
        next(decode_many(paths, workers=0))


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels and holds none: all a decompression bomb needs to be opened."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(10_000, 10_000), (100_000, 100_000)])  # 100 MP and 10 GP
def test_too_many_pixels_is_one_clear_line_whatever_the_size(width, height, tmp_path):
    """Pillow warns on the first and refuses the second inside Image.open, before its size can be read: both get
    the pixel-limit line, from the header alone, in runtime.infer's loader and in the server's decoder."""
    from runtime.preprocess import TooManyPixels, load_image
    from serve.server import HostPreprocess, RequestError

    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(width, height))
    with pytest.raises(TooManyPixels) as info:
        load_image(path)
    limit = f"over the limit of {Image.MAX_IMAGE_PIXELS:,} pixels: downscale it"
    assert str(info.value).startswith(str(path)) and str(info.value).endswith(limit), info.value
    server = HostPreprocess(type("Model", (), {"min_hw": None, "max_hw": None})(), 50_000_000)
    with pytest.raises(RequestError) as info:
        server.decode(path.read_bytes())
    assert str(info.value).endswith("over the limit of 50,000,000 pixels: send a smaller image (--max-pixels sets "
                                    "this server's limit)"), info.value


# ---------------------------------------------------------------------------------------------- pools sized to the machine


@pytest.fixture
def three_of_sixty_four_cores(monkeypatch):
    """A process allowed on 3 cores of a 64-core machine (an affinity mask, a container's cpuset)."""
    import os

    monkeypatch.delattr(os, "process_cpu_count", raising=False)  # Python 3.13+ answers from the mask too
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 9}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    return 3


def test_usable_cpus_is_the_affinity_mask_not_the_machine(three_of_sixty_four_cores, monkeypatch):
    import os

    from runtime.preprocess import usable_cpus

    assert usable_cpus() == 3
    monkeypatch.setattr(os, "process_cpu_count", lambda: 7, raising=False)
    assert usable_cpus() == 7  # Python 3.13+'s own answer comes first
    monkeypatch.delattr(os, "process_cpu_count")
    monkeypatch.delattr(os, "sched_getaffinity")
    assert usable_cpus() == 64  # no affinity API (macOS, Windows): the machine's count
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert usable_cpus() == 1


def test_the_cpu_pools_and_the_workers_defaults_follow_the_usable_cores(three_of_sixty_four_cores, monkeypatch,
                                                                        tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks import pipeline_capacity
    from eval import coco
    from runtime import bench, infer, preprocess

    monkeypatch.setattr(preprocess, "_POOL", None)
    pool = preprocess.cpu_pool()
    assert pool._max_workers == 3 and preprocess.cpu_pool() is pool  # one pool for the process
    pool.shutdown()
    sizes = []

    class Recorded(ThreadPoolExecutor):
        def __init__(self, max_workers, **kwargs):
            sizes.append(max_workers)
            super().__init__(max_workers, **kwargs)

    monkeypatch.setattr(preprocess, "ThreadPoolExecutor", Recorded)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert [image.size for image in preprocess.decode_many([tmp_path / "a.png"])] == [(8, 8)]
    assert sizes == [3]  # decoding: one thread per usable core by default
    for parser in (infer.build_parser(), bench.build_parser(), coco.build_parser()):
        assert parser.get_default("workers") == 3
    captured = []

    def run(args, argv):
        captured.append(args.workers)
        return 0

    monkeypatch.setattr(pipeline_capacity, "run", run)
    assert pipeline_capacity.main([]) == 0 and captured == [3]


def test_padding_and_masks_are_written_whatever_the_memory_held(monkeypatch):
    """The batch is allocated without zeroing; every padding value and mask must still be written."""
    from runtime import preprocess

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(48, 64), (70, 31)]]
    expected, expected_masks = pad_batch([preprocess_image(image) for image in images], min_hw=(900, 900))
    empty = np.empty
    monkeypatch.setattr(preprocess.np, "empty", lambda shape, dtype: np.full(shape, 7, dtype))  # dirty memory
    batch, masks, _ = preprocess_batch(images, min_hw=(900, 900))
    monkeypatch.setattr(preprocess.np, "empty", empty)
    np.testing.assert_array_equal(batch, expected)
    np.testing.assert_array_equal(masks, expected_masks)


def test_a_batch_is_prepared_image_by_image_on_the_pool(monkeypatch):
    import threading

    from runtime import preprocess

    names = []
    normalize_into = preprocess._normalize_into

    def recording(pixels, out):
        names.append(threading.current_thread().name)
        normalize_into(pixels, out)

    monkeypatch.setattr(preprocess, "_normalize_into", recording)
    images = [Image.new("RGB", (40 + i, 30), (10 * i, 0, 0)) for i in range(4)]
    pooled = preprocess_batch(images, threads=True)
    assert len(names) == 4 and all(name.startswith("anchortrt-cpu") for name in names)  # resize + normalise there
    names.clear()
    serial = preprocess_batch(images, threads=False)
    assert names == [threading.current_thread().name] * 4
    for a, b in zip(pooled, serial):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stored_pixels_are_pillows_own_and_outlive_the_image():
    """`stored_rgbx` reads an RGB image's storage in place (4 bytes a pixel): its first three bytes equal
    np.asarray's packed copy, it is read-only, and it stays valid after the image is gone. Images it cannot read
    in one piece (other modes, rows over Pillow's 16 MB block) give None, and `rgb_pixels` then copies."""
    import gc

    from runtime.preprocess import rgb_pixels, stored_rgbx

    rng = np.random.default_rng(5)
    if not hasattr(Image.Image, "__arrow_c_array__"):
        pytest.skip(f"Pillow {PIL.__version__} has no Arrow export (11.2+)")
    for height, width in [(1, 1), (37, 53), (480, 640), (800, 1066)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        stored = stored_rgbx(image)
        assert stored.shape == (height, width, 4) and not stored.flags.writeable
        np.testing.assert_array_equal(stored[:, :, :3], pixels)
        assert np.shares_memory(rgb_pixels(image), stored)
        del image
        gc.collect()
        Image.new("RGB", (width, height), (7, 7, 7))  # would reuse freed storage
        np.testing.assert_array_equal(stored[:, :, :3], pixels)
    assert stored_rgbx(Image.new("L", (8, 8))) is None and stored_rgbx(Image.new("RGBA", (8, 8))) is None
    large = Image.new("RGB", (4032, 3024), (1, 2, 3))  # 48 MB of RGBX: rows in several blocks
    assert stored_rgbx(large) is None
    assert rgb_pixels(large)[3000, 4000].tolist() == [1, 2, 3]
