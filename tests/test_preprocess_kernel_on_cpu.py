"""The GPU preprocessing kernel's source, compiled for the CPU and run against the CPU path.

`runtime/preprocess.cu` is plain C++ apart from a few CUDA names. Compiled with g++ behind a small shim
(thread and block indices as globals, a loop over the grid, IEEE-rounded float division and subtraction as the
plain operators, no FMA contraction), it runs with the exact `Slot` records and staged bytes that
`GpuPreprocessor.upload` sends to the device (`runtime.gpu_preprocess.pack_slot`). This proves the kernel's integer
resample, normalisation, padding, masks and slot indexing against `runtime.preprocess.preprocess_batch` on any
machine with a C++ compiler; only the CUDA launch and memory transfers are left to the `gpu` tests.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from plugins.nvrtc import format_define
from runtime.gpu_preprocess import BLOCK, KERNEL_SOURCE, SLOT_DTYPE, pack_slot
from runtime.preprocess import MEAN, STD, preprocess_batch

CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler (g++) to build the kernel for the CPU")

SHIM = r"""
#include <algorithm>
#include <cstddef>
using std::max;
using std::min;
struct Index3 { unsigned x, y, z; };
static Index3 blockIdx, blockDim, threadIdx;
#define __device__
#define __forceinline__ inline
#define __global__
#define __restrict__
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
"""

DRIVER = r"""
extern "C" void run_grid(const Slot* slots, float* images, bool* masks, int batch, int height, int width) {
    blockDim = {BLOCK_X, BLOCK_Y, 1};
    for (unsigned z = 0; z < (unsigned)batch; ++z)
        for (unsigned by = 0; by < (height + BLOCK_Y - 1) / BLOCK_Y; ++by)
            for (unsigned bx = 0; bx < (width + BLOCK_X - 1) / BLOCK_X; ++bx)
                for (unsigned ty = 0; ty < BLOCK_Y; ++ty)
                    for (unsigned tx = 0; tx < BLOCK_X; ++tx) {
                        blockIdx = {bx, by, z};
                        threadIdx = {tx, ty, 0};
                        preprocess_batch(slots, images, masks, height, width);
                    }
}
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kernel")
    source = folder / "preprocess_cpu.cpp"
    source.write_text(SHIM + KERNEL_SOURCE.read_text() + DRIVER)
    defines = {f"MEAN{c}": float(MEAN[c]) for c in range(3)} | {f"STD{c}": float(STD[c]) for c in range(3)}
    defines |= {"BLOCK_X": BLOCK[0], "BLOCK_Y": BLOCK[1]}
    library = folder / "preprocess_cpu.so"
    subprocess.run([CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC",
                    *(format_define(k, v) for k, v in defines.items()), str(source), "-o", str(library)],
                   check=True, capture_output=True, timeout=120)
    run = ctypes.CDLL(str(library)).run_grid
    run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return run


def kernel_batch(run, images: list[np.ndarray], height: int, width: int, max_hw=None):
    """The kernel's (images, masks) for uint8 RGB arrays, through the same staging as GpuPreprocessor.upload."""
    slots = np.zeros(len(images), dtype=SLOT_DTYPE)
    staged_all = []
    for i, rgb in enumerate(images):
        staged, x_at, y_at, fields = pack_slot(rgb, max_hw)
        staged_all.append(staged)  # kept alive: the slots hold raw pointers into it
        base = staged.ctypes.data
        slots[i] = (base, base + x_at, base + y_at, *fields)
    out = np.full((len(images), 3, height, width), np.nan, dtype=np.float32)  # the kernel must write every value
    masks = np.zeros((len(images), height, width), dtype=bool)
    run(slots.ctypes.data, out.ctypes.data, masks.ctypes.data, len(images), height, width)
    return out, masks


