"""runtime.infer / runtime.bench command lines and the Detector logic they share, without a GPU.

`NumpyDetector` (tests/helpers.py) stands in for the engine: it answers AnchorDETR's I/O from the pixels it
receives (the label is the brightest channel of the valid region, the box its centre half), so the tests see
whether the right pixels and masks reached the network and whether the boxes come back in each original image's
coordinates.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from core.sidecar import Profile
from runtime import bench, infer
from core.errors import BadInput
from runtime.preprocess import ShapeError

from helpers import NumpyDetector, solid

@pytest.mark.parametrize("engine_postprocess", [False, True])
def test_detect_labels_boxes_and_batches(engine_postprocess):
    detector = NumpyDetector(engine_postprocess=engine_postprocess)
    images = [solid(64, 48, 0), solid(40, 90, 1), solid(300, 20, 2)]
    found = detector.detect(images, threshold=0.5)
    assert [d["labels"].tolist() for d in found] == [[1], [3], [17]]
    for image, d in zip(images, found):
        w, h = image.size
        np.testing.assert_allclose(d["boxes"][0], [w / 4, h / 4, 3 * w / 4, 3 * h / 4], rtol=1e-5)
        assert d["scores"][0] == pytest.approx(1 / (1 + np.exp(-4.0)), rel=1e-6)
    # two calls (max batch 2): 800x1066 and 1332x592 padded to 1332x1066; 89x1335 padded to the profile's 320
    (shape0, masks0), (shape1, masks1) = detector.calls
    assert shape0 == (2, 3, 1332, 1066) and shape1 == (1, 3, 320, 1335)
    assert not masks0[0, :800].any() and masks0[0, 800:].all()
    assert not masks0[1, :, :592].any() and masks0[1, :, 592:].all()
    assert not masks1[0, :89].any() and masks1[0, 89:].all()


def test_detect_threshold_and_exif_oriented_boxes():
    detector = NumpyDetector()
    assert detector.detect([solid(64, 48, 0)], threshold=0.99)[0]["labels"].size == 0
    image = solid(60, 30, 2)
    image.getexif()[0x0112] = 6  # EXIF orientation: displayed rotated, 30 wide and 60 high
    (d,) = detector.detect([image])
    np.testing.assert_allclose(d["boxes"][0], [7.5, 15, 22.5, 45], rtol=1e-5)


def test_fit_profile_pads_repeats_and_refuses():
    detector = NumpyDetector(Profile((2, 320, 512), (2, 800, 800), (2, 1344, 1344)))
    images, masks = detector.fit_profile(np.ones((1, 3, 100, 600), np.float32), np.zeros((1, 100, 600), bool))
    assert images.shape == (2, 3, 320, 600) and masks.shape == (2, 320, 600)
    assert masks[:, 100:].all() and not masks[:, :100].any() and not images[:, :, 100:].any()
    with pytest.raises(ShapeError, match=r"batch 3 of 800x800 exceeds the engine profile's maximum 2 of 1344x1344"):
        detector.fit_profile(np.zeros((3, 3, 800, 800), np.float32), np.zeros((3, 800, 800), bool))


@pytest.fixture
def images_dir(tmp_path):
    solid(64, 48, 0).save(tmp_path / "000000000139.png")
    solid(48, 64, 1).convert("L").save(tmp_path / "gray.jpg")
    (tmp_path / "broken.jpg").write_text("not an image")
    return tmp_path


def test_infer_cli_processes_good_images_and_skips_bad_ones(images_dir, monkeypatch, capsys):
    detector = NumpyDetector()
    monkeypatch.setattr(infer, "open_runner", lambda engine, sha: detector)
    out, results = images_dir / "annotated", images_dir / "results.json"
    paths = [images_dir / "000000000139.png", images_dir / "missing.jpg", images_dir / "broken.jpg",
             images_dir / "gray.jpg"]
    code = infer.main([*map(str, paths), "--out", str(out), "--json", str(results), "--batch", "2"])
    captured = capsys.readouterr()
    assert code == 1
    assert "skipped: " in captured.err and "missing.jpg: no such file" in captured.err
    assert "broken.jpg: cannot read image" in captured.err and "Traceback" not in captured.err
    assert "person" in captured.out and "2 images processed" in captured.out
    records = json.loads(results.read_text())
    assert [(r["image_id"], r["category_id"]) for r in records] == [(139, 1), (3, 1)]  # gray: equal channels
    np.testing.assert_allclose(records[0]["bbox"], [16, 12, 32, 24], rtol=1e-5)
    assert sorted(p.name for p in out.iterdir()) == ["000000000139.jpg", "gray.jpg"]
    assert Image.open(out / "000000000139.jpg").size == (64, 48)
    assert detector.closed


def test_infer_cli_missing_engine_is_one_line(images_dir, capsys):
    code = infer.main([str(images_dir / "gray.jpg"), "--engine", str(images_dir / "none.plan")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("python -m runtime.infer: error: engine") and "none.plan not found" in err[0]


def test_infer_cli_without_gpu_is_one_line(images_dir, capsys):
    from conftest import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present")
    import tensorrt_rtx

    from core.sidecar import write_sidecar

    engine = images_dir / "model.plan"
    engine.write_bytes(b"plan")
    write_sidecar(engine, {
        "config": {}, "profile": Profile().to_dict(), "precision": "fp16", "plugins": [], "postprocess": False,
        "backend": "tensorrt-rtx", "trt_version": tensorrt_rtx.__version__, "gpu": None, "weights_sha256": "0" * 64,
        "inputs": {}, "outputs": {}, "version_compatible": False, "anchortrt_version": "0.1.0",
    })
    code = infer.main([str(images_dir / "gray.jpg"), "--engine", str(engine)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and err[0].startswith("python -m runtime.infer: error: no NVIDIA driver")


@pytest.fixture
def gpu_probes(monkeypatch):
    """Calls of the GPU probe (core.cuda.init), which here pretends there is no GPU."""
    from core import cuda

    calls = []

    def probe(index=0):
        calls.append(index)
        raise cuda.NoGpuError(f"no NVIDIA driver; {cuda.NO_GPU_HINT}")

    monkeypatch.setattr(cuda, "init", probe)
    return calls


def one_error_line(capsys, prog="python -m runtime.infer"):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def write_engine(folder, weights_sha256="ab" * 32):
    from core.sidecar import write_sidecar

    engine = folder / "model.plan"
    engine.write_bytes(b"plan")
    write_sidecar(engine, {
        "config": {}, "profile": Profile((1, 320, 512), (1, 800, 800), (2, 1344, 1344)).to_dict(),
        "precision": "fp16", "plugins": [], "postprocess": False, "backend": "tensorrt-rtx",
        "trt_version": "1.7.1.116", "gpu": None, "weights_sha256": weights_sha256, "inputs": {}, "outputs": {},
        "version_compatible": False, "anchortrt_version": "0.1.0",
    })
    return engine


def test_infer_cli_bad_destinations_before_the_gpu(images_dir, capsys, gpu_probes):
    image = str(images_dir / "gray.jpg")
    (images_dir / "file").write_text("x")
    (images_dir / "out").mkdir()
    (images_dir / "out" / "gray.jpg").mkdir()  # a folder where the annotated copy would go
    before = sorted(images_dir.rglob("*"))
    cases = [
        (["--json", str(images_dir / "file" / "r.json")], "--json .*file/r.json: .*file is not a folder"),
        (["--json", str(images_dir)], "--json .* is a folder: name a regular file"),
        (["--out", str(images_dir / "file")], "--out .*file/gray.jpg: .*file is not a folder"),
        (["--out", str(images_dir / "out")], "--out .*out/gray.jpg is a folder"),
        (["--weights", str(images_dir / "none.safetensors")], "--weights .*none.safetensors not found"),
    ]
    for extra, pattern in cases:
        assert infer.main([image, "--engine", str(write_engine(images_dir)), *extra]) == 2, extra
        assert re.search(pattern, one_error_line(capsys)), extra
    assert not gpu_probes
    assert sorted(images_dir.rglob("*")) == sorted(before + [images_dir / "model.plan", images_dir / "model.json"])


def test_infer_cli_never_writes_over_an_input(images_dir, capsys, gpu_probes):
    """--json or an annotated copy that is an input image (by name, symlink or hard link) or the engine: exit 2
    before the GPU, and every input keeps its bytes."""
    image = images_dir / "gray.jpg"
    engine = write_engine(images_dir)
    (images_dir / "link.jpg").symlink_to(image)
    (images_dir / "hard.json").hardlink_to(image)
    before = {p: p.read_bytes() for p in images_dir.iterdir() if p.is_file()}
    cases = [
        (["--json", str(image)], "--json .*gray.jpg is the image .*gray.jpg: writing it would destroy"),
        (["--json", str(images_dir / "link.jpg")], "--json .*link.jpg is the image .*gray.jpg \\(the same file\\)"),
        (["--json", str(images_dir / "hard.json")], "--json .*hard.json is the image .*gray.jpg \\(the same file\\)"),
        (["--json", str(engine)], "--json .*model.plan is the --engine"),
        (["--json", str(images_dir / "model.json")], "--json .*model.json is the sidecar of --engine"),
        (["--out", str(images_dir)], "--out .*gray.jpg is the image"),  # photo.jpg --out . in its own folder
    ]
    for extra, pattern in cases:
        assert infer.main([str(image), "--engine", str(engine), *extra]) == 2, extra
        assert re.search(pattern, one_error_line(capsys)), extra
    assert not gpu_probes
    assert {p: p.read_bytes() for p in images_dir.iterdir() if p.is_file()} == before


def test_infer_cli_batch_must_be_positive(capsys):
    with pytest.raises(SystemExit) as info:
        infer.main(["x.jpg", "--batch", "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "python -m runtime.infer: error: argument --batch: expected a positive integer, got '0'")


def test_infer_cli_no_readable_image_is_bad_input_before_the_gpu(images_dir, capsys, gpu_probes):
    engine = write_engine(images_dir)
    assert infer.main([str(images_dir / "a.jpg"), str(images_dir), "--engine", str(engine),
                       "--out", str(images_dir / "annotated")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[:2] == [f"skipped: {images_dir / 'a.jpg'}: no such file", f"skipped: {images_dir}: not a readable file"]
    assert err[2:] == ["python -m runtime.infer: error: none of the 2 image file(s) can be read: name existing image files"]
    assert not gpu_probes and not (images_dir / "annotated").exists()


def test_infer_cli_weights_mismatch_is_bad_input_before_the_gpu(images_dir, capsys, gpu_probes):
    weights = images_dir / "w.safetensors"
    weights.write_bytes(b"other weights")
    code = infer.main([str(images_dir / "gray.jpg"), "--engine", str(write_engine(images_dir)), "--weights",
                       str(weights)])
    line = one_error_line(capsys)
    assert code == 2 and "embeds weights sha256 ababababab" in line and "rebuild it from these" in line
    assert not gpu_probes


@pytest.mark.parametrize("value", ["2", "-0.1", "nan", "high"])
def test_infer_threshold_is_a_probability(images_dir, capsys, gpu_probes, value):
    with pytest.raises(SystemExit) as info:
        infer.main([str(images_dir / "gray.jpg"), "--threshold", value])
    assert info.value.code == 2 and "--threshold: expected a number from 0 to 1" in capsys.readouterr().err
    assert not gpu_probes
    assert infer.build_parser().parse_args(["x.jpg", "--threshold", "1"]).threshold == 1.0


def test_infer_cli_out_folder_made_only_with_its_first_image(images_dir, monkeypatch, capsys, gpu_probes):
    monkeypatch.setattr(infer, "open_runner", lambda engine, sha: NumpyDetector())
    out = images_dir / "new" / "annotated"
    assert infer.main([str(images_dir / "broken.jpg"), "--out", str(out)]) == 1  # nothing decoded: nothing drawn
    assert not (images_dir / "new").exists()
    assert infer.main([str(images_dir / "gray.jpg"), "--out", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["gray.jpg"]


def test_bench_cli_bad_arguments(tmp_path, capsys):
    for bad, message in ((["--shapes", "800by800"], "argument --shapes: expected HxW[,HxW...], e.g. 800x800,1344x1344, "
                          "got '800by800'"), (["--batch", "0"], "argument --batch: expected comma-separated positive "
                          "integers, e.g. 1,4, got '0'")):
        with pytest.raises(SystemExit) as info:  # argparse's own exit: usage line, then the error line
            bench.main([*bad, "--engine", str(tmp_path / "e.plan")])
        assert info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"python -m runtime.bench: error: {message}"
    assert bench.main(["--torch-modes", "fp8", "--torch-weights", str(tmp_path / "w")]) == 2
    capsys.readouterr()
    assert bench.main(["--engine", str(tmp_path / "e.plan"), "--shapes", "800x800"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m runtime.bench: error: engine {tmp_path / 'e.plan'} not found: build one with "
                   "`python -m netdef.build --fp16` or pass --engine"]


def test_bench_checks_the_engine_files_before_the_gpu(tmp_path, capsys, gpu_probes):
    engine = write_engine(tmp_path)
    engine.with_suffix(".json").rename(tmp_path / "elsewhere.json")
    assert bench.main(["--engine", str(engine)]) == 2
    assert re.search(r"no sidecar .*model.json next to the engine", one_error_line(capsys, "python -m runtime.bench"))
    engine = write_engine(tmp_path)
    assert bench.main(["--engine", str(engine), "--shapes", "800x2000", "--batch", "1"]) == 2
    assert "batch 1 of 800x2000 is outside the engine profile" in one_error_line(capsys, "python -m runtime.bench")
    assert bench.main(["--engine", str(engine), "--json", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys, "python -m runtime.bench")
    assert bench.main(["--engine", str(engine), "--json", str(engine.with_suffix(".json"))]) == 2
    assert "is the sidecar of --engine" in one_error_line(capsys, "python -m runtime.bench")
    assert not gpu_probes
    # the same engine within its profile gets as far as the GPU
    assert bench.main(["--engine", str(engine), "--shapes", "800x800", "--batch", "1"]) == 3 and gpu_probes


def test_bench_profile_check_and_statistics():
    profile = Profile((1, 320, 512), (1, 800, 800), (4, 1344, 1344))
    bench.check_profile(profile, [(4, (1344, 1344)), (1, (320, 512))])
    with pytest.raises(BadInput, match=r"batch 8 of 800x800 is outside the engine profile"):
        bench.check_profile(profile, [(8, (800, 800))])
    row = bench.make_row("tensorrt", "enqueue", 4, (800, 800), [1.0] * 99 + [11.0], [2.0] * 100, 3 << 20)
    assert row["gpu_ms"]["p50"] == 1.0 and row["gpu_ms"]["mean"] == pytest.approx(1.1)
    assert row["images_per_s"] == pytest.approx(2000) and row["device_mem_mib"] == 3


def test_help_explains_and_runtime_imports_no_torch():
    for module in (infer, bench):
        with pytest.raises(SystemExit) as info:
            module.build_parser().parse_args(["--help"])
        assert info.value.code == 0
    code = ("import sys, runtime.infer, runtime.bench, runtime.runner, core.cuda, runtime.draw; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_infer_cli_unwritable_json_is_one_line(images_dir, monkeypatch, capsys):
    detector = NumpyDetector()
    monkeypatch.setattr(infer, "open_runner", lambda engine, sha: detector)
    target = images_dir / "results.json"
    target.mkdir()  # a folder where the file should go: refused before the detector is opened
    assert infer.main([str(images_dir / "gray.jpg"), "--json", str(target)]) == 2
    assert one_error_line(capsys) == (f"python -m runtime.infer: error: --json {target} is a folder: name a regular "
                                      "file or a new path")
    assert not detector.calls


def test_bench_synthetic_is_bounded_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    assert bench.main(["--pipeline", f"synthetic:{bench.MAX_SYNTHETIC + 1}", "--torch-weights", str(weights),
                       "--torch-device", "cpu"]) == 2
    line = one_error_line(capsys, "python -m runtime.bench")
    assert f"at most synthetic:{bench.MAX_SYNTHETIC}" in line and "--pipeline DIR" in line
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_bench_torch_device_is_checked_by_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(["--torch-weights", "w.safetensors", "--torch-device", "tpu"])
    assert info.value.code == 2
    assert "argument --torch-device: invalid choice: 'tpu'" in capsys.readouterr().err


@pytest.mark.parametrize("signum, code, line", [(2, 130, "interrupted"), (15, 143, "terminated (SIGTERM)")])
def test_bench_synthetic_folder_is_removed_on_ctrl_c_and_sigterm(signum, code, line, tmp_path):
    """Signalled while it writes its JPEGs (progress on stderr), bench removes the folder and says so in one line."""
    import os
    import time

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")  # never opened: the signal comes while the images are written
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "runtime.bench", "--pipeline", "synthetic:5000", "--torch-weights", str(weights),
         "--torch-device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(scratch)})
    deadline = time.monotonic() + 60
    while not list(scratch.glob("anchortrt-bench-*/*.jpg")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(scratch.glob("anchortrt-bench-*/*.jpg")), "no synthetic image written within 60 s"
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert err.strip().splitlines()[-1] == f"python -m runtime.bench: {line}" and "Traceback" not in err
    assert "writing synthetic images" in err  # the progress line
    assert list(scratch.iterdir()) == []


# ---------------------------------------------------------------- the PyTorch reference and random weights


@pytest.fixture(scope="module")
def tiny_random_weights(tmp_path_factory):
    """A C5 model of one encoder and one decoder layer with random weights, marked so as weights.extract marks them."""
    pytest.importorskip("torch")
    import weights
    from core.config import AnchorDETRConfig
    from weights import naming

    cfg = AnchorDETRConfig(dilation=False, enc_layers=1, dec_layers=1)
    path = tmp_path_factory.mktemp("torch") / "tiny.safetensors"
    weights.save(path, cfg, naming.to_builder(weights.random_state_dict(cfg, 0), cfg), source="random-init",
                 random_init=True)
    return path


def test_infer_cli_runs_the_torch_reference_on_the_cpu(tiny_random_weights, tmp_path, capsys, gpu_probes):
    """--torch-weights --device cpu: the same table, JSON and annotated image, no GPU probe, and one warning line
    that the weights are random."""
    image = tmp_path / "000000000007.jpg"
    solid(400, 40, 0).save(image)  # elongated: the evaluation resize stays small (40x400 -> 133x1333)
    out, results = tmp_path / "annotated", tmp_path / "r.json"
    code = infer.main([str(image), "--torch-weights", str(tiny_random_weights), "--device", "cpu", "--threshold", "0",
                       "--out", str(out), "--json", str(results)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "000000000007.jpg  400x40  100 detections (score >= 0)" in captured.out
    assert "1 image processed, 100 detections" in captured.out
    records = json.loads(results.read_text())
    assert len(records) == 100 and {r["image_id"] for r in records} == {7}
    assert Image.open(out / "000000000007.jpg").size == (400, 40)
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: --torch-weights {tiny_random_weights} holds random weights (weights.extract "
                        "--random-init): its detections mean nothing; extract an official checkpoint for real ones"]
    assert not gpu_probes


def test_infer_cli_torch_arguments_are_checked_first(tmp_path, capsys, gpu_probes, monkeypatch):
    monkeypatch.setattr(infer, "open_reference", lambda *a: pytest.fail("opened the reference"))
    image = tmp_path / "x.jpg"
    solid(64, 48, 0).save(image)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    cases = [
        (["--torch-weights", str(tmp_path / "none.safetensors")], "--torch-weights .*none.safetensors not found: "
                                                                  "extract a checkpoint with `python -m weights.extract"),
        (["--torch-weights", str(tmp_path)], "--torch-weights .* is a folder, not a weights file"),
        (["--torch-weights", str(weights), "--engine", "e.plan"], "--engine is for engines; --torch-weights runs"),
        (["--torch-weights", str(weights), "--weights", str(weights)], "--weights is for engines"),
        (["--torch-weights", str(weights), "--device", "cpu", "--preprocess", "gpu"],
         "with --device cpu use --preprocess cpu"),
        (["--device", "cpu"], "--device applies to --torch-weights only"),
        (["--torch-mode", "fp16"], "--torch-mode applies to --torch-weights only"),
        (["--torch-weights", str(weights), "--json", str(weights)], "--json .*w.safetensors is the --torch-weights"),
    ]
    for extra, pattern in cases:
        assert infer.main([str(image), *extra]) == 2, extra
        assert re.search(pattern, one_error_line(capsys)), extra
    assert not gpu_probes
    with pytest.raises(SystemExit):
        infer.main([str(image), "--torch-weights", str(weights), "--device", "tpu"])
    assert "argument --device: invalid choice: 'tpu'" in capsys.readouterr().err


def test_infer_cli_torch_mode_picks_the_references_forward(tmp_path, capsys, monkeypatch):
    from core.errors import BadInput

    opened = []

    def reference(weights, device, mode):
        opened.append((device, mode))
        raise BadInput("stop here")  # the forward itself is TorchReference's, tested in test_torch_model

    monkeypatch.setattr(infer, "open_reference", reference)
    image = tmp_path / "x.jpg"
    solid(64, 48, 0).save(image)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    base = [str(image), "--torch-weights", str(weights), "--device", "cpu"]
    assert infer.main([*base, "--torch-mode", "compile-fp16"]) == 2 and infer.main(base) == 2
    assert opened == [("cpu", "compile-fp16"), ("cpu", "fp32")]
    with pytest.raises(SystemExit):
        infer.main([*base, "--torch-mode", "int4"])
    assert "argument --torch-mode: invalid choice: 'int4'" in capsys.readouterr().err


def test_random_weights_warning_reads_the_weights_or_the_engine_sidecar(tiny_random_weights, tmp_path, capsys):
    import weights
    from core.sidecar import load_sidecar, write_sidecar

    cfg, tensors = weights.load(tiny_random_weights)
    real = tmp_path / "real.safetensors"
    weights.save(real, cfg, tensors, source="AnchorDETR_r50_c5.pth", source_sha256="ab" * 32)
    assert weights.is_random_init(tiny_random_weights) and not weights.is_random_init(real)
    assert "random_init" not in weights.read_metadata(real)  # a checkpoint's file keeps its old metadata
    engine = write_engine(tmp_path)
    assert "random_init" not in load_sidecar(engine)
    assert not infer.warn_random_weights(real) and not infer.warn_random_weights(engine=engine)
    assert capsys.readouterr().err == ""
    write_sidecar(engine, dict(load_sidecar(engine), random_init=True))
    assert infer.warn_random_weights(engine=engine)
    assert capsys.readouterr().err.startswith(f"warning: engine {engine} holds random weights")
