"""Latency and throughput of an AnchorDETR engine, or of the PyTorch reference: ``python -m runtime.bench``.

Both report the same rows: GPU time of the network (CUDA events around the engine enqueue or the torch
forward), end-to-end host time (numpy batch -> pinned staging -> device, network, outputs back to host numpy),
throughput from the end-to-end mean, and device memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from core.progress import ProgressBar, format_bytes, format_seconds, print_table
from core.sidecar import check_output_path, engine_inputs, write_atomic
from core.cli import guarded, hw_list, int_list, parser, positive_int
from core.errors import AnchorError, BadInput
from runtime.decode import DECODE, add_decode_option
from runtime.preprocess import usable_cpus
from runtime.synthetic import synthetic_images
from runtime.torch_detector import TORCH_MODES, torch_forward
from weights import require_weights_file

MIB = 1 << 20

EPILOG = """\
examples:
  python -m runtime.bench --engine engines/anchor_detr_r50_dc5_fp16.plan --graphs --json bench.json
  python -m runtime.bench --torch-weights weights/anchor_detr_r50_dc5.safetensors --shapes 800x800 --batch 1
  python -m runtime.bench --pipeline val2017/ --engine E.plan --batch 4     files -> detections, per-stage times
  python -m runtime.bench --pipeline synthetic:64 --torch-weights W.safetensors --torch-device cpu --batch 2
engine rows: mode "enqueue" (execute_async_v3 per call) and, with --graphs, "cuda-graph" (captured per shape).
torch modes (--torch-modes):
""" + "".join(f"  {k:20} {v}\n" for k, v in TORCH_MODES.items()) + """\
pipeline rows (--pipeline DIR or synthetic:N, N deterministic 640x480 JPEGs in a temporary folder): images/s from
files to detections, busy ms per image of each stage and the process's CPU ms per image, after one untimed batch.
exit codes: 0 ok, 2 bad input (engine missing, shape outside the profile), 3 environment (no GPU, no TensorRT),
            130 interrupted (Ctrl-C; 143 for SIGTERM): synthetic images removed, --json holds the finished rows
"""


def stats(samples: Sequence[float]) -> dict[str, float] | None:
    if not samples or samples[0] is None:
        return None
    values = np.asarray(samples, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": p50, "p90": p90, "p99": p99, "mean": values.mean()}


def make_row(backend: str, mode: str, batch: int, hw: tuple[int, int], gpu_ms, e2e_ms, memory: int | None,
             **extra: Any) -> dict[str, Any]:
    e2e = stats(e2e_ms)
    return {
        "backend": backend, "mode": mode, "batch": batch, "height": hw[0], "width": hw[1],
        "gpu_ms": stats(gpu_ms), "e2e_ms": e2e,
        "images_per_s": batch * 1000 / e2e["mean"],
        "device_mem_mib": None if memory is None else memory / MIB,
        "iters": len(e2e_ms), **extra,
    }


def random_batch(batch: int, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    images = np.random.default_rng(0).standard_normal((batch, 3, *hw), dtype=np.float32)
    return images, np.zeros((batch, *hw), dtype=bool)


def bench_engine(args: argparse.Namespace, configs, bar: ProgressBar) -> Iterator[dict]:
    from core import cuda
    from runtime.runner import Engine, EngineRunner

    cuda.init()
    free_before, _ = cuda.memory_info()
    with Engine(args.engine) as engine:
        check_profile(engine.profile, configs)  # the plan's own profile, which the sidecar only records
        for graphs in [False, True] if args.graphs else [False]:
            mode = "cuda-graph" if graphs else "enqueue"
            with EngineRunner(engine, cuda_graphs=graphs) as runner:
                for batch, hw in configs:
                    bar.set(bar.done, status=f"engine {mode} {batch}x{hw[0]}x{hw[1]}")
                    images, masks = random_batch(batch, hw)
                    gpu, e2e = [], []
                    for i in range(args.warmup + args.iters):
                        runner.infer(images, masks)
                        if i >= args.warmup:
                            gpu.append(runner.last_timing["gpu_ms"])
                            e2e.append(runner.last_timing["host_ms"])
                        bar.update(1)
                    extra = {"precision": engine.sidecar["precision"], "plugins": engine.sidecar["plugins"]}
                    if graphs and (batch, *hw) in runner.graph_failures:
                        extra["graph_failure"] = runner.graph_failures[(batch, *hw)]
                    yield make_row("tensorrt", mode, batch, hw, gpu, e2e, free_before - cuda.memory_info()[0], **extra)


def check_profile(profile, configs) -> None:
    """Refuse, before any timing, a batch or shape outside the engine's optimisation profile."""
    (min_b, min_h, min_w), (max_b, max_h, max_w) = profile.min, profile.max
    for batch, (h, w) in configs:
        if not (min_b <= batch <= max_b and min_h <= h <= max_h and min_w <= w <= max_w):
            raise BadInput(f"batch {batch} of {h}x{w} is outside the engine profile ({profile}): choose --shapes and "
                           "--batch inside it")


