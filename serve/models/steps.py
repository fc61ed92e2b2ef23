"""What the ensemble's Python-backend models compute, without Triton (see serve.models).

- `Preprocess` (anchor_detr_pre): per request, check the threshold and the image (serve.server's own checks, so
  both servers refuse the same requests with the same messages); per Triton batch, decode the good images (on a GPU
  instance one runtime.decode call into device memory, Pillow for what nvImageCodec does not decode; on a CPU
  instance Pillow) and run the evaluation transform of all of them into one batch padded to its largest image, on
  the GPU (runtime.gpu_preprocess's kernel reading the decoded images where they are, the result left in device
  memory and handed on through DLPack) or with runtime.preprocess on the CPU.
- `EngineStandIn` (anchor_detr_trt without TensorRT): the PyTorch reference with the top-100 as the engine built
  with ``--postprocess`` emits it.
- `answer` (anchor_detr_post): boxes scaled to each image's original size, the request's threshold, serve.server's
  answer encoding.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from core import labels
from core.cli import hw
from core.errors import BadInput, Unavailable
from runtime.decode import DECODE, batch_decoder
from runtime.detector import above
from runtime.postprocess import from_engine_outputs, postprocess
from serve.server import HostPreprocess, RequestError, _encode, _threshold

__all__ = ["Preprocess", "EngineStandIn", "answer", "decoder_for", "parameters", "RequestError"]


def parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """A model config's ``parameters`` (as the Python backend hands them to `initialize`) as plain strings."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def class_names(params: Mapping[str, str]) -> dict[int, str]:
    """The class names serve.triton put in a step's ``labels`` parameter (core.labels)."""
    return {int(k): v for k, v in json.loads(params.get(labels.KEY, "{}")).items()}


def _size(text: str) -> tuple[int, int] | None:
    return hw(text) if text else None


class DeviceArray:
    """A C-contiguous array in device memory, freed once it and every view of its rows are gone (Triton holds
    the views handed to it until it has copied them)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any):
        from core import cuda

        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        buffer = cuda.DeviceBuffer(self.shape[0] * self.row_bytes)
        self.ptr = buffer.ptr
        weakref.finalize(self, buffer.close)

    def rows(self, start: int, stop: int) -> Any:
        """Rows start..stop-1 as a DLPack-capable view (cuda.core), keeping this array alive."""
        from cuda.core import Buffer
        from cuda.core.utils import StridedMemoryView

        part = Buffer.from_handle(self.ptr + start * self.row_bytes, (stop - start) * self.row_bytes, owner=self)
        return StridedMemoryView.from_buffer(part, (stop - start, *self.shape[1:]), dtype=self.dtype)


class GpuBatcher:
    """runtime.gpu_preprocess's kernel writing a padded batch into fresh device memory on one GPU."""

    def __init__(self, device_id: int, max_batch: int, min_hw: tuple[int, int] | None,
                 max_hw: tuple[int, int] | None):
        from core import cuda
        from runtime.gpu_preprocess import GpuPreprocessor

        cuda.init(device_id)
        self.min_hw = min_hw or (1, 1)
        self.kernel = GpuPreprocessor(max_batch, max_hw)

    def __call__(self, images: Sequence[Any]) -> tuple[DeviceArray, DeviceArray]:
        """The padded batch of Pillow images (uploaded) and decoded device images (read where they are)."""
        self.kernel.device.activate()
        sizes = [self.kernel.load(slot, image) for slot, image in enumerate(images)]
        height = max(self.min_hw[0], *(h for h, _ in sizes))
        width = max(self.min_hw[1], *(w for _, w in sizes))
        batch = DeviceArray((len(images), 3, height, width), np.float32)
        masks = DeviceArray((len(images), height, width), np.bool_)
        self.kernel.run(batch.ptr, masks.ptr, (len(images), height, width))
        self.kernel.stream.synchronize()  # Triton reads the memory on a stream of its own
        return batch, masks

    def close(self) -> None:
        self.kernel.close()


def rows(array: Any, start: int, stop: int) -> Any:
    """Rows start..stop-1 of a host (numpy) or device (`DeviceArray`) batch."""
    return array[start:stop] if isinstance(array, np.ndarray) else array.rows(start, stop)


def decoder_for(decode: str, device_id: int | None, exif: bool = True, **options: Any) -> Any:
    """The runtime.decode.BatchDecoder the pre step decodes with, or None for Pillow. `decode` is the model's
    ``decode`` parameter (serve.triton's --decode): auto = nvImageCodec on a GPU instance where it is installed and
    makes a decoder, gpu = nvImageCodec (required: a CPU instance or a missing nvImageCodec is an Unavailable),
    cpu = Pillow. `options` go to BatchDecoder (a stand-in codec in tests)."""
    if decode not in DECODE:
        raise BadInput(f"decode parameter {decode!r}: expected one of {', '.join(DECODE)}; rewrite the repository "
                       "with `python -m serve.triton --decode ...`")
    gpu_decode = DECODE[decode]
    if device_id is None:
        if gpu_decode:
            raise Unavailable("decode=gpu needs a GPU instance of anchor_detr_pre: write the repository with "
                              "--engine or --device cuda, or with --decode cpu")
        return None
    return batch_decoder(gpu_decode, exif, **options)


