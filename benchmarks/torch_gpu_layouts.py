"""The PyTorch reference's GPU forward under each memory layout and cuDNN algorithm choice, at one batch shape.

    python -m benchmarks.torch_gpu_layouts --weights W.safetensors --modes fp16,compile-fp16-graphs --shape 800x1066

For each forward of `--modes` (runtime.torch_detector.TORCH_MODES), with the model and input in NCHW or
channels-last layout and `torch.backends.cudnn.benchmark` off or on, it prints one JSON line: the GPU ms of the
forward plus the device top-100 (CUDA events, median of `--iters` after `--warmup`) and the images/s that gives.
It is how the reference's default layout was chosen (docs/benchmarks.md). Exit codes: 0 ok, 2 bad arguments or
weights, 3 no CUDA GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys

from core.cli import guarded, hw_list, parser, positive_int
from core.errors import Unavailable
from runtime.torch_detector import TORCH_MODES, TorchReference


def time_variant(reference: TorchReference, mode: str, channels_last: bool, cudnn_benchmark: bool,
                 shape: tuple[int, int, int], warmup: int, iters: int) -> dict:
    from runtime.gpu_postprocess import torch_top_k
    from runtime.torch_detector import torch_forward

    torch = reference.torch
    torch._dynamo.reset()
    torch.backends.cudnn.benchmark = cudnn_benchmark
    # The layout is torch_forward's to set (it converts the model and each input), so it is what is timed.
    forward = torch_forward(torch, reference.model, mode, channels_last)
    b, h, w = shape
    images = torch.randn(b, 3, h, w, device="cuda")
    masks = torch.zeros(b, h, w, dtype=torch.bool, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            start.record()
            out = forward(images, masks)
            top = torch_top_k(torch, out["pred_logits"], out["pred_boxes"])
            end.record()
            end.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    del top
    ms = statistics.median(times)
    return {"mode": mode, "channels_last": channels_last, "cudnn_benchmark": cudnn_benchmark, "batch": b,
            "height": h, "width": w, "gpu_ms": round(ms, 3), "images_per_s": round(1000 * b / ms, 1)}


def main(argv: list[str] | None = None) -> int:
    prog = "python -m benchmarks.torch_gpu_layouts"
    p = parser(prog, __doc__.split("\n\n")[0], "exit codes: 0 ok, 2 bad arguments or weights, 3 no CUDA GPU")
    p.add_argument("--weights", required=True, help="the model's safetensors file (weights.extract)")
    p.add_argument("--modes", default="fp16,compile-fp16-graphs",
                   help=f"comma-separated forwards of {', '.join(TORCH_MODES)} (default fp16,compile-fp16-graphs)")
    p.add_argument("--shape", type=hw_list, default=[(800, 1066)], help="HxW of the batch (default 800x1066)")
    p.add_argument("--batch", type=positive_int, default=4, help="images per forward (default 4)")
    p.add_argument("--warmup", type=positive_int, default=5, help="untimed forwards first (default 5)")
    p.add_argument("--iters", type=positive_int, default=30, help="timed forwards (default 30)")
    args = p.parse_args(argv)

    def run() -> int:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in modes if m not in TORCH_MODES]
        if unknown:
            p.error(f"--modes {','.join(unknown)}: choose from {', '.join(TORCH_MODES)}")
        import torch

        if not torch.cuda.is_available():
            raise Unavailable("this benchmark times the forward on the GPU, and PyTorch sees no CUDA GPU here")
        reference = TorchReference(args.weights, device="cuda")
        for mode, channels_last, cudnn_benchmark in itertools.product(modes, (False, True), (False, True)):
            row = time_variant(reference, mode, channels_last, cudnn_benchmark, (args.batch, *args.shape[0]),
                               args.warmup, args.iters)
            print(json.dumps(row), flush=True)
        return 0

    return guarded(prog, run)


if __name__ == "__main__":
    sys.exit(main())
