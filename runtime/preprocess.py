"""Image preprocessing identical to the official AnchorDETR evaluation transform, in NumPy and Pillow.

Official order: decode, convert to RGB, resize (shorter side 800, longer side at most 1333, Pillow bilinear
as torchvision does for PIL images), scale to [0,1] in float32, subtract the ImageNet mean and divide by its
standard deviation in float32, CHW. Batches are zero-padded at the bottom and right with a mask that is True
on the padding.

Beyond the official loader (which only calls ``convert("RGB")``), `to_rgb` applies the EXIF orientation (off
with ``exif=False``, which COCO evaluation needs because its boxes refer to the stored pixels), composites
transparent images over white, and maps 16-bit and 32-bit single-channel images to 8 bits by their range
instead of clipping them to white.
"""

from __future__ import annotations

import ctypes
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps

from core.errors import BadInput

SHORT_SIDE = 800
MAX_SIDE = 1333
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# The normalised value of every uint8 level per channel, by the same float32 operations as the official
# transform ((v / 255 - mean) / std), so a table lookup gives identical results 3-4x faster than the arithmetic.
NORMALISED = (np.arange(256, dtype=np.float32)[None, :] / np.float32(255) - MEAN[:, None]) / STD[:, None]


class ImageError(BadInput):
    """An image file that is missing or cannot be decoded."""


class TooManyPixels(ImageError):
    """An image with more pixels than we decode (the check reads only its header)."""


class ShapeError(BadInput, ValueError):
    """An image larger than the engine's optimisation profile allows."""


def resized_hw(height: int, width: int, short: int = SHORT_SIDE, longest: int = MAX_SIDE) -> tuple[int, int]:
    """(height, width) after the evaluation resize of an image of this (height, width)."""
    lo, hi = min(width, height), max(width, height)
    # Same float expression order as the official rule, so borderline aspect ratios fall the same way.
    if hi / lo * short > longest:
        # The official rule gives 0 beyond an aspect ratio of 2666:1 and then fails; keep one pixel.
        short = max(1, int(round(longest * lo / hi)))
    if width < height:
        return int(short * height / width), short
    return short, int(short * width / height)


def open_image(source: Any, max_pixels: int, what: str, fix: str) -> Image.Image:
    """``Image.open(source)``, refused (TooManyPixels) from the header alone when the image has more than
    ``max_pixels`` pixels: a small file can decode to gigabytes. Pillow itself refuses more than twice its
    ``MAX_IMAGE_PIXELS`` inside ``open``, before the size can be read; that is said in the same words."""
    try:
        image = Image.open(source)
    except Image.DecompressionBombError:
        hard = 2 * Image.MAX_IMAGE_PIXELS
        over = f"over the limit of {max_pixels:,} pixels" if max_pixels < hard else "which Pillow refuses to decode"
        raise TooManyPixels(f"{what} has more than {hard:,} pixels, {over}: {fix}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise TooManyPixels(f"{what} is {width}x{height} ({width * height:,} pixels), over the limit of "
                            f"{max_pixels:,} pixels: {fix}")
    return image


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file; a missing or broken file, or one over Pillow's decompression-bomb
    limit (MAX_IMAGE_PIXELS), is an ImageError naming it."""
    try:
        with open_image(path, Image.MAX_IMAGE_PIXELS, str(path), "downscale it") as image:
            image.load()
            return image
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{path}: cannot read image ({exc})") from None


def _exif_oriented(image: Image.Image) -> Image.Image:
    try:
        # exif_transpose copies an image that needs no turn (most do not): 1.2 MB for 640x480, holding the GIL,
        # 4% of the Pillow-decoding pipeline's GIL time on the H200 (py-spy). Such an image is used as it is.
        if image.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9):
            return image
        return ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block must not make an otherwise readable image unusable
        return image


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit ("I;16*") and 32-bit ("I", "F") single-channel images to 8-bit "L" by their value range."""
    values = np.asarray(image).astype(np.float64)
    peak = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") or peak > 255:
        values = values / 257  # 65535 -> 255
    elif image.mode == "F" and peak <= 1.0:
        values = values * 255  # float images in [0, 1]
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image, exif: bool = True) -> Image.Image:
    """Any Pillow image as an 8-bit RGB image (EXIF orientation applied unless exif=False)."""
    if exif:
        image = _exif_oriented(image)
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_l(image).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def rgb_images(images: Sequence[Image.Image], exif: bool = True) -> list[Image.Image]:
    """`to_rgb` of each image."""
    return [to_rgb(image, exif=exif) for image in images]


def original_sizes(images: Sequence[Image.Image]) -> np.ndarray:
    """(B, 2) int64: the (height, width) of each image, the pixels its boxes are scaled to."""
    return np.array([(image.height, image.width) for image in images], dtype=np.int64).reshape(-1, 2)


class _ArrowArray(ctypes.Structure):
    """The Arrow C data interface's ArrowArray (an ABI-stable struct, arrow.apache.org/docs/format/CDataInterface)."""


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64), ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p),
]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


