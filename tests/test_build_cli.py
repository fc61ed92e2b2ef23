"""netdef.build and core.sidecar: network creation, the build with its progress monitor, the CLI's errors and
exit codes, the engine + sidecar it writes, and the checks the runtime makes with the sidecar.

Builds use whichever TensorRT backend is installed (TensorRT-RTX on CI, which builds without a GPU). Fast
tests use a tiny network made with the functional layer or a shallow AnchorDETR (1 encoder, 1 decoder layer);
the full R50-DC5 FP32/FP16 builds at the default profile are marked slow.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from netdef import build
from core.backend import BackendError, get_backend
from netdef.build import (
    PLUGIN_NAMES, BuildError, _creation_flags, build_serialized, check_plugins, describe_io, main, make_logger,
    make_progress_monitor, parse_plugins,
)
from core.progress import ProgressBar
from core.sidecar import (
    SIDECAR_KEYS, Profile, ProfileError, SidecarError, check_sidecar, load_sidecar, sidecar_path, write_atomic,
    write_sidecar,
)

from helpers import SMALL_PROFILE, raises_unless, run_cli, run_main, save_random_weights


@pytest.fixture(scope="module")
def backend():
    try:
        return get_backend()
    except BackendError as e:
        pytest.skip(str(e))


def tiny_network(backend):
    """images (B,3,H,W) -> conv -> relu -> `features`, masks (B,H,W) bool -> not -> `valid`: our I/O names and
    dtypes, a few layers, built in well under a second."""
    from netdef.functional import Net

    trt = backend.trt
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_creation_flags(backend))
    net = Net(trt, network)
    images = net.input("images", trt.float32, (-1, 3, -1, -1))
    masks = net.input("masks", trt.bool, (-1, -1, -1))
    rng = np.random.default_rng(0)
    x = net.conv2d(images, rng.standard_normal((8, 3, 3, 3), np.float32), np.zeros(8, np.float32), "conv", padding=1)
    net.output(net.relu(x, "relu"), "features")
    net.output(net.logical_not(masks, "not_mask"), "valid")
    config = builder.create_builder_config()
    prof = builder.create_optimization_profile()
    prof.set_shape("images", (1, 3, 32, 32), (1, 3, 64, 64), (2, 3, 96, 96))
    prof.set_shape("masks", (1, 32, 32), (1, 64, 64), (2, 96, 96))
    config.add_optimization_profile(prof)
    return builder, network, config, logger, net.keepalive


# ---------------------------------------------------------------- profile, plugins


def test_profile_defaults_and_round_trip():
    p = Profile().validate()
    assert (p.min, p.opt, p.max) == ((1, 320, 512), (1, 800, 800), (8, 1344, 1344))
    assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.parametrize("profile, problem", [
    (Profile((0, 320, 320), (1, 320, 320), (1, 320, 320)), "min batch 0 < 1"),
    (Profile((1, 16, 320), (1, 320, 320), (1, 320, 320)), "min size 16x320 is below 32x32"),
    (Profile((1, 320, 320), (1, 800, 800), (1, 640, 1344)), "height needs min <= opt <= max, got 320, 800, 640"),
    (Profile((4, 320, 320), (2, 320, 320), (8, 320, 320)), "batch needs min <= opt <= max, got 4, 2, 8"),
])
def test_bad_profiles_name_the_problem(profile, problem):
    with pytest.raises(ProfileError, match="bad optimization profile") as e:
        profile.validate()
    assert problem in str(e.value)


def test_parse_plugins():
    assert parse_plugins("all") == frozenset(PLUGIN_NAMES)
    assert parse_plugins("none") == frozenset()
    assert parse_plugins("layer_norm, masked_softmax") == {"layer_norm", "masked_softmax"}
    with pytest.raises(ValueError, match="unknown plugin.*layernorm"):
        parse_plugins("layernorm")


def test_plugins_on_a_backend_without_plugin_layers_name_the_backend(backend):
    check_plugins(backend, frozenset())
    if backend.plugin_problem() is None:
        check_plugins(backend, frozenset(PLUGIN_NAMES))
    else:
        with pytest.raises(BackendError, match=f"{backend.name} .*has no plugin layers.*--plugins none"):
            check_plugins(backend, frozenset({"layer_norm"}))


# ---------------------------------------------------------------- the build itself


def test_progress_monitor_drives_the_bar_through_nested_phases(backend):
    if not hasattr(backend.trt, "IProgressMonitor"):
        pytest.skip(f"{backend.name} {backend.version} has no IProgressMonitor")
    builder, network, config, logger, keep = tiny_network(backend)
    log = io.StringIO()
    bar = ProgressBar(1.0, "building engine", stream=log)
    monitor = make_progress_monitor(backend.trt, bar)
    config.progress_monitor = monitor
    seen = []
    original = bar.set

    def record(done, status=None):
        seen.append((done, status))
        original(done, status)

    bar.set = record
    with bar:
        plan = build_serialized(builder, network, config, logger)
    assert plan is not None and plan.nbytes > 0
    assert monitor.stack == []  # every phase that started also finished
    # Phase names and their nesting differ between TensorRT versions ("may change", says its documentation):
    # only the shape of the events is asserted.
    check_nesting(monitor.events)
    assert monitor.max_depth >= 2  # nested phases were seen
    fractions = [f for f, _ in seen]
    assert all(0 <= f <= 1 for f in fractions) and fractions[-1] == 1.0 == bar.done  # the bar ends full
    assert "building engine" in log.getvalue()


def check_nesting(events) -> None:
    """Every phase finishes, after its children; a child starts while its parent is open."""
    open_phases: list[str] = []
    for kind, name, parent in events:
        if kind == "start":
            assert parent is None or parent in open_phases, f"{name} started outside its parent {parent}"
            open_phases.append(name)
        else:
            assert open_phases and open_phases[-1] == name, f"{name} finished before its children"
            open_phases.pop()
    assert open_phases == []


def test_monitor_on_a_fake_phase_sequence_is_monotone_and_ends_full():
    """The nesting TensorRT-RTX shows (a long last step with no tick included), without a build."""
    import types

    bar = ProgressBar(1.0, "building engine", stream=io.StringIO())
    seen = []
    original = bar.set
    bar.set = lambda done, status=None: (seen.append((done, status)), original(done, status))
    monitor = make_progress_monitor(types.SimpleNamespace(IProgressMonitor=object), bar)
    monitor.phase_start("outer", None, 3)
    monitor.step_complete("outer", 0)
    monitor.phase_start("inner", "outer", 4)
    for step in range(4):
        assert monitor.step_complete("inner", step)
    monitor.phase_finish("inner")
    monitor.step_complete("outer", 1)
    monitor.phase_start("last", "outer", 2)  # finishes without reporting its steps
    time.sleep(0.05)  # the long phase without a step: the bar stands still, the summary names it
    monitor.phase_finish("last")
    monitor.phase_finish("outer")  # outer's last step is never reported either
    check_nesting(monitor.events)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 == bar.done
    assert ("inner" in {s for _, s in seen}) and seen[-1][1] == "done"
    assert monitor.max_depth == 2
    assert set(monitor.seconds) == {"outer", "inner", "last"}
    name, seconds = build.slowest_phase(monitor)
    assert name == "last" and seconds >= 0.05 and sum(monitor.seconds.values()) < 1


def test_cancelled_build_is_interrupted_exit_130(backend):
    if not hasattr(backend.trt, "IProgressMonitor"):
        pytest.skip(f"{backend.name} {backend.version} has no IProgressMonitor")
    builder, network, config, logger, keep = tiny_network(backend)
    monitor = make_progress_monitor(backend.trt, ProgressBar(1.0, stream=io.StringIO()))
    monitor.cancelled = True  # as after Ctrl-C: the first step_complete answers False
    config.progress_monitor = monitor
    with pytest.raises(build.BuildInterrupted, match="build cancelled, nothing written") as info:
        build_serialized(builder, network, config, logger)
    assert info.value.exit_code == 130


def test_failed_build_reports_tensorrt_errors(backend):
    builder, network, config, logger, keep = tiny_network(backend)
    config2 = builder.create_builder_config()  # no optimization profile for the dynamic inputs
    with pytest.raises(BuildError, match="TensorRT could not build the engine: .+"):
        build_serialized(builder, network, config2, logger)
    assert logger.errors


def test_too_small_workspace_says_what_to_change(backend):
    if backend.name != "tensorrt-rtx":
        pytest.skip("TensorRT-RTX behaviour: full TensorRT has workspace-free tactics for a conv + relu")
    builder, network, config, logger, keep = tiny_network(backend)
    config.set_memory_pool_limit(backend.trt.MemoryPoolType.WORKSPACE, 1024)
    with pytest.raises(BuildError, match=r"raise --workspace, or lower --max/--batch"):
        build_serialized(builder, network, config, logger)


def test_describe_io_lists_names_dtypes_and_dynamic_shapes(backend):
    _, network, *_ = tiny_network(backend)
    inputs, outputs = describe_io(backend.trt, network)
    assert inputs == {"images": {"dtype": "float32", "shape": [-1, 3, -1, -1]},
                      "masks": {"dtype": "bool", "shape": [-1, -1, -1]}}
    assert outputs == {"features": {"dtype": "float32", "shape": [-1, 8, -1, -1]},
                       "valid": {"dtype": "bool", "shape": [-1, -1, -1]}}


# ---------------------------------------------------------------- sidecar


def make_sidecar(**changes):
    side = {
        "config": {"backbone": "resnet50"}, "profile": Profile().to_dict(), "precision": "fp16", "plugins": [],
        "postprocess": False, "backend": "tensorrt", "trt_version": "10.13.0.35",
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}, "weights_sha256": "ab" * 32,
        "inputs": {}, "outputs": {}, "version_compatible": False, "lean_runtime_excluded": False,
        "anchortrt_version": "0.1.0",
    }
    side.update(changes)
    return side


def test_the_sidecar_dataclass_is_the_sidecars_fields():
    """core.sidecar.Sidecar owns the fields: one per key, written in SIDECAR_KEYS order; the optional random_init
    only when true."""
    import dataclasses

    from core.sidecar import Sidecar

    assert sorted(f.name for f in dataclasses.fields(Sidecar)) == sorted((*SIDECAR_KEYS, "labels", "random_init"))
    assert list(Sidecar(**make_sidecar()).to_dict()) == list(SIDECAR_KEYS)
    assert list(Sidecar(**make_sidecar(), labels={"0": "cat"}, random_init=True).to_dict()) == [
        *SIDECAR_KEYS, "labels", "random_init"]


def test_sidecar_written_atomically_next_to_the_engine_and_loaded_back(tmp_path):
    engine = tmp_path / "model.plan"
    assert sidecar_path(engine) == tmp_path / "model.json"
    path = write_sidecar(engine, make_sidecar())
    assert list(json.loads(path.read_text())) == list(SIDECAR_KEYS)
    assert load_sidecar(engine) == make_sidecar() == load_sidecar(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]  # no temporary left behind
    with pytest.raises(SidecarError, match="sidecar's name"):
        sidecar_path(tmp_path / "model.json.json")


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "engine.plan"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):  # fails in the middle of writing, after the temporary file exists
        write_atomic(target, "text, not bytes")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["engine.plan"]


def test_load_sidecar_errors_say_how_to_fix(tmp_path):
    with pytest.raises(SidecarError, match=r"no sidecar .*model\.json.*python -m netdef.build"):
        load_sidecar(tmp_path / "model.plan")
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(SidecarError, match="unreadable"):
        load_sidecar(tmp_path / "model.plan")
    (tmp_path / "model.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(SidecarError, match="lacks profile, precision"):
        load_sidecar(tmp_path / "model.plan")


def test_check_sidecar_accepts_the_matching_machine():
    check_sidecar(make_sidecar(), trt_version="10.13.0.35", compute_capability=(9, 0), weights_sha256="ab" * 32)
    check_sidecar(make_sidecar(), trt_version="10.13.0.35", compute_capability="9.0", backend="tensorrt")


@pytest.mark.parametrize("kwargs, message", [
    ({"trt_version": "10.14.1.48"}, "built by TensorRT 10.13.0.35, this is TensorRT 10.14.1.48"),
    ({"compute_capability": (8, 9)}, "built for NVIDIA H100 80GB HBM3 (compute capability 9.0), this GPU is 8.9"),
    ({"weights_sha256": "cd" * 32}, "weights sha256 ababababab"),
    ({"backend": "tensorrt-rtx"}, "built with tensorrt, but this runtime uses tensorrt-rtx"),
])
def test_check_sidecar_refuses_each_mismatch(kwargs, message):
    args = {"trt_version": "10.13.0.35", "compute_capability": "9.0", **kwargs}
    with pytest.raises(SidecarError, match="engine does not match") as e:
        check_sidecar(make_sidecar(), **args)
    assert message in str(e.value) and "python -m netdef.build" in str(e.value)


def test_check_sidecar_lists_every_mismatch_at_once():
    with pytest.raises(SidecarError) as e:
        check_sidecar(make_sidecar(), trt_version="11.4.0", compute_capability="8.0", weights_sha256="00" * 32)
    assert str(e.value).count(";") >= 3


def test_rtx_and_gpu_less_engines_skip_the_compute_capability_check():
    # TensorRT-RTX compiles kernels for the running GPU, and an ahead-of-time build records no GPU.
    check_sidecar(make_sidecar(backend="tensorrt-rtx"), trt_version="10.13.0.35", compute_capability="8.9")
    check_sidecar(make_sidecar(gpu=None), trt_version="10.13.0.35", compute_capability="8.9")


# ---------------------------------------------------------------- command line: errors before any build


def test_missing_weights_says_how_to_make_them(tmp_path, capsys):
    code, out, err = run_main(["--weights", tmp_path / "w.safetensors"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert "python -m weights.extract CKPT.pth -o" in err
    assert "python -m weights.extract --random-init r50_dc5 -o" in err


def test_a_folder_as_weights_says_it_is_a_folder(tmp_path, capsys):
    """Not "not found, extract ... -o FOLDER", which would fail again: what is there, and what is expected."""
    code, out, err = run_main(["--weights", tmp_path], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"--weights {tmp_path} is a folder, not a weights file: name the .safetensors file" in err
    assert "not found" not in err and f"-o {tmp_path}" not in err


@pytest.mark.parametrize("argv, message", [
    (["--min", "800x800", "--opt", "640x640"], "height needs min <= opt <= max"),
    (["--batch", "2,1,8"], "batch needs min <= opt <= max"),
    (["--min", "16x512"], "below 32x32"),
])
def test_bad_profile_is_exit_2_with_one_line(argv, message, tmp_path, capsys):
    code, out, err = run_main(argv + ["--weights", tmp_path / "missing"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["--min", "800"], ["--min", "0x800"], ["--batch", "1,8"], ["--plugins", "foo"],
                                  ["--workspace", "0"]])
def test_malformed_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "python -m netdef.build: error: argument" in capsys.readouterr().err


@pytest.mark.parametrize("cli", ["netdef.build", "reference.check"])
def test_unavailable_backend_is_exit_3_naming_the_extra(cli, tmp_path, capsys):
    import importlib

    try:
        get_backend("tensorrt")
        pytest.skip("full TensorRT is installed")
    except BackendError:
        pass
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    code, out, err = run_cli(importlib.import_module(cli).main, ["--weights", weights, "--backend", "tensorrt"], capsys)
    assert code == 3 and err.startswith(f"python -m {cli}: error:") and "pip install 'anchortrt[trt]'" in err


def test_plugins_without_plugin_layers_is_exit_3(backend, tmp_path, capsys):
    if backend.plugin_problem() is None:
        pytest.skip(f"{backend.name} has plugin layers")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    code, out, err = run_main(["--weights", weights, "--plugins", "all", "--backend", backend.name], capsys)
    assert code == 3 and backend.name in err and "--plugins none" in err


# ---------------------------------------------------------------- command line: whole builds


@pytest.fixture(scope="module")
def shallow_weights(tmp_path_factory, backend):
    from core.config import AnchorDETRConfig

    cfg = AnchorDETRConfig(enc_layers=1, dec_layers=1)
    return save_random_weights(tmp_path_factory.mktemp("weights") / "shallow.safetensors", cfg)


def expected_io(postprocess: bool) -> tuple[dict, dict]:
    inputs = {"images": {"dtype": "float32", "shape": [-1, 3, -1, -1]},
              "masks": {"dtype": "bool", "shape": [-1, -1, -1]}}
    outputs = {"pred_logits": {"dtype": "float32", "shape": [-1, 900, 91]},
               "pred_boxes": {"dtype": "float32", "shape": [-1, 900, 4]}}
    if postprocess:
        outputs.update(scores={"dtype": "float32", "shape": [-1, 100]},
                       labels={"dtype": "int32", "shape": [-1, 100]},
                       boxes={"dtype": "float32", "shape": [-1, 100, 4]})
    return inputs, outputs


def check_build_output(engine: Path, summary: dict, weights_path: Path, backend, *, precision: str,
                       profile: dict, postprocess: bool = True) -> dict:
    """The engine, its sidecar and the JSON summary agree with what was asked for; returns the sidecar."""
    from importlib import metadata

    import weights

    cfg, _ = weights.load(weights_path)
    side = load_sidecar(engine)
    inputs, outputs = expected_io(postprocess)
    assert side == {
        "config": json.loads(cfg.to_json()), "profile": profile, "precision": precision, "plugins": [],
        "postprocess": postprocess, "backend": backend.name, "trt_version": backend.version, "gpu": build.gpu_entry(),
        "weights_sha256": weights.file_sha256(weights_path), "inputs": inputs, "outputs": outputs,
        "version_compatible": False, "lean_runtime_excluded": False, "anchortrt_version": metadata.version("anchortrt"),
        "labels": {str(k): v for k, v in weights.class_names(weights_path).items()},  # core.labels, from the weights
    }
    assert summary["engine"] == str(engine) and summary["engine_bytes"] == engine.stat().st_size
    assert summary["precision"] == precision and summary["profile"] == profile
    assert summary["layers"] > 200 and summary["build_seconds"] > 0
    if summary.get("slowest_phase") is not None:  # a backend with a progress monitor names where the time went
        assert 0 < summary["slowest_phase"]["seconds"] <= summary["build_seconds"]
    # No temporary files and, on TensorRT-RTX, no timing cache (a no-op there).
    expected = {engine.name, engine.with_suffix(".json").name}
    if backend.name == "tensorrt":
        expected.add(engine.with_suffix(".timing.cache").name)
    assert {p.name for p in engine.parent.iterdir()} == expected
    return side


def test_shallow_fp32_build_writes_engine_and_sidecar(shallow_weights, backend, tmp_path, capsys):
    engine = tmp_path / "shallow_fp32.plan"
    code, out, err = run_main(["--weights", shallow_weights, "-o", engine, "--json", *SMALL_PROFILE], capsys)
    assert code == 0, err
    summary = json.loads(out)
    check_build_output(engine, summary, shallow_weights, backend, precision="fp32",
                       profile={"min": [1, 64, 64], "opt": [1, 96, 128], "max": [2, 128, 160]})
    # Most of the engine is the weights: ~27M float32 parameters in a shallow R50 model (a lower bound, which any
    # backend meets).
    assert summary["engine_bytes"] > 80e6
    assert "building engine" in err  # the progress went to stderr


@pytest.fixture
def no_build(monkeypatch):
    """Fails the test if netdef.build gets as far as defining the network."""
    def refuse(*args, **kwargs):
        raise AssertionError("netdef.build defined the network before refusing its input")

    monkeypatch.setattr(build, "create_network", refuse)


def full_trt_named(backend, monkeypatch):
    """netdef.build sees the installed backend under the name "tensorrt" (the paths only full TensorRT writes)."""
    from core.backend import Backend

    monkeypatch.setattr(build, "get_backend", lambda name=None: Backend("tensorrt", backend.trt))


@pytest.mark.parametrize("what", ["engine", "sidecar", "timing cache"])
def test_unwritable_output_paths_are_exit_2_before_building(what, shallow_weights, backend, tmp_path, capsys,
                                                              monkeypatch, no_build):
    engine = tmp_path / "out" / "e.plan"
    blocked = {"engine": engine, "sidecar": engine.with_suffix(".json"),
               "timing cache": engine.with_suffix(".timing.cache")}[what]
    blocked.mkdir(parents=True)  # a folder where the file should go
    if what == "timing cache":
        full_trt_named(backend, monkeypatch)
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run_main(["--weights", shallow_weights, "-o", engine, *SMALL_PROFILE], capsys)
    assert code == 2 and err.startswith(f"python -m netdef.build: error: {what} {blocked} is a folder") and err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("what", ["engine", "sidecar", "timing cache"])
def test_outputs_that_are_the_weights_are_exit_2_before_building(what, shallow_weights, backend, tmp_path, capsys,
                                                                monkeypatch, no_build):
    """-o W.safetensors (or a link to it, or a sidecar or timing cache that lands on it) would replace the weights."""
    link = tmp_path / "w.safetensors"
    link.symlink_to(shallow_weights)
    before = shallow_weights.read_bytes()
    if what == "timing cache":
        full_trt_named(backend, monkeypatch)
        extra = ["-o", tmp_path / "e.plan", "--timing-cache", link]
    else:
        extra = ["-o", link.with_suffix(".plan") if what == "sidecar" else link]
        if what == "sidecar":
            (tmp_path / "w.json").symlink_to(shallow_weights)  # where the sidecar of w.plan goes
    code, out, err = run_main(["--weights", shallow_weights, *extra, *SMALL_PROFILE], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"python -m netdef.build: error: {what} ") and "is the --weights" in err
    assert shallow_weights.read_bytes() == before
    assert not list(tmp_path.glob("*.plan"))


def test_output_under_a_file_is_exit_2_before_building(shallow_weights, tmp_path, capsys, no_build):
    blocker = tmp_path / "engines"
    blocker.write_text("a file where the engine folder should be")
    code, out, err = run_main(["--weights", shallow_weights, "-o", blocker / "e.plan", *SMALL_PROFILE], capsys)
    assert code == 2 and "is not a folder" in err and err.count("\n") == 1


def test_failed_build_leaves_no_engines_folder(shallow_weights, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def fail_build(*args):
        raise BuildError("TensorRT could not build the engine: stand-in")

    monkeypatch.setattr(build, "build_serialized", fail_build)
    code, out, err = run_main(["--weights", shallow_weights, *SMALL_PROFILE], capsys)
    assert code == 1 and "stand-in" in err
    assert not (tmp_path / "engines").exists()


def test_profile_beyond_int32_indexing_is_exit_2_before_building(shallow_weights, capsys, no_build):
    code, out, err = run_main(["--weights", shallow_weights, "--max", "1344x1344", "--batch", "1,1,16"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "16x1344x1344" in err and "int32" in err and "lower --max or the max of --batch" in err
    # the bound is the largest activation, not the batch alone: batch 16 of small images is fine
    from core.config import AnchorDETRConfig

    assert build.largest_activation(AnchorDETRConfig(), Profile(max=(16, 640, 640)))[0] < build.MAX_ACTIVATION_ELEMENTS
    assert build.largest_activation(AnchorDETRConfig(), Profile())[0] < build.MAX_ACTIVATION_ELEMENTS


def test_an_engine_of_random_weights_says_so_in_its_sidecar(shallow_weights, tmp_path, capsys, monkeypatch):
    """weights.extract --random-init marks the weights; the engine's sidecar carries the mark for the runtime."""
    import weights

    cfg, tensors = weights.load(shallow_weights)
    marked = tmp_path / "random.safetensors"
    weights.save(marked, cfg, tensors, source="random-init", random_init=True)
    monkeypatch.setattr(build, "build_serialized", lambda *a: memoryview(b"plan"))  # the sidecar is the point
    for source, flag in ((marked, True), (shallow_weights, None)):
        engine = tmp_path / f"{source.stem}.plan"
        code, out, err = run_main(["--weights", source, "-o", engine, *SMALL_PROFILE], capsys)
        assert code == 0, err
        assert json.loads(engine.with_suffix(".json").read_text()).get("random_init") is flag


