"""The detector contract: padded batches in, detections out. What runtime.pipeline, serve.server and eval.coco call.

A `Detector` gives `infer` (AnchorDETR's raw outputs of one batch, or the in-engine top-100's scores, labels and
boxes) and the limits of the arrays it takes (None: no limit). Calling it turns a batch into detections in each
image's own pixels; `detect`, `iter_detect` and `detect_files` run it on Pillow images or files. The engine
(`runtime.runner.EngineRunner`), the PyTorch reference (`runtime.torch_detector.TorchReference`) and the tests'
stand-ins are all Detectors, so every caller treats them alike.

`ProfileDetector` is a Detector whose limits come from a TensorRT optimisation profile, with `fit_profile` to pad a
batch up to the profile's minimums.
"""

from __future__ import annotations

import abc
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from core.errors import BadInput
from core.sidecar import Profile
from runtime.pipeline import PipelineStats, detect_stream
from runtime.postprocess import from_engine_outputs, postprocess
from runtime.preprocess import ShapeError, prepare_batch, rgb_images

POSTPROCESS_OUTPUTS = ("scores", "labels", "boxes")


def above(detections: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    """The detections of one image scoring at least `threshold`."""
    keep = detections["scores"] >= threshold
    return {key: value[keep] for key, value in detections.items()}


class Detector(abc.ABC):
    """Images (B,3,H,W) float32 and masks (B,H,W) bool (True = padding) in, detections out.

    The limits are what `infer` accepts: batches of `min_batch`..`max_batch` images padded to at least `min_hw`,
    images the official resize makes larger than `max_hw` scaled to fit (None: no limit). Subclasses set them as
    attributes or properties.
    """

    min_batch: int = 1
    max_batch: int | None = None
    min_hw: tuple[int, int] | None = None
    max_hw: tuple[int, int] | None = None

    @abc.abstractmethod
    def infer(self, images: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs (pred_logits/pred_boxes, or scores/labels/boxes) of one batch, keeping its batch size."""

    def __call__(self, images: np.ndarray, masks: np.ndarray, orig_sizes) -> list[dict[str, np.ndarray]]:
        """Top-100 detections of each image of a batch, boxes in pixels of its original (height, width)."""
        return self.results(self.infer(images, masks), orig_sizes)

    def results(self, outputs: dict[str, np.ndarray], orig_sizes) -> list[dict[str, np.ndarray]]:
        """Top-100 detections per image from raw outputs (or from the engine's own post-processing)."""
        if all(name in outputs for name in POSTPROCESS_OUTPUTS):
            return from_engine_outputs(outputs["scores"], outputs["labels"], outputs["boxes"], orig_sizes)
        return postprocess(outputs["pred_logits"], outputs["pred_boxes"], orig_sizes)

    def found(self, outputs: dict[str, np.ndarray], orig_sizes, threshold: float) -> list[dict[str, np.ndarray]]:
        """`results` with only the detections scoring at least `threshold`."""
        return [above(r, threshold) for r in self.results(outputs, orig_sizes)]

    def batch_size(self, requested: int | None = None) -> int:
        """Images per `infer` call: `requested` (default the largest batch, else 1), at most the largest."""
        largest = self.max_batch
        if requested is not None and requested < 1:
            raise BadInput(f"batch {requested}: must be at least 1")
        return min(requested or largest, largest) if largest is not None else (requested or 1)

    def close(self) -> None:
        """Free what the detector holds (nothing here)."""

    def detect(
        self,
        images: Sequence[Image.Image],
        threshold: float = 0.5,
        batch_size: int | None = None,
        exif: bool = True,
    ) -> list[dict[str, np.ndarray]]:
        """Detections scoring at least `threshold` for each Pillow image, boxes in its (EXIF-oriented) pixels.

        Images go through in batches of `batch_size` (default: the largest batch), each padded to its largest
        member; images the official resize would make larger than `max_hw` are scaled to fit. One batch after
        another on the calling thread; `iter_detect` overlaps the stages.
        """
        batch_size = self.batch_size(batch_size)
        found = []
        for start in range(0, len(images), batch_size):
            prepared = prepare_batch(rgb_images(images[start : start + batch_size], exif), self.min_hw, self.max_hw)
            found += [above(r, threshold) for r in self(*prepared)]
        return found

    def iter_detect(
        self,
        items: Iterable,
        threshold: float = 0.5,
        batch: int | None = None,
        exif: bool = True,
        workers: int | None = None,
        in_flight: int = 2,
        gpu_preprocess: bool | None = False,
        stats: PipelineStats | None = None,
        gpu_decode: bool | None = False,
    ) -> Iterator[tuple[Any, Any]]:
        """(path or position, detections or ImageError) for each image file path (or each Pillow image), in input
        order, with decoding, preprocessing and the engine overlapped and at most `in_flight` batches in memory
        (runtime.pipeline). `gpu_preprocess`: True = the GPU kernel (a detector with device input buffers, such as
        EngineRunner), False = the CPU, None = the GPU when it can. `gpu_decode` (on the GPU path): True =
        nvImageCodec, False = Pillow (the exact path), None = nvImageCodec where installed. `workers`: decoding
        threads (default: one per usable core). `stats`: a `PipelineStats` to fill with per-stage times. Bad arguments are raised at the
        call, before any work."""
        found = detect_stream(self, items, threshold, batch, exif, workers, in_flight, gpu_preprocess, stats,
                              gpu_decode=gpu_decode)
        return ((item.key, item.result) for item in found)

    def detect_files(self, paths: Iterable, threshold: float = 0.5, batch: int | None = None, exif: bool = True,
                     workers: int | None = None, in_flight: int = 2, **options: Any) -> list[Any]:
        """`iter_detect`'s detections (or ImageError for an unreadable file) of each path, as a list in input order."""
        return [result for _, result in
                self.iter_detect(paths, threshold, batch, exif, workers, in_flight, **options)]


class ProfileDetector(Detector):
    """A Detector whose limits are a TensorRT optimisation profile's: (batch, height, width) from `profile.min` to
    `profile.max`."""

    profile: Profile

    @property
    def min_batch(self) -> int:
        return self.profile.min[0]

    @property
    def max_batch(self) -> int:
        return self.profile.max[0]

    @property
    def min_hw(self) -> tuple[int, int]:
        return self.profile.min[1:]

    @property
    def max_hw(self) -> tuple[int, int]:
        return self.profile.max[1:]

    def fit_profile(self, images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pad height/width up to the profile minimum (masked) and the batch up to its minimum (repeated images);
        a batch or size above the maximum is a ShapeError."""
        if images.ndim != 4 or images.shape[1] != 3 or masks.shape != (images.shape[0],) + images.shape[2:]:
            raise BadInput(f"expected images (B,3,H,W) and masks (B,H,W), got {images.shape} and {masks.shape}")
        batch, _, height, width = images.shape
        (min_b, min_h, min_w), (max_b, max_h, max_w) = self.profile.min, self.profile.max
        if batch > max_b or height > max_h or width > max_w:
            raise ShapeError(
                f"batch {batch} of {height}x{width} exceeds the engine profile's maximum {max_b} of {max_h}x{max_w} "
                f"(profile {self.profile}): use a smaller batch or rebuild the engine with a larger maximum"
            )
        pad_h, pad_w = max(0, min_h - height), max(0, min_w - width)
        if pad_h or pad_w:
            images = np.pad(images, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)))
            masks = np.pad(masks, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=True)
        if batch < min_b:
            repeat = np.r_[np.arange(batch), np.full(min_b - batch, batch - 1)]
            images, masks = images[repeat], masks[repeat]
        return images, masks
