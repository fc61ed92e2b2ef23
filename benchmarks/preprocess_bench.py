"""Benchmark preprocessing of 640x480 images (-> 800x1066): the CPU path against a plain Pillow + NumPy version,
and with --gpu the GPU kernel.

    python -m benchmarks.preprocess_bench [--batch 4] [--repeat 5] [--files N] [--gpu] [--out preprocess_bench.json]
    python -m benchmarks.preprocess_bench --kernel-variants PIXELS_X=4 PIXELS_X=4,MIN_BLOCKS=8 [--rounds 2]

CPU: both sides start from decoded images and end with the padded (B,3,H,W) float32 batch and its masks; the
plain version resizes with Pillow, normalises with NumPy float32 arithmetic ((x / 255 - mean) / std) and pads
with pad_batch, as runtime.preprocess did before the lookup table. Times are the best of --repeat runs, per image.
Files (--files N): N synthetic JPEG files to preprocessed images, a plain thread pool (one thread per usable core,
`load_image` + `preprocess_image` per file) against runtime.pipeline's CPU path with the same decode threads and a
stand-in engine (benchmarks.pipeline_capacity.NullEngine), which also pads into batches and post-processes:
images/s, best of --repeat runs each, taken in turns.
GPU (`bench_gpu`): CUDA-event time per image at batch 1 and 8 of the two kernels alone (graph replays), of
`GpuPreprocessor.run` as the pipeline calls it, and of run with each image's upload before it.
Kernel variants (--kernel-variants): the kernels alone, compiled with other values of runtime.gpu_preprocess's
kernel constants (PIXELS_X, MIN_BLOCKS, BLOCK_Y: the block is 32 x BLOCK_Y threads), each variant in turn, --rounds
times, so that run-to-run drift shows against the differences; the CPU rows are skipped.
Exit codes: 0 ok, 2 bad arguments, 3 no GPU (with --gpu).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.report import emit
from core.cli import guarded, positive_int
from core.sidecar import check_output_path
from runtime.preprocess import (
    MEAN, STD, load_image, pad_batch, preprocess_batch, preprocess_image, resized_hw, usable_cpus,
)
from runtime.synthetic import decoded_images, synthetic_images

def plain(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """Pillow resize, NumPy float32 normalisation per image, then pad_batch."""
    planes = []
    for image in images:
        height, width = resized_hw(image.height, image.width)
        pixels = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR)).astype(np.float32)
        planes.append(np.ascontiguousarray(((pixels / np.float32(255) - MEAN) / STD).transpose(2, 0, 1)))
    return pad_batch(planes)


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def bench_cpu(batch: int, repeat: int) -> dict:
    images = decoded_images(batch)
    ours_batch, ours_masks, _ = preprocess_batch(images)
    ref_batch, ref_masks = plain(images)
    if not (np.array_equal(ours_batch, ref_batch) and np.array_equal(ours_masks, ref_masks)):
        raise AssertionError("preprocess_batch differs from the plain Pillow + NumPy version")
    resize = best_ms(lambda: [im.resize((1066, 800), Image.Resampling.BILINEAR) for im in images], repeat) / batch
    serial = best_ms(lambda: preprocess_batch(images, threads=False), repeat) / batch
    ours = best_ms(lambda: preprocess_batch(images), repeat) / batch
    base = best_ms(lambda: plain(images), repeat) / batch
    return {"batch": batch, "resize_ms_per_image": round(resize, 2), "plain_ms_per_image": round(base, 2),
            "ours_one_thread_ms_per_image": round(serial, 2), "ours_ms_per_image": round(ours, 2),
            "speedup_one_thread": round(base / serial, 2), "speedup": round(base / ours, 2)}


def bench_files(count: int, batch: int, repeat: int) -> dict:
    """Files to preprocessed images/s: a plain thread pool and the pipeline's CPU path, in turns."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.pipeline_capacity import NullEngine, measure

    workers = usable_cpus()
    plain_rates, pipeline_rates = [], []
    with tempfile.TemporaryDirectory(prefix="anchortrt-preprocess-") as folder, \
            ThreadPoolExecutor(workers) as pool:
        paths = synthetic_images(Path(folder), count)

        def one(path: Path) -> np.ndarray:
            return preprocess_image(load_image(path))

        list(pool.map(one, paths[:batch]))  # warm-up
        for _ in range(repeat):
            start = time.perf_counter()
            list(pool.map(one, paths))
            plain_rates.append(count / (time.perf_counter() - start))
            pipeline_rates.append(measure(NullEngine(), paths, batch, workers, 2, gpu=False)["images_per_s"])
    plain, pipeline = max(plain_rates), max(pipeline_rates)
    return {"files": count, "batch": batch, "threads": workers, "plain_pool_images_per_s": round(plain, 1),
            "pipeline_images_per_s": round(pipeline, 1), "pipeline_over_plain": round(pipeline / plain, 2)}


# runtime.gpu_preprocess's kernel constants a variant may set, each with its range (the switches: 0 off, 1 on).
VARIANT_KEYS = {"PIXELS_X": (1, 64), "MIN_BLOCKS": (1, 32), "BLOCK_Y": (1, 32), "PAIRED": (0, 1),
                "STREAM_STORES": (0, 1)}


