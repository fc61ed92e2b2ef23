"""`python -m runtime.doctor`: end to end on TensorRT-RTX without a GPU (builds and the interpreter pass, the GPU rows
are skipped), every GPU row's comparison driven by fakes (a wrong result must fail its row), and for real on a GPU."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from runtime import doctor
from runtime.doctor import FAIL, PASS, SKIP, Outcome, Row

from helpers import save_random_weights, small_config

TINY = ["--shapes", "64x64,64x96", "--batches", "1,2", "--iters", "3", "--torch-mode", "fp16"]
GPU_ROWS = ("enqueue + graphs", "vs torch", "plugins on vs off", "top-100", "lean runtime", "gpu preprocessing",
            "latency")


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    return save_random_weights(tmp_path_factory.mktemp("doctor") / "w.safetensors", small_config("r50_c5"))


def rows_of(report) -> dict[str, dict]:
    return {r["check"]: r for r in report["checks"]}


def run_doctor(weights, tmp_path, capsys) -> tuple[str, dict, dict[str, dict]]:
    """(stdout, the JSON report, its rows by name) of a tiny doctor run that must exit 0."""
    out = tmp_path / "report.json"
    code = doctor.main(["--weights", str(weights), *TINY, "--json", str(out)])
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == 0 and report["exit_code"] == 0, table
    return table, report, rows_of(report)


# ---------------------------------------------------------------------------------------------- end to end, no GPU


def test_doctor_on_tensorrt_rtx_without_a_gpu(small_weights, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx")
    from conftest import gpu_available

    if gpu_available():
        pytest.skip("this test is the machine without a GPU")
    table, report, rows = run_doctor(small_weights, tmp_path, capsys)
    for name in ("tensorrt", "weights", "build fp32", "build fp16", "interpreter fp32", "interpreter fp16"):
        assert rows[name]["result"] == PASS, rows[name]
    assert rows["build fp32"]["figures"]["backend"] == "tensorrt-rtx"
    assert rows["build fp16"]["figures"]["engine_bytes"] < rows["build fp32"]["figures"]["engine_bytes"]
    assert rows["interpreter fp32"]["figures"]["tolerance"] == 1e-3
    assert max(rows["interpreter fp32"]["figures"]["blocks"].values()) <= 1e-3
    assert rows["gpu"]["result"] == SKIP and "no GPU" in rows["gpu"]["detail"]
    gpu_rows = [r for name, r in rows.items() if name.startswith(GPU_ROWS)]
    assert len(gpu_rows) == 11 and all(r["result"] == SKIP for r in gpu_rows)
    assert rows["build fp16 plugins"]["result"] == SKIP and "no plugin layers" in rows["build fp16 plugins"]["detail"]
    assert report["skipped"]["enqueue + graphs fp32"] == "no GPU (see the gpu row)"
    assert report["versions"]["tensorrt"]["tensorrt-rtx"] and report["gpu"] is None
    lines = table.splitlines()
    assert lines[0].split() == ["check", "result", "time", "detail"]
    assert any(line.split()[:3] == ["build", "fp32", "pass"] for line in lines)
    assert lines[-2].startswith(f"{sum(r['result'] == PASS for r in report['checks'])} of ")


def test_nothing_could_run_exits_3(monkeypatch, tmp_path, capsys):
    from core.backend import BackendError

    def no_backend(name=None):
        raise BackendError("no TensorRT backend can build here")

    monkeypatch.setattr(doctor, "get_backend", no_backend)
    monkeypatch.setattr(doctor.cuda, "probe", lambda index=0: None)
    monkeypatch.setattr(doctor, "torch_module", lambda: None)
    code = doctor.main([*TINY, "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 3 and "nothing could run: no GPU and no TensorRT" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["exit_code"] == 3 and rows_of(report)["weights"]["result"] == SKIP
    assert "random-init weights need torch" in rows_of(report)["weights"]["detail"]


@pytest.mark.parametrize("argv, message", [
    (["--precisions", "fp8"], "--precisions fp8: choose from fp32,fp16"),
    (["--shapes", "800x800"], "--shapes and --batches take two values each"),
    (["--torch-mode", "fast"], "--torch-mode fast: choose from"),
    (["--weights", "missing.safetensors"], "--weights missing.safetensors not found"),
    (["--variant", "r51_dc5"], "unknown variant 'r51_dc5'"),
    (["--shapes", "16x16,800x800"], "size 16x16 is below 32x32"),
])
def test_bad_arguments_exit_2_before_any_work(argv, message, capsys):
    assert doctor.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m runtime.doctor: error: ") and message in err


def test_exit_codes():
    assert doctor.exit_code([Row("a", PASS), Row("b", SKIP)], False) == 0
    assert doctor.exit_code([Row("a", PASS), Row("b", FAIL)], False) == 1
    assert doctor.exit_code([Row("a", SKIP)], True) == 3


def test_a_broken_check_is_a_failed_row_not_a_crash():
    rows = []

    def broken():
        raise KeyError("scores")

    def skipped():
        raise doctor.Skip("needs X: pip install x")

    doctor.run_check("broken", broken, rows)
    doctor.run_check("skipped", skipped, rows)
    assert [(r.check, r.result) for r in rows] == [("broken", FAIL), ("skipped", SKIP)]
    assert rows[0].detail == "KeyError: 'scores'" and rows[1].detail == "needs X: pip install x"


def test_profile_spans_the_shapes_and_batches():
    p = doctor.profile_for([(800, 800), (640, 960)], [1, 4])
    assert (p.min, p.opt, p.max) == ((1, 640, 800), (4, 800, 800), (4, 800, 960))


# ---------------------------------------------------------------------------------------------- GPU rows, faked


def outputs(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return {"pred_logits": rng.normal(size=(batch, 12, 5)).astype(np.float32) * 3,
            "pred_boxes": rng.uniform(size=(batch, 12, 4)).astype(np.float32)}


def test_output_comparison_per_output():
    want = outputs()
    got = {k: v + np.float32(0.01) for k, v in want.items()}  # 1e-2 of a scale >= 1: within 5e-2
    detail, figures = doctor.compare_outputs(got, want, doctor.ENGINE_TOLERANCE, "fp16 vs torch")
    assert figures["rel_err"]["pred_boxes"] == pytest.approx(0.01, rel=1e-3)
    scale = float(np.abs(want["pred_logits"]).max())  # > 1: the error is relative to it
    assert figures["rel_err"]["pred_logits"] == pytest.approx(0.01 / scale, rel=1e-3)
    assert detail == f"fp16 vs torch: pred_logits {0.01 / scale:.1e}, pred_boxes 1.0e-02 (rel err <= 0.05)"
    bad = dict(want, pred_boxes=want["pred_boxes"] + 0.2)
    with pytest.raises(Outcome, match="pred_boxes beyond tolerance") as exc:
        doctor.compare_outputs(bad, want, doctor.ENGINE_TOLERANCE, "x")
    assert exc.value.figures["rel_err"]["pred_logits"] == 0.0
    for broken in ({"pred_logits": want["pred_logits"]},  # an output missing
                   dict(want, pred_boxes=want["pred_boxes"][:1]),  # a shape mismatch
                   dict(want, pred_boxes=np.full_like(want["pred_boxes"], np.nan))):
        with pytest.raises(Outcome, match="pred_boxes beyond tolerance"):
            doctor.compare_outputs(broken, want, doctor.ENGINE_TOLERANCE, "x")


class FakeRunner:
    """EngineRunner's cuda_graphs contract: the first call of a shape enqueues (and captures), later ones replay."""

    def __init__(self, replay_error=0.0, capture=True):
        self.replay_error, self.capture = replay_error, capture
        self.seen, self.graph_failures, self.last_timing = set(), {}, {}

    def infer(self, images, masks):
        shape = (images.shape[0], *images.shape[2:])
        graph = self.capture and shape in self.seen
        self.seen.add(shape)
        if not self.capture:
            self.graph_failures[shape] = "capture failed: operation not permitted"
        self.last_timing = {"graph": graph, "gpu_ms": 1.0}
        out = {"pred_logits": images[:, :1, :4, :4].reshape(len(images), -1, 2) * 2}
        if graph:
            out = {k: v + self.replay_error for k, v in out.items()}
        return out