def test_profile_warnings_fail_the_build_with_exit_2(shallow_weights, tmp_path, capsys, monkeypatch):
    real = build.create_network

    def warn(backend, cfg, tensors, *, logger, **kwargs):
        made = real(backend, cfg, tensors, logger=logger, **kwargs)
        logger.log(backend.trt.ILogger.Severity.WARNING, "Optimization profile 0 is not self-consistent (stand-in)")
        return made

    monkeypatch.setattr(build, "create_network", warn)
    monkeypatch.setattr(build, "build_serialized", lambda *a: pytest.fail("built despite the profile warning"))
    code, out, err = run_main(["--weights", shallow_weights, "-o", tmp_path / "e.plan", *SMALL_PROFILE], capsys)
    last = err.splitlines()[-1]
    assert code == 2 and err.count("python -m netdef.build: error:") == 1 and last.startswith("python -m netdef.build: error:")
    assert "not self-consistent (stand-in)" in last and "fix --min/--opt/--max" in last
    assert list(tmp_path.iterdir()) == []


def test_profile_tensorrt_refuses_is_a_profile_error(backend, shallow_weights):
    """add_optimization_profile answers -1 for an invalid profile (here one that skips our own validation)."""
    import weights

    class Unchecked(Profile):
        def validate(self):
            return self

    cfg, tensors = weights.load(shallow_weights)
    with pytest.raises(ProfileError, match="TensorRT refused the optimization profile.*MIN<=OPT<=MAX"):
        build.create_network(backend, cfg, tensors, profile=Unchecked((2, 64, 64), (1, 64, 64), (1, 64, 64)))


