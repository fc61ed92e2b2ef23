"""Files to detections with the stages overlapped: decode, preprocess, engine and post-processing at once.

`bounded(source, stages, in_flight)` is the machinery: a feeder thread pulls items from `source`, each stage runs
on a thread of its own, and the caller receives the results in input order. A semaphore taken when an item leaves
the source and given back when the caller receives its result keeps at most `in_flight` items anywhere in between,
so memory stays bounded however long the input is (the stages' queues need no limit of their own).

`detect_stream` composes it for a detector (runtime.detector's contract, used here by its methods only, so this
module imports neither it nor the runner): batches of decoded RGB images (`decode_many`'s thread pool, one thread
per usable core by default, decoding up to 2 x workers images ahead), then the path's preprocessing, then its
engine step, then post-processing, each on a stage thread of its own. The path is chosen once: `CpuPath`
(resize and normalisation on the host, one task per image on a pool sized to the machine, then the detector's
`infer`) or `GpuPath` (the GPU kernel writing straight into the input buffers of a `DeviceRunner`, such as an
EngineRunner, then `start_on_device`). On the GPU path the engine stage only queues a batch's run; the
post-processing stage waits for its outputs, so the next batch is queued while the GPU still runs this one. With
GPU decoding (`device_decoded_batches`: one nvImageCodec call per `in_flight` batches, at least DECODE_CALL_IMAGES
images) the feeder thread decodes, preprocesses and starts each batch, and one stage thread waits for its outputs
and post-processes them.
An image that cannot be read becomes an `ImageError` entry of its own; the others go on. Per-stage busy time and
the process's CPU time are collected in a `PipelineStats`.
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
from collections import deque
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from core.errors import BadInput, Unavailable
from runtime.preprocess import (
    HostBatch, ImageError, PendingBatch, cpu_pool, decode_many, host_batch, original_sizes, to_rgb, usable_cpus,
)

# Busy seconds per stage. "decode" includes the conversion to RGB (EXIF orientation). With the GPU path "upload"
# is staging the decoded pixels and "preprocess" the kernel;
# on the CPU path "engine" includes the copies to and from the device (EngineRunner.infer does them in one call
# with one synchronisation), and "gpu" is the network alone where the detector times it with CUDA events.
STAGES = ("decode", "upload", "preprocess", "engine", "gpu", "postprocess")
# The command lines' --preprocess choices as `gpu_preprocess` values.
GPU_PREPROCESS = {"auto": None, "gpu": True, "cpu": False}
# The pipeline's threads hand the GIL to one another thousands of times a second. A thread coming back from a call
# that released it (a decode, a CUDA call) waits for the switch interval behind one that computes; with Python's
# 5 ms the GPU got its work in bursts. At 1 ms, on the H200 host (docs/benchmarks.md): Pillow decoding + GPU
# preprocessing 968 -> 1,373 img/s, GPU decoding 2,486 -> 4,161.
SWITCH_INTERVAL_S = 0.001


class _SwitchInterval:
    """While any pipeline runs, sys.getswitchinterval() is at most SWITCH_INTERVAL_S (a shorter one that the
    process chose stays); the value from before comes back when the last running pipeline ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._before = 0.0

    @contextmanager
    def shortened(self) -> Iterator[None]:
        with self._lock:
            if self._running == 0:
                self._before = sys.getswitchinterval()
                sys.setswitchinterval(min(self._before, SWITCH_INTERVAL_S))
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    sys.setswitchinterval(self._before)


_switch_interval = _SwitchInterval()


