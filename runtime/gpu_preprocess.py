"""The evaluation transform on the GPU: two kernel launches resize, normalise and zero-pad a batch in place.

Each slot of a batch reads its decoded RGB image (H, W, 3 uint8) where it already is: the device buffer
nvImageCodec decoded into (`place`), or one copy of a Pillow-decoded image into pinned memory and on to the device
(`upload`). `first_pass` (runtime/preprocess.cu) runs Pillow's first resample pass once per intermediate pixel
into a device scratch buffer; `second_pass` then writes the float32 (B,3,Hp,Wp) `images` and the bool (B,Hp,Wp)
`masks` (True on padding) that the engine reads, at each image's batch slot.

The resize is Pillow's BILINEAR resample (libImaging/Resample.c) in the same integer arithmetic: a separable
triangle filter whose support grows with the downscale factor (antialiasing), weights normalised to sum 1 in
double precision and rounded to 22-bit fixed point, a first pass rounded to uint8, then a second pass on those
uint8 values, in the order the installed Pillow runs them (`vertical_first`). `bilinear_coefficients` builds the
fixed-point tables on the host exactly as Pillow does, and `pillow_bilinear` is a NumPy implementation of the two
passes that equals `Image.resize` bit for bit; the kernel uses the same tables and order, so its output equals the
CPU path's. The tables depend only on (input size, output size): `TableCache` uploads each pair's once and keeps
it on the device.

CUDA is reached through core.cuda (device, stream, events, pinned and device memory, kernel loading and launch);
the kernels are compiled by NVRTC and cached on disk there too (`core.cuda.compile_cached`).
"""

from __future__ import annotations

import functools
import re
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import PIL
import PIL.Image

from runtime.preprocess import NORMALISED, output_hw, stored_rgbx

PRECISION_BITS = 22  # Pillow's 32 - 8 - 2: 8 bits of result, 2 of headroom for filters with negative lobes
KERNEL_SOURCE = Path(__file__).resolve().with_name("preprocess.cu")
BLOCK = (32, 8, 1)
# Output pixels per thread of second_pass along a row, and the blocks each SM must hold at once (the kernels'
# __launch_bounds__, which caps their registers at 32 here): on the H200, 8.8 us per 640x480 -> 800x1066 image at
# batch 8 against 9.8 for 4 pixels a thread with no bound (`preprocess_bench --kernel-variants`, docs/benchmarks.md).
PIXELS_X = 2
MIN_BLOCKS = 8
# second_pass's stores: PAIRED = a thread's two pixels are neighbours, stored as one float2 per plane where the
# batch width is even (else blockDim.x apart, scalar); STREAM_STORES = the outputs are stored evict-first. Both on:
# on the H200, 8.0 us per image at batch 8 against 9.3-9.4 with both off, 14.7-15.1 at batch 1 against 14.4-16.2
# (two rounds each, docs/benchmarks.md).
PAIRED = 1
STREAM_STORES = 1

# One image's parameters as the kernels' `Slot` struct reads them (four pointers, the row pitch, eight ints: 72 bytes).
SLOT_DTYPE = np.dtype(
    [("pixels", "<u8"), ("xtab", "<u8"), ("ytab", "<u8"), ("scratch", "<u8"), ("pitch", "<i8"),
     ("in_h", "<i4"), ("in_w", "<i4"), ("out_h", "<i4"), ("out_w", "<i4"), ("kx", "<i4"), ("ky", "<i4"),
     ("vertical_first", "<i4"), ("pixel_bytes", "<i4")]
)
SCRATCH_PIXEL = 4  # the first pass stores each pixel as one 32-bit word (R, G, B, 0)
SCRATCH_ALIGN = 256  # each slot's scratch starts on its own 256-byte boundary
SLOT_RING = 4  # slot-record buffers in turn (GpuPreprocessor.run)


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

    The one place the order is decided: `pillow_bilinear` and the kernel's `Slot.vertical_first` (`plan`) both
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


def kernel_defines() -> dict[str, int]:
    """The constants preprocess.cu is compiled with, from this module's (NVRTC here, the CPU build in the tests):
    the grid that `GpuPreprocessor.run` launches is sized from the same ones."""
    return {"PIXELS_X": PIXELS_X, "BLOCK_THREADS": BLOCK[0] * BLOCK[1], "MIN_BLOCKS": MIN_BLOCKS, "PAIRED": PAIRED,
            "STREAM_STORES": STREAM_STORES}


def _cubin(arch: int) -> bytes:
    """The kernels for `arch` (e.g. 90) with the current `kernel_defines`."""
    return _compiled(arch, tuple(kernel_defines().items()))