class _Exported:
    """An array interface over exported pixels that keeps the export (and through it the image) alive."""

    def __init__(self, interface: dict, export: Any) -> None:
        self.__array_interface__, self._export = interface, export


def stored_rgbx(image: Image.Image) -> np.ndarray | None:
    """An RGB image's pixels where Pillow keeps them, as a read-only (H, W, 4) uint8 array (R, G, B, unused),
    without a copy: Pillow stores RGB in 4 bytes a pixel, and `np.asarray(image)` repacks them to 3 holding the
    GIL (about 1 ms for 800x1066), which serialised the CPU stages' threads. Read through Pillow's Arrow export
    (Pillow 11.2+); None where there is none, for other modes, and for images whose rows are not in one block
    (over Pillow's 16 MB block size), which then take `np.asarray`."""
    export = getattr(image, "__arrow_c_array__", None)
    if export is None or image.mode != "RGB":
        return None
    try:
        _, array = export()
    except ValueError:  # "Image rows are not contiguous in memory"
        return None
    top = _ArrowArray.from_address(_capsule_pointer(array, b"arrow_array"))
    width, height = image.size
    # A fixed-size list of 4 uint8 per pixel: the values are the child's buffer 1, with no offset.
    if top.length != width * height or top.n_children != 1 or top.offset != 0:
        return None
    child = top.children[0].contents
    if child.n_buffers != 2 or child.offset != 0 or child.length != 4 * width * height or not child.buffers[1]:
        return None
    interface = {"shape": (height, width, 4), "typestr": "|u1", "data": (child.buffers[1], True), "version": 3}
    return np.asarray(_Exported(interface, array))


def rgb_pixels(rgb: Image.Image) -> np.ndarray:
    """An 8-bit RGB image's (H, W, 3) uint8 pixels: a view of Pillow's storage where it exports one
    (`stored_rgbx`), else `np.asarray`'s copy."""
    stored = stored_rgbx(rgb)
    return stored[:, :, :3] if stored is not None else np.asarray(rgb, dtype=np.uint8)


def normalize(rgb: Image.Image) -> np.ndarray:
    """8-bit RGB image -> (3,H,W) float32, scaled to [0,1] and standardised with the ImageNet statistics."""
    pixels = rgb_pixels(rgb)
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    _normalize_into(pixels, out)
    return out


def _normalize_into(pixels: np.ndarray, out: np.ndarray) -> None:
    """Write the normalised planes of (H,W,3) uint8 pixels into out (3,H,W), which may be a padded batch's view."""
    for channel in range(3):
        # uint8 indices never leave the 256-entry table; mode="clip" skips NumPy's checked, buffered path for out=.
        np.take(NORMALISED[channel], pixels[:, :, channel], out=out[channel], mode="clip")


def fit_within(height: int, width: int, max_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) scaled down, aspect kept, until both fit in max_hw; unchanged if they already do."""
    factor = min(max_hw[0] / height, max_hw[1] / width)
    if factor >= 1:
        return height, width
    return max(1, int(height * factor)), max(1, int(width * factor))


def output_hw(height: int, width: int, max_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """(height, width) an image of this (height, width) is resized to: the evaluation resize (`resized_hw`),
    scaled down to fit `max_hw` when given."""
    height, width = resized_hw(height, width)
    return fit_within(height, width, max_hw) if max_hw is not None else (height, width)


def preprocess_image(image: Image.Image, exif: bool = True, max_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The evaluation transform of one image: (3,H,W) float32 with H, W from `output_hw`.

    With max_hw (an engine profile's maximum), an image the official rule would make larger is scaled to fit
    instead: rounding lets the longer side of very elongated images pass 1333 (up to 1333 + aspect/2).
    """
    return normalize(resize_rgb(image, exif=exif, max_hw=max_hw))


def resize_rgb(image: Image.Image, exif: bool = True, max_hw: tuple[int, int] | None = None) -> Image.Image:
    """`to_rgb` then the evaluation resize (Pillow bilinear), before normalisation."""
    rgb = to_rgb(image, exif=exif)
    height, width = output_hw(rgb.height, rgb.width, max_hw)
    if (width, height) != rgb.size:
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    return rgb


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask, a container's cpuset), not the machine's count."""
    count = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if count is not None:
        return count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


_POOL: ThreadPoolExecutor | None = None


def cpu_pool() -> ThreadPoolExecutor:
    """The process's threads for per-image CPU work (resizing, normalising), one per usable core: Pillow's resample
    and NumPy's table lookup release the GIL, so a batch's images are prepared side by side on every core."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=usable_cpus(), thread_name_prefix="anchortrt-cpu")
    return _POOL


