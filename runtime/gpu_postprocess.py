"""The top-100 on the device, for raw outputs: what an engine with the top-100 inside it hands the host.

`DeviceTopK` runs runtime/topk.cu on raw engine outputs (pred_logits (B,Q,C), pred_boxes (B,Q,4) in device
memory) and downloads only scores (B,K), labels (B,K) and normalised x0,y0,x1,y1 boxes (B,K,4); `torch_top_k`
does the same with torch on the PyTorch reference's CUDA outputs, and `torch_download` brings them to the host.
Either way the host's post-processing is then `postprocess.from_engine_outputs`: box scaling and slicing.

Ranking is `runtime.postprocess`'s: by logit, equal logits by lowest flat index (the kernel's radix select
and ranking; torch's stable descending sort), so the detections are the host's. Scores come from the device's
`expf` where the host uses NumPy's `exp`: within 1 float32 ulp (tests/test_gpu_postprocess.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.config import NUM_TOPK as TOP_K

KERNEL_SOURCE = Path(__file__).resolve().with_name("topk.cu")
THREADS, KMAX = 1024, 128  # the kernel's block size and largest K (topk.cu)


class DeviceTopK:
    """Top-K post-processing of up to `max_batch` images on `stream` (core.cuda), into pinned host buffers."""

    def __init__(self, max_batch: int, k: int = TOP_K, stream=None) -> None:
        from core import cuda

        if not 1 <= k <= KMAX:
            raise ValueError(f"k must be 1..{KMAX}, got {k}")
        self._cuda, self.k, self.max_batch = cuda, k, max_batch
        self.device = cuda.current_device()
        self._own_stream = stream is None
        self.stream = cuda.Stream() if stream is None else stream
        arch = cuda.target_arch(self.device.arch)
        cubin = cuda.compile_cached(KERNEL_SOURCE.read_bytes(), KERNEL_SOURCE.name,
                                    [f"--gpu-architecture=sm_{arch}", "--std=c++17"], "cubin")
        self._kernel = cuda.load_kernel(cubin, "cubin", "top_k")
        self._layout = {"scores": ((k,), np.float32), "labels": ((k,), np.int32), "boxes": ((k, 4), np.float32)}
        self._device, self._host = {}, {}
        for name, (shape, dtype) in self._layout.items():
            count = max_batch * int(np.prod(shape))
            self._device[name] = cuda.DeviceBuffer(count * np.dtype(dtype).itemsize)
            self._host[name] = cuda.PinnedBuffer(count, dtype)
        self._batch = 0

    def run(self, logits_ptr: int, boxes_ptr: int, batch: int, queries: int, classes: int) -> None:
        """Queue the top-K of `batch` images' float32 logits (B,Q,C) and boxes (B,Q,4) at these device addresses,
        and the downloads; synchronise the stream before `outputs`."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} is outside 1..{self.max_batch}")
        if queries * classes < self.k:
            raise ValueError(f"{queries}x{classes} candidates are fewer than k={self.k}")
        cuda = self._cuda
        self.device.activate()
        d = self._device
        cuda.launch(self._kernel, (batch, 1, 1), (THREADS, 1, 1), self.stream.handle, np.uint64(logits_ptr),
                    np.uint64(boxes_ptr), np.int32(queries), np.int32(classes), np.int32(self.k),
                    np.uint64(d["scores"].ptr), np.uint64(d["labels"].ptr), np.uint64(d["boxes"].ptr), name="top_k")
        for name, (shape, _) in self._layout.items():
            d[name].download(self._host[name].view((batch, *shape)), self.stream)
        self._batch = batch

    def outputs(self) -> dict[str, np.ndarray]:
        """The last run's scores, labels (int64) and boxes, copied out of the pinned buffers."""
        out = {name: self._host[name].view((self._batch, *shape)).copy()
               for name, (shape, _) in self._layout.items()}
        out["labels"] = out["labels"].astype(np.int64)
        return out

    def close(self) -> None:
        if self._kernel is None:
            return
        self.stream.synchronize()
        for buffer in [*self._device.values(), *self._host.values()]:
            buffer.close()
        if self._own_stream:
            self.stream.close()
        self._kernel = None

    def __enter__(self) -> "DeviceTopK":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def torch_top_k(torch: Any, logits: Any, boxes: Any, k: int = TOP_K) -> dict[str, Any]:
    """The top-K of torch tensors logits (B,Q,C) and boxes (B,Q,4), as tensors on their device (`torch_download`
    brings them to the host)."""
    batch, queries, classes = logits.shape
    flat = logits.float().reshape(batch, -1)
    k = min(k, flat.shape[1])
    values, index = torch.sort(flat, dim=1, descending=True, stable=True)  # equal logits: lowest index first
    values, index = values[:, :k], index[:, :k]
    query = torch.div(index, classes, rounding_mode="floor")
    picked = torch.gather(boxes.float(), 1, query[..., None].expand(-1, -1, 4))
    cx, cy, w, h = picked.unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    return {"scores": torch.sigmoid(values), "labels": index - query * classes, "boxes": xyxy}


def torch_download(torch: Any, tensors: dict[str, Any]) -> Callable[[], dict[str, np.ndarray]]:
    """Queue copies of CUDA `tensors` into pinned host memory on the current stream and return at once; the
    returned call waits for them and gives NumPy arrays. The host does not wait for the GPU in between, so the
    caller can queue the next batch's work first."""
    host = {name: tensor.to("cpu", non_blocking=True) for name, tensor in tensors.items()}  # pinned, as non_blocking
    copied = torch.cuda.Event()
    copied.record()

    def arrays() -> dict[str, np.ndarray]:
        copied.synchronize()
        return {name: tensor.numpy() for name, tensor in host.items()}

    return arrays
