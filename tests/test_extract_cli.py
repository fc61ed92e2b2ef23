"""`python -m weights.extract`: official checkpoints in, one weights file out; every bad input is one line, exit 2."""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import weights
from core.config import AnchorDETRConfig
import weights.extract
from weights import naming
from weights.extract import main
from weights.random_init import random_state_dict, training_checkpoint

CFG = AnchorDETRConfig.from_variant("r50_c5")


@pytest.fixture(scope="module")
def sd():
    return random_state_dict(CFG, 0)


@pytest.fixture(scope="module")
def ckpt(sd, tmp_path_factory):
    """An official-style checkpoint, with what training scripts add: optimizer state, numpy scalars."""
    path = tmp_path_factory.mktemp("ckpt") / "AnchorDETR_r50_c5.pth"
    data = training_checkpoint(CFG, sd, optimizer=False)
    data["optimizer"]["state"] = {0: {"step": torch.tensor(366500.0), "exp_avg": torch.zeros(3, 256)}}
    data["lr_scheduler"]["_last_lr"] = [np.float64(2e-5)]
    data["epoch"] = np.int64(49)
    torch.save(data, path)
    return path


def save_checkpoint(path, sd, args=CFG, **kwargs):
    data = training_checkpoint(CFG, sd, optimizer=False) if args is not None else sd
    if args is not None and args is not CFG:
        data["args"] = args
    torch.save(data, path, **kwargs)
    return str(path)


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(rc, err, folder, message):
    """Exit 2, exactly one `prog: error: message` line naming the problem, and nothing new (no output, no temp file) in `folder`."""
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m weights.extract: error: "), err
    assert message in lines[0], lines[0]
    assert not [f for f in os.listdir(folder) if f.endswith((".safetensors", ".tmp"))]


