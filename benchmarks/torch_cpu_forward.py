"""Time the PyTorch reference model (reference.torch_model) on the CPU, FP32, eval mode.

    python -m benchmarks.torch_cpu_forward --variant r50_dc5 --size 800x800 --iters 3

Weights are random (``weights.random_state_dict``) unless ``--weights FILE.safetensors`` is given; the time
does not depend on their values. Each timed iteration is one whole forward pass (backbone, transformer,
heads) on a fresh batch; the backbone alone is timed the same way so the split is visible.
Exit codes: 0 ok, 1 the outputs were not finite, 2 bad arguments or an unusable weights file.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m or min(int(m[1]), int(m[2])) < 32:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HxW with both sides >= 32 (e.g. 800x800)")
    return int(m[1]), int(m[2])


def _timed(fn, iters: int, warmup: int, bar, label: str) -> list[float]:
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        bar.update(1, status=label)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.torch_cpu_forward", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="r50_dc5", help="architecture when no --weights (default r50_dc5)")
    p.add_argument("--weights", help="our safetensors weights file (its configuration overrides --variant)")
    p.add_argument("--size", type=_size, default=(800, 800), help="image HxW (default 800x800)")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--iters", type=int, default=3, help="timed passes (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first (default 1)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", help="also write the results to this JSON file")
    opts = p.parse_args(argv)
    if opts.batch < 1 or opts.iters < 1 or opts.warmup < 0:
        p.error("--batch and --iters must be >= 1, --warmup >= 0")

    import torch

    import weights
    from core.config import AnchorDETRConfig, ConfigError
    from core.progress import ProgressBar, print_table
    from reference.torch_model import AnchorDETR

    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        if opts.weights:
            model = AnchorDETR.from_safetensors(opts.weights)
        else:
            cfg = AnchorDETRConfig.from_variant(opts.variant)
            model = AnchorDETR(cfg)
            model.load_state_dict(weights.random_state_dict(cfg, 0))
    except (ConfigError, weights.WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = model.cfg

    h, w = opts.size
    images = torch.randn(opts.batch, 3, h, w)
    masks = torch.zeros(opts.batch, h, w, dtype=torch.bool)
    outputs = {}

    def forward():
        outputs.update(model(images, masks))

    def backbone():
        with torch.no_grad():
            model.backbone.body(images)

    with ProgressBar(2 * (opts.warmup + opts.iters), f"{cfg.variant} {h}x{w} batch {opts.batch}") as bar:
        total = _timed(forward, opts.iters, opts.warmup, bar, "forward")
        body = _timed(backbone, opts.iters, opts.warmup, bar, "backbone")

    finite = bool(torch.isfinite(outputs["pred_logits"]).all() and torch.isfinite(outputs["pred_boxes"]).all())
    result = {
        "variant": cfg.variant, "size": [h, w], "batch": opts.batch, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "weights": opts.weights or "random", "iters": opts.iters, "warmup": opts.warmup,
        "forward_s": total, "backbone_s": body,
        "forward_median_s": statistics.median(total), "backbone_median_s": statistics.median(body),
        "outputs_finite": finite,
    }
    med, bmed = result["forward_median_s"], result["backbone_median_s"]
    print_table(
        [[cfg.variant, f"{h}x{w}", opts.batch, result["threads"], f"{med:.2f}", f"{min(total):.2f}",
          f"{bmed:.2f}", f"{med - bmed:.2f}"]],
        ["variant", "size", "batch", "threads", "forward s (median)", "min", "backbone s", "rest s"],
    )
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
    if not finite:
        print("error: the outputs contain NaN or inf", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
