"""serve.server / serve.client: a real Triton server (PyTriton) serving the PyTorch reference on loopback.

The server tests start `python -m serve.server --torch-weights` on random r50_c5 weights with small images and
compare every answer with a direct reference call (same preprocessing, TorchReference, post-processing).
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.detector import Detector, above
from helpers import assert_same_detections as assert_same, free_ports as _free_ports
from helpers import assert_good_and_bad_answered_together, noise_image_file, ready_clients
from helpers import session_processes as _session_processes
from serve import server as serve

MAX_SIZE = (64, 96)  # --max-size: images are scaled to fit it, so the CPU forward takes milliseconds
MAX_PIXELS = 100 * 100
START_TIMEOUT_S = 120
ENCODERS = {"jpeg": "JPEG", "png": "PNG"}


encoded = functools.partial(noise_image_file, fmt="PNG")


# ---- without a server: the answer encoding and the missing-PyTriton error -----------------------------------


def test_encode_pads_to_one_row_and_counts():
    found = {"scores": np.array([0.9, 0.7], np.float32), "labels": np.array([1, 3], np.int32),
             "boxes": np.ones((2, 4), np.float32), "size": np.array([64, 96])}
    none = {"scores": np.zeros(0, np.float32), "labels": np.zeros(0, np.int32), "boxes": np.zeros((0, 4), np.float32),
            "size": np.array([10, 20])}
    out = serve._encode([found, none, "bad image"])
    assert out["count"].tolist() == [[2], [0], [0]]
    assert out["scores"].shape == (3, 2) and out["boxes"].shape == (3, 2, 4) and out["labels"].dtype == np.int32
    assert out["size"].tolist() == [[64, 96], [10, 20], [0, 0]]
    assert out["error"][:, 0].tolist() == [b"", b"", b"bad image"]
    empty = serve._encode([none])  # zero detections still give a (1, 1) array: (1, 0) fails inside PyTriton
    assert empty["scores"].shape == (1, 1) and empty["count"].tolist() == [[0]]


class FakeDetector(Detector):
    """In-engine top-2 outputs, the first box the whole image; records the batches it was given (as an engine
    would get them)."""

    min_hw, max_hw, max_batch = (32, 32), (64, 96), 3

    def __init__(self):
        self.batches = []

    def infer(self, images, masks):
        self.batches.append((images.shape, masks.copy()))
        batch = len(images)
        return {"scores": np.tile(np.float32([0.9, 0.2]), (batch, 1)), "labels": np.tile(np.int64([18, 1]), (batch, 1)),
                "boxes": np.tile(np.float32([[0, 0, 1, 1], [0.5, 0, 1, 1]]), (batch, 1, 1))}


def test_infer_function_batches_good_rows_and_answers_bad_ones_alone():
    detector = FakeDetector()
    infer = serve.InferFunction(detector, serve.HostPreprocess(detector, MAX_PIXELS), max_batch=3)
    small = encoded(1, size=(40, 40))  # resized to 64x64 within the 64x96 maximum
    requests = [
        {"image": np.array([[encoded(0)]], object)},  # default threshold 0.5
        {"image": np.array([[b"junk"]], object), "threshold": np.array([[0.1]], np.float32)},
        {"image": np.array([[small], [encoded(2)]], object), "threshold": np.array([[0.1], [0.5]], np.float32)},
        {"image": np.array([[encoded(3)]], object), "threshold": np.array([[-0.5]], np.float32)},
        {"image": np.array([[encoded(4)]], object)},
    ]
    answers = infer(requests)
    assert [a["count"].ravel().tolist() for a in answers] == [[1], [0], [2, 1], [0], [1]]
    assert answers[1]["error"][0, 0].startswith(b"cannot decode") and answers[3]["error"][0, 0].startswith(b"threshold")
    assert answers[2]["size"].tolist() == [[40, 40], [64, 96]]
    assert answers[2]["labels"].dtype == np.int32 and answers[2]["labels"][0].tolist() == [18, 1]
    np.testing.assert_array_equal(answers[2]["boxes"][0, 0], [0, 0, 40, 40])  # in the image's own pixels
    # Four good rows in batches of at most 3, each padded to its largest image, the small one masked.
    assert [shape for shape, _ in detector.batches] == [(3, 3, 64, 96), (1, 3, 64, 96)]
    masks = detector.batches[0][1]
    assert not masks[1, :, :64].any() and masks[1, :, 64:].all()


def test_a_request_without_image_fails_alone_with_one_line():
    detector = FakeDetector()
    infer = serve.InferFunction(detector, serve.HostPreprocess(detector, MAX_PIXELS), max_batch=4)
    # Triton lets this through: it only checks that a request has between 1 and 2 of the model's inputs.
    answers = infer([{"threshold": np.array([[0.1]], np.float32)}, {"image": np.array([[encoded(0)]], object)}])
    assert [a["count"].ravel().tolist() for a in answers] == [[0], [1]]
    error = answers[0]["error"][0, 0].decode()
    assert "no `image` input" in error and "\n" not in error and "Traceback" not in error


def test_a_closed_admission_answers_at_once_without_the_model():
    detector = FakeDetector()
    admission = serve.Admission()
    infer = serve.InferFunction(detector, serve.HostPreprocess(detector, MAX_PIXELS), 4, admission)
    assert admission.wait_idle(0)
    admission.close()
    (answer,) = infer([{"image": np.array([[encoded(0)], [encoded(1)]], object)}])
    assert answer["count"].ravel().tolist() == [0, 0] and detector.batches == []
    assert all(e.decode() == serve.SHUTTING_DOWN for e in answer["error"][:, 0])


@pytest.mark.parametrize("option", ["--http-port", "--grpc-port", "--metrics-port"])
def test_a_port_in_use_is_one_line_exit_3_before_anything_loads(tmp_path, capsys, option):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")  # never read: the ports are checked first
    http, grpc, metrics = _free_ports(3)
    ports = {"--http-port": http, "--grpc-port": grpc, "--metrics-port": metrics}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[option]))
        taken.listen()
        args = [str(a) for item in ports.items() for a in item]
        assert serve.main(["--torch-weights", str(weights), *args]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m serve.server: error: {option} {ports[option]} is already in use on 127.0.0.1: "
                   f"stop the server listening there or pass another {option}"]


class FakeTriton:
    """Stands in for pytriton.triton: each Triton() is one server start; bind fails for the first `failures`."""

    def __init__(self, failures):
        self.failures, self.starts, self.stops, self.served = failures, 0, 0, 0
        fake = self

        class Triton:
            def __init__(self, config):
                fake.starts += 1

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                fake.stops += 1

            def bind(self, **model):
                if fake.starts <= fake.failures:
                    raise RuntimeError("[400] load failed for model 'anchor_detr'\nConnectionRefusedError")

            def serve(self):
                fake.served += 1

        self.Triton = Triton


def test_a_failed_load_starts_triton_again_then_gives_up(capsys):
    def until_stopped(server):
        server.serve()
        return 7

    lucky = FakeTriton(failures=serve.LOAD_ATTEMPTS - 1)
    assert serve.serve_until_stopped(lucky, None, {}, "serving", until_stopped) == 7
    assert (lucky.starts, lucky.stops, lucky.served) == (serve.LOAD_ATTEMPTS, serve.LOAD_ATTEMPTS, 1)
    assert "serving" in capsys.readouterr().out
    hopeless = FakeTriton(failures=serve.LOAD_ATTEMPTS)
    with pytest.raises(serve.Unavailable, match="could not load anchor_detr .*load failed"):
        serve.serve_until_stopped(hopeless, None, {}, "serving", until_stopped)
    assert hopeless.starts == hopeless.stops == serve.LOAD_ATTEMPTS and hopeless.served == 0


def test_serve_without_pytriton_is_one_line_exit_3(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytriton", None)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert serve.main(["--torch-weights", str(weights)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs PyTriton" in err[0] and "[serve]" in err[0]


def test_serve_bad_arguments_are_exit_2(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    assert serve.main(["--torch-weights", str(weights), "--http-port", "8001"]) == 2  # same as --grpc-port
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it while parsing
        serve.main(["--torch-weights", str(weights), "--instances", "0"])
    assert exit_.value.code == 2
    assert serve.main(["--engine", str(weights), "--max-size", "64x96"]) == 2
    assert serve.main(["--engine", str(tmp_path / "missing.plan")]) == 2  # before PyTriton is even looked for
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error:" in line]  # not argparse's usage
    assert len(err) == 4 and all(line.startswith("python -m serve.server: error: ") for line in err), err


# ---- a real server --------------------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [arg.decode() for arg in f.read().split(b"\0") if arg]
    except OSError:
        return []


def _unpacked(pids) -> set[Path]:
    """The model folders (/tmp/folderXXXXXX) Triton unpacked for the Python backend stubs among `pids`."""
    return {Path(_cmdline(pid)[1]).parents[1] for pid in pids
            if _cmdline(pid)[:1] and _cmdline(pid)[0].endswith("triton_python_backend_stub")}


def _kill_server(process):
    """SIGKILL to a server whose test failed, and its unpacked model folders removed (nothing else would)."""
    if process.poll() is None:
        folders = _unpacked(_session_processes(process.pid))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def _short_folder():
    """A new folder for a server's TMPDIR and XDG_CACHE_HOME. Short, whatever pytest's base folder is: the
    multiprocessing and PyTriton sockets made in them must have paths under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix="serve-", dir="/tmp"))


