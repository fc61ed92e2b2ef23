"""Files to detections with the stages overlapped: decode, preprocess, engine and post-processing at once.

`bounded(source, stages, in_flight)` is the machinery: a feeder thread pulls items from `source`, each stage runs
on a thread of its own, and the caller receives the results in input order. A semaphore taken when an item leaves
the source and given back when the caller receives its result keeps at most `in_flight` items anywhere in between,
so memory stays bounded however long the input is (the stages' queues need no limit of their own).

`detect_stream` composes it for a `Detector`: batches of decoded images (`decode_many`'s thread pool, which
decodes up to 2 x workers images ahead), then preprocessing (CPU `preprocess_batch`, or the GPU kernel writing
straight into an `EngineRunner`'s input buffers), then the engine and post-processing. An image that cannot be
read becomes an `ImageError` entry of its own; the others go on. Per-stage busy time and the process's CPU time
are collected in a `PipelineStats`.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image

from core.errors import BadInput, Unavailable
from runtime.preprocess import ImageError, decode_many, preprocess_batch, to_rgb

# Busy seconds per stage. With the GPU path "upload" is staging the decoded pixels and "preprocess" the kernel;
# on the CPU path "engine" includes the copies to and from the device (EngineRunner.infer does them in one call
# with one synchronisation), and "gpu" is the network alone where the detector times it with CUDA events.
STAGES = ("decode", "upload", "preprocess", "engine", "gpu", "postprocess")
# The command lines' --preprocess choices as `gpu_preprocess` values.
GPU_PREPROCESS = {"auto": None, "gpu": True, "cpu": False}


class PipelineStats:
    """Per-stage busy seconds (the time a stage worked, not the time it waited), image and batch counts, the
    wall time of the run and the CPU time the whole process used during it (all threads)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.images = self.errors = self.batches = self.max_live = 0
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
            "cpu_ms_per_image": 1000 * self.cpu_s / images,
            "stage_ms_per_image": {k: 1000 * v / images for k, v in self.seconds.items()},
        }


