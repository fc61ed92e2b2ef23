"""GPU decoding and the device-resident path, piece by piece, on synthetic 640x480 JPEGs.

    python -m benchmarks.gpu_decode_bench [--images 512] [--torch-weights W.safetensors] [--out gpu_decode.json]

Rows: Pillow decoding on every core (the CPU path's decode); `runtime.decode.BatchDecoder` (nvImageCodec, the
hardware decoder, else the CUDA decoder) at batch 8, 32 and 128, with the host CPU it costs per image; how far its
pixels are from Pillow's; and a bare loop on one thread of what the GPU path does per batch without the pipeline:
file bytes in memory -> one decode call -> the kernel reading the decoded buffers in place -> the device top-100
of stand-in raw outputs (`runtime.gpu_postprocess.DeviceTopK`), or a download of in-engine top-100-sized outputs
-> synchronise. The bare loop is the ceiling the pipeline (benchmarks.pipeline_capacity --gpu) is measured against.
With --torch-weights, the effect of GPU decoding on detections: the same images (the synthetic ones and photo-like
ones of other sizes) decoded by Pillow and by nvImageCodec, each through the exact CPU transform and the reference
(FP32 on CUDA); reported are the largest change of any score (sigmoid of all queries x classes) and of any box
coordinate in pixels, and of the top-100 detections where the two runs rank the same (label, query).
Exit codes: 0 ok, 2 bad arguments, 3 no GPU or no nvImageCodec.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.report import emit
from core.cli import guarded, positive_int
from core.sidecar import check_output_path
from runtime.synthetic import synthetic_jpegs
from weights import require_weights_file
from runtime.preprocess import load_image, to_rgb

QUERIES, CLASSES, TOP = 900, 91, 100


def _rate(fn, count: int) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images_per_s": round(count / wall, 1), "cpu_ms_per_image": round(1000 * cpu / count, 3)}


def bench(count: int) -> dict:
    from core import cuda
    from runtime.decode import BatchDecoder
    from runtime.gpu_postprocess import DeviceTopK
    from runtime.gpu_preprocess import GpuPreprocessor

    device = cuda.init()
    data = list(synthetic_jpegs(count))  # the bytes synthetic_images writes, without the round trip through files
    report: dict = {"device": device.name, "cpu_cores": os.cpu_count(), "images": count}
    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda d: load_image(io.BytesIO(d)), data[:64]))
        report["pillow_decode"] = {"threads": threads, **_rate(
            lambda: list(pool.map(lambda d: load_image(io.BytesIO(d)), data)), count)}
    with BatchDecoder(exif=True) as decoder:
        for batch in (8, 32, 128):
            decoder.decode(data[:batch])
            report[f"nvimgcodec_batch{batch}"] = _rate(
                lambda: [decoder.decode(data[i:i + batch]) for i in range(0, count, batch)], count)
        report["decode_counts"] = dict(decoder.counts)
        differ = total = worst = 0
        for d, image in zip(data[:64], decoder.decode(data[:64])):
            got = np.asarray(image.to_pil(), dtype=np.int16)
            expected = np.asarray(to_rgb(Image.open(io.BytesIO(d))), dtype=np.int16)
            worst = max(worst, int(np.abs(got - expected).max()))
            differ, total = differ + int((got != expected).sum()), total + got.size
        report["nvimgcodec_vs_pillow"] = {"max_levels": worst, "differing_percent": round(100 * differ / total, 4)}
        report["bare_loop"] = bare_loop(cuda, decoder, data, GpuPreprocessor, DeviceTopK)
    return report


def bare_loop(cuda, decoder, data: list[bytes], GpuPreprocessor, DeviceTopK) -> dict:
    rows = {}
    rng = np.random.default_rng(0)
    for batch in (1, 8, 32):
        shape = (batch, 800, 1066)
        nbytes = batch * 3 * 800 * 1066 * 4
        logits = rng.standard_normal((batch, QUERIES, CLASSES), dtype=np.float32)
        boxes = rng.uniform(0.1, 0.9, (batch, QUERIES, 4)).astype(np.float32)
        with GpuPreprocessor(batch, (1344, 1344)) as pre, DeviceTopK(batch, stream=pre.stream) as top, \
                cuda.DeviceBuffer(nbytes + batch * 800 * 1066) as inputs, cuda.DeviceBuffer(logits.nbytes) as dl, \
                cuda.DeviceBuffer(boxes.nbytes) as db, cuda.PinnedBuffer(batch * TOP * 6, np.float32) as small, \
                cuda.DeviceBuffer(batch * TOP * 6 * 4) as small_dev:
            dl.upload(logits, pre.stream)
            db.upload(boxes, pre.stream)
            for variant in ("in_engine_top100", "raw_outputs_device_top100"):
                def one(start: int) -> None:
                    images = decoder.decode(data[start:start + batch])
                    for slot, image in enumerate(images):
                        pre.place(slot, image.ptr, image.height, image.width, image.pitch, owner=image)
                    pre.run(inputs.ptr, inputs.ptr + nbytes, shape)
                    if variant == "in_engine_top100":  # scores, labels, boxes of an engine with the top-100 inside
                        small_dev.download(small.array, pre.stream)
                    else:
                        top.run(dl.ptr, db.ptr, batch, QUERIES, CLASSES)
                    pre.stream.synchronize()
                    if variant != "in_engine_top100":
                        top.outputs()

                one(0)
                starts = list(range(0, len(data) - batch + 1, batch))
                rows[f"batch{batch}_{variant}"] = _rate(lambda: [one(s) for s in starts], len(starts) * batch)
    return rows


def decode_effect(weights: Path, data: list[bytes]) -> dict:
    """Largest score and box changes from decoding `data` with nvImageCodec instead of Pillow (reference, FP32)."""
    import torch

    from runtime.decode import BatchDecoder
    from runtime.postprocess import postprocess, sigmoid
    from runtime.preprocess import original_sizes, prepare_batch
    from runtime.torch_detector import TorchReference

    reference = TorchReference(weights, "cuda")
    worst = {"score": 0.0, "box_px": 0.0, "top100_score": 0.0, "top100_box_px": 0.0, "top100_same_rank": 0, "top100": 0}
    with BatchDecoder(exif=True) as decoder:
        for start in range(0, len(data), 4):
            chunk = data[start:start + 4]
            pillow = [to_rgb(Image.open(io.BytesIO(d))) for d in chunk]
            gpu = [image.to_pil() for image in decoder.decode(chunk)]
            runs = []
            for rgb in (pillow, gpu):
                batch = prepare_batch(rgb)
                with torch.inference_mode():
                    out = reference.model(torch.from_numpy(batch.images).cuda(), torch.from_numpy(batch.masks).cuda())
                runs.append(({k: out[k].float().cpu().numpy() for k in ("pred_logits", "pred_boxes")},
                             original_sizes(rgb)))
            (a, sizes), (b, _) = runs
            worst["score"] = max(worst["score"], float(np.abs(sigmoid(a["pred_logits"]) - sigmoid(b["pred_logits"])).max()))
            scale = np.concatenate([sizes[:, ::-1], sizes[:, ::-1]], axis=1)[:, None, :]  # w, h, w, h per image
            worst["box_px"] = max(worst["box_px"], float((np.abs(a["pred_boxes"] - b["pred_boxes"]) * scale).max()))
            for ra, rb in zip(postprocess(a["pred_logits"], a["pred_boxes"], sizes),
                              postprocess(b["pred_logits"], b["pred_boxes"], sizes)):
                same = ra["labels"] == rb["labels"]
                worst["top100_same_rank"] += int(same.sum())
                worst["top100"] += len(same)
                if same.any():
                    worst["top100_score"] = max(worst["top100_score"], float(np.abs(ra["scores"] - rb["scores"])[same].max()))
                    worst["top100_box_px"] = max(worst["top100_box_px"], float(np.abs(ra["boxes"] - rb["boxes"])[same].max()))
    reference.close()
    return {"images": len(data), "weights": Path(weights).name, **worst}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_decode_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=positive_int, default=512, help="synthetic 640x480 JPEGs (default 512)")
    p.add_argument("--torch-weights", type=Path, metavar="W.safetensors",
                   help="also measure GPU decoding's effect on the reference's detections with these weights")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    return guarded(p.prog, run, p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.out:
        check_output_path(args.out, "--out")
    if args.torch_weights is not None:
        require_weights_file(args.torch_weights, "--torch-weights")
    report = bench(args.images)
    if args.torch_weights is not None:
        rng = np.random.default_rng(1)
        fixed = list(synthetic_jpegs(16))
        for h, w in [(427, 640), (640, 480), (1200, 1600), (333, 500), (800, 1333), (97, 151)]:
            y, x = np.mgrid[0:h, 0:w]
            pixels = np.stack([x * 255 / w, y * 255 / h, (3 * x + y) % 256], -1) + rng.normal(0, 14, (h, w, 3))
            buffer = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=88)
            fixed.append(buffer.getvalue())
        report["effect_on_detections"] = decode_effect(args.torch_weights, fixed)
    emit(report, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
