"""COCO evaluation: scores against pycocotools called directly, exact values for perturbations with a
closed form, the label path with category ids that have gaps, bad input, and the model runs."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from eval import coco
from eval.scoring import METRIC_KEYS, EvalError, check_results, evaluate, load_ground_truth, side_by_side_rows
from runtime.postprocess import postprocess
from helpers import save_random_weights

# Category ids with gaps, as COCO's 1..90 has; image ids with gaps too.
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}]
# (id, height, width); image 632 has no objects.
IMAGES = [(139, 120, 160), (285, 96, 128), (632, 128, 96), (724, 100, 100)]
# (image_id, category_id, [x, y, w, h]): two objects per category, no two of them overlapping with IoU >= 0.5,
# none of one category twice in an image, and small (< 32^2), medium and large (> 96^2) areas all present.
OBJECTS = [
    (139, 1, [10, 10, 20, 20]),
    (139, 3, [40, 20, 52, 60]),
    (139, 90, [5, 5, 150, 110]),
    (285, 1, [60, 40, 26, 40]),
    (285, 18, [8, 8, 16, 12]),
    (724, 3, [10, 10, 78, 80]),
    (724, 18, [60, 70, 13, 20]),
    (724, 90, [50, 5, 39, 30]),
]


def write_coco(root: Path, objects=OBJECTS, images=IMAGES) -> Path:
    """A COCO-format folder: val2017/*.jpg written with PIL and annotations/instances_val2017.json."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for image_id, h, w in images:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "val2017" / f"{image_id:012d}.jpg")
    data = {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i:012d}.jpg"} for i, h, w in images],
        "annotations": [
            {"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for n, (i, c, b) in enumerate(objects)
        ],
        "categories": CATEGORIES,
    }
    ann = root / "annotations" / "instances_val2017.json"
    ann.write_text(json.dumps(data))
    return ann


def detections(objects=OBJECTS, score=0.9) -> list[dict]:
    return [{"image_id": i, "category_id": c, "bbox": list(b), "score": score} for i, c, b in objects]


def pycocotools_direct(ann: Path, results: list[dict]) -> tuple[list[float], str]:
    """The standard pycocotools recipe, independent of eval.scoring."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gt = COCO(str(ann))
        dt = gt.loadRes(json.loads(json.dumps(results)))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        ev.summarize()
    return ev.stats.tolist(), summary.getvalue().rstrip("\n")


@pytest.fixture
def ann(tmp_path) -> Path:
    return write_coco(tmp_path / "coco")


def all_equal(metrics: dict[str, float], value: float) -> bool:
    # pycocotools divides by tp + fp + eps, so a perfect precision comes out as 1 - 2e-16 for some counts.
    return list(metrics) == list(METRIC_KEYS) and all(v == pytest.approx(value, abs=1e-12) for v in metrics.values())


def score(ann: Path, results: list[dict]) -> dict[str, float]:
    metrics, summary = evaluate(load_ground_truth(ann), results)
    stats, direct_summary = pycocotools_direct(ann, results)
    assert [metrics[k] for k in METRIC_KEYS] == stats  # bit for bit
    assert summary == direct_summary
    return metrics


def test_perfect_detections_score_one(ann):
    metrics = score(ann, detections())
    assert all_equal(metrics, 1.0)


def test_half_of_each_category_missed(ann):
    # One of the two objects of every category detected: recall 0.5 at every IoU; precision 1 up to recall
    # 0.5 and 0 beyond, so 51 of the 101 recall points (0, 0.01, ..., 0.50) have precision 1.
    kept = [o for n, o in enumerate(sorted(OBJECTS, key=lambda o: o[1])) if n % 2 == 0]
    metrics = score(ann, detections(kept))
    assert metrics["AR1"] == metrics["AR10"] == metrics["AR100"] == 0.5
    assert metrics["AP"] == pytest.approx(51 / 101, abs=1e-12)
    assert metrics["AP50"] == metrics["AP75"] == metrics["AP"]


def test_shifted_boxes_match_only_loose_iou_thresholds(ann):
    # Shifting a box right by 3/13 of its width gives IoU (w - d) / (w + d) = 10/16 = 0.625: a match at the
    # IoU thresholds 0.50, 0.55 and 0.60, a miss at the seven from 0.65 to 0.95.
    shifted = [(i, c, [b[0] + 3 * b[2] / 13, b[1], b[2], b[3]]) for i, c, b in OBJECTS]
    metrics = score(ann, detections(shifted))
    assert metrics["AP50"] == 1.0
    assert metrics["AP75"] == 0.0
    assert metrics["AP"] == pytest.approx(0.3, abs=1e-12)
    assert metrics["AR100"] == pytest.approx(0.3, abs=1e-12)


def test_wrong_labels_score_zero(ann):
    # Each detection carries the next category's id: right place, wrong class.
    ids = [c["id"] for c in CATEGORIES]
    relabelled = [(i, ids[(ids.index(c) + 1) % len(ids)], b) for i, c, b in OBJECTS]
    metrics = score(ann, detections(relabelled))
    assert metrics["AP"] == metrics["AR100"] == 0.0


def test_lower_scored_false_positives_change_nothing(ann):
    # Extra boxes everywhere (the image without objects included), all scored below every true positive.
    extra = [(i, c["id"], [h / 2, w / 2, 10, 12]) for i, h, w in IMAGES for c in CATEGORIES]
    metrics = score(ann, detections() + detections(extra, score=0.1))
    assert all_equal(metrics, 1.0)


def test_higher_scored_false_positive_per_category(ann):
    # One false positive per category on the image without objects, ranked first: precision 1/2 at recall
    # 0.5 and 2/3 at recall 1, so the interpolated precision is 2/3 at every recall point.
    extra = [(632, c["id"], [30, 30, 40, 40]) for c in CATEGORIES]
    metrics = score(ann, detections() + detections(extra, score=0.95))
    assert metrics["AP"] == pytest.approx(2 / 3, abs=1e-12)
    assert metrics["AR100"] == 1.0


def test_detections_of_categories_outside_the_annotations_are_ignored(ann):
    # The model's 91-way output has ids COCO never uses (0, 12, 26, ...): pycocotools ignores them.
    extra = [(i, 12, [0, 0, 30, 30]) for i, _, _ in IMAGES]
    metrics = score(ann, detections() + detections(extra, score=0.99))
    assert all_equal(metrics, 1.0)


def test_subset_of_images(ann):
    # Restricted to image 285, whose two objects (categories 1 and 18) are both found.
    gt = load_ground_truth(ann)
    metrics, _ = evaluate(gt, detections(), image_ids=[285])
    assert metrics["AP"] == pytest.approx(1.0, abs=1e-12)
    # Over every image the same detections of 285 alone find 2 of the 8 objects.
    only_285 = [d for d in detections() if d["image_id"] == 285]
    metrics, _ = evaluate(gt, only_285)
    assert metrics["AR100"] == pytest.approx(np.mean([0.5, 0.0, 0.5, 0.0]))  # categories 1, 3, 18, 90


def test_evaluate_leaves_results_untouched(ann):
    results = detections()
    before = json.dumps(results)
    evaluate(load_ground_truth(ann), results)
    assert json.dumps(results) == before


def test_model_outputs_to_category_ids_without_remapping(ann):
    """Logits that put each object in the query/class of its COCO category id, through the shared
    postprocess and coco_results: perfect scores only if label == category id end to end."""
    sizes = {i: (h, w) for i, h, w in IMAGES}
    image_ids = [i for i, _, _ in IMAGES]
    logits = np.full((len(image_ids), 20, 91), -20.0, dtype=np.float32)
    boxes = np.full((len(image_ids), 20, 4), 0.5, dtype=np.float32)
    for b, image_id in enumerate(image_ids):
        h, w = sizes[image_id]
        for q, (_, c, (x, y, bw, bh)) in enumerate(o for o in OBJECTS if o[0] == image_id):
            logits[b, q, c] = 5.0
            boxes[b, q] = [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
    dets = postprocess(logits, boxes, np.array([sizes[i] for i in image_ids]))
    results = coco.coco_results(image_ids, dets)
    assert {r["category_id"] for r in results if r["score"] > 0.5} == {1, 3, 18, 90}
    metrics = score(ann, results)
    assert all_equal(metrics, 1.0)


def test_coco_results_boxes_are_xywh():
    det = {
        "scores": np.array([0.75], np.float32),
        "labels": np.array([90]),
        "boxes": np.array([[10.5, 20.25, 30.5, 60.25]], np.float32),
    }
    assert coco.coco_results([724], [det]) == [
        {"image_id": 724, "category_id": 90, "bbox": [10.5, 20.25, 20.0, 40.0], "score": 0.75}
    ]


def test_side_by_side_rows_delta():
    a = {k: 0.5 for k in METRIC_KEYS}
    b = {k: 0.25 for k in METRIC_KEYS}
    headers, rows = side_by_side_rows({"engine": a, "torch": b})
    assert headers == ["metric", "engine", "torch", "delta"]
    assert [r[0] for r in rows] == list(METRIC_KEYS)
    assert rows[0] == ["AP", "50.000", "25.000", "+25.000"]


# ----------------------------------------------------------------------------------------------
# Command line: scoring a results file
# ----------------------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = coco.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_scores_results_file_like_pycocotools(ann, tmp_path, capsys):
    results = detections([o for o in OBJECTS if o[2][2] > 20]) + detections([(632, 3, [1, 2, 30, 40])], 0.95)
    res = tmp_path / "res.json"
    res.write_text(json.dumps(results))
    metrics_path = tmp_path / "metrics.json"
    code, out, err = run_cli(capsys, "--annotations", ann, "--results", res, "--json", metrics_path)
    assert code == 0, err
    stats, summary = pycocotools_direct(ann, results)
    assert out.rstrip("\n") == summary
    metrics = json.loads(metrics_path.read_text())
    assert list(metrics) == list(METRIC_KEYS)
    assert [metrics[k] for k in METRIC_KEYS] == stats
    assert 0 < metrics["AP"] < 1
    assert err == ""


def test_cli_notes_category_ids_outside_the_annotations(ann, tmp_path, capsys):
    # Labels remapped to contiguous 0..N-1 are a common mistake: ids then miss the annotations
    # or name the wrong category.
    remapped = [(i, [c["id"] for c in CATEGORIES].index(c), b) for i, c, b in OBJECTS]
    res = tmp_path / "res.json"
    res.write_text(json.dumps(detections(remapped)))
    code, out, err = run_cli(capsys, "--annotations", ann, "--results", res)
    assert code == 0
    assert "note: 4 of 8 detections have category ids the annotations do not list (0, 2)" in err


def bad_input(capsys, *argv) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m eval.coco: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "content, message",
    [
        ("[]", "holds no detections"),
        ("{not json", "is not valid JSON"),
        ('{"image_id": 139}', "is not a COCO results list"),
        ('[{"image_id": 139, "category_id": 1, "score": 0.5}]', "detection [0] is not"),
        ('[{"image_id": 139, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}]', "detection [0] is not"),
        ('[{"image_id": 5, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]', "1 image id(s) are not in"),
    ],
)
def test_cli_bad_results(ann, tmp_path, capsys, content, message):
    res = tmp_path / "res.json"
    res.write_text(content)
    assert message in bad_input(capsys, "--annotations", ann, "--results", res)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "is not valid JSON"),
        ("[]", "is not a COCO instances file"),
        ('{"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1}], "categories": []}', "annotations[0] lacks"),
        (
            '{"images": [{"id": 1}], "categories": [{"id": 1}], "annotations": '
            '[{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}]}',
            "names image_id 2",
        ),
    ],
)
def test_cli_bad_annotations(tmp_path, capsys, content, message):
    bad = tmp_path / "ann.json"
    bad.write_text(content)
    res = tmp_path / "res.json"
    res.write_text(json.dumps(detections()))
    assert message in bad_input(capsys, "--annotations", bad, "--results", res)


def test_cli_missing_files(ann, tmp_path, capsys):
    res = tmp_path / "res.json"
    res.write_text(json.dumps(detections()))
    assert "does not exist" in bad_input(capsys, "--annotations", tmp_path / "nope.json", "--results", res)
    assert "does not exist" in bad_input(capsys, "--annotations", ann, "--results", tmp_path / "nope.json")


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give --coco-root"),
        (["--coco-root", "x"], "needs a model"),
        (["--annotations", "a.json"], "needs both"),
        (["--coco-root", "x", "--torch-weights", "w", "--results", "r.json"], "use either"),
        (["--coco-root", "x", "--torch-weights", "w", "--batch", "0"], "positive integer"),
    ],
)
def test_cli_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        coco.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Command line: evaluating models on a COCO folder
# ----------------------------------------------------------------------------------------------


def test_cli_coco_root_problems(tmp_path, capsys):
    root = tmp_path / "coco"
    model = ["--torch-weights", tmp_path / "w.safetensors"]
    assert "is not a folder" in bad_input(capsys, "--coco-root", root, *model)
    root.mkdir()
    assert "instances_val2017.json does not exist" in bad_input(capsys, "--coco-root", root, *model)
    write_coco(root)
    (root / "val2017" / "000000000285.jpg").unlink()
    assert "1 of 4 images are missing" in bad_input(capsys, "--coco-root", root, *model)
    # --limit 1 needs only the first image (id 139), so the check passes and the weights file is next.
    assert "--torch-weights" in bad_input(capsys, "--coco-root", root, "--limit", 1, *model)
    for path in (root / "val2017").iterdir():
        path.unlink()
    (root / "val2017").rmdir()
    assert "image folder" in bad_input(capsys, "--coco-root", root, *model)


def test_cli_missing_engine(tmp_path, capsys):
    root = tmp_path / "coco"
    write_coco(root)
    message = bad_input(capsys, "--coco-root", root, "--engine", tmp_path / "none.plan", "--results-dir", tmp_path / "r")
    assert "none.plan not found" in message


def test_cli_results_dir_is_made_only_when_a_file_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default --results-dir coco-results would appear
    root = tmp_path / "coco"
    write_coco(root)
    bad_input(capsys, "--coco-root", root, "--engine", tmp_path / "none.plan", "--results-dir", tmp_path / "r" / "s")
    bad_input(capsys, "--coco-root", root, "--torch-weights", tmp_path / "none.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco"]


def test_cli_output_paths_are_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "r" / "engine_bbox.json").mkdir(parents=True)
    missing_root = ["--coco-root", tmp_path / "none", "--engine", tmp_path / "e.plan"]  # never looked at
    assert re.search(r"--results-dir .*file/metrics.json: .*file is not a folder",
                     bad_input(capsys, *missing_root, "--results-dir", tmp_path / "file"))
    assert re.search(r"--results-dir .*r/engine_bbox.json is a folder",
                     bad_input(capsys, *missing_root, "--results-dir", tmp_path / "r"))
    assert re.search(r"--json .* is a folder", bad_input(capsys, *missing_root, "--json", tmp_path))
    assert re.search(r"--json .* is a folder", bad_input(capsys, "--annotations", tmp_path / "none.json",
                                                         "--results", tmp_path / "none.json", "--json", tmp_path))


def test_cli_outputs_that_are_inputs_are_refused(tmp_path, capsys):
    """The metrics must not replace the results, the annotations or the engine they come from."""
    ann, res = tmp_path / "ann.json", tmp_path / "res.json"
    ann.write_text("{}")
    res.write_text("[]")
    (tmp_path / "res_link.json").symlink_to(res)
    for target, label in [(res, "--results"), (ann, "--annotations"), (tmp_path / "res_link.json", "--results")]:
        line = bad_input(capsys, "--annotations", ann, "--results", res, "--json", target)
        assert f"--json {target} is the {label} " in line and "would destroy that input" in line
    root = tmp_path / "coco"
    write_coco(root)
    engine = tmp_path / "e.plan"
    engine.write_bytes(b"plan")
    line = bad_input(capsys, "--coco-root", root, "--engine", engine, "--json", engine)
    assert f"--json {engine} is the --engine" in line
    line = bad_input(capsys, "--coco-root", root, "--engine", engine, "--json", root / "annotations" /
                     "instances_val2017.json")
    assert "is the annotation file" in line
    assert (ann.read_text(), res.read_text(), engine.read_bytes()) == ("{}", "[]", b"plan")


class BoxPerImage:
    """Stands in for a model: one person box over each image's top-left quarter, in its own pixels."""

    name, description = "engine", "stand-in"
    min_hw = max_hw = max_batch = None

    def __init__(self):
        self.closed = False

    def __call__(self, images, masks, sizes):
        return [{"scores": np.float32([0.9]), "labels": np.int64([1]), "boxes": np.float32([[0, 0, w / 2, h / 2]])}
                for h, w in sizes]

    def close(self):
        self.closed = True


def test_a_corrupt_image_is_reported_skipped_and_the_run_is_partial(tmp_path, capsys, monkeypatch):
    """The images before and after it are evaluated (exit 1, not 2), and the metrics say which file was left out."""
    root = tmp_path / "coco"
    write_coco(root)
    broken = root / "val2017" / "000000000285.jpg"
    broken.write_bytes(b"not a jpeg")
    model = BoxPerImage()
    monkeypatch.setattr(coco, "open_models", lambda args: [model])
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "--coco-root", root, "--engine", tmp_path / "e.plan", "--batch", 2,
                             "--results-dir", out_dir)
    assert code == 1, err
    assert f"skipped: {broken}: cannot read image" in err and "Traceback" not in err
    assert f"partial: 1 of 4 images could not be read and are not in the mAP: {broken}" in err
    report = json.loads((out_dir / "metrics.json").read_text())
    assert report["skipped"] == [str(broken)] and report["images"] == 3
    results = json.loads((out_dir / "engine_bbox.json").read_text())
    assert sorted(r["image_id"] for r in results) == [139, 632, 724]  # the batch partner of 285 too
    assert model.closed
    for image_id, _, _ in IMAGES:  # every image unreadable: nothing to score, bad input
        (root / "val2017" / f"{image_id:012d}.jpg").write_bytes(b"junk")
    code, out, err = run_cli(capsys, "--coco-root", root, "--engine", tmp_path / "e.plan", "--results-dir", out_dir)
    assert code == 2 and err.count("skipped: ") == 4
    assert err.strip().splitlines()[-1].startswith("python -m eval.coco: error: none of the 4 images could be read")


# ----------------------------------------------------------------------------------------------
# The PyTorch reference on a tiny set, random weights
# ----------------------------------------------------------------------------------------------

# Elongated images keep the evaluation resize small (40x400 -> 133x1333), so the CPU run stays short.
TINY_IMAGES = [(7, 40, 400), (42, 48, 400)]
TINY_OBJECTS = [(7, 1, [0, 0, 400, 40]), (7, 90, [10, 5, 100, 30]), (42, 18, [300, 2, 90, 40])]


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> Path:
    from core.config import AnchorDETRConfig

    # C5 (stride 32) and one layer each keep the CPU forward short.
    cfg = AnchorDETRConfig(dilation=False, enc_layers=1, dec_layers=1)
    return save_random_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors", cfg)


def build_engine(tmp_path: Path, weights_path: Path) -> Path:
    """A tiny-profile FP32 engine with whichever TensorRT backend is installed (skip if none)."""
    from core.backend import BackendError, get_backend
    from netdef.build import main as build

    try:
        get_backend()
    except BackendError as e:
        pytest.skip(str(e))
    engine = tmp_path / "tiny.plan"
    # Covers the tiny set's 133x1333 and 160x1333 inputs, batch 2.
    argv = ["--weights", weights_path, "--min", "128x512", "--opt", "160x1344", "--max", "192x1344", "--batch", "1,2,2"]
    assert build([str(a) for a in argv + ["-o", engine]]) == 0
    return engine


@pytest.mark.slow
def test_torch_reference_on_tiny_set(tmp_path, capsys, random_weights):
    """Random weights give AP near 0, so this checks the run's plumbing: every image's top-100, boxes in each
    image's own pixels, the printed summary and table agreeing with the files, the files with each other."""
    import torch

    from reference.torch_model import AnchorDETR
    from runtime.preprocess import pad_batch, preprocess_image

    root = tmp_path / "coco"
    ann = write_coco(root, TINY_OBJECTS, TINY_IMAGES)
    out_dir, metrics_path = tmp_path / "out", tmp_path / "metrics.json"
    code, out, err = run_cli(
        capsys, "--coco-root", root, "--torch-weights", random_weights, "--batch", 2, "--device", "cpu",
        "--results-dir", out_dir, "--json", metrics_path,
    )
    assert code == 0, err
    assert "2/2" in err and "img/s" in err  # the progress bar

    results = json.loads((out_dir / "torch_bbox.json").read_text())
    assert [r["image_id"] for r in results] == [7] * 100 + [42] * 100
    assert all(0 <= r["category_id"] <= 90 for r in results)

    # The same detections from the model called directly on each image alone, scaled to its original size.
    # Images of a batch are padded to the largest, which changes results slightly (the RCDA key pooling
    # averages over padded rows), so compare image 42, the larger one, which is not padded.
    model = AnchorDETR.from_safetensors(random_weights)
    image = Image.open(root / "val2017" / "000000000042.jpg")
    pixels, masks = pad_batch([preprocess_image(image, exif=False)])
    with torch.no_grad():
        outputs = model(torch.from_numpy(pixels), torch.from_numpy(masks))
    expected = postprocess(outputs["pred_logits"].numpy(), outputs["pred_boxes"].numpy(), np.array([[48, 400]]))[0]
    got = results[100:]
    np.testing.assert_allclose([r["score"] for r in got], expected["scores"], rtol=1e-4, atol=1e-6)
    got_xyxy = [[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in got)]
    np.testing.assert_allclose(got_xyxy, expected["boxes"], rtol=1e-4, atol=1e-3)

    report = json.loads(metrics_path.read_text())
    assert set(report) == {"torch", "delta_AP", "images", "images_per_s", "decode", "decoded", "skipped"}
    assert report["decoded"] == {"nvimagecodec": 0, "pillow": 2}
    assert report["skipped"] == [] and report["decode"] == "cpu"  # Pillow, the default
    assert list(report["torch"]) == list(METRIC_KEYS)
    assert report["delta_AP"] is None and report["images"] == 2 and report["images_per_s"]["torch"] > 0
    stats, summary = pycocotools_direct(ann, results)
    assert [report["torch"][k] for k in METRIC_KEYS] == stats
    assert summary in out
    # The printed table holds the JSON's numbers (in percent, n/a where COCOeval gives -1).
    table = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.split()[:1] in ([k] for k in METRIC_KEYS)}
    assert table == {k: f"{100 * v:.3f}" if v >= 0 else "n/a" for k, v in report["torch"].items()}

    # Scoring the written results file again gives the same numbers.
    flat = tmp_path / "flat.json"
    code, _, err = run_cli(capsys, "--annotations", ann, "--results", out_dir / "torch_bbox.json", "--json", flat)
    assert code == 0, err
    assert json.loads(flat.read_text()) == report["torch"]


@pytest.mark.slow
def test_engine_without_gpu_is_an_environment_error(tmp_path, capsys, random_weights):
    from conftest import gpu_available

    if gpu_available():
        pytest.skip("checks the no-GPU path")
    engine = build_engine(tmp_path, random_weights)
    capsys.readouterr()
    root = tmp_path / "coco"
    write_coco(root, TINY_OBJECTS, TINY_IMAGES)
    code, out, err = run_cli(capsys, "--coco-root", root, "--engine", engine, "--results-dir", tmp_path / "r")
    assert code == 3 and err.startswith("python -m eval.coco: error: ") and len(err.strip().splitlines()) == 1, err
    assert "GPU" in err and "Traceback" not in err
    # Weights other than the engine's (a copy with one byte changed) are refused before any GPU is touched:
    # side by side compares one model in two implementations.
    other = tmp_path / "other.safetensors"
    other.write_bytes(random_weights.read_bytes()[:-1] + b" ")
    code, out, err = run_cli(capsys, "--coco-root", root, "--engine", engine, "--torch-weights", other)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "sha256" in err, err


@pytest.mark.trt
@pytest.mark.slow
def test_engine_and_torch_side_by_side(tmp_path, capsys, random_weights):
    """The engine (FP32) and the reference on the same batches: both tables, the delta, and detections that
    agree (AP itself is near 0 with random weights)."""
    engine = build_engine(tmp_path, random_weights)
    root = tmp_path / "coco"
    write_coco(root, TINY_OBJECTS, TINY_IMAGES)
    out_dir, metrics_path = tmp_path / "out", tmp_path / "metrics.json"
    code, out, err = run_cli(
        capsys, "--coco-root", root, "--engine", engine, "--torch-weights", random_weights, "--batch", 2,
        "--results-dir", out_dir, "--json", metrics_path,
    )
    assert code == 0, err
    report = json.loads(metrics_path.read_text())
    assert list(report["engine"]) == list(report["torch"]) == list(METRIC_KEYS)
    assert report["delta_AP"] == report["engine"]["AP"] - report["torch"]["AP"]
    assert f"delta {100 * report['delta_AP']:+.3f}" in out and "43.934 vs 44.263" in out
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "engine", "torch", "delta"]
    assert out.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 2

    engine_results = json.loads((out_dir / "engine_bbox.json").read_text())
    torch_results = json.loads((out_dir / "torch_bbox.json").read_text())
    assert [r["image_id"] for r in engine_results] == [r["image_id"] for r in torch_results]
    # FP32 engine vs FP32 reference (TF32 convolutions on either side): the ranked scores per image agree.
    for image_id, _, _ in TINY_IMAGES:
        ours = sorted((r["score"] for r in engine_results if r["image_id"] == image_id), reverse=True)
        ref = sorted((r["score"] for r in torch_results if r["image_id"] == image_id), reverse=True)
        np.testing.assert_allclose(ours, ref, atol=1e-2)


# ------------------------------------------------------------------------------------------- --decode


def test_decode_gpu_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """--decode gpu with two models, or with the reference on the CPU, is usage (exit 2); without nvImageCodec it
    is the environment (exit 3), said before any model loads. Nothing is written either way."""
    from core.errors import Unavailable
    from runtime import decode

    root = tmp_path / "coco"
    write_coco(root)
    out_dir = tmp_path / "out"
    weights_file = tmp_path / "w.safetensors"
    weights_file.write_bytes(b"")
    line = bad_input(capsys, "--coco-root", root, "--engine", tmp_path / "e.plan", "--torch-weights", weights_file,
                     "--decode", "gpu", "--results-dir", out_dir)
    assert "--decode gpu runs one model on the GPU path" in line and "--decode cpu" in line
    line = bad_input(capsys, "--coco-root", root, "--torch-weights", weights_file, "--device", "cpu",
                     "--decode", "gpu", "--results-dir", out_dir)
    assert "with --device cpu use --decode cpu" in line

    def missing():
        raise Unavailable("GPU decoding needs nvImageCodec: pip install -e '.[gpu-decode]'")

    monkeypatch.setattr(decode, "load_codec", missing)
    monkeypatch.setattr(coco, "open_models", lambda args: pytest.fail("a model was loaded"))
    code, _, err = run_cli(capsys, "--coco-root", root, "--engine", tmp_path / "e.plan", "--decode", "gpu",
                           "--results-dir", out_dir)
    assert code == 3 and "GPU decoding needs nvImageCodec" in err and "Traceback" not in err
    assert not out_dir.exists()


class DeviceModel(BoxPerImage):
    """BoxPerImage with the surface of a runtime.pipeline.DeviceRunner (never run: decode_plan only looks)."""

    stream = object()
    input_pointers = (0, 0)

    def device_inputs(self, batch, height, width):
        return self.input_pointers

    def sibling(self):
        return self

    def start_on_device(self, shape, batch=None):
        raise AssertionError("not run here")


def test_decode_plan_gives_gpu_decoding_to_one_model_with_device_inputs_only():
    from core.errors import BadInput, Unavailable

    device, host = DeviceModel(), BoxPerImage()
    assert coco.decode_plan("cpu", [device]) is False  # the default: Pillow, whatever the model
    assert coco.decode_plan("auto", [device]) is None and coco.decode_plan("gpu", [device]) is True
    assert coco.decode_plan("auto", [device, host]) is False  # side by side: one Pillow-decoded batch for both
    assert coco.decode_plan("auto", [host]) is False
    with pytest.raises(BadInput, match="--decode gpu runs one model"):
        coco.decode_plan("gpu", [device, host])
    with pytest.raises(Unavailable, match="--decode gpu needs a model on a GPU"):
        coco.decode_plan("gpu", [host])
    device.stream = None  # the reference on the CPU has the methods but no stream
    assert coco.decode_plan("auto", [device]) is False


def test_the_default_decodes_with_pillow_on_the_shared_path(tmp_path, capsys, monkeypatch):
    """Without --decode the run never makes a GPU decoder, even for a model that could take one, and says so."""
    from runtime import pipeline

    root = tmp_path / "coco"
    write_coco(root)
    monkeypatch.setattr(coco, "open_models", lambda args: [DeviceModel()])
    monkeypatch.setattr(pipeline, "detect_stream", lambda *a, **k: pytest.fail("the GPU path was taken"))
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, "--coco-root", root, "--engine", tmp_path / "e.plan", "--results-dir", out_dir)
    assert code == 0, err
    report = json.loads((out_dir / "metrics.json").read_text())
    assert report["decode"] == "cpu" and report["images"] == 4


def test_gpu_decoding_runs_one_model_on_the_gpu_path_without_exif(host_gpu, tmp_path, monkeypatch):
    """run_models with gpu_decode: a stand-in nvImageCodec (Pillow's pixels in "device" memory) decodes each
    batch's JPEGs in one call, the kernel's CPU build writes a DeviceRunner's inputs, and the COCO results equal
    the shared Pillow path's exactly, image for image. A JPEG with an EXIF rotation keeps its stored pixels
    (COCO boxes refer to them: the decoder is asked not to rotate), a PNG goes through Pillow and a corrupt file
    is skipped alone."""
    from helpers import NumpyDetector, fake_gpu_decoding, host_runner, solid

    codec = fake_gpu_decoding(monkeypatch)
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.{'png' if i == 2 else 'jpg'}")
        image = solid(50 + 13 * i, 40 + 9 * (i % 3), i % 3)
        exif = image.getexif()
        exif[0x0112] = 6 if i == 3 else 1  # image 3 is shown rotated by 90 degrees
        image.save(paths[-1], exif=exif)
    paths[5].write_bytes(paths[4].read_bytes()[:80])  # truncated
    ids = [10 + i for i in range(7)]

    gpu_model, cpu_model = host_runner(), NumpyDetector()
    gpu_model.name = cpu_model.name = "engine"
    got = coco.run_models([gpu_model], ids, paths, 2, 1, gpu_decode=True)
    expected = coco.run_models([cpu_model], ids, paths, 2, 1, gpu_decode=False)
    assert codec.exif == [False]  # one decoder, EXIF orientation off
    assert sum(len(call) for call in codec.calls) == 5  # the five complete JPEGs, in one call per batch
    assert got[2] == expected[2] == [i for i in ids if i != 15] and got[3] == expected[3] == [str(paths[5])]
    # the report says what decoded the images: the PNG went to Pillow, on either path
    assert got[4] == {"nvimagecodec": 5, "pillow": 1} and expected[4] == {"nvimagecodec": 0, "pillow": 6}
    assert got[0] == expected[0]  # the same COCO records, boxes in stored pixels
    rotated = [r for r in got[0]["engine"] if r["image_id"] == 13]
    assert rotated and rotated[0]["bbox"][2] > rotated[0]["bbox"][3]  # wider than tall: the stored 89x67, not 67x89
    assert got[1]["engine"] > 0


@pytest.mark.gpu
def test_gpu_decoding_on_a_gpu_scores_as_the_pillow_path(tmp_path):
    """The real GPU path: nvImageCodec on the GPU, the kernel into a CUDA DeviceRunner stand-in whose engine reads
    the brightest channel and answers fixed boxes (a level of decoder difference changes nothing). The COCO records
    equal the shared Pillow path's; scores within 1e-6 (the stand-in's sigmoid of equal logits)."""
    pytest.importorskip("nvidia.nvimgcodec")
    from helpers import CudaRunner, NumpyDetector, solid

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.jpg")
        solid(60 + 21 * i, 40 + 13 * i, i % 3).save(paths[-1], quality=92)
    ids = list(range(1, 6))
    runner, cpu = CudaRunner(), NumpyDetector()
    runner.name = cpu.name = "engine"
    try:
        got = coco.run_models([runner], ids, paths, 2, 2, gpu_decode=True)
    finally:
        runner.close()
    expected = coco.run_models([cpu], ids, paths, 2, 2, gpu_decode=False)
    assert got[2] == expected[2] == ids and got[3] == expected[3] == [] and got[4] == {"nvimagecodec": 5, "pillow": 0}
    for g, e in zip(got[0]["engine"], expected[0]["engine"], strict=True):
        assert (g["image_id"], g["category_id"], g["bbox"]) == (e["image_id"], e["category_id"], e["bbox"])
        assert abs(g["score"] - e["score"]) <= 1e-6
