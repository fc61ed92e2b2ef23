"""The PyTorch reference model as a `Detector`: what `runtime.bench --torch-weights`, `eval.coco --torch-weights`
and the pipeline run where there is no engine. torch is imported only when one is opened.

On CUDA it is also a `runtime.pipeline.DeviceRunner`: the GPU path's decoder and kernel write straight into its
CUDA input tensors (`input_pointers`, on its own torch stream), `start_on_device` queues the forward of the
chosen `mode` (TORCH_MODES) there, and the top-100 is taken on the device (`runtime.gpu_postprocess.torch_top_k`),
so only 100 detections per image come back to the host, when the caller asks for them.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from core.errors import BadInput, Unavailable
from runtime.detector import Detector

TORCH_MODES = {
    "fp32": "eager FP32 (TF32 off)",
    "tf32": "eager with TF32 matmul/conv",
    "fp16": "eager FP16 autocast",
    "compile-fp16": "torch.compile(mode='default', dynamic=False) + FP16 autocast",
    "compile-fp16-graphs": "torch.compile(mode='reduce-overhead', dynamic=False) + FP16 autocast (CUDA graphs)",
}
TORCH_MODE_HELP = ("the PyTorch reference's forward: " + "; ".join(f"{k}: {v}" for k, v in TORCH_MODES.items())
                   + " (default fp32)")


def torch_forward(torch: Any, model: Any, mode: str, channels_last: bool | None = None) -> Callable:
    """A forward for one of TORCH_MODES; sets the TF32 switches and the memory layout it needs. `channels_last`:
    the model and its input in channels-last (True) or NCHW (False) layout; None: the mode's own choice."""
    if mode not in TORCH_MODES:
        raise BadInput(f"torch mode {mode!r}: choose from {', '.join(TORCH_MODES)}")
    tf32 = mode == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    # Eager FP16 convolutions ran 12% faster in channels-last (benchmarks.torch_gpu_layouts, H200, 4x800x1066);
    # Inductor picks its own layouts and ran 5% slower from a channels-last model, so the others keep NCHW. Set
    # for every mode: runtime.bench times several forwards of one model in turn.
    if channels_last is None:
        channels_last = mode == "fp16"
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    forward = model
    if mode.startswith("compile-"):
        # reduce-overhead records CUDA graphs per shape; callers read each output before the next replay.
        compile_mode = "reduce-overhead" if mode.endswith("-graphs") else "default"
        forward = torch.compile(model, mode=compile_mode, dynamic=False)
    half = mode in ("fp16", "compile-fp16", "compile-fp16-graphs")

    def run(images, masks):
        images = images.contiguous(memory_format=layout)  # returns the tensor itself when it is laid out so
        if not half:
            return forward(images, masks)
        with torch.autocast(images.device.type, dtype=torch.float16):
            return forward(images, masks)

    return run


