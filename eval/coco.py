"""COCO bbox mAP with pycocotools: the TensorRT engine and the PyTorch reference, side by side.

Evaluate models on COCO val2017 (or any COCO-format set laid out the same way):

    python -m eval.coco --coco-root DIR --engine E.plan --torch-weights W.safetensors [--limit N] [--batch B]

DIR holds val2017/ and annotations/instances_val2017.json. Every batch is read, resized and padded once
and fed to each model, so both see identical inputs and share the post-processing: the only difference
is the model. Each model's labels are mapped to the annotations' category ids by class name (core.labels: the
names given to weights.extract --names, COCO's for a 91-class model), so a fine-tuned model scores on its own
COCO-format dataset; a model without names keeps label = category id. Writes a COCO results file
per model and a metrics JSON {"engine": {...}, "torch": {...}, "delta_AP": engine AP - torch AP}.

Score an existing results file instead (the numbers pycocotools gives, unrounded):

    python -m eval.coco --annotations ANN.json --results RES.json [--json METRICS]

An image that cannot be read is reported, left out, and listed under "skipped" in the metrics JSON: the mAP
covers the others and the run is partial (exit 1).

Exit codes: 0 ok, 1 partial (some images could not be read), 2 bad input or usage, 3 environment (no GPU, no
TensorRT, no PyTorch), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Sequence

from core import cli
from core.cli import positive_int
from core.errors import EXIT_FAILED, BadInput, Unavailable
from eval.scoring import EvalError, check_results, evaluate, load_ground_truth, read_json, side_by_side_rows
from core.progress import ProgressBar, Spinner, print_table
from core.sidecar import check_output_path, engine_inputs, write_atomic
from runtime.decode import add_decode_option
from runtime.infer import class_names
from runtime.torch_detector import TORCH_MODE_HELP, TORCH_MODES
from runtime.preprocess import usable_cpus

ANNOTATIONS = Path("annotations") / "instances_val2017.json"
IMAGES = Path("val2017")
# The seed deployment's headline (A10, TensorRT 8.4, FP16 with plugins), for comparison with ours.
SEED_AP = {"engine": 0.43934, "torch": 0.44263}


def coco_results(image_ids: Sequence[int], detections: Sequence[dict], category_ids: dict[int, int] | None = None
                 ) -> list[dict]:
    """Detections (x0,y0,x1,y1 pixel boxes) of each image as COCO results entries with [x, y, w, h] boxes;
    ``category_ids`` maps labels to the dataset's category ids (category_map)."""
    from runtime.infer import coco_records

    return [record for image_id, det in zip(image_ids, detections)
            for record in coco_records(int(image_id), det, category_ids=category_ids)]


def category_map(names: dict[int, str], gt, what: str) -> dict[int, int] | None:
    """label -> the annotations' category id of the same class name, detections of other labels dropped; None
    (label = category id, every detection kept, COCOeval ignores the ids it does not list) for a model whose labels
    have no names or whose labels already are the annotations' ids (a COCO model on COCO). EvalError when a
    category of the annotations is not one of the model's classes: its detections would be missing and the mAP
    silently low."""
    if not names:
        return None
    by_name = {cat["name"]: cat["id"] for cat in gt.loadCats(gt.getCatIds())}
    missing = sorted(set(by_name) - set(names.values()))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise EvalError(f"{what} has no class named as the annotations' categories {shown}: extract its weights "
                        "with `python -m weights.extract --names ANNOTATIONS.json` and build again")
    mapping = {label: by_name[name] for label, name in names.items() if name in by_name}
    return None if all(label == cid for label, cid in mapping.items()) else mapping


def write_text(path: str | Path, text: str) -> None:
    """Write ``path`` whole or not at all; its missing folders (--results-dir) are made now, not before."""
    try:
        write_atomic(path, text.encode())
    except OSError as e:
        raise EvalError(f"cannot write {path}: {e.strerror or e}; choose a writable path") from None


def check_outputs(inputs: Sequence[tuple[str, str | Path | None]], *paths: tuple[str, str | Path]) -> None:
    """Refuse, before any work, (option, path) pairs that cannot be written (a folder, an unwritable folder) or
    that are one of the (option, path) ``inputs``."""
    for what, path in paths:
        check_output_path(path, what, inputs)  # an OutputPathError is a BadInput