class _Failure:
    """An exception raised on a pipeline thread, carried to the caller in the failing item's place."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def bounded(source: Iterable, stages: Sequence[Callable], in_flight: int = 2,
            stats: PipelineStats | None = None) -> Iterator:
    """stages[-1](...stages[0](item)) for each item of `source`, in order, each stage on its own thread, with at
    most `in_flight` items between leaving `source` and reaching the caller. An exception in the source or a stage
    is raised here at that item's place; leaving the loop early stops the source and, once the items already in
    flight are through, the threads."""
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

    threads = [threading.Thread(target=feed, name="pipeline-feed", daemon=True)]
    threads += [threading.Thread(target=work, args=(fn, queues[i], queues[i + 1]), name=f"pipeline-{i}", daemon=True)
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
    """One batch on its way through: keys (paths or indices), decoded images or their errors, then arrays."""

    keys: list
    images: list  # PIL images, or the ImageError of each unreadable file
    rgb: list = field(default_factory=list)  # the readable images, EXIF-oriented RGB
    arrays: tuple | None = None  # (images (B,3,H,W), masks (B,H,W), original sizes (B,2))
    runner: Any = None  # GPU path: the runner whose input buffers hold this batch
    shape: tuple | None = None  # GPU path: the (batch, height, width) the runner runs
    results: list = field(default_factory=list)

    @property
    def readable(self) -> list[int]:
        return [i for i, image in enumerate(self.images) if not isinstance(image, ImageError)]


def _is_path(item: Any) -> bool:
    return isinstance(item, (str, Path))


def decoded_batches(items: Iterable, batch: int, workers: int, stats: PipelineStats) -> Iterator[Batch]:
    """Batches of `batch` decoded images: paths are decoded on `workers` threads (keys: the paths), Pillow images
    are taken as they are (keys: their positions). Give either paths or images."""
    items = iter(items)
    first = next(items, None)
    if first is None:
        return
    pending: list = [first]

    def rest() -> Iterator:
        yield from pending
        yield from items

    if _is_path(first):
        paths: deque = deque()  # the paths decode_many has taken and not yet answered, oldest first

        def recorded() -> Iterator:
            for path in rest():
                paths.append(path)
                yield path

        decoded, key = decode_many(recorded(), workers), paths.popleft
    else:
        decoded, key = rest(), itertools.count().__next__
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


def cpu_preprocess(min_hw, max_hw, exif: bool, stats: PipelineStats) -> Callable[[Batch], Batch]:
    """The stage that resizes, normalises and pads the readable images of a batch on the CPU."""

    def stage(chunk: Batch) -> Batch:
        with stats.timed("preprocess"):
            chunk.rgb = [to_rgb(chunk.images[i], exif=exif) for i in chunk.readable]
            if chunk.rgb:
                images, masks, _ = preprocess_batch(chunk.rgb, exif=False, min_hw=min_hw, max_hw=max_hw)
                sizes = np.array([(image.height, image.width) for image in chunk.rgb])
                chunk.arrays = (images, masks, sizes)
        return chunk

    return stage


class _GpuPath:
    """GPU preprocessing into `in_flight` buffer sets: runners sharing the detector's Engine, each with its own
    GpuPreprocessor. A batch takes a free runner in the preprocess stage and gives it back after the engine ran,
    so the kernel never writes buffers the engine is still reading."""

    def __init__(self, runner: Any, count: int, exif: bool, stats: PipelineStats) -> None:
        from runtime.gpu_preprocess import GpuPreprocessor

        self.exif, self.stats = exif, stats
        self.extra: list = []
        self.pre: dict = {}
        try:
            for _ in range(count - 1):
                self.extra.append(runner.sibling())
            for r in [runner, *self.extra]:  # the runner's stream: its engine runs after the kernel, unsynchronised
                self.pre[id(r)] = GpuPreprocessor(r.max_batch, r.max_hw, stream=r.stream)
        except BaseException:
            self.close()
            raise
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for r in [runner, *self.extra]:
            self.free.put(r)

    def preprocess(self, chunk: Batch) -> Batch:
        chunk.rgb = [to_rgb(chunk.images[i], exif=self.exif) for i in chunk.readable]
        if not chunk.rgb:
            return chunk
        runner = chunk.runner = self.free.get()
        try:
            self._fill(chunk, runner)
        except BaseException:
            self.free.put(runner)  # the engine stage will not see this batch
            raise
        return chunk

    def _fill(self, chunk: Batch, runner: Any) -> None:
        """Upload the batch's images and run the kernel into `runner`'s input buffers."""
        pre = self.pre[id(runner)]
        with self.stats.timed("upload"):
            sizes = [pre.upload(slot, np.asarray(image)) for slot, image in enumerate(chunk.rgb)]
            count = max(len(sizes), runner.profile.min[0])
            for slot in range(len(sizes), count):  # below the profile's smallest batch: repeat the last image
                sizes.append(pre.upload(slot, np.asarray(chunk.rgb[-1])))
        with self.stats.timed("preprocess"):
            height = max([s[0] for s in sizes] + [runner.min_hw[0]])
            width = max([s[1] for s in sizes] + [runner.min_hw[1]])
            chunk.shape = (count, height, width)
            pre.run(*runner.input_pointers, chunk.shape)  # queued on the stream the engine runs on next
        chunk.arrays = (None, None, np.array([(image.height, image.width) for image in chunk.rgb]))

    def close(self) -> None:
        for pre in self.pre.values():
            pre.close()
        for r in self.extra:
            r.close()


def _gpu_possible(detector: Any, gpu_preprocess: bool | None) -> bool:
    """Whether to try the GPU path; asking for it (True) with a detector other than an EngineRunner is an error."""
    from runtime.runner import EngineRunner

    if gpu_preprocess is False:
        return False
    if not isinstance(detector, EngineRunner):
        if gpu_preprocess:
            raise Unavailable("GPU preprocessing needs a TensorRT engine runner (EngineRunner): use CPU "
                              "preprocessing (gpu_preprocess=False, --preprocess cpu)")
        return False
    return True


def _gpu_path(detector: Any, gpu_preprocess: bool | None, in_flight: int, exif: bool,
              stats: PipelineStats) -> _GpuPath | None:
    """The GPU path when asked for (True: required) or by default (None) when the detector is an EngineRunner and
    the kernel compiles; else None (the CPU path)."""
    if not _gpu_possible(detector, gpu_preprocess):
        return None
    try:
        return _GpuPath(detector, in_flight, exif, stats)
    except Exception as exc:  # no cuda.core, no NVRTC, no memory for a second buffer set: the CPU path will do
        if gpu_preprocess:
            raise Unavailable(f"GPU preprocessing is unavailable ({exc}); pass gpu_preprocess=False") from None
        return None


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
    workers: int = 4,
    in_flight: int = 2,
    gpu_preprocess: bool | None = False,
    stats: PipelineStats | None = None,
    keep_images: bool = False,
) -> Iterator[Found]:
    """`Found` for each input (paths or Pillow images), in input order, through the overlapped pipeline. Bad
    arguments are raised here, at the call; the work starts with the first `next`."""
    if workers < 1 or in_flight < 1:
        raise BadInput(f"workers ({workers}) and in_flight ({in_flight}) must be at least 1")
    stats = stats if stats is not None else PipelineStats()
    batch = detector.batch_size(batch)
    _gpu_possible(detector, gpu_preprocess)
    return _detect_stream(detector, items, threshold, batch, exif, workers, in_flight, gpu_preprocess, stats,
                          keep_images)


def _detect_stream(detector, items, threshold, batch, exif, workers, in_flight, gpu_preprocess, stats,
                   keep_images) -> Iterator[Found]:
    with stats.run():
        gpu = _gpu_path(detector, gpu_preprocess, in_flight, exif, stats)
        try:
            if gpu is not None:
                preprocess = gpu.preprocess
            else:
                preprocess = cpu_preprocess(detector.min_hw, detector.max_hw, exif, stats)

            def engine(chunk: Batch) -> Batch:
                if chunk.arrays is None:
                    return chunk
                images, masks, sizes = chunk.arrays
                ran = chunk.runner or detector
                with stats.timed("engine"):
                    if gpu is not None:
                        try:
                            outputs = ran.infer_on_device(chunk.shape, len(chunk.rgb))
                        finally:
                            gpu.free.put(ran)
                    else:
                        outputs = detector.infer(images, masks)
                gpu_ms = (getattr(ran, "last_timing", None) or {}).get("gpu_ms")
                if gpu_ms is not None:
                    stats.add("gpu", gpu_ms / 1000)
                with stats.timed("postprocess"):
                    chunk.results = detector.found(outputs, sizes, threshold)
                chunk.arrays = None  # the batch's arrays are not needed any more
                return chunk

            source = decoded_batches(items, batch, workers, stats)
            chunks = bounded(source, [preprocess, engine], in_flight, stats)
            with closing(chunks):  # its threads are done before the GPU path's runners close
                for chunk in chunks:
                    stats.batches += 1
                    results, rgb = iter(chunk.results), iter(chunk.rgb)
                    for key, image in zip(chunk.keys, chunk.images):
                        stats.images += 1
                        if isinstance(image, ImageError):
                            stats.errors += 1
                            yield Found(key, image, None)
                        else:
                            shown = next(rgb)
                            yield Found(key, next(results), shown if keep_images else None)
        finally:
            if gpu is not None:
                gpu.close()