def bench_torch(args: argparse.Namespace, configs, bar: ProgressBar) -> Iterator[dict]:
    from runtime.torch_detector import TorchReference  # imports torch: only for --torch-weights

    reference = TorchReference(args.torch_weights, args.torch_device, "--torch-device")
    torch, model = reference.torch, reference.model
    device = torch.device(reference.device)
    on_gpu = device.type == "cuda"
    # One compiled graph per static shape: keep dynamo from falling back to eager when there are many.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, len(configs))
    for mode in args.torch_modes:
        forward = torch_forward(torch, model, mode)
        for batch, hw in configs:
            bar.set(bar.done, status=f"torch {mode} {batch}x{hw[0]}x{hw[1]}")
            images, masks = random_batch(batch, hw)
            staged = (torch.from_numpy(images), torch.from_numpy(masks))
            if on_gpu:
                staged = tuple(t.pin_memory() for t in staged)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2)) if on_gpu else (None, None)
            gpu, e2e, first_s = [], [], 0.0
            with torch.inference_mode():
                for i in range(args.warmup + args.iters):
                    t0 = time.perf_counter()
                    staged[0].copy_(torch.from_numpy(images))  # the same host copy the engine runner makes
                    x, m = (t.to(device, non_blocking=True) for t in staged)
                    if on_gpu:
                        start.record()
                    out = forward(x, m)
                    if on_gpu:
                        end.record()
                    _ = out["pred_logits"].cpu().numpy(), out["pred_boxes"].cpu().numpy()
                    elapsed = 1000 * (time.perf_counter() - t0)
                    if i == 0:
                        first_s = elapsed / 1000
                    if i >= args.warmup:
                        gpu.append(start.elapsed_time(end) if on_gpu else None)
                        e2e.append(elapsed)
                    bar.update(1)
            memory = torch.cuda.max_memory_reserved() if on_gpu else None
            yield make_row("torch", mode, batch, hw, gpu, e2e, memory, description=TORCH_MODES[mode],
                           first_call_s=first_s, torch_version=torch.__version__)