def random_rgb(rng, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# Upscales, antialiased downscales (both pass orders), one-pixel sides and extreme aspect ratios.
AWKWARD = [(480, 640), (600, 800), (1200, 900), (3000, 2000), (1, 1), (1, 37), (29, 1), (3000, 10), (10, 3000),
           (2, 900), (1700, 1500), (333, 501)]


@pytest.mark.parametrize("size", AWKWARD, ids=[f"{h}x{w}" for h, w in AWKWARD])
def test_kernel_equals_the_cpu_path(kernel, size):
    rgb = random_rgb(np.random.default_rng(sum(size)), *size)
    expected, expected_masks, sizes = preprocess_batch([Image.fromarray(rgb)], exif=False, max_hw=(1344, 1344))
    got, masks = kernel_batch(kernel, [rgb], *expected.shape[2:], max_hw=(1344, 1344))
    differ = np.count_nonzero(got != expected)
    assert differ == 0, f"{differ} values differ, largest by {np.nanmax(np.abs(got - expected))}"
    np.testing.assert_array_equal(masks, expected_masks)


def test_kernel_batch_slots_padding_and_profile_minimum(kernel):
    rng = np.random.default_rng(7)
    images = [random_rgb(rng, h, w) for h, w in [(48, 64), (70, 31), (2, 900), (300, 200)]]
    expected, expected_masks, _ = preprocess_batch([Image.fromarray(a) for a in images], exif=False,
                                                   min_hw=(1400, 1344), max_hw=(1344, 1344))
    got, masks = kernel_batch(kernel, images, *expected.shape[2:], max_hw=(1344, 1344))
    np.testing.assert_array_equal(got, expected)  # padding is exactly 0.0 and each image sits in its own slot
    np.testing.assert_array_equal(masks, expected_masks)
    assert masks[:, -1, -1].all() and not masks[:, 0, 0].any()


def test_kernel_on_random_sizes(kernel):
    rng = np.random.default_rng(11)
    for _ in range(12):
        h, w = int(rng.integers(1, 700)), int(rng.integers(1, 700))
        rgb = random_rgb(rng, h, w)
        expected, expected_masks, _ = preprocess_batch([Image.fromarray(rgb)], exif=False, max_hw=(1344, 1344))
        got, masks = kernel_batch(kernel, [rgb], *expected.shape[2:], max_hw=(1344, 1344))
        assert np.array_equal(got, expected) and np.array_equal(masks, expected_masks), (h, w)


class _HostMemory:
    """Host memory standing in for a device or pinned buffer: the kernel built for the CPU reads it directly."""

    def __init__(self, size: int, dtype=np.uint8) -> None:
        self.array = np.zeros(max(int(size), 1), dtype)[: int(size)]
        self.size, self.nbytes, self.ptr = int(size), self.array.nbytes, self.array.ctypes.data
        self.closed = False

    def view(self, shape):
        return self.array[: int(np.prod(shape))].reshape(shape)

    def upload(self, host: np.ndarray, stream) -> None:
        assert host.flags.c_contiguous and host.nbytes <= self.nbytes
        self.array.view(np.uint8)[: host.nbytes] = host.view(np.uint8).reshape(-1)

    def download(self, host: np.ndarray, stream) -> None:
        host.view(np.uint8).reshape(-1)[:] = self.array.view(np.uint8)[: host.nbytes]

    def close(self) -> None:
        self.closed = True


class _Ordered:
    """A stream or event: work runs at once on the CPU, so these only record that they were used and closed."""

    handle = 0

    def __init__(self) -> None:
        self.closed = False

    def record(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def host_gpu(kernel, monkeypatch):
    """core.cuda with host memory for device memory and the CPU build of the kernel for the launch, so that
    GpuPreprocessor itself (staging, slot records, buffer growth, launch arguments) runs on this machine."""
    from types import SimpleNamespace

    from core import cuda

    def launch(fn, grid, block, stream, slots, images, masks, height, width, name=""):
        assert tuple(block) == BLOCK and grid[0] * block[0] >= width and grid[1] * block[1] >= height
        fn(int(slots), int(images), int(masks), grid[2], int(height), int(width))

    monkeypatch.setattr(cuda, "current_device", lambda: SimpleNamespace(arch=90, activate=lambda: None))
    monkeypatch.setattr(cuda, "Stream", _Ordered)
    monkeypatch.setattr(cuda, "Event", _Ordered)
    monkeypatch.setattr(cuda, "PinnedBuffer", _HostMemory)
    monkeypatch.setattr(cuda, "DeviceBuffer", _HostMemory)
    monkeypatch.setattr(cuda, "load_kernel", lambda image, kind, name: kernel)
    monkeypatch.setattr(cuda, "launch", launch)
    monkeypatch.setattr("runtime.gpu_preprocess._cubin", lambda arch: b"")
    monkeypatch.setattr(cuda, "target_arch", lambda arch: arch)


def test_gpu_preprocessor_through_host_memory_equals_the_cpu_path(host_gpu):
    from runtime.gpu_preprocess import GpuPreprocessor

    rng = np.random.default_rng(13)
    small, large = [random_rgb(rng, 48, 64), random_rgb(rng, 70, 31)], [random_rgb(rng, 900, 1300)]
    with GpuPreprocessor(max_batch=2, max_hw=(1344, 1344)) as pre:
        for images in (small, large, small[::-1]):  # slot 0 grows its staging for the large image, then is reused
            expected, expected_masks, sizes = preprocess_batch([Image.fromarray(a) for a in images], exif=False,
                                                               min_hw=(320, 512), max_hw=(1344, 1344))
            b, _, h, w = expected.shape
            out, masks = _HostMemory(b * 3 * h * w, np.float32), _HostMemory(b * h * w, bool)
            out.array[:] = np.nan  # every value must be written
            assert [pre.upload(slot, a) for slot, a in enumerate(images)] == [tuple(s) for s in sizes]
            pre.run(out.ptr, masks.ptr, (b, h, w))
            np.testing.assert_array_equal(out.view((b, 3, h, w)), expected)
            np.testing.assert_array_equal(masks.view((b, h, w)), expected_masks)
        staging = [buffer for pair in pre._staging for buffer in pair]
    assert all(buffer.closed for buffer in staging) and pre.stream.closed


def test_the_kernel_compiles_into_core_cudas_disk_cache(tmp_path, monkeypatch):
    """NVRTC (no GPU needed) compiles runtime/preprocess.cu to a cubin kept by core.cuda.compile_cached; a later
    process reads the file instead of compiling (proved with a marked file)."""
    from core import cuda
    from runtime import gpu_preprocess

    try:
        cuda.nvrtc_version()
    except cuda.CompileError as exc:
        pytest.skip(f"no NVRTC: {exc}")
    monkeypatch.setenv("ANCHORTRT_KERNEL_CACHE", str(tmp_path))
    gpu_preprocess._cubin.cache_clear()
    cubin = gpu_preprocess._cubin(90)
    (cached,) = tmp_path.iterdir()
    assert cubin.startswith(b"\x7fELF") and cached.name.startswith("preprocess-") and cached.read_bytes() == cubin
    cached.write_bytes(b"from the cache")
    gpu_preprocess._cubin.cache_clear()
    assert gpu_preprocess._cubin(90) == b"from the cache"
    gpu_preprocess._cubin.cache_clear()


def test_the_pipelines_gpu_path_through_host_memory_equals_the_cpu_path(host_gpu, tmp_path):
    """runtime.pipeline's GpuPath end to end on this machine: a DeviceRunner stand-in (not an EngineRunner) whose
    input buffers are host memory, the slots staged side by side on the CPU pool, the kernel's CPU build writing
    the buffers, two buffer sets in flight. Its detections equal the CPU path's, and every runner is given back."""
    from core.sidecar import Profile
    from helpers import NumpyDetector, solid
    from runtime import pipeline

    profile = Profile((2, 320, 512), (2, 800, 800), (3, 1344, 1344))  # smallest batch 2: a lone image is repeated

    class HostRunner(NumpyDetector):
        stream = None

        def __init__(self, profile):
            super().__init__(profile)
            b, h, w = profile.max
            self._images, self._masks = _HostMemory(b * 3 * h * w, np.float32), _HostMemory(b * h * w, bool)
            self.runs, self.closed_siblings = [], []

        @property
        def input_pointers(self):
            return self._images.ptr, self._masks.ptr

        def sibling(self):
            self.last_sibling = HostRunner(self.profile)
            return self.last_sibling

        def infer_on_device(self, shape, batch=None):
            b, h, w = shape
            self.runs.append((tuple(shape), batch))
            return {k: v[:batch] for k, v in self.infer(self._images.view((b, 3, h, w)).copy(),
                                                        self._masks.view((b, h, w)).copy()).items()}

        def close(self):
            self.closed = True

    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.png")
        solid(60 + 9 * i, 40 + 7 * (i % 3), i % 3).save(paths[-1])
    runner = HostRunner(profile)
    stats = pipeline.PipelineStats()
    found = list(pipeline.detect_stream(runner, paths, threshold=0.3, batch=3, gpu_preprocess=True, stats=stats))
    # The CPU path's answer (a profile with the same sizes but a smallest batch of 1: the stand-in's infer does not
    # cut a repeated image's outputs off again, as EngineRunner.infer does)
    cpu = NumpyDetector(Profile((1, 320, 512), profile.opt, profile.max))
    expected = cpu.detect([Image.open(p) for p in paths], threshold=0.3, batch_size=3)
    assert [f.key for f in found] == paths
    for got, want in zip(found, expected):
        for key in want:
            np.testing.assert_array_equal(got.result[key], want[key])
    ran = runner.runs + runner.last_sibling.runs
    assert sorted(batch for _, batch in ran) == [1, 3, 3] and all(shape[0] >= 2 for shape, _ in ran)
    assert runner.last_sibling.closed  # the extra buffer set is freed; the caller's runner stays open
    assert not runner.closed and stats.seconds["upload"] > 0 and stats.seconds["engine"] > 0