def kernel_variant(text: str) -> dict[str, int]:
    """--kernel-variants' value: comma-separated NAME=N of VARIANT_KEYS, e.g. "PIXELS_X=4,MIN_BLOCKS=8"."""
    values = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        low, high = VARIANT_KEYS.get(name, (1, 0))
        if not value.isdigit() or not low <= int(value) <= high:
            raise argparse.ArgumentTypeError(f"{part!r}: expected NAME=N with NAME one of {', '.join(VARIANT_KEYS)} "
                                             "and N from 1 (0 or 1 for PAIRED and STREAM_STORES), e.g. "
                                             "PIXELS_X=4,MIN_BLOCKS=8")
        values[name] = int(value)
    return values


def bench_variants(variants: list[dict[str, int]], rounds: int) -> list[dict]:
    """`bench_gpu`'s kernel rows for each variant of the kernel constants, all variants in turn, `rounds` times."""
    from runtime import gpu_preprocess as g

    saved = g.PIXELS_X, g.MIN_BLOCKS, g.BLOCK, g.PAIRED, g.STREAM_STORES
    rows = []
    try:
        for turn in range(rounds):
            for variant in variants:
                g.PIXELS_X = variant.get("PIXELS_X", saved[0])
                g.MIN_BLOCKS = variant.get("MIN_BLOCKS", saved[1])
                g.BLOCK = (saved[2][0], variant.get("BLOCK_Y", saved[2][1]), 1)
                g.PAIRED = variant.get("PAIRED", saved[3] if g.PIXELS_X == 2 else 0)  # PAIRED needs 2
                g.STREAM_STORES = variant.get("STREAM_STORES", saved[4])
                timed = bench_gpu(steps=("kernel",))
                rows.append({"variant": ",".join(f"{k}={v}" for k, v in variant.items()), "round": turn + 1,
                             **{k: v for k, v in timed.items() if k != "device"}})
    finally:
        g.PIXELS_X, g.MIN_BLOCKS, g.BLOCK, g.PAIRED, g.STREAM_STORES = saved
    return rows


def bench_gpu(iterations: int = 1000, steps: tuple[str, ...] = ("kernel", "run", "upload_and_run")) -> dict:
    """Per image, at batch 1 and 8: the two kernels alone (their launches captured once in a CUDA graph, replayed
    back to back, CUDA-event time), `run` as the pipeline calls it (slot records, launches; host-bound when the
    GPU is faster than Python), and each image's upload (pinned copy, host-to-device) queued before every run."""
    from core import cuda
    from runtime.gpu_preprocess import GpuPreprocessor

    device = cuda.init()
    arrays = [np.asarray(image) for image in decoded_images(8)]
    results = {}
    with GpuPreprocessor(max_batch=8, max_hw=(1344, 1344)) as gpu, cuda.Event() as start, cuda.Event() as end:
        for batch in (1, 8):
            for slot in range(batch):
                gpu.upload(slot, arrays[slot])
            shape = (batch, 800, 1066)
            with cuda.DeviceBuffer(batch * 800 * 1066 * 13) as out:  # 12 bytes of images + 1 of mask per pixel
                images_ptr, masks_ptr = out.ptr, out.ptr + batch * 800 * 1066 * 12
                gpu.run(images_ptr, masks_ptr, shape)
                with cuda.Graph(gpu.stream, lambda: gpu._launch(images_ptr, masks_ptr, 800, 1066)) as graph:
                    steps_of = {"kernel": lambda: graph.launch(gpu.stream),
                             "run": lambda: gpu.run(images_ptr, masks_ptr, shape),
                             "upload_and_run": lambda: ([gpu.upload(slot, arrays[slot]) for slot in range(batch)],
                                                        gpu.run(images_ptr, masks_ptr, shape))}
                    for name, step in ((k, v) for k, v in steps_of.items() if k in steps):
                        # Warm up for half a second of work: an idle H200 sits at 345 MHz and needs time under
                        # load to reach its boost clock (nvidia-smi), more than 500 short replays take.
                        until = time.perf_counter() + 0.5
                        while time.perf_counter() < until:
                            for _ in range(20):
                                step()
                            gpu.stream.synchronize()
                        start.record(gpu.stream)
                        for _ in range(iterations):
                            step()
                        end.record(gpu.stream)
                        end.synchronize()
                        key = f"batch{batch}_{name}_us_per_image"
                        results[key] = round(cuda.Event.elapsed_ms(start, end) * 1e3 / iterations / batch, 2)
    results["device"] = device.name
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.preprocess_bench", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=positive_int, default=4)
    p.add_argument("--repeat", type=positive_int, default=5)
    p.add_argument("--files", type=positive_int, metavar="N",
                   help="also compare files -> preprocessed images: a plain thread pool and the pipeline's CPU path")
    p.add_argument("--gpu", action="store_true", help="also time the GPU kernel")
    p.add_argument("--kernel-variants", nargs="+", type=kernel_variant, metavar="NAME=N[,NAME=N]",
                   help=f"time only the GPU kernels, compiled with each of these values of {', '.join(VARIANT_KEYS)}")
    p.add_argument("--rounds", type=positive_int, default=2, help="turns through --kernel-variants (default 2)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return guarded(p.prog, run, p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.out:
        check_output_path(args.out, "--out")
    if args.kernel_variants:
        emit({"kernel_variants": bench_variants(args.kernel_variants, args.rounds)}, args.out, indent=2)
        return 0
    results = {"cpu": bench_cpu(args.batch, args.repeat)}
    if args.files:
        results["files"] = bench_files(args.files, args.batch, args.repeat)
    if args.gpu:
        results["gpu"] = bench_gpu()  # core.cuda says so in one line when there is no GPU
    emit(results, args.out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
