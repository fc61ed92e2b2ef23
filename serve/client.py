"""Send images to ``python -m serve.server``: ``python -m serve.client IMG ... [--url localhost:8000] [--grpc]``.

Prints the same table and writes the same COCO results JSON as ``runtime.infer`` (its printing helpers), with
the detections computed by the server. Needs tritonclient (the `serve` extra).
"""

from __future__ import annotations

import argparse
import http.client
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core.sidecar import check_output_path
from core.cli import guarded, parser, positive_float, positive_int, probability
from core.errors import Unavailable
from core.progress import ProgressBar
from runtime.infer import coco_records, finish, image_id, print_detections

MODEL_NAME = "anchor_detr"
DEFAULT_URLS = {False: "localhost:8000", True: "localhost:8001"}
OUTPUTS = ("count", "scores", "labels", "boxes", "names", "size", "error")
PROGRESS_FROM = 8  # images: fewer are done before a bar would say anything

EPILOG = """\
examples:
  python -m serve.client photo.jpg                         table of detections (server on localhost:8000)
  python -m serve.client val2017/*.jpg --grpc --threshold 0 --json results.json --concurrency 8
exit codes: 0 all images done, 1 some images failed (unreadable file, refused by the server, no answer
            within --timeout or the server went away; the others are printed and in --json), 2 bad arguments,
            3 no AnchorDETR server answering at --url, or it went away before answering any image
"""


class RequestFailed(Exception):
    """The server refused one image, or gave no answer for it (the message names why)."""


class NoAnswer(RequestFailed):
    """No answer came for one image: the server did not answer within the timeout, or it went away."""

    def __init__(self, message: str, timed_out: bool):
        super().__init__(message)
        self.timed_out = timed_out


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "python -m serve.client",
        "Detect objects with an AnchorDETR server started by `python -m serve.server`: each image file is\n"
        "sent as it is (the server decodes and preprocesses it); prints a table of detections per image\n"
        "(label, class name, score, box x0 y0 x1 y1 in pixels) and optionally writes COCO results.",
        EPILOG,
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMG", help="image files")
    p.add_argument("--url", help="server address host:port (default localhost:8000, or localhost:8001 with --grpc)")
    p.add_argument("--grpc", action="store_true", help="use gRPC instead of HTTP")
    p.add_argument("--threshold", type=probability, default=0.5,
                   help="keep detections scoring at least this (default 0.5; 0 keeps all top-100)")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="write COCO results [{image_id, category_id, bbox [x,y,w,h], score}] (image ids as runtime.infer)")
    p.add_argument("--concurrency", type=positive_int, default=4, metavar="N", help="requests in flight at once (default 4)")
    p.add_argument("--timeout", type=positive_float, default=60.0, metavar="S", help="seconds to wait for one answer (default 60)")
    return p


def _module(grpc: bool) -> Any:
    try:
        if grpc:
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError as exc:
        raise Unavailable(f"serve.client needs tritonclient ({exc}): pip install 'tritonclient[http,grpc]'") from None
    return module


