"""The GPU preprocessing kernel's source, compiled for the CPU and run against the CPU path.

`runtime/preprocess.cu` is plain C++ apart from a few CUDA names. Compiled with g++ behind a small shim
(thread and block indices as globals, a loop over each launch's grid), its two kernels run inside `GpuPreprocessor` itself, with host memory
standing in for pinned and device memory: the same `Slot` records, table cache, scratch offsets, row pitches and
launch grids as on the device. This proves the kernels' integer resample, normalisation, padding, masks and slot
indexing against `runtime.preprocess.preprocess_batch` on any machine with a C++ compiler; only the CUDA launch
and memory transfers are left to the `gpu` tests. The build is tests/helpers.build_kernel_for_cpu; the `kernel` and
`host_gpu` fixtures are in tests/conftest.py, shared with test_eval and test_serve.
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from helpers import CXX, NO_CXX, HostMemory, host_runner
from runtime.gpu_preprocess import TableCache, plan
from runtime.preprocess import preprocess_batch

pytestmark = pytest.mark.skipif(CXX is None, reason=NO_CXX)


def random_rgb(rng, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def kernel_batch(images: list[np.ndarray], height: int, width: int, max_hw=(1344, 1344), pillow: bool = False):
    """The kernels' (images, masks) for uint8 RGB arrays, through GpuPreprocessor.upload and run; with `pillow`,
    as Pillow images through `load` (their own 4-byte pixels where Pillow exports them)."""
    from runtime.gpu_preprocess import GpuPreprocessor

    out = HostMemory(len(images) * 3 * height * width, np.float32)
    out.array[:] = np.nan  # the kernel must write every value
    masks = HostMemory(len(images) * height * width, bool)
    with GpuPreprocessor(max_batch=len(images), max_hw=max_hw) as pre:
        for slot, rgb in enumerate(images):
            pre.load(slot, Image.fromarray(rgb)) if pillow else pre.upload(slot, rgb)
        pre.run(out.ptr, masks.ptr, (len(images), height, width))
    return out.view((len(images), 3, height, width)).copy(), masks.view((len(images), height, width)).copy()


# Upscales, antialiased downscales (both pass orders), one-pixel sides and extreme aspect ratios.
AWKWARD = [(480, 640), (600, 800), (1200, 900), (3000, 2000), (1, 1), (1, 37), (29, 1), (3000, 10), (10, 3000),
           (2, 900), (1700, 1500), (333, 501)]


# second_pass's two store layouts (runtime.gpu_preprocess.PAIRED): both must give the CPU path's values, on even
# batch widths (PAIRED's float2 stores) and odd ones (its scalar stores).
LAYOUTS = pytest.mark.parametrize("kernel", [{"PAIRED": 0}, {"PAIRED": 1}], ids=["apart", "paired"],
                                  indirect=True)


@LAYOUTS
@pytest.mark.parametrize("pillow", [False, True], ids=["rgb-array", "pillow-image"])
@pytest.mark.parametrize("size", AWKWARD, ids=[f"{h}x{w}" for h, w in AWKWARD])
def test_kernel_equals_the_cpu_path(host_gpu, size, pillow):
    """Packed RGB arrays (3 bytes a pixel, as nvImageCodec decodes) and Pillow images (Pillow's own 4-byte pixels,
    except 3000x2000, whose rows span two of Pillow's blocks and are packed by np.asarray) both give the CPU path's
    values exactly."""
    rgb = random_rgb(np.random.default_rng(sum(size)), *size)
    expected, expected_masks, sizes = preprocess_batch([Image.fromarray(rgb)], exif=False, max_hw=(1344, 1344))
    got, masks = kernel_batch([rgb], *expected.shape[2:], max_hw=(1344, 1344), pillow=pillow)
    differ = np.count_nonzero(got != expected)
    assert differ == 0, f"{differ} values differ, largest by {np.nanmax(np.abs(got - expected))}"
    np.testing.assert_array_equal(masks, expected_masks)


@LAYOUTS
def test_kernel_batch_slots_padding_and_profile_minimum(host_gpu):
    rng = np.random.default_rng(7)
    images = [random_rgb(rng, h, w) for h, w in [(48, 64), (70, 31), (2, 900), (300, 200)]]
    expected, expected_masks, _ = preprocess_batch([Image.fromarray(a) for a in images], exif=False,
                                                   min_hw=(1400, 1344), max_hw=(1344, 1344))
    got, masks = kernel_batch(images, *expected.shape[2:], max_hw=(1344, 1344))
    np.testing.assert_array_equal(got, expected)  # padding is exactly 0.0 and each image sits in its own slot
    np.testing.assert_array_equal(masks, expected_masks)
    assert masks[:, -1, -1].all() and not masks[:, 0, 0].any()


@LAYOUTS
def test_kernel_on_random_sizes(host_gpu):
    rng = np.random.default_rng(11)
    for _ in range(12):
        h, w = int(rng.integers(1, 700)), int(rng.integers(1, 700))
        rgb = random_rgb(rng, h, w)
        expected, expected_masks, _ = preprocess_batch([Image.fromarray(rgb)], exif=False, max_hw=(1344, 1344))
        got, masks = kernel_batch([rgb], *expected.shape[2:], max_hw=(1344, 1344))
        assert np.array_equal(got, expected) and np.array_equal(masks, expected_masks), (h, w)


def test_gpu_preprocessor_through_host_memory_equals_the_cpu_path(host_gpu):
    from runtime.gpu_preprocess import GpuPreprocessor

    rng = np.random.default_rng(13)
    small, large = [random_rgb(rng, 48, 64), random_rgb(rng, 70, 31)], [random_rgb(rng, 900, 1300)]
    with GpuPreprocessor(max_batch=2, max_hw=(1344, 1344)) as pre:
        for images in (small, large, small[::-1]):  # slot 0 grows its staging for the large image, then is reused
            expected, expected_masks, sizes = preprocess_batch([Image.fromarray(a) for a in images], exif=False,
                                                               min_hw=(320, 512), max_hw=(1344, 1344))
            b, _, h, w = expected.shape
            out, masks = HostMemory(b * 3 * h * w, np.float32), HostMemory(b * h * w, bool)
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
    gpu_preprocess._compiled.cache_clear()
    cubin = gpu_preprocess._cubin(90)
    (cached,) = tmp_path.iterdir()
    assert cubin.startswith(b"\x7fELF") and cached.name.startswith("preprocess-") and cached.read_bytes() == cubin
    cached.write_bytes(b"from the cache")
    gpu_preprocess._compiled.cache_clear()
    assert gpu_preprocess._cubin(90) == b"from the cache"
    gpu_preprocess._compiled.cache_clear()


def test_placed_images_are_read_in_place_through_their_row_pitch(host_gpu):
    """A decoder's buffer (here pitched: 7 spare bytes per row) is read where it is, with no copy; the slot holds
    its owner until the next image replaces it."""
    from runtime.gpu_preprocess import GpuPreprocessor

    rng = np.random.default_rng(17)
    images = [random_rgb(rng, 480, 640), random_rgb(rng, 1200, 900)]
    padded = [np.zeros((h, w * 3 + 7), np.uint8) for h, w, _ in (a.shape for a in images)]
    for rows, rgb in zip(padded, images):
        rows[:, : rgb.shape[1] * 3] = rgb.reshape(rgb.shape[0], -1)
    expected, expected_masks, sizes = preprocess_batch([Image.fromarray(a) for a in images], exif=False,
                                                       max_hw=(1344, 1344))
    b, _, h, w = expected.shape
    out, masks = HostMemory(b * 3 * h * w, np.float32), HostMemory(b * h * w, bool)
    out.array[:] = np.nan
    with GpuPreprocessor(max_batch=2, max_hw=(1344, 1344)) as pre:
        got = [pre.place(slot, rows.ctypes.data, *rgb.shape[:2], pitch=rows.shape[1], owner=rows)
               for slot, (rows, rgb) in enumerate(zip(padded, images))]
        assert got == [tuple(s) for s in sizes] and pre._owners[1] is padded[1]
        assert all(pair is None for pair in pre._staging)  # nothing was staged on the host
        pre.run(out.ptr, masks.ptr, (b, h, w))
        with pytest.raises(ValueError, match="pitch"):
            pre.place(0, padded[0].ctypes.data, 480, 640, pitch=640 * 3 - 1)
    np.testing.assert_array_equal(out.view((b, 3, h, w)), expected)
    np.testing.assert_array_equal(masks.view((b, h, w)), expected_masks)
    assert host_gpu == ["first_pass", "second_pass"]  # one launch of each per batch


def test_decoded_images_are_waited_for_on_the_gpu_not_the_host(host_gpu, monkeypatch):
    """The decoder's host never waits for its pixels: each decode call records one event on the decoder's stream
    after it, its images carry that event, and the preprocessing stream waits for it (once per call, whatever
    the number of images) before its kernels read them. Only `to_pil`, which reads on the host, waits there."""
    from types import SimpleNamespace

    from core import cuda
    from helpers import FakeCodec
    from runtime.decode import BatchDecoder
    from runtime.gpu_preprocess import GpuPreprocessor

    log = []

    class Stream:
        handle = 7

        def synchronize(self):
            log.append(("host waits for", self))

        def wait(self, event):
            log.append(("stream waits for", event))

        def close(self):
            pass

    class Event:
        def __init__(self, timing=True):
            self.timing, self.stream = timing, None

        def record(self, stream):
            self.stream = stream

        def synchronize(self):
            log.append(("host waits for", self))

        def close(self):
            pass

    activated = []
    gpu = SimpleNamespace(index=0, arch=90, activate=lambda: activated.append(threading.current_thread().name))
    monkeypatch.setattr(cuda, "current_device", lambda: gpu)
    monkeypatch.setattr(cuda, "Stream", Stream)
    monkeypatch.setattr(cuda, "Event", Event)
    rng = np.random.default_rng(3)
    files = []
    for h, w in [(48, 64), (30, 20), (64, 48)]:
        buffer = io.BytesIO()
        Image.fromarray(random_rgb(rng, h, w)).save(buffer, "JPEG")
        files.append(buffer.getvalue())
    decoder = BatchDecoder(exif=False, codec=FakeCodec())
    with ThreadPoolExecutor(1, thread_name_prefix="feeder") as feeder:  # the pipeline decodes on threads of its own
        first, second = feeder.submit(decoder.decode, files[:2]).result(), decoder.decode(files[2:])
    assert log == []  # decoding queued, nothing waited for
    # Each call's event is made with the device's context current on the calling thread (a CUDA requirement).
    assert activated[:1] == ["feeder_0"] and activated[1:2] == ["MainThread"]
    events = [first[0].ready, second[0].ready]
    assert first[1].ready is events[0] and events[0] is not events[1]
    # recorded on the stream the images were decoded on (the one lane's, which they keep alive)
    assert all(e.stream is image.owner[1].stream and not e.timing for e, image in zip(events, (first[0], second[0])))
    reader = Stream()
    with GpuPreprocessor(max_batch=3, max_hw=(1344, 1344), stream=reader) as pre:
        log.clear()
        sizes = [pre.load(slot, image) for slot, image in enumerate(first + second)]
        assert log == [("stream waits for", events[0]), ("stream waits for", events[1])]
        assert sizes == [plan(i.height, i.width, (1344, 1344))[2:4] for i in first + second]
        # A slot placed again after a run waits on the host for that run's kernels (they may still read the image
        # it held), unless the caller said they are done (`release`: it waited for the outputs queued after them).
        h, w = max(z[0] for z in sizes), max(z[1] for z in sizes)
        images, masks = HostMemory(3 * 3 * h * w, np.float32), HostMemory(3 * h * w, bool)
        pre.run(images.ptr, masks.ptr, (3, h, w))
        log.clear()
        pre.load(0, second[0])
        assert log == [("host waits for", pre._ran)]  # (the stream already waits for this image's decode call)
        pre.run(images.ptr, masks.ptr, (3, h, w))
        pre.release()
        log.clear()
        pre.load(0, first[0])
        assert log == [("stream waits for", events[0])]
    log.clear()
    first[0].to_pil()
    assert log == [("host waits for", events[0])]
    decoder.close()


def test_table_cache_makes_each_pair_once_and_frees_the_least_recently_used():
    made, freed, waited = [], [], []

    class Buffer:
        def __init__(self, table):
            self.table, self.ptr = table, 1000 + len(made)
            made.append(self)

        def close(self):
            freed.append(self)

    cache = TableCache(Buffer, capacity=2, before_free=lambda: waited.append(len(made)))
    ptr, taps = cache.get(640, 1066)
    assert cache.get(640, 1066) == (ptr, taps) and len(made) == 1  # the same pair is made once
    assert taps == made[0].table.shape[1] - 2 == 3 and made[0].table.shape[0] == 1066
    cache.get(480, 800)
    cache.get(640, 1066)  # now the most recently used
    cache.get(3000, 800)  # over capacity: (480, 800) goes, after waiting for the kernels
    assert freed == [made[1]] and waited == [3] and len(cache) == 2
    assert cache.get(640, 1066)[0] == ptr and len(made) == 3
    cache.close()
    assert set(freed) == set(made)


def test_plan_follows_the_cpu_paths_size_and_scratch_layout():
    p = plan(480, 640, (1344, 1344))
    assert (p.out_h, p.out_w, p.vertical_first) == (800, 1066, False)
    assert p.first_pass_hw == (480, 1066) and p.scratch_bytes % 256 == 0 and p.scratch_bytes >= 480 * 1066 * 3
    tall = plan(3000, 10, None)
    if tall.vertical_first:  # Pillow 13: the height shrinks most, so the vertical pass runs first
        assert tall.first_pass_hw == (tall.out_h, 10)
    else:
        assert tall.first_pass_hw == (3000, tall.out_w)


def test_the_gpu_path_with_gpu_decoding_equals_the_cpu_path(host_gpu, tmp_path, monkeypatch):
    """The whole GPU path on this machine: files decoded in one call per batch by a stand-in nvImageCodec (Pillow's
    pixels in "device" memory, read in place through their row pitch), PNGs and a corrupt file through Pillow, the
    kernels (CPU build) writing into a DeviceRunner's input buffers. Detections equal the CPU path's, in order,
    the corrupt file is its own error, and at most in_flight batches are ever alive."""
    from helpers import NumpyDetector, fake_gpu_decoding, solid

    from runtime import decode
    from runtime.pipeline import PipelineStats

    codec = fake_gpu_decoding(monkeypatch)
    files = []
    for i in range(9):
        path = tmp_path / f"{i}.{'png' if i % 3 == 1 else 'jpg'}"
        solid(40 + 17 * i, 30 + 11 * (i % 4), i % 3).save(path)
        files.append(path)
    files[4].write_bytes(files[3].read_bytes()[:100])  # a truncated JPEG in the middle of a batch

    stats = PipelineStats()
    got = host_runner().detect_files(files, threshold=0.3, batch=2, in_flight=2, gpu_preprocess=True,
                                    gpu_decode=True, stats=stats)
    expected = NumpyDetector().detect_files(files, threshold=0.3, batch=2)
    assert len(got) == len(expected) == 9
    for i, (g, e) in enumerate(zip(got, expected)):
        if i == 4:
            assert isinstance(g, decode.ImageError) and isinstance(e, decode.ImageError)
            assert str(g).startswith(str(files[4]))
            continue
        for key in e:
            np.testing.assert_array_equal(g[key], e[key])
    assert sum(len(call) for call in codec.calls) == 6  # the six complete JPEGs went to the codec, in batch calls
    assert stats.max_live <= 2 and stats.errors == 1
    assert stats.summary()["decoded"] == {"nvimagecodec": 6, "pillow": 2}  # Pillow: the two readable PNGs


@pytest.mark.parametrize("gpu_decode", [True, False])
def test_with_gpu_decoding_one_thread_decodes_preprocesses_and_starts_each_batch(host_gpu, tmp_path, monkeypatch,
                                                                               gpu_decode):
    """With GPU decoding the decode call, the kernels and the engine's start run on one thread, the pipeline's
    feeder (each stage thread more was a GIL hand-off per batch), and the outputs are waited for on another; no
    decode thread is made. With Pillow decoding the kernels and the start each have a stage thread of their own.
    The detections are the same either way."""
    from helpers import HostRunner, fake_gpu_decoding, solid
    from runtime import pipeline

    threads: dict = {"decode": set(), "kernels": set(), "start": set(), "outputs": set()}
    here = lambda step: threads[step].add(threading.current_thread().name)  # noqa: E731
    codec = fake_gpu_decoding(monkeypatch)
    real_decode = codec.Decoder.decode
    monkeypatch.setattr(codec.Decoder, "decode", lambda self, *a, **k: here("decode") or real_decode(self, *a, **k))
    from runtime.gpu_preprocess import GpuPreprocessor

    run, release, released = GpuPreprocessor.run, GpuPreprocessor.release, []
    monkeypatch.setattr(GpuPreprocessor, "run", lambda self, *a: here("kernels") or run(self, *a))
    # once a batch's outputs are back its kernels are done: the next `place` on its buffers need not wait for them
    monkeypatch.setattr(GpuPreprocessor, "release", lambda self: released.append(self) or release(self))

    class Traced(HostRunner):
        def sibling(self):
            return Traced(self.profile)

        def start_on_device(self, shape, batch=None):
            here("start")
            finish = super().start_on_device(shape, batch)
            return lambda: here("outputs") or finish()

    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.jpg")
        solid(50 + 11 * i, 40 + 5 * i, i % 3).save(paths[-1])
    found = list(pipeline.detect_stream(Traced(), paths, threshold=0.3, batch=2, in_flight=2, gpu_preprocess=True,
                                        gpu_decode=gpu_decode))
    if gpu_decode:
        assert threads["decode"] == threads["kernels"] == threads["start"] == {"pipeline-feed"}
        assert threads["outputs"] == {"pipeline-0"}
    else:
        assert threads["decode"] == set()  # Pillow decoded the files
        assert (threads["kernels"], threads["start"], threads["outputs"]) == ({"pipeline-0"}, {"pipeline-1"},
                                                                             {"pipeline-2"})
    assert len(released) == 4  # one per batch
    expected = HostRunner().detect([Image.open(p) for p in paths], threshold=0.3, batch_size=2)
    assert [f.key for f in found] == paths
    for got, want in zip(found, expected):
        for key in want:
            np.testing.assert_array_equal(got.result[key], want[key])  # the stand-in codec decodes as Pillow


def test_leaving_a_gpu_decoding_stream_early_stops_its_threads(host_gpu, tmp_path, monkeypatch):
    from helpers import HostRunner, fake_gpu_decoding, solid
    from runtime import pipeline

    fake_gpu_decoding(monkeypatch)
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.jpg")
        solid(50 + 3 * i, 40, i % 3).save(paths[-1])
    found = pipeline.detect_stream(HostRunner(), paths, batch=2, in_flight=2, gpu_preprocess=True, gpu_decode=True)
    assert next(found).key == paths[0]
    found.close()
    left = [t.name for t in threading.enumerate() if t.name.startswith(("pipeline-", "anchortrt-read"))]
    assert left == []


def test_the_engine_stage_queues_the_next_batch_before_this_one_s_outputs_are_back(host_gpu, tmp_path):
    """On the GPU path the engine stage only queues a batch (`start_on_device`); its outputs are waited for in the
    post-processing stage. Here a batch's outputs are handed over only once the next batch has been queued: with
    the wait in the engine stage that could never happen (here: a timeout). Every runner comes back."""
    from helpers import HostRunner, solid
    from runtime import pipeline

    batches = 4
    queued = [threading.Event() for _ in range(batches)]
    order: list = []

    class Queued(HostRunner):
        def sibling(self):
            return Queued(self.profile)

        def start_on_device(self, shape, batch=None):
            finish, n = super().start_on_device(shape, batch), len(order)
            order.append(n)
            queued[n].set()

            def outputs():
                if n + 1 < batches:
                    assert queued[n + 1].wait(timeout=5), f"batch {n + 1} was not queued before batch {n}'s wait"
                return finish()

            return outputs

    paths = []
    for i in range(2 * batches - 1):
        paths.append(tmp_path / f"{i}.png")
        solid(50 + 11 * i, 40 + 5 * i, i % 3).save(paths[-1])
    runner = Queued()
    stats = pipeline.PipelineStats()
    found = list(pipeline.detect_stream(runner, paths, threshold=0.3, batch=2, in_flight=3, gpu_preprocess=True,
                                        stats=stats))
    assert [f.key for f in found] == paths and order == list(range(batches))
    expected = HostRunner().detect([Image.open(p) for p in paths], threshold=0.3, batch_size=2)
    for got, want in zip(found, expected):
        for key in want:
            np.testing.assert_array_equal(got.result[key], want[key])


def test_the_pipelines_gpu_path_through_host_memory_equals_the_cpu_path(host_gpu, tmp_path):
    """runtime.pipeline's GpuPath end to end on this machine: a DeviceRunner stand-in (not an EngineRunner) whose
    input buffers are host memory, the slots staged side by side on the CPU pool, the kernel's CPU build writing
    the buffers, two buffer sets in flight. Its detections equal the CPU path's, and every runner is given back."""
    from core.sidecar import Profile
    from helpers import NumpyDetector, solid
    from runtime import pipeline

    profile = Profile((2, 320, 512), (2, 800, 800), (3, 1344, 1344))  # smallest batch 2: a lone image is repeated

    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.png")
        solid(60 + 9 * i, 40 + 7 * (i % 3), i % 3).save(paths[-1])
    runner = host_runner(profile)
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