class Preprocess:
    """anchor_detr_pre's work. ``device_id`` None: the CPU path; else the GPU kernel on that device, fed by the GPU
    decoder that `decoder_for` picks for ``decode`` (or `decoder`, given)."""

    def __init__(self, min_hw: tuple[int, int] | None, max_hw: tuple[int, int] | None, max_pixels: int,
                 exif: bool = True, device_id: int | None = None, max_batch: int = 1, decode: str = "auto",
                 decoder: Any = None):
        self.min_hw, self.max_hw, self.exif = min_hw, max_hw, exif
        self.host = HostPreprocess(SimpleNamespace(min_hw=min_hw, max_hw=max_hw), max_pixels, exif)
        self.gpu = None if device_id is None else GpuBatcher(device_id, max_batch, min_hw, max_hw)
        try:  # after GpuBatcher: the decoder is made on the instance's device, current by then
            self.decoder = decoder if decoder is not None else decoder_for(decode, device_id, exif)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], device_id: int | None, max_batch: int) -> "Preprocess":
        return cls(_size(params["min_hw"]), _size(params["max_hw"]), int(params["max_pixels"]),
                   params["exif"] == "true", device_id, max_batch, params.get("decode", "auto"))

    @property
    def decoding(self) -> str:
        """Which decoder this instance uses, in words (anchor_detr_pre logs it at start)."""
        return "nvImageCodec (GPU), Pillow for the rest" if self.decoder is not None else "Pillow"

    def requests(self, inputs: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> list[list[Any] | RequestError]:
        """Each request's decoded RGB images, or the RequestError that is its answer, for (image rows of BYTES,
        threshold or None) per request of one Triton batch. Thresholds, empty inputs and image headers (the pixel
        limit, before any decoding) are checked per request; then the images are decoded: with Pillow one by one
        (serve.server's decode), or on the GPU all the batch's JPEGs in one runtime.decode call (device images),
        Pillow for the others. An image neither decodes fails its request alone, with serve.server's message; a
        request with several images succeeds or fails as a whole."""
        answers: list[list[Any] | RequestError] = []
        for image, threshold in inputs:
            limits = {} if threshold is None else {"threshold": threshold}
            try:
                rows = []
                for row in range(len(image)):
                    _threshold(limits, row)
                    data = bytes(image[row].reshape(-1)[0])
                    if self.decoder is None:
                        rows.append(self.host.decode(data))
                    else:
                        self.host.check(data)  # header checks only: decoding is the batch's
                        rows.append(data)
                answers.append(rows)
            except RequestError as exc:
                answers.append(exc)
        if self.decoder is not None:
            self._decode_batch(answers)
        return answers

    def _decode_batch(self, answers: list[list[Any] | RequestError]) -> None:
        """Replace the encoded files in `answers` by their images (or their request by its RequestError): all of
        the batch's files in one serve.server `decode_checked` call."""
        places = [(r, i) for r, rows in enumerate(answers) if not isinstance(rows, RequestError)
                  for i in range(len(rows))]
        if not places:
            return
        if self.gpu is not None:
            self.gpu.kernel.device.activate()
        decoded = self.host.decode_checked([answers[r][i] for r, i in places], self.decoder)
        for (r, i), image in zip(places, decoded):
            if isinstance(answers[r], RequestError):
                continue  # another image of this request failed already
            if isinstance(image, RequestError):
                answers[r] = image
            else:
                answers[r][i] = image

    def batch(self, images: Sequence[Image.Image]) -> tuple[Any, Any]:
        """(images (B,3,H,W) float32, masks (B,H,W) bool) padded to the largest image: numpy arrays on the CPU
        path, `DeviceArray`s on the GPU path. Same numbers either way (runtime.gpu_preprocess's kernel equals
        runtime.preprocess)."""
        if self.gpu is not None:
            return self.gpu(images)
        prepared = self.host.batch(images)
        return prepared.images, prepared.masks

    def close(self) -> None:
        if getattr(self, "decoder", None) is not None:
            self.decoder.close()
        if self.gpu is not None:
            self.gpu.close()


class EngineStandIn:
    """The engine step without TensorRT: the PyTorch reference, returning the top-100 as an engine built with
    ``--postprocess`` does (scores, int32 labels, x0,y0,x1,y1 boxes relative to the unpadded image)."""

    def __init__(self, weights: Path, device: str):
        from runtime.torch_detector import TorchReference

        self.reference = TorchReference(weights, device)

    def __call__(self, images: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        out = self.reference.infer(images, masks)
        unit = np.ones((len(images), 2))  # boxes stay relative: scaling to pixels is anchor_detr_post's
        found = postprocess(out["pred_logits"], out["pred_boxes"], unit)
        return {"scores": np.stack([f["scores"] for f in found]),
                "labels": np.stack([f["labels"] for f in found]).astype(np.int32),
                "boxes": np.stack([f["boxes"] for f in found]).astype(np.float32)}

    def run_many(self, inputs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Requests of one Triton batch: those of the same image size go through one forward, as one engine
        batch would."""
        answers: list[dict[str, np.ndarray] | None] = [None] * len(inputs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (images, _) in enumerate(inputs):
            groups.setdefault(images.shape[1:], []).append(index)
        for members in groups.values():
            out = self(np.concatenate([inputs[i][0] for i in members]), np.concatenate([inputs[i][1] for i in members]))
            start = 0
            for i in members:
                stop = start + len(inputs[i][0])
                answers[i] = {name: value[start:stop] for name, value in out.items()}
                start = stop
        return answers

    def close(self) -> None:
        self.reference.close()


def answer(scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray, sizes: np.ndarray,
           threshold: np.ndarray | None, names: Mapping[int, str]) -> dict[str, np.ndarray]:
    """One request's outputs (serve.server's encoding, `names` the class names) from the engine's top-100 of its
    rows and each row's original (height, width); a threshold outside [0, 1] is a RequestError."""
    limits = {} if threshold is None else {"threshold": threshold}
    found = from_engine_outputs(scores, labels, boxes, sizes)
    answers = []
    for row, detections in enumerate(found):
        kept = above(detections, _threshold(limits, row))
        answers.append({**kept, "labels": kept["labels"].astype(np.int32), "size": sizes[row]})
    return _encode(answers, names)
