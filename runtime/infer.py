"""Detect objects in images with an AnchorDETR TensorRT engine: ``python -m runtime.infer IMG [IMG ...]``; or with
the PyTorch reference model (``--torch-weights W --device cpu|cuda``), through the same table, JSON and drawing."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import closing
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from core.progress import ProgressBar, print_table
from core.sidecar import check_output_path, engine_inputs, replace_atomically, write_atomic
from core import labels
from core.cli import guarded, parser, positive_int, probability
from core.errors import EXIT_FAILED, BadInput
from runtime.decode import DECODE, add_decode_option
from runtime.torch_detector import TORCH_MODE_HELP, TORCH_MODES
from runtime.preprocess import ImageError, usable_cpus
from weights import require_weights_file

EPILOG = """\
examples:
  python -m runtime.infer photo.jpg                          table of detections (default engine)
  python -m runtime.infer a.jpg b.png --out annotated/       also draw boxes into annotated/a.jpg, b.jpg
  python -m runtime.infer val2017/*.jpg --threshold 0 --json results.json --no-exif
                                                             all top-100 detections as COCO results
  python -m runtime.infer photo.jpg --torch-weights W.safetensors --device cpu
                                                             the PyTorch reference: no GPU, no TensorRT
exit codes: 0 all images done, 1 some images could not be read (the others were processed),
            2 bad input (engine or sidecar missing, weights mismatch, bad arguments),
            3 environment (no GPU, no TensorRT, engine built for another TensorRT or GPU, no PyTorch),
            130 interrupted (Ctrl-C; 143 for SIGTERM): nothing is left half-written
"""


def build_parser() -> argparse.ArgumentParser:
    from runtime.runner import DEFAULT_ENGINE

    p = parser(
        "python -m runtime.infer",
        "Run an AnchorDETR engine built by `python -m netdef.build` on images: a table of detections\n"
        "per image (label, class name, score, box x0 y0 x1 y1 in pixels), optionally annotated images and\n"
        "a COCO results JSON (with each label's category_name). Class names come from the engine's sidecar\n"
        "(weights.extract --names; COCO's for a 91-class model). Images are resized and normalised as the official evaluation does; any\n"
        "Pillow-readable image works (EXIF orientation applied; grayscale, palette, alpha, CMYK and\n"
        "16-bit images converted to RGB). Needs an NVIDIA GPU and the TensorRT that built the engine;\n"
        "with --torch-weights, the PyTorch reference model runs instead, on the CPU or a GPU.",
        EPILOG,
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMG", help="image files")
    p.add_argument("--engine", type=Path,
                   help=f"engine file; its sidecar <engine>.json must be beside it (default: {DEFAULT_ENGINE})")
    p.add_argument("--torch-weights", type=Path, metavar="W.safetensors",
                   help="run the PyTorch reference model (FP32) with these weights instead of an engine")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="--torch-weights: where the reference runs (default: cuda if PyTorch sees a GPU, else cpu)")
    p.add_argument("--torch-mode", choices=tuple(TORCH_MODES), default=None,
                   help="--torch-weights: " + TORCH_MODE_HELP)
    p.add_argument("--threshold", type=probability, default=0.5,
                   help="keep detections scoring at least this (default 0.5; 0 keeps all top-100)")
    p.add_argument("--batch", type=positive_int, default=None, metavar="N",
                   help="images per engine call (default: the profile's largest batch)")
    p.add_argument("--out", type=Path, metavar="DIR", help="write annotated copies of the images here")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="write COCO results [{image_id, category_id, category_name, bbox [x,y,w,h], score}]; image_id is the file "
                   "name if numeric (000000397133.jpg -> 397133), else the image's position in the list")
    p.add_argument("--weights", type=Path, metavar="W.safetensors",
                   help="refuse the engine unless it was built from these weights (sha256 in the sidecar)")
    p.add_argument("--workers", type=positive_int, default=usable_cpus(), metavar="N",
                   help="threads decoding images ahead of the engine (default: one per usable core)")
    p.add_argument("--preprocess", choices=("auto", "gpu", "cpu"), default="cpu",
                   help="where images are resized and normalised: the CPU (default), the GPU kernel writing into "
                   "the engine's inputs (bit-exact with the CPU path, docs/preprocess.md), or auto (the GPU when "
                   "available)")
    add_decode_option(p)
    p.add_argument("--no-exif", action="store_true",
                   help="ignore EXIF orientation (COCO boxes refer to the stored pixels)")
    return p


def open_runner(engine: Path, weights_sha256: str | None):
    """The detector the command uses (tests replace it with one that needs no GPU)."""
    from runtime.runner import EngineRunner

    return EngineRunner(engine, weights_sha256)


def open_reference(weights: Path, device: str | None, mode: str = "fp32"):
    """The PyTorch reference as the command's detector (--torch-weights); on CUDA it takes the GPU path."""
    from runtime.torch_detector import TorchReference

    return TorchReference(weights, device, mode=mode)


def warn_random_weights(torch_weights: Path | None = None, engine: Path | None = None) -> bool:
    """One warning line on stderr when the weights (or the weights an engine embeds, per its sidecar) are random
    (weights.extract --random-init): ~100 confident boxes that mean nothing. For every command that detects
    (runtime.infer, serve.server); call it once the detector is open (its files are checked). Whether it warned."""
    from core.sidecar import SidecarError, load_sidecar
    from weights import WeightsError, is_random_init

    try:
        random = is_random_init(torch_weights) if torch_weights else bool(load_sidecar(engine).get("random_init"))
    except (SidecarError, WeightsError):  # the detector refused such files already
        return False
    if random:
        what = f"--torch-weights {torch_weights}" if torch_weights else f"engine {engine}"
        print(f"warning: {what} holds random weights (weights.extract --random-init): its detections mean nothing; "
              "extract an official checkpoint for real ones", file=sys.stderr)
    return random


def class_names(detector) -> dict[int, str]:
    """The class names of what runs (core.labels): an engine's, from its sidecar; the PyTorch reference's, from its
    weights (its `names`); COCO's for a detector that has neither."""
    engine = getattr(detector, "engine", None)
    if engine is not None:
        return labels.of_sidecar(engine.sidecar)
    return getattr(detector, "names", None) or labels.default_names(labels.COCO_NUM_CLASSES)


def image_id(path: Path, index: int) -> int:
    return int(path.stem) if path.stem.isdigit() else index


def coco_records(image_id_: int, detections: dict[str, np.ndarray], names: dict[int, str] | None = None,
                 category_ids: dict[int, int] | None = None) -> list[dict]:
    """COCO results entries; ``names`` adds each label's ``category_name`` (pycocotools ignores it), and
    ``category_ids`` maps labels to a dataset's category ids (eval.coco), dropping labels it lacks."""
    records = []
    for score, label, (x0, y0, x1, y1) in zip(detections["scores"], detections["labels"], detections["boxes"]):
        label = int(label)
        if category_ids is not None and label not in category_ids:
            continue
        record = {
            "image_id": image_id_,
            "category_id": label if category_ids is None else category_ids[label],
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "score": float(score),
        }
        if names is not None:
            record["category_name"] = labels.label_name(names, label)
        records.append(record)
    return records


def print_detections(path: Path, size: tuple[int, int], detections: dict[str, np.ndarray], threshold: float,
                     names: dict[int, str]) -> None:
    count = len(detections["scores"])
    print(f"\n{path}  {size[0]}x{size[1]}  {count} detection{'s' * (count != 1)} (score >= {threshold:g})")
    if count:
        rows = [
            [int(label), labels.label_name(names, label), f"{score:.3f}", *(f"{v:.1f}" for v in box)]
            for score, label, box in zip(detections["scores"], detections["labels"], detections["boxes"])
        ]
        print_table(rows, ["label", "name", "score", "x0", "y0", "x1", "y1"])


def _output_name(path: Path, used: set[str]) -> str:
    name, n = f"{path.stem}.jpg", 1
    while name in used:
        name, n = f"{path.stem}_{n}.jpg", n + 1
    used.add(name)
    return name


def _write(path: Path, write: Callable[[], object]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # --out is made with its first image, not before
        write()
    except OSError as exc:
        raise BadInput(f"cannot write {path} ({exc.strerror or exc}): choose a writable destination") from None


def finish(json_path: Path | None, records: list[dict], count: int, failed: list[str], total: int) -> int:
    """Write the COCO results (when asked for) and the closing line; the exit code (1 when images were skipped)."""
    if json_path is not None:
        _write(json_path, lambda: write_atomic(json_path, json.dumps(records).encode()))
    done = count - len(failed)
    print(f"\n{done} image{'s' * (done != 1)} processed, {total} detections"
          + (f"; {len(failed)} skipped: {', '.join(failed)}" if failed else ""))
    return EXIT_FAILED if failed else 0


def _readable(path: Path) -> bool:
    if path.is_file() and os.access(path, os.R_OK):
        return True
    print(f"skipped: {path}: {'no such file' if not path.exists() else 'not a readable file'}", file=sys.stderr)
    return False


def _check_arguments(args: argparse.Namespace) -> tuple[list[tuple[int, Path, Path | None]], list[str]]:
    """Everything that needs no GPU, before it is opened. Returns (index, image, annotated copy or None) of each
    image that can be read, and the names of those that cannot (reported and skipped)."""
    if args.torch_weights is not None:
        for option in ("engine", "weights"):
            if getattr(args, option) is not None:
                raise BadInput(f"--{option} is for engines; --torch-weights runs the PyTorch reference instead: "
                               "give one or the other")
        if args.preprocess == "gpu" and args.device == "cpu":
            raise BadInput("--preprocess gpu writes into CUDA inputs; with --device cpu use --preprocess cpu")
        require_weights_file(args.torch_weights, "--torch-weights")
    elif args.device is not None or args.torch_mode is not None:
        option = "--device" if args.device is not None else "--torch-mode"
        raise BadInput(f"{option} applies to --torch-weights only (an engine runs on GPU 0)")
    else:
        from runtime.runner import DEFAULT_ENGINE

        args.engine = args.engine or DEFAULT_ENGINE
    if args.weights is not None:
        require_weights_file(args.weights, fix="name the weights file the engine was built from")
    readable = [(i, path) for i, path in enumerate(args.images) if _readable(path)]
    if not readable:
        raise BadInput(f"none of the {len(args.images)} image file(s) can be read: name existing image files")
    used: set[str] = set()
    jobs = [(i, path, args.out / _output_name(path, used) if args.out else None) for i, path in readable]
    inputs = [("image", path) for path in args.images] + [("--weights", args.weights),
                                                          ("--torch-weights", args.torch_weights),
                                                          *engine_inputs(args.engine)]
    for what, target in [("--json", args.json)] + [("--out", t) for *_, t in jobs]:
        if target is not None:
            check_output_path(target, what, inputs)  # an OutputPathError is a BadInput
    unreadable = sorted(set(range(len(args.images))) - {i for i, _ in readable})
    return jobs, [str(args.images[i]) for i in unreadable]


def run(args: argparse.Namespace) -> int:
    from runtime.draw import draw_detections
    from runtime.pipeline import GPU_PREPROCESS, detect_stream

    jobs, failed = _check_arguments(args)
    weights_sha256 = None
    if args.weights is not None:
        from weights import file_sha256

        weights_sha256 = file_sha256(args.weights)
    if args.torch_weights is not None:
        runner = open_reference(args.torch_weights, args.device, args.torch_mode or "fp32")
    else:
        runner = open_runner(args.engine, weights_sha256)
    names = class_names(runner)
    records: list[dict] = []
    total = 0
    try:
        warn_random_weights(args.torch_weights, args.engine)
        found = detect_stream(runner, [path for _, path, _ in jobs], args.threshold, args.batch,
                              exif=not args.no_exif, workers=args.workers, keep_images=True,
                              gpu_preprocess=GPU_PREPROCESS[args.preprocess], gpu_decode=DECODE[args.decode])
        # closing: the pipeline's threads are done with the runner before it is closed, even after an error
        with closing(found), ProgressBar(len(jobs), desc="images", stream=sys.stderr) as bar:
            for (index, path, target), (_, detections, rgb) in zip(jobs, found):
                if isinstance(detections, ImageError):
                    print(f"skipped: {detections}", file=sys.stderr)
                    failed.append(str(path))
                else:
                    print_detections(path, rgb.size, detections, args.threshold, names)
                    total += len(detections["scores"])
                    records += coco_records(image_id(path, index), detections, names)
                    if target is not None:
                        drawn = draw_detections(rgb, detections, names)  # written whole or not at all, even on Ctrl-C
                        _write(target, lambda: replace_atomically(
                            target, lambda tmp: drawn.save(tmp, format="JPEG", quality=92)))
                bar.update(1)
    finally:
        runner.close()
    return finish(args.json, records, len(args.images), failed, total)


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    return guarded(p.prog, run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
