"""Class names of a model: the one map label id -> name, from ``weights.extract`` to every output.

AnchorDETR classifies each query into ``num_classes`` labels 0..num_classes-1. A COCO-trained checkpoint has 91:
label = COCO category id, eighty of which are detection categories (0 and the ten ids COCO dropped from its 2014
list have no annotations, and a trained model gives them low scores). A fine-tuned model has its own classes,
named by the user at extraction (``--names FILE``): one name per line (line k names label k), or a COCO
annotations JSON whose ``categories`` give id -> name.

The map is stored as JSON ``{"<id>": "name", ...}`` (ids in increasing order) under the key ``labels`` in the
weights file's metadata and in the engine's sidecar. A label without a name is shown as its number. Standard
library only: every layer reads it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from core.errors import BadInput

KEY = "labels"  # weights metadata and sidecar key
COCO_NUM_CLASSES = 91
NAMES_HELP = "one name per line (line k names label k), or a COCO annotations JSON (its categories: id -> name)"

COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}  # fmt: skip


class LabelsError(BadInput, ValueError):
    """A names file that cannot name this model's classes."""


def default_names(num_classes: int) -> dict[int, str]:
    """COCO's names for a 91-class model; none (numeric labels) for any other class count."""
    return dict(COCO_CATEGORIES) if num_classes == COCO_NUM_CLASSES else {}


def _coco_categories(data: Any, where: str) -> list[tuple[int, str]]:
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats:
        raise LabelsError(f"{where} has no 'categories' list: give a COCO annotations JSON or a text file, "
                          f"{NAMES_HELP}")
    pairs = []
    for i, cat in enumerate(cats):
        cid = cat.get("id") if isinstance(cat, dict) else None
        name = cat.get("name") if isinstance(cat, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool) or not isinstance(name, str) or not name.strip():
            raise LabelsError(f"{where}: categories[{i}] needs an integer 'id' and a non-empty 'name', got {cat!r}")
        pairs.append((cid, name.strip()))
    return pairs


def read_names_file(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(id, name) pairs of a names file, in file order, not yet checked against a class count."""
    where = f"--names {os.fspath(path)}"
    try:
        raw = open(path, "rb").read()
    except FileNotFoundError:
        raise LabelsError(f"{where} does not exist: name a file with {NAMES_HELP}") from None
    except OSError as exc:
        raise LabelsError(f"{where} cannot be read ({exc.strerror or exc}): name a readable file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LabelsError(f"{where} is not UTF-8 text: save it as UTF-8, {NAMES_HELP}") from None
    if text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LabelsError(f"{where} is not valid JSON ({exc}): fix it, or give {NAMES_HELP}") from None
        return _coco_categories(data, where)
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    pairs = [(k, name) for k, name in enumerate(lines) if name]  # an empty line leaves its label unnamed
    if not pairs:
        raise LabelsError(f"{where} names no class: give {NAMES_HELP}")
    return pairs


def check_names(pairs: list[tuple[int, str]], num_classes: int, where: str = "--names") -> dict[int, str]:
    """{id: name} if every pair fits a model of ``num_classes`` labels; LabelsError naming each misfit."""
    problems = []
    ids = [cid for cid, _ in pairs]
    if len(pairs) > num_classes:
        problems.append(f"{len(pairs)} names for a model of {num_classes} classes")
    outside = sorted({cid for cid in ids if not 0 <= cid < num_classes})
    if outside:
        problems.append(f"ids outside 0..{num_classes - 1}: {', '.join(map(str, outside[:8]))}"
                        + (", ..." if len(outside) > 8 else ""))
    duplicates = sorted({cid for cid in ids if ids.count(cid) > 1})
    if duplicates:
        problems.append(f"duplicate ids: {', '.join(map(str, duplicates[:8]))}")
    multiline = sorted(cid for cid, name in pairs if "\n" in name or "\r" in name)
    if multiline:  # a label file (Triton's labels.txt) has one name per line
        problems.append(f"names of ids {', '.join(map(str, multiline[:8]))} span several lines")
    if problems:
        raise LabelsError(f"{where} does not fit the model: " + "; ".join(problems)
                          + f" (its labels are 0..{num_classes - 1}): fix the names file")
    return dict(sorted(pairs))


def stored(names: Mapping[int, str]) -> dict[str, str]:
    """The stored form (a sidecar's labels, weights.extract's summary): ids as strings in increasing order, so the
    same names give the same bytes."""
    return {str(k): names[k] for k in sorted(names)}


def to_json(names: Mapping[int, str]) -> str:
    """The stored form as weights metadata holds it (a JSON string)."""
    return json.dumps(stored(names), ensure_ascii=False)


def from_stored(value: str | Mapping[str, str] | None, num_classes: int) -> dict[int, str]:
    """The map as stored in weights metadata (a JSON string) or a sidecar (an object); a file written before class
    names existed (None) gets the default for its class count."""
    if value is None:
        return default_names(num_classes)
    data = json.loads(value) if isinstance(value, str) else value
    return {int(k): str(v) for k, v in data.items()}


def of_sidecar(sidecar: Mapping[str, Any]) -> dict[int, str]:
    """The class names of an engine, from its sidecar."""
    return from_stored(sidecar.get(KEY), int(sidecar["config"].get("num_classes", COCO_NUM_CLASSES)))


def label_name(names: Mapping[int, str], label: int) -> str:
    """The name of a label, or its number when it has none."""
    return names.get(int(label), str(int(label)))


def describe(names: Mapping[int, str], num_classes: int) -> str:
    """One line for summaries: "COCO (80 names)", "3 of 4 labels named", "numeric (no names)"."""
    if not names:
        return "numeric (no names)"
    if names == COCO_CATEGORIES:
        return f"COCO ({len(names)} names)"
    return f"{len(names)} of {num_classes} labels named"
