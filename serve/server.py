"""Serve AnchorDETR over HTTP and gRPC with Triton Inference Server (PyTriton): ``python -m serve.server``.

A real Triton server, started in this process by PyTriton, serves model ``anchor_detr``: each request sends an
encoded image file, the server decodes and preprocesses it, Triton's dynamic batcher groups requests of any
image sizes (padded to the batch's largest, as the runtime does) and the answers are detections in the image's
own pixels. See docs/serving.md for the protocol and for scaling out.

Per-request errors are answered in the response (``error`` output) rather than as an HTTP/gRPC error: PyTriton
can only fail the whole batch a request was grouped into, so every request is decoded and checked on its own
before anything is batched, and a bad one gets its message while the others of its batch get their detections.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import logging
import math
import os
import shutil
import signal
import socket
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from core import labels as class_labels
from core.sidecar import MIN_SIDE
from core.cli import guarded, hw, parser, positive_float, positive_int
from core.errors import EXIT_FAILED, BadInput, Unavailable
from runtime.detector import Detector, above
from runtime.infer import warn_random_weights
from runtime.decode import add_decode_option
from runtime.preprocess import HostBatch, ImageError, TooManyPixels, open_image, original_sizes, prepare_batch, to_rgb
from runtime.runner import Engine, EngineRunner, require_file
from runtime.torch_detector import TORCH_MODE_HELP, TORCH_MODES

MODEL_NAME = "anchor_detr"
DEFAULT_THRESHOLD = 0.5
DEFAULT_TORCH_BATCH = 4
DEFAULT_DRAIN_TIMEOUT_S = 5.0
# Seconds Triton itself waits, once our drain is over, for clients to close their keep-alive connections (they
# never do on their own; nothing is served on them by then, the model is unloaded).
EXIT_TIMEOUT_S = 1
# After --drain-timeout: how long the requests still queued get to be answered with an error, and how long
# Triton and PyTriton get to stop, before what is left of the process tree is killed.
REFUSE_GRACE_S = 1.0
STOP_TIMEOUT_S = 15.0
EXIT_FORCED = EXIT_FAILED
SHUTTING_DOWN = "the server is shutting down: send this image to another server or again after it restarts"
LOAD_ATTEMPTS = 3
INSTALL_HINT = "pip install -e '.[serve]' (PyTriton needs numpy < 2: see docs/serving.md)"
LOG = logging.getLogger("serve.server")

EPILOG = f"""\
protocol (model {MODEL_NAME}):
  inputs   image      BYTES [1]  the encoded image file (JPEG, PNG, ... anything Pillow reads), one per row
           threshold  FP32  [1]  optional, keep detections scoring at least this (default {DEFAULT_THRESHOLD})
  outputs  count      INT32 [1]  detections in this row (the arrays below have at least one row: use [:count])
           scores     FP32  [-1]     labels INT32 [-1] (class ids)     names BYTES [-1] (their class names)
           boxes      FP32  [-1,4]   x0,y0,x1,y1 in the image's own pixels (EXIF orientation applied)
           size       INT32 [2]  height, width of the image as the boxes see it
           error      BYTES [1]  empty, or why this request failed (its count is then 0)
examples:
  python -m serve.server --engine engines/anchor_detr_r50_dc5_fp16.plan --instances 2
  python -m serve.server --torch-weights weights/anchor_detr_r50_dc5.safetensors --device cpu
  python -m serve.client photo.jpg --url localhost:8000
stopping: Ctrl-C or SIGTERM stops taking requests, finishes those in flight (--drain-timeout), then stops
  Triton and every process it started and removes their files
exit codes: 0 stopped by Ctrl-C or SIGTERM after every request in flight was answered,
            1 stopped, but --drain-timeout ran out (requests still queued were refused, or still running ones
              were cut off) or Triton stopped on its own, 2 bad input (engine, weights, arguments),
            3 environment (no PyTriton, no GPU, no TensorRT, a port already in use)
