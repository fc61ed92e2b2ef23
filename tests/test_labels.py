"""Class names of fine-tuned models (core.labels): `weights.extract --names` -> weights metadata -> sidecar ->
runtime.infer's table, JSON and annotated images, serve.triton's labels, eval.coco's category ids."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import weights
from core import labels
from core.sidecar import load_sidecar
from weights.extract import main as extract_main

from helpers import run_cli

NAMES = {0: "cat", 1: "dog", 2: "bird"}


def coco_file(path: Path, categories) -> Path:
    path.write_text(json.dumps({"images": [], "annotations": [],
                                "categories": [{"id": i, "name": n, "supercategory": "x"} for i, n in categories]}))
    return path


# ---------------------------------------------------------------------------------------------- the names file


def test_text_file_line_k_names_label_k_and_blank_lines_leave_a_label_unnamed(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("\ufeffcat\n  dog \n\nbird\n\n\n", encoding="utf-8")  # a BOM, spaces, a gap, trailing lines
    assert labels.check_names(labels.read_names_file(path), 5) == {0: "cat", 1: "dog", 3: "bird"}


def test_coco_annotations_give_their_category_ids(tmp_path):
    path = coco_file(tmp_path / "ann.json", [(3, "bird"), (1, "cat"), (2, "dog")])
    assert labels.check_names(labels.read_names_file(path), 4) == {1: "cat", 2: "dog", 3: "bird"}


@pytest.mark.parametrize("classes, content, message", [
    (3, "a\nb\nc\nd\n", "4 names for a model of 3 classes"),
    (3, [(1, "a"), (3, "b")], "ids outside 0..2: 3"),
    (3, [(-1, "a")], "ids outside 0..2: -1"),
    (4, [(1, "a"), (1, "b"), (2, "c")], "duplicate ids: 1"),
    (4, [(1, "two\nlines")], "names of ids 1 span several lines"),
])
def test_names_that_do_not_fit_the_class_count(tmp_path, classes, content, message):
    path = tmp_path / "names"
    if isinstance(content, str):
        path.write_text(content)
    else:
        coco_file(path, content)
    with pytest.raises(labels.LabelsError, match=message):
        labels.check_names(labels.read_names_file(path), classes)


@pytest.mark.parametrize("content, message", [
    (b"", "names no class"),
    (b"\n\n", "names no class"),
    (b"\xff\xfe\x00c", "is not UTF-8 text"),
    (b'{"images": []', "is not valid JSON"),
    (b'{"images": []}', "has no 'categories' list"),
    (b'{"categories": [{"id": "1", "name": "a"}]}', r"categories\[0\] needs an integer 'id'"),
    (b'{"categories": [{"id": 1, "name": ""}]}', r"categories\[0\] needs an integer 'id' and a non-empty 'name'"),
])
def test_unreadable_names_files(tmp_path, content, message):
    path = tmp_path / "names"
    path.write_bytes(content)
    with pytest.raises(labels.LabelsError, match=message):
        labels.read_names_file(path)


def test_stored_form_is_ordered_by_id_and_round_trips():
    text = labels.to_json({10: "z", 2: "é"})
    assert text == '{"2": "é", "10": "z"}'
    assert labels.from_stored(text, 11) == {2: "é", 10: "z"}
    assert labels.from_stored(None, 91) == labels.COCO_CATEGORIES  # written before names existed: COCO's
    assert labels.from_stored(None, 4) == {}  # ... and numbers for another class count
    assert labels.label_name({2: "dog"}, 2) == "dog" and labels.label_name({2: "dog"}, 3) == "3"


# ---------------------------------------------------------------------------------------------- weights.extract


def test_bad_names_files_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    cases = [("more.txt", "a\nb\nc\nd\n", "4 names for a model of 3 classes"),
             ("range.json", [(0, "a"), (5, "b")], "ids outside 0..2: 5"),
             ("dup.json", [(0, "a"), (0, "b")], "duplicate ids: 0")]
    for name, content, message in cases:
        path = tmp_path / name
        path.write_text(content) if isinstance(content, str) else coco_file(path, content)
        code, stdout, err = run_cli(extract_main, ["--random-init", "r50_c5", "--num-classes", 3, "--names", path,
                                                   "-o", out], capsys)
        assert code == 2 and stdout == "", (name, err)
        assert err.startswith("python -m weights.extract: error: --names does not fit the model") and message in err
        assert "fix the names file" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(extract_main, ["--random-init", "r50_c5", "--names", tmp_path / "none.txt", "-o", out],
                           capsys)
    assert code == 2 and "none.txt does not exist" in err
    assert list(tmp_path.glob("*.safetensors*")) == []


def test_num_classes_is_for_random_init(tmp_path, capsys):
    ckpt = tmp_path / "c.pth"
    ckpt.write_bytes(b"PK")
    with pytest.raises(SystemExit) as exit_:  # a usage error, reported by argparse
        extract_main([str(ckpt), "--num-classes", "3"])
    assert exit_.value.code == 2 and "--num-classes is for --random-init" in capsys.readouterr().err


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    """A 3-class r50_c5 from the extract CLI with --names (cat, dog, bird)."""
    folder = tmp_path_factory.mktemp("three")
    names = folder / "names.txt"
    names.write_text("cat\ndog\nbird\n")
    path = folder / "w.safetensors"
    assert extract_main(["--random-init", "r50_c5", "--num-classes", "3", "--names", str(names), "-o", str(path),
                         "--json"]) == 0
    return path


def test_three_class_model_stores_its_names(three_class):
    assert weights.class_names(three_class) == NAMES
    cfg, tensors = weights.load(three_class)
    assert cfg.num_classes == 3 and tensors["transformer.class_embed.weight"].shape[0] == 3


def test_other_class_count_without_names_gets_numbers_and_a_hint(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    code, out, err = run_cli(extract_main, ["--random-init", "r50_c5", "--num-classes", 4, "-o", path, "--json"],
                             capsys)
    assert code == 0 and json.loads(out)["labels"] == {}
    assert err.strip() == ("hint: 4 classes and no --names, so labels are numbers 0..3: name them with --names FILE "
                           f"({labels.NAMES_HELP})")
    assert weights.class_names(path) == {}
    from runtime.infer import print_detections

    print_detections(Path("x.jpg"), (8, 8), {"scores": np.float32([0.9]), "labels": np.int32([2]),
                                              "boxes": np.float32([[0, 0, 4, 4]])}, 0.5, weights.class_names(path))
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[:3] == ["2", "2", "0.900"]


# ---------------------------------------------------------------------------------------------- the rest of the path


def test_sidecar_names_win_and_old_sidecars_fall_back():
    from runtime.infer import class_names

    side = {"config": {"num_classes": 3}, "labels": {"0": "cat"}}
    assert class_names(SimpleNamespace(engine=SimpleNamespace(sidecar=side))) == {0: "cat"}
    assert class_names(SimpleNamespace(engine=SimpleNamespace(sidecar={"config": {"num_classes": 91}}))) \
        == labels.COCO_CATEGORIES
    assert class_names(SimpleNamespace(engine=SimpleNamespace(sidecar={"config": {"num_classes": 3}}))) == {}
    assert class_names(SimpleNamespace(names={1: "a"})) == {1: "a"}


def test_triton_repository_reports_the_names():
    from serve.triton import _parameters, labels_metadata

    parameters, text = labels_metadata({0: "cat", 2: 'say "hi"'}, 4)
    assert text.decode().splitlines() == ["cat", "1", 'say "hi"', "3"]
    assert _parameters(parameters).splitlines()[1:3] == [
        '  key: "labels"', r'  value: { string_value: "{\"0\": \"cat\", \"2\": \"say \\\"hi\\\"\"}" }']


def test_server_answers_names_beside_labels():
    from serve.server import _encode

    rows = [{"scores": np.float32([0.9, 0.8]), "labels": np.int32([2, 5]), "boxes": np.zeros((2, 4), np.float32),
             "size": (4, 4)}, "bad image"]
    out = _encode(rows, NAMES)
    assert out["names"].tolist() == [[b"bird", b"5"], [b"", b""]]


def images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(80, 60), (64, 96)]):
        path = folder / f"{i + 1:012d}.png"
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_names_through_build_infer_and_eval(three_class, tmp_path, capsys, monkeypatch):
    """extract --names -> netdef.build (TensorRT-RTX, tiny profile) -> runtime.infer with the reference model in the
    engine's place (nothing here runs an engine) -> its table, JSON and annotated images -> eval.coco on a custom
    COCO-format dataset whose category ids differ from the model's labels."""
    pytest.importorskip("tensorrt_rtx")
    from netdef.build import main as build_main
    from runtime import infer
    from runtime.torch_detector import TorchReference
    import eval.coco

    engine = tmp_path / "e.plan"
    assert build_main(["--weights", str(three_class), "--min", "64x64", "--opt", "64x64", "--max", "96x96",
                       "--batch", "1,1,1", "-o", str(engine), "--json"]) == 0
    capsys.readouterr()
    side = load_sidecar(engine)
    assert side["labels"] == {"0": "cat", "1": "dog", "2": "bird"}

    class ReferenceAsEngine(TorchReference):
        """The reference model, answering for the engine: the names must come from the engine's sidecar."""

        def __init__(self):
            super().__init__(three_class, "cpu")
            self.names = {}  # so that names seen below can only have come from the sidecar
            self.engine = SimpleNamespace(sidecar=side)

    monkeypatch.setattr(infer, "open_runner", lambda path, sha: ReferenceAsEngine())
    paths = images(tmp_path)
    out_json, annotated = tmp_path / "res.json", tmp_path / "annotated"
    code = infer.main([*map(str, paths), "--engine", str(engine), "--threshold", "0", "--json", str(out_json),
                       "--out", str(annotated)])
    table = capsys.readouterr().out
    assert code == 0
    records = json.loads(out_json.read_text())
    assert len(records) == 200 and {r["category_id"] for r in records} <= {0, 1, 2}
    assert all(r["category_name"] == NAMES[r["category_id"]] for r in records)
    rows = [line.split() for line in table.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 7]
    assert len(rows) == 200 and all(NAMES[int(r[0])] == r[1] for r in rows)
    assert sorted(p.name for p in annotated.iterdir()) == [p.with_suffix(".jpg").name for p in paths]

    # A custom COCO-format set: the same classes under other category ids (and one image annotation each).
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    for p in paths:
        p.rename(root / "val2017" / p.name)
    ids = {"dog": 1, "bird": 7, "cat": 9}
    annotations = {
        "images": [{"id": int(p.stem), "file_name": p.name, "width": w, "height": h}
                   for p, (w, h) in zip(paths, [(80, 60), (64, 96)])],
        "annotations": [{"id": i + 1, "image_id": int(p.stem), "category_id": 9, "bbox": [4, 4, 30, 30],
                         "area": 900, "iscrowd": 0} for i, p in enumerate(paths)],
        "categories": [{"id": v, "name": k} for k, v in ids.items()],
    }
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(annotations))
    results = tmp_path / "eval"
    assert eval.coco.main(["--coco-root", str(root), "--torch-weights", str(three_class), "--device", "cpu",
                           "--results-dir", str(results)]) == 0
    scored = json.loads((results / "torch_bbox.json").read_text())
    # Same images, same model, batch 1: the same detections, each label now under the dataset's id of its name.
    want = collections.Counter((r["image_id"], ids[r["category_name"]], round(r["score"], 4)) for r in records)
    assert collections.Counter((r["image_id"], r["category_id"], round(r["score"], 4)) for r in scored) == want

    # A dataset category the model does not know: refused, not a silently low mAP.
    annotations["categories"].append({"id": 3, "name": "horse"})
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(annotations))
    capsys.readouterr()
    assert eval.coco.main(["--coco-root", str(root), "--torch-weights", str(three_class), "--device", "cpu",
                           "--results-dir", str(results)]) == 2
    assert "has no class named as the annotations' categories horse" in capsys.readouterr().err


def test_eval_maps_labels_to_the_datasets_category_ids_by_name():
    from eval.coco import category_map
    from eval.scoring import EvalError

    class Gt:  # pycocotools.COCO's two calls
        def __init__(self, cats):
            self.cats = cats

        def getCatIds(self):
            return [c["id"] for c in self.cats]

        def loadCats(self, ids):
            return [c for c in self.cats if c["id"] in ids]

    custom = Gt([{"id": 1, "name": "dog"}, {"id": 7, "name": "bird"}, {"id": 9, "name": "cat"}])
    assert category_map(NAMES, custom, "m") == {0: 9, 1: 1, 2: 7}
    coco = Gt([{"id": 1, "name": "person"}, {"id": 90, "name": "toothbrush"}])
    assert category_map(labels.COCO_CATEGORIES, coco, "m") is None  # already the ids: every detection kept
    assert category_map({}, custom, "m") is None  # numeric labels: label = category id
    with pytest.raises(EvalError, match="m has no class named as the annotations' categories horse"):
        category_map(NAMES, Gt([{"id": 3, "name": "horse"}, {"id": 9, "name": "cat"}]), "m")
