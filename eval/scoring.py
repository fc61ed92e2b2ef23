"""COCO bbox scoring through pycocotools, with the input checked first.

pycocotools answers bad input with bare asserts and IndexErrors (or with silently wrong numbers), so the
ground truth and every results file are checked here and a problem becomes one `EvalError` line. The
numbers themselves are pycocotools' own: `COCOeval.stats`, unrounded.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from core.errors import EXIT_BAD_INPUT, AnchorError

# The order of COCOeval.stats for iouType "bbox".
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class EvalError(AnchorError):
    """Expected failure with a one-line message; `exit_code` (bad input unless given) is what the CLI returns."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{what} {path} does not exist (check the path)")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EvalError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read {what} {path}: {e}") from None


def _first_bad(items: Iterable[Any], ok) -> tuple[int, Any] | None:
    for i, item in enumerate(items):
        if not ok(item):
            return i, item
    return None


def _is_box(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _quiet():
    """pycocotools reports progress with print(); keep stdout for our tables."""
    return contextlib.redirect_stdout(io.StringIO())


def load_ground_truth(path: str | Path):
    """Read a COCO instances file into a pycocotools `COCO`, refusing files COCOeval would trip over."""
    from pycocotools.coco import COCO

    data = read_json(path, "annotation file")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise EvalError(
            f"annotation file {path} is not a COCO instances file: it needs the lists 'images', 'annotations' "
            "and 'categories' (for example annotations/instances_val2017.json)"
        )
    bad = _first_bad(data["images"], lambda im: isinstance(im, dict) and _is_id(im.get("id")))
    if bad:
        raise EvalError(f"annotation file {path}: images[{bad[0]}] has no integer 'id'")
    bad = _first_bad(data["categories"], lambda c: isinstance(c, dict) and _is_id(c.get("id")))
    if bad:
        raise EvalError(f"annotation file {path}: categories[{bad[0]}] has no integer 'id'")
    needed = ("id", "image_id", "category_id", "bbox", "area", "iscrowd")
    bad = _first_bad(
        data["annotations"],
        lambda a: isinstance(a, dict) and all(k in a for k in needed) and _is_box(a["bbox"]),
    )
    if bad:
        raise EvalError(
            f"annotation file {path}: annotations[{bad[0]}] lacks one of {', '.join(needed)} "
            "or its bbox is not [x, y, w, h]"
        )
    image_ids = {im["id"] for im in data["images"]}
    bad = _first_bad(data["annotations"], lambda a: a["image_id"] in image_ids)
    if bad:
        raise EvalError(f"annotation file {path}: annotations[{bad[0]}] names image_id {bad[1]['image_id']}, not in 'images'")
    gt = COCO()
    gt.dataset = data
    with _quiet():
        gt.createIndex()
    return gt


def check_results(gt, results: Any, source: str) -> list[dict]:
    """Return the detections of a COCO results list, or raise EvalError naming what is wrong.

    Detections of category ids the ground truth does not list are allowed (the model's 91-way
    output has ids COCO never uses); COCOeval ignores them, as it does in the official evaluation.
    """
    if not isinstance(results, list):
        raise EvalError(f"{source} is not a COCO results list (a JSON array of detections)")
    if not results:
        raise EvalError(f"{source} holds no detections: there is nothing to score")
    bad = _first_bad(
        results,
        lambda r: isinstance(r, dict)
        and _is_id(r.get("image_id"))
        and _is_id(r.get("category_id"))
        and _is_box(r.get("bbox"))
        and isinstance(r.get("score"), (int, float))
        and math.isfinite(r["score"]),
    )
    if bad:
        raise EvalError(
            f"{source}: detection [{bad[0]}] is not {{'image_id': int, 'category_id': int, "
            f"'bbox': [x, y, w, h], 'score': number}}: {json.dumps(bad[1])[:200]}"
        )
    unknown = sorted({r["image_id"] for r in results} - set(gt.getImgIds()))
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        raise EvalError(
            f"{source}: {len(unknown)} image id(s) are not in the annotation file ({shown}); "
            "score it against the annotations it was made for"
        )
    return results


def evaluate(gt, results: Sequence[Mapping], image_ids: Sequence[int] | None = None) -> tuple[dict[str, float], str]:
    """COCOeval bbox over `image_ids` (default: every image of the ground truth).

    Returns the 12 metrics by name and pycocotools' own 12-line summary text. `results` is not modified.
    """
    from pycocotools.cocoeval import COCOeval

    with _quiet():
        # loadRes adds keys to each detection dict; give it copies.
        dt = gt.loadRes([dict(r) for r in results])
        coco_eval = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()
    metrics = {key: float(value) for key, value in zip(METRIC_KEYS, coco_eval.stats)}
    return metrics, summary.getvalue().rstrip("\n")


def side_by_side_rows(metrics: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the 12 metrics in percent (as papers quote them), one column per model, and the
    first model minus the second when there are two."""
    names = list(metrics)
    pair = len(names) == 2
    rows = []
    for key in METRIC_KEYS:
        values = [metrics[n][key] for n in names]
        # COCOeval's -1 means no ground truth in that area range: nothing to compare.
        row = [key, *(f"{100 * v:.3f}" if v >= 0 else "n/a" for v in values)]
        if pair:
            row.append(f"{100 * (values[0] - values[1]):+.3f}" if min(values) >= 0 else "n/a")
        rows.append(row)
    return ["metric", *names] + (["delta"] if pair else []), rows