def test_shallow_fp16_build_with_postprocess_and_summary_table(shallow_weights, backend, tmp_path, capsys):
    engine = tmp_path / "shallow_fp16.plan"
    code, out, err = run_main(["--weights", shallow_weights, "-o", engine, "--fp16", "--postprocess",
                               *SMALL_PROFILE], capsys)
    assert code == 0, err
    lines = out.splitlines()
    col = lines[0].index("value")
    table = {line[:col].strip(): line[col:].strip() for line in lines[2:]}
    assert table["precision"] == "fp16" and table["postprocess"] == "in engine (top-100)"
    assert table["profile (BxHxW)"] == "min 1x64x64  opt 1x96x128  max 2x128x160"
    assert table["engine size"].endswith("MiB")
    summary = {"engine": str(engine), "engine_bytes": engine.stat().st_size, "precision": "fp16",
               "profile": {"min": [1, 64, 64], "opt": [1, 96, 128], "max": [2, 128, 160]},
               "layers": int(table["network layers"]), "build_seconds": 1}
    check_build_output(engine, summary, shallow_weights, backend, precision="fp16", profile=summary["profile"],
                       postprocess=True)
    if backend.name == "tensorrt-rtx":  # bounds measured on TensorRT-RTX; full TensorRT adds its own kernels
        assert 40e6 < summary["engine_bytes"] < 80e6  # fp16 weights: half the fp32 engine


