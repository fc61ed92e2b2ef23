"""The two detectors the evaluation compares, behind one call: padded batch in, detections out.

Both take the same (B,3,H,W) float32 images and (B,H,W) bool masks (True = padding) and return the
shared post-processing's detections, so the only difference between their scores is the model.
torch and TensorRT are imported only when the model that needs them is opened.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.errors import EXIT_ENVIRONMENT
from eval.scoring import EvalError
from runtime.postprocess import postprocess


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


class TorchReference:
    """The PyTorch reference model (`reference.torch_model.AnchorDETR`) in FP32, on a GPU when there is one."""

    name = "torch"
    # No engine profile: it takes any size and batch the evaluation transform produces.
    min_hw = max_hw = max_batch = None

    def __init__(self, weights_path: str | Path, device: str | None = None) -> None:
        try:
            import torch
        except ImportError:
            raise EvalError("--torch-weights needs PyTorch: pip install torch", EXIT_ENVIRONMENT) from None
        import weights
        from reference.torch_model import AnchorDETR

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise EvalError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu", EXIT_ENVIRONMENT)
        try:
            self.model = AnchorDETR.from_safetensors(weights_path, device=device)
        except weights.WeightsError as e:
            raise EvalError(f"--torch-weights: {e}") from None
        self.torch = torch
        self.device = device
        self.description = f"PyTorch reference, FP32 on {device} ({Path(weights_path).name})"

    def __call__(self, images: np.ndarray, masks: np.ndarray, orig_sizes: np.ndarray) -> list[dict]:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(images).to(self.device), torch.from_numpy(masks).to(self.device))
            logits, boxes = out["pred_logits"].cpu().numpy(), out["pred_boxes"].cpu().numpy()
        return postprocess(logits, boxes, orig_sizes)

    def close(self) -> None:
        del self.model