CONFIGS = [(1, (32, 48)), (2, (32, 48)), (1, (48, 32)), (2, (48, 32))]


def test_graph_replay_row():
    detail, figures = doctor.graph_replays(FakeRunner(), CONFIGS)
    assert sorted(figures) == ["1x32x48", "1x48x32", "2x32x48", "2x48x32"] and detail.startswith("4 shapes")
    with pytest.raises(Outcome, match="graph replay differs from enqueue"):
        doctor.graph_replays(FakeRunner(replay_error=1e-3), CONFIGS)
    with pytest.raises(Outcome, match="no CUDA graph was replayed .capture failed"):
        doctor.graph_replays(FakeRunner(capture=False), CONFIGS)


def host_top100(scores, labels, boxes):
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


def test_top100_row():
    rng = np.random.default_rng(1)
    scores = -np.sort(-rng.uniform(size=(2, 100))).astype(np.float32)
    labels = rng.integers(0, 91, (2, 100)).astype(np.int32)
    boxes = rng.uniform(size=(2, 100, 4)).astype(np.float32)
    engine = {"scores": scores, "labels": labels, "boxes": boxes}
    assert doctor.compare_top100(engine, host_top100(scores, labels, boxes))["labels_differing"] == 0
    swapped = labels.copy()
    swapped[0, [10, 11]] = labels[0, [11, 10]] + 1  # two distinct scores: a real difference
    with pytest.raises(Outcome, match="2 labels"):
        doctor.compare_top100(dict(engine, labels=swapped), host_top100(scores, labels, boxes))
    tied = scores.copy()
    tied[0, 11] = tied[0, 10]  # a tie: either order is the top-100, labels and boxes swap together
    in_order_of_tie = labels.copy(), boxes.copy()
    for array in in_order_of_tie:
        array[0, [10, 11]] = array[0, [11, 10]]
    doctor.compare_top100(dict(engine, scores=tied, labels=in_order_of_tie[0], boxes=in_order_of_tie[1]),
                          host_top100(tied, labels, boxes))
    other = labels.copy()
    other[0, 10] = (labels[0, 10] + 1) % 91
    with pytest.raises(Outcome, match=r"[12] labels"):  # a tie does not excuse another label
        doctor.compare_top100(dict(engine, scores=tied, labels=other), host_top100(tied, labels, boxes))
    with pytest.raises(Outcome, match="scores 1.0e-04"):
        doctor.compare_top100(dict(engine, scores=scores + np.float32(1e-4)), host_top100(scores, labels, boxes))
    with pytest.raises(Outcome, match="boxes"):
        doctor.compare_top100(dict(engine, boxes=boxes[:, ::-1]), host_top100(scores, labels, boxes))