@pytest.mark.trt
def test_timing_cache_is_written_and_reused(shallow_weights, tmp_path, capsys):
    cache = tmp_path / "shared.cache"
    argv = ["--weights", shallow_weights, "--backend", "tensorrt", "--timing-cache", cache, "--json", *SMALL_PROFILE]
    assert run_main(argv + ["-o", tmp_path / "a.plan"], capsys)[0] == 0
    first = cache.read_bytes()
    assert len(first) > 0
    code, out, err = run_main(argv + ["-o", tmp_path / "b.plan"], capsys)
    assert code == 0 and len(cache.read_bytes()) >= len(first)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_full_r50_dc5_builds_at_the_default_profile(precision, backend, tmp_path_factory, capsys):
    """The CI promise: the released architecture, FP32 and FP16, full dynamic profile, on this machine."""
    from core.config import AnchorDETRConfig

    folder = tmp_path_factory.getbasetemp() / "r50_dc5_weights"
    weights_path = folder / "r50_dc5.safetensors"
    if not weights_path.exists():  # shared by both precisions
        folder.mkdir(exist_ok=True)
        save_random_weights(weights_path, AnchorDETRConfig.from_variant("r50_dc5"))
    engine = tmp_path_factory.mktemp(f"engine_{precision}") / f"anchor_detr_r50_dc5_{precision}.plan"
    argv = ["--weights", weights_path, "-o", engine, "--json"] + (["--fp16"] if precision == "fp16" else [])
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    summary = json.loads(out)
    check_build_output(engine, summary, weights_path, backend, precision=precision, profile=Profile().to_dict())
    params = 37e6  # R50-DC5 AnchorDETR, BN folded
    bytes_per = 4 if precision == "fp32" else 2
    assert 0.9 * params * bytes_per < summary["engine_bytes"]
    if backend.name == "tensorrt-rtx":  # the upper bound was measured on TensorRT-RTX
        assert summary["engine_bytes"] < 2 * params * bytes_per