def image_files(gt, image_dir: Path, image_ids: Sequence[int]) -> list[Path]:
    """The file of each image; every one must exist before any model runs (a gap would skew the mAP)."""
    paths, missing = [], []
    for image_id in image_ids:
        name = gt.imgs[image_id].get("file_name")
        if not isinstance(name, str):
            raise EvalError(f"annotation file: image {image_id} has no 'file_name'")
        path = image_dir / name
        paths.append(path)
        if not path.is_file():
            missing.append(path)
    if missing:
        raise EvalError(
            f"{len(missing)} of {len(paths)} images are missing from {image_dir} (first: {missing[0].name}); "
            "download the full val2017 set or evaluate fewer with --limit"
        )
    return paths


def open_models(args) -> list:
    from weights import file_sha256, require_weights_file

    if args.torch_weights:
        require_weights_file(args.torch_weights, "--torch-weights")
    models = []
    try:
        if args.engine:
            from runtime.runner import EngineRunner

            # Side by side only makes sense for one set of weights: the runtime refuses an engine built from others.
            same_weights = file_sha256(args.torch_weights) if args.torch_weights else None
            models.append(EngineRunner(args.engine, same_weights))
        if args.torch_weights:
            from runtime.torch_detector import TorchReference

            models.append(TorchReference(args.torch_weights, args.device, mode=args.torch_mode))
    except BaseException:
        for model in models:
            model.close()
        raise
    return models


def batch_limits(models: Sequence) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """The padding floor and size ceiling every model accepts (an engine's profile; the reference has none)."""
    mins = [m.min_hw for m in models if m.min_hw is not None]
    maxs = [m.max_hw for m in models if m.max_hw is not None]
    min_hw = tuple(max(v[i] for v in mins) for i in (0, 1)) if mins else None
    max_hw = tuple(min(v[i] for v in maxs) for i in (0, 1)) if maxs else None
    return min_hw, max_hw


def open_coco_root(root: Path, limit: int | None):
    """Ground truth, the image ids to evaluate (the first `limit` by id) and their files, all checked."""
    ann_path, image_dir = root / ANNOTATIONS, root / IMAGES
    if not root.is_dir():
        raise EvalError(f"--coco-root {root} is not a folder; it must hold val2017/ and {ANNOTATIONS}")
    if not ann_path.is_file():
        raise EvalError(f"annotation file {ann_path} does not exist; download annotations_trainval2017.zip into {root}")
    if not image_dir.is_dir():
        raise EvalError(f"image folder {image_dir} does not exist; download val2017.zip into {root}")
    gt = load_ground_truth(ann_path)
    image_ids = sorted(gt.getImgIds())[:limit]
    if not image_ids:
        raise EvalError(f"annotation file {ann_path} lists no images")
    return gt, image_ids, image_files(gt, image_dir, image_ids)