def test_extracts_an_official_checkpoint(ckpt, sd, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    rc, stdout, err = run([ckpt, "-o", out], capsys)
    assert rc == 0, err
    assert "r50_c5" in stdout and "428" in stdout  # variant and tensor count in the summary table
    cfg, tensors = weights.load(out)
    assert cfg == CFG
    expected = naming.to_builder(sd, CFG)
    assert set(tensors) == set(expected)
    assert all(np.array_equal(tensors[k], v.numpy()) for k, v in expected.items())
    meta = weights.read_metadata(out)
    assert not weights.is_random_init(out)
    assert meta["source"] == "AnchorDETR_r50_c5.pth"
    assert meta["source_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert AnchorDETRConfig.from_json(meta["config"]) == CFG
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]


def test_module_entry_point_and_json_summary(ckpt, tmp_path):
    out = tmp_path / "w.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "weights.extract", str(ckpt), "-o", str(out), "--json"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["variant"] == "r50_c5" and summary["tensors"] == 428
    assert summary["parameters"] == sum(int(np.prod(s)) for s in weights.builder_shapes(CFG).values())
    assert summary["sha256"] == weights.file_sha256(out) and summary["bytes"] == out.stat().st_size


def extract_in_process(argv, hash_seed):
    """sha256 of the file written by a fresh `python -m weights.extract` run under PYTHONHASHSEED=hash_seed."""
    proc = subprocess.run(
        [sys.executable, "-m", "weights.extract", *map(str, argv), "--json"],
        capture_output=True, text=True, check=False, env=dict(os.environ, PYTHONHASHSEED=str(hash_seed)),
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["sha256"]


def test_extraction_is_reproducible(ckpt, tmp_path):
    """The same checkpoint and options give the same bytes in separate processes with different hash seeds; the
    checkpoint's folder does not count (only its name is recorded). The same for --random-init with one seed."""
    copy = tmp_path / "elsewhere" / ckpt.name
    copy.parent.mkdir()
    shutil.copy(ckpt, copy)
    first = extract_in_process([ckpt, "-o", tmp_path / "a.safetensors"], 1)
    assert extract_in_process([copy, "-o", tmp_path / "b.safetensors"], 2) == first
    assert weights.file_sha256(tmp_path / "a.safetensors") == first
    random_argv = ["--random-init", "r50_c5", "--seed", "3", "-o"]
    first = extract_in_process(random_argv + [tmp_path / "r1.safetensors"], 3)
    assert extract_in_process(random_argv + [tmp_path / "r2.safetensors"], 4) == first


def test_help_explains_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--random-init" in text and "weights_only=True" in text and "r101_dc5" in text


def test_random_init_writes_a_valid_file(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    rc, _, err = run(["--random-init", "r50_c5", "--seed", "1", "-o", out], capsys)
    assert rc == 0, err
    cfg, tensors = weights.load(out)
    assert cfg == CFG and weights.read_metadata(out)["source"] == "random-init r50_c5 seed 1"
    assert weights.is_random_init(out)  # the runtime warns that its detections mean nothing
    expected = naming.to_builder(random_state_dict(CFG, 1), CFG)
    assert all(np.array_equal(tensors[k], v.numpy()) for k, v in expected.items())


def test_bare_state_dict_needs_the_variant(sd, tmp_path, capsys):
    path = save_checkpoint(tmp_path / "bare.pth", sd, args=None)
    out = tmp_path / "w.safetensors"
    rc, _, err = run([path, "-o", out], capsys)
    assert_refused(rc, err, tmp_path, "name the variant explicitly (e.g. --variant r50_dc5)")
    rc, _, err = run([path, "-o", out, "--variant", "r101_c5"], capsys)
    assert_refused(rc, err, tmp_path, "--variant r101_c5 does not match the checkpoint, which holds r50_c5")
    rc, _, err = run([path, "-o", out, "--variant", "r50_c5"], capsys)
    assert rc == 0, err
    assert weights.load(out)[0] == CFG


def test_legacy_format_checkpoint_reads_and_truncation_is_refused(sd, tmp_path, capsys):
    path = save_checkpoint(tmp_path / "legacy.pth", sd, _use_new_zipfile_serialization=False)
    rc, _, err = run([path, "-o", tmp_path / "w.safetensors"], capsys)
    assert rc == 0, err
    os.remove(tmp_path / "w.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    rc, _, err = run([path, "-o", tmp_path / "w.safetensors"], capsys)
    assert_refused(rc, err, tmp_path, "legacy.pth is truncated or corrupt")


def test_not_a_checkpoint(tmp_path):
    """Random bytes and a text file, through a real process: one line, no traceback."""
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    for name in ("random.pth", "notes.pth"):
        proc = subprocess.run(
            [sys.executable, "-m", "weights.extract", str(tmp_path / name), "-o", str(tmp_path / "w.safetensors")],
            capture_output=True, text=True, check=False,
        )
        assert_refused(proc.returncode, proc.stderr, tmp_path, f"{name} is not a PyTorch checkpoint")
        assert proc.stdout == ""


def test_truncated_zip_checkpoint(ckpt, tmp_path, capsys):
    half = tmp_path / "half.pth"
    data = ckpt.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    rc, _, err = run([half, "-o", tmp_path / "w.safetensors"], capsys)
    assert_refused(rc, err, tmp_path, "half.pth is a truncated or corrupt zip checkpoint")


def test_checkpoint_of_another_model_names_keys(sd, tmp_path, capsys):
    # A DETR-style wrapper (as the official segmentation model): every key under another prefix.
    wrapped = save_checkpoint(tmp_path / "segm.pth", {f"detr.{k}": v for k, v in sd.items()}, args=None)
    rc, _, err = run([wrapped, "-o", tmp_path / "w.safetensors", "--variant", "r50_c5"], capsys)
    assert_refused(rc, err, tmp_path, "not an AnchorDETR state dict: 507 missing keys: transformer.encoder_layers.0")
    assert "and 497 more" in err and "507 unexpected keys: detr.transformer" in err
    # A modified AnchorDETR: the configuration is found, the extra and missing keys are named.
    changed = {k: v for k, v in sd.items() if k != "transformer.adapt_pos2d.0.bias"}
    changed["transformer.query_scale.weight"] = torch.zeros(256)
    path = save_checkpoint(tmp_path / "changed.pth", changed)
    rc, _, err = run([path, "-o", tmp_path / "w.safetensors"], capsys)
    assert_refused(
        rc, err, tmp_path,
        "not an official r50_c5 state dict: 1 missing key: transformer.adapt_pos2d.0.bias; "
        "1 unexpected key: transformer.query_scale.weight",
    )


def test_args_disagreeing_with_shapes(sd, tmp_path, capsys):
    args = training_checkpoint(AnchorDETRConfig.from_variant("r101_c5"), {}, optimizer=False)["args"]
    path = save_checkpoint(tmp_path / "mixed.pth", sd, args=args)
    rc, _, err = run([path, "-o", tmp_path / "w.safetensors"], capsys)
    assert_refused(rc, err, tmp_path, "args.backbone='resnet101' but backbone.body.layer3.* says 'resnet50'")


def test_unshared_heads_are_refused(sd, tmp_path, capsys):
    changed = dict(sd)
    changed["transformer.class_embed.3.bias"] = sd["transformer.class_embed.3.bias"] + 1e-3
    path = save_checkpoint(tmp_path / "heads.pth", changed)
    rc, _, err = run([path, "-o", tmp_path / "w.safetensors"], capsys)
    assert_refused(rc, err, tmp_path, "transformer.class_embed.3.bias differs from transformer.class_embed.0.bias")


class TrainingArgs:
    """A Namespace look-alike: a class only this module defines, so never on the allow-list."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class StateDict(collections.OrderedDict):
    """torch's allow-list admits OrderedDict itself, not a subclass."""


@pytest.mark.parametrize("what", ["datetime", "args class", "OrderedDict subclass", "blocked module"])
def test_globals_outside_the_allow_list_are_refused_for_safety(what, sd, tmp_path, capsys):
    data = training_checkpoint(CFG, sd, optimizer=False)
    if what == "datetime":
        data["saved_at"], name = datetime.datetime(2021, 9, 1), "datetime.datetime"
    elif what == "args class":
        data["args"], name = TrainingArgs(**vars(data["args"])), f"{__name__}.TrainingArgs"
    elif what == "OrderedDict subclass":
        data["model"], name = StateDict(sd), f"{__name__}.StateDict"
    else:  # torch blocks some modules outright, with another message
        data["hook"], name = os.getcwd, f"{os.getcwd.__module__}.getcwd"
    torch.save(data, tmp_path / "extra.pth")
    rc, _, err = run([tmp_path / "extra.pth", "-o", tmp_path / "w.safetensors"], capsys)
    assert_refused(rc, err, tmp_path, f"needs the global {name}, which is not on the allow-list")
    assert "refused for safety" in err and "weights_only" not in err and "torch.save({'model'" in err


def test_pickle_code_the_safe_loader_refuses(tmp_path, capsys):
    """A refusal without a global (an opcode torch's weights-only unpickler lacks) says why, without torch's advice."""
    torch.save({"model": {}}, tmp_path / "base.pth")
    with zipfile.ZipFile(tmp_path / "base.pth") as src, zipfile.ZipFile(tmp_path / "ext.pth", "w") as dst:
        for item in src.infolist():
            # protocol 2, EXT1 1 (an extension-registry object), STOP
            dst.writestr(item, b"\x80\x02\x82\x01." if item.filename.endswith("data.pkl") else src.read(item))
    os.remove(tmp_path / "base.pth")
    rc, _, err = run([tmp_path / "ext.pth", "-o", tmp_path / "w.safetensors"], capsys)
    assert_refused(rc, err, tmp_path, "ext.pth holds pickled data that torch's safe loader does not accept "
                   "(Unsupported operand 130): the file is refused for safety")
    assert "weights_only" not in err


def test_bad_variants(ckpt, tmp_path, capsys):
    rc, _, err = run([ckpt, "-o", tmp_path / "w.safetensors", "--variant", "r34_c5"], capsys)
    assert_refused(rc, err, tmp_path, "unknown variant 'r34_c5'")
    rc, _, err = run(["--random-init", "r50_dc6", "-o", tmp_path / "w.safetensors"], capsys)
    assert_refused(rc, err, tmp_path, "unknown variant 'r50_dc6'")


def test_output_paths(ckpt, tmp_path, capsys):
    rc, _, err = run([ckpt, "-o", tmp_path / "new" / "w.safetensors"], capsys)
    assert rc == 0 and (tmp_path / "new" / "w.safetensors").is_file(), err  # missing folders are made
    rc, _, err = run([ckpt, "-o", tmp_path], capsys)
    assert_refused(rc, err, tmp_path, "is a folder")
    rc, _, err = run([ckpt, "-o", ckpt], capsys)
    assert_refused(rc, err, tmp_path, "is the checkpoint")
    os.link(ckpt, tmp_path / "hard.pth")  # another name of the same file
    rc, _, err = run([ckpt, "-o", tmp_path / "hard.pth"], capsys)
    assert_refused(rc, err, tmp_path, "(the same file): writing it would destroy that input")
    # /proc takes no new files, even from root (for whom permission bits do not count).
    rc, _, err = run([ckpt, "-o", "/proc/anchortrt.safetensors"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "not writable" in err or "cannot write /proc/anchortrt.safetensors" in err
    rc, _, err = run([tmp_path / "absent.pth", "-o", tmp_path / "w.safetensors"], capsys)
    assert_refused(rc, err, tmp_path, "absent.pth does not exist or is not a file")


@pytest.mark.parametrize("kind", ["fifo", "folder", "/dev/null"])
def test_special_file_outputs_are_refused_before_any_work(kind, ckpt, tmp_path, capsys, monkeypatch):
    """The final rename would replace a pipe, a device or an empty folder: refused at argument-check time."""
    target = Path(kind) if kind.startswith("/") else tmp_path / kind
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    before = os.stat(target)
    # Safety nets: a regression fails here instead of converting, or of renaming over /dev/null.
    monkeypatch.setattr(weights.extract, "extract", lambda *a, **k: pytest.fail("extraction started"))
    monkeypatch.setattr(os, "replace", lambda *a: pytest.fail(f"renamed onto {a[1]}"))
    rc, _, err = run([ckpt, "-o", target], capsys)
    what = "a folder" if kind == "folder" else "not a regular file"
    assert_refused(rc, err, tmp_path, f"output {target} is {what}: name a regular file or a new path")
    after = os.stat(target)
    assert (stat.S_IFMT(after.st_mode), after.st_ino, after.st_rdev) == (
        stat.S_IFMT(before.st_mode), before.st_ino, before.st_rdev)
    if kind == "folder":
        assert not os.listdir(target)


# Runs weights.extract as `python -m` does and reports whether torch got imported, on the last stdout line.
WITHOUT_TORCH = """import runpy, sys
try:
    runpy.run_module("weights.extract", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
print("torch imported" if "torch" in sys.modules else "torch not imported")
sys.exit(code)
"""


@pytest.mark.parametrize("case", ["typo", "missing checkpoint", "not a checkpoint", "bad variant", "special output"])
def test_bad_input_is_reported_before_torch_is_imported(case, tmp_path):
    (tmp_path / "notes.pth").write_text("not weights\n")
    argv, message = {
        "typo": (["--bogus"], "unrecognized arguments: --bogus"),
        "missing checkpoint": ([tmp_path / "absent.pth"], "absent.pth does not exist or is not a file"),
        "not a checkpoint": ([tmp_path / "notes.pth"], "notes.pth is not a PyTorch checkpoint"),
        "bad variant": (["--random-init", "r50_dc6"], "unknown variant 'r50_dc6'"),
        "special output": (["--random-init", "r50_c5", "-o", "/dev/null"], "output /dev/null is not a regular file"),
    }[case]
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *map(str, argv)], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[-1] == "torch not imported"
    assert sorted(os.listdir(tmp_path)) == ["notes.pth"]


def test_missing_torch_is_exit_3(tmp_path):
    hide_torch = "import sys; sys.modules['torch'] = None  # `import torch` now raises ImportError\n"
    proc = subprocess.run([sys.executable, "-c", hide_torch + WITHOUT_TORCH, "--random-init", "r50_c5", "-o",
                           str(tmp_path / "w.safetensors")], capture_output=True, text=True, check=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr == "python -m weights.extract: error: torch is not installed: pip install torch\n"
    assert not os.listdir(tmp_path)


def test_default_output_is_named_after_the_variant(ckpt, sd, tmp_path, capsys, monkeypatch):
    """weights/anchor_detr_<variant>.safetensors under the current folder: the --random-init variant, the variant
    detected from the checkpoint, or the --variant of a bare state dict; the folder is made."""
    monkeypatch.chdir(tmp_path)
    default = tmp_path / "weights" / "anchor_detr_r50_c5.safetensors"
    rc, out, err = run(["--random-init", "r50_c5"], capsys)
    assert rc == 0 and default.is_file() and "weights/anchor_detr_r50_c5.safetensors" in out, err
    os.remove(default)
    rc, _, err = run([ckpt], capsys)
    assert rc == 0 and weights.load(default)[0] == CFG, err
    os.remove(default)
    bare = save_checkpoint(tmp_path / "bare.pth", sd, args=None)
    rc, _, err = run([bare, "--variant", "r50_c5"], capsys)
    assert rc == 0 and weights.read_metadata(default)["source"] == "bare.pth", err
    # The default path is checked like -o, here once the checkpoint has told its variant.
    os.remove(default)
    os.rmdir(default.parent)
    default.parent.write_text("a file where the folder would be\n")
    rc, _, err = run([ckpt], capsys)
    assert_refused(rc, err, tmp_path, f"output {os.path.join('weights', default.name)}: weights is not a folder")


@pytest.mark.parametrize(
    "argv", [[], ["x.pth", "--random-init", "r50_c5"], ["--random-init", "r50_c5", "--variant", "r50_c5"]]
)
def test_usage_errors_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["-o", str(tmp_path / "w.safetensors")])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_checkpoint_with_names_from_coco_annotations(ckpt, tmp_path, capsys):
    """--names with a checkpoint: checked against the class count its tensors give, before anything is written."""
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"categories": [{"id": 1, "name": "person"}, {"id": 91, "name": "unicorn"}]}))
    out = tmp_path / "w.safetensors"
    rc, _, err = run(["--names", ann, "-o", out, ckpt], capsys)
    assert rc == 2 and "ids outside 0..90: 91" in err and not out.exists()
    ann.write_text(json.dumps({"categories": [{"id": 1, "name": "person"}, {"id": 90, "name": "unicorn"}]}))
    rc, _, err = run(["--names", ann, "-o", out, ckpt], capsys)
    assert rc == 0 and err == "" and weights.class_names(out) == {1: "person", 90: "unicorn"}
