"""runtime.decode without a GPU: which files go to nvImageCodec, the per-image Pillow fallback, error isolation and
order (with a stand-in codec), and nvImageCodec's CPU backend against Pillow where it is installed."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from helpers import FakeCodec, FakeImage, pixels_at
from runtime.decode import BatchDecoder, DeviceImage, gpu_decodable, jpeg_frame, read_file
from runtime.preprocess import ImageError, to_rgb


def encoded(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def files():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:64]
    pixels = np.clip(np.stack([x * 4, y * 5, (x + y) * 2], -1) + rng.normal(0, 8, (48, 64, 3)), 0, 255)
    rgb = Image.fromarray(pixels.astype(np.uint8), "RGB")
    exif = rgb.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    jpeg = encoded(rgb, quality=90)
    return {
        "rgb": jpeg,
        "gray": encoded(rgb.convert("L")),
        "progressive": encoded(rgb, progressive=True),
        "exif": encoded(rgb, exif=exif),
        "cmyk": encoded(rgb.convert("CMYK")),
        "png": encoded(rgb, "PNG"),
        "palette": encoded(rgb.convert("P"), "PNG"),
        "rgba": encoded(rgb.convert("RGBA"), "PNG"),
        "png16": encoded(Image.fromarray((pixels[..., 0] * 257).astype(np.uint16)), "PNG"),
        "truncated": jpeg[: len(jpeg) // 2],
        "junk": b"not an image at all",
    }


GPU_KINDS = {"rgb", "gray", "progressive", "exif"}


def test_only_complete_8_bit_grayscale_or_colour_jpegs_go_to_the_gpu(files):
    assert {name for name, data in files.items() if gpu_decodable(data)} == GPU_KINDS
    assert jpeg_frame(files["rgb"])[1:] == (8, 3) and jpeg_frame(files["gray"])[1:] == (8, 1)
    assert jpeg_frame(files["cmyk"])[1:] == (8, 4)  # CMYK: Pillow converts it as the CPU path does
    assert jpeg_frame(files["progressive"])[0] == 0xC2
    assert jpeg_frame(files["png"]) is None and jpeg_frame(b"\xff\xd8\xff") is None


@pytest.mark.parametrize("parsed", [False, True], ids=["bytes", "parsed"])
@pytest.mark.parametrize("exif", [True, False])
def test_one_codec_call_per_batch_pillow_for_the_rest_and_errors_stay_with_their_file(files, exif, parsed):
    """Given file bytes, or `parse`'s items (the JPEGs that go to the codec as CodeStreams, made beforehand on
    the read threads), the same decoding."""
    names = list(files)
    codec = FakeCodec(refuse={files["progressive"]})  # one JPEG the codec refuses: Pillow decodes it instead
    with BatchDecoder(exif=exif, device=False, codec=codec, pillow_workers=2) as decoder:
        missing = read_file("/no/such/file.jpg")
        items = [files[n] for n in names] + [missing]
        if parsed:
            items = decoder.parse(items)
            assert [type(item).__name__ for item in items[:-1]] == ["Parsed" if n in GPU_KINDS else "bytes"
                                                                    for n in names]
        out = decoder.decode(items, names + ["/no/such/file.jpg"])
    assert codec.made == (-99, ["cpu"])
    assert len(codec.calls) == 1 and codec.calls[0] == [files[n] for n in names if n in GPU_KINDS]
    assert codec.parsed == [len(GPU_KINDS) if parsed else 0]
    assert decoder.counts == {"gpu": 4, "pillow": 8, "refused": 1}
    by_name = dict(zip(names, out))
    for name in ("truncated", "junk"):
        assert isinstance(by_name[name], ImageError) and str(by_name[name]).startswith(f"{name}: cannot read")
    assert out[-1] is missing and str(missing) == "/no/such/file.jpg: no such file"
    for name, got in by_name.items():
        if name in ("truncated", "junk"):
            continue
        expected = np.asarray(to_rgb(Image.open(io.BytesIO(files[name])), exif=exif))
        if name in GPU_KINDS - {"progressive"}:
            assert isinstance(got, DeviceImage) and got.pitch == got.width * 3 + 5
            np.testing.assert_array_equal(pixels_at(got), expected)
            np.testing.assert_array_equal(np.asarray(got.to_pil()), expected)
        else:  # Pillow's image, which the pipeline's to_rgb turns into the CPU path's pixels
            assert isinstance(got, Image.Image)
            np.testing.assert_array_equal(np.asarray(to_rgb(got, exif=exif)), expected)
    assert (by_name["exif"].height, by_name["exif"].width) == ((64, 48) if exif else (48, 64))


def test_decoders_outlive_their_images_and_the_plan_is_parsed(files):
    from runtime import decode

    codec = FakeCodec()
    decoder = BatchDecoder(device=False, codec=codec)
    (image,) = decoder.decode([files["rgb"]])
    decoder.close()
    assert image.owner[1].decoders  # the image still holds its decoder
    assert decode.gpu_decoders("hw+hybrid,gpu") == [("hw", "hybrid"), ("gpu",)]
    with pytest.raises(decode.BadInput, match="ANCHORTRT_GPU_DECODERS"):
        decode.gpu_decoders("hw,turbo")


def test_images_the_kernel_cannot_read_go_to_pillow(files):
    """A decoded image that is not interleaved RGB uint8 (here: planar) is decoded again by Pillow."""
    codec = FakeCodec()
    planar = FakeImage(files["rgb"], True)
    planar.__cuda_array_interface__ = dict(planar.__cuda_array_interface__, shape=(3, 48, 64), strides=None)
    codec.Decoder.decode = lambda self, data, params: [planar]
    with BatchDecoder(device=False, codec=codec) as decoder:
        (got,) = decoder.decode([files["rgb"]])
    assert isinstance(got, Image.Image) and decoder.counts["refused"] == 1


def test_nvimagecodec_cpu_backend_equals_pillow(files):
    pytest.importorskip("nvidia.nvimgcodec")
    names = list(files)
    with BatchDecoder(exif=True, device=False) as decoder:
        out = decoder.decode([files[n] for n in names], names)
    for name, got in zip(names, out):
        if name in ("truncated", "junk"):
            assert isinstance(got, ImageError)
            continue
        expected = np.asarray(to_rgb(Image.open(io.BytesIO(files[name]))))
        got = np.asarray(to_rgb(got)) if isinstance(got, Image.Image) else got
        np.testing.assert_array_equal(got, expected)


def test_a_jpeg_nvimagecodec_cannot_parse_goes_to_pillow_and_the_call_gets_code_streams_only(files):
    codec = FakeCodec()
    made = codec.CodeStream

    def code_stream(data):
        if data == files["gray"]:
            raise RuntimeError("nvImageCodec: cannot parse")
        return made(data)

    codec.CodeStream = code_stream
    with BatchDecoder(exif=False, device=False, codec=codec, pillow_workers=2) as decoder:
        items = decoder.parse([files["rgb"], files["gray"], files["png"]])
        out = decoder.decode(items, ["rgb", "gray", "png"])
    assert codec.calls == [[files["rgb"]]] and codec.parsed == [1]
    assert decoder.counts == {"gpu": 1, "pillow": 2, "refused": 0}
    assert isinstance(out[1], Image.Image)  # Pillow's image of the file (the pipeline then converts it to RGB)
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(Image.open(io.BytesIO(files["gray"]))))


def _concurrent_calls(codec: FakeCodec) -> list[int]:
    """Wraps the codec's decoder so that each call waits briefly for another: the most calls that were inside the
    decoder at once, appended per call."""
    inside, most, lock, plain = [0], [], threading.Lock(), codec.Decoder.decode

    def decode(self, data, params, cuda_stream=0):
        with lock:
            inside[0] += 1
        deadline = time.monotonic() + 0.3
        while inside[0] < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        most.append(inside[0])
        out = plain(self, data, params, cuda_stream)
        with lock:
            inside[0] -= 1
        return out

    codec.Decoder.decode = decode
    return most


@pytest.mark.parametrize("lanes", [1, 2])
def test_decode_calls_run_side_by_side_one_per_lane_each_on_its_own_decoder(files, lanes):
    """Two threads' calls overlap inside nvImageCodec only with two lanes; each call's images keep the lane (its
    decoders and stream) they were decoded on."""
    codec = FakeCodec()
    most = _concurrent_calls(codec)
    with BatchDecoder(device=False, codec=codec, lanes=lanes) as decoder, ThreadPoolExecutor(2) as pool:
        assert decoder.lanes == lanes
        calls = [pool.submit(decoder.decode, [files["rgb"], files["gray"]]) for _ in range(4)]
        images = [image for call in calls for image in call.result()]
    assert max(most) == lanes
    assert len({id(image.owner[1]) for image in images}) == lanes
    assert all(isinstance(image, DeviceImage) for image in images) and decoder.counts["gpu"] == 8


def test_the_lane_count_comes_from_the_environment_and_is_checked(monkeypatch):
    from runtime import decode

    assert decode.decode_lanes() == decode.DEFAULT_LANES
    monkeypatch.setenv("ANCHORTRT_GPU_DECODE_LANES", "3")
    assert decode.decode_lanes() == 3 and decode.decode_lanes(2) == 2
    for bad in ("0", "two", "17"):
        monkeypatch.setenv("ANCHORTRT_GPU_DECODE_LANES", bad)
        with pytest.raises(decode.BadInput, match=f"ANCHORTRT_GPU_DECODE_LANES='{bad}'.*1 to 16"):
            decode.decode_lanes()