"""


class RequestError(BadInput):
    """What is wrong with one request; answered to that request only."""


def add_batching_options(p: argparse.ArgumentParser, queue_delay: str) -> None:
    """--max-batch, --max-queue-delay-us and --max-pixels, as serve.server and serve.triton both take them;
    `queue_delay` opens the help of --max-queue-delay-us."""
    p.add_argument("--max-batch", type=positive_int, metavar="B",
                   help=f"largest batch Triton forms (default: the engine profile's maximum; {DEFAULT_TORCH_BATCH} "
                   "for --torch-weights)")
    p.add_argument("--max-queue-delay-us", type=int, default=1000, metavar="U",
                   help=f"{queue_delay}, microseconds (default 1000)")
    p.add_argument("--max-pixels", type=positive_int, default=Image.MAX_IMAGE_PIXELS, metavar="P",
                   help="refuse images with more pixels than this before decoding them (default: Pillow's "
                   f"decompression-bomb limit, {Image.MAX_IMAGE_PIXELS})")


def add_port_options(p: Any) -> None:
    """--host and the three ports Triton listens on, as serve.server and serve.triton --serve take them (p: a
    parser or an argument group); check_port_options checks them."""
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")


def check_port_options(args: argparse.Namespace) -> None:
    for name in ("http_port", "grpc_port", "metrics_port"):
        if not 0 < getattr(args, name) < 65536:
            raise BadInput(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a port number 1-65535")
    if len({args.http_port, args.grpc_port, args.metrics_port}) != 3:
        raise BadInput("--http-port, --grpc-port and --metrics-port must differ")


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "python -m serve.server",
        "Serve an AnchorDETR engine (or the PyTorch reference) with Triton Inference Server over HTTP and gRPC.\n"
        "Clients send encoded images; decoding, preprocessing, dynamic batching and post-processing happen\n"
        "in the server. Needs the `serve` extra (PyTriton).",
        EPILOG,
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--engine", type=Path, metavar="E.plan", help="engine from `python -m netdef.build`")
    model.add_argument("--torch-weights", type=Path, metavar="W.safetensors",
                       help="serve the PyTorch reference with these weights instead of an engine")
    p.add_argument("--device", choices=("cpu", "cuda"), help="device of --torch-weights (default: cuda if present)")
    p.add_argument("--torch-mode", choices=tuple(TORCH_MODES), default="fp32", help="--torch-weights: " + TORCH_MODE_HELP)
    p.add_argument("--max-size", type=hw, metavar="HxW",
                   help="--torch-weights only: scale images to fit HxW, as an engine whose profile maximum is HxW "
                   "does (default: the official 800/1333 resize; small sizes make CPU serving fast)")
    add_port_options(p)
    p.add_argument("--instances", type=positive_int, default=1, metavar="N",
                   help="model instances (each its own execution context and stream on one shared engine; default 1)")
    add_batching_options(p, "how long a request may wait for others to fill a batch")
    add_decode_option(p, default="cpu", note=(
        "serve.server's default is cpu: Pillow and the CPU path, the exact pixels. gpu and auto put the batch's "
        "requests on the GPU path (nvImageCodec decoding each batch's good JPEGs in one call, the GPU kernel, "
        "bit-exact with the CPU path, writing the model's device inputs): an engine, or --torch-weights on CUDA; "
        "gpu is refused where that cannot run (exit 2 with --device cpu, exit 3 without nvImageCodec or a GPU), "
        "auto falls back to the CPU path. Empty, oversized (checked from the header) and undecodable files are "
        "still each request's own error"))
    p.add_argument("--no-exif", action="store_true", help="ignore EXIF orientation (boxes refer to stored pixels)")
    p.add_argument("--drain-timeout", type=positive_float, default=DEFAULT_DRAIN_TIMEOUT_S, metavar="S",
                   help="on Ctrl-C/SIGTERM, seconds to finish the requests in flight before the rest are refused "
                   f"and the server stops anyway, with exit code 1 (default {DEFAULT_DRAIN_TIMEOUT_S:g})")
    return p


def engine_models(path: Path, instances: int) -> tuple[list[Detector], Callable[[], None]]:
    """One runner (context, stream, buffers) per instance, all on one deserialised engine, and what closes them."""
    engine = Engine(path)
    runners: list[EngineRunner] = []

    def close() -> None:
        for runner in runners:
            runner.close()
        engine.close()

    try:
        for _ in range(instances):
            runners.append(EngineRunner(engine))
    except BaseException:
        close()
        raise
    return runners, close


def torch_models(weights: Path, device: str | None, instances: int,
                 max_hw: tuple[int, int] | None, mode: str = "fp32") -> tuple[list[Detector], Callable[[], None]]:
    """The PyTorch reference, loaded once and shared by the instances (it has no per-call state)."""
    from runtime.torch_detector import TorchReference

    # Padding to one feature-map pixel keeps very elongated images (scaled to a side below it) valid.
    reference = TorchReference(weights, device, min_hw=(MIN_SIDE, MIN_SIDE), max_hw=max_hw, mode=mode)
    return [reference] * instances, reference.close


class HostPreprocess:
    """Decoding and the evaluation transform on the CPU (runtime.preprocess): Pillow decodes each request, the CPU
    path resizes, normalises and pads the batch, the model runs on the arrays.

    `decode_all` answers each request on its own (an image, or the RequestError that is its answer): that is where
    a bad request is caught, before anything is batched; `detect` turns a batch of decoded images into each
    one's top-100 detections and (height, width). `GpuPreprocess` replaces both for the GPU path.
    """

    def __init__(self, model: Detector, max_pixels: int, exif: bool = True):
        self.min_hw, self.max_hw = model.min_hw, model.max_hw
        self.max_pixels, self.exif = max_pixels, exif

    def check(self, data: bytes) -> None:
        """A RequestError for an empty file, or one whose header says it has more than `max_pixels` pixels (a
        small file can expand to gigabytes: nothing is decoded to find out)."""
        with self._opened(data):
            pass

    def decode(self, data: bytes) -> Image.Image:
        """The encoded file as an RGB image, or a RequestError naming what is wrong with it."""
        with self._opened(data) as image:  # check's errors, from the same header read the decoding goes on from
            try:
                image.load()
                return to_rgb(image, exif=self.exif)
            except Exception as exc:  # anything a damaged file makes a decoder raise is this request's problem alone
                raise undecodable(exc) from None

    def decode_all(self, data: Sequence[bytes]) -> list[Any]:
        """Per file, its RGB image or its RequestError."""
        out: list[Any] = []
        for item in data:
            try:
                out.append(self.decode(item))
            except RequestError as exc:
                out.append(exc)
        return out

    def decode_checked(self, files: Sequence[bytes], decoder: Any) -> list[Any]:
        """Files that passed `check`, decoded in one `decoder.decode` call (runtime.decode.BatchDecoder: the JPEGs
        by nvImageCodec, other formats by Pillow). A file it could not decode, or every file when the call itself
        fails, goes through `decode`, so its answer is this server's own. Per file: a DeviceImage, an RGB image or
        its RequestError."""
        try:
            decoded = decoder.decode(list(files), [f"request {i}" for i in range(len(files))])
        except Exception as exc:  # the decoder failed the whole call: each file is tried again with Pillow alone
            LOG.warning("GPU decoding failed for a batch (%s: %s): decoding it with Pillow", type(exc).__name__, exc)
            decoded = [None] * len(files)
        out: list[Any] = []
        for data, image in zip(files, decoded):
            try:
                if isinstance(image, np.ndarray):  # nvImageCodec's CPU backend (BatchDecoder(device=False))
                    image = Image.fromarray(image, "RGB")
                elif isinstance(image, Image.Image):  # Pillow's, made RGB (EXIF) as `decode` does
                    image = to_rgb(image, exif=self.exif)
                elif image is None or isinstance(image, ImageError):
                    image = self.decode(data)  # raises this server's RequestError for the file
                out.append(image)
            except RequestError as exc:
                out.append(exc)
        return out

    @contextlib.contextmanager
    def _opened(self, data: bytes) -> Iterator[Image.Image]:
        if not data:
            raise RequestError("the image input is empty: send the bytes of an image file")
        try:
            image = open_image(io.BytesIO(data), self.max_pixels, "the image",
                               "send a smaller image (--max-pixels sets this server's limit)")
        except TooManyPixels as exc:
            raise RequestError(str(exc)) from None
        except Exception as exc:
            raise undecodable(exc) from None
        with image:
            yield image

    def batch(self, images: Sequence[Image.Image]) -> HostBatch:
        # Images the official resize makes larger than the profile are scaled to fit, as runtime.infer does.
        return prepare_batch(images, self.min_hw, self.max_hw)

    def detect(self, model: Detector, images: Sequence[Any]) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
        """(top-100 detections in the image's own pixels, its (height, width)) of each image of one batch."""
        prepared = self.batch(images)
        return list(zip(model(*prepared), prepared.sizes))

    def close(self) -> None:
        """Free what the preprocessing holds (nothing on the CPU)."""


def undecodable(exc: BaseException) -> RequestError:
    """The answer to a request whose file no decoder could read."""
    return RequestError(f"cannot decode the image ({type(exc).__name__}: {exc}): send a complete JPEG, PNG or other "
                        "image file")


class GpuPreprocess(HostPreprocess):
    """runtime.pipeline's GPU path for one instance: the batch's good files decoded by nvImageCodec in one call
    into device memory (`decode_all`; what it refuses, and every other format, by Pillow for that file alone; a
    file neither reads is that request's RequestError), then the GPU kernel writing the model's device inputs and
    the model run on them (`detect`). `path` is a runtime.pipeline.GpuPath of one buffer set on the instance's
    model; its `decoder` is None where files are decoded by Pillow (--decode auto without nvImageCodec)."""

    def __init__(self, model: Detector, max_pixels: int, exif: bool, path: Any):
        super().__init__(model, max_pixels, exif)
        self.model, self.path = model, path

    def decode_all(self, data: Sequence[bytes]) -> list[Any]:
        decoder = self.path.decoder
        if decoder is None:
            return super().decode_all(data)
        out: list[Any] = []
        for item in data:  # empty and oversized files never reach a decoder
            try:
                self.check(item)
                out.append(item)
            except RequestError as exc:
                out.append(exc)
        good = [i for i, item in enumerate(out) if isinstance(item, bytes)]
        for i, image in zip(good, self.decode_checked([out[i] for i in good], decoder)):
            out[i] = image
        return out

    def detect(self, model: Detector, images: Sequence[Any]) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
        sizes = original_sizes(images)
        return list(zip(model.results(self.path.run(self.path.prepare(images))(), sizes), sizes))

    def close(self) -> None:
        self.path.close()


def preprocessors(models: Sequence[Detector], max_pixels: int, exif: bool, decode: str, max_batch: int
                  ) -> tuple[list[HostPreprocess], Callable[[], None]]:
    """One preprocessing per instance, and what closes them. `decode` (--decode): cpu = Pillow and the CPU path;
    gpu = nvImageCodec and the GPU path, required (Unavailable where the model has no device inputs or the path
    cannot be set up); auto = the GPU path where the model has device inputs and it can be set up (nvImageCodec
    where installed), else the CPU path. Instances sharing one model (the reference) get a sibling each: input
    buffers and a stream of their own."""
    from runtime.decode import DECODE
    from runtime.pipeline import DeviceRunner, GpuPath, PipelineStats, open_path

    gpu_decode = DECODE[decode]
    made: list[HostPreprocess] = []
    siblings: list[Any] = []

    def close() -> None:
        for prep in made:
            prep.close()
        for sibling in siblings:
            sibling.close()

    try:
        for i, model in enumerate(models):
            on_gpu = gpu_decode is not False and isinstance(model, DeviceRunner) and model.stream is not None
            if gpu_decode and not on_gpu:
                raise Unavailable("--decode gpu feeds the GPU path, which needs a model on a GPU (an engine, or "
                                  "--torch-weights on CUDA): serve with --decode cpu")
            path = None
            if on_gpu:
                if model in models[:i]:
                    siblings.append(model.sibling())
                    model = siblings[-1]
                path = open_path(model, gpu_decode, 1, PipelineStats(), gpu_decode, exif, max_batch)
            if isinstance(path, GpuPath):
                made.append(GpuPreprocess(model, max_pixels, exif, path))
            else:
                made.append(HostPreprocess(model, max_pixels, exif))
    except BaseException:
        close()
        raise
    return made, close


def _threshold(request: Any, row: int) -> float:
    if "threshold" not in request:
        return DEFAULT_THRESHOLD
    value = float(request["threshold"][row].reshape(-1)[0])
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise RequestError(f"threshold {value} is outside [0, 1]: send a score between 0 and 1")
    return value


def _encode(rows: list[dict[str, np.ndarray] | str], class_names: dict[int, str] = class_labels.COCO_CATEGORIES
            ) -> dict[str, np.ndarray]:
    """One request's outputs: detections padded to the longest row and to at least one (a zero-length axis
    fails inside PyTriton), with `count` giving each row's real number, `names` each label's class name
    (core.labels) and `error` its message, if any."""
    counts = [0 if isinstance(r, str) else len(r["scores"]) for r in rows]
    sizes = np.zeros((len(rows), 2), np.int32)
    width = max(1, *counts)
    scores = np.zeros((len(rows), width), np.float32)
    labels = np.zeros((len(rows), width), np.int32)
    names = np.full((len(rows), width), b"", object)
    boxes = np.zeros((len(rows), width, 4), np.float32)
    errors = np.empty((len(rows), 1), object)
    for i, (row, count) in enumerate(zip(rows, counts)):
        errors[i, 0] = row.encode() if isinstance(row, str) else b""
        if not isinstance(row, str):
            sizes[i] = row["size"]
        if count:
            scores[i, :count], labels[i, :count], boxes[i, :count] = row["scores"], row["labels"], row["boxes"]
            names[i, :count] = [class_labels.label_name(class_names, k).encode() for k in row["labels"]]
    return {"count": np.array(counts, np.int32)[:, None], "scores": scores, "labels": labels, "boxes": boxes,
            "names": names, "size": sizes, "error": errors}


class Admission:
    """The model calls running now, and whether new ones are still taken (not once the server stops)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._running = 0
        self._open = True

    def enter(self) -> bool:
        with self._changed:
            if self._open:
                self._running += 1
            return self._open

    def leave(self) -> None:
        with self._changed:
            self._running -= 1
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._open = False

    def wait_idle(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._running == 0, max(0.0, timeout))


def _rows(request: Any) -> int:
    """How many rows a request has (every input of a request has the same batch size)."""
    return next((len(value) for value in request.values()), 1)


class InferFunction:
    """One instance's callable: PyTriton hands it the raw requests of one dynamic batch."""

    def __init__(self, model: Detector, preprocess: HostPreprocess, max_batch: int, admission: Admission | None = None,
                 names: dict[int, str] | None = None):
        self.model, self.preprocess, self.max_batch = model, preprocess, max_batch
        self.names = class_labels.default_names(class_labels.COCO_NUM_CLASSES) if names is None else names
        self.admission = admission or Admission()

    def __call__(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        if not self.admission.enter():  # stopping: what is still queued is answered at once
            return [_encode([SHUTTING_DOWN] * _rows(request)) for request in requests]
        try:
            return self._answer(requests)
        finally:
            self.admission.leave()

    def _answer(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        rows: list[list[Any]] = []  # per request, per row: detections or an error message
        asked: list[tuple[int, int, bytes, float]] = []
        for r, request in enumerate(requests):
            rows.append([None] * _rows(request))
            # Triton only counts a request's inputs, so one that sends `threshold` alone gets this far.
            images = request["image"] if "image" in request else None
            for row in range(len(rows[r])):
                try:
                    if images is None:
                        raise RequestError("the request has no `image` input: send the encoded image file as "
                                           "`image` (BYTES, shape [1, 1])")
                    asked.append((r, row, bytes(images[row].reshape(-1)[0]), _threshold(request, row)))
                except RequestError as exc:
                    LOG.info("request refused: %s", exc)
                    rows[r][row] = str(exc)
        good: list[tuple[int, int, Any, float]] = []
        for (r, row, _, threshold), image in zip(asked, self.preprocess.decode_all([d for _, _, d, _ in asked])):
            if isinstance(image, RequestError):
                LOG.info("request refused: %s", image)
                rows[r][row] = str(image)
            else:
                good.append((r, row, image, threshold))
        for start in range(0, len(good), self.max_batch):
            chunk = good[start : start + self.max_batch]
            found = self.preprocess.detect(self.model, [image for _, _, image, _ in chunk])
            for (r, row, _, threshold), (detections, size) in zip(chunk, found):
                kept = above(detections, threshold)
                rows[r][row] = {**kept, "labels": kept["labels"].astype(np.int32), "size": size}
        return [_encode(request_rows, self.names) for request_rows in rows]


def _check_args(args: argparse.Namespace) -> None:
    check_port_options(args)
    if args.max_queue_delay_us < 0:
        raise BadInput(f"--max-queue-delay-us {args.max_queue_delay_us}: must be at least 0")
    if args.device is not None and args.torch_weights is None:
        raise BadInput("--device applies to --torch-weights only (an engine runs on GPU 0)")
    if args.max_size is not None and args.torch_weights is None:
        raise BadInput("--max-size applies to --torch-weights only (an engine's sizes come from its profile)")
    if args.max_size is not None and min(args.max_size) < MIN_SIDE:
        raise BadInput(f"--max-size {args.max_size[0]}x{args.max_size[1]}: both sides must be at least {MIN_SIDE}")
    if args.decode == "gpu" and args.device == "cpu":
        raise BadInput("--decode gpu decodes into CUDA memory; with --device cpu serve with --decode cpu")
    if args.engine is not None:
        require_file(args.engine)
    elif not args.torch_weights.is_file():
        raise BadInput(f"--torch-weights {args.torch_weights} not found: write one with `python -m weights.extract`")


def _python_library_first() -> None:
    """Put this interpreter's libpython first for Triton's Python backend stub, which loads it by name and
    otherwise may pick another build of the same version (its model then fails to load)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir and os.path.isdir(libdir) and paths[:1] != [libdir]:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])


def _pytriton() -> Any:
    try:
        import pytriton.triton as triton
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    except ImportError as exc:
        raise Unavailable(f"serve.server needs PyTriton ({exc}): {INSTALL_HINT}") from None
    return triton, DynamicBatcher, ModelConfig, Tensor


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Unavailable (exit 3) naming the first option whose port something already listens on: Triton itself would
    only fail after PyTriton has waited a minute for it. Binds as servers do (SO_REUSEADDR: a port that only
    has connections closing is free)."""
    for option, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise Unavailable(f"{option} {port} is already in use on {host}: stop the server listening "
                                      f"there or pass another {option}") from None
                if exc.errno == errno.EACCES:
                    raise Unavailable(f"{option} {port}: not allowed to listen on it here (ports below 1024 "
                                      "need privileges): pass a port from 1024 up") from None
                raise BadInput(f"--host {host}: cannot listen there ({exc.strerror or exc}): pass an address "
                               "of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[19]), fields[0]


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [arg.decode(errors="replace") for arg in f.read().split(b"\0") if arg]
    except OSError:
        return []


def descendants(root: int) -> dict[int, int]:
    """Every process below ``root`` now, pid -> start time (a pid is only the same process with the same start)."""
    table = {int(e): stat for e in os.listdir("/proc") if e.isdigit() and (stat := _stat(int(e))) is not None}
    found: dict[int, int] = {}
    parents = [root]
    while parents:
        parents = [pid for pid, (ppid, start, _) in table.items() if ppid in parents and pid not in found]
        found.update({pid: table[pid][1] for pid in parents})
    return found


def _is_stub(pid: int) -> bool:
    return Path(next(iter(_cmdline(pid)), "")).name == "triton_python_backend_stub"


def _unpacked_folders(pids: Iterable[int]) -> set[Path]:
    """The folders Triton unpacked the model into for these Python backend stubs (``/tmp/folderXXXXXX``, named by
    the stub's first argument, ``.../1/model.py``). Triton removes them only when it unloads the model cleanly."""
    models = [Path(_cmdline(pid)[1]) for pid in pids if _is_stub(pid) and len(_cmdline(pid)) > 1]
    return {model.parents[1] for model in models if model.name == "model.py" and model.parents[1].name.startswith("folder")}


def _running(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == start and stat[2] not in "ZX"


def _kill(processes: dict[int, int], wait_s: float = 2.0) -> list[int]:
    """SIGTERM, then SIGKILL, to those of ``processes`` still running; the pids that had to be stopped."""
    left = [pid for pid, start in processes.items() if _running(pid, start)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        end = time.monotonic() + wait_s
        while any(_running(pid, processes[pid]) for pid in left) and time.monotonic() < end:
            time.sleep(0.05)
    return left


class Shutdown:
    """How the server stops on Ctrl-C or SIGTERM, within a bounded time.

    1. Triton is told to unload the model: from then on it refuses new requests for it, lets those queued and
       running finish, and unloads it when none is left (a clean drain).
    2. If that takes longer than ``drain_timeout``, the requests still queued are answered at once with an error
       (the Admission closes) and the drain counts as forced.
    3. PyTriton stops Triton and removes its workspace; then every process the server started that is still
       running is killed, and the model folders Triton's Python backend unpacked are removed.
    The exit code is 0 after a clean drain, EXIT_FORCED otherwise.
    """

    def __init__(self, admission: Admission, url: str, drain_timeout: float):
        self.admission, self.url, self.drain_timeout = admission, url, drain_timeout
        self.requested = threading.Event()
        self.signal_name = ""
        self.folders: set[Path] = set()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        self.requested.set()

    def __call__(self, server: Any) -> int:
        """Serve until Ctrl-C or SIGTERM (or until Triton stops on its own), then stop; the exit code."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.folders = _unpacked_folders(descendants(os.getpid()))  # while the stubs that name them run
        while not self.requested.wait(0.5):
            if not server.is_alive():
                LOG.error("Triton stopped on its own: see its log above")
                return self._stop(server, clean=False)
        LOG.warning("%s: taking no new requests, finishing those in flight (up to %gs, --drain-timeout)",
                    self.signal_name, self.drain_timeout)
        clean = self._drain(server)
        return self._stop(server, clean)

    @staticmethod
    def _unloaded_by(stubs: dict[int, int], deadline: float) -> bool:
        """Whether the model's Python backend stubs exited before ``deadline``: Triton ends them once the unload
        is complete, that is when no request for the model is queued or running (the unload request itself
        returns at once, and PyTriton's models are not in the repository index)."""
        while any(_running(pid, start) for pid, start in stubs.items()):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _drain(self, server: Any) -> bool:
        import tritonclient.http as http
        from pytriton.client.auth import create_auth_headers

        deadline = time.monotonic() + self.drain_timeout
        stubs = {pid: start for pid, start in descendants(os.getpid()).items() if _is_stub(pid)}
        client = http.InferenceServerClient(self.url, connection_timeout=self.drain_timeout,
                                            network_timeout=self.drain_timeout)
        try:
            # PyTriton guards the model-repository API with a token of its own.
            client.unload_model(MODEL_NAME, headers=create_auth_headers(server.get_access_token(), "http"))
            if self._unloaded_by(stubs, deadline):
                return True
            LOG.warning("--drain-timeout %gs ran out: refusing the requests still queued", self.drain_timeout)
            self.admission.close()
            self._unloaded_by(stubs, time.monotonic() + REFUSE_GRACE_S)
            return False
        except Exception as exc:  # Triton gone or not answering: nothing more to drain through it
            LOG.warning("could not unload %s for the drain (%s)", MODEL_NAME, str(exc).splitlines()[0][:200])
            self.admission.close()
            return False
        finally:
            client.close()

    def _stop(self, server: Any, clean: bool) -> int:
        # Our own resource tracker outlives this call on purpose: it unlinks leaked shared memory when we exit.
        below = descendants(os.getpid())
        ours = {pid for pid in below if (_stat(pid) or (0,))[0] == os.getpid()
                and any("multiprocessing.resource_tracker" in arg for arg in _cmdline(pid))}
        started = {pid: start for pid, start in below.items() if pid not in ours}
        workspace = getattr(getattr(server, "_workspace", None), "path", None)
        stopper = threading.Thread(target=server.stop, name="triton-stop", daemon=True)
        stopper.start()
        stopper.join(STOP_TIMEOUT_S)
        stopped = not stopper.is_alive()
        killed = _kill(started)
        if killed:
            LOG.warning("killed %d process%s Triton left running: %s", len(killed), "es" * (len(killed) != 1),
                        " ".join(map(str, killed)))
        for folder in self.folders | ({Path(workspace)} if workspace and not stopped else set()):
            shutil.rmtree(folder, ignore_errors=True)
        code = 0 if clean and stopped else EXIT_FORCED
        LOG.warning("stopped%s", "" if code == 0 else " (forced: exit code 1)")
        if not stopped:  # PyTriton is stuck waiting for a model call: its threads would keep this process alive
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


def serve_until_stopped(triton: Any, config: Any, model: dict[str, Any], banner: str,
                        until_stopped: Callable[[Any], int]) -> int:
    """Start Triton, load the model and serve until ``until_stopped(server)`` returns its exit code. A failed load
    starts a fresh Triton again: with several instances, PyTriton 0.7's instance start-up handshake sometimes loses
    a race on a busy machine (`ConnectionRefusedError` in the log) although nothing is wrong with the model."""
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        with triton.Triton(config=config) as server:
            try:
                server.bind(**model)
            except Exception as exc:  # PyTriton and tritonclient raise their own classes for a failed load
                problem = str(exc).strip().splitlines()[0][:300]
                if attempt == LOAD_ATTEMPTS:
                    raise Unavailable(f"Triton could not load {MODEL_NAME} ({problem}): see Triton's log above") from None
                LOG.warning("loading %s failed (%s); starting Triton again (%d of %d)",
                            MODEL_NAME, problem, attempt + 1, LOAD_ATTEMPTS)
                continue
            print(banner, flush=True)
            return until_stopped(server)
    raise AssertionError("unreachable")


def served_names(args: argparse.Namespace) -> dict[int, str]:
    """The class names of the served model (core.labels): the engine's sidecar, or the reference's weights."""
    if args.engine is not None:
        from core.sidecar import load_sidecar

        return class_labels.of_sidecar(load_sidecar(args.engine))
    import weights

    return weights.class_names(args.torch_weights)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    check_ports(args.host, {"--http-port": args.http_port, "--grpc-port": args.grpc_port,
                            "--metrics-port": args.metrics_port})
    triton, DynamicBatcher, ModelConfig, Tensor = _pytriton()
    if args.decode == "gpu":
        from runtime.decode import load_codec

        load_codec()  # a missing nvImageCodec is said now, before the model loads
    if args.engine is not None:
        models, close = engine_models(args.engine, args.instances)
    else:
        models, close = torch_models(args.torch_weights, args.device, args.instances, args.max_size, args.torch_mode)
    closers = [close]  # the preprocessing (GPU buffers, decoders) goes before the models it writes into
    try:
        warn_random_weights(args.torch_weights, args.engine)
        profile_batch = models[0].max_batch
        max_batch = args.max_batch or profile_batch or DEFAULT_TORCH_BATCH
        if profile_batch is not None and max_batch > profile_batch:
            raise BadInput(f"--max-batch {max_batch} exceeds the engine profile's maximum batch {profile_batch}")
        names = served_names(args)
        admission = Admission()
        preps, close_preps = preprocessors(models, args.max_pixels, not args.no_exif, args.decode, max_batch)
        closers.insert(0, close_preps)
        functions = [InferFunction(m, prep, max_batch, admission, names) for m, prep in zip(models, preps)]
        _python_library_first()
        # Until the model serves, Ctrl-C and SIGTERM interrupt the start (KeyboardInterrupt); then Shutdown drains.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        config = triton.TritonConfig(
            http_address=args.host, http_port=args.http_port, grpc_address=args.host, grpc_port=args.grpc_port,
            metrics_address=args.host, metrics_port=args.metrics_port, exit_timeout_secs=EXIT_TIMEOUT_S,
        )
        model = dict(
            model_name=MODEL_NAME,
            infer_func=functions,
            inputs=[Tensor(name="image", dtype=bytes, shape=(1,)),
                    Tensor(name="threshold", dtype=np.float32, shape=(1,), optional=True)],
            outputs=[Tensor(name="count", dtype=np.int32, shape=(1,)),
                     Tensor(name="scores", dtype=np.float32, shape=(-1,)),
                     Tensor(name="labels", dtype=np.int32, shape=(-1,)),
                     Tensor(name="boxes", dtype=np.float32, shape=(-1, 4)),
                     Tensor(name="names", dtype=bytes, shape=(-1,)),
                     Tensor(name="size", dtype=np.int32, shape=(2,)),
                     Tensor(name="error", dtype=bytes, shape=(1,))],
            config=ModelConfig(max_batch_size=max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)),
            strict=True,
        )
        banner = (f"serving {MODEL_NAME} ({len(models)} instance{'s' * (len(models) != 1)}, batches up to "
                  f"{max_batch}) on http://{args.host}:{args.http_port}, grpc {args.host}:{args.grpc_port}, "
                  f"metrics http://{args.host}:{args.metrics_port}/metrics; Ctrl-C or SIGTERM stops")
        local = "127.0.0.1" if args.host in ("0.0.0.0", "") else "::1" if args.host == "::" else args.host
        return serve_until_stopped(triton, config, model, banner,
                                   Shutdown(admission, f"{local}:{args.http_port}", args.drain_timeout))
    except KeyboardInterrupt:
        return 0  # stopped before the model was serving: nothing was in flight
    finally:
        for closer in closers:
            closer()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    p = build_parser()
    return guarded(p.prog, run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
