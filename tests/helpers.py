"""Helpers shared by several test files (test files never import each other; they import from here).

tests/ is on sys.path through the rootdir conftest, so a test file says `from helpers import ...`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
from PIL import Image

from core.config import AnchorDETRConfig
from core.sidecar import Profile
from runtime.preprocess import MEAN, STD
from runtime.detector import ProfileDetector

# ---------------------------------------------------------------------------------------------- CLIs


def run_cli(cli_main, argv, capsys):
    """(exit code, stdout, stderr) of a CLI's main(argv)."""
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_main(argv, capsys):
    """run_cli on the build CLI (python -m netdef.build)."""
    from netdef.build import main

    return run_cli(main, argv, capsys)


SMALL_PROFILE = ["--min", "64x64", "--opt", "96x128", "--max", "128x160", "--batch", "1,1,2"]


def save_random_weights(path: Path, cfg) -> Path:
    import weights
    from weights import naming

    weights.save(path, cfg, naming.to_builder(weights.random_state_dict(cfg, 0), cfg), source="random-init")
    return path


# ---------------------------------------------------------------------------------------------- networks


def small_config(variant: str = "r50_dc5", **changes) -> AnchorDETRConfig:
    return dataclasses.replace(AnchorDETRConfig.from_variant(variant), enc_layers=2, dec_layers=2, **changes)


@functools.cache
def official_state_dict(cfg: AnchorDETRConfig, seed: int = 0):
    """Random peaked weights in the official layout (weights.random_state_dict), torch tensors."""
    from weights.random_init import random_state_dict

    return random_state_dict(cfg, seed)


@functools.cache
def builder_tensors(cfg: AnchorDETRConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """official_state_dict in builder naming (BN folded, projections sliced), float32 numpy."""
    from weights.naming import to_builder

    return {k: v.numpy() for k, v in to_builder(official_state_dict(cfg, seed), cfg).items()}


def define(trt, cfg: AnchorDETRConfig, tensors=None, **options):
    """A network definition of AnchorDETR: (builder, network, keepalive), all three to keep referenced."""
    from netdef.build import _creation_flags
    from core.backend import backend_of
    from netdef.network import define_network

    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    network = builder.create_network(_creation_flags(backend_of(trt)))
    keep = define_network(trt, network, cfg, builder_tensors(cfg) if tensors is None else tensors, **options)
    return builder, network, keep


# ---------------------------------------------------------------------------------------------- a stand-in engine

LABEL_OF_CHANNEL = (1, 3, 17)  # red -> person, green -> car, blue -> cat
QUERIES = 10


class NumpyDetector(ProfileDetector):
    """Stands in for the engine: answers AnchorDETR's I/O from the pixels it receives (the label is the brightest
    channel of the valid region, the box its centre half), so a test sees whether the right pixels and masks
    reached the network and whether boxes come back in each original image's coordinates."""

    def __init__(self, profile=Profile((1, 320, 512), (1, 800, 800), (2, 1344, 1344)), engine_postprocess=False):
        self.profile = profile
        self.engine_postprocess = engine_postprocess
        self.calls = []
        self.closed = False

    def infer(self, images, masks):
        images, masks = self.fit_profile(images, masks)
        self.calls.append((images.shape, masks.copy()))
        batch = images.shape[0]
        logits = np.full((batch, QUERIES, 91), -10.0, dtype=np.float32)
        boxes = np.tile(np.float32([0.5, 0.5, 0.25, 0.25]), (batch, QUERIES, 1))
        for b in range(batch):
            valid = ~masks[b]
            means = [(images[b, c][valid] * STD[c] + MEAN[c]).mean() for c in range(3)]
            logits[b, 0, LABEL_OF_CHANNEL[int(np.argmax(means))]] = 4.0
            boxes[b, 0] = (0.5, 0.5, 0.5, 0.5)
        if not self.engine_postprocess:
            return {"pred_logits": logits, "pred_boxes": boxes}
        scores = 1 / (1 + np.exp(-logits.reshape(batch, -1)))
        top = np.argsort(-scores, axis=1, kind="stable")[:, :100]
        cx, cy, w, h = np.moveaxis(np.take_along_axis(boxes, top[..., None] // 91, 1), -1, 0)
        return {
            "scores": np.take_along_axis(scores, top, 1).astype(np.float32),
            "labels": (top % 91).astype(np.int32),
            "boxes": np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1),
        }

    def close(self):
        self.closed = True


class CudaRunner(NumpyDetector):
    """A runtime.pipeline.DeviceRunner that is not an EngineRunner (`gpu` tests): device input buffers for its
    profile's largest batch and a stream of its own; its engine downloads the buffers and answers as
    NumpyDetector does. `siblings` are the extra buffer sets it made."""

    def __init__(self, profile=Profile((1, 320, 512), (1, 800, 800), (2, 1344, 1344))):
        from core import cuda

        super().__init__(profile)
        cuda.init()
        self.stream = cuda.Stream()
        b, h, w = profile.max
        self._images, self._masks = cuda.DeviceBuffer(b * 3 * h * w * 4), cuda.DeviceBuffer(b * h * w)
        self.siblings = []

    def sibling(self):
        self.siblings.append(CudaRunner(self.profile))
        return self.siblings[-1]

    @property
    def input_pointers(self):
        return self._images.ptr, self._masks.ptr

    def device_inputs(self, batch, height, width):
        return self.input_pointers

    def infer_on_device(self, shape, batch=None):
        b, h, w = shape
        images, masks = np.empty((b, 3, h, w), np.float32), np.empty((b, h, w), bool)
        self._images.download(images, self.stream)
        self._masks.download(masks, self.stream)
        self.stream.synchronize()
        return {k: v[:batch] for k, v in NumpyDetector(self.profile).infer(images, masks).items()}


def solid(width, height, channel):
    color = [30, 30, 30]
    color[channel] = 220
    return Image.new("RGB", (width, height), tuple(color))