class TorchReference(Detector):
    """The PyTorch reference model (`reference.torch_model.AnchorDETR`), on a GPU when there is one; a
    `Detector`, so `detect`, `iter_detect` and `detect_files` run it like an engine."""

    name = "torch"

    def __init__(self, weights_path: str | Path, device: str | None = None, device_option: str = "--device",
                 min_hw: tuple[int, int] | None = None, max_hw: tuple[int, int] | None = None,
                 mode: str = "fp32", max_batch: int | None = None) -> None:
        """`device_option`: the command-line option that chose `device`, for the error that names the fix.
        No engine profile: it takes any batch and size; `min_hw` pads batches up to a size, `max_hw` scales
        larger images down to fit, as an engine profile would (None: neither). `mode`: one of TORCH_MODES.
        `max_batch`: the largest batch (None: any)."""
        if mode not in TORCH_MODES:
            raise BadInput(f"--torch-mode {mode}: choose from {', '.join(TORCH_MODES)}")
        self.min_hw, self.max_hw, self.max_batch = min_hw, max_hw, max_batch
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
        if mode != "fp32" and device != "cuda":
            raise BadInput(f"--torch-mode {mode} runs on CUDA only; use --torch-mode fp32 on {device}")
        try:
            self.model = AnchorDETR.from_safetensors(weights_path, device=device)
        except weights.WeightsError as e:
            raise BadInput(f"--torch-weights: {e}") from None
        self.torch, self.device, self.mode, self.weights_path = torch, device, mode, weights_path
        self.names = weights.class_names(weights_path)  # runtime.infer.class_names
        self.forward = torch_forward(torch, self.model, mode)
        self.description = f"PyTorch reference, {TORCH_MODES[mode]} on {device} ({Path(weights_path).name})"
        self._inputs: tuple | None = None  # the GPU path's flat CUDA input tensors (images, masks)
        self._order = SimpleNamespace(lock=threading.Lock(), last=None)  # the last forward queued, of all siblings
        self.stream = self._torch_stream = None  # on CUDA: a torch stream, and the same as a core.cuda.Stream
        if device == "cuda":
            self._new_stream()

    def _new_stream(self) -> None:
        from core import cuda

        cuda.init(self.torch.cuda.current_device())
        self._torch_stream = self.torch.cuda.Stream()
        self.stream = cuda.Stream(handle=self._torch_stream.cuda_stream)

    def _start(self, images: Any, masks: Any) -> Callable[[], dict[str, np.ndarray]]:
        """Queue the forward on the current stream; the returned call gives its outputs. On CUDA the top-100 is
        taken on the device and only it is copied back, without the host waiting for the GPU in between."""
        from runtime.gpu_postprocess import torch_download, torch_top_k

        out = self.forward(images, masks)
        if self.device == "cuda":
            return torch_download(self.torch, torch_top_k(self.torch, out["pred_logits"], out["pred_boxes"]))
        host = {name: out[name].float().cpu().numpy() for name in ("pred_logits", "pred_boxes")}
        return lambda: host

    def infer(self, images: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            return self._start(torch.from_numpy(images).to(self.device), torch.from_numpy(masks).to(self.device))()

    # ---- the GPU path (runtime.pipeline.DeviceRunner), CUDA only

    @property
    def input_pointers(self) -> tuple[int, int]:
        """Device addresses of the input tensors (at least one 1x1 image; `device_inputs` sizes them for a
        batch). On the CPU there are none: the reference is then no DeviceRunner."""
        if self.stream is None:
            raise AttributeError("input_pointers: the reference has device input tensors on CUDA only")
        return self.device_inputs(1, 1, 1)

    def sibling(self) -> "TorchReference":
        """Another input set and stream on the same model and forward. Siblings' forwards run one after another
        on the GPU (`start_on_device`), however their streams are queued."""
        other = copy.copy(self)  # shares the model, the forward and `_order`
        other._inputs = None
        other._new_stream()
        return other

    def device_inputs(self, batch: int, height: int, width: int) -> tuple[int, int]:
        """Device addresses of CUDA input tensors holding at least (batch, 3, height, width) float32 images and
        (batch, height, width) bool masks, C-contiguous from their start (grown when a batch needs more)."""
        torch = self.torch
        count = batch * height * width
        if self._inputs is None or self._inputs[1].numel() < count:
            self.stream.synchronize()  # queued work may still read the old tensors
            with torch.cuda.stream(self._torch_stream):
                self._inputs = (torch.empty(3 * count, dtype=torch.float32, device="cuda"),
                                torch.empty(count, dtype=torch.bool, device="cuda"))
        return self._inputs[0].data_ptr(), self._inputs[1].data_ptr()

    def start_on_device(self, shape: tuple[int, int, int], batch: int | None = None
                        ) -> Callable[[], dict[str, np.ndarray]]:
        """Queue the forward and the top-100 of the first `batch` images of what `device_inputs` holds, laid out
        for `shape` (B, H, W), on this reference's stream after the kernel queued there, and return at once; the
        returned call waits for them and gives the top-100 outputs.

        The forward of a CUDA-graph mode writes the same graph buffers from every sibling, so each forward first
        waits, on the GPU, for the one queued before it, whichever sibling's stream that was (`_order`)."""
        torch = self.torch
        b, h, w = shape
        keep = b if batch is None else batch
        with self._order.lock, torch.inference_mode(), torch.cuda.stream(self._torch_stream):
            if self._order.last is not None:
                self._torch_stream.wait_event(self._order.last)
            images = self._inputs[0][: b * 3 * h * w].view(b, 3, h, w)
            masks = self._inputs[1][: b * h * w].view(b, h, w)
            outputs = self._start(images, masks)
            self._order.last = torch.cuda.Event()
            self._order.last.record(self._torch_stream)  # after the top-100 has read the forward's outputs
        return lambda: {name: value[:keep] for name, value in outputs().items()}

    def close(self) -> None:
        self._inputs = None
        self.model = self.forward = None
