"""`python -m serve.triton`: the model repositories (ensemble, --raw, --torch-weights) from a fake engine + sidecar.

Every config.pbtxt must parse into Triton's ModelConfig protobuf, and the ensemble's wiring must hold together:
each step reads tensors the ensemble has (its inputs or an earlier step's outputs) under names the step's model
declares, with the same type and dims, and the ensemble's outputs are produced. A real tritonserver runs these
repositories in tests/test_triton_ensemble.py.
"""

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
    "boxes": {"dtype": "float32", "shape": [-1, 100, 4]},
}
MODELS = (triton.ENSEMBLE, triton.PRE, triton.MODEL_NAME, triton.POST)


def fake_engine(folder, profile=PROFILE, backend="tensorrt", outputs=OUTPUTS):
    engine = folder / "model.plan"
    engine.write_bytes(b"not really a plan\0")
    write_sidecar(engine, {
        "config": {}, "profile": profile.to_dict(), "precision": "fp16", "plugins": ["msda"], "postprocess": True,
        "backend": backend, "trt_version": "10.13.0", "gpu": None, "weights_sha256": "0" * 64,
        "inputs": {"images": {"dtype": "float32", "shape": [-1, 3, -1, -1]},
                   "masks": {"dtype": "bool", "shape": [-1, -1, -1]}},
        "outputs": outputs, "version_compatible": False, "anchortrt_version": "0.1.0",
    })  # fmt: skip
    return engine


@pytest.fixture(scope="module")
def pb():
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc]")
    text_format = pytest.importorskip("google.protobuf.text_format")
    return model_config_pb2, text_format


def parse(pb, path):
    model_config_pb2, text_format = pb
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def tensors(pb, items):
    DataType = pb[0].DataType
    return {t.name: (DataType.Name(t.data_type), list(t.dims)) for t in items}


def check_wiring(pb, configs):
    """The ensemble's steps in order: every tensor a step reads exists by then with the type and dims its model
    declares, every name a step maps is one of its model's, and the ensemble's outputs are produced."""
    ensemble = configs[triton.ENSEMBLE]
    have = tensors(pb, ensemble.input)
    optional = {t.name for t in ensemble.input if t.optional}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        inputs, outputs = tensors(pb, model.input), tensors(pb, model.output)
        assert set(step.input_map) == set(inputs), step.model_name  # every input fed, none unknown
        for key, value in step.input_map.items():
            assert have[value] == inputs[key], (step.model_name, key)
            assert value not in optional or any(t.name == key and t.optional for t in model.input)
        for key, value in step.output_map.items():
            assert key in outputs, (step.model_name, key)
            assert value not in have, f"{value} produced twice"
            have[value] = outputs[key]
        assert model.max_batch_size == ensemble.max_batch_size
    assert {k: have[k] for k in tensors(pb, ensemble.output)} == tensors(pb, ensemble.output)