# ---------------------------------------------------------------- precision and builder flags (no real build)


@pytest.fixture
def stub_build(monkeypatch):
    """netdef.build runs for real up to the build, which returns a stand-in plan: the builder config it would
    have built with is kept in ``configs``."""
    configs = []

    def fake(builder, network, config, logger=None):
        configs.append(config)
        return memoryview(b"stand-in plan")

    monkeypatch.setattr(build, "build_serialized", fake)
    return configs


@pytest.mark.parametrize("flag, precision", [([], "fp32"), (["--tf32"], "tf32"), (["--fp16"], "fp16")])
def test_precision_sets_tf32_and_names_the_engine(flag, precision, backend, shallow_weights, tmp_path, capsys,
                                                   monkeypatch, stub_build):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["--weights", shallow_weights, "--json", *flag, *SMALL_PROFILE], capsys)
    assert code == 0, err
    summary = json.loads(out)
    engine = Path("engines") / f"anchor_detr_r50_dc5_{precision}.plan"
    assert summary["precision"] == precision and summary["engine"] == str(engine)
    assert load_sidecar(engine)["precision"] == precision
    # Full TensorRT turns TF32 on by default: only --tf32 may leave it on.
    assert stub_build[0].get_flag(backend.trt.BuilderFlag.TF32) == (precision == "tf32")


