"""The evaluation transform on the GPU: one kernel resizes, normalises and zero-pads a batch in place.

Each decoded RGB image (H, W, 3 uint8) is staged in pinned memory and copied asynchronously to the device; one
launch of `preprocess_batch` (runtime/preprocess.cu) then writes the float32 (B,3,Hp,Wp) `images` and the bool
(B,Hp,Wp) `masks` (True on padding) that the engine reads, at each image's batch slot.

The resize is Pillow's BILINEAR resample (libImaging/Resample.c) in the same integer arithmetic: a separable
triangle filter whose support grows with the downscale factor (antialiasing), weights normalised to sum 1 in
double precision and rounded to 22-bit fixed point, and two passes with uint8 rounding in between, in the order
the installed Pillow runs them (`vertical_first`). `bilinear_coefficients` builds the fixed-point tables on the
host exactly as Pillow does, and `pillow_bilinear` is a NumPy implementation of the two passes that equals
`Image.resize` bit for bit; the kernel uses the same tables and order, so its output equals the CPU path's.

CUDA is reached through core.cuda (device, stream, events, pinned and device memory, kernel loading and launch);
the kernel is compiled by NVRTC and cached on disk there too (`core.cuda.compile_cached`).
"""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

import numpy as np
import PIL

from runtime.preprocess import MEAN, STD, output_hw

PRECISION_BITS = 22  # Pillow's 32 - 8 - 2: 8 bits of result, 2 of headroom for filters with negative lobes
KERNEL_SOURCE = Path(__file__).resolve().with_name("preprocess.cu")
BLOCK = (32, 8, 1)

# One image's parameters as the kernel's `Slot` struct reads them (three pointers, then six ints: 48 bytes).
SLOT_DTYPE = np.dtype(
    [("pixels", "<u8"), ("xtab", "<u8"), ("ytab", "<u8"),
     ("in_w", "<i4"), ("out_h", "<i4"), ("out_w", "<i4"), ("kx", "<i4"), ("ky", "<i4"), ("vertical_first", "<i4")]
)


@functools.lru_cache(maxsize=64)
def bilinear_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's BILINEAR resample weights along one axis: int32 (out_size, 2 + ksize).

    Row i is [first, count, w_0 .. w_{ksize-1}]: output i = sum of input[first + j] * w_j for j < count, plus
    2**21, shifted right by 22 and clipped to 0..255. Float steps follow precompute_coeffs/normalize_coeffs_8bpc
    operation by operation (the weight sum is accumulated in order, not pairwise), so the integers are Pillow's.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resample sizes must be positive, got {in_size} -> {out_size}")
    scale = float(np.float32(in_size)) / out_size  # Pillow's box edges are float32
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the triangle's support 1, widened when downscaling
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    inv = 1.0 / filterscale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate toward zero
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    weights = np.zeros((out_size, ksize), dtype=np.float64)
    total = np.zeros(out_size, dtype=np.float64)
    for j in range(ksize):
        w = np.maximum(1.0 - np.abs(((first + j).astype(np.float64) - center + 0.5) * inv), 0.0)
        w = np.where(j < count, w, 0.0)
        weights[:, j] = w
        total += w
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0)
    table = np.empty((out_size, 2 + ksize), dtype=np.int32)
    table[:, 0], table[:, 1] = first, count
    table[:, 2:] = (0.5 + weights * (1 << PRECISION_BITS)).astype(np.int64)  # weights are never negative here
    return table


def _pass(pixels: np.ndarray, table: np.ndarray, axis: int) -> np.ndarray:
    """One Pillow resample pass along `axis` of a uint8 (H, W, 3) array."""
    first, count, weights = table[:, 0], table[:, 1], table[:, 2:]
    last = pixels.shape[axis] - 1
    acc = np.full(pixels.shape[:axis] + (len(table),) + pixels.shape[axis + 1:], 1 << (PRECISION_BITS - 1), np.int64)
    shape = [1, 1, 1]
    shape[axis] = len(table)
    for j in range(weights.shape[1]):
        # Taps past `count` have weight 0; clamp their index so the gather stays inside the image.
        taps = np.take(pixels, np.minimum(first + j, last), axis=axis).astype(np.int64)
        acc += taps * np.where(j < count, weights[:, j], 0).reshape(shape)
    return np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)


# Pillow's order of the two passes, per release, read from its source: Image.resize (src/PIL/Image.py) and
# ImagingResampleInner (src/libImaging/Resample.c). The uint8 rounding between the passes makes the order change
# values; Pillow picks it from the four sizes alone. Each rule: (in_h, in_w, out_h, out_w) -> vertical pass first.
def _horizontal_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    return False  # 10.0-12.1: ImagingResampleInner runs the horizontal pass, then the vertical one


def _tall_vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    # 12.2-12.3 (python-pillow/Pillow#9524): Image.resize splits the resize of an image taller than 100 widths
    # whose height shrinks into two calls, the vertical one first; the C order is still horizontal first.
    return in_h > 100 * in_w and out_h < in_h


