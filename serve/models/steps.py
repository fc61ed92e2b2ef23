"""What the ensemble's Python-backend models compute, without Triton (see serve.models).

- `Preprocess` (anchor_detr_pre): per request, decode and check the image and the threshold (serve.server's own
  checks, so both servers refuse the same requests with the same messages); per Triton batch, the evaluation
  transform of all its good images into one batch padded to its largest image, on the GPU (runtime.gpu_preprocess's
  kernel, the result left in device memory and handed on through DLPack) or with runtime.preprocess on the CPU.
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
from runtime.postprocess import from_engine_outputs, postprocess
from serve.server import HostPreprocess, RequestError, _encode, _threshold

__all__ = ["Preprocess", "EngineStandIn", "answer", "parameters", "RequestError"]


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

    def __call__(self, images: Sequence[Image.Image]) -> tuple[DeviceArray, DeviceArray]:
        self.kernel.device.activate()
        sizes = [self.kernel.upload(slot, np.asarray(image, dtype=np.uint8)) for slot, image in enumerate(images)]
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


class Preprocess:
    """anchor_detr_pre's work. ``device_id`` None: the CPU path; else the GPU kernel on that device."""

    def __init__(self, min_hw: tuple[int, int] | None, max_hw: tuple[int, int] | None, max_pixels: int,
                 exif: bool = True, device_id: int | None = None, max_batch: int = 1):
        self.min_hw, self.max_hw = min_hw, max_hw
        self.host = HostPreprocess(SimpleNamespace(min_hw=min_hw, max_hw=max_hw), max_pixels, exif)
        self.gpu = None if device_id is None else GpuBatcher(device_id, max_batch, min_hw, max_hw)

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], device_id: int | None, max_batch: int) -> "Preprocess":
        return cls(_size(params["min_hw"]), _size(params["max_hw"]), int(params["max_pixels"]),
                   params["exif"] == "true", device_id, max_batch)

    def decode(self, data: bytes) -> Image.Image:
        """The request's image as RGB, or a RequestError naming what is wrong with it. The one call that picks
        the decoder: Pillow with serve.server's checks (runtime.decode's GPU decoder goes here once merged)."""
        return self.host.decode(data)

    def request(self, image: np.ndarray, threshold: np.ndarray | None) -> list[Image.Image]:
        """The decoded images of one request (rows of BYTES), after checking its thresholds."""
        limits = {} if threshold is None else {"threshold": threshold}
        decoded = []
        for row in range(len(image)):
            _threshold(limits, row)
            decoded.append(self.decode(bytes(image[row].reshape(-1)[0])))
        return decoded

    def batch(self, images: Sequence[Image.Image]) -> tuple[Any, Any]:
        """(images (B,3,H,W) float32, masks (B,H,W) bool) padded to the largest image: numpy arrays on the CPU
        path, `DeviceArray`s on the GPU path. Same numbers either way (runtime.gpu_preprocess's kernel equals
        runtime.preprocess)."""
        if self.gpu is not None:
            return self.gpu(images)
        prepared = self.host.batch(images)
        return prepared.images, prepared.masks

    def close(self) -> None:
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
        keep = detections["scores"] >= _threshold(limits, row)
        answers.append({"scores": detections["scores"][keep], "labels": detections["labels"][keep].astype(np.int32),
                        "boxes": detections["boxes"][keep], "size": sizes[row]})
    return _encode(answers, names)