def test_tf32_and_fp16_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--tf32", "--fp16"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("gpu_bytes, expected_mib", [(None, build.DEFAULT_WORKSPACE_MIB), (4 << 30, 4096),
                                                     (80 << 30, build.DEFAULT_WORKSPACE_MIB)])
def test_workspace_is_capped_at_the_gpu_memory(gpu_bytes, expected_mib, backend, shallow_weights, tmp_path, capsys,
                                               monkeypatch, stub_build):
    monkeypatch.setattr(build, "gpu_total_memory", lambda: gpu_bytes)
    code, out, err = run_main(["--weights", shallow_weights, "-o", tmp_path / "e.plan", *SMALL_PROFILE], capsys)
    assert code == 0, err
    assert stub_build[0].get_memory_pool_limit(backend.trt.MemoryPoolType.WORKSPACE) == expected_mib << 20


@pytest.mark.parametrize("option, excluded", [("--version-compatible", False), ("--exclude-lean-runtime", True)])
def test_version_compatible_embeds_or_excludes_the_lean_runtime(option, excluded, backend, shallow_weights, tmp_path,
                                                                capsys, monkeypatch, stub_build):
    full_trt_named(backend, monkeypatch)  # the flags exist in TensorRT-RTX too; only the name is checked
    monkeypatch.setattr(build, "load_timing_cache", lambda config, path: None)
    monkeypatch.setattr(build, "save_timing_cache", lambda config, path: None)
    engine = tmp_path / "vc.plan"
    code, out, err = run_main(["--weights", shallow_weights, "-o", engine, option, *SMALL_PROFILE], capsys)
    assert code == 0, err
    flags = backend.trt.BuilderFlag
    assert stub_build[0].get_flag(flags.VERSION_COMPATIBLE)
    assert stub_build[0].get_flag(flags.EXCLUDE_LEAN_RUNTIME) is excluded
    side = load_sidecar(engine)
    assert side["version_compatible"] is True and side["lean_runtime_excluded"] is excluded
    row = next(line for line in out.splitlines() if line.startswith("version compatible"))
    assert row.endswith("yes, lean runtime excluded" if excluded else "yes, lean runtime embedded")