# synthetic:N writes N 640x480 JPEGs of about 90 KB to a temporary folder: enough for any steady-state rate, and
# bounded so that a typo cannot fill the disk.
MAX_SYNTHETIC = 10_000
SYNTHETIC_BYTES = 90_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def pipeline_files(spec: str, folder: Path | None) -> list[Path]:
    """The images a --pipeline run reads: a folder's image files (sorted), or synthetic:N made in `folder`."""
    if spec.startswith("synthetic:"):
        count = spec.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise BadInput(f"--pipeline {spec!r}: expected synthetic:N with N a positive integer, e.g. synthetic:64")
        if int(count) > MAX_SYNTHETIC:
            raise BadInput(f"--pipeline {spec}: at most synthetic:{MAX_SYNTHETIC} (about "
                           f"{format_bytes(MAX_SYNTHETIC * SYNTHETIC_BYTES)} of temporary JPEGs); for more, name a "
                           "folder of images: --pipeline DIR")
        if folder is None:
            return []
        with ProgressBar(int(count), desc="writing synthetic images", stream=sys.stderr) as bar:
            return synthetic_images(folder, int(count), written=bar.update)
    root = Path(spec)
    if not root.is_dir():
        raise BadInput(f"--pipeline {spec}: not a folder; name a folder of images or synthetic:N")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise BadInput(f"--pipeline {spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return paths


def pipeline_row(name: str, detector, paths: Sequence[Path], batch: int, args: argparse.Namespace) -> dict:
    """Files to detections through runtime.pipeline: one untimed batch first (engine warm-up, first compile), then
    every file, timed."""
    from runtime.pipeline import GPU_PREPROCESS

    stats = timed_stream(detector, paths, batch=batch, workers=args.workers, in_flight=args.in_flight,
                         gpu_preprocess=GPU_PREPROCESS[args.preprocess], gpu_decode=DECODE[args.decode])
    return {"backend": "pipeline", "model": name, "batch": batch, "workers": args.workers,
            "in_flight": args.in_flight, "preprocess": args.preprocess, "decode": args.decode, **stats.summary()}


def timed_stream(detector, paths: Sequence[Path], batch: int, **options: Any):
    """`runtime.pipeline.detect_stream` over the first batch untimed (engine warm-up, first compile, thread pools,
    first allocations), then over every file; the timed run's PipelineStats."""
    from runtime.pipeline import PipelineStats, detect_stream

    for _ in detect_stream(detector, paths[:batch], batch=batch, **options):
        pass
    stats = PipelineStats()
    for _ in detect_stream(detector, paths, batch=batch, stats=stats, **options):
        pass
    return stats


def bench_pipeline(args: argparse.Namespace, paths: Sequence[Path]) -> Iterator[dict]:
    batches = args.batch
    if args.engine is not None:
        from runtime.runner import EngineRunner

        with EngineRunner(args.engine, cuda_graphs=args.graphs) as runner:
            for batch in batches:
                yield pipeline_row(f"engine {Path(args.engine).name}", runner, paths, batch, args)
    if args.torch_weights is not None:
        from runtime.torch_detector import TorchReference

        for mode in args.torch_modes:
            reference = TorchReference(args.torch_weights, args.torch_device, "--torch-device", mode=mode)
            try:
                for batch in batches:
                    yield pipeline_row(f"torch {mode} {reference.device}", reference, paths, batch, args)
            finally:
                reference.close()


def print_pipeline_rows(rows: Sequence[dict]) -> None:
    from runtime.pipeline import STAGES

    table = [[r["model"], r["batch"], r["images"], r["errors"], _fmt(r["images_per_s"], 1),
              *(_fmt(r["stage_ms_per_image"][k]) for k in STAGES), _fmt(r["cpu_ms_per_image"])] for r in rows]
    print_table(table, ["model", "batch", "images", "errors", "img/s", *STAGES, "CPU ms/img"])
    print("stage columns: busy ms per image of each stage (they overlap); CPU: the process's CPU time per image")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_rows(rows: Sequence[dict]) -> None:
    table = []
    for r in rows:
        gpu, e2e = r["gpu_ms"] or {}, r["e2e_ms"]
        table.append([
            r["backend"], r["mode"], r["batch"], f"{r['height']}x{r['width']}",
            _fmt(gpu.get("p50")), _fmt(gpu.get("p90")), _fmt(gpu.get("p99")), _fmt(gpu.get("mean")),
            _fmt(e2e["p50"]), _fmt(e2e["mean"]), _fmt(r["images_per_s"], 1), _fmt(r["device_mem_mib"], 0),
        ])
    print_table(table, ["backend", "mode", "batch", "HxW", "gpu p50", "p90", "p99", "mean", "e2e p50", "mean",
                        "img/s", "mem MiB"])


def device_name(args: argparse.Namespace) -> str:
    if args.engine is None and args.torch_device == "cpu":
        return f"CPU ({platform.processor() or platform.machine()})"
    try:
        from core import cuda

        device = cuda.init()
        return f"{device.name} (compute capability {device.compute_capability})"
    except AnchorError:
        return f"CPU ({platform.processor() or platform.machine()})"


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "python -m runtime.bench",
        "Benchmark an AnchorDETR engine (a trtexec replacement for our engines) or the PyTorch\n"
        "reference: latency p50/p90/p99/mean of the GPU time (CUDA events) and of the end-to-end time\n"
        "(numpy in, host<->device copies, numpy out), throughput in images/s and device memory, per batch\n"
        "size and input shape. Random inputs: the time does not depend on the pixels.",
        EPILOG,
    )
    p.add_argument("--engine", type=Path, help="engine to measure (default: engines/anchor_detr_r50_dc5_fp16.plan "
                   "unless only --torch-weights is given)")
    p.add_argument("--shapes", type=hw_list, default="800x800,1344x1344", metavar="HxW,...",
                   help="input shapes (default 800x800,1344x1344)")
    p.add_argument("--batch", type=int_list, default="1,4", metavar="B,...", help="batch sizes (default 1,4)")
    p.add_argument("--iters", type=positive_int, default=50, help="timed iterations per row (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed iterations first (default 10)")
    p.add_argument("--graphs", action="store_true", help="also measure with CUDA graphs (one capture per shape)")
    p.add_argument("--torch-weights", type=Path, metavar="W.safetensors",
                   help="measure the PyTorch reference (reference.torch_model) with these weights")
    p.add_argument("--torch-modes", default=None,
                   help=f"torch modes to measure, of {','.join(TORCH_MODES)} (default: all; with --pipeline fp32)")
    p.add_argument("--torch-device", choices=("cuda", "cpu"), default="cuda",
                   help="torch device (default cuda; cpu for a quick check without a GPU)")
    p.add_argument("--pipeline", metavar="DIR|synthetic:N",
                   help="measure files -> detections through runtime.pipeline on a folder's images or N synthetic "
                   "640x480 JPEGs, with --engine and/or --torch-weights (rows per --batch)")
    p.add_argument("--workers", type=positive_int, default=usable_cpus(),
                   help="--pipeline: decoding threads (default: one per usable core)")
    p.add_argument("--in-flight", type=positive_int, default=2, help="--pipeline: batches in flight (default 2)")
    p.add_argument("--preprocess", choices=("auto", "gpu", "cpu"), default="cpu",
                   help="--pipeline: preprocessing on the CPU (default), the GPU kernel (bit-exact with the CPU "
                   "path), or auto (GPU when available)")
    add_decode_option(p, where="--pipeline: ")
    p.add_argument("--json", type=Path, metavar="FILE", help="write all rows as JSON (rewritten after every row)")
    return p


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from runtime.runner import DEFAULT_ENGINE, read_sidecar

    configs = [(b, hw) for b in args.batch for hw in args.shapes]
    if args.torch_modes is None:
        args.torch_modes = "fp32" if args.pipeline is not None else ",".join(TORCH_MODES)
    args.torch_modes = [m.strip() for m in args.torch_modes.split(",") if m.strip()]
    unknown = [m for m in args.torch_modes if m not in TORCH_MODES]
    if unknown or not args.torch_modes:
        raise BadInput(f"--torch-modes {unknown or args.torch_modes}: choose from {', '.join(TORCH_MODES)}")
    if args.warmup < 0:
        raise BadInput(f"--warmup {args.warmup} must be at least 0")
    if args.json is not None:
        check_output_path(args.json, "--json", [("--torch-weights", args.torch_weights), *engine_inputs(args.engine)])
    if args.torch_weights is not None:
        require_weights_file(args.torch_weights, "--torch-weights")
    if args.engine is None and args.torch_weights is None:
        args.engine = DEFAULT_ENGINE
    if args.pipeline is not None:
        return run_pipeline(args, argv)
    if args.engine is not None:  # the engine's own files and profile, before anything opens the GPU
        check_profile(read_sidecar(args.engine)[2], configs)
    runs = [bench_engine] * (args.engine is not None) + [bench_torch] * (args.torch_weights is not None)
    per_config = args.warmup + args.iters
    total = per_config * len(configs) * (
        (args.engine is not None) * (1 + args.graphs) + (args.torch_weights is not None) * len(args.torch_modes))
    report = {"command": "python -m runtime.bench " + " ".join(argv), "device": device_name(args), "rows": []}
    started = time.monotonic()
    with ProgressBar(total, desc="bench", stream=sys.stderr) as bar:
        for bench in runs:
            for row in bench(args, configs, bar):
                report["rows"].append(row)
                if args.json is not None:
                    write_atomic(args.json, (json.dumps(report, indent=1) + "\n").encode())
    print(f"\n{report['device']}; {args.iters} timed iterations after {args.warmup} warm-up; times in ms; "
          f"took {format_seconds(time.monotonic() - started)}")
    print_rows(report["rows"])
    return 0


def run_pipeline(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import tempfile

    from runtime.runner import read_sidecar

    pipeline_files(args.pipeline, None)  # a bad spec or an empty folder is refused before anything is made
    if args.engine is not None:
        read_sidecar(args.engine)
    report = {"command": "python -m runtime.bench " + " ".join(argv), "device": device_name(args),
              "cpu_cores": usable_cpus(), "rows": []}
    with tempfile.TemporaryDirectory(prefix="anchortrt-bench-") as scratch:
        paths = pipeline_files(args.pipeline, Path(scratch))
        for row in bench_pipeline(args, paths):
            report["rows"].append(row)
            if args.json is not None:
                write_atomic(args.json, (json.dumps(report, indent=1) + "\n").encode())
    print(f"\n{report['device']}, {report['cpu_cores']} CPU cores; {len(paths)} images from {args.pipeline}")
    print_pipeline_rows(report["rows"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    return guarded(p.prog, run, p.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