def _shrink_vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    # 13.0 (python-pillow/Pillow#9549): ImagingResampleInner runs the vertical pass first when the height loses
    # more than twice as many pixels as the width; Image.resize no longer splits tall images.
    return in_h - out_h > 0 and in_h - out_h > 2 * (in_w - out_w)


PASS_ORDERS = (((10, 0), _horizontal_first), ((12, 2), _tall_vertical_first), ((13, 0), _shrink_vertical_first))
NEWEST_CHECKED = (13, 0)  # the newest Pillow release line whose source the rules were read from


@functools.cache
def pass_order(version: str):
    """The pass-order rule of Pillow `version` ("12.3.0"): a function (in_h, in_w, out_h, out_w) -> vertical first.

    A release newer than NEWEST_CHECKED gets the newest rule, with a RuntimeWarning that says how to check it
    (Pillow changed the order within the 12 line, so any newer minor release may differ). Releases before 10.0,
    which pyproject refuses, get the 10.0 rule.
    """
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a Pillow release from the version {version!r}; expected e.g. '12.3.0'")
    release = (int(match[1]), int(match[2]))
    rule = next((rule for first, rule in reversed(PASS_ORDERS) if release >= first), PASS_ORDERS[0][1])
    if release > NEWEST_CHECKED:
        newest = ".".join(map(str, NEWEST_CHECKED))
        warnings.warn(f"Pillow {version} is newer than {newest}, the last release whose resize pass order "
                      f"runtime.gpu_preprocess was checked against; using {newest}'s rule. Check that the GPU path "
                      "still equals Pillow: python -m benchmarks.pillow_lines --installed", RuntimeWarning,
                      stacklevel=3)
    return rule


def vertical_first(in_h: int, in_w: int, out_h: int, out_w: int, pillow: str | None = None) -> bool:
    """Whether Pillow (`pillow`, a version string; default the installed one) resizes this size vertical pass first.

    The one place the order is decided: `pillow_bilinear` and the kernel's `Slot.vertical_first` (`stage`) both
    read it, so the GPU path follows whichever Pillow the CPU path uses.
    """
    return pass_order(PIL.__version__ if pillow is None else pillow)(in_h, in_w, out_h, out_w)


def _resample(rgb: np.ndarray, height: int, width: int, vertical: bool) -> np.ndarray:
    out = rgb
    for axis in ((0, 1) if vertical else (1, 0)):
        size = height if axis == 0 else width
        if size != out.shape[axis]:  # Pillow skips a pass whose size does not change
            out = _pass(out, bilinear_coefficients(out.shape[axis], size), axis=axis)
    return out if out is not rgb else rgb.copy()