def test_version_compatible_and_exclude_lean_runtime_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version-compatible", "--exclude-lean-runtime"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--version-compatible", "--exclude-lean-runtime"])
def test_version_compatible_needs_full_tensorrt(option, backend, shallow_weights, capsys, no_build):
    if backend.name == "tensorrt":
        pytest.skip("full TensorRT builds version-compatible plans")
    code, out, err = run_main(["--weights", shallow_weights, option], capsys)
    assert code == 3 and err.count("\n") == 1 and f"this is {backend.name}" in err and "--backend tensorrt" in err
    assert err.split("error: ")[1].startswith(option)


def test_version_compatible_without_the_flags_is_a_backend_error():
    import types

    from core.backend import Backend

    old = Backend("tensorrt", types.SimpleNamespace(__version__="8.5.0", BuilderFlag=types.SimpleNamespace()))
    with pytest.raises(BackendError, match="VERSION_COMPATIBLE and EXCLUDE_LEAN_RUNTIME.*tensorrt 8.5.0"):
        build.check_version_compatible(old)


def test_version_compatible_with_plugins_is_refused(shallow_weights, capsys, no_build):
    code, out, err = run_main(["--weights", shallow_weights, "--version-compatible", "--plugins", "all"], capsys)
    assert code == 2 and err.count("\n") == 1 and "untested" in err and "--plugins none" in err


@pytest.mark.parametrize("trt_version, numpy_version, fine", [
    ("11.4.0.106", "2.4.6", True), ("10.16.1.11", "2.3.5", True), ("10.16.1.11", "2.4.6", False),
    ("10.8.0", "1.26.4", False),
    # tensorrt-cu13 10.13.x has no tensorrt.plugin (only tensorrt_bindings.plugin): refused, not a traceback
    ("10.13.3.9", "2.3.5", False), ("10.14.1.48.post1", "2.3.5", False),
])
def test_old_tensorrt_plugins_error_names_the_version_and_the_fix(trt_version, numpy_version, fine, monkeypatch):
    import types

    import numpy

    from core.backend import Backend
    from netdef.network import check_supported
    from core.config import AnchorDETRConfig

    monkeypatch.setattr(numpy, "__version__", numpy_version)
    fake = types.SimpleNamespace(__name__="tensorrt", __version__=trt_version, QuickPluginCreationRequest=object)
    plugins = frozenset({"layer_norm"})
    message = (rf"layer_norm: plugins need TensorRT >= 11\.2\.1 \(this is {trt_version}.*"
               rf"pip install -U 'tensorrt-cu13>=11\.2\.1'")
    with raises_unless(fine, BackendError, message):
        check_plugins(Backend("tensorrt", fake), plugins)
    with raises_unless(fine, BackendError, message):
        check_supported(fake, AnchorDETRConfig(), plugins)