def _start_server(folder, weights, *options):
    """`python -m serve.server` in a session of its own, its temporary files and PyTriton's workspace inside
    `folder` (TMPDIR, XDG_CACHE_HOME), once it serves: (process, log, clients, ports)."""
    http, grpc, metrics = _free_ports(3)
    for name in ("tmp", "cache"):
        (folder / name).mkdir()
    log = open(folder / "server.log", "w+")
    env = dict(os.environ, TMPDIR=str(folder / "tmp"), XDG_CACHE_HOME=str(folder / "cache"))
    process = subprocess.Popen(
        [sys.executable, "-m", "serve.server", "--torch-weights", str(weights), "--device", "cpu",
         "--max-size", "x".join(map(str, MAX_SIZE)), "--max-pixels", str(MAX_PIXELS), *options,
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )
    clients = ready_clients(process, log, http, grpc, START_TIMEOUT_S, _kill_server, "server")
    return process, log, clients, {"http": http, "grpc": grpc, "metrics": metrics}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("pytriton", reason="needs PyTriton: pip install -e '.[serve]'")
    pytest.importorskip("tritonclient.http", reason="needs tritonclient[http,grpc]: pip install -e '.[serve]'")
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[http,grpc]: pip install -e '.[serve]'")
    weights = tmp_path_factory.mktemp("serve") / "r50_c5.safetensors"
    subprocess.run([sys.executable, "-m", "weights.extract", "--random-init", "r50_c5", "-o", str(weights)],
                   check=True, capture_output=True, timeout=120)
    folder = _short_folder()
    try:
        process, log, clients, ports = _start_server(folder, weights, "--instances", "2", "--max-batch", "4",
                                                     "--max-queue-delay-us", "20000", "--drain-timeout", "60")
        yield {"process": process, "weights": weights, "clients": clients, "log": log, "ports": ports,
               "folder": folder}
        _kill_server(process)  # only if the shutdown test did not run or failed
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(server):
    from runtime.torch_detector import TorchReference

    model = TorchReference(server["weights"], "cpu", min_hw=(32, 32), max_hw=MAX_SIZE)
    prep = serve.HostPreprocess(model, MAX_PIXELS)

    def detect(data: bytes, threshold: float = serve.DEFAULT_THRESHOLD) -> dict[str, np.ndarray]:
        (found,) = model(*prep.batch([prep.decode(data)]))
        return above(found, threshold)

    return detect


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_concurrent_requests_match_the_reference(server, reference, protocol):
    client = server["clients"][protocol]
    images = [encoded(seed, fmt="PNG" if seed % 2 else "JPEG") for seed in range(16)]
    thresholds = [None if i % 4 == 0 else i / 20 for i in range(16)]  # None: the server's default 0.5
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(client.detect, images, thresholds))
    for data, threshold, answer in zip(images, thresholds, answers):
        assert answer["size"].tolist() == [64, 96]
        assert_same(answer, reference(data, serve.DEFAULT_THRESHOLD if threshold is None else threshold))