class Client:
    """Requests to one server; safe to share between threads (each thread gets its own tritonclient client,
    which is not thread-safe itself)."""

    def __init__(self, url: str | None = None, grpc: bool = False, timeout: float = 60.0, model: str = MODEL_NAME):
        self.module = _module(grpc)
        self.url, self.grpc, self.timeout, self.model = url or DEFAULT_URLS[grpc], grpc, timeout, model
        self._local = threading.local()

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            if self.grpc:
                client = self.module.InferenceServerClient(self.url)
            else:
                client = self.module.InferenceServerClient(self.url, network_timeout=self.timeout,
                                                            connection_timeout=self.timeout)
            self._local.client = client
        return client

    def _no_answer(self, exc: BaseException) -> NoAnswer | None:
        """What a failed call means when no answer came from the server: None when it did answer (an error)."""
        status = str(getattr(exc, "status", lambda: None)() or "")
        if isinstance(exc, TimeoutError) or status == "StatusCode.DEADLINE_EXCEEDED":
            return NoAnswer(f"the server at {self.url} did not answer within --timeout {self.timeout:g} s: raise "
                            "--timeout (a busy server queues requests behind each other)", timed_out=True)
        if isinstance(exc, (OSError, http.client.HTTPException)) or status == "StatusCode.UNAVAILABLE":
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            return NoAnswer(f"no answer from the server at {self.url} ({detail})", timed_out=False)
        return None

    def check_ready(self) -> None:
        """Unavailable unless an AnchorDETR server answers at the URL with the model ready."""
        try:
            ready = self._client().is_model_ready(self.model)
            # Triton's metrics port answers any GET with an empty 200: only the real server describes the model.
            metadata = self._client().get_model_metadata(self.model) if ready else None
        except Exception as exc:  # refused connections surface as OSError (HTTP) or InferenceServerException (gRPC)
            gone = self._no_answer(exc)
            problem = (str(gone) if gone is not None and gone.timed_out
                       else f"no AnchorDETR server answers at {self.url} ({str(exc).strip().splitlines()[0][:200]})")
            raise Unavailable(f"{problem}: start one with `python -m serve.server`, or pass --url with its "
                              f"{'gRPC' if self.grpc else 'HTTP'} port") from None
        if not ready:
            raise Unavailable(f"the server at {self.url} has no ready model {self.model}: is it serve.server?")
        inputs = metadata["inputs"] if isinstance(metadata, dict) else getattr(metadata, "inputs", [])
        names = {i["name"] if isinstance(i, dict) else i.name for i in inputs}
        if "image" not in names:
            raise Unavailable(f"the model {self.model} at {self.url} takes no `image` input: point --url at "
                              "`python -m serve.server` or a `serve.triton` ensemble (a `--raw` repository takes "
                              "preprocessed tensors)")

    def inputs(self, data: bytes, threshold: float | None) -> list[Any]:
        image = self.module.InferInput("image", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[data]], dtype=object))
        if threshold is None:
            return [image]
        limit = self.module.InferInput("threshold", [1, 1], "FP32")
        limit.set_data_from_numpy(np.array([[threshold]], dtype=np.float32))
        return [image, limit]

    def detect(self, data: bytes, threshold: float | None = None) -> dict[str, np.ndarray]:
        """Detections of one encoded image: scores, labels, boxes, names (N rows; a server from before class
        names sends none: numbers) and size (height, width); RequestFailed with the server's message when it refuses this image."""
        from tritonclient.utils import InferenceServerException

        kwargs = {"client_timeout": self.timeout} if self.grpc else {}
        try:
            result = self._client().infer(self.model, self.inputs(data, threshold), **kwargs)
        except Exception as exc:  # tritonclient, gevent and sockets each raise their own classes
            gone = self._no_answer(exc)
            if gone is not None:
                raise gone from None
            if not isinstance(exc, InferenceServerException):
                raise
            raise RequestFailed(str(exc).splitlines()[0]) from None
        out = {name: result.as_numpy(name) for name in OUTPUTS}
        error = out["error"].reshape(-1)[0]
        if error:
            raise RequestFailed(error.decode() if isinstance(error, bytes) else str(error))
        count = int(out["count"].reshape(-1)[0])
        found = {"scores": out["scores"][0, :count], "labels": out["labels"][0, :count],
                 "boxes": out["boxes"][0, :count], "size": out["size"][0]}
        names = out["names"][0, :count] if out["names"] is not None else [str(int(k)) for k in found["labels"]]
        found["names"] = {int(k): n.decode() if isinstance(n, bytes) else str(n) for k, n in zip(found["labels"], names)}
        return found


def _send_all(client: Client, args: argparse.Namespace) -> list[dict[str, np.ndarray] | str | NoAnswer]:
    """Each image's detections, or why it failed (a NoAnswer when the server gave none), in the input order."""

    def one(path: Path) -> dict[str, np.ndarray] | str | NoAnswer:
        try:
            data = path.read_bytes()
        except OSError as exc:
            return f"{path}: cannot read ({exc.strerror or exc})"
        try:
            return client.detect(data, args.threshold)
        except NoAnswer as exc:
            return exc
        except RequestFailed as exc:
            return f"{path}: refused by the server: {exc}"

    answers: list[Any] = [None] * len(args.images)
    bar = ProgressBar(len(args.images), "images") if len(args.images) >= PROGRESS_FROM else None
    pool = ThreadPoolExecutor(args.concurrency)
    try:
        futures = {pool.submit(one, path): i for i, path in enumerate(args.images)}
        for future in as_completed(futures):
            answers[futures[future]] = future.result()
            if bar is not None:
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C: no new request, only those already sent
        if bar is not None:
            bar.close()
    return answers


def run(args: argparse.Namespace) -> int:
    if args.json is not None:
        check_output_path(args.json, "--json", [("image", path) for path in args.images])
    client = Client(args.url, args.grpc, args.timeout)
    client.check_ready()
    answers = _send_all(client, args)
    if all(isinstance(found, NoAnswer) and not found.timed_out for found in answers):
        raise Unavailable(f"the server went away before answering any image: {answers[0]}")
    failed, records, total = [], [], 0
    for index, (path, found) in enumerate(zip(args.images, answers)):
        if not isinstance(found, dict):
            print(f"skipped: {path}: {found}" if isinstance(found, NoAnswer) else f"skipped: {found}", file=sys.stderr)
            failed.append(str(path))
            continue
        height, width = (int(v) for v in found["size"])
        print_detections(path, (width, height), found, args.threshold, found["names"])
        total += len(found["scores"])
        records += coco_records(image_id(path, index), found, found["names"])
    return finish(args.json, records, len(args.images), failed, total)


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    return guarded(p.prog, run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
