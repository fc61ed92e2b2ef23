"""The engine as the evaluation calls it: padded batch in, detections out (the PyTorch reference is
`runtime.torch_detector.TorchReference`, which takes the same call).

Both take the same (B,3,H,W) float32 images and (B,H,W) bool masks (True = padding) and return the
shared post-processing's detections, so the only difference between their scores is the model.
torch and TensorRT are imported only when the model that needs them is opened.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np



class EngineModel:
    """A TensorRT engine through the runtime's `EngineRunner` (its post-processing, in-engine or on the host)."""

    name = "engine"

    def __init__(self, engine_path: str | Path, weights_sha256: str | None = None) -> None:
        from runtime.runner import EngineRunner

        self.runner = EngineRunner(engine_path, weights_sha256)
        self.min_hw, self.max_hw, self.max_batch = self.runner.min_hw, self.runner.max_hw, self.runner.max_batch
        side = self.runner.engine.sidecar
        plugins = ",".join(side["plugins"]) or "no plugins"
        gpu = self.runner.engine.device.name
        self.description = (
            f"TensorRT engine {Path(engine_path).name}: {side['precision'].upper()}, {plugins}, "
            f"{side['backend']} {side['trt_version']} on {gpu}"
        )

    def __call__(self, images: np.ndarray, masks: np.ndarray, orig_sizes: np.ndarray) -> list[dict]:
        return self.runner.results(self.runner.infer(images, masks), orig_sizes)

    def close(self) -> None:
        self.runner.close()