def test_ensemble_repository_parses_and_its_steps_connect(tmp_path, pb):
    engine = fake_engine(tmp_path)
    repo = tmp_path / "new" / "repo"
    argv = ["--engine", engine, "-o", repo, "--instances", "2", "--gpus", "0,3", "--max-queue-delay-us", "500",
            "--max-pixels", "1000000", "--no-exif"]
    assert triton.main([str(a) for a in argv]) == 0
    configs = {name: parse(pb, repo / name / "config.pbtxt") for name in MODELS}
    check_wiring(pb, configs)
    ensemble, pre, trt, post = (configs[name] for name in MODELS)
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == 6
    assert tensors(pb, ensemble.input) == {"image": ("TYPE_STRING", [1]), "threshold": ("TYPE_FP32", [1])}
    assert [t.name for t in ensemble.input if t.optional] == ["threshold"]
    assert tensors(pb, ensemble.output) == {  # serve.server's protocol
        "count": ("TYPE_INT32", [1]), "scores": ("TYPE_FP32", [-1]), "labels": ("TYPE_INT32", [-1]),
        "boxes": ("TYPE_FP32", [-1, 4]), "names": ("TYPE_STRING", [-1]), "size": ("TYPE_INT32", [2]),
        "error": ("TYPE_STRING", [1]),
    }  # fmt: skip
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [triton.PRE, triton.MODEL_NAME, triton.POST]
    assert (repo / triton.ENSEMBLE / "1").is_dir()  # Triton wants a version folder, even for an ensemble

    assert trt.platform == "tensorrt_plan"
    assert (repo / triton.MODEL_NAME / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert tensors(pb, trt.input) == {"images": ("TYPE_FP32", [3, -1, -1]), "masks": ("TYPE_BOOL", [-1, -1])}
    assert set(tensors(pb, trt.output)) == set(OUTPUTS)
    Group = pb[0].ModelInstanceGroup
    for config in (pre, trt):
        (group,) = config.instance_group
        assert (group.count, group.kind, list(group.gpus)) == (2, Group.KIND_GPU, [0, 3])
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
    (group,) = post.instance_group
    assert (group.count, group.kind) == (2, Group.KIND_CPU)
    assert pre.backend == post.backend == "python"
    parameters = {k: v.string_value for k, v in pre.parameters.items()}
    assert parameters == {"min_hw": "320x512", "max_hw": "1344x1024", "max_pixels": "1000000", "exif": "false",
                          "decode": "auto"}
    for name, source in ((triton.PRE, "pre.py"), (triton.POST, "post.py")):
        assert (repo / name / "1" / "model.py").read_bytes() == (triton.MODELS_DIR / source).read_bytes()


def test_fixed_size_profile_fixes_the_pre_steps_outputs_too(tmp_path, pb):
    engine = fake_engine(tmp_path, profile=Profile((1, 800, 800), (1, 800, 800), (2, 800, 800)))
    assert triton.main(["--engine", str(engine), "-o", str(tmp_path / "repo")]) == 0
    configs = {name: parse(pb, tmp_path / "repo" / name / "config.pbtxt") for name in MODELS}
    check_wiring(pb, configs)
    assert tensors(pb, configs[triton.PRE].output)["images"] == ("TYPE_FP32", [3, 800, 800])


def test_parameter_values_are_quoted(tmp_path, pb):
    engine = fake_engine(tmp_path)
    env = 'C:\\envs\\"anchortrt".tar.gz'
    assert triton.main(["--engine", str(engine), "-o", str(tmp_path / "repo"), "--execution-env", env]) == 0
    config = parse(pb, tmp_path / "repo" / triton.POST / "config.pbtxt")
    assert config.parameters["EXECUTION_ENV_PATH"].string_value == env


def test_repository_is_byte_for_byte_reproducible(tmp_path):
    engine = fake_engine(tmp_path)
    for repo in ("a", "b"):
        assert triton.main(["--engine", str(engine), "-o", str(tmp_path / repo)]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    assert all((tmp_path / "a" / f).is_dir() or (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
               for f in files)


def test_raw_repository_is_the_engine_alone(tmp_path, pb):
    engine = fake_engine(tmp_path, outputs={k: OUTPUTS[k] for k in ("pred_logits", "pred_boxes")})
    repo = tmp_path / "repo"
    assert triton.main(["--engine", str(engine), "-o", str(repo), "--raw", "--max-batch", "2"]) == 0
    assert sorted(p.name for p in repo.iterdir()) == [triton.MODEL_NAME]
    config = parse(pb, repo / triton.MODEL_NAME / "config.pbtxt")
    assert config.max_batch_size == 2 and not config.instance_group[0].gpus
    assert tensors(pb, config.output) == {"pred_logits": ("TYPE_FP32", [900, 91]),
                                          "pred_boxes": ("TYPE_FP32", [900, 4])}


def test_torch_stand_in_has_the_engine_steps_name_and_io(tmp_path, pb):
    from helpers import save_random_weights, small_config

    weights = save_random_weights(tmp_path / "w.safetensors", small_config("r50_c5"))  # its class names are read
    engine = fake_engine(tmp_path)
    assert triton.main(["--engine", str(engine), "-o", str(tmp_path / "engine"), "--max-batch", "4"]) == 0
    repo = tmp_path / "torch"
    assert triton.main(["--torch-weights", str(weights), "-o", str(repo), "--max-size", "64x96"]) == 0
    configs = {name: parse(pb, repo / name / "config.pbtxt") for name in MODELS}
    check_wiring(pb, configs)
    stand_in = configs[triton.MODEL_NAME]
    real = parse(pb, tmp_path / "engine" / triton.MODEL_NAME / "config.pbtxt")
    assert stand_in.backend == "python" and stand_in.max_batch_size == 4 == real.max_batch_size
    assert tensors(pb, stand_in.input) == tensors(pb, real.input)
    engine_outputs = tensors(pb, real.output)
    assert tensors(pb, stand_in.output) == {k: engine_outputs[k] for k in ("scores", "labels", "boxes")}
    version = repo / triton.MODEL_NAME / "1"
    assert (version / "model.safetensors").read_bytes() == weights.read_bytes()
    assert (version / "model.py").read_bytes() == (triton.MODELS_DIR / "torch_stand_in.py").read_bytes()
    assert all(c.instance_group[0].kind == pb[0].ModelInstanceGroup.KIND_CPU for c in configs.values()
               if c.platform != "ensemble")
    assert {k: v.string_value for k, v in configs[triton.PRE].parameters.items()}["max_hw"] == "64x96"


def test_execution_env_goes_to_every_python_model(tmp_path, pb):
    engine = fake_engine(tmp_path)
    env = "$$TRITON_MODEL_DIRECTORY/../anchortrt-env.tar.gz"
    assert triton.main(["--engine", str(engine), "-o", str(tmp_path / "repo"), "--execution-env", env]) == 0
    for name in (triton.PRE, triton.POST):
        config = parse(pb, tmp_path / "repo" / name / "config.pbtxt")
        assert config.parameters["EXECUTION_ENV_PATH"].string_value == env


@pytest.mark.parametrize("decode", ["auto", "gpu", "cpu"], ids=lambda v: f"decode-{v}")  # not the `gpu` keyword
def test_decode_is_the_pre_steps_parameter_and_its_initialize_reads_it(tmp_path, pb, decode):
    from google.protobuf import json_format

    from core.errors import Unavailable
    from serve.models import steps

    engine = fake_engine(tmp_path)
    argv = ["--engine", str(engine), "-o", str(tmp_path / "repo")] + ([] if decode == "auto" else ["--decode", decode])
    assert triton.main(argv) == 0
    config = parse(pb, tmp_path / "repo" / triton.PRE / "config.pbtxt")
    # The model config as the Python backend hands it to `initialize` (JSON, proto field names).
    params = steps.parameters(json_format.MessageToDict(config, preserving_proto_field_name=True))
    assert params["decode"] == decode
    if decode == "gpu":  # on a CPU instance (no GPU here) the required GPU decoding is refused at load
        with pytest.raises(Unavailable, match="needs a GPU instance"):
            steps.Preprocess.from_parameters(params, None, config.max_batch_size)
    else:
        assert steps.Preprocess.from_parameters(params, None, config.max_batch_size).decoder is None


def test_decode_option_is_runtime_infers():
    from runtime.infer import build_parser

    def option(parser):
        (action,) = [a for a in parser._actions if "--decode" in a.option_strings]
        return action.choices, action.default

    assert option(triton.build_parser()) == option(build_parser()) == (("auto", "gpu", "cpu"), "auto")


def test_fixed_size_profile_gives_fixed_dims():
    text = triton.model_config(
        {"profile": Profile((1, 800, 800), (1, 800, 800), (2, 800, 800)).to_dict(),
         "inputs": {"images": {"dtype": "float32"}, "masks": {"dtype": "bool"}}, "outputs": OUTPUTS}  # fmt: skip
    )
    assert "dims: [3, 800, 800]" in text and "dims: [800, 800]" in text and "max_batch_size: 2" in text


@pytest.mark.parametrize(
    "setup, extra, message",
    [
        ("no_sidecar", [], "no sidecar"),
        ("rtx", [], "full TensorRT plans only"),
        ("min_batch", [], "batch 1"),
        ("no_engine", [], "not found"),
        ("no_top_k", [], "--postprocess"),
        ("engine", ["--max-batch", "7"], "exceeds the engine profile's maximum batch 6"),
        ("engine", ["--serve"], "--serve needs --torch-weights"),
        ("engine", ["--max-size", "64x96"], "--torch-weights only"),
        ("torch", ["--raw"], "--raw writes the engine's own model"),
        ("torch", ["--gpus", "0"], "--gpus places GPU instances"),
        ("torch", ["--decode", "gpu"], "--decode gpu needs GPU instances of anchor_detr_pre"),
        ("torch", ["--max-size", "16x96"], "at least 32"),
        ("torch_missing", [], "--torch-weights"),
        ("torch", ["--serve", "--http-port", "8001"], "must differ"),
    ],
)
def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, setup, extra, message):
    engine = fake_engine(tmp_path, profile=Profile((2, 320, 512), (2, 800, 800), (4, 1344, 1344))
                         if setup == "min_batch" else PROFILE, backend="tensorrt-rtx" if setup == "rtx" else "tensorrt",
                         outputs={"pred_logits": OUTPUTS["pred_logits"]} if setup == "no_top_k" else OUTPUTS)
    if setup == "no_sidecar":
        engine.with_suffix(".json").unlink()
    model = ["--engine", str(tmp_path / "missing.plan" if setup == "no_engine" else engine)]
    if setup.startswith("torch"):
        weights = tmp_path / "w.safetensors"
        if setup == "torch":
            weights.write_bytes(b"weights")
        model = ["--torch-weights", str(weights)]
    repo = tmp_path / "repo"
    assert triton.main([*model, "-o", str(repo), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m serve.triton: error: ") and message in err[0], err
    assert not repo.exists()


def test_gpu_list_parses_indices_from_zero():
    from core.cli import gpu_list

    assert gpu_list("0,1,3") == [0, 1, 3]
    for bad in ("-1", "0,0", "a", ""):
        with pytest.raises(Exception, match="GPU indices"):
            gpu_list(bad)


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
    assert triton.main(["--engine", str(engine), "-o", str(tmp_path / "repo")]) == 0
    model = tmp_path / "repo" / triton.MODEL_NAME
    assert (model / triton.LABELS_FILE).read_text(encoding="utf-8").splitlines() == ['a "quoted" cat', "1", "oiseau é"]
    for name in (triton.MODEL_NAME, triton.POST):  # the engine step reports them, the post step answers them
        path = tmp_path / "repo" / name / "config.pbtxt"
        config = text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
        assert json.loads(config.parameters["labels"].string_value) == side["labels"]


def test_kubernetes_manifest_serves_the_repository_one_pod_per_gpu_node():
    yaml = pytest.importorskip("yaml", reason="needs PyYAML: pip install -e '.[test]'")
    root = triton.MODELS_DIR.parents[1]
    deployment, service = yaml.safe_load_all((root / "deploy" / "anchor-detr-triton.yaml").read_text())
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]["spec"]
    (rule,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert rule["topologyKey"] == "kubernetes.io/hostname"
    assert rule["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = pod["containers"]
    assert "--model-repository=/models" in container["args"] and container["resources"]["limits"]["nvidia.com/gpu"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["metrics"] == 8002
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    # Triton's exit timeout fits in the grace period, after the preStop pause
    exit_timeout = int(next(a for a in container["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert exit_timeout + pause < pod["terminationGracePeriodSeconds"]


def test_dockerfile_installs_every_package_the_python_steps_import():
    import tomllib

    root = triton.MODELS_DIR.parents[1]
    copied = {line.split()[1] for line in (root / "deploy" / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ") and line.split()[-1].startswith("/opt/anchortrt")}
    packages = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} <= copied and "pyproject.toml" in copied