@functools.cache
def _compiled(arch: int, defines: tuple) -> bytes:
    """Compiled once per process, and kept on disk by core.cuda.compile_cached."""
    from core import cuda

    options = [f"--gpu-architecture=sm_{arch}", "--std=c++17", *(f"-D{k}={v}" for k, v in defines)]
    return cuda.compile_cached(KERNEL_SOURCE.read_bytes(), KERNEL_SOURCE.name, options, "cubin")


class Plan(NamedTuple):
    """One slot's resize: input and output sizes and Pillow's pass order for them."""

    in_h: int
    in_w: int
    out_h: int
    out_w: int
    vertical_first: bool

    @property
    def first_pass_hw(self) -> tuple[int, int]:
        """(rows, columns) of the first pass's uint8 result, the second pass's input."""
        return (self.out_h, self.in_w) if self.vertical_first else (self.in_h, self.out_w)

    @property
    def scratch_bytes(self) -> int:
        rows, cols = self.first_pass_hw
        return -(-rows * cols * SCRATCH_PIXEL // SCRATCH_ALIGN) * SCRATCH_ALIGN


def plan(in_h: int, in_w: int, max_hw: tuple[int, int] | None = None) -> Plan:
    out_h, out_w = output_hw(in_h, in_w, max_hw)  # as the CPU path resizes
    return Plan(in_h, in_w, out_h, out_w, vertical_first(in_h, in_w, out_h, out_w))


class TableCache:
    """The resize tables on the device, one per (input size, output size) pair, made the first time a pair is
    asked for and kept; beyond `capacity` pairs the least recently used one is freed (after `before_free`, which
    waits for the kernels that may still read it). `make(table)` returns a device buffer holding the int32 table
    (anything with `.ptr` and `.close()`)."""

    def __init__(self, make: Callable[[np.ndarray], Any], capacity: int = 1024,
                 before_free: Callable[[], None] = lambda: None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._make, self.capacity, self._before_free = make, capacity, before_free
        self._tables: OrderedDict[tuple[int, int], tuple[Any, int]] = OrderedDict()
        self.made = 0
        self._lock = threading.Lock()  # a batch's slots are staged from several threads

    def __len__(self) -> int:
        return len(self._tables)

    def get(self, in_size: int, out_size: int) -> tuple[int, int]:
        """(device pointer, taps per row) of the table resampling in_size pixels to out_size."""
        key = (in_size, out_size)
        with self._lock:
            return self._get(key)

    def _get(self, key: tuple[int, int]) -> tuple[int, int]:
        in_size, out_size = key
        held = self._tables.get(key)
        if held is None:
            table = bilinear_coefficients(in_size, out_size)
            held = self._tables[key] = (self._make(table), table.shape[1] - 2)
            self.made += 1
            if len(self._tables) > self.capacity:
                self._before_free()
                self._tables.popitem(last=False)[1][0].close()
        else:
            self._tables.move_to_end(key)
        return held[0].ptr, held[1]

    def close(self) -> None:
        for buffer, _ in self._tables.values():
            buffer.close()
        self._tables.clear()


class GpuPreprocessor:
    """Device-side evaluation transform for batches of up to `max_batch` images on one CUDA stream (core.cuda).

    Fill each slot with `place(slot, ptr, height, width, pitch, owner)` (an RGB image already on the device, kept
    alive through `owner` until the kernels that read it are done) or `upload(slot, rgb)` (a host (H, W, 3) uint8
    image: one copy into pinned memory, one asynchronous copy to the device); then `run(images_ptr, masks_ptr,
    (B, Hp, Wp))` queues the kernels that fill slots 0..B-1 of the float32 images and bool masks buffers (device
    pointers, C-contiguous). All only enqueue work on `stream`: give it the stream of the engine runner that reads
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
        cubin = _cubin(cuda.target_arch(self.device.arch))
        self._first = cuda.load_kernel(cubin, "cubin", "first_pass")
        self._normalised = cuda.DeviceBuffer(NORMALISED.nbytes)  # the CPU path's table of normalised levels
        self._normalised.upload(np.ascontiguousarray(NORMALISED, dtype=np.float32), self.stream)
        self._second = cuda.load_kernel(cubin, "cubin", "second_pass")
        self.tables = TableCache(self._device_table, capacity=max(1024, 4 * max_batch),
                                 before_free=self.stream.synchronize)
        self._staging: list = [None] * max_batch  # per slot: (pinned buffer, device buffer) for host images
        # Per slot: an event recorded after its last copy, waited for before its pinned buffer is written again.
        self._copied = [cuda.Event() for _ in range(max_batch)]
        self._pending = [False] * max_batch
        self._owners: list = [None] * max_batch  # what keeps each placed device image alive
        self._ran, self._ran_pending = cuda.Event(), False  # recorded after each run's kernels
        self._waited = None  # the last decoder event this stream was made to wait for
        self._plans: list[Plan | None] = [None] * max_batch
        self._slots = np.zeros(max_batch, dtype=SLOT_DTYPE)
        # The slot records go up in one small copy per run, from a ring of buffers: the host waits only for the
        # copy made SLOT_RING runs ago, not for the last run's kernels.
        self._ring = [(cuda.PinnedBuffer(self._slots.nbytes, np.uint8), cuda.DeviceBuffer(self._slots.nbytes),
                       cuda.Event()) for _ in range(SLOT_RING)]
        self._ring_used = [False] * SLOT_RING
        self._runs = 0
        self._slots_dev = self._ring[0][1]
        self._scratch = None  # one device buffer holding every slot's first pass, grown as needed
        self.sizes: list[tuple[int, int] | None] = [None] * max_batch

    def _device_table(self, table: np.ndarray):
        buffer = self._cuda.DeviceBuffer(table.nbytes)
        buffer.upload(table, self.stream)  # from pageable memory: copied out before this returns
        return buffer

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

    def _check_slot(self, slot: int, height: int, width: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is outside 0..{self.max_batch - 1}")
        if height < 1 or width < 1:
            raise ValueError(f"expected a non-empty image, got {height}x{width}")

    def upload(self, slot: int, rgb: np.ndarray) -> tuple[int, int]:
        """Copy host image `rgb` to the device for batch slot `slot`: (H, W, 3) uint8 RGB, or (H, W, 4) whose 4th
        byte is ignored (a Pillow image's own storage, `stored_rgbx`). Returns the (height, width) it is resized to."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
            raise ValueError(f"expected an (H, W, 3) or (H, W, 4) uint8 image, got {rgb.dtype} {rgb.shape}")
        height, width, pixel_bytes = rgb.shape
        self._check_slot(slot, height, width)
        self.device.activate()
        pinned, dev = self._buffers(slot, rgb.nbytes)
        if self._pending[slot]:
            self._copied[slot].synchronize()  # the previous copy out of this pinned buffer must be done
        host = pinned.view(rgb.shape)
        np.copyto(host, rgb)  # NumPy lets go of the GIL here: slots stage side by side
        dev.upload(host, self.stream)
        self._copied[slot].record(self.stream)
        self._pending[slot] = True
        return self._set(slot, dev.ptr, height, width, width * pixel_bytes, None, pixel_bytes)

    def load(self, slot: int, image: Any) -> tuple[int, int]:
        """Slot `slot`'s image: a Pillow image is uploaded (its own 4-byte pixels where Pillow exports them, so
        nothing repacks them on the host; one copy into the slot's pinned buffer, one to the device), a decoded
        device image (runtime.decode.DeviceImage) read where it is (`place`). Returns the (height, width) it is
        resized to."""
        if isinstance(image, PIL.Image.Image):
            stored = stored_rgbx(image)
            return self.upload(slot, stored if stored is not None else np.asarray(image))
        return self.place(slot, image.ptr, image.height, image.width, image.pitch, owner=image, ready=image.ready)

    def place(self, slot: int, ptr: int, height: int, width: int, pitch: int | None = None,
              owner: Any = None, ready: Any = None) -> tuple[int, int]:
        """Use the RGB image at device address `ptr` (height rows of width x 3 bytes, `pitch` bytes apart; default
        unpitched) for batch slot `slot`, where it is; `owner` is held until a later run's kernels are done with
        it, and the kernels wait for `ready` (an event after which the pixels are complete). Returns the (height,
        width) it is resized to."""
        pitch = width * 3 if pitch is None else int(pitch)
        self._check_slot(slot, height, width)
        if pitch < width * 3:
            raise ValueError(f"row pitch {pitch} is less than {width} RGB pixels")
        self.device.activate()
        if ready is not None and ready is not self._waited:  # a decode call's images share one event
            self.stream.wait(ready)
            self._waited = ready
        return self._set(slot, int(ptr), int(height), int(width), pitch, owner, 3)

    def release(self) -> None:
        """Let go of the placed images once the caller knows the last run's kernels are done (it waited for work
        queued after them on `stream`, such as the engine's outputs), so that the next `place` does not wait for
        them on the host. In the GPU-decoding pipeline that wait held its one thread for a decode call still
        running on the hardware decoder (13% of its samples, py-spy on the H200)."""
        self._owners = [None] * self.max_batch
        self._ran_pending = False

    def _set(self, slot: int, ptr: int, height: int, width: int, pitch: int, owner: Any,
             pixel_bytes: int) -> tuple[int, int]:
        if self._owners[slot] is not None and self._ran_pending:
            self._ran.synchronize()  # the last run may still read the image this slot held
        p = self._plans[slot] = plan(height, width, self.max_hw)
        xtab, kx = self.tables.get(width, p.out_w)
        ytab, ky = self.tables.get(height, p.out_h)
        self._slots[slot] = (ptr, xtab, ytab, 0, pitch, height, width, p.out_h, p.out_w, kx, ky,
                             p.vertical_first, pixel_bytes)
        self._owners[slot] = owner
        self.sizes[slot] = (p.out_h, p.out_w)
        return self.sizes[slot]

    def _scratch_for(self, nbytes: int) -> int:
        if self._scratch is None or self._scratch.nbytes < nbytes:
            capacity = max(nbytes, 2 * self._scratch.nbytes if self._scratch is not None else 0)
            if self._scratch is not None:
                self.stream.synchronize()  # queued kernels may still use the old scratch
                self._scratch.close()
            self._scratch = self._cuda.DeviceBuffer(capacity)
        return self._scratch.ptr

    def run(self, images_ptr: int, masks_ptr: int, batch_shape: tuple[int, int, int]) -> None:
        """Queue the kernels for slots 0..B-1 into images (B,3,Hp,Wp) float32 and masks (B,Hp,Wp) bool."""
        batch, height, width = batch_shape
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} is outside 1..{self.max_batch}")
        plans = self._plans[:batch]
        for slot, p in enumerate(plans):
            if p is None:
                raise ValueError(f"slot {slot} has no image")
            if p.out_h > height or p.out_w > width:
                raise ValueError(f"slot {slot} resizes to {p.out_h}x{p.out_w}, larger than the batch {height}x{width}")
        self.device.activate()
        offsets = np.cumsum([0] + [p.scratch_bytes for p in plans])
        self._slots["scratch"][:batch] = self._scratch_for(int(offsets[-1])) + offsets[:-1]
        turn = self._runs % SLOT_RING
        pinned, self._slots_dev, copied = self._ring[turn]
        if self._ring_used[turn]:
            copied.synchronize()
        nbytes = batch * SLOT_DTYPE.itemsize
        host = pinned.view((nbytes,))
        host[:] = self._slots.view(np.uint8)[:nbytes]
        self._slots_dev.upload(host, self.stream)
        copied.record(self.stream)
        self._ring_used[turn], self._runs = True, self._runs + 1
        rows = max(p.first_pass_hw[0] for p in plans)
        cols = max(p.first_pass_hw[1] for p in plans)
        self._grids = ((-(-cols // BLOCK[0]), -(-rows // BLOCK[1]), batch),
                       (-(-width // (BLOCK[0] * PIXELS_X)), -(-height // BLOCK[1]), batch))
        self._launch(images_ptr, masks_ptr, height, width)
        self._ran.record(self.stream)
        self._ran_pending = True

    def _launch(self, images_ptr: int, masks_ptr: int, height: int, width: int) -> None:
        """The two kernels of the last `run` (its slot records on the device), queued again: what a benchmark
        captures in a graph to time the kernels alone."""
        cuda, slots = self._cuda, np.uint64(self._slots_dev.ptr)
        cuda.launch(self._first, self._grids[0], BLOCK, self.stream.handle, slots, name="first_pass")
        cuda.launch(self._second, self._grids[1], BLOCK, self.stream.handle, slots, np.uint64(self._normalised.ptr),
                    np.uint64(images_ptr), np.uint64(masks_ptr), np.int32(height), np.int32(width),
                    name="second_pass")

    def close(self) -> None:
        """Free the buffers, tables, events and (when it made it) the stream, after the queued work is done."""
        if self._slots_dev is None:
            return
        self.stream.synchronize()
        held = [b for pair in self._staging if pair is not None for b in pair]
        if self._scratch is not None:
            held.append(self._scratch)
        self.tables.close()
        ring = [resource for entry in self._ring for resource in entry]
        for resource in [*held, *self._copied, self._ran, *ring, self._normalised]:
            resource.close()
        if self._own_stream:
            self.stream.close()
        self._staging, self._slots_dev, self._scratch = [None] * self.max_batch, None, None
        self._owners = [None] * self.max_batch

    def __enter__(self) -> "GpuPreprocessor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
