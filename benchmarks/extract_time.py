"""Time `python -m weights.extract` on a realistic checkpoint.

The checkpoint is made the way the official training script saves one (random weights of the variant,
`args` namespace, AdamW state, lr scheduler, epoch 49) with torch.save, so reading it costs what reading
a real one costs. Each run is a fresh interpreter (`python -m weights.extract ... --json`):

    python -m benchmarks.extract_time --variant r50_dc5 --repeat 3

"wall" is the whole command as a user sees it (interpreter and torch import included); "extract" is the
time the tool itself reports (checks, reading, hashing, converting, writing, hashing the output).
Exit codes: 0 ok, 1 an extraction failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.extract_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="r50_dc5", help="checkpoint to synthesise (default r50_dc5)")
    p.add_argument("--repeat", type=int, default=3, help="extractions to time (default 3)")
    p.add_argument("--no-optimizer", action="store_true", help="a model-only checkpoint (as some zoo files are)")
    p.add_argument("--json", help="also write the results to this JSON file")
    opts = p.parse_args(argv)

    import torch

    from core.config import AnchorDETRConfig, ConfigError
    from core.progress import ProgressBar, format_bytes, print_table
    from weights.random_init import random_state_dict, training_checkpoint

    try:
        cfg = AnchorDETRConfig.from_variant(opts.variant)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="extract_time_") as tmp:
        ckpt, out = os.path.join(tmp, f"AnchorDETR_{cfg.variant}.pth"), os.path.join(tmp, "out.safetensors")
        t0 = time.monotonic()
        torch.save(training_checkpoint(cfg, random_state_dict(cfg, 0), optimizer=not opts.no_optimizer), ckpt)
        made = time.monotonic() - t0
        runs = []
        with ProgressBar(opts.repeat, "extracting") as bar:
            for _ in range(opts.repeat):
                t0 = time.monotonic()
                proc = subprocess.run(
                    [sys.executable, "-m", "weights.extract", ckpt, "-o", out, "--json"],
                    capture_output=True, text=True,
                )
                wall = time.monotonic() - t0
                if proc.returncode != 0:
                    print(proc.stderr.strip(), file=sys.stderr)
                    return 1
                runs.append({"wall": wall, "extract": json.loads(proc.stdout)["seconds"]})
                bar.update(1)
        result = {
            "variant": cfg.variant,
            "checkpoint_bytes": os.path.getsize(ckpt),
            "optimizer_state": not opts.no_optimizer,
            "output_bytes": os.path.getsize(out),
            "checkpoint_make_seconds": round(made, 2),
            "cpus": os.cpu_count(),
            "runs": runs,
            "wall_median": statistics.median(r["wall"] for r in runs),
            "extract_median": statistics.median(r["extract"] for r in runs),
        }
    print_table([
        ("checkpoint", f"{cfg.variant}, {format_bytes(result['checkpoint_bytes'])}"
                       + (" with AdamW state" if result["optimizer_state"] else ", model only")),
        ("output", format_bytes(result["output_bytes"])),
        ("CPUs", result["cpus"]),
        ("wall (median)", f"{result['wall_median']:.2f} s"),
        ("extract (median)", f"{result['extract_median']:.2f} s"),
        ("runs (wall)", ", ".join(f"{r['wall']:.2f}" for r in runs)),
    ])
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
