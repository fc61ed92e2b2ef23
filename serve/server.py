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
import io
import logging
import math
import os
import signal
import sys
import sysconfig
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from core.sidecar import MIN_SIDE
from core.cli import guarded, hw, parser, positive_int
from core.errors import BadInput, Unavailable
from runtime.detector import Detector, above
from runtime.preprocess import HostBatch, prepare_batch, to_rgb
from runtime.runner import Engine, EngineRunner, require_file
from runtime.torch_detector import TORCH_MODE_HELP, TORCH_MODES

MODEL_NAME = "anchor_detr"
DEFAULT_THRESHOLD = 0.5
DEFAULT_TORCH_BATCH = 4
# Seconds Triton waits for open connections and in-flight requests after Ctrl-C/SIGTERM before it exits.
EXIT_TIMEOUT_S = 10
LOAD_ATTEMPTS = 3
INSTALL_HINT = "pip install -e '.[serve]' (PyTriton needs numpy < 2: see docs/serving.md)"
LOG = logging.getLogger("serve.server")

EPILOG = f"""\
protocol (model {MODEL_NAME}):
  inputs   image      BYTES [1]  the encoded image file (JPEG, PNG, ... anything Pillow reads), one per row
           threshold  FP32  [1]  optional, keep detections scoring at least this (default {DEFAULT_THRESHOLD})
  outputs  count      INT32 [1]  detections in this row (the arrays below have at least one row: use [:count])
           scores     FP32  [-1]     labels INT32 [-1] (COCO category ids)
           boxes      FP32  [-1,4]   x0,y0,x1,y1 in the image's own pixels (EXIF orientation applied)
           size       INT32 [2]  height, width of the image as the boxes see it
           error      BYTES [1]  empty, or why this request failed (its count is then 0)
examples:
  python -m serve.server --engine engines/anchor_detr_r50_dc5_fp16.plan --instances 2
  python -m serve.server --torch-weights weights/anchor_detr_r50_dc5.safetensors --device cpu
  python -m serve.client photo.jpg --url localhost:8000
exit codes: 0 stopped by Ctrl-C or SIGTERM, 2 bad input (engine, weights, arguments),
            3 environment (no PyTriton, no GPU, no TensorRT)
"""


class RequestError(BadInput):
    """What is wrong with one request; answered to that request only."""


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
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument("--instances", type=positive_int, default=1, metavar="N",
                   help="model instances (each its own execution context and stream on one shared engine; default 1)")
    p.add_argument("--max-batch", type=positive_int, metavar="B",
                   help=f"largest batch Triton forms (default: the engine profile's maximum; {DEFAULT_TORCH_BATCH} "
                   "for --torch-weights)")
    p.add_argument("--max-queue-delay-us", type=int, default=1000, metavar="U",
                   help="how long a request may wait for others to fill a batch, microseconds (default 1000)")
    p.add_argument("--max-pixels", type=positive_int, default=Image.MAX_IMAGE_PIXELS, metavar="P",
                   help="refuse images with more pixels than this before decoding them (default: Pillow's "
                   f"decompression-bomb limit, {Image.MAX_IMAGE_PIXELS})")
    p.add_argument("--no-exif", action="store_true", help="ignore EXIF orientation (boxes refer to stored pixels)")
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
    """Decoding and the evaluation transform on the CPU (runtime.preprocess).

    The seam for GPU preprocessing: `decode` runs per request and must stay on the host (it is where a bad
    request is caught); `batch` turns the decoded images into the model's padded (B,3,H,W) float32 images and
    (B,H,W) bool masks, and is what a GPU implementation replaces (same signature, same numbers).
    """

    def __init__(self, model: Detector, max_pixels: int, exif: bool = True):
        self.min_hw, self.max_hw = model.min_hw, model.max_hw
        self.max_pixels, self.exif = max_pixels, exif

    def decode(self, data: bytes) -> Image.Image:
        """The encoded file as an RGB image, or a RequestError naming what is wrong with it."""
        if not data:
            raise RequestError("the image input is empty: send the bytes of an image file")
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > self.max_pixels:  # before decoding: a small file can expand to gigabytes
                    raise RequestError(f"the image is {width}x{height}, over this server's limit of "
                                       f"{self.max_pixels} pixels (--max-pixels): send a smaller image")
                image.load()
                return to_rgb(image, exif=self.exif)
        except RequestError:
            raise
        except Exception as exc:  # anything a damaged file makes a decoder raise is this request's problem alone
            raise RequestError(f"cannot decode the image ({type(exc).__name__}: {exc}): send a complete JPEG, PNG "
                               "or other image file") from None

    def batch(self, images: Sequence[Image.Image]) -> HostBatch:
        # Images the official resize makes larger than the profile are scaled to fit, as runtime.infer does.
        return prepare_batch(images, self.min_hw, self.max_hw)


def _threshold(request: Any, row: int) -> float:
    if "threshold" not in request:
        return DEFAULT_THRESHOLD
    value = float(request["threshold"][row].reshape(-1)[0])
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise RequestError(f"threshold {value} is outside [0, 1]: send a score between 0 and 1")
    return value