def run_models(models: Sequence, image_ids: Sequence[int], paths: Sequence[Path], batch: int, workers: int,
               category_ids: dict[str, dict[int, int] | None] | None = None, gpu_decode: bool | None = False):
    """COCO results of every model over the images, each model's seconds (inference, copies, postprocess), the
    ids of the images evaluated, the files that could not be read (reported on stderr as they come, skipped) and
    how many of the evaluated images each decoder decoded ({"nvimagecodec": n, "pillow": m});
    ``category_ids``: per model name, its label -> category id map (category_map).

    With ``gpu_decode`` False (Pillow, the exact path) each batch is read (on `workers` threads), resized and
    padded once, ahead of the models (runtime.pipeline's CPU path), and given to every model. Otherwise (True:
    nvImageCodec required, None: where installed; one model with device input buffers only, see decode_plan) the
    model runs on runtime.pipeline's GPU path: JPEGs decoded into device memory, the GPU kernel, the model.
    """
    from runtime.preprocess import ImageError

    batch = min([batch] + [m.max_batch for m in models if m.max_batch is not None])
    results = {m.name: [] for m in models}
    seconds = {m.name: 0.0 for m in models}
    done, evaluated, skipped = 0, [], []
    decoded = {"nvimagecodec": 0, "pillow": 0}
    if gpu_decode is False:
        answered = _shared_batches(models, paths, batch, workers, seconds)
    else:
        answered = _gpu_path_batches(models[0], paths, batch, workers, gpu_decode, seconds, decoded)
    # closing: the pipeline's threads stop before the caller closes the models, even after an error
    with closing(answered), ProgressBar(len(image_ids), desc="COCO " + " + ".join(results)) as bar:
        for chunk in answered:
            for key, found in chunk:
                image_id = image_ids[done]
                done += 1
                if isinstance(found, ImageError):  # the mAP leaves it out: a skipped image has no detections
                    print(f"skipped: {found}", file=sys.stderr)
                    skipped.append(str(key))
                    continue
                evaluated.append(image_id)
                for name, detections in found.items():
                    results[name].extend(coco_results([image_id], [detections], (category_ids or {}).get(name)))
            bar.update(len(chunk), status=f"{done / max(bar.elapsed, 1e-9):.2f} img/s")
    if not evaluated:
        raise EvalError(f"none of the {len(image_ids)} images could be read (first: {skipped[0]}): check the files")
    if gpu_decode is False:  # the shared path decodes every image with Pillow
        decoded["pillow"] = len(evaluated)
    return results, seconds, evaluated, skipped, decoded


def _shared_batches(models: Sequence, paths: Sequence[Path], batch: int, workers: int, seconds: dict):
    """Per batch, (path, ImageError or {model name: detections}) of each image: Pillow decoding and the CPU
    path's preprocessing once, every model on the same arrays."""
    from runtime.pipeline import CpuPath, PipelineStats, bounded, decoded_batches, preprocess_stage
    from runtime.preprocess import ImageError

    stats = PipelineStats()
    # No EXIF orientation: COCO boxes refer to the stored pixels, as the official evaluation reads them.
    path = CpuPath(None, stats, limits=batch_limits(models))
    prepared = bounded(decoded_batches(paths, batch, workers, False, stats), [preprocess_stage(path)])
    with closing(prepared):
        for chunk in prepared:
            found = {}
            if chunk.work is not None:
                ready = path.ready(chunk.work)
                for model in models:
                    start = time.perf_counter()
                    found[model.name] = model(*ready)
                    seconds[model.name] += time.perf_counter() - start
            per_image = iter([{name: d[i] for name, d in found.items()} for i in range(len(chunk.readable))])
            yield [(key, image if isinstance(image, ImageError) else next(per_image))
                   for key, image in zip(chunk.keys, chunk.images)]


def _gpu_path_batches(model, paths: Sequence[Path], batch: int, workers: int, gpu_decode: bool | None,
                      seconds: dict, decoded: dict):
    """(path, ImageError or {model name: detections}) of each image, one at a time, through runtime.pipeline's
    GPU path (nvImageCodec decoding, the GPU kernel) with EXIF orientation not applied; the model's seconds are
    its engine and post-processing stages, added to `seconds`, and the pipeline's decoder counts go to `decoded`."""
    from runtime.pipeline import PipelineStats, detect_stream
    from runtime.preprocess import ImageError

    stats = PipelineStats()
    # Threshold 0: every one of the top-100 detections, as the shared path scores them.
    found = detect_stream(model, paths, threshold=0.0, batch=batch, exif=False, workers=workers,
                          gpu_preprocess=True if gpu_decode else None, stats=stats, gpu_decode=gpu_decode)
    try:
        with closing(found):
            for item in found:
                yield [(item.key, item.result if isinstance(item.result, ImageError) else {model.name: item.result})]
    finally:
        seconds[model.name] += stats.seconds["engine"] + stats.seconds["postprocess"]
        decoded.update(stats.decoded)


