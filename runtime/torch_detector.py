"""The PyTorch reference model as a `Detector`: what `runtime.bench --torch-weights`, `eval.coco --torch-weights`
and the pipeline run where there is no engine. torch is imported only when one is opened."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.errors import BadInput, Unavailable
from runtime.detector import Detector


class TorchReference(Detector):
    """The PyTorch reference model (`reference.torch_model.AnchorDETR`) in FP32, on a GPU when there is one; a
    `Detector`, so `detect`, `iter_detect` and `detect_files` run it like an engine."""

    name = "torch"

    def __init__(self, weights_path: str | Path, device: str | None = None, device_option: str = "--device",
                 min_hw: tuple[int, int] | None = None, max_hw: tuple[int, int] | None = None) -> None:
        """`device_option`: the command-line option that chose `device`, for the error that names the fix.
        No engine profile: it takes any batch and size; `min_hw` pads batches up to a size, `max_hw` scales
        larger images down to fit, as an engine profile would (None: neither)."""
        self.min_hw, self.max_hw = min_hw, max_hw
        try:
            import torch
        except ImportError:
            raise Unavailable("--torch-weights needs PyTorch: pip install -e '.[reference]' (or pip install torch)") from None
        import weights
        from reference.torch_model import AnchorDETR

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise Unavailable(f"{device_option} cuda: PyTorch sees no CUDA GPU here; use {device_option} cpu")
        try:
            self.model = AnchorDETR.from_safetensors(weights_path, device=device)
        except weights.WeightsError as e:
            raise BadInput(f"--torch-weights: {e}") from None
        self.torch = torch
        self.device = device
        self.description = f"PyTorch reference, FP32 on {device} ({Path(weights_path).name})"

    def infer(self, images: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(images).to(self.device), torch.from_numpy(masks).to(self.device))
            return {name: out[name].cpu().numpy() for name in ("pred_logits", "pred_boxes")}

    def close(self) -> None:
        del self.model