def test_preprocessing_row():
    from runtime.preprocess import NORMALISED

    levels = np.random.default_rng(2).integers(0, 250, (2, 3, 8, 8))
    images = np.stack([NORMALISED[c][levels[:, c]] for c in range(3)], 1).astype(np.float32)
    masks = np.zeros((2, 8, 8), bool)
    masks[1, 6:] = True
    sizes = [(8, 8), (6, 8)]
    cpu = (images, masks, sizes)
    one_off = np.stack([NORMALISED[c][levels[:, c] + 1] for c in range(3)], 1).astype(np.float32)
    assert doctor.preprocess_steps((one_off, masks, sizes), cpu) == 1
    two_off = np.stack([NORMALISED[c][levels[:, c] + (c == 2) * 2] for c in range(3)], 1).astype(np.float32)
    with pytest.raises(Outcome, match="2 uint8 levels"):
        doctor.preprocess_steps((two_off, masks, sizes), cpu)
    with pytest.raises(Outcome, match="padding masks differ"):
        doctor.preprocess_steps((images, ~masks, sizes), cpu)
    with pytest.raises(Outcome, match="resized sizes differ"):
        doctor.preprocess_steps((images, masks, [(8, 8), (8, 6)]), cpu)


def fake_doctor(tmp_path, **engines):
    args = doctor.build_parser().parse_args(TINY)
    args.precisions = ["fp32", "fp16"]
    d = doctor.Doctor(args, tmp_path)
    d.gpu = SimpleNamespace(name="Fake GPU", compute_capability="9.0")
    d.engines = {label: tmp_path / f"{label}.plan" for label in engines}
    d.weights = tmp_path / "w.safetensors"
    d.torch = object()
    return d