def decode_plan(decode: str, models: Sequence) -> bool | None:
    """--decode's `gpu_decode` for these models: Pillow (False) unless exactly one model runs and it has device
    input buffers (an engine, the reference on CUDA). `gpu` without such a model is refused (BadInput where
    the arguments ask for what cannot be, Unavailable where this machine cannot: the reference on the CPU)."""
    from runtime.decode import DECODE
    from runtime.pipeline import DeviceRunner

    gpu_decode = DECODE[decode]
    if gpu_decode is False:
        return False
    if len(models) != 1:
        if gpu_decode:
            raise BadInput("--decode gpu runs one model on the GPU path; with --engine and --torch-weights "
                           "together both models read the same Pillow-decoded batches: use --decode cpu, or "
                           "evaluate each model on its own")
        return False
    (model,) = models
    if not isinstance(model, DeviceRunner) or model.stream is None:
        if gpu_decode:
            raise Unavailable(f"--decode gpu needs a model on a GPU ({model.description} has no device inputs): "
                              "use --decode cpu")
        return False
    return gpu_decode


def run_dataset(args) -> int:
    if args.decode == "gpu" and args.engine and args.torch_weights:
        raise BadInput("--decode gpu runs one model on the GPU path: give --engine or --torch-weights, not both "
                       "(side by side, both models read the same Pillow-decoded batches: --decode cpu)")
    if args.decode == "gpu" and args.device == "cpu":
        raise BadInput("--decode gpu decodes into CUDA memory; with --device cpu use --decode cpu")
    out_dir = Path(args.results_dir)
    metrics_path = Path(args.json) if args.json else out_dir / "metrics.json"
    from runtime.runner import EngineRunner
    from runtime.torch_detector import TorchReference

    names = [EngineRunner.name] * bool(args.engine) + [TorchReference.name] * bool(args.torch_weights)
    inputs = [("annotation file", Path(args.coco_root) / ANNOTATIONS), ("--torch-weights", args.torch_weights),
              *engine_inputs(args.engine)]
    check_outputs(inputs, ("--json" if args.json else "--results-dir", metrics_path),
                  *(("--results-dir", out_dir / f"{name}_bbox.json") for name in names))
    gt, image_ids, paths = open_coco_root(Path(args.coco_root), args.limit)
    if args.decode == "gpu":
        from runtime.decode import load_codec

        load_codec()  # a missing nvImageCodec is said now, before any model loads

    models = []
    try:
        models = open_models(args)
        category_ids = {m.name: category_map(class_names(m), gt, m.description) for m in models}
        gpu_decode = decode_plan(args.decode, models)
        results, seconds, image_ids, skipped, decoded = run_models(models, image_ids, paths, args.batch,
                                                                   args.workers, category_ids, gpu_decode)
    finally:
        for model in models:
            model.close()

    metrics: dict[str, dict[str, float]] = {}
    for model in models:
        path = out_dir / f"{model.name}_bbox.json"
        write_text(path, json.dumps(results[model.name]))
        with Spinner(f"COCOeval {model.name}"):
            metrics[model.name], summary = evaluate(gt, results[model.name], image_ids)
        print(f"\n{model.name}: {model.description}  ({len(image_ids)} images; results {path})")
        print(summary)
    delta = metrics["engine"]["AP"] - metrics["torch"]["AP"] if len(metrics) == 2 else None
    rates = {name: len(image_ids) / s for name, s in seconds.items()}
    print_summary(metrics, delta, rates)
    # skipped: unreadable files, left out of the mAP; a run that skipped any is partial (exit 1)
    report = {**metrics, "delta_AP": delta, "images": len(image_ids), "images_per_s": rates,
              "decode": "cpu" if gpu_decode is False else args.decode, "decoded": decoded, "skipped": skipped}
    write_text(metrics_path, json.dumps(report, indent=2) + "\n")
    print(f"\nmetrics: {metrics_path}")
    if skipped:
        print(f"partial: {len(skipped)} of {len(image_ids) + len(skipped)} images could not be read and are not in "
              f"the mAP: {', '.join(skipped)}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def print_summary(metrics: dict[str, dict[str, float]], delta: float | None, images_per_s: dict[str, float]) -> None:
    print()
    headers, rows = side_by_side_rows(metrics)
    print_table(rows, headers)
    if delta is not None:
        seed = SEED_AP["engine"] - SEED_AP["torch"]
        print(
            f"\nmAP engine {100 * metrics['engine']['AP']:.3f} vs torch {100 * metrics['torch']['AP']:.3f}: "
            f"delta {100 * delta:+.3f} (seed deployment, A10 + TensorRT 8.4: {100 * SEED_AP['engine']:.3f} vs "
            f"{100 * SEED_AP['torch']:.3f}, delta {100 * seed:+.3f})"
        )
    print()
    # Model time covers inference, host/device copies and post-processing, not image decoding (done ahead).
    print_table([[name, f"{rate:.2f}"] for name, rate in images_per_s.items()], ["model", "images/s"])


def score_file(args) -> int:
    if args.json:
        check_outputs([("--annotations", args.annotations), ("--results", args.results)], ("--json", args.json))
    gt = load_ground_truth(args.annotations)
    results = check_results(gt, read_json(args.results, "results file"), f"results file {args.results}")
    known = set(gt.getCatIds())
    unknown = sorted({r["category_id"] for r in results} - known)
    if unknown:
        # Normal for a 91-way model (ids COCO never uses); a sign of remapped labels if most are unknown.
        count = sum(r["category_id"] not in known for r in results)
        shown = ", ".join(map(str, unknown[:8])) + (", ..." if len(unknown) > 8 else "")
        print(f"note: {count} of {len(results)} detections have category ids the annotations do not list "
              f"({shown}); COCOeval ignores them", file=sys.stderr)
    metrics, summary = evaluate(gt, results)
    print(summary)
    if args.json:
        write_text(args.json, json.dumps(metrics, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m eval.coco", __doc__.split("\n\n")[0], "\n\n".join(__doc__.split("\n\n")[1:]))
    run = parser.add_argument_group("evaluate models on a COCO folder")
    run.add_argument("--coco-root", metavar="DIR", help="folder with val2017/ and annotations/instances_val2017.json")
    run.add_argument("--engine", metavar="E.plan", help="TensorRT engine built by `python -m netdef.build`")
    run.add_argument("--torch-weights", metavar="W.safetensors", help="weights for the PyTorch reference model")
    run.add_argument("--limit", type=positive_int, metavar="N", help="evaluate the first N images (by image id) only")
    run.add_argument("--batch", type=positive_int, default=1, metavar="B",
                     help="images per batch, padded to the largest (default 1, as the official evaluation)")
    run.add_argument("--results-dir", default="coco-results", metavar="DIR",
                     help="where the per-model COCO results files go (default: coco-results)")
    run.add_argument("--device", choices=("cuda", "cpu"), help="device of the PyTorch reference (default: cuda if present)")
    run.add_argument("--torch-mode", choices=tuple(TORCH_MODES), default="fp32", help=TORCH_MODE_HELP)
    add_decode_option(run, default="cpu", note=(
        "eval.coco's default is cpu, so that its mAP is comparable with the official evaluation's (Pillow-decoded "
        "images). gpu and auto need exactly one model with device inputs (--engine, or --torch-weights on CUDA): "
        "with both models gpu is refused (exit 2) and auto decodes with Pillow. EXIF orientation is never applied "
        "(COCO boxes refer to the stored pixels)"))
    run.add_argument("--workers", type=positive_int, default=usable_cpus(), metavar="N",
                     help="threads that decode images ahead of the models (default: one per usable core)")
    score = parser.add_argument_group("score an existing results file")
    score.add_argument("--annotations", metavar="ANN.json", help="COCO instances annotation file")
    score.add_argument("--results", metavar="RES.json", help="COCO results file (list of detections)")
    parser.add_argument("--json", metavar="METRICS", help="write the metrics JSON here "
                        "(evaluation default: RESULTS_DIR/metrics.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.coco_root and (args.annotations or args.results):
        parser.error("use either --coco-root (evaluate models) or --annotations with --results (score a file)")
    if args.coco_root:
        if not (args.engine or args.torch_weights):
            parser.error("--coco-root needs a model: --engine E.plan and/or --torch-weights W.safetensors")
    elif args.annotations or args.results:
        if not (args.annotations and args.results):
            parser.error("scoring a results file needs both --annotations and --results")
    else:
        parser.error("give --coco-root with a model, or --annotations with --results (see --help)")
    return cli.guarded(parser.prog, run_dataset if args.coco_root else score_file, args)


if __name__ == "__main__":
    sys.exit(main())