def _encode(rows: list[dict[str, np.ndarray] | str]) -> dict[str, np.ndarray]:
    """One request's outputs: detections padded to the longest row and to at least one (a zero-length axis
    fails inside PyTriton), with `count` giving each row's real number and `error` its message, if any."""
    counts = [0 if isinstance(r, str) else len(r["scores"]) for r in rows]
    sizes = np.zeros((len(rows), 2), np.int32)
    width = max(1, *counts)
    scores = np.zeros((len(rows), width), np.float32)
    labels = np.zeros((len(rows), width), np.int32)
    boxes = np.zeros((len(rows), width, 4), np.float32)
    errors = np.empty((len(rows), 1), object)
    for i, (row, count) in enumerate(zip(rows, counts)):
        errors[i, 0] = row.encode() if isinstance(row, str) else b""
        if not isinstance(row, str):
            sizes[i] = row["size"]
        if count:
            scores[i, :count], labels[i, :count], boxes[i, :count] = row["scores"], row["labels"], row["boxes"]
    return {"count": np.array(counts, np.int32)[:, None], "scores": scores, "labels": labels, "boxes": boxes,
            "size": sizes, "error": errors}


class InferFunction:
    """One instance's callable: PyTriton hands it the raw requests of one dynamic batch."""

    def __init__(self, model: Detector, preprocess: HostPreprocess, max_batch: int):
        self.model, self.preprocess, self.max_batch = model, preprocess, max_batch

    def __call__(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        rows: list[list[Any]] = []  # per request, per row: detections or an error message
        good: list[tuple[int, int, Image.Image, float]] = []
        for r, request in enumerate(requests):
            images = request["image"]
            rows.append([None] * len(images))
            for row in range(len(images)):
                try:
                    threshold = _threshold(request, row)
                    good.append((r, row, self.preprocess.decode(bytes(images[row].reshape(-1)[0])), threshold))
                except RequestError as exc:
                    LOG.info("request refused: %s", exc)
                    rows[r][row] = str(exc)
        for start in range(0, len(good), self.max_batch):
            chunk = good[start : start + self.max_batch]
            prepared = self.preprocess.batch([image for _, _, image, _ in chunk])
            found = self.model(*prepared)
            for (r, row, _, threshold), detections, size in zip(chunk, found, prepared.sizes):
                kept = above(detections, threshold)
                rows[r][row] = {**kept, "labels": kept["labels"].astype(np.int32), "size": size}
        return [_encode(request_rows) for request_rows in rows]


def _check_args(args: argparse.Namespace) -> None:
    for name in ("http_port", "grpc_port", "metrics_port"):
        if not 0 < getattr(args, name) < 65536:
            raise BadInput(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a port number 1-65535")
    if len({args.http_port, args.grpc_port, args.metrics_port}) != 3:
        raise BadInput("--http-port, --grpc-port and --metrics-port must differ")
    if args.max_queue_delay_us < 0:
        raise BadInput(f"--max-queue-delay-us {args.max_queue_delay_us}: must be at least 0")
    if args.device is not None and args.torch_weights is None:
        raise BadInput("--device applies to --torch-weights only (an engine runs on GPU 0)")
    if args.max_size is not None and args.torch_weights is None:
        raise BadInput("--max-size applies to --torch-weights only (an engine's sizes come from its profile)")
    if args.max_size is not None and min(args.max_size) < MIN_SIDE:
        raise BadInput(f"--max-size {args.max_size[0]}x{args.max_size[1]}: both sides must be at least {MIN_SIDE}")
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


def serve_until_stopped(triton: Any, config: Any, model: dict[str, Any], banner: str) -> None:
    """Start Triton, load the model and serve until Ctrl-C/SIGTERM. A failed load starts a fresh Triton again:
    with several instances, PyTriton 0.7's instance start-up handshake sometimes loses a race on a busy machine
    (`ConnectionRefusedError` in the log) although nothing is wrong with the model."""
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
            server.serve()
            return


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    triton, DynamicBatcher, ModelConfig, Tensor = _pytriton()
    if args.engine is not None:
        models, close = engine_models(args.engine, args.instances)
    else:
        models, close = torch_models(args.torch_weights, args.device, args.instances, args.max_size, args.torch_mode)
    try:
        profile_batch = models[0].max_batch
        max_batch = args.max_batch or profile_batch or DEFAULT_TORCH_BATCH
        if profile_batch is not None and max_batch > profile_batch:
            raise BadInput(f"--max-batch {max_batch} exceeds the engine profile's maximum batch {profile_batch}")
        functions = [InferFunction(m, HostPreprocess(m, args.max_pixels, not args.no_exif), max_batch) for m in models]
        _python_library_first()
        # Ctrl-C and SIGTERM take the same path: KeyboardInterrupt, which PyTriton's serve() turns into a clean stop.
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
                     Tensor(name="size", dtype=np.int32, shape=(2,)),
                     Tensor(name="error", dtype=bytes, shape=(1,))],
            config=ModelConfig(max_batch_size=max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)),
            strict=True,
        )
        banner = (f"serving {MODEL_NAME} ({len(models)} instance{'s' * (len(models) != 1)}, batches up to "
                  f"{max_batch}) on http://{args.host}:{args.http_port}, grpc {args.host}:{args.grpc_port}, "
                  f"metrics http://{args.host}:{args.metrics_port}/metrics; Ctrl-C or SIGTERM stops")
        serve_until_stopped(triton, config, model, banner)
    except KeyboardInterrupt:
        pass  # stopped before serve() was reached
    finally:
        close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    p = build_parser()
    return guarded(p.prog, run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