@pytest.mark.parametrize("error, result", [(0.01, PASS), (0.2, FAIL)])
def test_engine_vs_torch_and_plugins_rows(tmp_path, monkeypatch, error, result):
    d = fake_doctor(tmp_path, fp16=1, **{"fp16-plugins": 1})
    batches = [(np.zeros((2, 3, 64, 64), np.float32), np.zeros((2, 64, 64), bool))] * 2
    monkeypatch.setattr(d, "parity_inputs", lambda: batches)
    monkeypatch.setattr(d, "reference_outputs", lambda b: [outputs(0), outputs(1)])

    def engine_outputs(plan, b):  # the plugin engine is the one that is off
        shift = error if plan.name == "fp16-plugins.plan" else 0.0
        return [{k: v + np.float32(shift) for k, v in o.items()} for o in (outputs(0), outputs(1))]

    monkeypatch.setattr(d, "engine_outputs", engine_outputs)
    assert d.check("vs torch fp16", lambda: d.parity("fp16")).result == PASS
    assert d.check("vs torch fp16-plugins", lambda: d.parity("fp16-plugins")).result == result
    row = d.check("plugins on vs off", d.plugins_on_off)
    assert row.result == result and row.figures["rel_err"]["pred_boxes"] == pytest.approx(error, rel=1e-3)


def test_lean_row(tmp_path, monkeypatch):
    pytest.importorskip("tensorrt_lean")
    d = fake_doctor(tmp_path, **{"fp32-version-compatible": 1})
    monkeypatch.setattr(d, "parity_inputs", lambda: [(np.zeros((1, 3, 64, 64), np.float32), np.zeros((1, 64, 64), bool))])
    monkeypatch.setattr(d, "engine_outputs", lambda plan, b: [outputs(0)])
    monkeypatch.setattr(doctor, "lean_outputs", lambda plan, images, masks, folder: outputs(0))
    assert d.check("lean runtime", d.lean).result == PASS
    monkeypatch.setattr(doctor, "lean_outputs", lambda plan, images, masks, folder: outputs(1))
    row = d.check("lean runtime", d.lean)
    assert row.result == FAIL and "lean vs full TensorRT: pred_logits" in row.detail


def test_gpu_rows_skip_without_their_engine(tmp_path):
    d = fake_doctor(tmp_path, fp16=1)
    row = d.check("plugins on vs off", d.plugins_on_off)
    assert row.result == SKIP and row.detail == "engine fp16-plugins was not built (see its build row)"


# ---------------------------------------------------------------------------------------------- for real


@pytest.mark.gpu
@pytest.mark.trt
def test_doctor_on_this_gpu(small_weights, tmp_path, capsys):
    from core.backend import get_backend

    table, report, rows = run_doctor(small_weights, tmp_path, capsys)
    assert report["gpu"]["compute_capability"] and report["versions"]["tensorrt"]["tensorrt"]
    # Every build, interpreter and GPU row ran and passed, but those whose optional piece is not installed here.
    optional = set()
    if get_backend("tensorrt").plugin_problem():
        optional |= {"build fp16 plugins", "enqueue + graphs fp16-plugins", "vs torch fp16-plugins", "plugins on vs off"}
    if doctor.installed_module("tensorrt-lean") is None:
        optional |= {"build version-compatible", "lean runtime"}
    checked = [name for name in rows if name.startswith((*GPU_ROWS, "build", "interpreter")) and name not in optional]
    assert len(checked) + len(optional) == 17
    assert {name: rows[name]["result"] for name in checked} == {name: PASS for name in checked}, table
    assert rows["latency"]["figures"]["p50_ms"] and rows["top-100 engine vs host"]["figures"]


def test_padded_batches_mask_what_they_pad():
    images, masks = doctor.padded_batch(3, (64, 96))
    assert images.shape == (3, 3, 64, 96) and not masks[0].any()
    for i, (h, w) in enumerate([(64, 96), (53, 75), (45, 59)]):
        assert not masks[i, :h, :w].any() and masks[i].sum() == 64 * 96 - h * w
        assert not images[i][:, masks[i]].any() and images[i, :, :h, :w].std() > 0.5


def test_a_failed_build_fails_its_row_with_the_builds_error(tmp_path, monkeypatch):
    import sys

    import netdef.build

    def failing_build(argv):
        print("progress noise")
        print("python -m netdef.build: error: TensorRT could not build the engine: out of memory", file=sys.stderr)
        return 1

    monkeypatch.setattr(netdef.build, "main", failing_build)
    d = fake_doctor(tmp_path)
    d.backend = SimpleNamespace(name="tensorrt-rtx")
    row = d.check("build fp32", lambda: d.build("fp32", []))
    assert row.result == FAIL and row.detail == ("netdef.build exited 1: python -m netdef.build: error: TensorRT could "
                                                 "not build the engine: out of memory")
    assert d.check("enqueue + graphs fp32", lambda: d.graphs("fp32")).result == SKIP
    assert doctor.exit_code(d.rows, False) == 1
