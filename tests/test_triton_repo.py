"""`python -m serve.triton`: the model repository for Triton's TensorRT backend, from a fake engine + sidecar."""

from __future__ import annotations

import pytest

from core.sidecar import Profile, write_sidecar
from serve import triton

PROFILE = Profile((1, 320, 512), (4, 800, 800), (6, 1344, 1024))
OUTPUTS = {
    "pred_logits": {"dtype": "float32", "shape": [-1, 900, 91]},
    "pred_boxes": {"dtype": "float32", "shape": [-1, 900, 4]},
    "scores": {"dtype": "float32", "shape": [-1, 100]},
    "labels": {"dtype": "int32", "shape": [-1, 100]},
}


def fake_engine(folder, profile=PROFILE, backend="tensorrt"):
    engine = folder / "model.plan"
    engine.write_bytes(b"not really a plan\0")
    write_sidecar(engine, {
        "config": {}, "profile": profile.to_dict(), "precision": "fp16", "plugins": ["msda"], "postprocess": True,
        "backend": backend, "trt_version": "10.13.0", "gpu": None, "weights_sha256": "0" * 64,
        "inputs": {"images": {"dtype": "float32", "shape": [-1, 3, -1, -1]},
                   "masks": {"dtype": "bool", "shape": [-1, -1, -1]}},
        "outputs": OUTPUTS, "version_compatible": False, "anchortrt_version": "0.1.0",
    })  # fmt: skip
    return engine


def test_config_parses_as_triton_model_config(tmp_path, capsys):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc]")
    text_format = pytest.importorskip("google.protobuf.text_format")
    engine = fake_engine(tmp_path)
    repo = tmp_path / "new" / "repo"
    assert triton.main(["--engine", str(engine), "-o", str(repo), "--instances", "2", "--max-queue-delay-us", "500"]) == 0
    model = repo / triton.MODEL_NAME
    assert (model / "1" / "model.plan").read_bytes() == engine.read_bytes()

    config = text_format.Parse((model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == triton.MODEL_NAME and config.platform == "tensorrt_plan"
    assert config.max_batch_size == 6
    DataType = model_config_pb2.DataType
    inputs = {t.name: (DataType.Name(t.data_type), list(t.dims)) for t in config.input}
    assert inputs == {"images": ("TYPE_FP32", [3, -1, -1]), "masks": ("TYPE_BOOL", [-1, -1])}
    outputs = {t.name: (DataType.Name(t.data_type), list(t.dims)) for t in config.output}
    assert outputs == {
        "pred_logits": ("TYPE_FP32", [900, 91]), "pred_boxes": ("TYPE_FP32", [900, 4]),
        "scores": ("TYPE_FP32", [100]), "labels": ("TYPE_INT32", [100]),
    }  # fmt: skip
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    (group,) = config.instance_group
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_fixed_size_profile_gives_fixed_dims(tmp_path):
    text = triton.model_config(
        {"profile": Profile((1, 800, 800), (1, 800, 800), (2, 800, 800)).to_dict(),
         "inputs": {"images": {"dtype": "float32"}, "masks": {"dtype": "bool"}}, "outputs": OUTPUTS}  # fmt: skip
    )
    assert "dims: [3, 800, 800]" in text and "dims: [800, 800]" in text and "max_batch_size: 2" in text


@pytest.mark.parametrize(
    "setup, message",
    [
        ("no_sidecar", "no sidecar"),
        ("rtx", "full TensorRT plans only"),
        ("min_batch", "batch 1"),
        ("no_engine", "not found"),
    ],
)
def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, setup, message):
    engine = fake_engine(tmp_path, profile=Profile((2, 320, 512), (2, 800, 800), (4, 1344, 1344))
                         if setup == "min_batch" else PROFILE, backend="tensorrt-rtx" if setup == "rtx" else "tensorrt")
    if setup == "no_sidecar":
        engine.with_suffix(".json").unlink()
    if setup == "no_engine":
        engine = tmp_path / "missing.plan"
    repo = tmp_path / "repo"
    assert triton.main(["--engine", str(engine), "-o", str(repo)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m serve.triton: error: ") and message in err[0]
    assert not repo.exists()


def test_unwritable_repository_leaves_nothing(tmp_path, capsys):
    engine = fake_engine(tmp_path)
    blocker = tmp_path / "repo"
    blocker.write_text("a file where the repository folder should be")
    assert triton.main(["--engine", str(engine), "-o", str(blocker / "sub")]) == 2
    assert "python -m serve.triton: error: " in capsys.readouterr().err and blocker.read_text().startswith("a file")


def test_version_compatible_engines_get_their_backend_config_and_excluded_lean_runtimes_are_refused(tmp_path, capsys):
    """Triton runs a version-compatible plan's embedded lean runtime only with version-compatible=true, and never
    loads a separate lean runtime, so an --exclude-lean-runtime plan cannot run there."""
    import json

    engine = fake_engine(tmp_path)
    side = engine.with_suffix(".json")
    data = json.loads(side.read_text())
    side.write_text(json.dumps(dict(data, version_compatible=True, lean_runtime_excluded=False)))
    assert triton.main(["--engine", str(engine), "-o", str(tmp_path / "repo")]) == 0
    assert "--backend-config=tensorrt,version-compatible=true" in capsys.readouterr().out
    side.write_text(json.dumps(dict(data, version_compatible=True, lean_runtime_excluded=True)))
    assert triton.main(["--engine", str(engine), "-o", str(tmp_path / "repo2")]) == 2
    assert "--exclude-lean-runtime" in capsys.readouterr().err and not (tmp_path / "repo2").exists()


def test_repository_reports_the_class_names(tmp_path):
    """labels.txt beside config.pbtxt (line k names label k) and the `labels` parameter (core.labels JSON)."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc]")
    text_format = pytest.importorskip("google.protobuf.text_format")
    import json

    from core.sidecar import load_sidecar, write_sidecar

    engine = fake_engine(tmp_path)
    side = load_sidecar(engine)
    side["config"]["num_classes"] = 3
    side["labels"] = {"0": 'a "quoted" cat', "2": "oiseau é"}
    write_sidecar(engine, side)
    model = triton.export(engine, tmp_path / "repo")
    assert (model / triton.LABELS_FILE).read_text(encoding="utf-8").splitlines() == ['a "quoted" cat', "1", "oiseau é"]
    config = text_format.Parse((model / "config.pbtxt").read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    assert json.loads(config.parameters["labels"].string_value) == side["labels"]