def pillow_bilinear(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """`Image.resize((width, height), BILINEAR)` of a uint8 (H, W, 3) array, in NumPy; equal to Pillow's output."""
    return _resample(rgb, height, width, vertical_first(rgb.shape[0], rgb.shape[1], height, width))


def pack_slot(rgb: np.ndarray, max_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, int, int, tuple]:
    """What one batch slot uploads: the uint8 bytes (pixels, then the x and y tables at 4-byte aligned offsets), the
    two tables' byte offsets, and the rest of its `Slot` (in_w, out_h, out_w, kx, ky, vertical_first)."""
    in_h, in_w = rgb.shape[:2]
    out_h, out_w = output_hw(in_h, in_w, max_hw)  # as the CPU path resizes
    xtab, ytab = bilinear_coefficients(in_w, out_w), bilinear_coefficients(in_h, out_h)
    x_at = (rgb.nbytes + 3) & ~3
    y_at = x_at + xtab.nbytes
    staged = np.zeros(y_at + ytab.nbytes, dtype=np.uint8)
    staged[: rgb.nbytes] = np.ascontiguousarray(rgb).reshape(-1)
    staged[x_at:y_at] = xtab.view(np.uint8).reshape(-1)
    staged[y_at:] = ytab.view(np.uint8).reshape(-1)
    fields = (in_w, out_h, out_w, xtab.shape[1] - 2, ytab.shape[1] - 2, vertical_first(in_h, in_w, out_h, out_w))
    return staged, x_at, y_at, fields


@functools.cache
def _cubin(arch: int) -> bytes:
    """The kernel for `arch` (e.g. 90), compiled once per process and kept on disk by core.cuda.compile_cached."""
    from core import cuda

    constants = {f"MEAN{c}": MEAN[c] for c in range(3)} | {f"STD{c}": STD[c] for c in range(3)}
    # float32 hex literals: the kernel's constants equal the CPU path's exactly
    options = [f"--gpu-architecture=sm_{arch}", "--std=c++17",
               *(f"-D{name}={float(value).hex()}f" for name, value in constants.items())]
    return cuda.compile_cached(KERNEL_SOURCE.read_bytes(), KERNEL_SOURCE.name, options, "cubin")


class GpuPreprocessor:
    """Device-side evaluation transform for batches of up to `max_batch` images on one CUDA stream (core.cuda).

    `upload(slot, rgb)` stages one decoded (H, W, 3) uint8 image and queues its copy; `run(images_ptr, masks_ptr,
    (B, Hp, Wp))` queues the kernel that fills slots 0..B-1 of the float32 images and bool masks buffers (device
    pointers, C-contiguous). Both only enqueue work on `stream`: give it the stream of the engine runner that reads
    the buffers and no synchronisation is needed in between; the host synchronises it before reading them.
    `sizes[slot]` is the (height, width) the image was resized to, for post-processing. Runs on the device current
    when it is made.
    """

    def __init__(self, max_batch: int, max_hw: tuple[int, int] | None = None, stream=None):
        from core import cuda

        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._cuda = cuda
        self.device = cuda.current_device()
        self._own_stream = stream is None
        self.stream = cuda.Stream() if stream is None else stream
        self.max_batch, self.max_hw = max_batch, max_hw
        self._kernel = cuda.load_kernel(_cubin(cuda.target_arch(self.device.arch)), "cubin", "preprocess_batch")
        self._staging: list = [None] * max_batch  # per slot: (pinned buffer, device buffer), both uint8
        # Per slot: an event recorded after its last copy, waited for before its pinned buffer is written again.
        self._copied = [cuda.Event() for _ in range(max_batch)]
        self._pending = [False] * max_batch
        self._slots = np.zeros(max_batch, dtype=SLOT_DTYPE)
        self._slots_host = cuda.PinnedBuffer(self._slots.nbytes, np.uint8)
        self._slots_dev = cuda.DeviceBuffer(self._slots.nbytes)
        self._slots_copied, self._slots_pending = cuda.Event(), False
        self.sizes: list[tuple[int, int] | None] = [None] * max_batch

    def _buffers(self, slot: int, nbytes: int):
        held = self._staging[slot]
        if held is None or held[0].size < nbytes:
            capacity = max(nbytes, 2 * held[0].size if held else 0)  # grow geometrically: few reallocations
            if held is not None:
                self.stream.synchronize()  # a queued kernel or copy may still use the old buffers
                for buffer in held:
                    buffer.close()
                self._pending[slot] = False
            held = self._staging[slot] = (self._cuda.PinnedBuffer(capacity, np.uint8),
                                          self._cuda.DeviceBuffer(capacity))
        return held

    def upload(self, slot: int, rgb: np.ndarray) -> tuple[int, int]:
        """Stage image `rgb` (H, W, 3 uint8) for batch slot `slot`; returns the (height, width) it is resized to."""
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is outside 0..{self.max_batch - 1}")
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
            raise ValueError(f"expected a non-empty (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
        self.device.activate()
        staged, x_at, y_at, fields = pack_slot(rgb, self.max_hw)
        pinned, dev = self._buffers(slot, staged.nbytes)
        if self._pending[slot]:
            self._copied[slot].synchronize()  # the previous copy out of this pinned buffer must be done
        host = pinned.view((staged.nbytes,))
        host[:] = staged
        dev.upload(host, self.stream)
        self._copied[slot].record(self.stream)
        self._pending[slot] = True
        self._slots[slot] = (dev.ptr, dev.ptr + x_at, dev.ptr + y_at, *fields)
        self.sizes[slot] = (fields[1], fields[2])
        return self.sizes[slot]

    def run(self, images_ptr: int, masks_ptr: int, batch_shape: tuple[int, int, int]) -> None:
        """Queue the kernel for slots 0..B-1 into images (B,3,Hp,Wp) float32 and masks (B,Hp,Wp) bool."""
        batch, height, width = batch_shape
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} is outside 1..{self.max_batch}")
        for slot in range(batch):
            size = self.sizes[slot]
            if size is None:
                raise ValueError(f"slot {slot} has no uploaded image")
            if size[0] > height or size[1] > width:
                raise ValueError(f"slot {slot} resizes to {size[0]}x{size[1]}, larger than the batch {height}x{width}")
        self.device.activate()
        if self._slots_pending:
            self._slots_copied.synchronize()
        host = self._slots_host.view((self._slots.nbytes,))
        host[:] = self._slots.view(np.uint8)
        self._slots_dev.upload(host, self.stream)
        self._slots_copied.record(self.stream)
        self._slots_pending = True
        grid = (-(-width // BLOCK[0]), -(-height // BLOCK[1]), batch)
        self._cuda.launch(self._kernel, grid, BLOCK, self.stream.handle, np.uint64(self._slots_dev.ptr),
                          np.uint64(images_ptr), np.uint64(masks_ptr), np.int32(height), np.int32(width),
                          name="preprocess_batch")

    def close(self) -> None:
        """Free the buffers, events and (when it made it) the stream, after the queued work is done."""
        if self._slots_dev is None:
            return
        self.stream.synchronize()
        held = [b for pair in self._staging if pair is not None for b in pair]
        for resource in [*held, *self._copied, self._slots_host, self._slots_dev, self._slots_copied]:
            resource.close()
        if self._own_stream:
            self.stream.close()
        self._staging, self._slots_dev = [None] * self.max_batch, None

    def __enter__(self) -> "GpuPreprocessor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