def _full_trt_cannot_build(monkeypatch):
    """Full TensorRT imports but cannot create a builder (as on a machine without a usable GPU)."""
    import core.backend as B

    real = B._builder_problem
    why = "tensorrt 11.4.0.106 cannot create a builder on this machine (no usable GPU?): stand-in"
    monkeypatch.setattr(B, "_builder_problem", lambda name: why if name == "tensorrt" else real(name))
    return why


def test_full_tensorrt_without_a_builder_is_exit_3_with_its_reason(backend, shallow_weights, capsys, monkeypatch,
                                                                   no_build):
    why = _full_trt_cannot_build(monkeypatch)
    code, out, err = run_main(["--weights", shallow_weights, "--backend", "tensorrt"], capsys)
    assert code == 3 and err.count("\n") == 1 and why in err and err.startswith("python -m netdef.build: error:")


def test_auto_selection_falls_back_to_rtx_when_full_tensorrt_cannot_build(backend, monkeypatch):
    if _import_rtx() is None:
        pytest.skip("TensorRT-RTX is not installed")
    _full_trt_cannot_build(monkeypatch)
    assert get_backend().name == "tensorrt-rtx"


def _import_rtx():
    from core.backend import installed_module

    return installed_module("tensorrt-rtx")


# ---------------------------------------------------------------- Ctrl-C, NaN weights, raw outputs


def test_ctrl_c_during_the_build_cancels_it_through_the_monitor_and_writes_nothing(shallow_weights, backend, tmp_path,
                                                                                   capsys, monkeypatch):
    """SIGINT while TensorRT builds: no KeyboardInterrupt inside a TensorRT callback (which TensorRT swallows), the
    monitor's next step_complete answers False, exit 130 and no file."""
    import os
    import signal

    if not hasattr(backend.trt, "IProgressMonitor"):
        pytest.skip(f"{backend.name} {backend.version} has no IProgressMonitor")
    answers = []

    def interrupted_build(builder, network, config, logger=None):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode, as inside a TensorRT callback
        answers.append(config.progress_monitor.step_complete("Building engine", 0))
        return memoryview(b"a plan TensorRT finished anyway")

    monkeypatch.setattr(build, "build_serialized", interrupted_build)
    engine = tmp_path / "out" / "e.plan"
    previous = signal.getsignal(signal.SIGINT)
    code, out, err = run_main(["--weights", shallow_weights, "-o", engine, *SMALL_PROFILE], capsys)
    assert code == 130 and answers == [False]
    assert err.strip().splitlines()[-1] == "python -m netdef.build: error: interrupted: build cancelled, nothing written"
    assert not engine.parent.exists() and out == ""
    assert signal.getsignal(signal.SIGINT) is previous  # Ctrl-C is a KeyboardInterrupt again after the build


@pytest.mark.slow
def test_sigint_to_a_real_build_exits_130_and_leaves_nothing(shallow_weights, backend, tmp_path):
    """The real thing: a TensorRT build in a subprocess, SIGINT once the build has started."""
    import os
    import signal
    import subprocess

    if not hasattr(backend.trt, "IProgressMonitor"):
        pytest.skip(f"{backend.name} {backend.version} has no IProgressMonitor")
    engine = tmp_path / "e.plan"
    proc = subprocess.Popen([sys.executable, "-m", "netdef.build", "--weights", str(shallow_weights), "-o", str(engine),
                             "--backend", backend.name, *SMALL_PROFILE], stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "building engine" in line:
            break
    os.kill(proc.pid, signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(lines) + rest
    assert "interrupted: build cancelled, nothing written" in rest and "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []


def test_nan_or_infinite_weights_are_exit_2_naming_the_tensor(shallow_weights, tmp_path, capsys, no_build):
    import weights

    cfg, tensors = weights.load(shallow_weights)
    name = "transformer.decoder_layers.0.ffn.linear1.weight"
    for value in (np.nan, np.inf):
        bad = dict(tensors)
        bad[name] = tensors[name].copy()
        bad[name][3, 5] = value
        path = tmp_path / "bad.safetensors"
        weights.save(path, cfg, bad, source="test")
        code, out, err = run_main(["--weights", path, "-o", tmp_path / "e.plan", *SMALL_PROFILE], capsys)
        assert code == 2 and err.count("\n") == 1
        assert f"tensor {name!r} has 1 NaN or infinite values" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_top_100_is_in_the_engine_by_default_and_raw_outputs_leave_it_out(shallow_weights, backend, tmp_path, capsys,
                                                                         stub_build):
    for extra, postprocess in (([], True), (["--raw-outputs"], False)):
        engine = tmp_path / f"e{postprocess}.plan"
        code, out, err = run_main(["--weights", shallow_weights, "-o", engine, *extra, *SMALL_PROFILE], capsys)
        assert code == 0, err
        side = load_sidecar(engine)
        assert side["postprocess"] is postprocess and side["outputs"] == expected_io(postprocess)[1]
    with pytest.raises(SystemExit) as e:
        main(["--postprocess", "--raw-outputs"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