class PendingBatch:
    """A padded batch whose images are being resized and normalised into it on `cpu_pool`, one task per image;
    `result()` waits for them. The batch's size is known from the images' sizes before any resize, so every image
    can start at once, and a caller can start the next batch before this one is done."""

    def __init__(self, rgb: Sequence[Image.Image], min_hw: tuple[int, int] | None,
                 max_hw: tuple[int, int] | None, threads: bool = True) -> None:
        if not rgb:
            raise ValueError("preprocess_batch needs at least one image")
        self.rgb = list(rgb)
        self.sizes = [output_hw(image.height, image.width, max_hw) for image in self.rgb]
        height, width = max(s[0] for s in self.sizes), max(s[1] for s in self.sizes)
        if min_hw is not None:
            height, width = max(height, min_hw[0]), max(width, min_hw[1])
        # Not zeroed: each task writes its slot's padding, so the zeroing is spread over the threads too.
        self.images = np.empty((len(rgb), 3, height, width), dtype=np.float32)
        self.masks = np.empty((len(rgb), height, width), dtype=bool)
        if threads and len(rgb) > 1:
            self._tasks = [cpu_pool().submit(self._fill, i) for i in range(len(rgb))]
        else:
            self._tasks = []
            for i in range(len(rgb)):
                self._fill(i)

    def _fill(self, i: int) -> None:
        (h, w), image = self.sizes[i], self.rgb[i]
        if (w, h) != image.size:
            image = image.resize((w, h), Image.Resampling.BILINEAR)
        _normalize_into(rgb_pixels(image), self.images[i, :, :h, :w])
        self.images[i, :, h:], self.images[i, :, :h, w:] = 0, 0
        self.masks[i, :h, :w], self.masks[i, h:], self.masks[i, :h, w:] = False, True, True

    def result(self) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
        """The images (B,3,H,W), masks (B,H,W) and each image's (height, width) after resizing, once all are in."""
        for task in self._tasks:
            task.result()  # an image's error is raised here
        return self.images, self.masks, self.sizes


def preprocess_batch(
    images: Sequence[Image.Image],
    exif: bool = True,
    min_hw: tuple[int, int] | None = None,
    max_hw: tuple[int, int] | None = None,
    threads: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """`pad_batch([preprocess_image(i, exif, max_hw) for i in images], min_hw)`, normalising straight into the
    padded batch (no per-image float array). Also returns each image's (height, width) after resizing.

    With ``threads`` (and more than one image) each image is resized, normalised into its slot and its padding
    written on `cpu_pool`, side by side (`PendingBatch`); the result is the same either way."""
    return PendingBatch(rgb_images(images, exif), min_hw, max_hw, threads).result()


class HostBatch(NamedTuple):
    """A batch prepared on the host for a detector: what `Detector.__call__` takes."""

    images: np.ndarray  # (B,3,H,W) float32
    masks: np.ndarray  # (B,H,W) bool, True on padding
    sizes: np.ndarray  # (B,2) original (height, width) of each image, for the boxes


def prepare_batch(rgb: Sequence[Image.Image], min_hw: tuple[int, int] | None = None,
                  max_hw: tuple[int, int] | None = None) -> HostBatch:
    """The batch of RGB images (`to_rgb`'s) a detector with these limits takes, and their original sizes."""
    return host_batch(PendingBatch(rgb, min_hw, max_hw))


def host_batch(pending: PendingBatch) -> HostBatch:
    """A PendingBatch's arrays, once ready, with the original (height, width) of its images."""
    images, masks, _ = pending.result()
    return HostBatch(images, masks, original_sizes(pending.rgb))


def decode_many(paths: Iterable[str | Path], workers: int | None = None,
                exif: bool | None = None) -> Iterator[Image.Image | ImageError]:
    """`load_image` of each path on `workers` threads (Pillow releases the GIL while decoding; None: one per
    usable core), yielded in input order; a file that cannot be read yields its ImageError instead of stopping
    the others. With `exif` True or False each image is also converted by `to_rgb` on those threads.

    At most 2 x workers decoded images wait at a time, so a long list does not fill memory.
    """
    workers = usable_cpus() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")

    def decode(path):
        try:
            image = load_image(path)
        except ImageError as exc:
            return exc
        return image if exif is None else to_rgb(image, exif=exif)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for path in paths:
            pending.append(pool.submit(decode, path))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def pad_batch(
    images: Sequence[np.ndarray],
    min_hw: tuple[int, int] | None = None,
    max_hw: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stack (3,H,W) images zero-padded at the bottom/right to the largest H and W (and at least min_hw).

    Returns images (B,3,H,W) float32 and masks (B,H,W) bool, True on padding. An image above max_hw (the
    engine profile's maximum) is a ShapeError naming both sizes.
    """
    if not images:
        raise ValueError("pad_batch needs at least one image")
    for image in images:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected (3,H,W) images, got shape {image.shape}")
        if max_hw is not None and (image.shape[1] > max_hw[0] or image.shape[2] > max_hw[1]):
            raise ShapeError(
                f"an image of {image.shape[1]}x{image.shape[2]} (HxW after resizing) exceeds the engine profile's "
                f"maximum {max_hw[0]}x{max_hw[1]}: rebuild the engine with a larger maximum shape"
            )
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    if min_hw is not None:
        height, width = max(height, min_hw[0]), max(width, min_hw[1])
    batch = np.zeros((len(images), 3, height, width), dtype=np.float32)
    masks = np.ones((len(images), height, width), dtype=bool)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[1], : image.shape[2]] = image
        masks[i, : image.shape[1], : image.shape[2]] = False
    return batch, masks