class PipelineStats:
    """Per-stage busy seconds (the time a stage worked, not the time it waited), image and batch counts, the
    wall time of the run and the CPU time the whole process used during it (all threads)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.images = self.errors = self.batches = self.max_live = 0
        self.decoded = {"nvimagecodec": 0, "pillow": 0}  # the images handed out, by what decoded them
        self.wall_s = self.cpu_s = 0.0
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    @contextmanager
    def run(self) -> Iterator["PipelineStats"]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield self
        finally:
            self.wall_s += time.perf_counter() - wall
            self.cpu_s += time.process_time() - cpu

    def summary(self) -> dict[str, Any]:
        images = max(self.images, 1)
        return {
            "images": self.images, "errors": self.errors, "batches": self.batches, "max_live_batches": self.max_live,
            "wall_s": self.wall_s, "images_per_s": self.images / self.wall_s if self.wall_s else 0.0,
            "cpu_ms_per_image": 1000 * self.cpu_s / images, "decoded": dict(self.decoded),
            "stage_ms_per_image": {k: 1000 * v / images for k, v in self.seconds.items()},
        }


class _Failure:
    """An exception raised on a pipeline thread, carried to the caller in the failing item's place."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def bounded(source: Iterable, stages: Sequence[Callable], in_flight: int = 2,
            stats: PipelineStats | None = None, name: str = "pipeline") -> Iterator:
    """stages[-1](...stages[0](item)) for each item of `source`, in order, each stage on its own thread, with at
    most `in_flight` items between leaving `source` and reaching the caller. An exception in the source or a stage
    is raised here at that item's place; leaving the loop early stops the source and, once the items already in
    flight are through, the threads (named `name`-feed, `name`-0, ...). With no stages it runs `source` ahead of
    the caller on the feeder thread."""
    if in_flight < 1:
        raise ValueError(f"in_flight must be at least 1, got {in_flight}")
    slots, stop, live = threading.Semaphore(in_flight), threading.Event(), [0]
    lock = threading.Lock()
    queues = [queue.SimpleQueue() for _ in range(len(stages) + 1)]

    def feed() -> None:
        items = iter(source)
        try:
            while True:
                while not slots.acquire(timeout=0.05):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                try:
                    item = next(items)
                except StopIteration:
                    return
                with lock:
                    live[0] += 1
                    if stats is not None:
                        stats.max_live = max(stats.max_live, live[0])
                queues[0].put(item)
        except BaseException as exc:  # the caller sees it in order, after the items before it
            queues[0].put(_Failure(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator source (decode_many) shuts its thread pool down now
            queues[0].put(_DONE)

    def work(fn: Callable, inbox: queue.SimpleQueue, outbox: queue.SimpleQueue) -> None:
        while True:
            item = inbox.get()
            # Items already in flight are still processed after a stop (at most in_flight of them), so a stage
            # that hands a resource to the next one (the GPU path's buffer sets) always gets it back.
            if item is not _DONE and not isinstance(item, _Failure):
                try:
                    item = fn(item)
                except BaseException as exc:
                    item = _Failure(exc)
            outbox.put(item)
            if item is _DONE:
                return

    threads = [threading.Thread(target=feed, name=f"{name}-feed", daemon=True)]
    threads += [threading.Thread(target=work, args=(fn, queues[i], queues[i + 1]), name=f"{name}-{i}", daemon=True)
                for i, fn in enumerate(stages)]
    for thread in threads:
        thread.start()
    try:
        while True:
            item = queues[-1].get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            with lock:
                live[0] -= 1
            slots.release()
            yield item
    finally:
        stop.set()
        slots.release()  # a feeder waiting for a slot wakes up and sees the stop
        for thread in threads:
            thread.join()


@dataclass
class Batch:
    """One batch on its way through: keys (paths or positions), decoded RGB images or their errors, the path's
    prepared work, then the detections."""

    keys: list
    images: list  # EXIF-oriented RGB images (Pillow's, or runtime.decode.DeviceImage), or each unreadable file's ImageError
    sizes: np.ndarray | None = None  # (height, width) of each readable image: what its boxes refer to
    work: Any = None  # what the path's `prepare` made of the readable images, for its `run`
    outputs: Callable[[], dict] | None = None  # what `run` returned: the call that gives the detector's outputs
    results: list = field(default_factory=list)

    @property
    def readable(self) -> list[int]:
        return [i for i, image in enumerate(self.images) if not isinstance(image, ImageError)]

    @property
    def rgb(self) -> list[Image.Image]:
        return [self.images[i] for i in self.readable]


def _is_path(item: Any) -> bool:
    return isinstance(item, (str, Path))


def decoded_batches(items: Iterable, batch: int, workers: int | None, exif: bool,
                    stats: PipelineStats) -> Iterator[Batch]:
    """Batches of `batch` RGB images (EXIF orientation applied when `exif`): paths are decoded and converted by
    `decode_many` on `workers` threads (None: one per usable core; keys: the paths), Pillow images are converted
    as they come (keys: their positions). Give either paths or images."""
    items = iter(items)
    first = next(items, None)
    if first is None:
        return
    pending: list = [first]

    def rest() -> Iterator:
        yield from pending
        yield from items

    if _is_path(first):
        keys: deque = deque()  # the paths decode_many has taken and not yet answered, oldest first

        def recorded() -> Iterator:
            for path in rest():
                keys.append(path)
                yield path

        decoded, key = decode_many(recorded(), workers, exif), keys.popleft
    else:
        decoded, key = (to_rgb(image, exif=exif) for image in rest()), itertools.count().__next__
    try:
        while True:
            chunk = Batch([], [])
            with stats.timed("decode"):
                for image in decoded:
                    chunk.images.append(image)
                    chunk.keys.append(key())
                    if len(chunk.images) == batch:
                        break
            if not chunk.images:
                return
            yield chunk
            if len(chunk.images) < batch:
                return
    finally:
        close = getattr(decoded, "close", None)
        if close is not None:
            close()


# Calls whose files are being read ahead of the decode call (one read task each).
READ_AHEAD = 4
# The fewest images a GPU decode call takes (more where the batches in flight hold more): nvImageCodec's hardware
# decoder gave 7,624-11,106 images/s in calls of 8 and 10,960-15,263 in calls of 32 on the H200 host. At most this
# many decoded images wait in device memory for their batches (~36 MB each for 12-megapixel photos).
DECODE_CALL_IMAGES = 32


def device_decoded_batches(paths: Iterator, batch: int, workers: int | None, exif: bool, decoder: Any,
                           stats: PipelineStats, group: int = 1) -> Iterator[Batch]:
    """Batches of `batch` files, decoded `group` batches at a time in one `decoder.decode` call
    (runtime.decode.BatchDecoder: JPEGs into device memory, the rest by Pillow, then `to_rgb`) on the thread that
    takes the batches, when it needs the call's first batch. Each call's files are read by one task on `workers`
    threads (None: one per usable core), up to READ_AHEAD calls ahead (a task per file cost more in hand-offs than
    the reads themselves); the task also runs `decoder.parse` where the decoder has one (nvImageCodec's CodeStreams,
    made there rather than inside the decode call, where each one waited for the GIL).

    `group` batches share a call (the pipeline's: its batches in flight, and at least DECODE_CALL_IMAGES images)."""
    from runtime.decode import read_file

    parse = getattr(decoder, "parse", None)

    def read(keys: list) -> list:
        items = [read_file(k) for k in keys]
        return parse(items) if parse is not None else items

    with ThreadPoolExecutor(max_workers=workers or usable_cpus(), thread_name_prefix="anchortrt-read") as pool:
        reads: deque = deque()
        while True:
            while len(reads) < READ_AHEAD:
                keys = list(itertools.islice(paths, batch * group))
                if not keys:
                    break
                reads.append((keys, pool.submit(read, keys)))
            if not reads:
                return
            keys, files = reads.popleft()
            with stats.timed("decode"):
                images = decoder.decode(files.result(), [str(k) for k in keys])
                images = [to_rgb(image, exif=exif) if isinstance(image, Image.Image) else image for image in images]
            for start in range(0, len(keys), batch):
                yield Batch(keys[start:start + batch], images[start:start + batch])


def batches_for(items: Iterable, batch: int, workers: int | None, exif: bool, stats: PipelineStats,
                decoder: Any = None, group: int = 1) -> Iterator[Batch]:
    """`device_decoded_batches` for file paths when there is a GPU `decoder`, else `decoded_batches`."""
    items = iter(items)
    first = next(items, None)
    if first is None:
        return
    rest = itertools.chain([first], items)
    if decoder is not None and _is_path(first):
        yield from device_decoded_batches(rest, batch, workers, exif, decoder, stats, group)
    else:
        yield from decoded_batches(rest, batch, workers, exif, stats)


def _record_gpu_time(stats: PipelineStats, ran: Any) -> None:
    """The network's own GPU time of the call `ran` just made, where it times one (EngineRunner.last_timing)."""
    gpu_ms = (getattr(ran, "last_timing", None) or {}).get("gpu_ms")
    if gpu_ms is not None:
        stats.add("gpu", gpu_ms / 1000)


class CpuPath:
    """Preprocessing on the host (resize, normalise, pad: one task per image on `cpu_pool`), then the detector's
    `infer` on the arrays (for an EngineRunner: the copies to the device, the engine and the copies back, in one
    call). `prepare` only starts a batch (a `PendingBatch`), so the preprocess stage goes on to the next batch
    while the pool works: every batch in flight keeps the pool busy, not one batch at a time.

    `limits` (min_hw, max_hw) replaces the detector's: eval.coco prepares one batch for several models."""

    def __init__(self, detector: Any, stats: PipelineStats, limits: tuple | None = None) -> None:
        self.detector, self.stats = detector, stats
        self.min_hw, self.max_hw = limits if limits is not None else (detector.min_hw, detector.max_hw)

    def prepare(self, rgb: Sequence[Image.Image]) -> PendingBatch:
        with self.stats.timed("preprocess"):
            return PendingBatch(rgb, self.min_hw, self.max_hw)

    def ready(self, work: PendingBatch) -> HostBatch:
        """The prepared batch, once its images are all in (the wait counts as preprocessing)."""
        with self.stats.timed("preprocess"):
            return host_batch(work)

    def run(self, work: PendingBatch) -> Callable[[], dict[str, np.ndarray]]:
        """The batch run (`infer` returns once it is done), as the call that gives its outputs."""
        prepared = self.ready(work)
        with self.stats.timed("engine"):
            outputs = self.detector.infer(prepared.images, prepared.masks)
        _record_gpu_time(self.stats, self.detector)
        return lambda: outputs

    def close(self) -> None:
        pass


@runtime_checkable
class DeviceRunner(Protocol):
    """What the GPU path needs of a detector: device input buffers it can write on the detector's stream, more
    buffer sets of the same kind, and a run of what the buffers hold. `runtime.runner.EngineRunner` is one."""

    stream: Any  # the core.cuda.Stream the runner runs on: the kernel is queued there, ahead of the engine

    @property
    def input_pointers(self) -> tuple[int, int]:
        """Device addresses of the (B,3,H,W) float32 images and (B,H,W) bool masks buffers."""

    def device_inputs(self, batch: int, height: int, width: int) -> tuple[int, int]:
        """`input_pointers` of buffers that hold a batch of this shape (a runner may grow them)."""

    def sibling(self) -> "DeviceRunner":
        """Another runner of the same model with buffers of its own."""

    def start_on_device(self, shape: tuple[int, int, int], batch: int | None = None
                        ) -> Callable[[], dict[str, np.ndarray]]:
        """Queue the run of what the buffers hold, laid out for `shape` (B, H, W), on `stream` and return; the
        returned call waits for it and gives the raw outputs of the first `batch` images. The runner is used for
        nothing else until that call."""

    def close(self) -> None:
        """Free the runner."""


class DeviceBatch(NamedTuple):
    runner: Any  # the DeviceRunner whose input buffers hold the batch
    shape: tuple[int, int, int]  # the (batch, height, width) it runs
    count: int  # the batch's own images (the rest repeat the last one up to the smallest batch)


class GpuPath:
    """GPU preprocessing into `count` buffer sets: `runner` and siblings of it, each with its own GpuPreprocessor.
    `prepare` takes a free runner, stages the batch's images and queues the kernel into its input buffers; `run`
    queues the engine after it; the call `run` returns waits for the outputs and only then gives the runner back,
    so the kernel never writes buffers the engine is still reading, nor the engine outputs not yet read."""

    def __init__(self, runner: DeviceRunner, count: int, stats: PipelineStats, gpu_decode: bool | None = False,
                 exif: bool = True, batch: int = 1) -> None:
        from runtime.decode import batch_decoder
        from runtime.gpu_preprocess import GpuPreprocessor

        self.stats = stats
        self.extra: list = []
        self.pre: dict = {}
        self.decoder = None  # runtime.decode.BatchDecoder where files are decoded on the GPU
        try:
            self.decoder = batch_decoder(gpu_decode, exif)
            for _ in range(count - 1):
                self.extra.append(runner.sibling())
            for r in [runner, *self.extra]:  # the runner's stream: its engine runs after the kernel, unsynchronised
                self.pre[id(r)] = GpuPreprocessor(r.max_batch or batch, r.max_hw, stream=r.stream)
        except BaseException:
            self.close()
            raise
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for r in [runner, *self.extra]:
            self.free.put(r)

    def prepare(self, rgb: Sequence[Image.Image]) -> DeviceBatch:
        runner = self.free.get()
        try:
            return self._fill(rgb, runner)
        except BaseException:
            self.free.put(runner)  # the engine step will not see this batch
            raise

    def _fill(self, rgb: Sequence[Any], runner: Any) -> DeviceBatch:
        """Stage the batch's images (read in place where they are on the device, else one copy each) and queue
        the kernel into `runner`'s input buffers."""
        pre = self.pre[id(runner)]
        count = max(len(rgb), runner.min_batch)
        slots = list(rgb) + [rgb[-1]] * (count - len(rgb))  # below the smallest batch: repeat the last image

        with self.stats.timed("upload"):
            # A Pillow image is copied (np.asarray, then into pinned memory): each slot stages on its own buffers
            # and event, so those slots stage side by side on the CPU pool. A device image is only placed (a few
            # microseconds of Python): on the pool its hand-off cost ~6x the work, so it is placed here.
            sizes: list = [None] * len(slots)
            hosted = [i for i, image in enumerate(slots) if isinstance(image, Image.Image)]
            for i, size in zip(hosted, cpu_pool().map(pre.load, hosted, [slots[i] for i in hosted])):
                sizes[i] = size
            for i, image in enumerate(slots):
                if sizes[i] is None:
                    sizes[i] = pre.load(i, image)
        with self.stats.timed("preprocess"):
            min_h, min_w = runner.min_hw or (1, 1)
            height = max([s[0] for s in sizes] + [min_h])
            width = max([s[1] for s in sizes] + [min_w])
            shape = (count, height, width)
            pre.run(*runner.device_inputs(*shape), shape)  # queued on the stream the engine runs on next
        return DeviceBatch(runner, shape, len(rgb))

    def run(self, work: DeviceBatch) -> Callable[[], dict[str, np.ndarray]]:
        try:
            with self.stats.timed("engine"):
                finish = work.runner.start_on_device(work.shape, work.count)
        except BaseException:
            self.free.put(work.runner)
            raise

        def outputs() -> dict[str, np.ndarray]:
            try:
                with self.stats.timed("engine"):  # the wait for the GPU
                    ran = finish()
                self.pre[id(work.runner)].release()  # the run came after the kernels on the runner's stream
                _record_gpu_time(self.stats, work.runner)
                return ran
            finally:
                self.free.put(work.runner)

        return outputs

    def close(self) -> None:
        for pre in self.pre.values():
            pre.close()
        for r in self.extra:
            r.close()
        if self.decoder is not None:
            self.decoder.close()


def _device_runner(detector: Any, gpu_preprocess: bool | None) -> DeviceRunner | None:
    """The detector as the GPU path's runner when the GPU path is to be tried, else None; asking for it (True)
    with a detector that has no device input buffers is an error."""
    if gpu_preprocess is False:
        return None
    if not isinstance(detector, DeviceRunner) or detector.stream is None:  # e.g. the reference on the CPU
        if gpu_preprocess:
            raise Unavailable("GPU preprocessing needs a detector with device input buffers (an EngineRunner, "
                              "the PyTorch reference on CUDA): use CPU preprocessing (gpu_preprocess=False, "
                              "--preprocess cpu)")
        return None
    return detector


def open_path(detector: Any, gpu_preprocess: bool | None, in_flight: int, stats: PipelineStats,
              gpu_decode: bool | None = False, exif: bool = True, batch: int = 1) -> CpuPath | GpuPath:
    """The GPU path when asked for (True: required) or by default (None) when the detector has device input
    buffers and the kernel compiles; else the CPU path. `gpu_decode` (the GPU path only): decode files with
    nvImageCodec (True: required; None: where it is installed; False: Pillow)."""
    runner = _device_runner(detector, gpu_preprocess)
    if runner is None:
        return CpuPath(detector, stats)
    try:
        return GpuPath(runner, in_flight, stats, gpu_decode, exif, batch)
    except Exception as exc:  # no cuda.core, no NVRTC, no memory for a second buffer set: the CPU path will do
        from runtime.decode import DecoderUnavailable

        # but not for a setting that is wrong, nor for GPU decoding that was required
        if isinstance(exc, BadInput) or (gpu_decode and isinstance(exc, DecoderUnavailable)):
            raise
        if gpu_preprocess:
            raise Unavailable(f"GPU preprocessing is unavailable ({exc}); pass gpu_preprocess=False") from None
        return CpuPath(detector, stats)


def preprocess_stage(path: CpuPath | GpuPath) -> Callable[[Batch], Batch]:
    """The stage that hands a batch's readable images to the path's `prepare`."""

    def stage(chunk: Batch) -> Batch:
        rgb = chunk.rgb
        if rgb:
            chunk.sizes = original_sizes(rgb)
            chunk.work = path.prepare(rgb)
        return chunk

    return stage


class Found(NamedTuple):
    key: Any  # the path, or the image's position in the input
    result: Any  # detections {"scores", "labels", "boxes"}, or the ImageError of an unreadable file
    image: Image.Image | None  # the RGB image the boxes refer to, with keep_images=True


def detect_stream(
    detector: Any,
    items: Iterable,
    threshold: float = 0.5,
    batch: int | None = None,
    exif: bool = True,
    workers: int | None = None,
    in_flight: int = 2,
    gpu_preprocess: bool | None = False,
    stats: PipelineStats | None = None,
    keep_images: bool = False,
    gpu_decode: bool | None = False,
) -> Iterator[Found]:
    """`Found` for each input (paths or Pillow images), in input order, through the overlapped pipeline.
    `workers`: decoding threads (default: one per usable core). `gpu_decode` (files on the GPU path): True =
    nvImageCodec (required), None = nvImageCodec where installed, False = Pillow (the exact path; default).
    Bad arguments are raised here, at the call; the work starts with the first `next`."""
    if (workers is not None and workers < 1) or in_flight < 1:
        raise BadInput(f"workers ({workers}) and in_flight ({in_flight}) must be at least 1")
    stats = stats if stats is not None else PipelineStats()
    batch = detector.batch_size(batch)
    runner = _device_runner(detector, gpu_preprocess)
    if gpu_decode:
        if runner is None:
            raise Unavailable("GPU decoding feeds the GPU preprocessing path, which needs a detector with device "
                              "input buffers (EngineRunner, TorchReference on CUDA): decode with Pillow "
                              "(gpu_decode=False, --decode cpu)")
        from runtime.decode import load_codec

        load_codec()  # a missing nvImageCodec is said now, before any work

    def batches(path: CpuPath | GpuPath) -> Iterator[Batch]:
        group = max(in_flight, -(-DECODE_CALL_IMAGES // batch))  # batches per decode call
        return batches_for(items, batch, workers, exif, stats, getattr(path, "decoder", None), group=group)

    return _detect_stream(detector, batches,
                          lambda: open_path(detector, gpu_preprocess, in_flight, stats, gpu_decode, exif, batch),
                          in_flight=in_flight, threshold=threshold, keep_images=keep_images, stats=stats)


def engine_stage(path: CpuPath | GpuPath) -> Callable[[Batch], Batch]:
    """The stage that starts a prepared batch's run (`path.run`, which times its own steps)."""

    def stage(chunk: Batch) -> Batch:
        if chunk.work is not None:
            chunk.outputs = path.run(chunk.work)
            chunk.work = None  # the batch's arrays or buffers are not needed any more
        return chunk

    return stage


def postprocess_stage(detector: Any, threshold: float, stats: PipelineStats) -> Callable[[Batch], Batch]:
    """The stage that waits for a batch's outputs and turns them into detections (`detector.found`).

    A stage of its own: on the H200 host the CPU path's post-processing took 1.5-1.7 busy ms per image among the
    pool's threads, and in the engine stage it held back the next batch's engine step. The wait for the outputs is
    here too, so the engine stage queues the next batch meanwhile."""

    def stage(chunk: Batch) -> Batch:
        if chunk.outputs is not None:
            outputs, chunk.outputs = chunk.outputs(), None
            with stats.timed("postprocess"):
                chunk.results = detector.found(outputs, chunk.sizes, threshold)
        return chunk

    return stage


def _detect_stream(detector: Any, batches: Callable[[Any], Iterator[Batch]],
                   opener: Callable[[], CpuPath | GpuPath], *, in_flight: int, threshold: float, keep_images: bool,
                   stats: PipelineStats) -> Iterator[Found]:
    with _switch_interval.shortened(), stats.run():
        path = opener()
        try:
            start = [preprocess_stage(path), engine_stage(path)]
            finish = [postprocess_stage(detector, threshold, stats)]
            if getattr(path, "decoder", None) is not None:
                # GPU decoding: the decode call, the kernels and the engine's start on the feeder thread, as the
                # bare loop of benchmarks.gpu_decode_bench runs them. On a thread each, every hand-off of the GIL
                # between them cost the decode call, which takes the GIL back for each image it makes: on the
                # H200 2,748 images/s staged against 4,624 fused (docs/benchmarks.md). With Pillow decoding the
                # two compositions measured the same (824 and 951 staged, 796 and 988 fused, in turns).
                def started() -> Iterator[Batch]:
                    with closing(batches(path)) as source:  # leaving early shuts its read threads down
                        for chunk in source:
                            for stage in start:
                                chunk = stage(chunk)
                            yield chunk

                chunks = bounded(started(), finish, in_flight, stats)
            else:
                chunks = bounded(batches(path), start + finish, in_flight, stats)
            with closing(chunks):  # its threads are done before the GPU path's runners close
                for chunk in chunks:
                    stats.batches += 1
                    results = iter(chunk.results)
                    for key, image in zip(chunk.keys, chunk.images):
                        stats.images += 1
                        if isinstance(image, ImageError):
                            stats.errors += 1
                            yield Found(key, image, None)
                        else:
                            stats.decoded["pillow" if isinstance(image, Image.Image) else "nvimagecodec"] += 1
                            shown = None
                            if keep_images:  # a device image comes back to the host only when asked for
                                shown = image if isinstance(image, Image.Image) else image.to_pil()
                            yield Found(key, next(results), shown)
        finally:
            path.close()