@pytest.mark.slow
def test_zero_detections_answer_with_no_rows(server):
    answer = server["clients"]["http"].detect(encoded(1), threshold=1.0)
    assert answer["scores"].shape == (0,) and answer["boxes"].shape == (0, 4)


@pytest.mark.slow
def test_bad_requests_fail_alone_and_the_server_keeps_serving(server, reference):
    client = server["clients"]["grpc"]
    jpeg = encoded(7, fmt="JPEG")
    bad = {
        "not an image": (b"this is not an image", 0.5, "cannot decode"),
        "truncated jpeg": (jpeg[: len(jpeg) // 2], 0.5, "cannot decode"),
        "empty": (b"", 0.5, "empty"),
        "threshold above 1": (jpeg, 1.5, "outside [0, 1]"),
        "threshold nan": (jpeg, math.nan, "outside [0, 1]"),
        "too many pixels": (encoded(3, size=(101, 100)), 0.5, "--max-pixels"),
    }
    good = [(encoded(100 + i, fmt="JPEG"), 0.3) for i in range(8)]
    assert_good_and_bad_answered_together(client, good, bad, reference)

    # Wrong dtype and shape are refused by Triton itself, before the model sees them.
    module = client.module
    as_float = module.InferInput("image", [1, 1], "FP32")
    as_float.set_data_from_numpy(np.zeros((1, 1), np.float32))
    two = module.InferInput("image", [1, 2], "BYTES")
    two.set_data_from_numpy(np.array([[jpeg, jpeg]], dtype=object))
    from tritonclient.utils import InferenceServerException

    for inputs in ([as_float], [two]):
        with pytest.raises(InferenceServerException):
            client._client().infer(serve.MODEL_NAME, inputs)
    # Without `image` (Triton only counts inputs, so it reaches the model): that request's own one-line error.
    threshold_only = module.InferInput("threshold", [1, 1], "FP32")
    threshold_only.set_data_from_numpy(np.array([[0.5]], np.float32))
    error = client._client().infer(serve.MODEL_NAME, [threshold_only]).as_numpy("error")[0, 0].decode()
    assert error.startswith("the request has no `image` input") and "\n" not in error
    client.check_ready()
    assert_same(client.detect(jpeg), reference(jpeg))


@pytest.mark.slow
def test_client_cli_prints_table_and_coco_json(server, reference, tmp_path, capsys):
    from serve import client as client_cli

    paths = []
    for i in range(2):
        path = tmp_path / f"{1000 + i}.png"
        path.write_bytes(encoded(50 + i))
        paths.append(path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    url = server["clients"]["http"].url
    out = tmp_path / "results.json"
    code = client_cli.main([*map(str, paths + [broken]), "--url", url, "--threshold", "0.2", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and "broken.jpg: refused by the server: cannot decode" in captured.err

    records = json.loads(out.read_text())
    expected = [reference(p.read_bytes(), 0.2) for p in paths]
    assert len(records) == sum(len(e["scores"]) for e in expected)
    assert {r["image_id"] for r in records} == {1000, 1001}
    from core.labels import COCO_CATEGORIES, label_name  # the server's names output: a 91-class model's are COCO's

    assert all(r["category_name"] == label_name(COCO_CATEGORIES, r["category_id"]) for r in records)
    assert f"{paths[0]}  96x64  {len(expected[0]['scores'])} detections" in captured.out


@pytest.mark.slow
def test_client_pointed_at_the_metrics_port_is_exit_3(server, tmp_path, capsys):
    from serve import client as client_cli

    image = tmp_path / "a.png"
    image.write_bytes(encoded(1))
    # Triton's metrics port answers every GET (model readiness included) with an empty 200.
    assert client_cli.main([str(image), "--url", f"127.0.0.1:{server['ports']['metrics']}"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no AnchorDETR server answers" in err[0] and "pass --url with its HTTP port" in err[0]


def test_client_without_server_is_exit_3(capsys):
    pytest.importorskip("tritonclient.http", reason="needs tritonclient[http,grpc]: pip install -e '.[serve]'")
    from serve import client as client_cli

    (port,) = _free_ports(1)
    assert client_cli.main(["x.jpg", "--url", f"127.0.0.1:{port}"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no AnchorDETR server answers" in err[0]


class FakeTritonClient:
    """Stands in for tritonclient's client of a server that answers `answers` images and then goes away: the
    request in flight sees its connection closed, later ones are refused, as when serve.server is killed."""

    def __init__(self, answers, failure=None):
        from geventhttpclient.response import HTTPConnectionClosed

        self.answers, self.calls = answers, 0
        self.failures = [failure] if failure else [HTTPConnectionClosed("connection closed."),
                                                   ConnectionRefusedError(111, "Connection refused")]

    def is_model_ready(self, model):
        return True

    def get_model_metadata(self, model):
        return {"name": model, "inputs": [{"name": "image"}, {"name": "threshold"}]}

    def infer(self, model, inputs, **kwargs):
        self.calls += 1
        if self.calls > self.answers:
            raise self.failures[min(self.calls - self.answers, len(self.failures)) - 1]
        found = serve._encode([{"scores": np.array([0.9], np.float32), "labels": np.array([18], np.int32),
                                "boxes": np.array([[1, 2, 30, 40]], np.float32), "size": np.array([64, 96])}])
        return type("Result", (), {"as_numpy": lambda self, name: found[name]})()


@pytest.mark.parametrize("answers", [5, 0])
def test_client_keeps_finished_work_when_the_server_goes_away(tmp_path, monkeypatch, capsys, answers):
    pytest.importorskip("tritonclient.http", reason="needs tritonclient[http,grpc]: pip install -e '.[serve]'")
    from serve import client as client_cli

    fake = FakeTritonClient(answers)
    monkeypatch.setattr(client_cli.Client, "_client", lambda self: fake)
    paths = []
    for i in range(10):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(b"png")
    out = tmp_path / "results.json"
    code = client_cli.main([*map(str, paths), "--concurrency", "1", "--json", str(out)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if answers == 0:  # connected, then gone before any answer: as good as no server
        assert code == 3 and not out.exists()
        assert captured.err.strip().splitlines()[-1].startswith(
            "python -m serve.client: error: the server went away before answering any image: no answer from")
        return
    assert code == 1
    assert {r["image_id"] for r in json.loads(out.read_text())} == set(range(answers))
    assert captured.out.count("1 detection (score >= 0.5)") == answers
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped: ")]
    assert skipped[0] == f"skipped: {paths[answers]}: no answer from the server at localhost:8000 (connection closed.)"
    assert len(skipped) == 10 - answers and all("no answer from the server" in line for line in skipped)
    assert "10/10  images" in captured.err  # the progress bar, on stderr


@pytest.mark.parametrize("failure, message", [
    ("timeout", "did not answer within --timeout 0.001 s"),  # HTTP: the socket's own timeout
    ("StatusCode.DEADLINE_EXCEEDED", "did not answer within --timeout 0.001 s"),  # gRPC
    ("StatusCode.UNAVAILABLE", "no answer from the server at localhost:8000 ([StatusCode.UNAVAILABLE] Socket closed)"),
])
def test_client_says_when_the_server_did_not_answer(tmp_path, monkeypatch, capsys, failure, message):
    pytest.importorskip("tritonclient.http", reason="needs tritonclient[http,grpc]: pip install -e '.[serve]'")
    from tritonclient.utils import InferenceServerException

    from serve import client as client_cli

    exc = (TimeoutError("timed out") if failure == "timeout"
           else InferenceServerException("Socket closed", status=failure))
    fake = FakeTritonClient(0, failure=exc)
    monkeypatch.setattr(client_cli.Client, "_client", lambda self: fake)
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for image in images:
        image.write_bytes(b"png")
    code = client_cli.main([*map(str, images), "--timeout", "0.001"])
    err = capsys.readouterr().err
    assert message in err and "cannot read" not in err and "Traceback" not in err
    if "answer within" in message:  # the server was reached, it was only slow: each image fails on its own
        assert code == 1 and f"skipped: {images[0]}: the server at localhost:8000 did not answer" in err
    else:  # gone before any answer: as good as no server
        assert code == 3 and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_serve_load_levels_count_requests(server, capsys):
    from benchmarks import serve_load

    row = serve_load.load_level(server["clients"]["http"], encoded(5, fmt="JPEG"), 3, 5, 60)
    assert row["requests"] == 5 and row["errors"] == 0 and row["rps"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    bad = serve_load.load_level(server["clients"]["grpc"], b"junk", 2, 3, 60)
    assert bad["requests"] == 0 and bad["errors"] == 3 and "cannot decode" in capsys.readouterr().err


def test_serve_load_and_client_bad_arguments(capsys):
    from benchmarks import serve_load
    from serve import client as client_cli

    for main, args in ((serve_load.main, ["--requests", "0"]), (client_cli.main, ["a.jpg", "--concurrency", "0"]),
                       (client_cli.main, ["a.jpg", "--threshold", "1.5"])):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
    assert serve_load.main(["--warmup", "-1"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error:" in line]
    assert [line.split(": error: ")[0] for line in err] == [
        "python -m benchmarks.serve_load", "python -m serve.client", "python -m serve.client",
        "python -m benchmarks.serve_load"]


def _stop_under_load(process, log, folder, url, tmp_path):
    """SIGTERM to the server once serve.client, sending 80 images 8 at a time, has its first answer; the server's
    exit code and time to exit, the client's exit code and output, and the server's log."""
    images = []
    for i in range(80):
        images.append(tmp_path / f"{i}.jpg")
        images[-1].write_bytes(encoded(i, fmt="JPEG"))
    before = _session_processes(process.pid)
    unpacked = _unpacked(before)
    assert unpacked and all(path.is_dir() for path in unpacked), before
    out, err = open(tmp_path / "client.out", "w+"), open(tmp_path / "client.err", "w+")
    client = subprocess.Popen([sys.executable, "-m", "serve.client", *map(str, images), "--url", url,
                               "--concurrency", "8", "--timeout", "120", "--json", str(tmp_path / "results.json")],
                              stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while "/80  images" not in (tmp_path / "client.err").read_text():  # the progress bar's first answer
            assert time.monotonic() < deadline and client.poll() is None, (tmp_path / "client.err").read_text()
            time.sleep(0.1)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
        elapsed = time.monotonic() - started
        client_code = client.wait(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
    deadline = time.monotonic() + 5  # the stubs' own helpers exit with them
    while any(pid in before for pid in _session_processes(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in before if pid in _session_processes(process.pid)] == []
    assert [path for path in unpacked if path.exists()] == []
    assert list((folder / "tmp").iterdir()) == [] and list((folder / "cache").rglob("*")) in ([], [folder / "cache" / "pytriton"])
    log.seek(0)
    out.seek(0)
    err.seek(0)
    return {"code": code, "elapsed": elapsed, "client_code": client_code, "out": out.read(), "err": err.read(),
            "log": log.read(), "json": json.loads((tmp_path / "results.json").read_text())}


def _assert_each_image_answered_or_refused(result):
    assert result["client_code"] == 1 and "Traceback" not in result["err"], result["err"][-2000:]
    done = result["out"].count(" detections (score >= ") + result["out"].count(" detection (score >= ")
    skipped = [line for line in result["err"].splitlines() if line.startswith("skipped: ")]
    assert done >= 1 and done + len(skipped) == 80
    assert len({r["image_id"] for r in result["json"]}) <= done  # only finished images, none twice


@pytest.mark.slow
def test_sigterm_under_load_past_drain_timeout_is_forced_exit_1_and_leaves_nothing(server, tmp_path):
    folder = _short_folder()
    try:
        process, log, _, ports = _start_server(folder, server["weights"], "--max-batch", "4", "--drain-timeout", "0.1")
        try:
            result = _stop_under_load(process, log, folder, f"127.0.0.1:{ports['http']}", tmp_path)
        finally:
            _kill_server(process)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # A CPU forward of 4 images is far longer than 0.1 s, and one is running when the first answer arrives.
    assert result["code"] == 1, result["log"][-3000:]
    assert "--drain-timeout 0.1s ran out" in result["log"] and "Traceback" not in result["log"]
    print(f"forced stop: {result['elapsed']:.1f} s")
    assert result["elapsed"] < serve.REFUSE_GRACE_S + serve.STOP_TIMEOUT_S + 10
    _assert_each_image_answered_or_refused(result)


@pytest.mark.slow
def test_sigterm_under_load_drains_exits_0_and_leaves_nothing(server, tmp_path):
    # Last in this module: it stops the shared server (--drain-timeout 60).
    result = _stop_under_load(server["process"], server["log"], server["folder"],
                              server["clients"]["http"].url, tmp_path)
    assert result["code"] == 0, result["log"][-3000:]
    assert "Traceback" not in result["log"] and "Exit timeout expired" not in result["log"]
    print(f"drained stop: {result['elapsed']:.1f} s")
    assert result["elapsed"] < 60 + serve.STOP_TIMEOUT_S
    _assert_each_image_answered_or_refused(result)
    # Requests in flight at SIGTERM were answered; those sent after it were refused, none cut off.
    assert "connection closed" not in result["err"]


# ---- --decode: GPU decoding per batch, each request answered alone -------------------------------------------


def decode_requests() -> tuple[list[bytes], dict[str, int]]:
    """Files covering every decision of the GPU path's decoding, and the position of each kind."""
    from helpers import solid

    def saved(image, fmt="JPEG", **options):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    rotated = solid(70, 50, 2)
    exif = rotated.getexif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    jpeg = saved(solid(60, 40, 0), quality=92)
    files = {
        "jpeg": jpeg,
        "png": saved(solid(50, 60, 1), "PNG"),
        "empty": b"",
        "truncated": jpeg[: len(jpeg) // 2],
        "junk": b"not an image",
        "oversized": saved(solid(120, 100, 0)),  # 12,000 pixels > MAX_PIXELS, refused from the header
        "refused": saved(solid(44, 66, 1), quality=80),  # a JPEG the stand-in codec refuses: Pillow decodes it
        "rotated": saved(rotated, exif=exif),
        "gray": saved(solid(64, 48, 0).convert("L")),
    }
    return list(files.values()), {name: i for i, name in enumerate(files)}


def answer_all(infer, files):
    return infer([{"image": np.array([[data]], object), "threshold": np.array([[0.3]], np.float32)} for data in files])


def test_gpu_decoding_decodes_the_batch_in_one_call_and_answers_each_request_alone(host_gpu, monkeypatch):
    """serve.server --decode gpu on this machine: a stand-in nvImageCodec (Pillow's pixels in "device" memory),
    the GPU kernel's CPU build writing a DeviceRunner's inputs. The good JPEGs go to the codec in one call per
    Triton batch, the PNG and the JPEG it refuses through Pillow; the answers equal the CPU path's (Pillow, the
    CPU transform), and empty, oversized and undecodable files are each their own request's error."""
    from helpers import NumpyDetector, fake_gpu_decoding, host_runner

    files, at = decode_requests()
    codec = fake_gpu_decoding(monkeypatch, refuse={files[at["refused"]]})
    runner = host_runner()
    preps, close = serve.preprocessors([runner], MAX_PIXELS, True, "gpu", max_batch=2)
    assert isinstance(preps[0], serve.GpuPreprocess)
    try:
        got = answer_all(serve.InferFunction(runner, preps[0], max_batch=2), files)
        cpu = NumpyDetector()
        expected = answer_all(serve.InferFunction(cpu, serve.HostPreprocess(cpu, MAX_PIXELS), max_batch=2), files)
    finally:
        close()
    assert codec.calls == [[files[at[k]] for k in ("jpeg", "refused", "rotated", "gray")]]  # one call, in order
    assert preps[0].path.decoder.counts == {"gpu": 4, "pillow": 2, "refused": 1}
    for name, i in at.items():
        error = got[i]["error"][0, 0].decode()
        if name in ("empty", "truncated", "junk", "oversized"):
            assert got[i]["count"].tolist() == [[0]] and error and "\n" not in error, name
            assert error.split(" (")[0].split(":")[0] == expected[i]["error"][0, 0].decode().split(" (")[0].split(":")[0]
            continue
        assert error == "", (name, error)
        for key in ("count", "scores", "labels", "boxes", "size"):
            np.testing.assert_array_equal(got[i][key], expected[i][key], err_msg=f"{name} {key}")
    assert "empty" in got[at["empty"]]["error"][0, 0].decode()
    assert "12,000 pixels" in got[at["oversized"]]["error"][0, 0].decode()
    assert got[at["truncated"]]["error"][0, 0].startswith(b"cannot decode the image")
    assert got[at["rotated"]]["size"].tolist() == [[70, 50]]  # EXIF orientation applied, as on the CPU path
    assert sorted(batch for _, batch in runner.runs) == [1, 2, 2]  # five good rows in batches of at most 2


def test_a_failing_gpu_decoder_call_falls_back_to_pillow_for_its_batch(monkeypatch):
    """If nvImageCodec fails a whole call, the batch's files are decoded by Pillow one by one: nobody's request
    fails for it, and a bad file among them is still only its own error."""
    files, at = decode_requests()

    class Failing:
        def decode(self, items, names=None):
            raise RuntimeError("decoder crashed")

    path = type("Path", (), {"decoder": Failing()})()
    prep = serve.GpuPreprocess(FakeDetector(), MAX_PIXELS, True, path)
    out = prep.decode_all(files)
    for name, i in at.items():
        if name in ("empty", "truncated", "junk", "oversized"):
            assert isinstance(out[i], serve.RequestError), name
        else:
            assert isinstance(out[i], Image.Image) and out[i].mode == "RGB", name
    assert out[at["rotated"]].size == (50, 70)


def test_decode_gpu_is_refused_where_the_model_cannot_take_device_images(tmp_path, capsys, monkeypatch):
    from core.errors import Unavailable
    from runtime import decode, pipeline

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert serve.main(["--torch-weights", str(weights), "--device", "cpu", "--decode", "gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m serve.server: error: --decode gpu decodes into CUDA memory; with --device cpu serve "
                   "with --decode cpu"]
    with pytest.raises(Unavailable, match="--decode gpu feeds the GPU path, which needs a model on a GPU"):
        serve.preprocessors([FakeDetector()], MAX_PIXELS, True, "gpu", 3)
    monkeypatch.setattr(pipeline, "open_path", lambda *a, **k: pytest.fail("the GPU path was tried"))
    for mode in ("auto", "cpu"):  # auto: the CPU path for a model without device inputs; cpu: never tried
        (prep,), close = serve.preprocessors([FakeDetector()], MAX_PIXELS, True, mode, 3)
        assert type(prep) is serve.HostPreprocess
        close()

    def missing():
        raise Unavailable("GPU decoding needs nvImageCodec: pip install -e '.[gpu-decode]'")

    monkeypatch.setattr(decode, "load_codec", missing)
    monkeypatch.setattr(serve, "engine_models", lambda *a: pytest.fail("the engine was loaded"))
    monkeypatch.setattr(serve, "check_ports", lambda *a: None)
    monkeypatch.setattr(serve, "_pytriton", lambda: (None,) * 4)
    engine = tmp_path / "e.plan"
    engine.write_bytes(b"plan")
    monkeypatch.setattr(serve, "require_file", lambda path: None)
    assert serve.main(["--engine", str(engine), "--decode", "gpu"]) == 3
    assert "GPU decoding needs nvImageCodec" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_decoding_on_a_gpu_answers_as_the_cpu_path():
    """The real thing: nvImageCodec on the GPU, the kernel into a CUDA DeviceRunner stand-in. Its stand-in engine
    reads the brightest channel and answers fixed boxes, so a level of decoder difference changes nothing: the
    answers equal the CPU path's; the bad files are their own errors."""
    pytest.importorskip("nvidia.nvimgcodec")
    from helpers import CudaRunner, NumpyDetector

    files, at = decode_requests()
    runner = CudaRunner()
    preps, close = serve.preprocessors([runner], MAX_PIXELS, True, "gpu", max_batch=2)
    try:
        assert isinstance(preps[0], serve.GpuPreprocess) and preps[0].path.decoder is not None
        got = answer_all(serve.InferFunction(runner, preps[0], max_batch=2), files)
    finally:
        close()
        runner.close()
    cpu = NumpyDetector()
    expected = answer_all(serve.InferFunction(cpu, serve.HostPreprocess(cpu, MAX_PIXELS), max_batch=2), files)
    for name, i in at.items():
        if name in ("empty", "truncated", "junk", "oversized"):
            assert got[i]["count"].tolist() == [[0]] and got[i]["error"][0, 0], name
            continue
        for key in ("count", "labels", "boxes", "size"):
            np.testing.assert_array_equal(got[i][key], expected[i][key], err_msg=f"{name} {key}")
        np.testing.assert_allclose(got[i]["scores"], expected[i]["scores"], rtol=0, atol=1e-6)
